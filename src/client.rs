//! The outbound HTTP client (hyper-util pool + rustls with the ring provider), shared by
//! passthrough routes and, later, delivery. Errors are classified when they are made.

use std::error::Error as _;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::config::FailureClass;
use crate::proxy::Body;

/// Why an attempt produced no response.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct SendError {
    pub class: FailureClass,
    pub message: String,
}

#[derive(Clone)]
pub struct HttpClient {
    inner: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
}

impl HttpClient {
    /// Builds the pooled client. TLS uses the ring provider explicitly, so the
    /// process never depends on rustls guessing a default provider.
    pub fn new() -> Result<Self, rustls::Error> {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(Duration::from_secs(5)));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_provider_and_webpki_roots(provider)?
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let inner = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(64)
            .timer(TokioTimer::new())
            .build(https);
        Ok(HttpClient { inner })
    }

    /// Sends one request whose URI is absolute; the response body streams.
    pub async fn send(&self, req: Request<Bytes>) -> Result<Response<Body>, SendError> {
        let req = req.map(Full::new);
        match self.inner.request(req).await {
            Ok(rsp) => Ok(rsp.map(|b| b.map_err(Into::into).boxed_unsync())),
            Err(e) => Err(classify(&e)),
        }
    }
}

fn classify(e: &hyper_util::client::legacy::Error) -> SendError {
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    // A connect error means no byte of the request left this process.
    let class = if e.is_connect() {
        FailureClass::ConnectFailure
    } else {
        FailureClass::Reset
    };
    SendError { class, message }
}
