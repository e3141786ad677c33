//! Table definitions (versioned names) and record encodings of the redb store.
//!
//! Records are postcard behind one version byte, so a later version can read older records.

use redb::TableDefinition;
use serde::{Deserialize, Serialize};

use crate::queue::{Job, JobId, JobState, LastOutcome, BODY_PREFIX_MAX};

/// The schema this code writes and understands.
pub const SCHEMA_VERSION: u64 = 1;
pub const SCHEMA_VERSION_KEY: &str = "schema_version";

pub const META: TableDefinition<'_, &str, u64> = TableDefinition::new("meta");
pub const JOBS: TableDefinition<'_, u128, &[u8]> = TableDefinition::new("jobs_v1");
/// (route, next_attempt_at_ms, id): queued and retrying jobs.
pub const DUE: TableDefinition<'_, (&str, u64, u128), ()> = TableDefinition::new("due_v1");
/// (route, created_at_ms, id): queued, in_flight and retrying jobs.
pub const PENDING: TableDefinition<'_, (&str, u64, u128), ()> = TableDefinition::new("pending_v1");
/// (route, ordering_key, id): pending jobs that carry an ordering key.
pub const ORDER: TableDefinition<'_, (&str, &str, u128), ()> = TableDefinition::new("order_v1");
/// (route, id): every job.
pub const BY_ROUTE: TableDefinition<'_, (&str, u128), ()> = TableDefinition::new("by_route_v1");
/// (expires_at_ms, id): delivered jobs.
pub const EXPIRY: TableDefinition<'_, (u64, u128), ()> = TableDefinition::new("expiry_v1");
/// (route, idempotency_key) -> IdemRecordV1.
pub const IDEM: TableDefinition<'_, (&str, &str), &[u8]> = TableDefinition::new("idem_v1");
/// (route, state) -> count.
pub const COUNTERS: TableDefinition<'_, (&str, &str), u64> = TableDefinition::new("counters_v1");
/// route -> RouteRecordV1.
pub const ROUTES: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("routes_v1");
/// (route, index) -> (window_start_ms, count).
pub const QUOTAS: TableDefinition<'_, (&str, u64), (u64, u64)> = TableDefinition::new("quotas_v1");

const RECORD_V1: u8 = 1;

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct DecodeError(pub String);

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    let out = vec![RECORD_V1];
    // postcard into a Vec only fails on types serde cannot express; ours are plain structs.
    match postcard::to_extend(value, out) {
        Ok(v) => v,
        Err(_) => vec![0],
    }
}

fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, DecodeError> {
    match bytes.split_first() {
        Some((&RECORD_V1, rest)) => {
            postcard::from_bytes(rest).map_err(|e| DecodeError(format!("record: {e}")))
        }
        Some((v, _)) => Err(DecodeError(format!("unknown record version {v}"))),
        None => Err(DecodeError("empty record".into())),
    }
}

// === impl JobRecordV1 ===

// Byte strings go through serde_bytes: postcard writes a `Vec<u8>` and a byte string the same
// way (length, then the bytes), but serde's default walks a `Vec<u8>` one element at a time,
// which showed up in the writer's profile. The encoding side borrows, so a job's body is not
// copied before it is written.

/// Headers as stored: (name, value bytes) pairs.
struct HeadersRef<'a>(&'a [(String, Vec<u8>)]);

impl Serialize for HeadersRef<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        let mut seq = s.serialize_seq(Some(self.0.len()))?;
        for (k, v) in self.0 {
            seq.serialize_element(&(k.as_str(), serde_bytes::Bytes::new(v)))?;
        }
        seq.end()
    }
}

type HeadersOwned = Vec<(String, serde_bytes::ByteBuf)>;

fn headers_from(h: HeadersOwned) -> Vec<(String, Vec<u8>)> {
    h.into_iter().map(|(k, v)| (k, v.into_vec())).collect()
}

#[derive(Serialize)]
struct OutcomeV1Ref<'a> {
    status: Option<u16>,
    headers: HeadersRef<'a>,
    #[serde(with = "serde_bytes")]
    body_prefix: &'a [u8],
    error: Option<&'a str>,
    at_ms: u64,
}

#[derive(Deserialize)]
struct OutcomeV1 {
    status: Option<u16>,
    headers: HeadersOwned,
    body_prefix: serde_bytes::ByteBuf,
    error: Option<String>,
    at_ms: u64,
}

/// The job record as written; field for field the same shape as [`JobRecordV1`].
#[derive(Serialize)]
struct JobRecordV1Ref<'a> {
    id: u128,
    route: &'a str,
    method: &'a str,
    uri: &'a str,
    headers: HeadersRef<'a>,
    #[serde(with = "serde_bytes")]
    body: &'a [u8],
    traceparent: Option<&'a str>,
    idempotency_key: &'a str,
    fingerprint: [u8; 32],
    created_at_ms: u64,
    ordering_key: Option<&'a str>,
    state: u8,
    attempts: u32,
    next_attempt_at_ms: u64,
    updated_at_ms: u64,
    last: Option<OutcomeV1Ref<'a>>,
    dead_reason: Option<&'a str>,
}

/// The job record as read.
#[derive(Deserialize)]
struct JobRecordV1 {
    id: u128,
    route: String,
    method: String,
    uri: String,
    headers: HeadersOwned,
    body: serde_bytes::ByteBuf,
    traceparent: Option<String>,
    idempotency_key: String,
    fingerprint: [u8; 32],
    created_at_ms: u64,
    ordering_key: Option<String>,
    state: u8,
    attempts: u32,
    next_attempt_at_ms: u64,
    updated_at_ms: u64,
    last: Option<OutcomeV1>,
    dead_reason: Option<String>,
}

fn state_to_u8(s: JobState) -> u8 {
    match s {
        JobState::Queued => 0,
        JobState::InFlight => 1,
        JobState::Retrying => 2,
        JobState::Delivered => 3,
        JobState::Dead => 4,
    }
}

fn state_from_u8(v: u8) -> Result<JobState, DecodeError> {
    Ok(match v {
        0 => JobState::Queued,
        1 => JobState::InFlight,
        2 => JobState::Retrying,
        3 => JobState::Delivered,
        4 => JobState::Dead,
        other => return Err(DecodeError(format!("unknown job state {other}"))),
    })
}

pub fn encode_job(job: &Job) -> Vec<u8> {
    let rec = JobRecordV1Ref {
        id: job.id.as_u128(),
        route: &job.route,
        method: &job.method,
        uri: &job.uri,
        headers: HeadersRef(&job.headers),
        body: &job.body,
        traceparent: job.traceparent.as_deref(),
        idempotency_key: &job.idempotency_key,
        fingerprint: job.fingerprint,
        created_at_ms: job.created_at_ms,
        ordering_key: job.ordering_key.as_deref(),
        state: state_to_u8(job.state),
        attempts: job.attempts,
        next_attempt_at_ms: job.next_attempt_at_ms,
        updated_at_ms: job.updated_at_ms,
        last: job.last.as_ref().map(|l| OutcomeV1Ref {
            status: l.status,
            headers: HeadersRef(&l.headers),
            body_prefix: &l.body_prefix[..l.body_prefix.len().min(BODY_PREFIX_MAX)],
            error: l.error.as_deref(),
            at_ms: l.at_ms,
        }),
        dead_reason: job.dead_reason.as_deref(),
    };
    encode(&rec)
}

pub fn decode_job(bytes: &[u8]) -> Result<Job, DecodeError> {
    let r: JobRecordV1 = decode(bytes)?;
    Ok(Job {
        id: JobId::from_u128(r.id),
        route: r.route,
        method: r.method,
        uri: r.uri,
        headers: headers_from(r.headers),
        body: r.body.into_vec().into(),
        traceparent: r.traceparent,
        idempotency_key: r.idempotency_key,
        fingerprint: r.fingerprint,
        created_at_ms: r.created_at_ms,
        ordering_key: r.ordering_key,
        state: state_from_u8(r.state)?,
        attempts: r.attempts,
        next_attempt_at_ms: r.next_attempt_at_ms,
        updated_at_ms: r.updated_at_ms,
        last: r.last.map(|l| LastOutcome {
            status: l.status,
            headers: headers_from(l.headers),
            body_prefix: l.body_prefix.into_vec(),
            error: l.error,
            at_ms: l.at_ms,
        }),
        dead_reason: r.dead_reason,
    })
}

// === impl IdemRecordV1 ===

/// One idempotency key of a route. While its job is pending or dead the key is held; once the
/// job is delivered it is held until `expires_at_ms`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct IdemRecordV1 {
    pub id: u128,
    pub fingerprint: [u8; 32],
    pub window_ms: u64,
    pub expires_at_ms: u64,
}

pub fn encode_idem(r: &IdemRecordV1) -> Vec<u8> {
    encode(r)
}

pub fn decode_idem(bytes: &[u8]) -> Result<IdemRecordV1, DecodeError> {
    decode(bytes)
}

// === impl RouteRecordV1 ===

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RouteRecordV1 {
    pub paused: bool,
    pub paused_until_ms: Option<u64>,
}

pub fn encode_route(r: &RouteRecordV1) -> Vec<u8> {
    encode(r)
}

pub fn decode_route(bytes: &[u8]) -> Result<RouteRecordV1, DecodeError> {
    decode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The record as the first release wrote it: byte strings as plain `Vec<u8>`.
    #[derive(Serialize)]
    struct OldOutcome {
        status: Option<u16>,
        headers: Vec<(String, Vec<u8>)>,
        body_prefix: Vec<u8>,
        error: Option<String>,
        at_ms: u64,
    }

    #[derive(Serialize)]
    struct OldJob {
        id: u128,
        route: String,
        method: String,
        uri: String,
        headers: Vec<(String, Vec<u8>)>,
        body: Vec<u8>,
        traceparent: Option<String>,
        idempotency_key: String,
        fingerprint: [u8; 32],
        created_at_ms: u64,
        ordering_key: Option<String>,
        state: u8,
        attempts: u32,
        next_attempt_at_ms: u64,
        updated_at_ms: u64,
        last: Option<OldOutcome>,
        dead_reason: Option<String>,
    }

    #[test]
    fn serde_bytes_encoding_is_byte_identical_to_the_first_release() {
        let old = OldJob {
            id: 7,
            route: "r".into(),
            method: "POST".into(),
            uri: "http://u/x".into(),
            headers: vec![("a".into(), vec![1, 2, 255])],
            body: (0..=255u8).collect(),
            traceparent: Some("00-ab-cd-01".into()),
            idempotency_key: "k".into(),
            fingerprint: [9; 32],
            created_at_ms: 1,
            ordering_key: None,
            state: 2,
            attempts: 3,
            next_attempt_at_ms: 4,
            updated_at_ms: 5,
            last: Some(OldOutcome {
                status: Some(503),
                headers: vec![("retry-after".into(), b"2".to_vec())],
                body_prefix: b"busy".to_vec(),
                error: None,
                at_ms: 6,
            }),
            dead_reason: None,
        };
        let bytes = encode(&old);
        let job = decode_job(&bytes).expect("old record decodes");
        assert_eq!(job.body.as_ref(), old.body.as_slice());
        assert_eq!(job.headers, old.headers);
        assert_eq!(job.state, JobState::Retrying);
        assert_eq!(
            job.last.as_ref().map(|l| l.body_prefix.clone()),
            Some(b"busy".to_vec())
        );
        assert_eq!(encode_job(&job), bytes, "new encoder writes the same bytes");
    }
}
