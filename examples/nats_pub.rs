//! NATS JetStream publish-with-ack load for benches/peers.sh: N concurrent publishers, each
//! waiting for the stream's ack before its next message (the broker's durable accept, like a
//! 202 from spillway), into a file-backed stream. Prints one JSON line like examples/loadgen.
//!
//! Usage: nats_pub URL STREAM CLIENTS SECONDS [BODY_BYTES]

use std::time::Duration;

use async_nats::jetstream::{self, stream::StorageType};
use bytes::Bytes;
use tokio::time::Instant;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn pct(sorted: &[u32], p: f64) -> u32 {
    if sorted.is_empty() {
        return 0;
    }
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let a: Vec<String> = std::env::args().collect();
    if a.len() < 5 {
        return Err("usage: nats_pub URL STREAM CLIENTS SECONDS [BODY_BYTES]".into());
    }
    let clients: usize = a[3].parse()?;
    let secs: u64 = a[4].parse()?;
    let body = Bytes::from(vec![b'x'; a.get(5).map_or(Ok(1024), |s| s.parse())?]);
    let client = async_nats::connect(&a[1]).await?;
    let js = jetstream::new(client);
    let subject = format!("{}.jobs", a[2]);
    js.get_or_create_stream(jetstream::stream::Config {
        name: a[2].clone(),
        subjects: vec![subject.clone()],
        storage: StorageType::File,
        ..Default::default()
    })
    .await?;
    let end = Instant::now() + Duration::from_secs(secs);
    let start = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let (js, subject, body) = (js.clone(), subject.clone(), body.clone());
            tokio::spawn(async move {
                let (mut lat, mut errors) = (Vec::new(), 0u64);
                while Instant::now() < end {
                    let t = Instant::now();
                    // Counted only once the stream acknowledged it stored the message.
                    let acked = match js.publish(subject.clone(), body.clone()).await {
                        Ok(ack) => ack.await.is_ok(),
                        Err(_) => false,
                    };
                    if acked {
                        lat.push(u32::try_from(t.elapsed().as_micros()).unwrap_or(u32::MAX));
                    } else {
                        errors += 1;
                    }
                }
                (lat, errors)
            })
        })
        .collect();
    let (mut lat, mut errors) = (Vec::new(), 0u64);
    for task in tasks {
        let (l, e) = task.await?;
        lat.extend(l);
        errors += e;
    }
    let took = start.elapsed().as_secs_f64().max(1e-9);
    lat.sort_unstable();
    println!(
        "{{\"rate\":{:.0},\"ok\":{},\"errors\":{},\"p50_us\":{},\"p99_us\":{},\"max_us\":{}}}",
        lat.len() as f64 / took,
        lat.len(),
        errors,
        pct(&lat, 0.50),
        pct(&lat, 0.99),
        lat.last().copied().unwrap_or(0)
    );
    Ok(())
}
