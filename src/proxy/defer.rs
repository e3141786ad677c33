//! The accept path of deferrable routes: build a job from the buffered request, store it
//! durably, and only then answer `202 Accepted`. A refused store is a `503`, never a `202`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response, StatusCode};
use sha2::{Digest, Sha256};
use tokio::sync::Notify;
use tracing::Instrument;

use super::rescue::{error_response, full};
use super::Body;
use crate::config::RouteConfig;
use crate::metrics::Metrics;
use crate::queue::{Durable, EnqueueOutcome, JobId, JobStore, NewJob, StoreError};

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Shared by every deferrable route: the store, where the admin API lives (for
/// `Location`), and the dispatchers to wake.
pub struct Deferrer {
    pub store: Arc<dyn JobStore>,
    pub admin_base: String,
    pub wake: HashMap<String, Arc<Notify>>,
}

impl Deferrer {
    /// `req` is already rewritten to its upstream (absolute URI, hop-by-hop headers gone).
    pub async fn accept(
        &self,
        route: &RouteConfig,
        req: Request<Bytes>,
        metrics: &Metrics,
    ) -> Response<Body> {
        let span = tracing::info_span!(
            "proxy.accept",
            otel.kind = "producer",
            route = %route.name,
            job_id = tracing::field::Empty,
        );
        let rsp = self
            .store(route, req, metrics, &span)
            .instrument(span.clone())
            .await;
        if let Some(code) = rsp
            .headers()
            .get("spillway-error")
            .and_then(|v| v.to_str().ok())
        {
            metrics.rejected(&route.name, code);
        }
        rsp
    }

    async fn store(
        &self,
        route: &RouteConfig,
        req: Request<Bytes>,
        metrics: &Metrics,
        span: &tracing::Span,
    ) -> Response<Body> {
        let (parts, body) = req.into_parts();
        let key_header = &route.idempotency.header;
        let id = JobId::new();
        // Without the client's key, the job's own id is its key: the store then needs no
        // row for the key (see `Job::key_is_generated`).
        let idempotency_key = parts
            .headers
            .get(key_header)
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty())
            .map_or_else(|| id.to_string(), str::to_owned);
        let ordering_key = route.ordering.as_ref().and_then(|o| {
            parts
                .headers
                .get(&o.key_header)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        });
        // When spans are exported, deliveries become children of this accept span; else
        // they carry the client's own traceparent.
        let traceparent = crate::telemetry::traceparent(span).or_else(|| {
            parts
                .headers
                .get("traceparent")
                .and_then(|v| v.to_str().ok())
                .filter(|v| v.len() <= 512)
                .map(str::to_owned)
        });
        let uri = parts.uri.to_string();
        let mut fp = Sha256::new();
        fp.update(parts.method.as_str());
        fp.update([0]);
        fp.update(parts.uri.path_and_query().map_or("/", |p| p.as_str()));
        fp.update([0]);
        fp.update(&body);
        // Host and framing are set again at delivery from the URI and the stored body.
        let headers = parts
            .headers
            .iter()
            .filter(|(k, _)| *k != header::HOST && *k != header::CONTENT_LENGTH && *k != key_header)
            .map(|(k, v)| (k.as_str().to_owned(), v.as_bytes().to_vec()))
            .collect();
        let job = NewJob {
            id,
            route: route.name.clone(),
            method: parts.method.to_string(),
            uri,
            headers,
            body,
            traceparent,
            idempotency_key: idempotency_key.clone(),
            fingerprint: fp.finalize().into(),
            created_at_ms: now_ms(),
            ordering_key,
        };
        let window = u64::try_from(route.idempotency.dedupe_window.as_millis()).unwrap_or(u64::MAX);
        match self.store.enqueue(job, window, route.queue.max_depth).await {
            Ok(EnqueueOutcome::Stored(id)) => {
                if let Some(w) = self.wake.get(&route.name) {
                    w.notify_one();
                }
                metrics.enqueued(&route.name, false);
                span.record("job_id", tracing::field::display(id.get()));
                self.accepted(&id, &idempotency_key, false)
            }
            Ok(EnqueueOutcome::Duplicate(id)) => {
                metrics.enqueued(&route.name, true);
                span.record("job_id", tracing::field::display(id.get()));
                self.accepted(&id, &idempotency_key, true)
            }
            Ok(EnqueueOutcome::KeyConflict(original)) => error_response(
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency_key_mismatch",
                &format!(
                    "idempotency key {idempotency_key:?} was used by job {original} for a different request"
                ),
                None,
                false,
            ),
            Ok(EnqueueOutcome::QueueFull) => error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "queue_full",
                &format!("route {} holds its max_depth of {} jobs", route.name, route.queue.max_depth),
                Some(std::time::Duration::from_secs(5)),
                false,
            ),
            Err(StoreError::Busy) => error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                "storage_busy",
                "too many accepts are waiting for the disk; nothing was stored",
                Some(std::time::Duration::from_secs(1)),
                false,
            ),
            Err(e) => {
                tracing::error!(route = %route.name, error = %e, "could not store a deferred request");
                error_response(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "storage_unavailable",
                    &format!("the request was not stored: {e}"),
                    Some(std::time::Duration::from_secs(5)),
                    false,
                )
            }
        }
    }

    /// The only way to write a 202: it takes proof that the job is durable.
    fn accepted(&self, id: &Durable<JobId>, key: &str, replayed: bool) -> Response<Body> {
        let id = id.get().to_string();
        // A job id is a UUID: nothing in it needs JSON escaping.
        let body = format!(r#"{{"job_id":"{id}","status":"queued"}}"#);
        let mut rsp = Response::new(full(Bytes::from(body)));
        *rsp.status_mut() = StatusCode::ACCEPTED;
        let h = rsp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Ok(v) = HeaderValue::from_str(&format!("{}/jobs/{id}", self.admin_base)) {
            h.insert(header::LOCATION, v);
        }
        if let Ok(v) = HeaderValue::from_str(&id) {
            h.insert("spillway-job-id", v);
        }
        if let Ok(v) = HeaderValue::from_str(key) {
            h.insert("spillway-idempotency-key", v);
        }
        if replayed {
            h.insert("idempotent-replayed", HeaderValue::from_static("true"));
        }
        rsp
    }
}
