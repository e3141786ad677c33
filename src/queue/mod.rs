//! The durable job queue behind one trait: [`JobStore`], with the embedded redb backend.
//!
//! # Invariants
//!
//! - A job is visible to the dispatcher only after its commit returned: [`JobStore::enqueue`]
//!   answers with a [`Durable<JobId>`], whose constructor is private to this module and is only
//!   called after the write transaction holding the job committed with immediate durability.
//! - `in_flight` is always durable before the send: [`JobStore::lease_due`] marks the leased jobs
//!   `in_flight` and counts the attempt (`attempts += 1`) in a committed transaction before it
//!   returns them, so an attempt cut short by a crash still counts.
//! - At open, every `in_flight` job becomes `queued` again, due at once (at least once delivery;
//!   the idempotency key makes the repeat safe downstream).
//! - `ack` is idempotent: acking a delivered job succeeds and changes nothing.
//! - Group commit answers every waiter with the batch result: requests that share one write
//!   transaction all succeed with the commit or all get [`StoreError::Unavailable`].
//! - The dedupe check, the depth check and the insert of an enqueue run in one write
//!   transaction, so two concurrent accepts of one key cannot both be stored.
//! - Per-route counters are kept incrementally in the same transaction as every state change;
//!   [`JobStore::stats`] never scans jobs.
//!
//! # State machine
//!
//! ```text
//!            enqueue
//!               │
//!               ▼
//!          ┌────────┐  lease_due   ┌───────────┐     ack     ┌───────────┐
//!          │ queued │ ───────────▶ │ in_flight │ ──────────▶ │ delivered │ ──▶ purged after
//!          └────────┘              └───────────┘             └───────────┘     the dedupe window
//!               ▲                   │    ▲     │
//!   open after  │        reschedule │    │     │ dead_letter
//!   a crash ────┘                   ▼    │     ▼
//!   (in_flight)               ┌──────────┴┐   ┌──────┐
//!                             │ retrying  │◀──│ dead │
//!                             └───────────┘   └──────┘
//!                               lease_due   retry, replay_dead
//! ```
//!
//! `lease_due` takes due `queued` and `retrying` jobs to `in_flight`. `dead_letter` also applies
//! to `queued` and `retrying` jobs; `retry` also makes a `retrying` job due at once. `delete`
//! removes a job in any state. `reschedule` and `dead_letter` leave `delivered` and `dead` jobs
//! alone, so a late answer cannot undo an admin action or a delivery.
//!
//! # Tables (redb, see `redb/schema.rs`)
//!
//! | table | key | value |
//! | --- | --- | --- |
//! | `meta` | name | u64 (`schema_version`) |
//! | `jobs_v1` | job id (u128, UUIDv7 so time ordered) | version byte + postcard `JobRecordV1`, or sealed `JobRecordV2` (see `redb/schema.rs`) |
//! | `due_v1` | (route, next_attempt_at_ms, id) | () — queued and retrying jobs |
//! | `pending_v1` | (route, created_at_ms, id) | () — queued, in_flight, retrying |
//! | `order_v1` | (route, ordering_key, id) | () — undelivered jobs with an ordering key |
//! | `by_route_v2` | (route, id) | u64 — every job, for listing; the dedupe window of a job whose key was generated, else 0 |
//! | `expiry_v1` | (expires_at_ms, id) | () — delivered jobs, purged after the window |
//! | `idem_v1` | (route, idempotency_key) | version byte + postcard (id, fingerprint, window, expires); none for a generated key (it is the job id) |
//! | `counters_v1` | (route, state) | u64 |
//! | `routes_v1` | route | version byte + postcard (paused, paused_until_ms) |
//! | `quotas_v1` | (route, index) | (window_start_ms, count) |

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use async_trait::async_trait;
use bytes::Bytes;

pub mod crypt;
#[cfg(feature = "nats")]
pub mod nats;
pub mod redb;

#[cfg(test)]
mod tests;

#[cfg(feature = "nats")]
pub use self::nats::{NatsOptions, NatsStore};
pub use self::redb::RedbStore;

/// Most bytes of a response body kept in a [`LastOutcome`].
pub const BODY_PREFIX_MAX: usize = 4 * 1024;

// === impl JobId ===

/// A job's id: a UUIDv7, so ids order by creation time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct JobId(uuid::Uuid);

impl JobId {
    /// A fresh, time-ordered id.
    pub fn new() -> Self {
        Self(uuid::Uuid::now_v7())
    }

    pub fn from_u128(v: u128) -> Self {
        Self(uuid::Uuid::from_u128(v))
    }

    pub fn as_u128(&self) -> u128 {
        self.0.as_u128()
    }

    pub fn as_uuid(&self) -> &uuid::Uuid {
        &self.0
    }

    /// Whether `s` is this id as [`Display`](fmt::Display) writes it (no allocation).
    pub fn is_text(&self, s: &str) -> bool {
        let mut buf = uuid::Uuid::encode_buffer();
        s == self.0.as_hyphenated().encode_lower(&mut buf)
    }
}

impl Default for JobId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.as_hyphenated().fmt(f)
    }
}

impl FromStr for JobId {
    type Err = uuid::Error;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        uuid::Uuid::parse_str(s).map(Self)
    }
}

// === impl Durable ===

/// A value that is on disk: made only by the queue, after the write transaction committed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Durable<T>(T);

impl<T> Durable<T> {
    /// Only the queue module makes these, and only after a commit returned.
    pub(in crate::queue) fn after_commit(value: T) -> Self {
        Self(value)
    }

    pub fn get(&self) -> &T {
        &self.0
    }

    pub fn into_inner(self) -> T {
        self.0
    }
}

// === impl JobState ===

/// Where a job is in its life; see the state machine in the module docs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum JobState {
    Queued,
    InFlight,
    Retrying,
    Delivered,
    Dead,
}

impl JobState {
    pub const ALL: [JobState; 5] = [
        JobState::Queued,
        JobState::InFlight,
        JobState::Retrying,
        JobState::Delivered,
        JobState::Dead,
    ];

    pub fn as_str(&self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::InFlight => "in_flight",
            JobState::Retrying => "retrying",
            JobState::Delivered => "delivered",
            JobState::Dead => "dead",
        }
    }

    /// Waiting to be leased by the dispatcher.
    pub fn is_due_kind(&self) -> bool {
        matches!(self, JobState::Queued | JobState::Retrying)
    }

    /// Not yet delivered nor dead: counts toward queue depth and ordering.
    pub fn is_pending(&self) -> bool {
        matches!(
            self,
            JobState::Queued | JobState::InFlight | JobState::Retrying
        )
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A state name that is not one of [`JobState::ALL`].
#[derive(Debug, thiserror::Error)]
#[error("unknown job state {0:?} (expected queued, in_flight, retrying, delivered or dead)")]
pub struct UnknownJobState(pub String);

impl FromStr for JobState {
    type Err = UnknownJobState;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        JobState::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| UnknownJobState(s.to_owned()))
    }
}

// === impl NewJob, Job ===

/// A request accepted for deferral, before it is stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewJob {
    pub id: JobId,
    pub route: String,
    pub method: String,
    pub uri: String,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Bytes,
    pub traceparent: Option<String>,
    pub idempotency_key: String,
    /// sha256 over what makes two requests "the same" (method, uri, body).
    pub fingerprint: [u8; 32],
    pub created_at_ms: u64,
    pub ordering_key: Option<String>,
}

/// A stored job.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Job {
    pub id: JobId,
    pub route: String,
    pub method: String,
    pub uri: String,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Bytes,
    pub traceparent: Option<String>,
    pub idempotency_key: String,
    pub fingerprint: [u8; 32],
    pub created_at_ms: u64,
    pub ordering_key: Option<String>,
    pub state: JobState,
    pub attempts: u32,
    pub next_attempt_at_ms: u64,
    pub updated_at_ms: u64,
    pub last: Option<LastOutcome>,
    pub dead_reason: Option<String>,
}

impl Job {
    /// A freshly stored job: queued, due at its creation time.
    pub fn from_new(new: NewJob) -> Self {
        Self {
            id: new.id,
            route: new.route,
            method: new.method,
            uri: new.uri,
            headers: new.headers,
            body: new.body,
            traceparent: new.traceparent,
            idempotency_key: new.idempotency_key,
            fingerprint: new.fingerprint,
            created_at_ms: new.created_at_ms,
            ordering_key: new.ordering_key,
            state: JobState::Queued,
            attempts: 0,
            next_attempt_at_ms: new.created_at_ms,
            updated_at_ms: new.created_at_ms,
            last: None,
            dead_reason: None,
        }
    }

    /// Whether the job's idempotency key was generated at accept: the proxy then uses the
    /// job's own id as its key (no client sent one).
    pub fn key_is_generated(&self) -> bool {
        self.id.is_text(&self.idempotency_key)
    }
}

/// What the last delivery attempt saw.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct LastOutcome {
    pub status: Option<u16>,
    pub headers: Vec<(String, Vec<u8>)>,
    /// At most [`BODY_PREFIX_MAX`] bytes; longer prefixes are cut when stored.
    pub body_prefix: Vec<u8>,
    pub error: Option<String>,
    pub at_ms: u64,
}

// === impl StoreError ===

/// Storage → caller errors; mapped once in `proxy/rescue.rs` and `admin/`.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the job store is full")]
    Full,
    #[error("the job store is overloaded: too many writes waiting")]
    Busy,
    #[error("the job store is unavailable: {0}")]
    Unavailable(String),
    #[error("the job store file {path} is corrupt or not a spillway store: {message}")]
    Corrupt { path: PathBuf, message: String },
    #[error(
        "the job store file {path} has schema version {found}; this spillway understands up to {supported}"
    )]
    NewerSchema {
        path: PathBuf,
        found: u64,
        supported: u64,
    },
    #[error("the job store file {path} is already open (is another spillway running?)")]
    AlreadyOpen { path: PathBuf },
    /// A stored job is sealed (encryption at rest) with a key this process does not have;
    /// the message names the job and the key id.
    #[error("a stored job cannot be read: {0}")]
    Sealed(String),
    #[error("no such job")]
    NotFound,
    /// What this backend cannot do; the message says what and why.
    #[error("not supported by this storage backend: {0}")]
    Unsupported(String),
    #[error("the job store is closed")]
    Closed,
}

// === impl EnqueueOutcome, RouteStats ===

/// What [`JobStore::enqueue`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum EnqueueOutcome {
    /// Stored; the id is durable.
    Stored(Durable<JobId>),
    /// Same route and key with the same fingerprint within the dedupe window: the original job.
    Duplicate(Durable<JobId>),
    /// Same route and key, different fingerprint: the job holding the key.
    KeyConflict(JobId),
    /// The route's queue is at `max_depth`; nothing stored.
    QueueFull,
}

/// Per-route gauges, read from counters kept in the store.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RouteStats {
    pub queued: u64,
    pub in_flight: u64,
    pub retrying: u64,
    pub dead: u64,
    pub delivered_kept: u64,
    /// Creation time of the oldest job not yet delivered nor dead.
    pub oldest_queued_created_at_ms: Option<u64>,
}

// === JobStore ===

/// The queue as the proxy, the dispatcher and the admin API see it.
#[async_trait]
pub trait JobStore: Send + Sync + 'static {
    /// Dedupe check, depth check and insert in one write transaction.
    ///
    /// A key is held while its job is pending or dead, and for `dedupe_window_ms` after the
    /// job's delivery; `job.created_at_ms` serves as "now" for that check. Depth counts queued,
    /// in_flight and retrying jobs of the route. `Err(Busy)` when the writer is saturated.
    async fn enqueue(
        &self,
        job: NewJob,
        dedupe_window_ms: u64,
        max_depth: u64,
    ) -> Result<EnqueueOutcome, StoreError>;

    /// Due queued/retrying jobs in (next_attempt_at, id) order, marked in_flight with the attempt
    /// counted, durably, before they are returned. Jobs whose ordering key has an older
    /// undelivered job on the route are skipped. A paused route leases nothing.
    async fn lease_due(
        &self,
        route: &str,
        now_ms: u64,
        limit: usize,
    ) -> Result<Vec<Job>, StoreError>;

    /// Delivered; kept for the dedupe window. Idempotent.
    async fn ack(&self, id: JobId, now_ms: u64) -> Result<(), StoreError>;

    /// Retrying, due at `next_attempt_at_ms`.
    async fn reschedule(
        &self,
        id: JobId,
        next_attempt_at_ms: u64,
        last: LastOutcome,
    ) -> Result<(), StoreError>;

    async fn dead_letter(
        &self,
        id: JobId,
        reason: String,
        last: Option<LastOutcome>,
    ) -> Result<(), StoreError>;

    async fn get(&self, id: JobId) -> Result<Option<Job>, StoreError>;

    /// Newest first; `cursor` is the last id of the previous page (exclusive).
    async fn list(
        &self,
        route: Option<&str>,
        state: Option<JobState>,
        limit: usize,
        cursor: Option<JobId>,
    ) -> Result<Vec<Job>, StoreError>;

    /// A dead or retrying job becomes due now (attempts kept). False if it is in another state.
    async fn retry(&self, id: JobId, now_ms: u64) -> Result<bool, StoreError>;

    async fn delete(&self, id: JobId) -> Result<bool, StoreError>;

    /// Every dead job of the route becomes due now; returns how many.
    async fn replay_dead(&self, route: &str, now_ms: u64) -> Result<u64, StoreError>;

    async fn set_paused(&self, route: &str, paused: bool) -> Result<(), StoreError>;

    async fn pause_until(&self, route: &str, until_ms: u64) -> Result<(), StoreError>;

    /// `(paused, paused_until_ms)` as persisted.
    async fn route_control(&self, route: &str) -> Result<(bool, Option<u64>), StoreError>;

    /// One unit of quota `index` of the route: fixed windows aligned to multiples of `per_ms`.
    /// `None` if granted, else the time the next window opens.
    async fn quota_acquire(
        &self,
        route: &str,
        index: usize,
        per_ms: u64,
        limit: u64,
        now_ms: u64,
    ) -> Result<Option<u64>, StoreError>;

    /// Earliest next_attempt_at of the route's queued/retrying jobs. Callers compare it with
    /// a clock read before the call, so a backend that knows only "due now" (nats) answers 0,
    /// never its own later clock.
    async fn next_due(&self, route: &str) -> Result<Option<u64>, StoreError>;

    async fn stats(&self, route: &str) -> Result<RouteStats, StoreError>;

    /// Every route that has a job stored in any state, sorted; read from the counters, so it
    /// costs a few reads per route, never a scan of jobs. Routes that are no longer
    /// configured show up here, which is how their jobs are found again.
    async fn routes(&self) -> Result<Vec<String>, StoreError>;

    /// Removes delivered jobs (and their keys) past the dedupe window, at most `batch`.
    async fn purge_expired(&self, now_ms: u64, batch: usize) -> Result<u64, StoreError>;

    /// False after a storage failure until the store recovered.
    fn healthy(&self) -> bool;
}
