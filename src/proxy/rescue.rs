//! The one place errors become responses: status, `Spillway-Error`, JSON body and,
//! where the client should come back later, `Retry-After`.

use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::BodyExt;

use super::Body;
use crate::config::FailureClass;

/// Why spillway answered a request itself.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no route matches {0}")]
    NoRoute(String),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    HostMismatch(String),
    #[error("the request body is larger than {limit} bytes")]
    BodyTooLarge { limit: u64 },
    #[error("the request headers are larger than {limit} bytes")]
    HeadersTooLarge { limit: u64 },
    #[error("the request body did not arrive within {0:?}")]
    BodyTimeout(Duration),
    #[error("the route's rate limit is reached")]
    RateLimited { retry_after: Duration },
    #[error("the upstream's circuit breaker is open after repeated failures")]
    CircuitOpen { retry_after: Duration },
    #[error("the upstream did not answer within {0:?}")]
    UpstreamTimeout(Duration),
    #[error("cannot connect to the upstream: {0}")]
    UpstreamConnect(String),
    #[error("the upstream connection failed: {0}")]
    UpstreamReset(String),
    #[error("{0}")]
    DestinationDenied(String),
    #[error("too many open tunnels")]
    Overloaded,
    #[error("{0}")]
    NotImplemented(&'static str),
}

impl ProxyError {
    /// The failure class that `retry_on` and the breaker see, for upstream failures.
    pub fn failure_class(&self) -> Option<FailureClass> {
        match self {
            ProxyError::UpstreamTimeout(_) => Some(FailureClass::Timeout),
            ProxyError::UpstreamConnect(_) => Some(FailureClass::ConnectFailure),
            ProxyError::UpstreamReset(_) => Some(FailureClass::Reset),
            _ => None,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            ProxyError::NoRoute(_) => "no_route",
            ProxyError::BadRequest(_) => "bad_request",
            ProxyError::HostMismatch(_) => "host_mismatch",
            ProxyError::BodyTooLarge { .. } => "body_too_large",
            ProxyError::HeadersTooLarge { .. } => "headers_too_large",
            ProxyError::BodyTimeout(_) => "body_timeout",
            ProxyError::RateLimited { .. } => "rate_limited",
            ProxyError::CircuitOpen { .. } => "circuit_open",
            ProxyError::UpstreamTimeout(_) => "upstream_timeout",
            ProxyError::UpstreamConnect(_) => "upstream_connect",
            ProxyError::UpstreamReset(_) => "upstream_reset",
            ProxyError::DestinationDenied(_) => "destination_denied",
            ProxyError::Overloaded => "overloaded",
            ProxyError::NotImplemented(_) => "not_implemented",
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::NoRoute(_) | ProxyError::DestinationDenied(_) => StatusCode::FORBIDDEN,
            ProxyError::BadRequest(_) | ProxyError::HostMismatch(_) => StatusCode::BAD_REQUEST,
            ProxyError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::HeadersTooLarge { .. } => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ProxyError::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ProxyError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::CircuitOpen { .. } | ProxyError::Overloaded => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            ProxyError::UpstreamTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::UpstreamConnect(_) | ProxyError::UpstreamReset(_) => {
                StatusCode::BAD_GATEWAY
            }
            ProxyError::NotImplemented(_) => StatusCode::NOT_IMPLEMENTED,
        }
    }

    fn retry_after(&self) -> Option<Duration> {
        match self {
            ProxyError::RateLimited { retry_after } | ProxyError::CircuitOpen { retry_after } => {
                Some(*retry_after)
            }
            ProxyError::Overloaded => Some(Duration::from_secs(1)),
            _ => None,
        }
    }

    /// Whether the connection should close after this answer (the request body may be
    /// unread, or the client is misbehaving).
    fn closes(&self) -> bool {
        matches!(
            self,
            ProxyError::BodyTooLarge { .. }
                | ProxyError::HeadersTooLarge { .. }
                | ProxyError::BodyTimeout(_)
                | ProxyError::BadRequest(_)
                | ProxyError::HostMismatch(_)
        )
    }

    pub fn into_response(self) -> Response<Body> {
        error_response(
            self.status(),
            self.code(),
            &self.to_string(),
            self.retry_after(),
            self.closes(),
        )
    }
}

/// A JSON error answer with `Spillway-Error`, so apps can tell ours from the upstream's.
pub fn error_response(
    status: StatusCode,
    code: &'static str,
    message: &str,
    retry_after: Option<Duration>,
    close: bool,
) -> Response<Body> {
    let body = serde_json::json!({ "error": code, "message": message }).to_string();
    let mut rsp = Response::new(full(Bytes::from(body)));
    *rsp.status_mut() = status;
    let h = rsp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert("spillway-error", HeaderValue::from_static(code));
    if let Some(after) = retry_after {
        // Round up: a client that comes back early only meets the same refusal.
        let secs = after.as_secs() + u64::from(after.subsec_nanos() > 0);
        h.insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
    }
    if close {
        h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    rsp
}

pub fn full(bytes: Bytes) -> Body {
    http_body_util::Full::new(bytes)
        .map_err(|never| match never {})
        .boxed_unsync()
}
