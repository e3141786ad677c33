//! `spillway demo`: why this exists, in one command and without setup.
//!
//! It starts a flaky upstream in this process (random 503s, slow answers, dropped
//! connections, 429 with `Retry-After`), sends it a burst of calls directly, then starts
//! a real spillway (the same `App` as `spillway run`, storage in a temporary directory) on
//! free loopback ports and sends the same burst through a deferrable route and some
//! calls through a passthrough route. A live view shows the jobs move, from the store's
//! own counters; the summary checks every accepted job one by one against the store and
//! against what the upstream answered, and the exit code says whether any was lost.
//!
//! The upstream here is meant to look like a real bad day, unlike the strict, scripted
//! double in `tests/support`; the two stay separate on purpose.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::io::{IsTerminal, Write as _};
use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::app::App;
use crate::client::HttpClient;
use crate::config::FailureClass;
use crate::queue::{JobId, JobState, JobStore};

/// The deferrable route's name, as the store knows it.
const DEFERRED: &str = "webhooks";
/// How long one direct call may take, like the route's per-attempt timeout.
const CALL_TIMEOUT: Duration = Duration::from_secs(1);
const BAR: usize = 24;

/// What `spillway demo` was asked to do.
#[derive(Clone, Debug)]
pub struct Options {
    /// Calls in the burst (direct, and again through the deferrable route).
    pub requests: usize,
    /// Calls in flight at once, per burst.
    pub concurrency: usize,
    /// Fixes the upstream's dice; a fresh seed when `None`.
    pub seed: Option<u64>,
    /// The whole demo ends within this.
    pub timeout: Duration,
    /// Redraw a live view (a terminal), or print plain progress lines (logs).
    pub tty: bool,
    /// Keep the queue in NATS JetStream at this URL rather than in a redb file.
    pub nats: Option<String>,
}

/// Runs the demo on its own runtime; exit code 0 when no accepted job was lost.
pub fn run(opts: Options) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(demo(opts)) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("spillway demo: {e}");
            ExitCode::from(2)
        }
    }
}

// === the flaky upstream ===

/// How the upstream answers one call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Behaviour {
    Ok,
    Unavailable,
    TooMany,
    Slow(u64),
    Reset,
}

/// The dice: 30% 503, 8% slow (0.3–1.5 s, so some calls outlive a 1 s timeout),
/// 5% dropped connection, 2% 429 with `Retry-After: 1`, the rest 200.
fn roll(rng: &mut StdRng) -> Behaviour {
    let x: f64 = rng.random();
    if x < 0.30 {
        Behaviour::Unavailable
    } else if x < 0.38 {
        Behaviour::Slow(rng.random_range(300..1500))
    } else if x < 0.43 {
        Behaviour::Reset
    } else if x < 0.45 {
        Behaviour::TooMany
    } else {
        Behaviour::Ok
    }
}

#[derive(Default)]
struct Seen {
    calls: AtomicU64,
    /// Idempotency keys the upstream answered 2xx, with how often.
    accepted_keys: Mutex<HashMap<String, u32>>,
    /// 429s sent to spillway's deliveries (their keys start with `demo-`).
    slow_downs: AtomicU64,
}

impl Seen {
    /// Deferred jobs (keys `demo-…`) the upstream answered 2xx.
    fn deferred_answered(&self) -> u64 {
        self.accepted_keys
            .lock()
            .keys()
            .filter(|k| k.starts_with("demo-"))
            .count() as u64
    }
}

#[derive(Debug, thiserror::Error)]
#[error("the demo upstream dropped the connection on purpose")]
struct Dropped;

struct Upstream {
    addr: SocketAddr,
    seen: Arc<Seen>,
    stop: CancellationToken,
}

impl Upstream {
    async fn start(seed: u64) -> std::io::Result<Upstream> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let seen = Arc::new(Seen::default());
        let rng = Arc::new(Mutex::new(StdRng::seed_from_u64(seed)));
        let stop = CancellationToken::new();
        let (s, st) = (seen.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let stream = tokio::select! {
                    r = listener.accept() => match r {
                        Ok((stream, _)) => stream,
                        Err(_) => continue,
                    },
                    _ = st.cancelled() => return,
                };
                let (seen, rng) = (s.clone(), rng.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let (seen, rng) = (seen.clone(), rng.clone());
                        async move { answer(req, &seen, &rng).await }
                    });
                    // An error from the service closes the connection without an answer.
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Ok(Upstream { addr, seen, stop })
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn answer(
    req: Request<Incoming>,
    seen: &Seen,
    rng: &Mutex<StdRng>,
) -> Result<Response<Full<Bytes>>, Dropped> {
    seen.calls.fetch_add(1, Ordering::Relaxed);
    let behaviour = roll(&mut rng.lock());
    let key = req
        .headers()
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    // Read the body, as a real server would, before deciding.
    let _ = req.into_body().collect().await;
    let (status, retry_after) = match behaviour {
        Behaviour::Ok => (StatusCode::OK, false),
        Behaviour::Unavailable => (StatusCode::SERVICE_UNAVAILABLE, false),
        Behaviour::TooMany => (StatusCode::TOO_MANY_REQUESTS, true),
        Behaviour::Reset => return Err(Dropped),
        Behaviour::Slow(ms) => {
            tokio::time::sleep(Duration::from_millis(ms)).await;
            (StatusCode::OK, false)
        }
    };
    if retry_after && key.as_deref().is_some_and(|k| k.starts_with("demo-")) {
        seen.slow_downs.fetch_add(1, Ordering::Relaxed);
    }
    if status.is_success() {
        if let Some(k) = key {
            *seen.accepted_keys.lock().entry(k).or_default() += 1;
        }
    }
    let mut rsp = Response::new(Full::new(Bytes::from_static(b"{}")));
    *rsp.status_mut() = status;
    if retry_after {
        rsp.headers_mut().insert(
            http::header::RETRY_AFTER,
            http::HeaderValue::from_static("1"),
        );
    }
    Ok(rsp)
}

// === outcomes of calls the demo makes ===

/// How one call ended, as the caller saw it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum CallOutcome {
    /// A status, with spillway's own error code when spillway answered.
    Status(u16, Option<String>),
    Failed(&'static str),
}

impl CallOutcome {
    fn ok(&self) -> bool {
        matches!(self, CallOutcome::Status(s, _) if (200..300).contains(s))
    }
    fn label(&self) -> String {
        match self {
            CallOutcome::Status(s, None) => s.to_string(),
            CallOutcome::Status(s, Some(code)) => format!("{s} {code}"),
            CallOutcome::Failed(what) => (*what).to_owned(),
        }
    }
}

/// One call, bounded by [`CALL_TIMEOUT`] plus what spillway itself may need for retries.
async fn call(
    client: &HttpClient,
    req: Request<Bytes>,
    limit: Duration,
) -> (CallOutcome, Option<Response<()>>) {
    match tokio::time::timeout(limit, client.send(req)).await {
        Err(_) => (CallOutcome::Failed("timeout"), None),
        Ok(Err(e)) => (
            CallOutcome::Failed(match e.class {
                FailureClass::ConnectFailure => "connect failure",
                FailureClass::Timeout => "timeout",
                FailureClass::Reset => "connection dropped",
            }),
            None,
        ),
        Ok(Ok(rsp)) => {
            let (parts, body) = rsp.into_parts();
            let _ = tokio::time::timeout(limit, body.collect()).await;
            let code = parts
                .headers
                .get("spillway-error")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            (
                CallOutcome::Status(parts.status.as_u16(), code),
                Some(Response::from_parts(parts, ())),
            )
        }
    }
}

/// Told of each answer: the call's number, its outcome and the response head.
type OnAnswer = Arc<dyn Fn(usize, CallOutcome, Option<Response<()>>) + Send + Sync>;

/// Runs `n` calls made by `make`, at most `concurrency` at once; calls `done` per answer.
async fn burst<F>(
    n: usize,
    concurrency: usize,
    make: F,
    done: OnAnswer,
    client: HttpClient,
    limit: Duration,
) where
    F: Fn(usize) -> Option<Request<Bytes>>,
{
    let slots = Arc::new(Semaphore::new(concurrency.max(1)));
    let mut set = JoinSet::new();
    for i in 0..n {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            break;
        };
        let Some(req) = make(i) else { continue };
        let (client, done) = (client.clone(), done.clone());
        set.spawn(async move {
            let (seen, rsp) = call(&client, req, limit).await;
            done(i, seen, rsp);
            drop(permit);
        });
    }
    while set.join_next().await.is_some() {}
}

fn tally(outcomes: &[CallOutcome]) -> (usize, BTreeMap<String, usize>) {
    let mut failed = BTreeMap::new();
    let mut ok = 0;
    for o in outcomes {
        if o.ok() {
            ok += 1;
        } else {
            *failed.entry(o.label()).or_default() += 1;
        }
    }
    (ok, failed)
}

fn breakdown(m: &BTreeMap<String, usize>) -> String {
    m.iter()
        .map(|(k, v)| format!("{k}: {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

// === the demo ===

#[derive(Debug, thiserror::Error)]
enum DemoError {
    #[error("cannot start the demo upstream: {0}")]
    Upstream(std::io::Error),
    #[error("cannot create a temporary directory: {0}")]
    TempDir(std::io::Error),
    #[error("the demo config is invalid (a bug): {0}")]
    Config(crate::config::ConfigErrors),
    #[error("cannot start spillway: {0}")]
    App(#[from] crate::app::AppError),
    #[error("cannot set up the HTTP client: {0}")]
    Client(#[from] rustls::Error),
    #[error("spillway opened no job store (a bug)")]
    NoStore,
}

/// The demo's `storage:` value: a redb file in `data`, or a JetStream stream of its own.
fn storage_text(data: &Path, nats: Option<(&str, &str)>) -> String {
    match nats {
        None => format!("{{ path: '{}' }}", data.join("demo.redb").display()),
        Some((url, stream)) => format!("{{ backend: nats, url: '{url}', stream: {stream} }}"),
    }
}

fn config_text(upstream: SocketAddr, storage: &str, concurrency: usize) -> String {
    format!(
        "listen: 127.0.0.1:0
admin: {{ listen: 127.0.0.1:0 }}
storage: {storage}
shutdown_grace: 2s
routes:
  - name: {DEFERRED}
    match: {{ path_prefix: /webhooks }}
    upstream: http://{upstream}
    deferrable: true
    timeout: 1s
    concurrency: {concurrency}
    retry:
      max_attempts: 15
      max_age: 5m
      backoff: {{ initial: 50ms, max: 1s, multiplier: 2.0, jitter: full }}
      honor_retry_after: true
  - name: quotes
    match: {{ path_prefix: /quotes }}
    upstream: http://{upstream}
    timeout: 1s
    retry:
      max_attempts: 3
      backoff: {{ initial: 50ms, max: 200ms }}
    circuit_breaker: {{ consecutive_failures: 5, open_for: 1s }}
",
        concurrency = concurrency.clamp(1, 64),
    )
}

/// What the client side of the deferred burst saw.
#[derive(Default)]
struct Accepts {
    /// Job id and idempotency key of every 202.
    jobs: Vec<(JobId, String)>,
    refused: Vec<CallOutcome>,
}

/// Returns whether nothing was lost.
async fn demo(opts: Options) -> Result<bool, DemoError> {
    let started = Instant::now();
    let deadline = started + opts.timeout;
    let seed = opts.seed.unwrap_or_else(rand::random);
    let n = opts.requests;
    let passthrough_n = (n / 4).max(1);
    let out = Printer;

    let upstream = Upstream::start(seed).await.map_err(DemoError::Upstream)?;
    let client = HttpClient::new()?;
    out.line(&format!(
        "spillway demo: a flaky upstream on {} (seed {seed}): ~30% 503, ~8% slow, ~5% dropped connections, ~2% 429 + Retry-After",
        upstream.addr
    ));

    // 1. What the app would see without spillway.
    out.line(&format!(
        "1/2 {n} calls straight to the upstream, {} at a time ...",
        opts.concurrency
    ));
    let direct: Arc<Mutex<Vec<CallOutcome>>> = Arc::default();
    let d = direct.clone();
    let up = upstream.addr;
    let calls = burst(
        n,
        opts.concurrency,
        // Keys of their own, so the audit below only counts what spillway delivered.
        |i| {
            post(
                &format!("http://{up}/webhooks/events"),
                &format!("direct-{seed}-{i}"),
                i,
            )
        },
        Arc::new(move |_, seen, _| d.lock().push(seen)),
        client.clone(),
        CALL_TIMEOUT,
    );
    if tokio::time::timeout_at(deadline, calls).await.is_err() {
        out.line(&format!(
            "--timeout of {:?} ran out; stopping",
            opts.timeout
        ));
        return Ok(false);
    }
    let (_, direct_failed) = tally(&direct.lock());
    let direct_failures: usize = direct_failed.values().sum();
    out.line(&format!(
        "    {direct_failures} of {n} failed ({}); the app would have to retry each one itself",
        breakdown(&direct_failed)
    ));

    // 2. The same burst through spillway.
    let dir = tempfile::tempdir().map_err(DemoError::TempDir)?;
    let stream = format!("SPILLWAY_DEMO_{seed}");
    let nats = opts.nats.as_deref().map(|url| (url, stream.as_str()));
    let text = config_text(
        upstream.addr,
        &storage_text(dir.path(), nats),
        opts.concurrency,
    );
    let config =
        crate::config::from_str(&text, &dir.path().join("demo.yaml")).map_err(DemoError::Config)?;
    let app = App::build(config).await?;
    let store = app.runtime().store().cloned().ok_or(DemoError::NoStore)?;
    let proxy = app.proxy_addr;
    out.line(&format!(
        "2/2 spillway on {proxy}: {n} calls to the deferrable route `{DEFERRED}`, {passthrough_n} to the passthrough route `quotes` ..."
    ));

    let phase2 = Instant::now();
    let accepts: Arc<Mutex<Accepts>> = Arc::default();
    let passthrough: Arc<Mutex<Vec<CallOutcome>>> = Arc::default();
    let sent = Arc::new(AtomicU64::new(0));
    let traffic = {
        let (accepts, passthrough, sent) = (accepts.clone(), passthrough.clone(), sent.clone());
        let client = client.clone();
        let concurrency = opts.concurrency;
        tokio::spawn(async move {
            let a = accepts.clone();
            let s = sent.clone();
            let deferred = burst(
                n,
                concurrency,
                move |i| {
                    post(
                        &format!("http://{proxy}/webhooks/events"),
                        &format!("demo-{seed}-{i}"),
                        i,
                    )
                },
                Arc::new(move |_, seen, rsp| {
                    s.fetch_add(1, Ordering::Relaxed);
                    let job = rsp
                        .as_ref()
                        .filter(|_| seen == CallOutcome::Status(202, None))
                        .and_then(|r| {
                            let id = r
                                .headers()
                                .get("spillway-job-id")?
                                .to_str()
                                .ok()?
                                .parse()
                                .ok()?;
                            let key = r.headers().get("spillway-idempotency-key")?.to_str().ok()?;
                            Some((id, key.to_owned()))
                        });
                    let mut a = a.lock();
                    match job {
                        Some(j) => a.jobs.push(j),
                        None => a.refused.push(seen),
                    }
                }),
                client.clone(),
                // Accepting waits for the disk, not for the upstream.
                Duration::from_secs(10),
            );
            let p = passthrough.clone();
            let quotes = burst(
                passthrough_n,
                (concurrency / 4).max(1),
                move |i| {
                    Request::get(format!("http://{proxy}/quotes/{i}"))
                        .body(Bytes::new())
                        .ok()
                },
                Arc::new(move |_, seen, _| p.lock().push(seen)),
                client,
                // Three attempts of 1 s with backoff between them.
                Duration::from_secs(5),
            );
            tokio::join!(deferred, quotes);
        })
    };

    // The live view, until every accepted job is delivered or dead, or the time is up.
    let mut last_plain = None::<Instant>;
    let mut drawn = 0;
    let mut traffic = Some(traffic);
    // Ctrl-C ends the demo like --timeout does, so the summary still prints and the
    // temporary store is removed.
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    loop {
        let traffic_done = traffic.as_ref().is_none_or(|t| t.is_finished());
        if traffic_done {
            if let Some(t) = traffic.take() {
                let _ = t.await;
            }
        }
        let mut stats = store.stats(DEFERRED).await.ok();
        // A backend that drops delivered jobs (nats) keeps no count of them: the
        // upstream's 2xx answers to the deferred keys are the count.
        if let Some(s) = stats.as_mut() {
            s.delivered_kept = s.delivered_kept.max(upstream.seen.deferred_answered());
        }
        let accepted = accepts.lock().jobs.len() as u64;
        let view = View {
            n: n as u64,
            sent: sent.load(Ordering::Relaxed),
            accepted,
            stats: stats.clone().unwrap_or_default(),
            passthrough_done: passthrough.lock().len() as u64,
            passthrough_n: passthrough_n as u64,
            elapsed: phase2.elapsed(),
        };
        if opts.tty {
            drawn = view.draw(drawn);
        } else if last_plain.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
            out.line(&view.plain());
            last_plain = Some(Instant::now());
        }
        let settled = stats.as_ref().is_some_and(|s| {
            s.queued + s.in_flight + s.retrying == 0 && s.delivered_kept + s.dead >= accepted
        });
        if traffic_done && settled {
            break;
        }
        if Instant::now() >= deadline {
            out.line(&format!(
                "--timeout of {:?} ran out; stopping",
                opts.timeout
            ));
            if let Some(t) = traffic.take() {
                t.abort();
            }
            break;
        }
        let tick = Duration::from_millis(if opts.tty { 200 } else { 250 });
        tokio::select! {
            _ = tokio::time::sleep(tick) => {}
            _ = &mut interrupted => {
                out.line("interrupted; stopping");
                if let Some(t) = traffic.take() {
                    t.abort();
                }
                break;
            }
        }
    }
    if !opts.tty {
        let mut s = store.stats(DEFERRED).await.unwrap_or_default();
        s.delivered_kept = s.delivered_kept.max(upstream.seen.deferred_answered());
        out.line(
            &View {
                n: n as u64,
                sent: sent.load(Ordering::Relaxed),
                accepted: accepts.lock().jobs.len() as u64,
                stats: s,
                passthrough_done: passthrough.lock().len() as u64,
                passthrough_n: passthrough_n as u64,
                elapsed: phase2.elapsed(),
            }
            .plain(),
        );
    }

    // Check every accepted job against the store and the upstream.
    let jobs = std::mem::take(&mut accepts.lock().jobs);
    let refused = std::mem::take(&mut accepts.lock().refused);
    let report = audit(&*store, &jobs, &upstream.seen).await;
    app.shutdown().await;
    drop(store);
    if let Some((url, stream)) = nats {
        remove_demo_streams(url, stream).await;
    }

    let (pass_ok, pass_failed) = tally(&passthrough.lock());
    let pass_total = passthrough.lock().len();
    let repeats: u32 = upstream
        .seen
        .accepted_keys
        .lock()
        .values()
        .map(|c| c.saturating_sub(1))
        .sum();
    let mut s = String::new();
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "Summary (seed {seed}, {:.1}s; run again with --seed {seed} for the same dice)",
        started.elapsed().as_secs_f64()
    );
    let _ = writeln!(
        s,
        "  without spillway: {direct_failures} of {n} direct calls failed ({})",
        breakdown(&direct_failed)
    );
    let _ = writeln!(s, "  with spillway, deferrable route `{DEFERRED}`:");
    let durable = if nats.is_some() {
        "stored in the JetStream stream"
    } else {
        "on disk"
    };
    let _ = writeln!(
        s,
        "    accepted: {} (each 202 sent only once the job was {durable})",
        jobs.len()
    );
    if !refused.is_empty() {
        let (_, r) = tally(&refused);
        let _ = writeln!(
            s,
            "    refused: {} ({}), answered at once so the app knew",
            refused.len(),
            breakdown(&r)
        );
    }
    let _ = writeln!(
        s,
        "    delivered: {} (the upstream answered 2xx)",
        report.delivered
    );
    let _ = writeln!(
        s,
        "    dead: {} (gave up after max_attempts; kept for inspection and replay)",
        report.dead
    );
    if report.unfinished > 0 {
        let _ = writeln!(
            s,
            "    unfinished: {} (stored and still retrying when the demo was stopped)",
            report.unfinished
        );
    }
    let _ = writeln!(s, "    lost: {}", report.lost);
    if report.counted > 0 {
        let _ = writeln!(
            s,
            "    attempts per job: avg {:.2}, max {} ({} jobs needed more than one)",
            report.avg_attempts(),
            report.max_attempts,
            report.retried
        );
    } else {
        // nats: delivered jobs leave the stream, and their attempt counts with them.
        let _ = writeln!(
            s,
            "    upstream answers 2xx sent twice for one key: {}",
            upstream
                .seen
                .accepted_keys
                .lock()
                .values()
                .filter(|c| **c > 1)
                .count()
        );
    }
    let slow_downs = upstream.seen.slow_downs.load(Ordering::Relaxed);
    if slow_downs > 0 {
        let _ = writeln!(
            s,
            "    the upstream said 429 + Retry-After {slow_downs} time(s) to deliveries; each time the whole route paused for as long as asked"
        );
    }
    if repeats > 0 {
        let _ = writeln!(
            s,
            "    the upstream saw {repeats} repeat(s) of a key it had already accepted (an answer that came too late); the idempotency key makes that safe"
        );
    }
    let _ = writeln!(
        s,
        "  passthrough route `quotes` (the caller waits; spillway retries what is safe to retry):"
    );
    let _ = writeln!(
        s,
        "    {pass_ok} of {pass_total} answered 2xx; the rest: {}",
        if pass_failed.is_empty() {
            "none".to_owned()
        } else {
            breakdown(&pass_failed)
        }
    );
    let _ = writeln!(
        s,
        "  the upstream was called {} times in all",
        upstream.seen.calls.load(Ordering::Relaxed)
    );
    out.block(&s);
    Ok(report.lost == 0 && report.unfinished == 0)
}

fn post(uri: &str, key: &str, i: usize) -> Option<Request<Bytes>> {
    Request::post(uri)
        .header("content-type", "application/json")
        .header("idempotency-key", key)
        .body(Bytes::from(format!(r#"{{"event":"order.paid","n":{i}}}"#)))
        .ok()
}

/// The fate of every accepted job, each looked up by id.
#[derive(Default)]
struct Audit {
    delivered: u64,
    dead: u64,
    unfinished: u64,
    /// Accepted, then neither delivered (with the upstream's 2xx for its key) nor dead
    /// nor still stored.
    lost: u64,
    /// Jobs whose attempts are known (still stored), and their attempts.
    counted: u64,
    attempts: u64,
    max_attempts: u32,
    retried: u64,
}

impl Audit {
    fn avg_attempts(&self) -> f64 {
        if self.counted == 0 {
            0.0
        } else {
            self.attempts as f64 / self.counted as f64
        }
    }
}

async fn audit(store: &dyn JobStore, jobs: &[(JobId, String)], seen: &Seen) -> Audit {
    let upstream_ok: HashSet<String> = seen.accepted_keys.lock().keys().cloned().collect();
    let mut a = Audit::default();
    for (id, key) in jobs {
        let job = match store.get(*id).await {
            Ok(Some(j)) => j,
            // A backend that drops jobs once delivered (nats): the upstream's 2xx for the
            // job's key is the proof; its attempts are not known any more.
            Ok(None) if upstream_ok.contains(key) => {
                a.delivered += 1;
                continue;
            }
            // Unreadable or missing: it cannot be shown to be safe, so it counts as lost.
            Ok(None) | Err(_) => {
                a.lost += 1;
                continue;
            }
        };
        match job.state {
            JobState::Delivered if upstream_ok.contains(key) => a.delivered += 1,
            JobState::Delivered => a.lost += 1,
            JobState::Dead => a.dead += 1,
            JobState::Queued | JobState::InFlight | JobState::Retrying => {
                a.unfinished += 1;
                continue;
            }
        }
        a.counted += 1;
        a.attempts += u64::from(job.attempts);
        a.max_attempts = a.max_attempts.max(job.attempts);
        if job.attempts > 1 {
            a.retried += 1;
        }
    }
    a
}

/// Removes the streams the demo's JetStream store made; a failure only leaves them behind.
#[cfg(feature = "nats")]
async fn remove_demo_streams(url: &str, stream: &str) {
    crate::queue::NatsStore::remove_streams(url, stream).await;
}

#[cfg(not(feature = "nats"))]
async fn remove_demo_streams(_url: &str, _stream: &str) {}

// === drawing ===

struct Printer;

impl Printer {
    fn line(&self, text: &str) {
        let mut o = std::io::stdout().lock();
        let _ = writeln!(o, "{text}");
        let _ = o.flush();
    }
    fn block(&self, text: &str) {
        let mut o = std::io::stdout().lock();
        let _ = write!(o, "{text}");
        let _ = o.flush();
    }
}

struct View {
    n: u64,
    sent: u64,
    accepted: u64,
    stats: crate::queue::RouteStats,
    passthrough_done: u64,
    passthrough_n: u64,
    elapsed: Duration,
}

fn bar(value: u64, total: u64) -> String {
    let total = total.max(1);
    let filled = ((value.min(total) as f64 / total as f64) * BAR as f64).round() as usize;
    format!("{}{}", "█".repeat(filled), "░".repeat(BAR - filled))
}

impl View {
    fn rows(&self) -> Vec<String> {
        let s = &self.stats;
        let row = |name: &str, v: u64, total: u64, note: &str| {
            format!("  {name:<10} {} {v:>6}  {note}", bar(v, total))
        };
        vec![
            row("sent", self.sent, self.n, &format!("of {}", self.n)),
            row("accepted", self.accepted, self.n, "202, on disk"),
            row("queued", s.queued, self.n, "waiting for a slot"),
            row("in flight", s.in_flight, self.n, "an attempt is out"),
            row("retrying", s.retrying, self.n, "failed, backing off"),
            row(
                "delivered",
                s.delivered_kept,
                self.n,
                "the upstream said 2xx",
            ),
            row("dead", s.dead, self.n, "gave up"),
            row(
                "passthru",
                self.passthrough_done,
                self.passthrough_n,
                &format!("of {} calls answered", self.passthrough_n),
            ),
            format!("  {:.1}s", self.elapsed.as_secs_f64()),
        ]
    }

    /// Redraws in place: up over the rows drawn last time, then each row cleared and
    /// written. Returns how many rows are on screen.
    fn draw(&self, previous: usize) -> usize {
        let rows = self.rows();
        let mut frame = String::new();
        if previous > 0 {
            let _ = write!(frame, "\x1b[{previous}F");
        }
        for r in &rows {
            let _ = writeln!(frame, "\x1b[2K{r}");
        }
        let mut o = std::io::stdout().lock();
        let _ = o.write_all(frame.as_bytes());
        let _ = o.flush();
        rows.len()
    }

    fn plain(&self) -> String {
        let s = &self.stats;
        format!(
            "[{:>5.1}s] sent {}/{} accepted {} queued {} in_flight {} retrying {} delivered {} dead {} | passthrough {}/{}",
            self.elapsed.as_secs_f64(),
            self.sent,
            self.n,
            self.accepted,
            s.queued,
            s.in_flight,
            s.retrying,
            s.delivered_kept,
            s.dead,
            self.passthrough_done,
            self.passthrough_n
        )
    }
}

/// Whether stdout is a terminal, for the default of `--no-tty`.
pub fn stdout_is_terminal() -> bool {
    std::io::stdout().is_terminal()
}

/// Logs stay out of the live view unless asked for with `SPILLWAY_LOG`.
pub fn init_logs() {
    let filter = std::env::var("SPILLWAY_LOG").unwrap_or_else(|_| "error".into());
    let filter = tracing_subscriber::EnvFilter::try_new(&filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dice_follow_the_seed_and_the_advertised_mix() {
        let draw = |seed| {
            let mut rng = StdRng::seed_from_u64(seed);
            (0..10_000).map(|_| roll(&mut rng)).collect::<Vec<_>>()
        };
        assert_eq!(draw(7), draw(7));
        assert_ne!(draw(7), draw(8));
        let all = draw(7);
        let share = |f: fn(&Behaviour) -> bool| all.iter().filter(|b| f(b)).count() as f64 / 1e4;
        assert!((share(|b| *b == Behaviour::Unavailable) - 0.30).abs() < 0.02);
        assert!((share(|b| matches!(b, Behaviour::Slow(_))) - 0.08).abs() < 0.02);
        assert!((share(|b| *b == Behaviour::Reset) - 0.05).abs() < 0.02);
        assert!((share(|b| *b == Behaviour::TooMany) - 0.02).abs() < 0.01);
    }

    #[test]
    fn bars_are_fixed_width_and_clamped() {
        assert_eq!(bar(0, 10).chars().count(), BAR);
        assert_eq!(bar(5, 10).chars().filter(|c| *c == '█').count(), BAR / 2);
        assert_eq!(bar(50, 10).chars().filter(|c| *c == '█').count(), BAR);
        assert_eq!(bar(3, 0).chars().count(), BAR);
    }

    #[test]
    fn the_demo_config_is_valid() {
        let text = config_text(
            "127.0.0.1:9".parse().unwrap(),
            &storage_text(Path::new("/tmp/x"), None),
            16,
        );
        let c = crate::config::from_str(&text, Path::new("demo.yaml")).unwrap();
        assert!(c.route(DEFERRED).is_some_and(|r| r.deferrable));
        assert!(c.route("quotes").is_some_and(|r| !r.deferrable));
    }
}
