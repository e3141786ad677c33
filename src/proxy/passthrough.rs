//! The per-route passthrough stack: rate limit, circuit breaker, retries with a budget,
//! per-attempt timeout, then the pooled client. Each layer is a plain tower service
//! over `Request<Bytes>` (bodies are buffered before routing, so attempts can replay).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use governor::clock::{Clock, DefaultClock};
use governor::{Quota, RateLimiter};
use http::{Method, Request, Response};
use http_body_util::BodyExt;
use parking_lot::Mutex;
use tokio::time::Instant;
use tower::retry::budget::{Budget, TpsBudget};
use tower::util::{option_layer, BoxCloneSyncService};
use tower::{Layer, Service, ServiceExt};
use tracing::Instrument;

use super::rescue::ProxyError;
use super::stack::Stack;
use super::Body;
use crate::backoff;
use crate::client::HttpClient;
use crate::config::{BreakerConfig, RateLimit as RateLimitConfig, RouteConfig};
use crate::metrics::{Limit, Metrics, Mode, UpstreamOutcome};

type BoxFut<T> = Pin<Box<dyn Future<Output = Result<T, ProxyError>> + Send>>;

/// The erased per-route service.
pub type BoxHttp = BoxCloneSyncService<Request<Bytes>, Response<Body>, ProxyError>;

/// Attempts made for one request, shared by the retry and timeout layers and read by
/// the access log.
#[derive(Clone, Default, Debug)]
pub struct Attempts(pub Arc<AtomicU32>);

impl Attempts {
    pub fn get(&self) -> u32 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Where a passthrough route's layers report: the metrics and the route's label. Each
/// layer holds it from when the stack is built, so no request carries it.
#[derive(Clone)]
pub struct Observe {
    pub metrics: Arc<Metrics>,
    pub route: Arc<str>,
}

/// Builds a passthrough route's stack, innermost first. The route's breaker (if any)
/// is registered in `circuits` so the admin API and metrics can read its state.
pub fn mk_passthrough(
    route: &RouteConfig,
    client: HttpClient,
    circuits: &Circuits,
    metrics: &Arc<Metrics>,
) -> BoxHttp {
    let observe = Observe {
        metrics: metrics.clone(),
        route: Arc::from(route.name.as_str()),
    };
    let breaker = route
        .circuit_breaker
        .map(|c| BreakerLayer::new(observe.route.clone(), c));
    circuits.register(&route.name, breaker.as_ref().map(BreakerLayer::handle));
    let rate_limit = route
        .rate_limit
        .map(|r| RateLimitLayer::new(r, observe.clone()));
    Stack::new(Upstream { client })
        .push(TimeoutLayer::new(route.timeout, observe.clone())) // per attempt, so inside retry
        .push(RetryLayer::new(route, observe)) // replays the buffered body; skips unkeyed POSTs
        .push(option_layer(breaker)) // one outcome per request, after retries
        .push(option_layer(rate_limit)) // outermost: refuse before any work
        .check_service::<Request<Bytes>>()
        .boxed()
}

/// The stack of unmatched passthrough: no retries (the destination is unknown to us),
/// only a timeout.
pub fn mk_unmatched(timeout: Duration, client: HttpClient, metrics: &Arc<Metrics>) -> BoxHttp {
    let observe = Observe {
        metrics: metrics.clone(),
        route: Arc::from(crate::metrics::UNMATCHED),
    };
    BoxCloneSyncService::new(TimeoutLayer::new(timeout, observe).layer(Upstream { client }))
}

// === impl Upstream ===

/// The leaf: one request on the pooled client.
#[derive(Clone)]
pub struct Upstream {
    client: HttpClient,
}

impl Service<Request<Bytes>> for Upstream {
    type Response = Response<Body>;
    type Error = ProxyError;
    type Future = BoxFut<Response<Body>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Bytes>) -> Self::Future {
        let client = self.client.clone();
        Box::pin(async move {
            client
                .send(req)
                .await
                .map_err(|e| match (e.denied, e.class) {
                    (Some(denied), _) => ProxyError::DestinationDenied(denied.to_string()),
                    (None, crate::config::FailureClass::ConnectFailure) => {
                        ProxyError::UpstreamConnect(e.message)
                    }
                    (None, _) => ProxyError::UpstreamReset(e.message),
                })
        })
    }
}

// === impl Timeout ===

#[derive(Clone)]
pub struct TimeoutLayer {
    timeout: Duration,
    observe: Observe,
}

impl TimeoutLayer {
    pub fn new(timeout: Duration, observe: Observe) -> Self {
        TimeoutLayer { timeout, observe }
    }
}

impl<S> Layer<S> for TimeoutLayer {
    type Service = Timeout<S>;
    fn layer(&self, inner: S) -> Timeout<S> {
        Timeout {
            inner,
            timeout: self.timeout,
            observe: self.observe.clone(),
        }
    }
}

/// Bounds one attempt (until response headers) and counts it.
#[derive(Clone)]
pub struct Timeout<S> {
    inner: S,
    timeout: Duration,
    observe: Observe,
}

impl<S> Service<Request<Bytes>> for Timeout<S>
where
    S: Service<Request<Bytes>, Response = Response<Body>, Error = ProxyError> + Send,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = ProxyError;
    type Future = BoxFut<Response<Body>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<Bytes>) -> Self::Future {
        let attempt = req
            .extensions()
            .get::<Attempts>()
            .map_or(1, |a| a.0.fetch_add(1, Ordering::Relaxed) + 1);
        let observe = self.observe.clone();
        let span = tracing::info_span!(
            "proxy.attempt",
            otel.kind = "client",
            route = &*observe.route,
            attempt = i64::from(attempt),
            status = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        );
        // The upstream joins the trace as a child of this attempt.
        crate::telemetry::inject(&span, req.headers_mut());
        let timeout = self.timeout;
        let fut = self.inner.call(req);
        let started = Instant::now();
        let record = span.clone();
        Box::pin(
            async move {
                let result = match tokio::time::timeout(timeout, fut).await {
                    // The body streams to the client; a stall longer than the timeout ends it
                    // (hyper then aborts the client's connection, so a cut body is never taken
                    // for a whole one).
                    Ok(Ok(rsp)) => Ok(rsp.map(|b| IdleTimeoutBody::new(b, timeout).boxed_unsync())),
                    Ok(Err(e)) => Err(e),
                    Err(_) => Err(ProxyError::UpstreamTimeout(timeout)),
                };
                let outcome = match &result {
                    Ok(rsp) => Some(UpstreamOutcome::Status(rsp.status().as_u16())),
                    Err(e) => e.failure_class().map(UpstreamOutcome::Failed),
                };
                match &result {
                    Ok(rsp) => {
                        record.record("status", i64::from(rsp.status().as_u16()));
                        if rsp.status().is_server_error() {
                            record.record("otel.status_code", "ERROR");
                        }
                    }
                    Err(_) => {
                        record.record("otel.status_code", "ERROR");
                    }
                }
                if let Some(outcome) = outcome {
                    observe.metrics.upstream(
                        &observe.route,
                        Mode::Passthrough,
                        outcome,
                        started.elapsed(),
                    );
                }
                result
            }
            .instrument(span),
        )
    }
}

// === impl IdleTimeoutBody ===

/// A response body that fails when no frame arrives for `idle` after a poll found none
/// ready. The timer (and the clock) is used only then: most small bodies arrive whole
/// and never need one.
pub struct IdleTimeoutBody {
    inner: Body,
    idle: Duration,
    /// A frame came since the timer was last set, so the wait starts again.
    progressed: bool,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl IdleTimeoutBody {
    pub fn new(inner: Body, idle: Duration) -> Self {
        IdleTimeoutBody {
            inner,
            idle,
            progressed: true,
            sleep: None,
        }
    }
}

impl http_body::Body for IdleTimeoutBody {
    type Data = Bytes;
    type Error = tower::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, tower::BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                this.progressed = true;
                Poll::Ready(frame)
            }
            Poll::Pending => {
                let sleep = match &mut this.sleep {
                    Some(s) if !this.progressed => s,
                    Some(s) => {
                        s.as_mut().reset(Instant::now() + this.idle);
                        s
                    }
                    None => this.sleep.insert(Box::pin(tokio::time::sleep(this.idle))),
                };
                this.progressed = false;
                match sleep.as_mut().poll(cx) {
                    Poll::Ready(()) => Poll::Ready(Some(Err(format!(
                        "the upstream sent no body bytes for {:?}",
                        this.idle
                    )
                    .into()))),
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

// === impl Retry ===

/// Shared, because the stack is cloned per request and the policy is not small.
#[derive(Clone)]
pub struct RetryLayer(Arc<RetryShared>);

pub struct RetryShared {
    policy: crate::config::RetryPolicy,
    observe: Observe,
    idempotency_header: http::HeaderName,
    budget: TpsBudget,
}

impl std::ops::Deref for RetryLayer {
    type Target = RetryShared;
    fn deref(&self) -> &RetryShared {
        &self.0
    }
}

impl RetryLayer {
    pub fn new(route: &RouteConfig, observe: Observe) -> Self {
        RetryLayer(Arc::new(RetryShared {
            policy: route.retry.clone(),
            observe,
            idempotency_header: route.idempotency.header.clone(),
            // Retries stay under ~20% of requests plus a floor of 10/s over a 10s
            // window, so a failing upstream never sees a retry storm.
            budget: TpsBudget::new(Duration::from_secs(10), 10, 0.2),
        }))
    }
}

impl<S> Layer<S> for RetryLayer {
    type Service = Retry<S>;
    fn layer(&self, inner: S) -> Retry<S> {
        Retry {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Retry<S> {
    inner: S,
    layer: RetryLayer,
}

/// RFC 9110 §9.2.2: only these may be repeated without knowing more.
fn idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

impl<S> Service<Request<Bytes>> for Retry<S>
where
    S: Service<Request<Bytes>, Response = Response<Body>, Error = ProxyError>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = ProxyError;
    type Future = BoxFut<Response<Body>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Bytes>) -> Self::Future {
        let inner = self.inner.clone();
        let inner = std::mem::replace(&mut self.inner, inner);
        let layer = self.layer.clone();
        Box::pin(async move {
            let policy = &layer.policy;
            layer.budget.deposit();
            let replayable =
                idempotent(req.method()) || req.headers().contains_key(&layer.idempotency_header);
            let max = policy.max_attempts.get();
            let mut svc = inner;
            let mut attempt = 1u32;
            loop {
                let result = svc.ready().await?.call(clone_request(&req)).await;
                let retryable = match &result {
                    Ok(rsp) => policy.retry_on.status(rsp.status().as_u16()),
                    Err(e) => e
                        .failure_class()
                        .is_some_and(|c| policy.retry_on.failure(c)),
                };
                // A connect failure sent nothing, so even a POST may go again.
                let safe = replayable || matches!(&result, Err(ProxyError::UpstreamConnect(_)));
                if !retryable || !safe || attempt >= max {
                    return result;
                }
                let o = &layer.observe;
                if !layer.budget.withdraw() {
                    o.metrics.retry_budget_exhausted(&o.route);
                    return result;
                }
                let reason = match &result {
                    Ok(rsp) => UpstreamOutcome::Status(rsp.status().as_u16()).reason(),
                    Err(e) => e
                        .failure_class()
                        .map_or_else(|| e.code().to_owned(), |c| c.as_str().to_owned()),
                };
                o.metrics.retry(&o.route, Mode::Passthrough, &reason);
                let mut delay = backoff::delay(&policy.backoff, attempt);
                if policy.honor_retry_after {
                    if let Ok(rsp) = &result {
                        if let Some(after) =
                            backoff::retry_after(rsp.headers(), std::time::SystemTime::now())
                        {
                            delay = delay.max(after.min(policy.backoff.max()));
                        }
                    }
                }
                tracing::debug!(attempt, ?delay, "retrying passthrough request");
                drop(result);
                tokio::time::sleep(delay).await;
                attempt += 1;
            }
        })
    }
}

fn clone_request(req: &Request<Bytes>) -> Request<Bytes> {
    let mut r = Request::new(req.body().clone());
    *r.method_mut() = req.method().clone();
    *r.uri_mut() = req.uri().clone();
    *r.version_mut() = req.version();
    *r.headers_mut() = req.headers().clone();
    if let Some(a) = req.extensions().get::<Attempts>() {
        r.extensions_mut().insert(a.clone());
    }
    r
}

// === impl Breaker ===

#[derive(Debug)]
enum BreakerState {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
    },
    /// One trial request is out; everything else is refused until it answers.
    HalfOpen,
}

#[derive(Clone)]
pub struct BreakerLayer {
    /// For its log line: the request's span is not in the log at info.
    route: Arc<str>,
    config: BreakerConfig,
    state: Arc<Mutex<BreakerState>>,
}

impl BreakerLayer {
    pub fn new(route: Arc<str>, config: BreakerConfig) -> Self {
        BreakerLayer {
            route,
            config,
            state: Arc::new(Mutex::new(BreakerState::Closed { failures: 0 })),
        }
    }
}

impl BreakerLayer {
    /// A read-only view of this breaker's state, shared with every service it wraps.
    pub fn handle(&self) -> CircuitHandle {
        CircuitHandle(self.state.clone())
    }
}

/// What a route's breaker does with the next request. "Open" means refusing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CircuitState {
    Closed,
    Open,
    /// `open_for` ran out: the next request is a trial, the rest wait for its answer.
    HalfOpen,
}

impl CircuitState {
    pub fn as_str(self) -> &'static str {
        match self {
            CircuitState::Closed => "closed",
            CircuitState::Open => "open",
            CircuitState::HalfOpen => "half_open",
        }
    }
}

impl std::fmt::Display for CircuitState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A cheap, read-only view of one breaker: one short lock, no request path work.
#[derive(Clone)]
pub struct CircuitHandle(Arc<Mutex<BreakerState>>);

impl CircuitHandle {
    pub fn state(&self) -> CircuitState {
        match *self.0.lock() {
            BreakerState::Closed { .. } => CircuitState::Closed,
            // The breaker only moves to half-open when the next request arrives; once
            // `open_for` ran out that request is let through, so report it as such.
            BreakerState::Open { until } if Instant::now() >= until => CircuitState::HalfOpen,
            BreakerState::Open { .. } => CircuitState::Open,
            BreakerState::HalfOpen => CircuitState::HalfOpen,
        }
    }
}

/// Breakers by route name, filled as passthrough stacks are built.
#[derive(Clone, Default)]
pub struct Circuits(Arc<parking_lot::RwLock<std::collections::HashMap<String, CircuitHandle>>>);

impl Circuits {
    /// Records (or, for a route without a breaker, forgets) the route's breaker.
    pub fn register(&self, route: &str, handle: Option<CircuitHandle>) {
        let mut map = self.0.write();
        match handle {
            Some(h) => {
                map.insert(route.to_owned(), h);
            }
            None => {
                map.remove(route);
            }
        }
    }

    pub fn state(&self, route: &str) -> Option<CircuitState> {
        self.0.read().get(route).map(CircuitHandle::state)
    }

    /// Forgets the breakers of routes for which `keep` is false (after a reload).
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        self.0.write().retain(|name, _| keep(name));
    }
}

impl<S> Layer<S> for BreakerLayer {
    type Service = Breaker<S>;
    fn layer(&self, inner: S) -> Breaker<S> {
        Breaker {
            inner,
            layer: self.clone(),
        }
    }
}

/// Consecutive-failure circuit breaker. "Open" means refusing.
#[derive(Clone)]
pub struct Breaker<S> {
    inner: S,
    layer: BreakerLayer,
}

/// What the breaker counts as the upstream failing.
fn is_failure(result: &Result<Response<Body>, ProxyError>) -> bool {
    match result {
        Ok(rsp) => rsp.status().is_server_error(),
        Err(e) => e.failure_class().is_some(),
    }
}

impl<S> Service<Request<Bytes>> for Breaker<S>
where
    S: Service<Request<Bytes>, Response = Response<Body>, Error = ProxyError> + Send,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = ProxyError;
    type Future = BoxFut<Response<Body>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Bytes>) -> Self::Future {
        let now = Instant::now();
        let trial = {
            let mut state = self.layer.state.lock();
            match *state {
                BreakerState::Closed { .. } => {}
                BreakerState::Open { until } if now >= until => *state = BreakerState::HalfOpen,
                BreakerState::Open { until } => {
                    let retry_after = until - now;
                    return Box::pin(async move { Err(ProxyError::CircuitOpen { retry_after }) });
                }
                BreakerState::HalfOpen => {
                    let retry_after = Duration::from_secs(1);
                    return Box::pin(async move { Err(ProxyError::CircuitOpen { retry_after }) });
                }
            }
            // Armed before the future exists: even one dropped unpolled releases the trial.
            TrialGuard(matches!(*state, BreakerState::HalfOpen).then(|| self.layer.state.clone()))
        };
        let fut = self.inner.call(req);
        let layer = self.layer.clone();
        Box::pin(async move {
            let result = fut.await;
            drop(trial.disarm());
            let failed = is_failure(&result);
            let mut state = layer.state.lock();
            *state = match (&*state, failed) {
                (_, false) => BreakerState::Closed { failures: 0 },
                (BreakerState::Closed { failures }, true)
                    if failures + 1 < layer.config.consecutive_failures.get() =>
                {
                    BreakerState::Closed {
                        failures: failures + 1,
                    }
                }
                (_, true) => {
                    tracing::warn!(route = %layer.route, open_for = ?layer.config.open_for, "circuit breaker opened");
                    BreakerState::Open {
                        until: Instant::now() + layer.config.open_for,
                    }
                }
            };
            result
        })
    }
}

/// If a half-open trial is abandoned (the client went away), the next request becomes
/// the trial; otherwise the breaker would refuse forever.
struct TrialGuard(Option<Arc<Mutex<BreakerState>>>);

impl TrialGuard {
    fn disarm(mut self) -> Option<Arc<Mutex<BreakerState>>> {
        self.0.take()
    }
}

impl Drop for TrialGuard {
    fn drop(&mut self) {
        if let Some(state) = self.0.take() {
            let mut state = state.lock();
            if matches!(*state, BreakerState::HalfOpen) {
                *state = BreakerState::Open {
                    until: Instant::now(),
                };
            }
        }
    }
}

// === impl RateLimit ===

#[derive(Clone)]
pub struct RateLimitLayer {
    limiter: Arc<governor::DefaultDirectRateLimiter>,
    observe: Observe,
}

impl RateLimitLayer {
    pub fn new(cfg: RateLimitConfig, observe: Observe) -> Self {
        let quota = Quota::per_second(cfg.per_second).allow_burst(cfg.burst);
        RateLimitLayer {
            limiter: Arc::new(RateLimiter::direct(quota)),
            observe,
        }
    }
}

impl<S> Layer<S> for RateLimitLayer {
    type Service = RateLimit<S>;
    fn layer(&self, inner: S) -> RateLimit<S> {
        RateLimit {
            inner,
            limiter: self.limiter.clone(),
            observe: self.observe.clone(),
        }
    }
}

/// Refuses at once with `429` over the route's rate: a passthrough caller is waiting,
/// and queueing it here would only turn the limit into latency.
#[derive(Clone)]
pub struct RateLimit<S> {
    inner: S,
    limiter: Arc<governor::DefaultDirectRateLimiter>,
    observe: Observe,
}

impl<S> Service<Request<Bytes>> for RateLimit<S>
where
    S: Service<Request<Bytes>, Response = Response<Body>, Error = ProxyError> + Send,
    S::Future: Send + 'static,
{
    type Response = Response<Body>;
    type Error = ProxyError;
    type Future = BoxFut<Response<Body>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Bytes>) -> Self::Future {
        if let Err(not_until) = self.limiter.check() {
            let o = &self.observe;
            o.metrics
                .rate_limited(&o.route, Mode::Passthrough, Limit::RateLimit);
            let retry_after = not_until.wait_time_from(DefaultClock::default().now());
            return Box::pin(async move { Err(ProxyError::RateLimited { retry_after }) });
        }
        Box::pin(self.inner.call(req))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::rescue::full;
    use std::sync::atomic::AtomicUsize;

    fn breaker(fails: u32) -> BreakerLayer {
        BreakerLayer::new(
            Arc::from("test"),
            BreakerConfig {
                consecutive_failures: fails.try_into().unwrap(),
                open_for: Duration::from_secs(30),
            },
        )
    }

    fn svc(
        status: u16,
        calls: Arc<AtomicUsize>,
    ) -> impl Service<
        Request<Bytes>,
        Response = Response<Body>,
        Error = ProxyError,
        Future = BoxFut<Response<Body>>,
    > + Clone
           + Send {
        tower::service_fn(move |_req: Request<Bytes>| {
            calls.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move {
                let mut r = Response::new(full(Bytes::new()));
                *r.status_mut() = http::StatusCode::from_u16(status).unwrap();
                Ok(r)
            }) as BoxFut<Response<Body>>
        })
    }

    #[tokio::test(start_paused = true)]
    async fn breaker_opens_then_lets_one_trial_through_after_open_for() {
        let calls = Arc::new(AtomicUsize::new(0));
        let layer = breaker(2);
        let mut s = layer.layer(svc(500, calls.clone()));
        for _ in 0..2 {
            assert_eq!(
                s.call(Request::new(Bytes::new())).await.unwrap().status(),
                500
            );
        }
        assert!(matches!(
            s.call(Request::new(Bytes::new())).await,
            Err(ProxyError::CircuitOpen { .. })
        ));
        assert_eq!(calls.load(Ordering::SeqCst), 2);

        tokio::time::advance(Duration::from_secs(31)).await;
        let mut ok = layer.layer(svc(200, calls.clone()));
        assert_eq!(
            ok.call(Request::new(Bytes::new())).await.unwrap().status(),
            200
        );
        assert_eq!(
            ok.call(Request::new(Bytes::new())).await.unwrap().status(),
            200
        );
    }

    #[tokio::test(start_paused = true)]
    async fn circuit_handle_reports_closed_open_half_open_then_closed() {
        let calls = Arc::new(AtomicUsize::new(0));
        let layer = breaker(1);
        let circuits = Circuits::default();
        circuits.register("r", Some(layer.handle()));
        assert_eq!(circuits.state("r"), Some(CircuitState::Closed));
        assert_eq!(circuits.state("other"), None);
        let mut s = layer.layer(svc(500, calls.clone()));
        let _ = s.call(Request::new(Bytes::new())).await;
        assert_eq!(circuits.state("r"), Some(CircuitState::Open));
        tokio::time::advance(Duration::from_secs(31)).await;
        assert_eq!(circuits.state("r"), Some(CircuitState::HalfOpen));
        let mut ok = layer.layer(svc(200, calls));
        let _ = ok.call(Request::new(Bytes::new())).await;
        assert_eq!(
            circuits.state("r").map(CircuitState::as_str),
            Some("closed")
        );
        circuits.register("r", None);
        assert_eq!(circuits.state("r"), None);
    }

    #[tokio::test(start_paused = true)]
    async fn an_abandoned_trial_does_not_wedge_the_breaker() {
        let calls = Arc::new(AtomicUsize::new(0));
        let layer = breaker(1);
        let mut s = layer.layer(svc(500, calls.clone()));
        let _ = s.call(Request::new(Bytes::new())).await;
        tokio::time::advance(Duration::from_secs(31)).await;
        // The trial's future is dropped before it completes.
        drop(s.call(Request::new(Bytes::new())));
        let mut ok = layer.layer(svc(200, calls));
        assert_eq!(
            ok.call(Request::new(Bytes::new())).await.unwrap().status(),
            200
        );
    }

    fn frames_then(
        gaps: &'static [u64],
        end: bool,
    ) -> impl futures_util::Stream<Item = Result<http_body::Frame<Bytes>, tower::BoxError>> {
        use futures_util::StreamExt;
        let frames = futures_util::stream::iter(gaps).then(|&gap| async move {
            tokio::time::sleep(Duration::from_millis(gap)).await;
            Ok(http_body::Frame::data(Bytes::from_static(b"x")))
        });
        let tail = if end {
            futures_util::stream::empty().left_stream()
        } else {
            futures_util::stream::pending().right_stream()
        };
        frames.chain(tail)
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_keeps_coming_within_the_idle_timeout_is_whole() {
        // Each gap is under the 2 s timeout; together they are well over it.
        let body = http_body_util::StreamBody::new(frames_then(&[1500, 1500, 1500], true));
        let b = IdleTimeoutBody::new(body.boxed_unsync(), Duration::from_secs(2));
        let got = b.collect().await.unwrap().to_bytes();
        assert_eq!(&got[..], b"xxx");
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_that_stalls_fails_once_the_idle_timeout_passes() {
        let body = http_body_util::StreamBody::new(frames_then(&[0], false));
        let mut b = IdleTimeoutBody::new(body.boxed_unsync(), Duration::from_secs(2));
        assert!(b.frame().await.unwrap().unwrap().is_data());
        // The consumer's own pace between polls is not the upstream's silence.
        tokio::time::sleep(Duration::from_secs(5)).await;
        let waited = Instant::now();
        let e = b.frame().await.unwrap().unwrap_err();
        assert!(e.to_string().contains("no body bytes for 2s"), "{e}");
        assert_eq!(waited.elapsed().as_secs(), 2);
    }

    #[tokio::test]
    async fn unkeyed_post_is_not_retried_but_get_is() {
        let route = crate::config::from_str(
            "routes:\n  - name: a\n    upstream: http://127.0.0.1:9\n    retry: { max_attempts: 3, backoff: { initial: 1ms, max: 2ms } }\n",
            std::path::Path::new("t.yaml"),
        )
        .unwrap()
        .routes[0]
            .clone();
        let calls = Arc::new(AtomicUsize::new(0));
        let observe = Observe {
            metrics: Arc::new(Metrics::new()),
            route: Arc::from("r"),
        };
        let mut s = RetryLayer::new(&route, observe).layer(svc(503, calls.clone()));
        let post = Request::post("/").body(Bytes::new()).unwrap();
        assert_eq!(s.call(post).await.unwrap().status(), 503);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        let get = Request::get("/").body(Bytes::new()).unwrap();
        assert_eq!(s.call(get).await.unwrap().status(), 503);
        assert_eq!(calls.load(Ordering::SeqCst), 4);
    }
}
