//! `/routes`: every configured route with its mode, pause state, queue depth, oldest
//! job age, dead letters and circuit state; pause, resume and replay-dead.

use axum::extract::{Path, State};
use axum::Json;
use serde_json::{json, Value};

use super::{rfc3339, AdminError, AdminState};
use std::sync::Arc;

use crate::config::RouteConfig;
use crate::proxy::defer::now_ms;
use crate::queue::JobStore;

pub async fn list(State(st): State<AdminState>) -> Result<Json<Value>, AdminError> {
    let config = st.config();
    let now = now_ms();
    let mut out = Vec::with_capacity(config.routes.len());
    for route in &config.routes {
        out.push(describe(&st, route, now).await?);
    }
    // Jobs whose route a reload removed stay stored; they show here until the route
    // returns (and delivers them) or an operator deletes them.
    let orphans: Vec<String> = st.runtime.orphaned_routes().await?;
    for name in orphans {
        match out.iter_mut().find(|r| r["name"] == name.as_str()) {
            // Configured, but passthrough now: its stored jobs wait for it to be deferrable.
            Some(entry) => {
                entry["orphaned"] = true.into();
                fill_queue(st.store()?, &name, now, entry).await?;
            }
            None => out.push(describe_orphan(&st, &name, now).await?),
        }
    }
    Ok(Json(json!({ "routes": out })))
}

async fn describe_orphan(st: &AdminState, name: &str, now: u64) -> Result<Value, AdminError> {
    let mut v = json!({
        "name": name,
        "mode": "orphaned",
        "orphaned": true,
        "upstream": null,
        "circuit": null,
    });
    fill_queue(st.store()?, name, now, &mut v).await?;
    Ok(v)
}

async fn describe(st: &AdminState, route: &RouteConfig, now: u64) -> Result<Value, AdminError> {
    let mut v = json!({
        "name": route.name,
        "mode": if route.deferrable { "deferrable" } else { "passthrough" },
        "upstream": super::config::redacted_url(&route.upstream.url.to_string()),
        "paused": false,
        "paused_until": null,
        "paused_until_ms": null,
        "depth": null,
        "oldest_queued_age_seconds": null,
        "dead": null,
        "circuit": st.proxy().circuit_state(&route.name).map(|c| c.as_str()),
        "orphaned": false,
    });
    let (true, Some(store)) = (route.deferrable, st.runtime.store()) else {
        return Ok(v);
    };
    fill_queue(store, &route.name, now, &mut v).await?;
    Ok(v)
}

/// Pause state, depth, oldest age and dead count from the store's counters.
async fn fill_queue(
    store: &Arc<dyn JobStore>,
    name: &str,
    now: u64,
    v: &mut Value,
) -> Result<(), AdminError> {
    let (paused, until) = store.route_control(name).await?;
    let stats = store.stats(name).await?;
    // A Retry-After pause that already ran out is history, not state.
    let until = until.filter(|u| *u > now);
    v["paused"] = paused.into();
    v["paused_until"] = until.map(rfc3339).into();
    v["paused_until_ms"] = until.into();
    v["depth"] = json!({
        "queued": stats.queued,
        "in_flight": stats.in_flight,
        "retrying": stats.retrying,
        "total": stats.queued + stats.in_flight + stats.retrying,
    });
    v["oldest_queued_age_seconds"] = stats
        .oldest_queued_created_at_ms
        .map(|c| now.saturating_sub(c) as f64 / 1000.0)
        .into();
    v["dead"] = stats.dead.into();
    v["delivered_kept"] = stats.delivered_kept.into();
    Ok(())
}

/// The name of a configured deferrable route, or of an orphaned one (its jobs are still
/// stored, so pausing and replaying them makes sense), or why it cannot be acted on.
async fn deferrable(st: &AdminState, name: &str) -> Result<(), AdminError> {
    match st.config().route(name) {
        Some(r) if r.deferrable => Ok(()),
        found => {
            if st
                .runtime
                .orphaned_routes()
                .await?
                .iter()
                .any(|o| o == name)
            {
                return Ok(());
            }
            match found {
                None => Err(AdminError::RouteNotFound(name.to_owned())),
                Some(_) => Err(AdminError::NotDeferrable(name.to_owned())),
            }
        }
    }
}

pub async fn pause(
    State(st): State<AdminState>,
    Path(name): Path<String>,
) -> Result<Json<Value>, AdminError> {
    set_paused(st, name, true).await
}

pub async fn resume(
    State(st): State<AdminState>,
    Path(name): Path<String>,
) -> Result<Json<Value>, AdminError> {
    set_paused(st, name, false).await
}

/// Persisted, so a pause survives a restart. Accepting goes on while paused; only
/// delivery stops (attempts already sent finish).
async fn set_paused(st: AdminState, name: String, paused: bool) -> Result<Json<Value>, AdminError> {
    deferrable(&st, &name).await?;
    st.store()?.set_paused(&name, paused).await?;
    if !paused {
        st.wake(&name).await;
    }
    tracing::info!(route = %name, paused, "route pause changed from the admin API");
    Ok(Json(json!({ "route": name, "paused": paused })))
}

pub async fn replay_dead(
    State(st): State<AdminState>,
    Path(name): Path<String>,
) -> Result<Json<Value>, AdminError> {
    deferrable(&st, &name).await?;
    let n = st.store()?.replay_dead(&name, now_ms()).await?;
    if n > 0 {
        st.wake(&name).await;
    }
    tracing::info!(route = %name, replayed = n, "dead jobs replayed from the admin API");
    Ok(Json(json!({ "route": name, "replayed": n })))
}
