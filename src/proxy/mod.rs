//! The app-facing proxy: normalise the target, pick a route, buffer the body under the
//! limits, then hand the request to the route's stack; every refusal goes through
//! `rescue`. The data flow is drawn in `lib.rs`.

pub mod defer;
pub mod egress;
pub mod framing;
pub mod headers;
pub mod passthrough;
pub mod rescue;
pub mod route;
pub mod server;
pub mod stack;
pub mod target;
pub mod tunnel;

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, Uri};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use tokio::time::Instant;
use tracing::Instrument;

use crate::client::HttpClient;
use crate::config::{Config, RouteConfig, Unmatched};
use crate::metrics::{Metrics, Mode, UNMATCHED};
pub use passthrough::CircuitState;
use passthrough::{Attempts, BoxHttp, Circuits};
use rescue::ProxyError;
use route::RouteTable;
use target::{Target, TargetError};

/// The body type of every response the proxy writes.
pub type Body = http_body_util::combinators::UnsyncBoxBody<Bytes, tower::BoxError>;

/// What a matched route does with a request.
#[derive(Clone)]
pub enum Handler {
    Passthrough(BoxHttp),
    /// Answer 202 once stored; delivery happens later.
    Deferred,
}

/// Everything the request path shares, built once from a [`Config`]; the route table
/// is swapped whole on a config reload.
pub struct Proxy {
    table: ArcSwap<Table>,
    client: HttpClient,
    tunnels: Arc<tokio::sync::Semaphore>,
    /// Breakers of the current passthrough routes; kept across reloads with their routes.
    circuits: Circuits,
    metrics: Arc<Metrics>,
}

/// What a reload replaces: a request loads it once, so it sees one config throughout.
struct Table {
    routes: RouteTable<Handler>,
    unmatched: Option<BoxHttp>,
    limits: crate::config::Limits,
    egress: Arc<crate::config::Egress>,
    deferrer: Option<Arc<defer::Deferrer>>,
}

impl Table {
    /// `keep` hands back a passthrough route's running stack (breaker, rate limiter and
    /// retry budget state included) when its config did not change.
    fn build(
        config: &Config,
        client: &HttpClient,
        deferrer: Option<Arc<defer::Deferrer>>,
        circuits: &Circuits,
        metrics: &Arc<Metrics>,
        keep: impl Fn(&str) -> Option<Handler>,
    ) -> Table {
        let routes = config
            .routes
            .iter()
            .map(|r| {
                let h = if r.deferrable {
                    Handler::Deferred
                } else {
                    keep(&r.name).unwrap_or_else(|| {
                        Handler::Passthrough(passthrough::mk_passthrough(
                            r,
                            client.clone(),
                            circuits,
                            metrics,
                        ))
                    })
                };
                (r.clone(), h)
            })
            .collect();
        // The client chose this destination: its own pool, every address checked.
        let egress = Arc::new(config.egress.clone());
        let unmatched = (config.unmatched == Unmatched::Passthrough).then(|| {
            let guarded = client.guarded(egress::Guard::new(egress.clone(), false));
            passthrough::mk_unmatched(Duration::from_secs(30), guarded, metrics)
        });
        Table {
            routes: RouteTable::new(routes),
            unmatched,
            limits: config.limits.clone(),
            egress,
            deferrer,
        }
    }
}

impl Proxy {
    /// `metrics` is the registry the admin listener exports; the routes' stacks report
    /// into it from when they are built.
    pub fn new(
        config: &Config,
        client: HttpClient,
        deferrer: Option<Arc<defer::Deferrer>>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let circuits = Circuits::default();
        let table = Table::build(config, &client, deferrer, &circuits, &metrics, |_| None);
        Proxy {
            table: ArcSwap::from_pointee(table),
            client,
            tunnels: Arc::new(tokio::sync::Semaphore::new(config.limits.max_tunnels)),
            circuits,
            metrics,
        }
    }

    /// Replaces routes, limits and the unmatched policy for every request that starts
    /// after this returns; requests in progress finish on the table they started with.
    /// Passthrough routes named in `unchanged` keep their running stack and its state.
    pub fn swap(
        &self,
        config: &Config,
        deferrer: Option<Arc<defer::Deferrer>>,
        unchanged: &std::collections::HashSet<String>,
    ) {
        let old = self.table.load_full();
        let keep = |name: &str| {
            if !unchanged.contains(name) {
                return None;
            }
            old.routes
                .iter()
                .find(|(r, h)| r.name == name && matches!(h, Handler::Passthrough(_)))
                .map(|(_, h)| h.clone())
        };
        let table = Table::build(
            config,
            &self.client,
            deferrer,
            &self.circuits,
            &self.metrics,
            keep,
        );
        // Routes gone, or now deferrable, have no breaker to report.
        self.circuits.retain(|name| {
            table
                .routes
                .iter()
                .any(|(r, h)| r.name == name && matches!(h, Handler::Passthrough(_)))
        });
        self.table.store(Arc::new(table));
    }

    /// The breaker state of a passthrough route that has a `circuit_breaker`; `None`
    /// for other routes. Cheap: one short lock, for the admin API and metrics.
    pub fn circuit_state(&self, route: &str) -> Option<CircuitState> {
        self.circuits.state(route)
    }

    /// Serves one request; never fails (errors become responses here).
    pub async fn serve(self: Arc<Self>, mut req: Request<Incoming>) -> Response<Body> {
        let start = Instant::now();
        let method = req.method().clone();
        let request_id = request_id(&mut req);
        let attempts = Attempts::default();
        let mut route_name = "-".to_owned();
        let mut path = String::new();
        let mut mode = Mode::None;
        let span = tracing::info_span!(
            "proxy.request",
            otel.kind = "server",
            method = %method,
            route = tracing::field::Empty,
            mode = tracing::field::Empty,
            status = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        );
        crate::telemetry::continue_from(&span, req.headers());

        let result = self
            .handle(req, &attempts, &mut route_name, &mut path, &mut mode)
            .instrument(span.clone())
            .await;
        let route_label = if mode == Mode::None {
            crate::metrics::NO_ROUTE
        } else {
            route_name.as_str()
        };
        let mut rsp = match result {
            Ok(rsp) => rsp,
            Err(e) => {
                // Upstream failures are counted per attempt; the rest are refusals.
                if e.failure_class().is_none() {
                    self.metrics.rejected(route_label, e.code());
                }
                e.into_response()
            }
        };
        self.metrics
            .request(route_label, mode, rsp.status().as_u16(), start.elapsed());
        span.record("route", route_label);
        span.record("mode", mode.as_str());
        span.record("status", i64::from(rsp.status().as_u16()));
        if rsp.status().is_server_error() {
            span.record("otel.status_code", "ERROR");
        }
        rsp.headers_mut().insert(X_REQUEST_ID, request_id.clone());
        // Secrets (Authorization, Cookie, query strings) never reach the log.
        tracing::info!(
            target: "spillway::access",
            route = %route_name,
            method = %method,
            path = %path,
            status = rsp.status().as_u16(),
            attempts = attempts.get(),
            duration_ms = start.elapsed().as_secs_f64() * 1000.0,
            request_id = request_id.to_str().unwrap_or("-"),
            "request"
        );
        rsp
    }

    async fn handle(
        &self,
        req: Request<Incoming>,
        attempts: &Attempts,
        route_name: &mut String,
        log_path: &mut String,
        mode: &mut Mode,
    ) -> Result<Response<Body>, ProxyError> {
        let table = self.table.load_full();
        // Before anything else reads the request: an ambiguous frame is never routed.
        if req.extensions().get::<framing::AmbiguousFrame>().is_some() {
            return Err(ProxyError::BadRequest(
                "a request may not carry both Transfer-Encoding and Content-Length".into(),
            ));
        }
        if let Some(why) = headers::framing_error(req.version(), req.headers()) {
            return Err(ProxyError::BadRequest(why.to_owned()));
        }
        let target = target::normalise(&req).map_err(|e| match e {
            TargetError::HostMismatch { .. } => ProxyError::HostMismatch(e.to_string()),
            TargetError::Invalid(m) => ProxyError::BadRequest(m.to_owned()),
        })?;
        log_path.push_str(target.path());

        if headers::header_bytes(req.headers()) > table.limits.max_header_bytes {
            return Err(ProxyError::HeadersTooLarge {
                limit: table.limits.max_header_bytes,
            });
        }

        if target.connect {
            let port = target.port.unwrap_or(443);
            let (route, _) = table
                .routes
                .find_connect(&target.host, port)
                .ok_or_else(|| ProxyError::NoRoute(format!("CONNECT {}", target.authority())))?;
            route_name.clone_from(&route.name);
            *mode = Mode::Connect;
            // The route names the host, but its address comes from DNS: checked too.
            let guard = egress::Guard::new(table.egress.clone(), route.allow_private);
            return tunnel::connect(req, &target, &self.tunnels, &table.limits, &guard).await;
        }

        let found = table.routes.find(&target, req.method());
        let (route, handler) = match found {
            Some((route, handler)) => (Some(route), handler.clone()),
            None => match &table.unmatched {
                Some(svc) if !target.host.is_empty() => (None, Handler::Passthrough(svc.clone())),
                _ => {
                    return Err(ProxyError::NoRoute(format!(
                        "{} {}{}",
                        req.method(),
                        target.authority(),
                        target.path()
                    )))
                }
            },
        };
        if let Some(r) = route {
            route_name.clone_from(&r.name);
        } else {
            // Replaces the "-" an unrouted request is logged with.
            UNMATCHED.clone_into(route_name);
        }
        *mode = match handler {
            Handler::Passthrough(_) => Mode::Passthrough,
            Handler::Deferred => Mode::Deferred,
        };

        let mut upstream_req = buffer(req, &table.limits).await?;
        rewrite(&mut upstream_req, route.map(|r| &**r), &target)?;

        let svc = match (handler, route, &table.deferrer) {
            (Handler::Passthrough(svc), _, _) => svc,
            (Handler::Deferred, Some(route), Some(deferrer)) => {
                return Ok(deferrer.accept(route, upstream_req, &self.metrics).await);
            }
            (Handler::Deferred, _, _) => {
                return Err(ProxyError::NotImplemented(
                    "deferral needs storage, which is not open",
                ));
            }
        };
        upstream_req.extensions_mut().insert(attempts.clone());

        let mut svc = svc;
        use tower::{Service, ServiceExt};
        let mut rsp = svc.ready().await?.call(upstream_req).await?;
        headers::strip_hop_by_hop(rsp.headers_mut());
        Ok(rsp)
    }

    /// `limits.max_requests_per_connection` of the current config, read when a
    /// connection opens.
    pub fn max_requests_per_connection(&self) -> u64 {
        self.table.load().limits.max_requests_per_connection
    }

    /// Routes a list of names and modes, for logs at startup.
    pub fn route_names(&self) -> Vec<String> {
        let table = self.table.load();
        table.routes.iter().map(|(r, _)| r.name.clone()).collect()
    }
}

/// Reads the whole body under `max_body_bytes` and the body deadline, so that a
/// request is refused before any byte of it reaches an upstream.
async fn buffer(
    req: Request<Incoming>,
    limits: &crate::config::Limits,
) -> Result<Request<Bytes>, ProxyError> {
    let limit = limits.max_body_bytes;
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(ProxyError::BodyTooLarge { limit });
    }
    let (parts, body) = req.into_parts();
    let limited = Limited::new(body, usize::try_from(limit).unwrap_or(usize::MAX));
    let deadline = limits.body_read_timeout;
    let collected = tokio::time::timeout(deadline, limited.collect())
        .await
        .map_err(|_| ProxyError::BodyTimeout(deadline))?
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                ProxyError::BodyTooLarge { limit }
            } else {
                ProxyError::BadRequest(format!("the request body could not be read: {e}"))
            }
        })?;
    Ok(Request::from_parts(parts, collected.to_bytes()))
}

/// Points the request at its upstream: absolute URI, `Host` = the upstream's authority,
/// hop-by-hop headers gone.
fn rewrite(
    req: &mut Request<Bytes>,
    route: Option<&RouteConfig>,
    target: &Target,
) -> Result<(), ProxyError> {
    headers::strip_hop_by_hop(req.headers_mut());
    let len = req.body().len();
    headers::reframe(req.headers_mut(), len);
    let bad_path = || ProxyError::BadRequest("the request path cannot be forwarded".into());
    let (uri, host) = match route {
        // The common case, no base path: the request's own path and query, already
        // parsed, go on as they are.
        Some(r) if r.upstream.base_path.is_empty() => {
            let up = &r.upstream;
            let mut parts = http::uri::Parts::default();
            parts.scheme = up.url.scheme().cloned();
            parts.authority = Some(up.authority.clone());
            parts.path_and_query = Some(match req.uri().path_and_query() {
                Some(p) => p.clone(),
                None => http::uri::PathAndQuery::from_static("/"),
            });
            let uri = Uri::from_parts(parts).map_err(|_| bad_path())?;
            (uri, HeaderValue::from_str(up.authority.as_str()))
        }
        Some(r) => {
            let up = &r.upstream;
            let uri = format!(
                "{}://{}{}{}",
                up.scheme.as_str(),
                up.authority,
                up.base_path,
                target.path_and_query
            );
            let uri = uri.parse::<Uri>().map_err(|_| bad_path())?;
            (uri, HeaderValue::from_str(up.authority.as_str()))
        }
        None => {
            let auth = target.authority();
            let uri = format!("http://{auth}{}", target.path_and_query);
            let uri = uri.parse::<Uri>().map_err(|_| bad_path())?;
            (uri, HeaderValue::from_str(&auth))
        }
    };
    *req.uri_mut() = uri;
    let host =
        host.map_err(|_| ProxyError::BadRequest("the upstream host is not a valid header".into()))?;
    req.headers_mut().insert(header::HOST, host);
    // The upstream speaks whatever version the pool negotiates.
    *req.version_mut() = http::Version::HTTP_11;
    Ok(())
}

const X_REQUEST_ID: http::HeaderName = http::HeaderName::from_static("x-request-id");

/// The client's `X-Request-Id`, or a new one, set on the request so it travels upstream;
/// returned for the answer and the access log.
fn request_id<B>(req: &mut Request<B>) -> HeaderValue {
    if let Some(v) = req
        .headers()
        .get(&X_REQUEST_ID)
        .filter(|v| v.to_str().is_ok_and(|s| !s.is_empty() && s.len() <= 128))
    {
        return v.clone();
    }
    let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
    let id = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut buf);
    // A UUID is always a valid header value; the fallback only keeps this panic-free.
    let v = HeaderValue::from_str(id).unwrap_or(HeaderValue::from_static("-"));
    req.headers_mut().insert(X_REQUEST_ID, v.clone());
    v
}

impl crate::metrics::ScrapeSource for Proxy {
    fn queue_routes(&self) -> Vec<String> {
        let table = self.table.load();
        table
            .routes
            .iter()
            .filter(|(r, _)| r.deferrable)
            .map(|(r, _)| r.name.clone())
            .collect()
    }

    fn circuits(&self) -> Vec<(String, CircuitState)> {
        let table = self.table.load();
        table
            .routes
            .iter()
            .filter_map(|(r, _)| Some((r.name.clone(), self.circuit_state(&r.name)?)))
            .collect()
    }
}
