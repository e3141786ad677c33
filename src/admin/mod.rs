//! The admin listener: health and readiness, the jobs and routes API, and the loaded
//! config. It reads and changes jobs only through [`JobStore`]; every error is a JSON
//! [`AdminError`]; every endpoint but `/healthz` and `/readyz` sits behind the bearer
//! token when one is set.

pub mod auth;
pub mod config;
pub mod error;
pub mod jobs;
pub mod redact;
pub mod routes;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use axum::extract::State;
use axum::http::{Method, StatusCode, Uri};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;

use crate::config::Config;
use crate::proxy::Proxy;
use crate::queue::JobStore;
use crate::reload::Runtime;
pub use auth::Auth;
pub use error::AdminError;

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

/// What the admin handlers share.
#[derive(Clone)]
pub struct AdminState {
    pub ready: Readiness,
    /// The config in force (it follows reloads), the proxy (circuit states), the store
    /// (`None` when no route is deferrable: job endpoints answer `no_queue`) and the
    /// dispatchers to wake.
    pub runtime: Arc<Runtime>,
    pub auth: Auth,
}

impl AdminState {
    pub(crate) fn config(&self) -> Arc<Config> {
        self.runtime.config()
    }

    pub(crate) fn store(&self) -> Result<&Arc<dyn JobStore>, AdminError> {
        self.runtime.store().ok_or(AdminError::NoQueue)
    }

    pub(crate) fn proxy(&self) -> &Arc<Proxy> {
        self.runtime.proxy()
    }

    /// Lets the route's dispatcher look at its queue now rather than at its next timer.
    pub(crate) async fn wake(&self, route: &str) {
        self.runtime.wake(route).await;
    }
}

pub fn router(state: AdminState) -> Router {
    let auth = state.auth.clone();
    let scrape = crate::metrics::Scrape {
        metrics: state.runtime.metrics().clone(),
        store: state.runtime.store().cloned(),
        source: state.runtime.proxy().clone(),
    };
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", crate::metrics::endpoint(scrape))
        .route("/readyz", get(readyz))
        .route("/config", get(config::show))
        .route("/jobs", get(jobs::list))
        .route("/jobs/{id}", get(jobs::show).delete(jobs::delete))
        .route("/jobs/{id}/retry", post(jobs::retry))
        .route("/routes", get(routes::list))
        .route("/routes/{name}/pause", post(routes::pause))
        .route("/routes/{name}/resume", post(routes::resume))
        .route("/routes/{name}/replay-dead", post(routes::replay_dead))
        .fallback(|uri: Uri| async move { AdminError::NoEndpoint(uri.path().to_owned()) })
        .method_not_allowed_fallback(|method: Method| async move {
            AdminError::MethodNotAllowed(method.to_string())
        })
        .with_state(state)
        // Outermost, so it covers every endpoint, the fallbacks and any route added
        // above later; only the health endpoints are exempt.
        .layer(axum::middleware::from_fn_with_state(auth, auth::require))
}

async fn healthz() -> Json<serde_json::Value> {
    Json(json!({ "status": "alive" }))
}

async fn readyz(State(st): State<AdminState>) -> (StatusCode, Json<serde_json::Value>) {
    let storage_ok = st.runtime.store().is_none_or(|s| s.healthy());
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

/// A Unix time in milliseconds as RFC 3339 UTC with milliseconds.
pub(crate) fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}
