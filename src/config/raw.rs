//! serde mirror of the YAML file.
//!
//! Every field is optional so defaults and "required" checks live in `validate.rs`, where
//! they can be collected instead of stopping at the first. Values that need a position
//! in an error are `Spanned`; enums and units stay strings so the messages are ours.

use serde::Deserialize;
use serde_saphyr::Spanned;

use super::units::Scalar;

pub(super) type S<T> = Spanned<T>;

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub listen: Option<S<String>>,
    pub admin: Option<RawAdmin>,
    pub storage: Option<RawStorage>,
    pub limits: Option<RawLimits>,
    pub unmatched: Option<S<String>>,
    pub egress: Option<RawEgress>,
    pub shutdown_grace: Option<S<Scalar>>,
    pub redact_headers: Option<Vec<S<String>>>,
    pub routes: Option<Vec<S<RawRoute>>>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAdmin {
    pub listen: Option<S<String>>,
    pub token_env: Option<S<String>>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawEgress {
    pub deny_private: Option<S<String>>,
    pub allow: Option<Vec<S<String>>>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawStorage {
    pub backend: Option<S<String>>,
    pub path: Option<S<String>>,
    pub cache_size: Option<S<Scalar>>,
    pub url: Option<S<String>>,
    pub stream: Option<S<String>>,
    pub replicas: Option<S<i64>>,
    pub credentials_file: Option<S<String>>,
    pub ack_wait: Option<S<Scalar>>,
    pub encryption: Option<S<RawEncryption>>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawEncryption {
    pub keys: Option<Vec<S<RawKey>>>,
    pub primary: Option<S<String>>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawKey {
    pub id: Option<S<String>>,
    pub file: Option<S<String>>,
    pub env: Option<S<String>>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLimits {
    pub max_body_bytes: Option<S<Scalar>>,
    pub max_header_bytes: Option<S<Scalar>>,
    pub max_connections: Option<S<i64>>,
    pub header_read_timeout: Option<S<Scalar>>,
    pub body_read_timeout: Option<S<Scalar>>,
    pub max_tunnels: Option<S<i64>>,
    pub tunnel_idle_timeout: Option<S<Scalar>>,
    pub idle_timeout: Option<S<Scalar>>,
    pub max_requests_per_connection: Option<S<i64>>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRoute {
    pub name: Option<S<String>>,
    #[serde(rename = "match")]
    pub matcher: Option<S<RawMatch>>,
    pub upstream: Option<S<String>>,
    pub deferrable: Option<S<bool>>,
    pub timeout: Option<S<Scalar>>,
    pub concurrency: Option<S<i64>>,
    pub rate_limit: Option<S<RawRateLimit>>,
    pub quotas: Option<S<Vec<S<RawQuota>>>>,
    pub retry: Option<S<RawRetry>>,
    pub circuit_breaker: Option<S<RawBreaker>>,
    pub idempotency: Option<S<RawIdempotency>>,
    pub queue: Option<S<RawQueue>>,
    pub ordering: Option<S<RawOrdering>>,
    pub connect_ports: Option<S<Vec<S<i64>>>>,
    pub allow_private: Option<S<bool>>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMatch {
    pub host: Option<S<String>>,
    pub path_prefix: Option<S<String>>,
    pub methods: Option<Vec<S<String>>>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRateLimit {
    pub per_second: Option<S<i64>>,
    pub burst: Option<S<i64>>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawQuota {
    pub limit: Option<S<i64>>,
    pub per: Option<S<Scalar>>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRetry {
    pub max_attempts: Option<S<i64>>,
    pub max_age: Option<S<Scalar>>,
    pub retry_on: Option<Vec<S<Scalar>>>,
    pub backoff: Option<S<RawBackoff>>,
    pub honor_retry_after: Option<S<bool>>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBackoff {
    pub initial: Option<S<Scalar>>,
    pub max: Option<S<Scalar>>,
    pub multiplier: Option<S<f64>>,
    pub jitter: Option<S<String>>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawBreaker {
    pub consecutive_failures: Option<S<i64>>,
    pub open_for: Option<S<Scalar>>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawIdempotency {
    pub header: Option<S<String>>,
    pub dedupe_window: Option<S<Scalar>>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawQueue {
    pub max_depth: Option<S<i64>>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawOrdering {
    pub key_header: Option<S<String>>,
}
