//! The outbound HTTP client, shared by passthrough routes, delivery and the CLI: plain
//! HTTP/1 upstreams go through our own pool ([`h1`]), everything else (TLS, HTTP/2,
//! destinations the egress guard checks) through hyper-util's client with rustls and the
//! ring provider. Errors are classified when they are made.

mod h1;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper_rustls::{ConfigBuilderExt, HttpsConnector};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::config::FailureClass;
use crate::proxy::egress::{find_denied, Denied, Guard, GuardedConnector, GuardedResolver};
use crate::proxy::Body;

/// Why an attempt produced no response.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct SendError {
    pub class: FailureClass,
    pub message: String,
    /// The egress guard refused the destination (guarded clients only); nothing was sent.
    pub denied: Option<Denied>,
}

/// Cheap to clone (one reference count): stacks clone it per request.
#[derive(Clone)]
pub struct HttpClient(Arc<Shared>);

struct Shared {
    inner: Inner,
    /// Plain-HTTP/1 requests of an open client; `None` for a guarded one, whose every
    /// address must pass the guard's connector.
    h1: Option<Arc<h1::H1Pool>>,
    /// Kept so a guarded client can be made without building TLS again.
    tls: Arc<rustls::ClientConfig>,
}

const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
const MAX_IDLE_PER_HOST: usize = 64;

enum Inner {
    /// For routes' own upstreams, used as the operator wrote them.
    Open(Client<HttpsConnector<HttpConnector>, Full<Bytes>>),
    /// For destinations a client chose: every address is checked before connecting.
    Guarded(Client<HttpsConnector<GuardedConnector>, Full<Bytes>>),
}

fn tcp<R: Clone>(mut http: HttpConnector<R>) -> HttpConnector<R> {
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(Duration::from_secs(5)));
    http
}

fn pooled<C>(tls: rustls::ClientConfig, connector: C) -> Client<HttpsConnector<C>, Full<Bytes>>
where
    C: tower::Service<http::Uri> + Clone + Send + Sync + 'static,
    HttpsConnector<C>: hyper_util::client::legacy::connect::Connect,
{
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .enable_http2()
        .wrap_connector(connector);
    Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(IDLE_TIMEOUT)
        .pool_max_idle_per_host(MAX_IDLE_PER_HOST)
        .timer(TokioTimer::new())
        .build(https)
}

impl HttpClient {
    /// Builds the pooled client. TLS uses the ring provider explicitly, so the
    /// process never depends on rustls guessing a default provider.
    pub fn new() -> Result<Self, rustls::Error> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        // ALPN stays empty here: the connector builder sets it (and insists on that).
        let tls = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_webpki_roots()
            .with_no_client_auth();
        let inner = Inner::Open(pooled(tls.clone(), tcp(HttpConnector::new())));
        let h1 = h1::H1Pool::new(tcp(HttpConnector::new()), MAX_IDLE_PER_HOST, IDLE_TIMEOUT);
        Ok(HttpClient(Arc::new(Shared {
            inner,
            h1: Some(Arc::new(h1)),
            tls: Arc::new(tls),
        })))
    }

    /// A client with its own pool whose every connection goes through `guard`: names
    /// are resolved and checked, and the connection uses only the checked addresses.
    /// Its own pool also means a connection opened for a route's upstream is never
    /// reused for a destination a client chose.
    pub fn guarded(&self, guard: Guard) -> HttpClient {
        let http = tcp(HttpConnector::new_with_resolver(GuardedResolver(
            guard.clone(),
        )));
        let inner = Inner::Guarded(pooled(
            (*self.0.tls).clone(),
            GuardedConnector::new(http, guard),
        ));
        HttpClient(Arc::new(Shared {
            inner,
            h1: None,
            tls: self.0.tls.clone(),
        }))
    }

    /// Sends one request whose URI is absolute; the response body streams.
    pub async fn send(&self, req: Request<Bytes>) -> Result<Response<Body>, SendError> {
        if let Some(h1) = self.0.h1.as_ref().filter(|_| h1::H1Pool::carries(&req)) {
            return h1.send(req).await;
        }
        let req = req.map(Full::new);
        let result = match &self.0.inner {
            Inner::Open(c) => c.request(req).await,
            Inner::Guarded(c) => c.request(req).await,
        };
        match result {
            Ok(rsp) => Ok(rsp.map(|b| b.map_err(Into::into).boxed_unsync())),
            Err(e) => Err(classify(&e)),
        }
    }
}

/// An error and its sources, joined by ": ".
fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    message
}

fn classify(e: &hyper_util::client::legacy::Error) -> SendError {
    let message = describe(e);
    // A connect error means no byte of the request left this process.
    let class = if e.is_connect() {
        FailureClass::ConnectFailure
    } else {
        FailureClass::Reset
    };
    let denied = find_denied(e).cloned();
    SendError {
        class,
        message,
        denied,
    }
}
