//! Prometheus metrics: one [`Metrics`] registry shared (in an `Arc`) by the proxy, the
//! dispatchers and the admin listener, which serves it on `GET /metrics`.
//!
//! - Names follow Prometheus conventions: `spillway_` prefix, base units (seconds), counters
//!   end in `_total`.
//! - Label values are bounded: route names come from the config (plus `(none)` for requests
//!   that matched no route and `(unmatched)` for unmatched passthrough), every other label
//!   takes values from a fixed vocabulary or HTTP status codes. Never URIs, hosts or job ids.
//! - Counters and histograms move on the request and delivery paths. Queue gauges are read
//!   from [`JobStore::stats`] (counters kept in storage, no table scan) and circuit states from
//!   the proxy, just before each scrape is encoded; a storage error drops that route's queue
//!   gauges from the scrape and counts `spillway_queue_stats_errors_total`, it never fails
//!   the scrape.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, MethodRouter};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};

use crate::proxy::CircuitState;
use crate::queue::JobStore;

/// Content type of the Prometheus text format, the default answer.
const TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";
/// Content type of OpenMetrics, for scrapers that ask for it (Prometheus does).
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// Every breaker state, one `spillway_circuit_state` series each.
const CIRCUIT_STATES: [CircuitState; 3] = [
    CircuitState::Closed,
    CircuitState::Open,
    CircuitState::HalfOpen,
];
/// Longest a scrape waits for one route's queue counters.
const STATS_TIMEOUT: Duration = Duration::from_secs(2);

/// Route label of requests refused before any route matched.
pub const NO_ROUTE: &str = "(none)";
/// Route label of requests sent on by `unmatched: passthrough`.
pub const UNMATCHED: &str = "(unmatched)";

/// How a request was handled; the `mode` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mode {
    Passthrough,
    Deferred,
    Connect,
    /// Refused before a route (and so a mode) was known.
    None,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Passthrough => "passthrough",
            Mode::Deferred => "deferred",
            Mode::Connect => "connect",
            Mode::None => "none",
        }
    }
}

/// What one delivery attempt led to; the `outcome` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttemptOutcome {
    Delivered,
    Retry,
    Dead,
}

impl AttemptOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            AttemptOutcome::Delivered => "delivered",
            AttemptOutcome::Retry => "retry",
            AttemptOutcome::Dead => "dead",
        }
    }
}

/// Which limit made work wait or be refused; the `limit` label.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    /// The route's `rate_limit` (governor).
    RateLimit,
    /// One of the route's long-window `quotas`.
    Quota,
}

impl Limit {
    fn as_str(self) -> &'static str {
        match self {
            Limit::RateLimit => "rate_limit",
            Limit::Quota => "quota",
        }
    }
}

// === labels ===

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteModeLabels {
    route: String,
    mode: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: String,
    mode: &'static str,
    code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    route: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModeReasonLabels {
    route: String,
    mode: &'static str,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamLabels {
    route: String,
    mode: &'static str,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AttemptLabels {
    route: String,
    outcome: &'static str,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LimitLabels {
    route: String,
    mode: &'static str,
    limit: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    route: String,
    state: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;
type FloatGauge = Gauge<f64, AtomicU64>;

/// Accept and passthrough latency: sub-millisecond (a 202 after group commit) to a slow
/// upstream's tens of seconds.
fn request_buckets() -> Histogram {
    Histogram::new([
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    ])
}

/// One upstream attempt: milliseconds to the route's `timeout`.
fn upstream_buckets() -> Histogram {
    Histogram::new([
        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    ])
}

/// Acceptance to delivery: instant to a day of retries.
fn queue_time_buckets() -> Histogram {
    Histogram::new([
        0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 10800.0, 43200.0,
        86400.0,
    ])
}

// === impl Metrics ===

/// Every metric spillway exports, registered once.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    request_duration: HistogramFamily<RouteModeLabels>,
    rejected: Family<ReasonLabels, Counter>,
    upstream_requests: Family<UpstreamLabels, Counter>,
    upstream_duration: HistogramFamily<RouteModeLabels>,
    retries: Family<ModeReasonLabels, Counter>,
    retry_budget_exhausted: Family<RouteLabels, Counter>,
    rate_limited: Family<LimitLabels, Counter>,
    enqueued: Family<RouteLabels, Counter>,
    idempotent_replays: Family<RouteLabels, Counter>,
    delivery_attempts: Family<AttemptLabels, Counter>,
    delivered: Family<RouteLabels, Counter>,
    dead_lettered: Family<ReasonLabels, Counter>,
    queue_time: HistogramFamily<RouteLabels>,
    queue_depth: Family<StateLabels, Gauge>,
    queue_oldest_age: Family<RouteLabels, FloatGauge>,
    queue_oldest_timestamp: Family<RouteLabels, FloatGauge>,
    dead_letter_depth: Family<RouteLabels, Gauge>,
    queue_orphaned: Family<RouteLabels, Gauge>,
    queue_stats_errors: Counter,
    circuit_state: Family<StateLabels, Gauge>,
    config_last_reload_success: FloatGauge,
    config_last_reload_successful: Gauge,
    config_reload_errors: Counter,
    /// Routes whose queue gauges the last scrape set, so a route gone after a reload stops
    /// being reported.
    queue_routes: parking_lot::Mutex<HashSet<String>>,
    /// One scrape at a time: refresh and encode must not interleave.
    scrape: tokio::sync::Mutex<()>,
    /// The request path's series by route, then by mode (see [`RouteSeries`]).
    series: parking_lot::RwLock<HashMap<String, [Option<RouteSeries>; MODES]>>,
}

/// How many [`Mode`]s there are: `Mode as usize` indexes a route's series.
const MODES: usize = 4;
const _: () = assert!(Mode::None as usize + 1 == MODES);

/// One route's request-path series in one mode, each found in its family on first use and
/// kept: counting a request then touches atomics, instead of building a label set (a
/// `String` each) and hashing it in four families per request.
#[derive(Default)]
struct RouteSeries {
    /// `requests_total` by status class, 1xx to 5xx.
    requests: [OnceLock<Counter>; CLASSES.len()],
    request_duration: OnceLock<Histogram>,
    /// `upstream_requests_total{outcome="200"}`: by far the most common; other outcomes
    /// go to the family.
    upstream_200: OnceLock<Counter>,
    upstream_duration: OnceLock<Histogram>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// Registers every family. The config-reload timestamp starts at now: the config loaded
    /// at startup is the first successful load.
    pub fn new() -> Self {
        let mut r = Registry::with_prefix("spillway");
        let requests = Family::default();
        r.register(
            "requests",
            "Requests from the app, by route, mode (passthrough, deferred, connect, none) and status class of the answer",
            requests.clone(),
        );
        let request_duration: HistogramFamily<_> = Family::new_with_constructor(request_buckets);
        r.register_with_unit(
            "request_duration",
            "Time to answer the app; for mode=deferred this is the accept latency (until the durable 202)",
            Unit::Seconds,
            request_duration.clone(),
        );
        let rejected = Family::default();
        r.register(
            "rejected",
            "Requests spillway answered itself without reaching the upstream, by Spillway-Error code (queue_full, storage_unavailable, circuit_open, overloaded, rate_limited, ...)",
            rejected.clone(),
        );
        let upstream_requests = Family::default();
        r.register(
            "upstream_requests",
            "Attempts sent upstream (passthrough attempts and deliveries), by outcome: the status code, or timeout, connect-failure, reset",
            upstream_requests.clone(),
        );
        let upstream_duration: HistogramFamily<_> = Family::new_with_constructor(upstream_buckets);
        r.register_with_unit(
            "upstream_request_duration",
            "Duration of one upstream attempt, until its response headers or its failure",
            Unit::Seconds,
            upstream_duration.clone(),
        );
        let retries = Family::default();
        r.register(
            "retries",
            "Retries decided, by mode and the failure that caused them (status_NNN, timeout, connect-failure, reset)",
            retries.clone(),
        );
        let retry_budget_exhausted = Family::default();
        r.register(
            "retry_budget_exhausted",
            "Passthrough retries skipped because the route's retry budget was spent",
            retry_budget_exhausted.clone(),
        );
        let rate_limited = Family::default();
        r.register(
            "rate_limited",
            "Waits (deliveries) and refusals (passthrough 429) caused by a route's rate_limit or quotas",
            rate_limited.clone(),
        );
        let enqueued = Family::default();
        r.register(
            "enqueued",
            "Deferred requests stored as new jobs",
            enqueued.clone(),
        );
        let idempotent_replays = Family::default();
        r.register(
            "idempotent_replays",
            "Deferred requests answered with an existing job because their idempotency key was seen",
            idempotent_replays.clone(),
        );
        let delivery_attempts = Family::default();
        r.register(
            "delivery_attempts",
            "Delivery attempts of deferred jobs, by outcome (delivered, retry, dead) and reason",
            delivery_attempts.clone(),
        );
        let delivered = Family::default();
        r.register("delivered", "Deferred jobs delivered", delivered.clone());
        let dead_lettered = Family::default();
        r.register(
            "dead_lettered",
            "Deferred jobs dead-lettered, by reason (max_attempts, max_age, non_retryable_status, non_retryable_failure, crash_loop, unsendable)",
            dead_lettered.clone(),
        );
        let queue_time: HistogramFamily<_> = Family::new_with_constructor(queue_time_buckets);
        r.register_with_unit(
            "queue_time",
            "Delivery latency: from acceptance to the delivering attempt's answer",
            Unit::Seconds,
            queue_time.clone(),
        );
        let queue_depth = Family::default();
        r.register(
            "queue_depth",
            "Jobs not yet delivered nor dead, by state (queued, in_flight, retrying)",
            queue_depth.clone(),
        );
        let queue_oldest_age: Family<_, FloatGauge> = Family::default();
        r.register_with_unit(
            "queue_oldest_job_age",
            "Age of the oldest job not yet delivered nor dead; 0 when there is none",
            Unit::Seconds,
            queue_oldest_age.clone(),
        );
        let queue_oldest_timestamp: Family<_, FloatGauge> = Family::default();
        r.register_with_unit(
            "queue_oldest_job_timestamp",
            "Creation time (Unix) of the oldest job not yet delivered nor dead; absent when there is none",
            Unit::Seconds,
            queue_oldest_timestamp.clone(),
        );
        let dead_letter_depth = Family::default();
        r.register(
            "dead_letter_depth",
            "Dead-lettered jobs currently stored",
            dead_letter_depth.clone(),
        );
        let queue_orphaned = Family::default();
        r.register(
            "queue_orphaned",
            "1 for a route that has jobs stored but is not configured as deferrable: nothing delivers its jobs until it returns",
            queue_orphaned.clone(),
        );
        let queue_stats_errors = Counter::default();
        r.register(
            "queue_stats_errors",
            "Reads of queue counters from storage that failed during a scrape",
            queue_stats_errors.clone(),
        );
        let circuit_state = Family::default();
        r.register(
            "circuit_state",
            "Circuit breaker state of passthrough routes: 1 for the current state (closed, open, half_open), 0 for the others",
            circuit_state.clone(),
        );
        r.register(
            "build",
            "Build information",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
        );
        let config_last_reload_success = FloatGauge::default();
        r.register_with_unit(
            "config_last_reload_success_timestamp",
            "Time (Unix) the config was last loaded successfully",
            Unit::Seconds,
            config_last_reload_success.clone(),
        );
        let config_last_reload_successful = Gauge::default();
        r.register(
            "config_last_reload_successful",
            "Whether the last config load or reload succeeded (1) or was rejected (0)",
            config_last_reload_successful.clone(),
        );
        let config_reload_errors = Counter::default();
        r.register(
            "config_reload_errors",
            "Config reloads rejected (the previous config kept running)",
            config_reload_errors.clone(),
        );
        let m = Metrics {
            registry: r,
            requests,
            request_duration,
            rejected,
            upstream_requests,
            upstream_duration,
            retries,
            retry_budget_exhausted,
            rate_limited,
            enqueued,
            idempotent_replays,
            delivery_attempts,
            delivered,
            dead_lettered,
            queue_time,
            queue_depth,
            queue_oldest_age,
            queue_oldest_timestamp,
            dead_letter_depth,
            queue_orphaned,
            queue_stats_errors,
            circuit_state,
            config_last_reload_success,
            config_last_reload_successful,
            config_reload_errors,
            queue_routes: parking_lot::Mutex::new(HashSet::new()),
            scrape: tokio::sync::Mutex::new(()),
            series: parking_lot::RwLock::new(HashMap::new()),
        };
        m.config_reloaded(true);
        m
    }

    // --- the request path ---

    /// One request answered to the app.
    pub fn request(&self, route: &str, mode: Mode, status: u16, elapsed: Duration) {
        let class = status_class(status);
        self.with_series(route, mode, |s| {
            s.requests[class_index(status)]
                .get_or_init(|| {
                    self.requests
                        .get_or_create(&RequestLabels {
                            route: route.to_owned(),
                            mode: mode.as_str(),
                            code: class,
                        })
                        .clone()
                })
                .inc();
            s.request_duration
                .get_or_init(|| {
                    self.request_duration
                        .get_or_create(&RouteModeLabels {
                            route: route.to_owned(),
                            mode: mode.as_str(),
                        })
                        .clone()
                })
                .observe(elapsed.as_secs_f64());
        });
    }

    /// Runs `f` on the series of `route` in `mode`, made on first use.
    fn with_series<R>(&self, route: &str, mode: Mode, f: impl FnOnce(&RouteSeries) -> R) -> R {
        let m = mode as usize;
        {
            let map = self.series.read();
            if let Some(s) = map.get(route).and_then(|by_mode| by_mode[m].as_ref()) {
                return f(s);
            }
        }
        let mut map = self.series.write();
        let s = map.entry(route.to_owned()).or_default()[m].get_or_insert_with(Default::default);
        f(s)
    }

    /// An answer spillway made itself instead of reaching the upstream. `code` is the
    /// answer's `Spillway-Error` code.
    pub fn rejected(&self, route: &str, code: &str) {
        self.rejected
            .get_or_create(&ReasonLabels {
                route: route.to_owned(),
                reason: code.to_owned(),
            })
            .inc();
    }

    /// One attempt sent upstream, with what came of it.
    pub fn upstream(&self, route: &str, mode: Mode, outcome: UpstreamOutcome, elapsed: Duration) {
        let labels = |outcome: String| UpstreamLabels {
            route: route.to_owned(),
            mode: mode.as_str(),
            outcome,
        };
        self.with_series(route, mode, |s| {
            if outcome == UpstreamOutcome::Status(200) {
                s.upstream_200
                    .get_or_init(|| {
                        self.upstream_requests
                            .get_or_create(&labels(outcome.label()))
                            .clone()
                    })
                    .inc();
            } else {
                self.upstream_requests
                    .get_or_create(&labels(outcome.label()))
                    .inc();
            }
            s.upstream_duration
                .get_or_init(|| {
                    self.upstream_duration
                        .get_or_create(&RouteModeLabels {
                            route: route.to_owned(),
                            mode: mode.as_str(),
                        })
                        .clone()
                })
                .observe(elapsed.as_secs_f64());
        });
    }

    /// A retry was decided; `reason` names the failure (see [`UpstreamOutcome::reason`]).
    pub fn retry(&self, route: &str, mode: Mode, reason: &str) {
        self.retries
            .get_or_create(&ModeReasonLabels {
                route: route.to_owned(),
                mode: mode.as_str(),
                reason: reason.to_owned(),
            })
            .inc();
    }

    pub fn retry_budget_exhausted(&self, route: &str) {
        self.retry_budget_exhausted
            .get_or_create(&RouteLabels {
                route: route.to_owned(),
            })
            .inc();
    }

    /// Work waited for (deliveries) or was refused by (passthrough) a route's limit.
    pub fn rate_limited(&self, route: &str, mode: Mode, limit: Limit) {
        self.rate_limited
            .get_or_create(&LimitLabels {
                route: route.to_owned(),
                mode: mode.as_str(),
                limit: limit.as_str(),
            })
            .inc();
    }

    // --- deferral ---

    /// A deferred request stored as a new job (`replay` false) or answered with the job
    /// that holds its idempotency key (`replay` true).
    pub fn enqueued(&self, route: &str, replay: bool) {
        let family = if replay {
            &self.idempotent_replays
        } else {
            &self.enqueued
        };
        family
            .get_or_create(&RouteLabels {
                route: route.to_owned(),
            })
            .inc();
    }

    /// One delivery attempt's verdict. `reason` is bounded: `ok` when delivered, the
    /// failure (`status_NNN`, `timeout`, ...) when retried, a [`dead_reason`] when dead.
    pub fn delivery_attempt(&self, route: &str, outcome: AttemptOutcome, reason: &str) {
        self.delivery_attempts
            .get_or_create(&AttemptLabels {
                route: route.to_owned(),
                outcome: outcome.as_str(),
                reason: reason.to_owned(),
            })
            .inc();
        match outcome {
            AttemptOutcome::Delivered => {}
            AttemptOutcome::Retry => self.retry(route, Mode::Deferred, reason),
            AttemptOutcome::Dead => {
                self.dead_lettered
                    .get_or_create(&ReasonLabels {
                        route: route.to_owned(),
                        reason: reason.to_owned(),
                    })
                    .inc();
            }
        }
    }

    /// A job delivered, `queue_time` after it was accepted.
    pub fn delivered(&self, route: &str, queue_time: Duration) {
        let labels = RouteLabels {
            route: route.to_owned(),
        };
        self.delivered.get_or_create(&labels).inc();
        self.queue_time
            .get_or_create(&labels)
            .observe(queue_time.as_secs_f64());
    }

    // --- config ---

    /// Records a config (re)load: success sets the timestamp, failure counts an error.
    pub fn config_reloaded(&self, ok: bool) {
        if ok {
            self.config_last_reload_success.set(unix_now_secs());
            self.config_last_reload_successful.set(1);
        } else {
            self.config_reload_errors.inc();
            self.config_last_reload_successful.set(0);
        }
    }

    // --- scrape ---

    /// Reads the gauges, then encodes everything: OpenMetrics when `accept` asks for it,
    /// else the Prometheus text format. Returns the content type and the body.
    pub async fn scrape(
        &self,
        store: Option<&Arc<dyn JobStore>>,
        source: &dyn ScrapeSource,
        accept: Option<&str>,
    ) -> (&'static str, String) {
        let _one = self.scrape.lock().await;
        self.refresh(store, source).await;
        let mut out = String::with_capacity(16 * 1024);
        let openmetrics = accept.is_some_and(|a| a.contains("application/openmetrics-text"));
        let (content_type, result) = if openmetrics {
            (
                OPENMETRICS,
                prometheus_client::encoding::text::encode(&mut out, &self.registry),
            )
        } else {
            (
                TEXT,
                prometheus_client::encoding::prometheus_text::encode(&mut out, &self.registry),
            )
        };
        if let Err(e) = result {
            // Writing to a String does not fail; keep what was written if it ever does.
            tracing::warn!(error = %e, "encoding metrics failed");
        }
        (content_type, out)
    }

    async fn refresh(&self, store: Option<&Arc<dyn JobStore>>, source: &dyn ScrapeSource) {
        let mut routes: HashSet<String> = HashSet::new();
        self.queue_orphaned.clear();
        if let Some(store) = store {
            routes.extend(source.queue_routes());
            // Routes with jobs stored but no deferrable route configured (removed by a
            // reload): nothing delivers them, which is exactly what operators must see.
            match tokio::time::timeout(STATS_TIMEOUT, store.routes()).await {
                Ok(Ok(stored)) => {
                    for route in stored {
                        if !routes.contains(&route) {
                            self.queue_orphaned
                                .get_or_create(&RouteLabels {
                                    route: route.clone(),
                                })
                                .set(1);
                            routes.insert(route);
                        }
                    }
                }
                Ok(Err(e)) => self.routes_failed(&e.to_string()),
                Err(_) => self.routes_failed("timed out"),
            }
        }
        let gone: Vec<String> = {
            let mut known = self.queue_routes.lock();
            let gone = known.difference(&routes).cloned().collect();
            known.clone_from(&routes);
            gone
        };
        for route in &gone {
            self.forget_queue(route);
        }
        if let Some(store) = store {
            let now = unix_now_secs();
            for route in &routes {
                match tokio::time::timeout(STATS_TIMEOUT, store.stats(route)).await {
                    Ok(Ok(s)) => {
                        let depth = [
                            ("queued", s.queued),
                            ("in_flight", s.in_flight),
                            ("retrying", s.retrying),
                        ];
                        for (state, n) in depth {
                            self.queue_depth
                                .get_or_create(&StateLabels {
                                    route: route.clone(),
                                    state,
                                })
                                .set(i64::try_from(n).unwrap_or(i64::MAX));
                        }
                        let labels = RouteLabels {
                            route: route.clone(),
                        };
                        self.dead_letter_depth
                            .get_or_create(&labels)
                            .set(i64::try_from(s.dead).unwrap_or(i64::MAX));
                        match s.oldest_queued_created_at_ms {
                            Some(created) => {
                                let created = created as f64 / 1000.0;
                                self.queue_oldest_age
                                    .get_or_create(&labels)
                                    .set((now - created).max(0.0));
                                self.queue_oldest_timestamp
                                    .get_or_create(&labels)
                                    .set(created);
                            }
                            None => {
                                self.queue_oldest_age.get_or_create(&labels).set(0.0);
                                self.queue_oldest_timestamp.remove(&labels);
                            }
                        }
                    }
                    Ok(Err(e)) => self.stats_failed(route, &e.to_string()),
                    Err(_) => self.stats_failed(route, "timed out"),
                }
            }
        }
        for (route, state) in source.circuits() {
            for s in CIRCUIT_STATES {
                self.circuit_state
                    .get_or_create(&StateLabels {
                        route: route.clone(),
                        state: s.as_str(),
                    })
                    .set(i64::from(s == state));
            }
        }
    }

    /// A stale depth is worse than none: the route's queue gauges leave this scrape.
    fn stats_failed(&self, route: &str, error: &str) {
        tracing::warn!(route, error, "metrics: cannot read queue counters");
        self.queue_stats_errors.inc();
        self.forget_queue(route);
    }

    /// Without the stored routes, orphaned routes are missing from this scrape.
    fn routes_failed(&self, error: &str) {
        tracing::warn!(
            error,
            "metrics: cannot list the routes that have stored jobs"
        );
        self.queue_stats_errors.inc();
    }

    fn forget_queue(&self, route: &str) {
        for state in ["queued", "in_flight", "retrying"] {
            self.queue_depth.remove(&StateLabels {
                route: route.to_owned(),
                state,
            });
        }
        let labels = RouteLabels {
            route: route.to_owned(),
        };
        self.dead_letter_depth.remove(&labels);
        self.queue_oldest_age.remove(&labels);
        self.queue_oldest_timestamp.remove(&labels);
    }
}

/// Where a status's class sits in [`RouteSeries::requests`] and [`CLASSES`].
fn class_index(status: u16) -> usize {
    match status {
        100..=199 => 0,
        200..=299 => 1,
        300..=399 => 2,
        400..=499 => 3,
        _ => 4,
    }
}

const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// `2xx`, `4xx`, ...: the `code` label of requests.
fn status_class(status: u16) -> &'static str {
    CLASSES[class_index(status)]
}

fn unix_now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

// === UpstreamOutcome ===

/// What one upstream attempt produced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpstreamOutcome {
    Status(u16),
    Failed(crate::config::FailureClass),
}

impl UpstreamOutcome {
    /// The `outcome` label: the exact status code, or the failure class.
    fn label(self) -> String {
        match self {
            UpstreamOutcome::Status(s) if (100..=599).contains(&s) => s.to_string(),
            UpstreamOutcome::Status(_) => "invalid_status".to_owned(),
            UpstreamOutcome::Failed(c) => c.as_str().to_owned(),
        }
    }

    /// The `reason` label of a retry caused by this outcome: `status_503`, `timeout`, ...
    pub fn reason(self) -> String {
        match self {
            UpstreamOutcome::Status(s) => format!("status_{s}"),
            UpstreamOutcome::Failed(c) => c.as_str().to_owned(),
        }
    }
}

/// Why a job was dead-lettered, as a bounded label, from the outcome that killed it and the
/// verdict's reason text (whose prefixes `dispatch::classify` fixes).
pub fn dead_reason(outcome: Option<UpstreamOutcome>, reason: &str) -> &'static str {
    use crate::dispatch::classify::{MAX_AGE, MAX_ATTEMPTS};
    if reason.starts_with(MAX_ATTEMPTS) {
        MAX_ATTEMPTS
    } else if reason.starts_with(MAX_AGE) {
        MAX_AGE
    } else {
        match outcome {
            Some(UpstreamOutcome::Status(_)) => "non_retryable_status",
            Some(UpstreamOutcome::Failed(_)) => "non_retryable_failure",
            None if reason == "crash_loop" => "crash_loop",
            None => "unsendable",
        }
    }
}

// === scrape endpoint ===

/// What a scrape reads besides the counters: which routes have a queue, and the breakers.
pub trait ScrapeSource: Send + Sync {
    /// Deferrable routes, whose queue gauges are read from storage.
    fn queue_routes(&self) -> Vec<String>;
    /// Passthrough routes that have a circuit breaker, with its state.
    fn circuits(&self) -> Vec<(String, CircuitState)>;
}

/// The state `GET /metrics` needs.
#[derive(Clone)]
pub struct Scrape {
    pub metrics: Arc<Metrics>,
    pub store: Option<Arc<dyn JobStore>>,
    pub source: Arc<dyn ScrapeSource>,
}

/// `GET /metrics`, to mount on the admin router under any state type.
pub fn endpoint<S: Clone + Send + Sync + 'static>(scrape: Scrape) -> MethodRouter<S> {
    get(serve).with_state(scrape)
}

async fn serve(State(s): State<Scrape>, headers: HeaderMap) -> Response {
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    let (content_type, body) = s
        .metrics
        .scrape(s.store.as_ref(), s.source.as_ref(), accept)
        .await;
    (StatusCode::OK, [(header::CONTENT_TYPE, content_type)], body).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::queue::{Job, JobId, RouteStats, StoreError};

    struct NoSource;
    impl ScrapeSource for NoSource {
        fn queue_routes(&self) -> Vec<String> {
            vec![]
        }
        fn circuits(&self) -> Vec<(String, CircuitState)> {
            vec![("api".into(), CircuitState::Open)]
        }
    }

    #[tokio::test]
    async fn text_format_names_carry_prefix_units_and_total() {
        let m = Metrics::new();
        m.request("api", Mode::Passthrough, 503, Duration::from_millis(3));
        m.upstream(
            "api",
            Mode::Passthrough,
            UpstreamOutcome::Status(503),
            Duration::from_millis(2),
        );
        m.delivery_attempt("hooks", AttemptOutcome::Retry, "status_503");
        let (ct, text) = m.scrape(None, &NoSource, None).await;
        assert_eq!(ct, TEXT);
        for want in [
            "# TYPE spillway_requests_total counter",
            r#"spillway_requests_total{route="api",mode="passthrough",code="5xx"} 1"#,
            "# TYPE spillway_request_duration_seconds histogram",
            r#"spillway_upstream_requests_total{route="api",mode="passthrough",outcome="503"} 1"#,
            r#"spillway_retries_total{route="hooks",mode="deferred",reason="status_503"} 1"#,
            r#"spillway_circuit_state{route="api",state="open"} 1"#,
            r#"spillway_circuit_state{route="api",state="closed"} 0"#,
            r#"spillway_build_info{version=""#,
            "# TYPE spillway_config_last_reload_success_timestamp_seconds gauge",
            "spillway_config_last_reload_successful 1",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
        assert!(!text.contains("# EOF"));

        let (ct, om) = m
            .scrape(None, &NoSource, Some("application/openmetrics-text"))
            .await;
        assert_eq!(ct, OPENMETRICS);
        assert!(om.ends_with("# EOF\n"));
    }

    /// Holds jobs of `ok` and of `orphan` (no longer configured); stats of `broken` fail.
    struct HalfBroken;

    #[async_trait::async_trait]
    impl JobStore for HalfBroken {
        async fn enqueue(
            &self,
            _: crate::queue::NewJob,
            _: u64,
            _: u64,
        ) -> Result<crate::queue::EnqueueOutcome, StoreError> {
            Err(StoreError::Closed)
        }
        async fn lease_due(&self, _: &str, _: u64, _: usize) -> Result<Vec<Job>, StoreError> {
            Err(StoreError::Closed)
        }
        async fn ack(&self, _: JobId, _: u64) -> Result<(), StoreError> {
            Err(StoreError::Closed)
        }
        async fn reschedule(
            &self,
            _: JobId,
            _: u64,
            _: crate::queue::LastOutcome,
        ) -> Result<(), StoreError> {
            Err(StoreError::Closed)
        }
        async fn dead_letter(
            &self,
            _: JobId,
            _: String,
            _: Option<crate::queue::LastOutcome>,
        ) -> Result<(), StoreError> {
            Err(StoreError::Closed)
        }
        async fn get(&self, _: JobId) -> Result<Option<Job>, StoreError> {
            Err(StoreError::Closed)
        }
        async fn list(
            &self,
            _: Option<&str>,
            _: Option<crate::queue::JobState>,
            _: usize,
            _: Option<JobId>,
        ) -> Result<Vec<Job>, StoreError> {
            Err(StoreError::Closed)
        }
        async fn retry(&self, _: JobId, _: u64) -> Result<bool, StoreError> {
            Err(StoreError::Closed)
        }
        async fn delete(&self, _: JobId) -> Result<bool, StoreError> {
            Err(StoreError::Closed)
        }
        async fn replay_dead(&self, _: &str, _: u64) -> Result<u64, StoreError> {
            Err(StoreError::Closed)
        }
        async fn set_paused(&self, _: &str, _: bool) -> Result<(), StoreError> {
            Err(StoreError::Closed)
        }
        async fn pause_until(&self, _: &str, _: u64) -> Result<(), StoreError> {
            Err(StoreError::Closed)
        }
        async fn route_control(&self, _: &str) -> Result<(bool, Option<u64>), StoreError> {
            Err(StoreError::Closed)
        }
        async fn quota_acquire(
            &self,
            _: &str,
            _: usize,
            _: u64,
            _: u64,
            _: u64,
        ) -> Result<Option<u64>, StoreError> {
            Err(StoreError::Closed)
        }
        async fn next_due(&self, _: &str) -> Result<Option<u64>, StoreError> {
            Err(StoreError::Closed)
        }
        async fn stats(&self, route: &str) -> Result<RouteStats, StoreError> {
            match route {
                "ok" => Ok(RouteStats {
                    queued: 3,
                    dead: 2,
                    oldest_queued_created_at_ms: Some(1_000),
                    ..RouteStats::default()
                }),
                "orphan" => Ok(RouteStats {
                    retrying: 1,
                    ..RouteStats::default()
                }),
                "broken" => Err(StoreError::Unavailable("disk gone".into())),
                _ => Ok(RouteStats::default()),
            }
        }
        async fn purge_expired(&self, _: u64, _: usize) -> Result<u64, StoreError> {
            Err(StoreError::Closed)
        }
        async fn routes(&self) -> Result<Vec<String>, StoreError> {
            Ok(vec!["ok".into(), "orphan".into()])
        }
        fn healthy(&self) -> bool {
            false
        }
    }

    struct Routes(Vec<&'static str>);
    impl ScrapeSource for Routes {
        fn queue_routes(&self) -> Vec<String> {
            self.0.iter().map(|r| r.to_string()).collect()
        }
        fn circuits(&self) -> Vec<(String, CircuitState)> {
            vec![]
        }
    }

    #[tokio::test]
    async fn a_storage_error_leaves_that_route_out_and_the_scrape_whole() {
        let m = Metrics::new();
        let store: Arc<dyn JobStore> = Arc::new(HalfBroken);
        let (_, text) = m
            .scrape(Some(&store), &Routes(vec!["ok", "broken", "fresh"]), None)
            .await;
        assert!(text.contains(r#"spillway_queue_depth{route="ok",state="queued"} 3"#));
        assert!(text.contains(r#"spillway_dead_letter_depth{route="ok"} 2"#));
        assert!(text.contains(r#"spillway_queue_oldest_job_timestamp_seconds{route="ok"} 1"#));
        assert!(!text.contains(r#"route="broken""#), "{text}");
        assert!(text.contains("spillway_queue_stats_errors_total 1"));
        assert!(text.contains("spillway_build_info"));
        assert!(text.contains(r#"spillway_queue_depth{route="fresh",state="queued"} 0"#));
        // Jobs of a route no longer configured stay visible, marked orphaned.
        assert!(text.contains(r#"spillway_queue_depth{route="orphan",state="retrying"} 1"#));
        assert!(text.contains(r#"spillway_queue_orphaned{route="orphan"} 1"#));
        assert!(!text.contains(r#"spillway_queue_orphaned{route="ok"}"#));

        // A route gone from the config with nothing stored stops being reported; one
        // with jobs stored turns orphaned.
        let (_, text) = m.scrape(Some(&store), &Routes(vec!["orphan"]), None).await;
        assert!(!text.contains(r#"route="fresh""#), "{text}");
        assert!(text.contains(r#"spillway_queue_orphaned{route="ok"} 1"#));
        assert!(!text.contains(r#"spillway_queue_orphaned{route="orphan"}"#));
    }

    #[test]
    fn dead_reasons_are_a_fixed_vocabulary() {
        use crate::config::FailureClass;
        let st = Some(UpstreamOutcome::Status(400));
        assert_eq!(dead_reason(st, "status 400"), "non_retryable_status");
        assert_eq!(dead_reason(st, "max_attempts (status 503)"), "max_attempts");
        assert_eq!(dead_reason(None, "max_age"), "max_age");
        assert_eq!(dead_reason(None, "crash_loop"), "crash_loop");
        assert_eq!(dead_reason(None, "unsendable: bad uri"), "unsendable");
        assert_eq!(
            dead_reason(Some(UpstreamOutcome::Failed(FailureClass::Reset)), "reset"),
            "non_retryable_failure"
        );
    }

    #[test]
    fn a_failed_reload_counts_and_clears_the_success_flag() {
        let m = Metrics::new();
        m.config_reloaded(false);
        assert_eq!(m.config_reload_errors.get(), 1);
        assert_eq!(m.config_last_reload_successful.get(), 0);
        assert!(m.config_last_reload_success.get() > 0.0);
    }
}
