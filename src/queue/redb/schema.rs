//! Table definitions (versioned names) and record encodings of the redb store.
//!
//! Records are postcard behind one version byte, so a later version can read older records.
//!
//! | version | layout |
//! | --- | --- |
//! | 1 | `1`, postcard record (jobs: `JobRecordV1`; idempotency keys; route controls) |
//! | 2 | jobs sealed at rest: `2`, postcard `JobHeadV2` (the clear fields, the key id and the 24-byte nonce), then the XChaCha20-Poly1305 ciphertext of postcard `SealedV2` (uri, headers, body, last response's headers and body prefix), then the 16-byte tag |
//!
//! A sealed record's associated data is its job id (16 bytes, big-endian), so a sealed part
//! copied into another job's record does not open. The clear head can be read and rewritten
//! without the key (state changes of a job whose key is missing; see `ops.rs`). Which version
//! a job is written in depends only on whether encryption is configured; both are always read.

use redb::TableDefinition;
use serde::{Deserialize, Serialize};

use crate::queue::crypt::{OpenError, Sealer, NONCE_LEN, TAG_LEN};
use crate::queue::{Job, JobId, JobState, LastOutcome, BODY_PREFIX_MAX};

/// The schema this code writes and understands.
///
/// | schema | change |
/// | --- | --- |
/// | 1 | first release |
/// | 2 | a job whose idempotency key was generated (the key is the job id) has no [`IDEM`] row; its dedupe window is the value of its [`BY_ROUTE`] entry (`by_route_v1` had no value) |
///
/// | 3 | the accept log beside the file (`wal.rs`) may hold accepted jobs the file does not; `meta` row [`ACCEPT_LOG_SEQ_KEY`] says which batches of it the file holds. An older spillway would not read the log, so it must not open such a file |
///
/// A file of schema 1 is migrated when it is opened read-write (`migrate_v1` in `mod.rs`);
/// schema 2 needs no change to become 3.
pub const SCHEMA_VERSION: u64 = 3;
pub const SCHEMA_VERSION_KEY: &str = "schema_version";
/// `meta` row: the sequence number of the last accept-log batch this file holds.
pub const ACCEPT_LOG_SEQ_KEY: &str = "accept_log_seq";

pub const META: TableDefinition<'_, &str, u64> = TableDefinition::new("meta");
pub const JOBS: TableDefinition<'_, u128, &[u8]> = TableDefinition::new("jobs_v1");
/// (route, next_attempt_at_ms, id): queued and retrying jobs.
pub const DUE: TableDefinition<'_, (&str, u64, u128), ()> = TableDefinition::new("due_v1");
/// (route, created_at_ms, id): queued, in_flight and retrying jobs.
pub const PENDING: TableDefinition<'_, (&str, u64, u128), ()> = TableDefinition::new("pending_v1");
/// (route, id) -> the dedupe window (ms) of a job whose key was generated, else 0 (its
/// window is in its [`IDEM`] row): every job.
pub const BY_ROUTE: TableDefinition<'_, (&str, u128), u64> = TableDefinition::new("by_route_v2");

/// (route, ordering_key, id): pending jobs that carry an ordering key.
pub const ORDER: TableDefinition<'_, (&str, &str, u128), ()> = TableDefinition::new("order_v1");
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

/// Schema 1's tables that schema 2 replaced; read once by the migration, then deleted.
pub mod v1 {
    use redb::TableDefinition;

    /// (route, id): every job.
    pub const BY_ROUTE: TableDefinition<'_, (&str, u128), ()> = TableDefinition::new("by_route_v1");
}

const RECORD_V1: u8 = 1;
/// A job record whose client and upstream contents are sealed (encryption at rest).
const RECORD_V2_SEALED: u8 = 2;

/// Why a record did not decode.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// Not a record this code wrote: truncated, altered or of an unknown version.
    #[error("{0}")]
    Malformed(String),
    /// A sealed record that the configured keys cannot open.
    #[error(transparent)]
    Sealed(#[from] OpenError),
}

fn malformed(what: &str, e: postcard::Error) -> DecodeError {
    DecodeError::Malformed(format!("{what}: {e}"))
}

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
        Some((&RECORD_V1, rest)) => postcard::from_bytes(rest).map_err(|e| malformed("record", e)),
        Some((v, _)) => Err(DecodeError::Malformed(format!(
            "unknown record version {v}"
        ))),
        None => Err(DecodeError::Malformed("empty record".into())),
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
        other => return Err(DecodeError::Malformed(format!("unknown job state {other}"))),
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

/// Decodes a job record of any version; sealed records need `sealer` with their key.
pub fn decode_job_with(bytes: &[u8], sealer: Option<&Sealer>) -> Result<Job, DecodeError> {
    match bytes.first() {
        Some(&RECORD_V2_SEALED) => decode_sealed(bytes, sealer),
        _ => decode_job(bytes),
    }
}

/// Encodes a job: sealed (version 2) when a sealer is given, else version 1.
pub fn encode_job_with(job: &Job, sealer: Option<&Sealer>) -> Result<Vec<u8>, String> {
    match sealer {
        Some(s) => encode_sealed(job, s),
        None => Ok(encode_job(job)),
    }
}

/// Decodes an unsealed (version 1) job record.
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

// === impl JobHeadV2, SealedV2 ===

#[derive(Serialize)]
struct OutcomeHeadRef<'a> {
    status: Option<u16>,
    error: Option<&'a str>,
    at_ms: u64,
}

#[derive(Deserialize)]
struct OutcomeHead {
    status: Option<u16>,
    error: Option<String>,
    at_ms: u64,
}

/// The clear part of a sealed job record: what the queue needs to index and schedule a job
/// and what the admin API lists, plus how the rest was sealed.
#[derive(Serialize)]
struct JobHeadV2Ref<'a> {
    id: u128,
    route: &'a str,
    method: &'a str,
    traceparent: Option<&'a str>,
    idempotency_key: &'a str,
    fingerprint: [u8; 32],
    created_at_ms: u64,
    ordering_key: Option<&'a str>,
    state: u8,
    attempts: u32,
    next_attempt_at_ms: u64,
    updated_at_ms: u64,
    last: Option<OutcomeHeadRef<'a>>,
    dead_reason: Option<&'a str>,
    key_id: &'a str,
    nonce: [u8; NONCE_LEN],
}

#[derive(Deserialize)]
struct JobHeadV2<'a> {
    id: u128,
    route: String,
    method: String,
    traceparent: Option<String>,
    idempotency_key: String,
    fingerprint: [u8; 32],
    created_at_ms: u64,
    ordering_key: Option<String>,
    state: u8,
    attempts: u32,
    next_attempt_at_ms: u64,
    updated_at_ms: u64,
    last: Option<OutcomeHead>,
    dead_reason: Option<String>,
    #[serde(borrow)]
    key_id: &'a str,
    nonce: [u8; NONCE_LEN],
}

/// The sealed part: what came from the client and the upstream.
#[derive(Serialize)]
struct SealedV2Ref<'a> {
    uri: &'a str,
    headers: HeadersRef<'a>,
    #[serde(with = "serde_bytes")]
    body: &'a [u8],
    last_headers: HeadersRef<'a>,
    #[serde(with = "serde_bytes")]
    last_body_prefix: &'a [u8],
}

#[derive(Deserialize)]
struct SealedV2 {
    uri: String,
    headers: HeadersOwned,
    body: serde_bytes::ByteBuf,
    last_headers: HeadersOwned,
    last_body_prefix: serde_bytes::ByteBuf,
}

fn head_ref<'a>(job: &'a Job, key_id: &'a str, nonce: [u8; NONCE_LEN]) -> JobHeadV2Ref<'a> {
    JobHeadV2Ref {
        id: job.id.as_u128(),
        route: &job.route,
        method: &job.method,
        traceparent: job.traceparent.as_deref(),
        idempotency_key: &job.idempotency_key,
        fingerprint: job.fingerprint,
        created_at_ms: job.created_at_ms,
        ordering_key: job.ordering_key.as_deref(),
        state: state_to_u8(job.state),
        attempts: job.attempts,
        next_attempt_at_ms: job.next_attempt_at_ms,
        updated_at_ms: job.updated_at_ms,
        last: job.last.as_ref().map(|l| OutcomeHeadRef {
            status: l.status,
            error: l.error.as_deref(),
            at_ms: l.at_ms,
        }),
        dead_reason: job.dead_reason.as_deref(),
        key_id,
        nonce,
    }
}

/// The job of a head alone: the sealed fields empty.
fn head_job(h: JobHeadV2<'_>) -> Result<Job, DecodeError> {
    Ok(Job {
        id: JobId::from_u128(h.id),
        route: h.route,
        method: h.method,
        uri: String::new(),
        headers: Vec::new(),
        body: bytes::Bytes::new(),
        traceparent: h.traceparent,
        idempotency_key: h.idempotency_key,
        fingerprint: h.fingerprint,
        created_at_ms: h.created_at_ms,
        ordering_key: h.ordering_key,
        state: state_from_u8(h.state)?,
        attempts: h.attempts,
        next_attempt_at_ms: h.next_attempt_at_ms,
        updated_at_ms: h.updated_at_ms,
        last: h.last.map(|l| LastOutcome {
            status: l.status,
            headers: Vec::new(),
            body_prefix: Vec::new(),
            error: l.error,
            at_ms: l.at_ms,
        }),
        dead_reason: h.dead_reason,
    })
}

/// A sealed record's head, and the ciphertext with its tag after it.
fn split_sealed(bytes: &[u8]) -> Result<(JobHeadV2<'_>, &[u8]), DecodeError> {
    let rest = match bytes.split_first() {
        Some((&RECORD_V2_SEALED, rest)) => rest,
        _ => return Err(DecodeError::Malformed("not a sealed record".into())),
    };
    let (head, sealed) = postcard::take_from_bytes::<JobHeadV2<'_>>(rest)
        .map_err(|e| malformed("sealed record head", e))?;
    if sealed.len() < TAG_LEN {
        return Err(DecodeError::Malformed(format!(
            "sealed record of job {} is cut short",
            JobId::from_u128(head.id)
        )));
    }
    Ok((head, sealed))
}

fn encode_sealed(job: &Job, sealer: &Sealer) -> Result<Vec<u8>, String> {
    let nonce = Sealer::nonce();
    let last = job.last.as_ref();
    let last_headers = last.map_or(&[][..], |l| &l.headers[..]);
    let last_body_prefix = last.map_or(&[][..], |l| {
        &l.body_prefix[..l.body_prefix.len().min(BODY_PREFIX_MAX)]
    });
    let secret = SealedV2Ref {
        uri: &job.uri,
        headers: HeadersRef(&job.headers),
        body: &job.body,
        last_headers: HeadersRef(last_headers),
        last_body_prefix,
    };
    // One buffer for the whole record, sized so it rarely grows: the plaintext is written
    // after the head and encrypted where it lies.
    let headers_len =
        |h: &[(String, Vec<u8>)]| h.iter().map(|(k, v)| k.len() + v.len() + 4).sum::<usize>();
    let cap = 256
        + job.route.len()
        + job.idempotency_key.len()
        + job.uri.len()
        + job.body.len()
        + headers_len(&job.headers)
        + headers_len(last_headers)
        + last_body_prefix.len();
    let mut out = Vec::with_capacity(cap);
    out.push(RECORD_V2_SEALED);
    let out = postcard::to_extend(&head_ref(job, sealer.primary_id(), nonce), out)
        .map_err(|e| format!("encode sealed record head: {e}"))?;
    let start = out.len();
    let mut out =
        postcard::to_extend(&secret, out).map_err(|e| format!("encode sealed record: {e}"))?;
    let ad = job.id.as_u128().to_be_bytes();
    let tag = sealer.seal_in_place(&nonce, &ad, &mut out[start..])?;
    out.extend_from_slice(&tag);
    Ok(out)
}

fn decode_sealed(bytes: &[u8], sealer: Option<&Sealer>) -> Result<Job, DecodeError> {
    let (head, sealed) = split_sealed(bytes)?;
    let Some(sealer) = sealer else {
        return Err(OpenError::NotConfigured {
            key_id: head.key_id.to_owned(),
        }
        .into());
    };
    let (ct, tag) = sealed.split_at(sealed.len() - TAG_LEN);
    let mut tag_arr = [0u8; TAG_LEN];
    tag_arr.copy_from_slice(tag);
    let mut buf = ct.to_vec();
    let ad = head.id.to_be_bytes();
    sealer.open_in_place(head.key_id, &head.nonce, &ad, &mut buf, &tag_arr)?;
    let s: SealedV2 = postcard::from_bytes(&buf).map_err(|e| malformed("sealed record", e))?;
    let mut job = head_job(head)?;
    job.uri = s.uri;
    job.headers = headers_from(s.headers);
    job.body = s.body.into_vec().into();
    if let Some(l) = &mut job.last {
        l.headers = headers_from(s.last_headers);
        l.body_prefix = s.last_body_prefix.into_vec();
    }
    Ok(job)
}

/// How far [`decode_job_prefix`] decrypts looking for a sealed part's end.
const MAX_SEALED_SCAN: usize = 64 << 20;

/// A job record at the start of `bytes`, which may run on past its end (a raw scan of a
/// damaged file), and the record's length. A sealed record does not store its length: the
/// prefix of its sealed part is decrypted until it parses, then the record is opened (and
/// its tag checked) at that length.
pub fn decode_job_prefix(bytes: &[u8], sealer: Option<&Sealer>) -> Result<Job, DecodeError> {
    if bytes.first() != Some(&RECORD_V2_SEALED) {
        return decode_job(bytes);
    }
    let Some(sealer) = sealer else {
        return decode_sealed(bytes, None);
    };
    let (head, sealed) = split_sealed(bytes)?;
    // Ids are UUIDv7: a cheap test that keeps random bytes from costing a decryption.
    if JobId::from_u128(head.id).as_uuid().get_version_num() != 7 {
        return Err(DecodeError::Malformed("not a job id".into()));
    }
    let head_len = bytes.len() - sealed.len();
    // No sealed part is larger than a body limit allows; past that it is not a record.
    let max = (sealed.len() - TAG_LEN).min(MAX_SEALED_SCAN);
    let mut want = max.min(4096);
    loop {
        let mut buf = sealed[..want].to_vec();
        sealer.peek_in_place(head.key_id, &head.nonce, &mut buf)?;
        match postcard::take_from_bytes::<SealedV2>(&buf) {
            Ok((_, rest)) => {
                let len = head_len + want - rest.len() + TAG_LEN;
                return decode_sealed(&bytes[..len], Some(sealer));
            }
            Err(postcard::Error::DeserializeUnexpectedEnd) if want < max => {
                want = max.min(want * 4);
            }
            Err(e) => return Err(malformed("sealed record", e)),
        }
    }
}

/// What can be read of a job record without its key: for an unsealed record the whole job;
/// for a sealed one the job with uri, headers and bodies empty, and the id of its key.
pub fn decode_job_head(bytes: &[u8]) -> Result<(Job, Option<String>), DecodeError> {
    match bytes.first() {
        Some(&RECORD_V2_SEALED) => {
            let (head, _) = split_sealed(bytes)?;
            let key_id = head.key_id.to_owned();
            Ok((head_job(head)?, Some(key_id)))
        }
        _ => Ok((decode_job(bytes)?, None)),
    }
}

/// A sealed record with its clear fields taken from `job` and its sealed part unchanged: how
/// a job whose key is missing still changes state. The sealed fields of `job` are ignored,
/// and the id must stay the same (it is the sealed part's associated data).
pub fn rewrite_sealed_head(bytes: &[u8], job: &Job) -> Result<Vec<u8>, DecodeError> {
    let (head, sealed) = split_sealed(bytes)?;
    if head.id != job.id.as_u128() {
        return Err(DecodeError::Malformed(format!(
            "sealed record of job {} cannot take the head of job {}",
            JobId::from_u128(head.id),
            job.id
        )));
    }
    let mut out = Vec::with_capacity(bytes.len() + 64);
    out.push(RECORD_V2_SEALED);
    let mut out = postcard::to_extend(&head_ref(job, head.key_id, head.nonce), out)
        .map_err(|e| DecodeError::Malformed(format!("encode sealed record head: {e}")))?;
    out.extend_from_slice(sealed);
    Ok(out)
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

    // === sealed records (version 2) ===

    use crate::queue::crypt::parse_key;

    fn sealer(keys: &[(&str, u8)], primary: &str) -> Sealer {
        let keys = keys
            .iter()
            .map(|(id, b)| {
                let key = parse_key(&hex::encode([*b; 32])).unwrap();
                (id.to_string(), key)
            })
            .collect();
        Sealer::from_keys(keys, primary).unwrap()
    }

    fn sample() -> Job {
        let mut job = Job::from_new(crate::queue::NewJob {
            id: JobId::new(),
            route: "orders".into(),
            method: "POST".into(),
            uri: "http://api.example.com/v1/orders?token=URI-SECRET".into(),
            headers: vec![("authorization".into(), b"Bearer HEADER-SECRET".to_vec())],
            body: bytes::Bytes::from_static(b"{\"card\":\"BODY-SECRET\"}"),
            traceparent: Some("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into()),
            idempotency_key: "key-1".into(),
            fingerprint: [7; 32],
            created_at_ms: 1_700_000_000_000,
            ordering_key: Some("customer-9".into()),
        });
        job.state = JobState::Retrying;
        job.attempts = 2;
        job.last = Some(LastOutcome {
            status: Some(503),
            headers: vec![("set-cookie".into(), b"RESPONSE-HEADER-SECRET".to_vec())],
            body_prefix: b"RESPONSE-BODY-SECRET".to_vec(),
            error: Some("upstream answered 503".into()),
            at_ms: 1_700_000_000_500,
        });
        job
    }

    fn contains(hay: &[u8], needle: &[u8]) -> bool {
        hay.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn sealed_record_round_trips_and_hides_uri_headers_and_bodies() {
        let s = sealer(&[("k1", 1)], "k1");
        let job = sample();
        let bytes = encode_job_with(&job, Some(&s)).unwrap();
        assert_eq!(bytes[0], RECORD_V2_SEALED);
        for secret in [
            &b"URI-SECRET"[..],
            b"HEADER-SECRET",
            b"BODY-SECRET",
            b"RESPONSE-HEADER-SECRET",
            b"RESPONSE-BODY-SECRET",
        ] {
            assert!(
                !contains(&bytes, secret),
                "{} in the record",
                String::from_utf8_lossy(secret)
            );
        }
        // What the queue indexes by stays readable.
        assert!(contains(&bytes, b"orders") && contains(&bytes, b"key-1"));
        assert_eq!(decode_job_with(&bytes, Some(&s)).unwrap(), job);
        // Fresh nonce per record: the same job seals differently each time.
        assert_ne!(encode_job_with(&job, Some(&s)).unwrap(), bytes);
    }

    #[test]
    fn a_sealed_record_followed_by_other_bytes_is_found_at_its_own_length() {
        let s = sealer(&[("k1", 1)], "k1");
        let mut job = sample();
        // Larger than the first prefix tried, so the prefix has to grow.
        job.body = vec![7u8; 10_000].into();
        for tail in [&[][..], &[0u8; 3][..], &[0xAB; 20_000][..]] {
            let mut bytes = encode_job_with(&job, Some(&s)).unwrap();
            bytes.extend_from_slice(tail);
            assert_eq!(decode_job_prefix(&bytes, Some(&s)).unwrap(), job);
        }
        // One flipped byte inside the sealed part: the tag check still refuses it.
        let mut bytes = encode_job_with(&job, Some(&s)).unwrap();
        let n = bytes.len();
        bytes[n - 100] ^= 1;
        bytes.extend_from_slice(&[0u8; 64]);
        assert!(decode_job_prefix(&bytes, Some(&s)).is_err());
        // Unsealed records decode as they always did.
        let v1 = encode_job(&job);
        assert_eq!(decode_job_prefix(&v1, Some(&s)).unwrap(), job);
    }

    #[test]
    fn unsealed_records_still_decode_with_encryption_on() {
        let s = sealer(&[("k1", 1)], "k1");
        let job = sample();
        let v1 = encode_job_with(&job, None).unwrap();
        assert_eq!(v1, encode_job(&job));
        assert_eq!(v1[0], RECORD_V1);
        assert_eq!(decode_job_with(&v1, Some(&s)).unwrap(), job);
    }

    #[test]
    fn wrong_key_and_missing_keys_are_errors_naming_the_key() {
        let job = sample();
        let bytes = encode_job_with(&job, Some(&sealer(&[("k1", 1)], "k1"))).unwrap();
        let wrong = sealer(&[("k1", 2)], "k1");
        match decode_job_with(&bytes, Some(&wrong)) {
            Err(DecodeError::Sealed(OpenError::Unauthentic { key_id })) => assert_eq!(key_id, "k1"),
            other => panic!("expected an authentication failure, got {other:?}"),
        }
        let other = sealer(&[("k2", 1)], "k2");
        let e = decode_job_with(&bytes, Some(&other)).unwrap_err();
        assert!(
            matches!(&e, DecodeError::Sealed(OpenError::MissingKey { key_id }) if key_id == "k1"),
            "{e}"
        );
        assert!(e.to_string().contains("\"k1\""), "{e}");
        let e = decode_job_with(&bytes, None).unwrap_err();
        assert!(
            matches!(&e, DecodeError::Sealed(OpenError::NotConfigured { key_id }) if key_id == "k1"),
            "{e}"
        );
    }

    #[test]
    fn tampered_or_moved_ciphertext_does_not_open() {
        let s = sealer(&[("k1", 1)], "k1");
        let job = sample();
        let bytes = encode_job_with(&job, Some(&s)).unwrap();
        // Every byte of the sealed part and tag matters.
        let (_, sealed) = split_sealed(&bytes).unwrap();
        let start = bytes.len() - sealed.len();
        for i in [start, start + sealed.len() / 2, bytes.len() - 1] {
            let mut t = bytes.clone();
            t[i] ^= 0x01;
            assert!(
                matches!(
                    decode_job_with(&t, Some(&s)),
                    Err(DecodeError::Sealed(OpenError::Unauthentic { .. }))
                ),
                "flip at {i} went unnoticed"
            );
        }
        // The sealed part of one job put under another job's head: the id is the associated data.
        let mut other = sample();
        other.id = JobId::new();
        let other_bytes = encode_job_with(&other, Some(&s)).unwrap();
        let (_, other_sealed) = split_sealed(&other_bytes).unwrap();
        let mut swapped = bytes[..start].to_vec();
        swapped.extend_from_slice(other_sealed);
        assert!(matches!(
            decode_job_with(&swapped, Some(&s)),
            Err(DecodeError::Sealed(OpenError::Unauthentic { .. }))
        ));
        // Cut short: malformed, not a panic.
        for n in [1, start, start + 3, bytes.len() - 1] {
            assert!(decode_job_with(&bytes[..n], Some(&s)).is_err());
        }
    }

    #[test]
    fn rotation_reads_records_of_the_old_key_and_writes_with_the_new() {
        let job = sample();
        let old = sealer(&[("k1", 1)], "k1");
        let by_k1 = encode_job_with(&job, Some(&old)).unwrap();
        let rotated = sealer(&[("k2", 2), ("k1", 1)], "k2");
        assert_eq!(decode_job_with(&by_k1, Some(&rotated)).unwrap(), job);
        let by_k2 = encode_job_with(&job, Some(&rotated)).unwrap();
        let (head, _) = split_sealed(&by_k2).unwrap();
        assert_eq!(head.key_id, "k2");
        // Once k1 is dropped, only the k1 record is unreadable.
        let k2_only = sealer(&[("k2", 2)], "k2");
        assert_eq!(decode_job_with(&by_k2, Some(&k2_only)).unwrap(), job);
        assert!(decode_job_with(&by_k1, Some(&k2_only)).is_err());
    }

    #[test]
    fn the_head_reads_and_changes_without_the_key() {
        let s = sealer(&[("k1", 1)], "k1");
        let job = sample();
        let bytes = encode_job_with(&job, Some(&s)).unwrap();
        let (head, key) = decode_job_head(&bytes).unwrap();
        assert_eq!(key.as_deref(), Some("k1"));
        assert_eq!(
            (head.id, head.state, head.attempts),
            (job.id, job.state, job.attempts)
        );
        assert_eq!(head.route, job.route);
        assert!(head.body.is_empty() && head.headers.is_empty() && head.uri.is_empty());
        let mut dead = head.clone();
        dead.state = JobState::Dead;
        dead.dead_reason = Some("no key".into());
        let rewritten = rewrite_sealed_head(&bytes, &dead).unwrap();
        // The sealed part is intact: with the key the whole job comes back, in its new state.
        let back = decode_job_with(&rewritten, Some(&s)).unwrap();
        assert_eq!(back.state, JobState::Dead);
        assert_eq!(back.dead_reason.as_deref(), Some("no key"));
        assert_eq!(
            (&back.body, &back.headers, &back.uri),
            (&job.body, &job.headers, &job.uri)
        );
        let mut moved = dead;
        moved.id = JobId::new();
        assert!(rewrite_sealed_head(&bytes, &moved).is_err());
        // A v1 record's head is the whole job.
        let (whole, key) = decode_job_head(&encode_job(&job)).unwrap();
        assert_eq!((whole, key), (job, None));
    }
}
