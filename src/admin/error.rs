//! `AdminError`: the one place admin failures become responses, each a JSON
//! `{"error": code, "message": ...}` with a status that says whose fault it is.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::queue::{JobId, JobState, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// No token, or the wrong one; `invalid` when one was sent.
    #[error("{message}")]
    Unauthorized { message: String, invalid: bool },
    #[error("no job {0}")]
    JobNotFound(JobId),
    #[error("no route named {0:?} in the loaded config")]
    RouteNotFound(String),
    #[error("route {0:?} is a passthrough route; only deferrable routes have a queue")]
    NotDeferrable(String),
    #[error("no deferrable route is configured, so there is no job queue")]
    NoQueue,
    #[error("{0}")]
    BadQuery(String),
    #[error(
        "{0:?} is not a job id (expected a UUID such as 0192f3a4-5b6c-7d8e-9f01-23456789abcd)"
    )]
    BadJobId(String),
    #[error("job {id} is {state}; only dead or retrying jobs can be retried")]
    NotRetryable { id: JobId, state: JobState },
    #[error("no such admin endpoint: {0}")]
    NoEndpoint(String),
    #[error("this endpoint does not take {0}")]
    MethodNotAllowed(String),
    #[error("{0}")]
    Store(#[from] StoreError),
}

impl AdminError {
    pub fn code(&self) -> &'static str {
        match self {
            AdminError::Unauthorized { .. } => "unauthorized",
            AdminError::JobNotFound(_) => "job_not_found",
            AdminError::RouteNotFound(_) => "route_not_found",
            AdminError::NotDeferrable(_) => "not_deferrable",
            AdminError::NoQueue => "no_queue",
            AdminError::BadQuery(_) => "bad_request",
            AdminError::BadJobId(_) => "bad_job_id",
            AdminError::NotRetryable { .. } => "not_retryable",
            AdminError::NoEndpoint(_) => "not_found",
            AdminError::MethodNotAllowed(_) => "method_not_allowed",
            AdminError::Store(e) => match e {
                StoreError::NotFound => "job_not_found",
                StoreError::Busy => "storage_busy",
                StoreError::Full => "storage_full",
                StoreError::Sealed(_) => "job_sealed",
                StoreError::Unsupported(_) => "not_supported_by_backend",
                StoreError::Unavailable(_)
                | StoreError::Corrupt { .. }
                | StoreError::NewerSchema { .. }
                | StoreError::AlreadyOpen { .. }
                | StoreError::Closed => "storage_unavailable",
            },
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            AdminError::Unauthorized { .. } => StatusCode::UNAUTHORIZED,
            AdminError::JobNotFound(_)
            | AdminError::RouteNotFound(_)
            | AdminError::NoQueue
            | AdminError::NoEndpoint(_) => StatusCode::NOT_FOUND,
            AdminError::NotDeferrable(_) | AdminError::NotRetryable { .. } => StatusCode::CONFLICT,
            AdminError::BadQuery(_) | AdminError::BadJobId(_) => StatusCode::BAD_REQUEST,
            AdminError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            AdminError::Store(StoreError::NotFound) => StatusCode::NOT_FOUND,
            AdminError::Store(StoreError::Unsupported(_)) => StatusCode::NOT_IMPLEMENTED,
            AdminError::Store(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

impl IntoResponse for AdminError {
    fn into_response(self) -> Response {
        let status = self.status();
        if status.is_server_error() {
            tracing::warn!(error = %self, "admin request failed");
        }
        let code = self.code();
        let mut rsp = (
            status,
            Json(json!({ "error": code, "message": self.to_string() })),
        )
            .into_response();
        let h = rsp.headers_mut();
        h.insert("spillway-error", HeaderValue::from_static(code));
        match &self {
            AdminError::Unauthorized { invalid, .. } => {
                let challenge = if *invalid {
                    r#"Bearer realm="spillway", error="invalid_token""#
                } else {
                    r#"Bearer realm="spillway""#
                };
                h.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static(challenge),
                );
            }
            AdminError::Store(StoreError::Busy) => {
                h.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            // Asking again does not help a backend that cannot do it.
            AdminError::Store(StoreError::Unsupported(_)) => {}
            AdminError::Store(_) if status.is_server_error() => {
                h.insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
            }
            _ => {}
        }
        rsp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_errors_map_to_codes_once() {
        let cases = [
            (
                StoreError::Unavailable("disk".into()),
                503,
                "storage_unavailable",
            ),
            (StoreError::Closed, 503, "storage_unavailable"),
            (StoreError::Busy, 503, "storage_busy"),
            (StoreError::Sealed("job x: key".into()), 503, "job_sealed"),
            (StoreError::NotFound, 404, "job_not_found"),
            (
                StoreError::Unsupported("x".into()),
                501,
                "not_supported_by_backend",
            ),
        ];
        for (e, status, code) in cases {
            let e = AdminError::from(e);
            assert_eq!(e.status().as_u16(), status);
            assert_eq!(e.code(), code);
        }
    }

    #[test]
    fn unauthorized_carries_a_bearer_challenge() {
        let rsp = AdminError::Unauthorized {
            message: "x".into(),
            invalid: true,
        }
        .into_response();
        assert_eq!(rsp.status(), 401);
        let challenge = rsp.headers()[header::WWW_AUTHENTICATE].to_str().unwrap();
        assert!(challenge.starts_with("Bearer"));
        assert!(challenge.contains("invalid_token"));
    }
}
