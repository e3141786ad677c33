//! `GET /config`: the loaded configuration as JSON, with secrets left out: URL
//! credentials are stripped and the admin token's variable is named, never read.

use std::time::Duration;

use axum::extract::State;
use axum::Json;
use serde_json::{json, Value};

use super::{AdminError, AdminState};
use crate::config::{Config, DenyMode, Jitter, RouteConfig, StorageBackend, Unmatched};

pub async fn show(State(st): State<AdminState>) -> Result<Json<Value>, AdminError> {
    Ok(Json(render(&st.config(), st.auth.enabled())))
}

/// A URL without user or password (the config already refuses them in upstreams;
/// this keeps that true for every URL shown).
pub fn redacted_url(raw: &str) -> String {
    match url::Url::parse(raw) {
        Ok(mut u) if !u.username().is_empty() || u.password().is_some() => {
            let _ = u.set_username("");
            let _ = u.set_password(None);
            u.to_string()
        }
        Ok(_) => raw.to_owned(),
        Err(_) => "[unparsable url]".to_owned(),
    }
}

fn dur(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

pub fn render(c: &Config, token_set: bool) -> Value {
    let storage = &c.storage;
    let l = &c.limits;
    json!({
        "source": c.source.display().to_string(),
        "listen": c.listen.to_string(),
        "admin": {
            "listen": c.admin.listen.to_string(),
            "token_env": c.admin.token_env,
            "token_set": token_set,
        },
        "storage": {
            "backend": match storage.backend { StorageBackend::Redb => "redb", StorageBackend::Nats => "nats" },
            "path": storage.path.display().to_string(),
            "cache_size": storage.cache_size,
            "nats": storage.nats.as_ref().map(|n| json!({
                "url": redacted_url(&n.url),
                "stream": n.stream,
                "replicas": n.replicas,
                "credentials_file": n.credentials_file.as_ref().map(|p| p.display().to_string()),
                "ack_wait": dur(n.ack_wait),
            })),
        },
        "limits": {
            "max_body_bytes": l.max_body_bytes,
            "max_header_bytes": l.max_header_bytes,
            "max_connections": l.max_connections,
            "header_read_timeout": dur(l.header_read_timeout),
            "body_read_timeout": dur(l.body_read_timeout),
            "max_tunnels": l.max_tunnels,
            "tunnel_idle_timeout": dur(l.tunnel_idle_timeout),
            "idle_timeout": dur(l.idle_timeout),
            "max_requests_per_connection": l.max_requests_per_connection,
        },
        "unmatched": match c.unmatched { Unmatched::Reject => "reject", Unmatched::Passthrough => "passthrough" },
        "egress": {
            "deny_private": match c.egress.deny_private { DenyMode::Enforce => "enforce", DenyMode::Report => "report" },
            "allow": c.egress.allow.iter().map(|n| n.to_string()).collect::<Vec<_>>(),
        },
        "shutdown_grace": dur(c.shutdown_grace),
        "redact_headers": c.redact_headers.iter().map(|h| h.as_str()).collect::<Vec<_>>(),
        "routes": c.routes.iter().map(|r| route(r)).collect::<Vec<_>>(),
    })
}

fn route(r: &RouteConfig) -> Value {
    let m = &r.matcher;
    let retry = &r.retry;
    let b = &retry.backoff;
    let mut retry_on: Vec<Value> = retry
        .retry_on
        .failures
        .iter()
        .map(|f| f.as_str().into())
        .collect();
    retry_on.extend(retry.retry_on.statuses.iter().map(|s| (*s).into()));
    retry_on.extend(
        retry
            .retry_on
            .classes
            .iter()
            .map(|c| format!("{c}xx").into()),
    );
    json!({
        "name": r.name,
        "match": {
            "host": m.host.as_ref().map(|h| match h.port {
                Some(p) if h.host.contains(':') => format!("[{}]:{p}", h.host),
                Some(p) => format!("{}:{p}", h.host),
                None => h.host.clone(),
            }),
            "path_prefix": m.path_prefix,
            "methods": m.methods.as_ref().map(|ms| ms.iter().map(|m| m.as_str()).collect::<Vec<_>>()),
        },
        "upstream": redacted_url(&r.upstream.url.to_string()),
        "deferrable": r.deferrable,
        "timeout": dur(r.timeout),
        "concurrency": r.concurrency.get(),
        "rate_limit": r.rate_limit.map(|rl| json!({ "per_second": rl.per_second.get(), "burst": rl.burst.get() })),
        "quotas": r.quotas.iter().map(|q| json!({ "limit": q.limit.get(), "per": dur(q.per) })).collect::<Vec<_>>(),
        "retry": {
            "max_attempts": retry.max_attempts.get(),
            "max_age": retry.max_age.map(dur),
            "retry_on": retry_on,
            "backoff": {
                "initial": dur(b.initial()),
                "max": dur(b.max()),
                "multiplier": b.multiplier(),
                "jitter": match b.jitter() { Jitter::Full => "full", Jitter::Equal => "equal", Jitter::None => "none" },
            },
            "honor_retry_after": retry.honor_retry_after,
        },
        "circuit_breaker": r.circuit_breaker.map(|cb| json!({
            "consecutive_failures": cb.consecutive_failures.get(),
            "open_for": dur(cb.open_for),
        })),
        "idempotency": {
            "header": r.idempotency.header.as_str(),
            "dedupe_window": dur(r.idempotency.dedupe_window),
        },
        "queue": { "max_depth": r.queue.max_depth },
        "ordering": r.ordering.as_ref().map(|o| json!({ "key_header": o.key_header.as_str() })),
        "connect_ports": r.connect_ports,
        "allow_private": r.allow_private,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_their_credentials() {
        assert_eq!(
            redacted_url("nats://user:pw@127.0.0.1:4222"),
            "nats://127.0.0.1:4222"
        );
        assert_eq!(
            redacted_url("https://api.example.com/v1"),
            "https://api.example.com/v1"
        );
    }

    #[test]
    fn the_shipped_example_renders_every_route() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/spillway.yaml");
        let c = crate::config::load(&path).unwrap();
        let v = render(&c, false);
        assert_eq!(v["routes"].as_array().unwrap().len(), c.routes.len());
        assert_eq!(v["admin"]["token_env"], "SPILLWAY_ADMIN_TOKEN");
        assert_eq!(v["routes"][0]["retry"]["retry_on"][0], "connect-failure");
    }
}
