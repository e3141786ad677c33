//! The admin listener: health, readiness and metrics now; jobs and routes join it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;

use crate::queue::JobStore;

/// Ready once listeners and storage are up; false again while draining.
#[derive(Clone, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    pub fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::SeqCst);
    }
    pub fn get(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

#[derive(Clone)]
struct AdminState {
    ready: Readiness,
    store: Option<Arc<dyn JobStore>>,
}

pub fn router(
    ready: Readiness,
    store: Option<Arc<dyn JobStore>>,
    metrics: crate::metrics::Scrape,
) -> Router {
    Router::new()
        .route("/metrics", crate::metrics::endpoint(metrics))
        .route(
            "/healthz",
            get(|| async { Json(json!({ "status": "alive" })) }),
        )
        .route("/readyz", get(readyz))
        .fallback(|| async {
            (
                StatusCode::NOT_FOUND,
                Json(json!({ "error": "not_found", "message": "no such admin endpoint" })),
            )
        })
        .with_state(AdminState { ready, store })
}

async fn readyz(State(st): State<AdminState>) -> (StatusCode, Json<serde_json::Value>) {
    let storage_ok = st.store.as_ref().is_none_or(|s| s.healthy());
    if !storage_ok {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "not_ready", "reason": "storage_unavailable" })),
        );
    }
    if st.ready.get() {
        (StatusCode::OK, Json(json!({ "status": "ready" })))
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "not_ready" })),
        )
    }
}
