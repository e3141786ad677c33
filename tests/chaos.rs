//! Chaos: a flaky upstream (503s, resets, hangs past the timeout, 429 + Retry-After), a
//! steady stream of deferred requests with distinct idempotency keys, and spillway
//! SIGKILLed at random points and restarted, again and again. Then, once the queue drained:
//! every job answered 202 reached the upstream and got a 2xx there; no job refused (503 or
//! a refused connection) reached it; a key seen more than once is a re-delivery of the same
//! job (same body), never a mix-up. The figures are printed.
//!
//! Seeded (`SPILLWAY_CHAOS_SEED`, printed either way); `SPILLWAY_CHAOS_LONG=1` runs a
//! longer variant with more kills and jobs. Every loop is bounded in count and in time.

mod support;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use rand::{Rng, SeedableRng};
use support::{Fault, FaultyUpstream, Spillway};
use tokio::time::Instant;

/// How one accept ended, as the client saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Seen {
    Accepted,
    /// spillway answered, but not 202 (503 storage/queue, or anything else).
    Refused(u16),
    /// No connection: spillway was down. Nothing was sent, so nothing may be stored.
    NotConnected,
    /// Connected, but the answer never came (killed mid-request): the job may or may not
    /// have been stored before the kill; either is correct.
    Lost,
}

async fn accept_once(addr: SocketAddr, key: &str) -> Seen {
    let Ok(stream) = tokio::net::TcpStream::connect(addr).await else {
        return Seen::NotConnected;
    };
    let Ok((mut tx, conn)) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
    else {
        return Seen::Lost;
    };
    tokio::spawn(conn);
    let req = Request::post("/v1/events")
        .header("host", "hooks.test")
        .header("idempotency-key", key)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body_for(key))))
        .unwrap();
    let answer = tokio::time::timeout(Duration::from_secs(10), async {
        let rsp = tx.send_request(req).await.ok()?;
        let status = rsp.status().as_u16();
        rsp.into_body().collect().await.ok()?;
        Some(status)
    })
    .await;
    match answer {
        Ok(Some(202)) => Seen::Accepted,
        Ok(Some(s)) => Seen::Refused(s),
        _ => Seen::Lost,
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn body_for(key: &str) -> String {
    format!("{{\"event\":\"{key}\"}}")
}

/// splitmix64: the upstream's dice, from the seed and the request number.
fn dice(seed: u64, n: u64) -> u64 {
    let mut z = seed.wrapping_add(n.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn config(upstream: SocketAddr) -> String {
    format!(
        "listen: 127.0.0.1:0
admin: {{ listen: 127.0.0.1:0 }}
storage: {{ path: '{{data}}/queue.redb' }}
shutdown_grace: 1s
routes:
  - name: hooks
    match: {{ host: hooks.test }}
    upstream: http://{upstream}
    deferrable: true
    timeout: 300ms
    concurrency: 8
    retry:
      max_attempts: 60
      retry_on: [connect-failure, timeout, reset, 429, 500, 502, 503, 504]
      backoff: {{ initial: 20ms, max: 250ms, multiplier: 2.0, jitter: full }}
      honor_retry_after: true
"
    )
}

struct Plan {
    kills: usize,
    max_jobs: usize,
    senders: usize,
    /// Time between a restart and the next kill, in ms.
    gap_ms: (u64, u64),
    drain: Duration,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_202_is_delivered_through_20_sigkills_and_a_flaky_upstream() {
    let long = std::env::var("SPILLWAY_CHAOS_LONG").is_ok_and(|v| v == "1");
    let plan = if long {
        Plan {
            kills: 100,
            max_jobs: 10_000,
            senders: 4,
            gap_ms: (100, 2500),
            drain: Duration::from_secs(300),
        }
    } else {
        Plan {
            kills: 20,
            max_jobs: 1_500,
            senders: 3,
            gap_ms: (150, 1200),
            drain: Duration::from_secs(90),
        }
    };
    let seed: u64 = std::env::var("SPILLWAY_CHAOS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!(
        "chaos: seed {seed} (repeat with SPILLWAY_CHAOS_SEED={seed}), {} kills, long={long}",
        plan.kills
    );
    let started = Instant::now();

    // 68% 200, 15% 503, 8% reset, 7% hang past the 300ms timeout, 2% 429 + Retry-After
    // (rarer, as each one pauses the whole route).
    let up = FaultyUpstream::start(move |n, _| match dice(seed, n as u64) % 100 {
        0..=67 => Fault::status(200),
        68..=82 => Fault::status(503),
        83..=90 => Fault::Reset,
        91..=97 => Fault::Hang,
        _ => Fault::Respond {
            status: 429,
            headers: vec![("retry-after", "1".into())],
        },
    })
    .await;
    let mut sw = Spillway::start(&config(up.addr));

    let addr: Arc<Mutex<Option<SocketAddr>>> = Arc::new(Mutex::new(Some(sw.proxy)));
    let stop = Arc::new(AtomicBool::new(false));
    let outcomes: Arc<Mutex<HashMap<String, Seen>>> = Arc::new(Mutex::new(HashMap::new()));
    let per_sender = plan.max_jobs / plan.senders;
    let mut senders = Vec::new();
    for s in 0..plan.senders {
        let (addr, stop, outcomes) = (addr.clone(), stop.clone(), outcomes.clone());
        senders.push(tokio::spawn(async move {
            for i in 0..per_sender {
                if stop.load(Ordering::Acquire) {
                    break;
                }
                let Some(a) = *addr.lock() else {
                    // Down between a kill and its restart: wait rather than burn keys.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                let key = format!("chaos-{seed}-{s}-{i}");
                let seen = accept_once(a, &key).await;
                outcomes.lock().insert(key, seen);
                // A steady stream, not a flood: the drain must fit the test's time.
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }));
    }

    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for _ in 0..plan.kills {
        let gap = rng.random_range(plan.gap_ms.0..=plan.gap_ms.1);
        tokio::time::sleep(Duration::from_millis(gap)).await;
        *addr.lock() = None;
        // restart() blocks on the child's startup line; keep the runtime's other worker free.
        tokio::task::block_in_place(|| sw.restart());
        *addr.lock() = Some(sw.proxy);
    }
    stop.store(true, Ordering::Release);
    for s in senders {
        s.await.unwrap();
    }
    let kill_phase = started.elapsed();

    let outcomes = outcomes.lock().clone();
    let accepted: HashSet<&String> = outcomes
        .iter()
        .filter(|(_, s)| **s == Seen::Accepted)
        .map(|(k, _)| k)
        .collect();
    assert!(
        accepted.len() > plan.kills,
        "too few accepts to mean anything: {}",
        accepted.len()
    );

    // Drain: every accepted key gets a 2xx at the upstream, and the store holds nothing
    // pending nor dead.
    let admin = sw.admin;
    let drained = support::within(plan.drain, || {
        let up = &up;
        let accepted = &accepted;
        async move {
            let ok = up.delivered_keys();
            if !accepted.iter().all(|k| ok.contains(*k)) {
                return false;
            }
            let routes = support::try_send(admin, support::get("/routes", "admin")).await;
            routes.is_some_and(|r| r.json()["routes"][0]["depth"]["total"] == 0)
        }
    })
    .await;

    let seen = up.seen();
    let mut by_key: HashMap<String, Vec<&support::Seen>> = HashMap::new();
    for s in &seen {
        by_key.entry(s.key()).or_default().push(s);
    }
    let delivered: HashSet<&String> = by_key
        .iter()
        .filter(|(_, v)| v.iter().any(|s| s.answered_2xx()))
        .map(|(k, _)| k)
        .collect();
    let missing: Vec<&&String> = accepted
        .iter()
        .filter(|k| !delivered.contains(**k))
        .collect();
    let count = |f: fn(&Seen) -> bool| outcomes.values().filter(|s| f(s)).count();
    let refused = count(|s| matches!(s, Seen::Refused(_)));
    let not_connected = count(|s| *s == Seen::NotConnected);
    let lost = count(|s| *s == Seen::Lost);
    let lost_but_stored = outcomes
        .iter()
        .filter(|(k, s)| **s == Seen::Lost && by_key.contains_key(*k))
        .count();
    let duplicate_2xx: usize = by_key
        .values()
        .map(|v| {
            v.iter()
                .filter(|s| s.answered_2xx())
                .count()
                .saturating_sub(1)
        })
        .sum();
    let keys_with_duplicates = by_key
        .values()
        .filter(|v| v.iter().filter(|s| s.answered_2xx()).count() > 1)
        .count();
    eprintln!(
        "chaos figures: seed {seed}; {} kills; {} requests sent: {} accepted (202), {} refused, \
         {} not connected (spillway down), {} answer lost in a kill ({} of those stored anyway); \
         upstream: {} attempts, {} distinct keys delivered 2xx, {} duplicate 2xx deliveries \
         over {} keys; kill phase {:.1}s, total {:.1}s",
        plan.kills,
        outcomes.len(),
        accepted.len(),
        refused,
        not_connected,
        lost,
        lost_but_stored,
        seen.len(),
        delivered.len(),
        duplicate_2xx,
        keys_with_duplicates,
        kill_phase.as_secs_f64(),
        started.elapsed().as_secs_f64(),
    );

    assert!(
        missing.is_empty(),
        "{} accepted jobs never got a 2xx at the upstream (drained: {drained}), e.g. {:?}; log:\n{}",
        missing.len(),
        missing.iter().take(5).collect::<Vec<_>>(),
        tail(&sw.logs(), 40)
    );
    assert!(drained, "the queue did not drain within {:?}", plan.drain);
    let routes = support::send(sw.admin, support::get("/routes", "admin")).await;
    assert_eq!(
        routes.json()["routes"][0]["dead"],
        0,
        "a job was dead-lettered: {}",
        routes.json()
    );
    for (key, visits) in &by_key {
        match outcomes.get(key) {
            Some(Seen::Accepted) | Some(Seen::Lost) => {}
            other => panic!("key {key} reached the upstream, yet its accept was {other:?}"),
        }
        // Duplicates are re-deliveries of the same job: same key, same body, every time.
        for v in visits {
            assert_eq!(v.body, body_for(key), "key {key} arrived with another body");
        }
    }
}
