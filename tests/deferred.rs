//! Durable deferral, end to end: 202 only once stored, then delivery with backoff,
//! Retry-After, dedupe, dead letters and crash safety. Real binary, real flaky upstream.

mod support;

use std::collections::HashSet;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use support::{eventually, send, try_send, Action, FlakyUpstream, Spillway};

fn config(upstream: std::net::SocketAddr, extra: &str) -> String {
    format!(
        "listen: 127.0.0.1:0
admin: {{ listen: 127.0.0.1:0 }}
storage: {{ path: '{{data}}/queue.redb' }}
shutdown_grace: 2s
routes:
  - name: hooks
    match: {{ host: hooks.test }}
    upstream: http://{upstream}/base
    deferrable: true
    timeout: 1s
    concurrency: 4
    retry:
      max_attempts: 5
      backoff: {{ initial: 100ms, max: 3s, multiplier: 2.0, jitter: none }}
{extra}"
    )
}

fn post(body: &str) -> Request<Full<Bytes>> {
    Request::post("/v1/events")
        .header("host", "hooks.test")
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_owned())))
        .unwrap()
}

fn keyed(body: &str, key: &str) -> Request<Full<Bytes>> {
    let mut r = post(body);
    r.headers_mut()
        .insert("idempotency-key", key.parse().unwrap());
    r
}

#[tokio::test]
async fn accepted_request_is_answered_202_then_delivered() {
    let up = FlakyUpstream::start(|_, _| Action::status(200)).await;
    let sw = Spillway::start(&config(up.addr, ""));
    let a = send(sw.proxy, post(r#"{"n":1}"#)).await;
    assert_eq!(a.status, 202);
    let id = a.header("spillway-job-id").unwrap().to_owned();
    assert_eq!(a.json()["job_id"], id.as_str());
    assert_eq!(a.json()["status"], "queued");
    assert_eq!(
        a.header("location").unwrap(),
        format!("http://{}/jobs/{id}", sw.admin)
    );

    eventually("delivery", || async { up.count() == 1 }).await;
    let seen = &up.requests()[0];
    assert_eq!(seen.method, "POST");
    assert_eq!(seen.uri, "/base/v1/events");
    assert_eq!(seen.body, r#"{"n":1}"#);
    assert_eq!(seen.headers["content-type"], "application/json");
    assert!(!seen.headers["idempotency-key"].is_empty());
}

#[tokio::test]
async fn failures_are_retried_with_the_same_key_and_growing_gaps() {
    let up = FlakyUpstream::start(|n, _| Action::status(if n < 3 { 503 } else { 200 })).await;
    let sw = Spillway::start(&config(up.addr, ""));
    assert_eq!(send(sw.proxy, keyed("{}", "key-abc")).await.status, 202);
    eventually("four attempts", || async { up.count() == 4 }).await;
    let reqs = up.requests();
    for r in &reqs {
        assert_eq!(r.headers["idempotency-key"], "key-abc");
    }
    let gaps: Vec<Duration> = reqs.windows(2).map(|w| w[1].at - w[0].at).collect();
    // Each gap is at least its scheduled backoff (100, 200, 400 ms: jitter is off); a busy
    // machine can only stretch gaps, so lower bounds are what the schedule guarantees.
    assert!(gaps[0] >= Duration::from_millis(90), "{gaps:?}");
    assert!(gaps[1] >= Duration::from_millis(190), "{gaps:?}");
    assert!(gaps[2] >= Duration::from_millis(380), "{gaps:?}");
    // Delivered: no fifth attempt.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(up.count(), 4);
}

#[tokio::test]
async fn retry_after_on_429_is_honoured_and_pauses_the_whole_route() {
    let up = FlakyUpstream::start(|n, _| {
        if n == 0 {
            Action::Respond {
                status: 429,
                headers: vec![("retry-after", "2".into())],
                body: Bytes::new(),
            }
        } else {
            Action::status(200)
        }
    })
    .await;
    let sw = Spillway::start(&config(up.addr, ""));
    assert_eq!(send(sw.proxy, keyed("{}", "first")).await.status, 202);
    eventually("the 429", || async { up.count() == 1 }).await;
    // A second job accepted during the pause waits too.
    assert_eq!(send(sw.proxy, keyed("{}", "second")).await.status, 202);
    eventually("both delivered", || async { up.count() == 3 }).await;
    let reqs = up.requests();
    assert!(
        reqs[1].at - reqs[0].at >= Duration::from_millis(1900),
        "the route did not wait for Retry-After"
    );
    assert!(reqs[2].at - reqs[0].at >= Duration::from_millis(1900));
}

#[tokio::test]
async fn a_400_is_dead_lettered_at_once() {
    let up = FlakyUpstream::start(|_, _| Action::status(400)).await;
    let sw = Spillway::start(&config(up.addr, ""));
    let a = send(sw.proxy, post("{}")).await;
    let id = a.header("spillway-job-id").unwrap().to_owned();
    eventually("the dead letter", || async {
        sw.logs()
            .lines()
            .any(|l| l.contains("dead-lettered") && l.contains(&id) && l.contains("status 400"))
    })
    .await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(up.count(), 1);
}

#[tokio::test]
async fn max_attempts_exhaustion_dead_letters() {
    let up = FlakyUpstream::start(|_, _| Action::status(503)).await;
    let sw = Spillway::start(&config(up.addr, "").replace("max_attempts: 5", "max_attempts: 3"));
    send(sw.proxy, post("{}")).await;
    eventually("the dead letter", || async {
        sw.logs()
            .lines()
            .any(|l| l.contains("dead-lettered") && l.contains("max_attempts"))
    })
    .await;
    assert_eq!(up.count(), 3);
}

#[tokio::test]
async fn max_age_exhaustion_dead_letters() {
    let up = FlakyUpstream::start(|_, _| Action::status(503)).await;
    let cfg =
        config(up.addr, "").replace("max_attempts: 5", "max_attempts: 100\n      max_age: 1s");
    let sw = Spillway::start(&cfg);
    send(sw.proxy, post("{}")).await;
    eventually("the dead letter", || async {
        sw.logs()
            .lines()
            .any(|l| l.contains("dead-lettered") && l.contains("max_age"))
    })
    .await;
    assert!(up.count() < 100);
}

#[tokio::test]
async fn a_repeated_key_replays_the_original_and_a_changed_body_is_422() {
    let up = FlakyUpstream::start(|_, _| Action::Delay(Duration::from_millis(10))).await;
    let sw = Spillway::start(&config(up.addr, ""));
    let first = send(sw.proxy, keyed(r#"{"a":1}"#, "dup-1")).await;
    assert_eq!(first.status, 202);
    let again = send(sw.proxy, keyed(r#"{"a":1}"#, "dup-1")).await;
    assert_eq!(again.status, 202);
    assert_eq!(again.header("idempotent-replayed"), Some("true"));
    assert_eq!(
        again.header("spillway-job-id"),
        first.header("spillway-job-id")
    );
    let other = send(sw.proxy, keyed(r#"{"a":2}"#, "dup-1")).await;
    assert_eq!(other.status, 422);
    assert_eq!(other.json()["error"], "idempotency_key_mismatch");
    eventually("one delivery", || async { up.count() == 1 }).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(up.count(), 1);
}

#[tokio::test]
async fn a_full_queue_answers_503_and_stores_nothing() {
    let up = FlakyUpstream::start(|_, _| Action::Delay(Duration::from_secs(3))).await;
    let cfg = config(up.addr, "    queue: { max_depth: 2 }\n")
        .replace("concurrency: 4", "concurrency: 1");
    let sw = Spillway::start(&cfg);
    let mut statuses = Vec::new();
    for i in 0..4 {
        let a = send(sw.proxy, keyed("{}", &format!("k{i}"))).await;
        if a.status == 503 {
            assert_eq!(a.json()["error"], "queue_full");
            assert!(a.header("retry-after").is_some());
        }
        statuses.push(a.status);
    }
    assert_eq!(&statuses[..2], &[202, 202], "{statuses:?}");
    assert_eq!(&statuses[2..], &[503, 503], "{statuses:?}");
}

#[tokio::test]
async fn rate_limit_holds_for_deliveries() {
    let up = FlakyUpstream::start(|_, _| Action::status(200)).await;
    let cfg = config(up.addr, "    rate_limit: { per_second: 5, burst: 1 }\n");
    let sw = Spillway::start(&cfg);
    for i in 0..10 {
        assert_eq!(
            send(sw.proxy, keyed("{}", &format!("r{i}"))).await.status,
            202
        );
    }
    eventually("all delivered", || async { up.count() == 10 }).await;
    let reqs = up.requests();
    let span = reqs[9].at - reqs[0].at;
    // 10 deliveries at 5/s with a burst of 1 need at least 9 intervals of 200ms.
    assert!(
        span >= Duration::from_millis(1700),
        "delivered 10 in {span:?}"
    );
}

#[tokio::test]
async fn same_ordering_key_is_delivered_one_at_a_time_in_order() {
    let up = FlakyUpstream::start(|n, _| {
        if n == 0 {
            Action::status(503)
        } else {
            Action::status(200)
        }
    })
    .await;
    let cfg = config(up.addr, "    ordering: { key_header: X-Ordering-Key }\n");
    let sw = Spillway::start(&cfg);
    for i in 0..3 {
        let mut r = keyed(&format!("{{\"seq\":{i}}}"), &format!("o{i}"));
        r.headers_mut()
            .insert("x-ordering-key", "customer-1".parse().unwrap());
        assert_eq!(send(sw.proxy, r).await.status, 202);
    }
    eventually("all delivered", || async { up.count() == 4 }).await;
    let bodies: Vec<String> = up
        .requests()
        .iter()
        .map(|r| String::from_utf8_lossy(&r.body).into_owned())
        .collect();
    // The head's retry blocks its key: seq 0 fails, then 0, 1, 2 in order.
    assert_eq!(
        bodies,
        ["{\"seq\":0}", "{\"seq\":0}", "{\"seq\":1}", "{\"seq\":2}"]
    );
}

/// SIGKILL during a burst of accepts, repeated; after a restart every job that got a
/// 202 reaches the upstream.
#[tokio::test]
async fn every_202_survives_repeated_sigkill_during_accepts() {
    let up = FlakyUpstream::start(|_, _| Action::status(200)).await;
    let mut sw = Spillway::start(&config(up.addr, ""));
    let mut acked: HashSet<String> = HashSet::new();
    let mut refused: HashSet<String> = HashSet::new();
    for round in 0..3 {
        let proxy = sw.proxy;
        let mut handles = Vec::new();
        for t in 0..8 {
            handles.push(tokio::spawn(async move {
                let mut results = Vec::new();
                for i in 0..40 {
                    let key = format!("r{round}-t{t}-{i}");
                    let a = try_send(proxy, keyed("{}", &key)).await;
                    results.push((key, a.map(|a| a.status)));
                }
                results
            }));
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
        sw.kill9();
        for h in handles {
            for (key, status) in h.await.unwrap() {
                match status {
                    Some(202) => {
                        acked.insert(key);
                    }
                    Some(_) => {
                        refused.insert(key);
                    }
                    None => {}
                }
            }
        }
        sw.restart();
    }
    assert!(!acked.is_empty());
    eventually("every acknowledged job is delivered", || async {
        let keys: HashSet<String> = up
            .requests()
            .iter()
            .map(|r| r.headers["idempotency-key"].to_str().unwrap().to_owned())
            .collect();
        acked.is_subset(&keys)
    })
    .await;
    let keys: HashSet<String> = up
        .requests()
        .iter()
        .map(|r| r.headers["idempotency-key"].to_str().unwrap().to_owned())
        .collect();
    assert!(
        refused.is_disjoint(&keys),
        "a refused request was delivered"
    );
    eprintln!(
        "acked {} jobs across 3 SIGKILLs; {} upstream requests for {} distinct keys",
        acked.len(),
        up.count(),
        keys.len()
    );
}

/// SIGKILL while deliveries hang at the upstream: after restart the in-flight jobs are
/// delivered again with the same key.
#[tokio::test]
async fn in_flight_jobs_are_redelivered_after_sigkill() {
    let up = FlakyUpstream::start(|n, _| {
        if n < 2 {
            Action::Delay(Duration::from_secs(30))
        } else {
            Action::status(200)
        }
    })
    .await;
    let mut sw = Spillway::start(&config(up.addr, "").replace("timeout: 1s", "timeout: 20s"));
    assert_eq!(send(sw.proxy, keyed("{}", "inflight-a")).await.status, 202);
    assert_eq!(send(sw.proxy, keyed("{}", "inflight-b")).await.status, 202);
    eventually("both in flight", || async { up.count() == 2 }).await;
    sw.restart();
    eventually("redelivered", || async { up.count() == 4 }).await;
    let keys: HashSet<String> = up.requests()[2..]
        .iter()
        .map(|r| r.headers["idempotency-key"].to_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        keys,
        HashSet::from(["inflight-a".to_owned(), "inflight-b".to_owned()])
    );
}

#[tokio::test]
async fn a_quota_holds_across_a_restart() {
    let up = FlakyUpstream::start(|_, _| Action::status(200)).await;
    let mut sw = Spillway::start(&config(up.addr, "    quotas: [{ limit: 2, per: 1h }]\n"));
    for i in 0..3 {
        assert_eq!(
            send(sw.proxy, keyed("{}", &format!("q{i}"))).await.status,
            202
        );
    }
    eventually("two deliveries", || async { up.count() == 2 }).await;
    sw.restart();
    assert_eq!(send(sw.proxy, keyed("{}", "q3")).await.status, 202);
    // The window is an hour: nothing more may go out, before or after the restart.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(up.count(), 2);
}

#[tokio::test]
async fn a_corrupt_queue_file_is_a_clear_error_and_is_left_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let queue = dir.path().join("queue.redb");
    let garbage = b"this is not a redb file, it is somebody's notes".repeat(100);
    std::fs::write(&queue, &garbage).unwrap();
    let cfg = dir.path().join("spillway.yaml");
    std::fs::write(
        &cfg,
        config("127.0.0.1:9".parse().unwrap(), "")
            .replace("{data}", &dir.path().display().to_string()),
    )
    .unwrap();
    let (code, err) = support::run_to_exit(&cfg);
    assert_eq!(code, Some(2));
    assert!(err.contains(&queue.display().to_string()), "{err}");
    assert_eq!(
        std::fs::read(&queue).unwrap(),
        garbage,
        "the file was modified"
    );
}

/// A real full disk, the whole cycle (a small tmpfs; needs root, skipped with a message
/// otherwise): while full, accepts answer 503 `storage_unavailable` and never 202, readiness
/// drops, nothing half stored shows up, and the jobs stored before keep draining to the
/// upstream; once space returns, accepting resumes without a restart.
#[tokio::test]
async fn a_full_disk_gives_503_never_202_keeps_delivering_and_recovers_when_space_returns() {
    let dir = tempfile::tempdir().unwrap();
    let mnt = dir.path().join("small");
    std::fs::create_dir(&mnt).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=16m", "tmpfs"])
        .arg(&mnt)
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("skipped: cannot mount a tmpfs here (not root?)");
        return;
    }
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let _guard = Unmount(mnt.clone());

    // The upstream refuses until the disk is full, so the stored jobs wait in the queue.
    let open = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let gate = open.clone();
    let up = FlakyUpstream::start(move |_, _| {
        if gate.load(std::sync::atomic::Ordering::SeqCst) {
            Action::status(200)
        } else {
            Action::status(503)
        }
    })
    .await;
    let cfg = config(up.addr, "")
        .replace(
            "{data}/queue.redb",
            &format!("{}/queue.redb", mnt.display()),
        )
        .replace(
            "shutdown_grace",
            "limits: { max_body_bytes: 256KiB }\nshutdown_grace",
        )
        .replace("max_attempts: 5", "max_attempts: 1000")
        .replace("max: 3s", "max: 300ms");
    let sw = Spillway::start(&cfg);
    let filler = mnt.join("filler");
    let body = "x".repeat(100 * 1024);
    let mut accepted: HashSet<String> = HashSet::new();
    let mut refused = 0;
    for i in 0..60 {
        let a = send(sw.proxy, keyed(&body, &format!("fill-{i}"))).await;
        match a.status {
            202 => {
                accepted.insert(a.header("spillway-job-id").unwrap().to_owned());
            }
            503 => {
                assert_eq!(a.json()["error"], "storage_unavailable", "{:?}", a.json());
                assert!(a.header("retry-after").is_some());
                refused += 1;
                if refused == 3 {
                    break;
                }
            }
            other => panic!("unexpected status {other}"),
        }
        if i == 2 {
            // Leave the store a little room, then take the rest.
            let _ = std::process::Command::new("dd")
                .args(["if=/dev/zero", "bs=64k", "count=1000"])
                .arg(format!("of={}", filler.display()))
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
    assert_eq!(refused, 3, "the disk never filled up");
    assert!(!accepted.is_empty());
    let ready = send(sw.admin, support::get("/readyz", "admin")).await;
    assert_eq!(
        ready.status, 503,
        "readiness must drop while storage is unusable"
    );

    // Nothing half stored: the store holds exactly the jobs that were answered 202 (reads
    // wait for the store to reopen after the failed write).
    eventually("the job list", || async {
        send(sw.admin, support::get("/jobs?limit=1", "admin"))
            .await
            .status
            == 200
    })
    .await;
    let listed = send(sw.admin, support::get("/jobs?limit=1000", "admin")).await;
    let stored: HashSet<String> = listed.json()["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        stored, accepted,
        "the store differs from what was acknowledged"
    );

    // Still full: what is stored drains to the upstream, and accepts stay refused.
    let before = up.count();
    open.store(true, std::sync::atomic::Ordering::SeqCst);
    eventually(
        "the stored jobs are delivered while the disk is full",
        || async {
            let ok: HashSet<String> = up.requests()[before..]
                .iter()
                .map(|r| r.headers["idempotency-key"].to_str().unwrap().to_owned())
                .collect();
            (0..60)
                .map(|i| format!("fill-{i}"))
                .filter(|k| ok.contains(k))
                .count()
                >= accepted.len()
        },
    )
    .await;
    let a = send(sw.proxy, keyed(&body, "while-full")).await;
    assert_eq!(a.status, 503, "accepted while the disk was still full");

    std::fs::remove_file(&filler).unwrap();
    eventually("accepting resumes", || async {
        send(
            sw.proxy,
            keyed("{}", &format!("after-{}", uuid::Uuid::new_v4())),
        )
        .await
        .status
            == 202
    })
    .await;
    eventually("ready again", || async {
        send(sw.admin, support::get("/readyz", "admin"))
            .await
            .status
            == 200
    })
    .await;
}
