//! An open-loop load generator for benches/peers.sh: sends requests at a fixed rate over a
//! fixed set of keep-alive connections and prints one JSON line with the rate reached and the
//! latency percentiles. wrk only drives closed loops (the next request waits for the last
//! answer), which hides queueing delay; latency "at half load" needs a fixed arrival rate.
//!
//! Usage: loadgen URL RATE SECONDS [CONNECTIONS] [HOST] [BODY_BYTES]
//! A BODY_BYTES above 0 sends POST with that many bytes, otherwise GET.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use tokio::time::Instant;

struct Args {
    addr: String,
    path: String,
    host: String,
    rate: f64,
    secs: u64,
    conns: usize,
    body: Bytes,
}

fn args() -> Result<Args, String> {
    let a: Vec<String> = std::env::args().collect();
    if a.len() < 4 {
        return Err("usage: loadgen URL RATE SECONDS [CONNECTIONS] [HOST] [BODY_BYTES]".into());
    }
    let url: hyper::Uri = a[1].parse().map_err(|e| format!("url: {e}"))?;
    let auth = url.authority().ok_or("url has no host:port")?.to_string();
    let num = |i: usize, d: &str| a.get(i).map_or(d, |s| s.as_str()).to_owned();
    let body_len: usize = num(6, "0").parse().map_err(|e| format!("body: {e}"))?;
    Ok(Args {
        host: a
            .get(5)
            .filter(|h| !h.is_empty())
            .cloned()
            .unwrap_or(auth.clone()),
        addr: auth,
        path: url.path_and_query().map_or("/", |p| p.as_str()).to_owned(),
        rate: a[2]
            .parse::<f64>()
            .ok()
            .filter(|r| r.is_finite() && *r > 0.0)
            .ok_or("rate: a positive number of requests per second")?,
        secs: a[3].parse().map_err(|e| format!("seconds: {e}"))?,
        conns: num(4, "50")
            .parse()
            .map_err(|e| format!("connections: {e}"))?,
        body: Bytes::from(vec![b'x'; body_len]),
    })
}

#[derive(Default)]
struct Tally {
    lat_us: Vec<u32>,
    errors: u64,
}

/// One connection's share of the schedule: request k of connection i is due at
/// start + (k * conns + i) / rate. Latency counts from the due time when the connection was
/// already late (the wait is queueing the server caused), from the send when it slept (tokio's
/// timer wakes up to 1 ms late, which is ours, not the server's).
async fn connection(a: &Args, i: usize, start: Instant, end: Instant) -> Tally {
    let mut t = Tally::default();
    let Ok(stream) = tokio::net::TcpStream::connect(&a.addr).await else {
        t.errors += 1;
        return t;
    };
    let _ = stream.set_nodelay(true);
    let Ok((mut send, conn)) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
    else {
        t.errors += 1;
        return t;
    };
    tokio::spawn(conn);
    let method = if a.body.is_empty() {
        Method::GET
    } else {
        Method::POST
    };
    for k in 0u64.. {
        let due = start + Duration::from_secs_f64((k as f64 * a.conns as f64 + i as f64) / a.rate);
        if due >= end {
            break;
        }
        let from = if Instant::now() < due {
            tokio::time::sleep_until(due).await;
            Instant::now()
        } else {
            due
        };
        let req = Request::builder()
            .method(method.clone())
            .uri(&a.path)
            .header(hyper::header::HOST, &a.host)
            .body(Full::new(a.body.clone()));
        let Ok(req) = req else {
            t.errors += 1;
            break;
        };
        let ok = match send.send_request(req).await {
            Ok(rsp) => {
                let good = rsp.status().is_success();
                rsp.into_body().collect().await.is_ok() && good
            }
            Err(_) => false,
        };
        if ok {
            let us = from.elapsed().as_micros();
            t.lat_us.push(u32::try_from(us).unwrap_or(u32::MAX));
        } else {
            t.errors += 1;
            if send.ready().await.is_err() {
                break;
            }
        }
    }
    t
}

fn pct(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

#[tokio::main]
async fn main() {
    let a = match args() {
        Ok(a) => std::sync::Arc::new(a),
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let start = Instant::now() + Duration::from_millis(100);
    let end = start + Duration::from_secs(a.secs);
    let tasks: Vec<_> = (0..a.conns)
        .map(|i| {
            let a = a.clone();
            tokio::spawn(async move { connection(&a, i, start, end).await })
        })
        .collect();
    let mut all = Tally::default();
    for task in tasks {
        if let Ok(t) = task.await {
            all.lat_us.extend(t.lat_us);
            all.errors += t.errors;
        }
    }
    let took = start.elapsed().as_secs_f64().max(1e-9);
    all.lat_us.sort_unstable();
    println!(
        "{{\"target_rate\":{},\"rate\":{:.0},\"ok\":{},\"errors\":{},\"p50_us\":{},\"p99_us\":{},\"max_us\":{}}}",
        a.rate,
        all.lat_us.len() as f64 / took,
        all.lat_us.len(),
        all.errors,
        pct(&all.lat_us, 0.50),
        pct(&all.lat_us, 0.99),
        all.lat_us.last().copied().unwrap_or(0),
    );
}
