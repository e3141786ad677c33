//! Delivery: one dispatcher per deferrable route leases due jobs, sends each with the
//! same idempotency key under the route's rate limit and concurrency, and records the
//! verdict. The loop sleeps until the next due job, a wake-up or shutdown.

pub mod classify;

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use governor::{Quota, RateLimiter};
use http::{HeaderName, HeaderValue, Request};
use http_body_util::BodyExt;
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::client::HttpClient;
use crate::config::RouteConfig;
use crate::metrics::{AttemptOutcome, Limit, Metrics, Mode, UpstreamOutcome};
use crate::proxy::defer::now_ms;
use crate::queue::{Job, JobStore, LastOutcome, StoreError, BODY_PREFIX_MAX};
use classify::{classify, Outcome, Verdict};

/// How long the loop waits before looking again after a storage error.
const STORE_RETRY: Duration = Duration::from_secs(1);
/// How often an attempt's outcome is retried when storage refuses it (about 10 minutes).
const RECORD_TRIES: u32 = 600;
/// The longest the loop sleeps without looking (paused routes, clock jumps).
const MAX_IDLE: Duration = Duration::from_secs(5);

/// What the loop does after a look at the queue.
enum Next {
    Again,
    Wait(Duration),
    /// The route is paused: new jobs do not matter until a resume.
    Paused,
}

/// What wakes a dispatcher before its timer.
pub struct Wakes {
    /// New jobs, and finished attempts.
    pub jobs: Arc<Notify>,
    /// An operator's resume, retry or replay: also heard while the route is paused.
    pub control: Arc<Notify>,
}

pub struct Dispatcher {
    store: Arc<dyn JobStore>,
    route: Arc<RouteConfig>,
    client: HttpClient,
    /// [`Wakes::jobs`] and [`Wakes::control`].
    wake: Arc<Notify>,
    control: Arc<Notify>,
    stop: CancellationToken,
    limiter: Option<Arc<governor::DefaultDirectRateLimiter>>,
    slots: Arc<Semaphore>,
    tasks: TaskTracker,
    metrics: Arc<Metrics>,
}

impl Dispatcher {
    pub fn new(
        store: Arc<dyn JobStore>,
        route: Arc<RouteConfig>,
        client: HttpClient,
        wakes: Wakes,
        stop: CancellationToken,
        tasks: TaskTracker,
        metrics: Arc<Metrics>,
    ) -> Self {
        let limiter = route.rate_limit.map(|r| {
            Arc::new(RateLimiter::direct(
                Quota::per_second(r.per_second).allow_burst(r.burst),
            ))
        });
        let slots = Arc::new(Semaphore::new(route.concurrency.get() as usize));
        Dispatcher {
            store,
            route,
            client,
            wake: wakes.jobs,
            control: wakes.control,
            stop,
            limiter,
            slots,
            tasks,
            metrics,
        }
    }

    pub async fn run(self) {
        let name = self.route.name.clone();
        tracing::info!(route = %name, "dispatcher started");
        while !self.stop.is_cancelled() {
            let next = match self.deliver_due().await {
                Ok(next) => next,
                Err(e) => {
                    tracing::warn!(route = %name, error = %e, "delivery paused by a storage error");
                    Next::Wait(STORE_RETRY)
                }
            };
            match next {
                Next::Again => {}
                Next::Wait(wait) => tokio::select! {
                    _ = tokio::time::sleep(wait.min(MAX_IDLE)) => {}
                    _ = self.wake.notified() => {}
                    _ = self.control.notified() => {}
                    _ = self.stop.cancelled() => {}
                },
                // Each accept wakes `wake`; a paused route would otherwise read its
                // control record once per commit for nothing. The timer still looks now
                // and then, for a pause lifted without a wake-up.
                Next::Paused => tokio::select! {
                    _ = tokio::time::sleep(MAX_IDLE) => {}
                    _ = self.control.notified() => {}
                    _ = self.stop.cancelled() => {}
                },
            }
        }
        tracing::info!(route = %name, "dispatcher stopped");
    }

    /// Starts what is due; says when to look again.
    async fn deliver_due(&self) -> Result<Next, crate::queue::StoreError> {
        let now = now_ms();
        let (paused, until) = self.store.route_control(&self.route.name).await?;
        if paused {
            return Ok(Next::Paused);
        }
        if let Some(until) = until.filter(|u| *u > now) {
            return Ok(Next::Wait(Duration::from_millis(until - now)));
        }
        match self.store.next_due(&self.route.name).await? {
            None => return Ok(Next::Wait(MAX_IDLE)),
            Some(due) if due > now => return Ok(Next::Wait(Duration::from_millis(due - now))),
            Some(_) => {}
        }
        // Wait for a free slot rather than leasing work we cannot start.
        let first = tokio::select! {
            p = self.slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return Ok(Next::Again) },
            _ = self.stop.cancelled() => return Ok(Next::Again),
        };
        let mut want = 1 + self.slots.available_permits();
        if let Some(wait) = self.take_quota(&mut want, now).await? {
            return Ok(Next::Wait(wait));
        }
        let jobs = self.store.lease_due(&self.route.name, now, want).await?;
        if jobs.is_empty() {
            return Ok(Next::Wait(Duration::from_millis(50)));
        }
        let mut first = Some(first);
        for job in jobs {
            let permit = match first.take() {
                Some(p) => p,
                None => match self.slots.clone().acquire_owned().await {
                    Ok(p) => p,
                    Err(_) => break,
                },
            };
            let attempt = Attempt {
                store: self.store.clone(),
                route: self.route.clone(),
                client: self.client.clone(),
                limiter: self.limiter.clone(),
                wake: self.wake.clone(),
                metrics: self.metrics.clone(),
            };
            let span = tracing::info_span!(
                "dispatch.attempt",
                otel.kind = "client",
                route = %self.route.name,
                job_id = %job.id,
                attempt = i64::from(job.attempts),
                status = tracing::field::Empty,
                outcome = tracing::field::Empty,
                otel.status_code = tracing::field::Empty,
            );
            // Each attempt is a child of the request that created the job.
            if let Some(tp) = &job.traceparent {
                crate::telemetry::continue_from_traceparent(&span, tp);
            }
            self.tasks.spawn(
                async move {
                    attempt.run(job).await;
                    drop(permit);
                }
                .instrument(span),
            );
        }
        Ok(Next::Again)
    }

    /// Takes one unit of every quota, and limits the lease to that one job: a unit is
    /// only spent when a job is about to go out. A spent quota returns how long until its
    /// window opens. Counts live in storage, so a restart does not reset them.
    async fn take_quota(
        &self,
        want: &mut usize,
        now: u64,
    ) -> Result<Option<Duration>, crate::queue::StoreError> {
        if self.route.quotas.is_empty() {
            return Ok(None);
        }
        for (i, q) in self.route.quotas.iter().enumerate() {
            let per = u64::try_from(q.per.as_millis()).unwrap_or(u64::MAX);
            if let Some(at) = self
                .store
                .quota_acquire(&self.route.name, i, per, q.limit.get(), now)
                .await?
            {
                tracing::info!(route = %self.route.name, quota = i, "quota spent; waiting for its window");
                self.metrics
                    .rate_limited(&self.route.name, Mode::Deferred, Limit::Quota);
                return Ok(Some(Duration::from_millis(at.saturating_sub(now).max(1))));
            }
        }
        *want = 1;
        Ok(None)
    }
}

/// One delivery attempt of one leased job.
struct Attempt {
    store: Arc<dyn JobStore>,
    route: Arc<RouteConfig>,
    client: HttpClient,
    limiter: Option<Arc<governor::DefaultDirectRateLimiter>>,
    wake: Arc<Notify>,
    metrics: Arc<Metrics>,
}

impl Attempt {
    async fn run(self, job: Job) {
        let route = &self.route;
        let policy = &route.retry;
        let now = now_ms();
        let age = Duration::from_millis(now.saturating_sub(job.created_at_ms));
        // The attempt was counted when leased: more than allowed means earlier attempts
        // died with the process, so this job may be what kills it.
        let verdict = if job.attempts > policy.max_attempts.get() {
            Verdict::Dead {
                reason: "crash_loop".into(),
            }
        } else if policy.max_age.is_some_and(|m| age > m) {
            Verdict::Dead {
                reason: classify::MAX_AGE.into(),
            }
        } else {
            return self.send(job).await;
        };
        self.record(&job, verdict, None, None).await;
    }

    async fn send(self, job: Job) {
        if let Some(l) = &self.limiter {
            // `check` takes a cell when one is free; only a refused check waits.
            if l.check().is_err() {
                self.metrics
                    .rate_limited(&self.route.name, Mode::Deferred, Limit::RateLimit);
                l.until_ready().await;
            }
        }
        let id = job.id;
        let attempts = job.attempts;
        let age = Duration::from_millis(now_ms().saturating_sub(job.created_at_ms));
        let mut req = match self.build(&job) {
            Ok(r) => r,
            Err(e) => {
                let v = Verdict::Dead {
                    reason: format!("unsendable: {e}"),
                };
                return self.record(&job, v, None, None).await;
            }
        };
        // The upstream sees this attempt as its parent (replacing the stored traceparent).
        crate::telemetry::inject(&tracing::Span::current(), req.headers_mut());
        let timeout = self.route.timeout;
        let started = tokio::time::Instant::now();
        let result = tokio::time::timeout(timeout, self.client.send(req)).await;
        let (outcome, last) = match result {
            Err(_) => (
                Outcome::Failed(crate::config::FailureClass::Timeout),
                LastOutcome {
                    error: Some(format!("no answer within {timeout:?}")),
                    at_ms: now_ms(),
                    ..LastOutcome::default()
                },
            ),
            Ok(Err(e)) => (
                Outcome::Failed(e.class),
                LastOutcome {
                    error: Some(e.message),
                    at_ms: now_ms(),
                    ..LastOutcome::default()
                },
            ),
            Ok(Ok(rsp)) => {
                let (parts, body) = rsp.into_parts();
                let status = parts.status.as_u16();
                let observed = UpstreamOutcome::Status(status);
                self.metrics.upstream(
                    &self.route.name,
                    Mode::Deferred,
                    observed,
                    started.elapsed(),
                );
                tracing::Span::current().record("status", i64::from(status));
                // The whole answer, body included, within the attempt's timeout: a status
                // followed by a body that stalls or breaks off is no answer (the upstream may
                // not have finished), so it is retried like a timeout or reset, under the
                // same idempotency key.
                let deadline = started + timeout;
                let prefix = match read_body(body, deadline).await {
                    Ok(prefix) => prefix,
                    Err(class) => {
                        let error = match class {
                            crate::config::FailureClass::Timeout => format!(
                                "status {status}, but the body did not arrive within {timeout:?}"
                            ),
                            _ => format!("status {status}, but the connection broke mid-body"),
                        };
                        let last = LastOutcome {
                            status: Some(status),
                            error: Some(error),
                            at_ms: now_ms(),
                            ..LastOutcome::default()
                        };
                        let verdict = classify(
                            &Outcome::Failed(class),
                            &self.route.retry,
                            attempts,
                            age,
                            SystemTime::now(),
                        );
                        tracing::info!(route = %self.route.name, job_id = %id, attempt = attempts, status, error = last.error.as_deref().unwrap_or(""), "delivery attempt failed");
                        return self
                            .record(
                                &job,
                                verdict,
                                Some(last),
                                Some(UpstreamOutcome::Failed(class)),
                            )
                            .await;
                    }
                };
                let verdict = classify(
                    &Outcome::Response {
                        status,
                        headers: &parts.headers,
                    },
                    &self.route.retry,
                    attempts,
                    age,
                    SystemTime::now(),
                );
                let last = (verdict != Verdict::Delivered).then(|| LastOutcome {
                    status: Some(status),
                    headers: parts
                        .headers
                        .iter()
                        .map(|(k, v)| (k.as_str().to_owned(), v.as_bytes().to_vec()))
                        .collect(),
                    body_prefix: prefix,
                    error: None,
                    at_ms: now_ms(),
                });
                tracing::info!(route = %self.route.name, job_id = %id, attempt = attempts, status, elapsed_ms = started.elapsed().as_millis() as u64, "delivery attempt");
                return self.record(&job, verdict, last, Some(observed)).await;
            }
        };
        let observed = match outcome {
            Outcome::Failed(class) => UpstreamOutcome::Failed(class),
            Outcome::Response { status, .. } => UpstreamOutcome::Status(status),
        };
        self.metrics.upstream(
            &self.route.name,
            Mode::Deferred,
            observed,
            started.elapsed(),
        );
        let verdict = classify(
            &outcome,
            &self.route.retry,
            attempts,
            age,
            SystemTime::now(),
        );
        tracing::info!(route = %self.route.name, job_id = %id, attempt = attempts, error = last.error.as_deref().unwrap_or(""), "delivery attempt failed");
        self.record(&job, verdict, Some(last), Some(observed)).await;
    }

    fn build(&self, job: &Job) -> Result<Request<Bytes>, http::Error> {
        let mut b = Request::builder()
            .method(job.method.as_str())
            .uri(job.uri.as_str());
        let uri: http::Uri = job.uri.parse()?;
        if let Some(auth) = uri.authority() {
            b = b.header(http::header::HOST, auth.as_str());
        }
        for (k, v) in &job.headers {
            if let (Ok(k), Ok(v)) = (
                HeaderName::from_bytes(k.as_bytes()),
                HeaderValue::from_bytes(v),
            ) {
                b = b.header(k, v);
            }
        }
        // The same key on every attempt, byte for byte: the upstream's dedupe relies on it.
        b = b.header(&self.route.idempotency.header, job.idempotency_key.as_str());
        b.body(job.body.clone())
    }

    /// Stores the verdict; `observed` is what the upstream did, if the job was sent.
    async fn record(
        &self,
        job: &Job,
        verdict: Verdict,
        last: Option<LastOutcome>,
        observed: Option<UpstreamOutcome>,
    ) {
        let (id, attempts) = (job.id, job.attempts);
        let route = &self.route.name;
        self.observe(job, &verdict, observed);
        match &verdict {
            Verdict::Delivered => tracing::info!(%route, job_id = %id, attempts, "delivered"),
            Verdict::Retry {
                after,
                reason,
                pause_route,
            } => {
                if let Some(pause) = pause_route {
                    let until = now_ms() + u64::try_from(pause.as_millis()).unwrap_or(0);
                    tracing::info!(%route, ?pause, "upstream asked to back off; pausing the route");
                    if let Err(e) = self.store.pause_until(route, until).await {
                        tracing::warn!(%route, error = %e, "could not persist the route pause");
                    }
                }
                tracing::info!(%route, job_id = %id, attempts, %reason, ?after, "will retry");
            }
            Verdict::Dead { reason } => {
                tracing::warn!(%route, job_id = %id, attempts, %reason, "dead-lettered");
            }
        }
        // A job whose outcome is not recorded stays in_flight and is not delivered again
        // until a restart; so keep trying while storage is unavailable (disk full, reopening).
        let mut tries = 0u32;
        loop {
            let result = match &verdict {
                Verdict::Delivered => self.store.ack(id, now_ms()).await,
                Verdict::Retry { after, .. } => {
                    let next = now_ms() + u64::try_from(after.as_millis()).unwrap_or(u64::MAX / 2);
                    self.store
                        .reschedule(id, next, last.clone().unwrap_or_default())
                        .await
                }
                Verdict::Dead { reason } => {
                    self.store
                        .dead_letter(id, reason.clone(), last.clone())
                        .await
                }
            };
            match result {
                Ok(()) => break,
                Err(e)
                    if tries < RECORD_TRIES
                        && !matches!(e, StoreError::Closed | StoreError::NotFound) =>
                {
                    if tries == 0 {
                        tracing::warn!(%route, job_id = %id, error = %e, "could not record a delivery outcome; retrying");
                    }
                    tries += 1;
                    tokio::time::sleep(STORE_RETRY).await;
                }
                Err(e) => {
                    // The job stays in_flight in storage and is delivered again after a restart.
                    tracing::error!(%route, job_id = %id, error = %e, "could not record a delivery outcome");
                    break;
                }
            }
        }
        self.wake.notify_one();
    }

    /// Metrics and the attempt span's outcome, from the verdict and what was observed.
    fn observe(&self, job: &Job, verdict: &Verdict, observed: Option<UpstreamOutcome>) {
        let route = &self.route.name;
        let span = tracing::Span::current();
        let (outcome, reason) = match verdict {
            Verdict::Delivered => {
                let queued = Duration::from_millis(now_ms().saturating_sub(job.created_at_ms));
                self.metrics.delivered(route, queued);
                (AttemptOutcome::Delivered, "ok".to_owned())
            }
            Verdict::Retry { .. } => {
                let reason = observed.map_or_else(|| "unknown".to_owned(), |o| o.reason());
                (AttemptOutcome::Retry, reason)
            }
            Verdict::Dead { reason } => (
                AttemptOutcome::Dead,
                crate::metrics::dead_reason(observed, reason).to_owned(),
            ),
        };
        self.metrics.delivery_attempt(route, outcome, &reason);
        span.record("outcome", outcome.as_str());
        if outcome != AttemptOutcome::Delivered {
            span.record("otel.status_code", "ERROR");
        }
    }
}

/// Reads a response body to its end by `deadline` (so the pooled connection can be reused),
/// keeping the first [`BODY_PREFIX_MAX`] bytes for the job's record. A body that breaks off
/// is a `reset`, one that does not end in time a `timeout`.
async fn read_body(
    mut body: crate::proxy::Body,
    deadline: tokio::time::Instant,
) -> Result<Vec<u8>, crate::config::FailureClass> {
    use crate::config::FailureClass;
    let mut out = Vec::new();
    let read = async {
        loop {
            match body.frame().await {
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        let take = data.len().min(BODY_PREFIX_MAX - out.len());
                        out.extend_from_slice(&data[..take]);
                    }
                }
                Some(Err(_)) => return Err(FailureClass::Reset),
                None => return Ok(()),
            }
        }
    };
    match tokio::time::timeout_at(deadline, read).await {
        Ok(Ok(())) => Ok(out),
        Ok(Err(class)) => Err(class),
        Err(_) => Err(FailureClass::Timeout),
    }
}
