//! The JetStream backend (`storage.backend: nats`) through the real binary:
//!
//! - two spillway processes share one stream; one is SIGKILLed with jobs still undelivered and
//!   never restarted, and the other delivers every job either accepted, under the route's
//!   rate limit and max_attempts; a poison job ends dead with its last response, and the
//!   admin API reads and replays it;
//! - the NATS server is SIGKILLed and restarted in the middle of a load: no job answered 202
//!   is lost.
//!
//! The first test uses the machine's NATS (`SPILLWAY_TEST_NATS_URL`, default
//! nats://127.0.0.1:4222; `.ci/run` starts it) with a stream of its own; the second starts
//! its own `nats-server` (on PATH or /usr/sbin) on a free port.

mod support;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use support::{Fault, FaultyUpstream, Spillway};
use tokio::time::Instant;

fn nats_url() -> String {
    std::env::var("SPILLWAY_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

fn stream_name() -> String {
    format!("IT{}", uuid::Uuid::new_v4().simple())
}

/// Removes a test's streams when it ends.
struct Cleanup {
    url: String,
    stream: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let (url, name) = (self.url.clone(), self.stream.clone());
        // Its own thread and runtime: the test's runtime is shutting down.
        let _ = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
                .block_on(spillway::queue::NatsStore::remove_streams(&url, &name))
        })
        .join();
    }
}

/// Polls until the upstream answered 2xx to every key in `accepted`, or panics after `within`.
async fn wait_delivered(upstream: &FaultyUpstream, accepted: &HashSet<String>, within: Duration) {
    let done = support::within(within, || async {
        accepted.is_subset(&upstream.delivered_keys())
    })
    .await;
    assert!(
        done,
        "answered 202 but not delivered within {within:?}: {:?}",
        accepted
            .difference(&upstream.delivered_keys())
            .take(10)
            .collect::<Vec<_>>()
    );
}

fn config(url: &str, stream: &str, upstream: SocketAddr) -> String {
    format!(
        "listen: 127.0.0.1:0
admin: {{ listen: 127.0.0.1:0 }}
storage: {{ backend: nats, url: '{url}', stream: {stream}, ack_wait: 2s }}
shutdown_grace: 1s
routes:
  - name: hooks
    match: {{ host: hooks.test }}
    upstream: http://{upstream}
    deferrable: true
    timeout: 500ms
    concurrency: 4
    rate_limit: {{ per_second: 20, burst: 5 }}
    retry:
      max_attempts: 6
      retry_on: [connect-failure, timeout, reset, 500, 503]
      backoff: {{ initial: 300ms, max: 2s, multiplier: 2.0, jitter: full }}
"
    )
}

fn post(key: &str) -> Request<Full<Bytes>> {
    Request::post("/v1/events")
        .header("host", "hooks.test")
        .header("idempotency-key", key)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(format!("{{\"key\":\"{key}\"}}"))))
        .unwrap()
}

async fn admin_json(admin: SocketAddr, method: &str, path: &str) -> serde_json::Value {
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "admin")
        .body(Full::new(Bytes::new()))
        .unwrap();
    support::send(admin, req).await.json()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replica_s_jobs_are_delivered_by_the_other() {
    let url = nats_url();
    let stream = stream_name();
    let _cleanup = Cleanup {
        url: url.clone(),
        stream: stream.clone(),
    };
    // Down (503) until the first replica is gone; "poison" always fails.
    let up = Arc::new(AtomicBool::new(false));
    let flag = up.clone();
    let upstream = FaultyUpstream::start(move |_, seen| {
        if seen.key() == "poison" {
            Fault::status(500)
        } else if flag.load(Ordering::SeqCst) {
            Fault::status(200)
        } else {
            Fault::status(503)
        }
    })
    .await;
    let yaml = config(&url, &stream, upstream.addr);
    let mut a = Spillway::start(&yaml);
    let b = Spillway::start(&yaml);

    let mut accepted = HashSet::new();
    for i in 0..40 {
        let key = format!("job-{i}");
        let via = if i % 2 == 0 { a.proxy } else { b.proxy };
        let rsp = support::send(via, post(&key)).await;
        assert_eq!(rsp.status, 202, "{key}: {:?}", rsp.body);
        accepted.insert(key);
    }
    // A replay through the other replica is the same job.
    let first = support::send(a.proxy, post("job-0")).await;
    let again = support::send(b.proxy, post("job-0")).await;
    assert_eq!(again.status, 202);
    assert_eq!(
        first.header("spillway-job-id"),
        again.header("spillway-job-id")
    );
    // Wait until the first replica holds leases (it has tried some jobs), then kill it.
    support::eventually("the upstream sees attempts", || async {
        upstream.count() >= 8
    })
    .await;
    a.kill9();
    let killed_at = Instant::now();
    up.store(true, Ordering::SeqCst);
    assert_eq!(support::send(b.proxy, post("poison")).await.status, 202);

    // Every accepted job gets a 2xx, delivered by the survivor.
    wait_delivered(&upstream, &accepted, Duration::from_secs(60)).await;

    let seen = upstream.seen();
    // max_attempts holds per key (the poison job is tried exactly that often).
    let mut per_key: HashMap<String, usize> = HashMap::new();
    for s in &seen {
        *per_key.entry(s.key()).or_default() += 1;
    }
    for (key, n) in &per_key {
        assert!(*n <= 6, "{key} was sent {n} times (max_attempts 6)");
    }
    // The survivor's rate limit (20/s, burst 5) holds: no second holds more than 25 sends.
    let after: Vec<Instant> = seen
        .iter()
        .filter(|s| s.at > killed_at)
        .map(|s| s.at)
        .collect();
    for (i, t) in after.iter().enumerate() {
        let in_window = after[i..]
            .iter()
            .take_while(|u| **u < *t + Duration::from_secs(1))
            .count();
        assert!(in_window <= 25 + 1, "{in_window} sends within one second");
    }

    // The poison job is dead with its last answer, and the admin API shows and replays it.
    let admin = b.admin;
    support::eventually("the poison job is dead-lettered", || async move {
        let dead = admin_json(admin, "GET", "/jobs?state=dead").await;
        dead["jobs"].as_array().is_some_and(|j| j.len() == 1)
    })
    .await;
    let dead = admin_json(admin, "GET", "/jobs?state=dead").await;
    let job = &dead["jobs"][0];
    assert_eq!(job["last_status"], 500, "{job}");
    assert_eq!(job["attempts"], 6, "{job}");
    let poison_sends = upstream
        .seen()
        .iter()
        .filter(|s| s.key() == "poison")
        .count();
    assert_eq!(poison_sends, 6, "max_attempts 6");
    let id = job["id"].as_str().unwrap().to_owned();
    let detail = admin_json(b.admin, "GET", &format!("/jobs/{id}")).await;
    assert_eq!(detail["state"], "dead", "{detail}");
    let routes = admin_json(b.admin, "GET", "/routes").await;
    let hooks = routes["routes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "hooks")
        .unwrap()
        .clone();
    assert_eq!(hooks["dead"], 1, "{hooks}");
    let replayed = admin_json(b.admin, "POST", "/routes/hooks/replay-dead").await;
    assert_eq!(replayed["replayed"], 1, "{replayed}");
    support::eventually("the replayed poison job is tried again", || async {
        upstream
            .seen()
            .iter()
            .filter(|s| s.key() == "poison")
            .count()
            > 6
    })
    .await;
    let metrics = support::send(b.admin, support::get("/metrics", "admin")).await;
    let text = String::from_utf8_lossy(&metrics.body).into_owned();
    assert!(
        text.lines()
            .any(|l| l.starts_with("spillway_queue_depth{") && l.contains("route=\"hooks\"")),
        "{text}"
    );
}

/// A `nats-server -js` of the test's own, on a free port, with its store in a temp dir.
struct OwnNats {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

fn nats_server_bin() -> String {
    for p in [
        "/usr/sbin/nats-server",
        "/usr/bin/nats-server",
        "/usr/local/bin/nats-server",
    ] {
        if std::path::Path::new(p).exists() {
            return p.to_owned();
        }
    }
    "nats-server".to_owned()
}

impl OwnNats {
    async fn start() -> OwnNats {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = tempfile::tempdir().unwrap();
        let child = Self::spawn(port, dir.path()).await;
        OwnNats { child, port, dir }
    }

    async fn spawn(port: u16, dir: &std::path::Path) -> Child {
        let child = Command::new(nats_server_bin())
            .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
            .arg(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server is needed for this test (apt-get install nats-server)");
        // Ready when it accepts connections.
        let up = support::within(Duration::from_secs(10), || async {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
        })
        .await;
        assert!(up, "nats-server did not start");
        child
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    async fn kill9_and_restart(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
        self.child = Self::spawn(self.port, self.dir.path()).await;
    }
}

impl Drop for OwnNats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_restarted_mid_load_loses_no_accepted_job() {
    let mut nats = OwnNats::start().await;
    let upstream = FaultyUpstream::start(|_, _| Fault::status(200)).await;
    let yaml = config(&nats.url(), "LOAD", upstream.addr).replace(
        "rate_limit: { per_second: 20, burst: 5 }",
        "rate_limit: { per_second: 2000, burst: 2000 }",
    );
    let spillway = Spillway::start(&yaml);
    let proxy = spillway.proxy;

    // Four senders, 150 requests each, distinct keys; NATS dies once a third is accepted.
    let accepted = Arc::new(parking_lot::Mutex::new(HashSet::new()));
    let refused = Arc::new(AtomicUsize::new(0));
    let mut senders = Vec::new();
    for s in 0..4 {
        let (accepted, refused) = (accepted.clone(), refused.clone());
        senders.push(tokio::spawn(async move {
            for i in 0..150 {
                let key = format!("load-{s}-{i}");
                match support::try_send(proxy, post(&key)).await {
                    Some(rsp) if rsp.status == 202 => {
                        accepted.lock().insert(key);
                    }
                    _ => {
                        refused.fetch_add(1, Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }
        }));
    }
    support::eventually("a third of the load is accepted", || async {
        accepted.lock().len() >= 200
    })
    .await;
    nats.kill9_and_restart().await;
    for s in senders {
        s.await.unwrap();
    }
    let accepted = accepted.lock().clone();
    let refused = refused.load(Ordering::Relaxed);
    assert!(accepted.len() > 200, "{} accepted", accepted.len());

    wait_delivered(&upstream, &accepted, Duration::from_secs(60)).await;
    println!(
        "{} accepted, {refused} refused during the restart, all delivered; {} sends",
        accepted.len(),
        upstream.count()
    );
}
