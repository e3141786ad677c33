//! Upstreams that misbehave: accept and never answer, answer slowly byte by byte, reset
//! before or in the middle of the body, redirect. Every attempt is bounded by the route's
//! timeout, classified (timeout, reset, status) and retried or dead-lettered as `retry_on`
//! says, for deferred delivery and for passthrough. Real binary, real sockets on loopback.

mod support;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use support::{eventually, get, send, Fault, FaultyUpstream, Spillway};

fn config(upstream: SocketAddr, deferrable: bool, retry_on: &str) -> String {
    format!(
        "listen: 127.0.0.1:0
admin: {{ listen: 127.0.0.1:0 }}
storage: {{ path: '{{data}}/queue.redb' }}
shutdown_grace: 1s
routes:
  - name: up
    match: {{ host: up.test }}
    upstream: http://{upstream}
    deferrable: {deferrable}
    timeout: 300ms
    retry:
      max_attempts: 3
      {retry_on}
      backoff: {{ initial: 20ms, max: 50ms, multiplier: 2.0, jitter: none }}
"
    )
}

fn deferred(upstream: SocketAddr) -> Spillway {
    Spillway::start(&config(upstream, true, ""))
}

fn passthrough(upstream: SocketAddr) -> Spillway {
    Spillway::start(&config(upstream, false, ""))
}

/// A listener that accepts connections and never reads nor answers; counts them.
struct Silent {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Silent {
    async fn start() -> Silent {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let n = accepted.clone();
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            // Bounded: a test makes a handful of connections.
            while held.len() < 100 {
                let Ok((s, _)) = l.accept().await else { break };
                n.fetch_add(1, Ordering::SeqCst);
                held.push(s);
            }
        });
        Silent {
            addr,
            accepted,
            task,
        }
    }
    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for Silent {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn post(key: Option<&str>) -> Request<Full<Bytes>> {
    let mut b = Request::post("/hook").header("host", "up.test");
    if let Some(k) = key {
        b = b.header("idempotency-key", k);
    }
    b.body(Full::new(Bytes::from_static(b"{\"n\":1}"))).unwrap()
}

/// Enqueues one job; returns its id.
async fn enqueue(sw: &Spillway, key: &str) -> String {
    let a = send(sw.proxy, post(Some(key))).await;
    assert_eq!(a.status, 202);
    a.header("spillway-job-id").unwrap().to_owned()
}

async fn job(sw: &Spillway, id: &str) -> Value {
    send(sw.admin, get(&format!("/jobs/{id}"), "admin"))
        .await
        .json()
}

/// Waits until the job reaches `state`; returns it.
async fn settled(sw: &Spillway, id: &str, state: &str) -> Value {
    eventually(&format!("job {id} {state}"), || async {
        job(sw, id).await["state"] == state
    })
    .await;
    job(sw, id).await
}

/// One request on a fresh connection; the status, and the body or why it broke off.
async fn fetch(addr: SocketAddr, req: Request<Full<Bytes>>) -> (u16, Result<Bytes, String>) {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let rsp = tx.send_request(req).await.unwrap();
    let status = rsp.status().as_u16();
    let body = tokio::time::timeout(support::patience(), rsp.into_body().collect())
        .await
        .expect("the body neither ended nor broke off")
        .map(|b| b.to_bytes())
        .map_err(|e| e.to_string());
    (status, body)
}

// === deferred delivery ===

#[tokio::test]
async fn deferred_a_silent_upstream_times_out_each_attempt_then_dead_letters() {
    let up = Silent::start().await;
    let sw = deferred(up.addr);
    let id = enqueue(&sw, "silent-1").await;
    let j = settled(&sw, &id, "dead").await;
    assert_eq!(j["attempts"], 3, "{j}");
    assert_eq!(j["dead_reason"], "max_attempts (timeout)", "{j}");
    assert_eq!(up.accepted(), 3, "one connection per attempt");
}

#[tokio::test]
async fn deferred_a_timeout_not_in_retry_on_is_dead_at_once() {
    let up = Silent::start().await;
    let sw = Spillway::start(&config(up.addr, true, "retry_on: [503]"));
    let id = enqueue(&sw, "silent-2").await;
    let j = settled(&sw, &id, "dead").await;
    assert_eq!(j["attempts"], 1, "{j}");
    assert_eq!(j["dead_reason"], "timeout", "{j}");
}

#[tokio::test]
async fn deferred_a_body_slower_than_the_timeout_is_a_timeout_and_retried() {
    // First a 200 whose body would take 10s, then one that trickles in within the timeout.
    let up = FaultyUpstream::start(|n, _| Fault::Trickle {
        status: 200,
        bytes: if n == 0 { 100 } else { 5 },
        every: Duration::from_millis(if n == 0 { 100 } else { 10 }),
    })
    .await;
    let sw = deferred(up.addr);
    let id = enqueue(&sw, "trickle-1").await;
    let j = settled(&sw, &id, "delivered").await;
    assert_eq!(j["attempts"], 2, "{j}");
    let seen = up.seen();
    assert_eq!(seen.len(), 2);
    assert!(seen.iter().all(|s| s.key() == "trickle-1"));
}

#[tokio::test]
async fn deferred_resets_before_and_mid_body_are_retried_with_the_same_key() {
    let up = FaultyUpstream::start(|n, _| match n {
        0 => Fault::Reset,
        1 => Fault::ResetMidBody {
            status: 200,
            sent: 10,
        },
        _ => Fault::status(200),
    })
    .await;
    let sw = deferred(up.addr);
    let id = enqueue(&sw, "reset-1").await;
    let j = settled(&sw, &id, "delivered").await;
    assert_eq!(j["attempts"], 3, "{j}");
    let seen = up.seen();
    assert_eq!(seen.len(), 3);
    assert!(seen.iter().all(|s| s.key() == "reset-1"));
}

#[tokio::test]
async fn deferred_a_reset_mid_body_every_time_dead_letters_as_reset() {
    let up = FaultyUpstream::start(|_, _| Fault::ResetMidBody {
        status: 200,
        sent: 10,
    })
    .await;
    let sw = deferred(up.addr);
    let id = enqueue(&sw, "reset-2").await;
    let j = settled(&sw, &id, "dead").await;
    assert_eq!(j["dead_reason"], "max_attempts (reset)", "{j}");
    assert_eq!(up.count(), 3);
}

#[tokio::test]
async fn deferred_a_redirect_is_not_followed_and_is_dead_lettered() {
    let elsewhere = FaultyUpstream::start(|_, _| Fault::status(200)).await;
    let target = format!("http://{}/moved", elsewhere.addr);
    let up = FaultyUpstream::start(move |_, _| Fault::Respond {
        status: 302,
        headers: vec![("location", target.clone())],
    })
    .await;
    let sw = deferred(up.addr);
    let id = enqueue(&sw, "redirect-1").await;
    let j = settled(&sw, &id, "dead").await;
    assert_eq!(j["dead_reason"], "status 302", "{j}");
    assert_eq!(j["attempts"], 1, "{j}");
    assert_eq!(up.count(), 1);
    assert_eq!(elsewhere.count(), 0, "the redirect was followed");
}

// === passthrough ===

#[tokio::test]
async fn passthrough_a_silent_upstream_is_504_retried_for_get_not_for_unkeyed_post() {
    let up = Silent::start().await;
    let sw = passthrough(up.addr);
    let a = send(sw.proxy, get("/x", "up.test")).await;
    assert_eq!(a.status, 504);
    assert_eq!(a.json()["error"], "upstream_timeout");
    assert_eq!(a.header("spillway-error"), Some("upstream_timeout"));
    eventually("three attempts", || async { up.accepted() == 3 }).await;
    let a = send(sw.proxy, post(None)).await;
    assert_eq!(a.status, 504);
    // The POST may have reached the upstream: not repeated.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(up.accepted(), 4);
}

#[tokio::test]
async fn passthrough_a_stalled_body_is_cut_and_a_slow_one_streams_through() {
    let up = FaultyUpstream::start(|n, _| {
        if n == 0 {
            // A byte every 5s: stalls far past the 300ms timeout.
            Fault::Trickle {
                status: 200,
                bytes: 1000,
                every: Duration::from_secs(5),
            }
        } else {
            Fault::Trickle {
                status: 200,
                bytes: 20,
                every: Duration::from_millis(20),
            }
        }
    })
    .await;
    let sw = passthrough(up.addr);
    let (status, body) = fetch(sw.proxy, get("/slow", "up.test")).await;
    assert_eq!(status, 200);
    assert!(body.is_err(), "a stalled body was passed on as complete");
    let (status, body) = fetch(sw.proxy, get("/slow", "up.test")).await;
    assert_eq!(status, 200);
    assert_eq!(body.unwrap().len(), 20);
}

#[tokio::test]
async fn passthrough_a_reset_mid_body_breaks_the_client_body_never_passes_as_complete() {
    let up = FaultyUpstream::start(|_, _| Fault::ResetMidBody {
        status: 200,
        sent: 10,
    })
    .await;
    let sw = passthrough(up.addr);
    let (status, body) = fetch(sw.proxy, get("/x", "up.test")).await;
    assert_eq!(status, 200);
    assert!(body.is_err(), "a cut body was passed on as complete");
    // spillway itself is fine.
    let (status, _) = fetch(sw.proxy, get("/x", "up.test")).await;
    assert_eq!(status, 200, "{}", sw.logs());
}

#[tokio::test]
async fn passthrough_a_reset_before_the_answer_is_retried_for_get_and_502_for_unkeyed_post() {
    let up = FaultyUpstream::start(|n, _| {
        if n % 2 == 0 {
            Fault::Reset
        } else {
            Fault::status(200)
        }
    })
    .await;
    let sw = passthrough(up.addr);
    let a = send(sw.proxy, get("/x", "up.test")).await;
    assert_eq!(a.status, 200, "{:?}", a.json());
    assert_eq!(up.count(), 2);
    let a = send(sw.proxy, post(None)).await;
    assert_eq!(a.status, 502);
    assert_eq!(a.json()["error"], "upstream_reset");
    assert_eq!(up.count(), 3, "an unkeyed POST was repeated");
    // With a key the POST may be repeated.
    let a = send(sw.proxy, post(Some("k-1"))).await;
    assert_eq!(a.status, 200);
}

#[tokio::test]
async fn passthrough_a_redirect_goes_back_to_the_client_unfollowed() {
    let elsewhere = FaultyUpstream::start(|_, _| Fault::status(200)).await;
    let target = format!("http://{}/moved", elsewhere.addr);
    let location = target.clone();
    let up = FaultyUpstream::start(move |_, _| Fault::Respond {
        status: 307,
        headers: vec![("location", location.clone())],
    })
    .await;
    let sw = passthrough(up.addr);
    let a = send(sw.proxy, get("/x", "up.test")).await;
    assert_eq!(a.status, 307);
    assert_eq!(a.header("location"), Some(target.as_str()));
    assert_eq!(up.count(), 1, "a 3xx is not retried");
    assert_eq!(elsewhere.count(), 0, "the redirect was followed");
}
