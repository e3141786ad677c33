//! What each write does inside the writer's transaction, and the reads beside them.
//!
//! Every change to a job goes through [`put_job`], which keeps the index tables and the
//! per-route counters in step with the job record in the same transaction.

use std::collections::HashMap;
use std::sync::Arc;

use redb::{ReadableTable, Table, WriteTransaction};

use super::schema::{
    decode_idem, decode_job_head, decode_job_with, decode_route, encode_idem, encode_job_with,
    encode_route, rewrite_sealed_head, DecodeError, IdemRecordV1, RouteRecordV1, BY_ROUTE,
    COUNTERS, DUE, EXPIRY, IDEM, JOBS, ORDER, PENDING, QUOTAS, ROUTES,
};
use super::wal::push_entry;
use crate::queue::crypt::Sealer;
use crate::queue::{Job, JobId, JobState, LastOutcome, StoreError, BODY_PREFIX_MAX};

/// A failed step: either the caller's answer (`Store`), a record that does not decode, a
/// sealed record the configured keys cannot open, or storage trouble that fails the whole
/// batch.
#[derive(Debug)]
pub(super) enum TxError {
    Store(StoreError),
    Decode(String),
    Sealed(String),
    Storage(redb::Error),
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for TxError {
            fn from(e: $t) -> Self {
                TxError::Storage(e.into())
            }
        }
    )*};
}
from_redb!(
    redb::StorageError,
    redb::TableError,
    redb::TransactionError,
    redb::CommitError,
    redb::SetDurabilityError
);

impl From<DecodeError> for TxError {
    fn from(e: DecodeError) -> Self {
        match e {
            DecodeError::Malformed(m) => TxError::Decode(m),
            DecodeError::Sealed(e) => TxError::Sealed(e.to_string()),
        }
    }
}

/// A job record's decode error, naming the job.
fn job_error(id: JobId, e: DecodeError) -> TxError {
    match e {
        DecodeError::Malformed(m) => TxError::Decode(format!("job {id}: {m}")),
        DecodeError::Sealed(e) => TxError::Sealed(format!("job {id}: {e}")),
    }
}

/// A record stored under one id that holds another job was moved there: refuse it.
fn same_id(job: Job, id: JobId) -> TxResult<Job> {
    if job.id == id {
        Ok(job)
    } else {
        Err(TxError::Decode(format!(
            "the record stored for job {id} holds job {}",
            job.id
        )))
    }
}

impl From<StoreError> for TxError {
    fn from(e: StoreError) -> Self {
        TxError::Store(e)
    }
}

pub(super) type TxResult<T> = Result<T, TxError>;

/// Result of an enqueue before the commit makes it durable.
#[derive(Debug)]
pub(super) enum EnqueueStep {
    Stored(JobId),
    Duplicate(JobId),
    KeyConflict(JobId),
    QueueFull,
}

// === shared reads ===

pub(super) fn load_job(
    t: &impl ReadableTable<u128, &'static [u8]>,
    sealer: Option<&Sealer>,
    id: JobId,
) -> TxResult<Option<Job>> {
    match t.get(id.as_u128())? {
        Some(v) => {
            let job = decode_job_with(v.value(), sealer).map_err(|e| job_error(id, e))?;
            Ok(Some(same_id(job, id)?))
        }
        None => Ok(None),
    }
}

/// A job as stored: readable, or sealed with a key this process does not have (or that does
/// not open it), of which only the clear head is known.
pub(super) enum Stored {
    Open(Job),
    Locked {
        /// The job with uri, headers and bodies empty.
        head: Job,
        /// The record as stored, rewritten with [`rewrite_sealed_head`] on a state change.
        raw: Vec<u8>,
        /// Why it does not open, naming the job and the key id.
        why: String,
    },
}

impl Stored {
    /// The job as far as it is known: the whole job, or the head of a locked one.
    pub fn into_known(self) -> Job {
        match self {
            Stored::Open(j) => j,
            Stored::Locked { head, .. } => head,
        }
    }

    fn known(&self) -> &Job {
        match self {
            Stored::Open(j) => j,
            Stored::Locked { head, .. } => head,
        }
    }
}

/// Like [`load_job`], but a sealed job whose key is missing comes back as [`Stored::Locked`]
/// instead of an error, for the operations that need only its clear fields.
pub(super) fn load_stored(
    t: &impl ReadableTable<u128, &'static [u8]>,
    sealer: Option<&Sealer>,
    id: JobId,
) -> TxResult<Option<Stored>> {
    let Some(v) = t.get(id.as_u128())? else {
        return Ok(None);
    };
    let bytes = v.value();
    match decode_job_with(bytes, sealer) {
        Ok(job) => Ok(Some(Stored::Open(same_id(job, id)?))),
        Err(DecodeError::Sealed(why)) => {
            let (head, _) = decode_job_head(bytes).map_err(|e| job_error(id, e))?;
            Ok(Some(Stored::Locked {
                head: same_id(head, id)?,
                raw: bytes.to_vec(),
                why: format!("job {id}: {why}"),
            }))
        }
        Err(e) => Err(job_error(id, e)),
    }
}

/// The clear fields of a job (no decryption): enough for its state, route and keys.
pub(super) fn load_head(
    t: &impl ReadableTable<u128, &'static [u8]>,
    id: JobId,
) -> TxResult<Option<Job>> {
    match t.get(id.as_u128())? {
        Some(v) => {
            let (head, _) = decode_job_head(v.value()).map_err(|e| job_error(id, e))?;
            Ok(Some(same_id(head, id)?))
        }
        None => Ok(None),
    }
}

pub(super) fn counter(
    t: &impl ReadableTable<(&'static str, &'static str), u64>,
    route: &str,
    state: JobState,
) -> TxResult<u64> {
    Ok(t.get((route, state.as_str()))?
        .map(|v| v.value())
        .unwrap_or(0))
}

pub(super) fn route_record(
    t: &impl ReadableTable<&'static str, &'static [u8]>,
    route: &str,
) -> TxResult<RouteRecordV1> {
    match t.get(route)? {
        Some(v) => Ok(decode_route(v.value())?),
        None => Ok(RouteRecordV1::default()),
    }
}

/// The oldest pending job of (route, ordering key).
pub(super) fn first_in_order(
    t: &impl ReadableTable<(&'static str, &'static str, u128), ()>,
    route: &str,
    key: &str,
) -> TxResult<Option<u128>> {
    let mut r = t.range((route, key, 0u128)..=(route, key, u128::MAX))?;
    match r.next() {
        Some(e) => Ok(Some(e?.0.value().2)),
        None => Ok(None),
    }
}

/// The time of the first entry of `route` in a (route, time, id) index.
pub(super) fn first_time(
    t: &impl ReadableTable<(&'static str, u64, u128), ()>,
    route: &str,
) -> TxResult<Option<u64>> {
    let mut r = t.range((route, 0u64, 0u128)..=(route, u64::MAX, u128::MAX))?;
    match r.next() {
        Some(e) => Ok(Some(e?.0.value().1)),
        None => Ok(None),
    }
}

/// The dedupe window stored with a job whose key was generated (the value of its
/// [`BY_ROUTE`] entry).
fn generated_key_window(t: &Tables<'_>, job: &Job) -> TxResult<u64> {
    let key = (job.route.as_str(), job.id.as_u128());
    Ok(t.by_route.get(key)?.map_or(0, |v| v.value()))
}

fn truncate(mut last: LastOutcome) -> LastOutcome {
    last.body_prefix.truncate(BODY_PREFIX_MAX);
    last
}

// === impl Tables ===

/// Every table of a write transaction, opened once per batch rather than once per step, and
/// the per-route counters read and changed in memory during the batch, written back once by
/// [`Tables::finish`]. Opening a redb table and updating a counter row for every job made
/// up a large share of the writer's time under load.
pub(super) struct Tables<'tx> {
    pub jobs: Table<'tx, u128, &'static [u8]>,
    pub due: Table<'tx, (&'static str, u64, u128), ()>,
    pub pending: Table<'tx, (&'static str, u64, u128), ()>,
    pub order: Table<'tx, (&'static str, &'static str, u128), ()>,
    pub by_route: Table<'tx, (&'static str, u128), u64>,
    pub expiry: Table<'tx, (u64, u128), ()>,
    pub idem: Table<'tx, (&'static str, &'static str), &'static [u8]>,
    pub counters: Table<'tx, (&'static str, &'static str), u64>,
    pub routes: Table<'tx, &'static str, &'static [u8]>,
    pub quotas: Table<'tx, (&'static str, u64), (u64, u64)>,
    /// Counter values as of this batch: read through on first use, written back at the end.
    /// By route, then by state (`JobState as usize`); looked up by `&str`, so a batch
    /// allocates a route's name once, not per job.
    counts: HashMap<String, [Option<u64>; JobState::ALL.len()]>,
    /// Seals job records when encryption at rest is on, and opens sealed ones.
    pub sealer: Option<Arc<Sealer>>,
    /// Set when this batch goes to the accept log (`wal.rs`): the jobs it stores, as logged.
    log: Option<Logged>,
}

/// What a batch stored, for the accept log: the log payload of its new jobs and their ids
/// (to take them back out if the append fails).
#[derive(Debug, Default)]
pub(super) struct Logged {
    pub payload: Vec<u8>,
    pub ids: Vec<JobId>,
}

impl<'tx> Tables<'tx> {
    pub fn open(tx: &'tx WriteTransaction, sealer: Option<Arc<Sealer>>) -> TxResult<Self> {
        Ok(Self {
            jobs: tx.open_table(JOBS)?,
            due: tx.open_table(DUE)?,
            pending: tx.open_table(PENDING)?,
            order: tx.open_table(ORDER)?,
            by_route: tx.open_table(BY_ROUTE)?,
            expiry: tx.open_table(EXPIRY)?,
            idem: tx.open_table(IDEM)?,
            counters: tx.open_table(COUNTERS)?,
            routes: tx.open_table(ROUTES)?,
            quotas: tx.open_table(QUOTAS)?,
            counts: HashMap::new(),
            sealer,
            log: None,
        })
    }

    /// Records the jobs this batch stores for the accept log (see [`Tables::finish`]).
    pub fn log_new_jobs(&mut self) {
        self.log = Some(Logged::default());
    }

    /// The route's counter for `state`, including this batch's changes.
    pub fn count(&mut self, route: &str, state: JobState) -> TxResult<u64> {
        if let Some(v) = self.counts.get(route).and_then(|c| c[state as usize]) {
            return Ok(v);
        }
        let v = counter(&self.counters, route, state)?;
        self.set(route, state, v);
        Ok(v)
    }

    fn set(&mut self, route: &str, state: JobState, v: u64) {
        match self.counts.get_mut(route) {
            Some(c) => c[state as usize] = Some(v),
            None => {
                let mut c = [None; JobState::ALL.len()];
                c[state as usize] = Some(v);
                self.counts.insert(route.to_owned(), c);
            }
        }
    }

    fn bump(&mut self, route: &str, state: JobState, up: bool) -> TxResult<()> {
        let cur = self.count(route, state)?;
        let next = if up { cur + 1 } else { cur.saturating_sub(1) };
        self.set(route, state, next);
        Ok(())
    }

    /// Writes the batch's counters back; call before the tables are dropped and committed.
    /// Returns what the batch logged, after [`Tables::log_new_jobs`].
    pub fn finish(mut self) -> TxResult<Option<Logged>> {
        for (route, counts) in std::mem::take(&mut self.counts) {
            for state in JobState::ALL {
                if let Some(v) = counts[state as usize] {
                    self.counters.insert((route.as_str(), state.as_str()), v)?;
                }
            }
        }
        Ok(self.log.take())
    }
}

// === put_job ===

/// Replaces `old` by `new` (either may be absent), keeping every index and counter in step.
pub(super) fn put_job(t: &mut Tables<'_>, old: Option<&Job>, new: Option<&Job>) -> TxResult<()> {
    put_job_with(t, old, new, 0)
}

/// Stores a new job with `window_ms` as its [`BY_ROUTE`] value: its dedupe window when its
/// key was generated, else 0.
pub(super) fn insert_job(t: &mut Tables<'_>, job: &Job, window_ms: u64) -> TxResult<()> {
    put_job_with(t, None, Some(job), window_ms)
}

fn put_job_with(
    t: &mut Tables<'_>,
    old: Option<&Job>,
    new: Option<&Job>,
    window_ms: u64,
) -> TxResult<()> {
    // Encoded (and sealed) before anything changes, so a failure leaves the batch untouched.
    let record = match new {
        Some(n) => Some(
            encode_job_with(n, t.sealer.as_deref())
                .map_err(|e| TxError::Sealed(format!("job {}: {e}", n.id)))?,
        ),
        None => None,
    };
    put_record(t, old, new.zip(record.as_deref()), window_ms)
}

/// [`put_job`] for a job whose key is missing: only its clear head changes.
fn put_locked(t: &mut Tables<'_>, old: &Job, new: &Job, raw: &[u8]) -> TxResult<()> {
    let record = rewrite_sealed_head(raw, new).map_err(|e| job_error(new.id, e))?;
    put_record(t, Some(old), Some((new, &record)), 0)
}

/// `window_ms`: the value of a new job's [`BY_ROUTE`] entry.
fn put_record(
    t: &mut Tables<'_>,
    old: Option<&Job>,
    new: Option<(&Job, &[u8])>,
    window_ms: u64,
) -> TxResult<()> {
    if let Some(o) = old {
        let id = o.id.as_u128();
        let r = o.route.as_str();
        if o.state.is_due_kind() {
            t.due.remove((r, o.next_attempt_at_ms, id))?;
        }
        if o.state.is_pending() {
            t.pending.remove((r, o.created_at_ms, id))?;
            if let Some(k) = &o.ordering_key {
                t.order.remove((r, k.as_str(), id))?;
            }
        }
        t.bump(r, o.state, false)?;
    }
    match new {
        Some((n, record)) => {
            let id = n.id.as_u128();
            let r = n.route.as_str();
            t.jobs.insert(id, record)?;
            if n.state.is_due_kind() {
                t.due.insert((r, n.next_attempt_at_ms, id), ())?;
            }
            if n.state.is_pending() {
                t.pending.insert((r, n.created_at_ms, id), ())?;
                if let Some(k) = &n.ordering_key {
                    t.order.insert((r, k.as_str(), id), ())?;
                }
            }
            if old.is_none() {
                t.by_route.insert((r, id), window_ms)?;
            }
            t.bump(r, n.state, true)?;
        }
        None => {
            if let Some(o) = old {
                let id = o.id.as_u128();
                t.jobs.remove(id)?;
                t.by_route.remove((o.route.as_str(), id))?;
            }
        }
    }
    Ok(())
}

fn must_load(t: &Tables<'_>, id: JobId) -> TxResult<Job> {
    load_job(&t.jobs, t.sealer.as_deref(), id)?.ok_or(TxError::Store(StoreError::NotFound))
}

// === writes ===

/// `job` is the new job's head (see [`head_only`]) and `record` its encoded (and sealed)
/// record: both are made on the caller's thread, so the writer only stores.
pub(super) fn enqueue(
    t: &mut Tables<'_>,
    job: Job,
    record: Vec<u8>,
    dedupe_window_ms: u64,
    max_depth: u64,
) -> TxResult<EnqueueStep> {
    let now = job.created_at_ms;
    // A generated key is the new job's own id: no other job can hold it.
    let generated = job.id.is_text(&job.idempotency_key);
    if !generated {
        if let Some((id, fingerprint)) = key_holder(t, &job.route, &job.idempotency_key, now)? {
            return Ok(if fingerprint == job.fingerprint {
                EnqueueStep::Duplicate(id)
            } else {
                EnqueueStep::KeyConflict(id)
            });
        }
    }
    let depth = t.count(&job.route, JobState::Queued)?
        + t.count(&job.route, JobState::InFlight)?
        + t.count(&job.route, JobState::Retrying)?;
    if depth >= max_depth {
        return Ok(EnqueueStep::QueueFull);
    }
    store_new(t, &job, &record, dedupe_window_ms)?;
    if let Some(log) = &mut t.log {
        push_entry(&mut log.payload, dedupe_window_ms, &record);
        log.ids.push(job.id);
    }
    Ok(EnqueueStep::Stored(job.id))
}

/// What [`enqueue`] needs of a job once its record is encoded: the fields the indexes and
/// the dedupe check read. The request's method, URI, headers and body are dropped here, on
/// the caller's thread, rather than one by one on the writer's.
pub(super) fn head_only(mut job: Job) -> Job {
    job.method = String::new();
    job.uri = String::new();
    job.headers = Vec::new();
    job.body = bytes::Bytes::new();
    job.traceparent = None;
    job
}

/// Stores again a job of a logged batch (`wal.rs`) as [`enqueue`] stored it: `record` as
/// logged, `dedupe_window_ms` the route's window then. A job already stored (the batch was in
/// the database after all) is left alone. Returns whether it was stored.
pub(super) fn replay_logged(
    t: &mut Tables<'_>,
    record: &[u8],
    dedupe_window_ms: u64,
) -> TxResult<bool> {
    let (job, _) = decode_job_head(record)?;
    if t.jobs.get(job.id.as_u128())?.is_some() {
        return Ok(false);
    }
    store_new(t, &job, record, dedupe_window_ms)?;
    Ok(true)
}

/// A new job and its key: a client's key gets its own row with the window; a generated one
/// (the job's id) keeps the window in the job's [`BY_ROUTE`] entry.
fn store_new(t: &mut Tables<'_>, job: &Job, record: &[u8], dedupe_window_ms: u64) -> TxResult<()> {
    let generated = job.id.is_text(&job.idempotency_key);
    if !generated {
        let rec = IdemRecordV1 {
            id: job.id.as_u128(),
            fingerprint: job.fingerprint,
            window_ms: dedupe_window_ms,
            expires_at_ms: u64::MAX,
        };
        t.idem.insert(
            (job.route.as_str(), job.idempotency_key.as_str()),
            encode_idem(&rec).as_slice(),
        )?;
    }
    let window_ms = if generated { dedupe_window_ms } else { 0 };
    put_record(t, None, Some((job, record)), window_ms)
}

/// The job holding `key` on `route` at `now`, and its fingerprint: while it is pending or
/// dead, and once delivered until its dedupe window ends.
fn key_holder(
    t: &Tables<'_>,
    route: &str,
    key: &str,
    now: u64,
) -> TxResult<Option<(JobId, [u8; 32])>> {
    // Heads are enough for the state, and need no decryption.
    if let Some(v) = t.idem.get((route, key))? {
        let rec = decode_idem(v.value())?;
        let id = JobId::from_u128(rec.id);
        let held = match load_head(&t.jobs, id)? {
            Some(j) => j.state != JobState::Delivered || now < rec.expires_at_ms,
            None => false,
        };
        return Ok(held.then_some((id, rec.fingerprint)));
    }
    // A key generated for an earlier job (a client repeating what the 202 told it) is that
    // job's id, and has no row of its own.
    let Ok(id) = key.parse::<JobId>() else {
        return Ok(None);
    };
    let Some(j) = load_head(&t.jobs, id)? else {
        return Ok(None);
    };
    if j.route != route || j.idempotency_key != key || !j.key_is_generated() {
        return Ok(None);
    }
    let held = j.state != JobState::Delivered
        || now < j.updated_at_ms.saturating_add(generated_key_window(t, &j)?);
    Ok(held.then_some((id, j.fingerprint)))
}

pub(super) fn lease_due(
    t: &mut Tables<'_>,
    route: &str,
    now_ms: u64,
    limit: usize,
) -> TxResult<Vec<Job>> {
    let ctl = route_record(&t.routes, route)?;
    if ctl.paused || ctl.paused_until_ms.is_some_and(|u| u > now_ms) || limit == 0 {
        return Ok(Vec::new());
    }
    let mut picked = Vec::new();
    let mut locked = Vec::new();
    for entry in t
        .due
        .range((route, 0u64, 0u128)..=(route, now_ms, u128::MAX))?
    {
        let (k, _) = entry?;
        let id = JobId::from_u128(k.value().2);
        let job = match load_stored(&t.jobs, t.sealer.as_deref(), id)? {
            Some(Stored::Open(job)) => job,
            // Never deliverable with the keys at hand, and left due it would be leased
            // again at once: dead-lettered below, with the reason naming the key.
            Some(Stored::Locked { head, raw, why }) => {
                locked.push((head, raw, why));
                continue;
            }
            None => continue,
        };
        if let Some(key) = &job.ordering_key {
            if first_in_order(&t.order, route, key)? != Some(id.as_u128()) {
                continue;
            }
        }
        picked.push(job);
        if picked.len() >= limit {
            break;
        }
    }
    for (old, raw, why) in locked {
        tracing::error!(job_id = %old.id, route, reason = %why, "stored job cannot be decrypted; dead-lettered");
        let mut new = old.clone();
        new.state = JobState::Dead;
        new.updated_at_ms = now_ms;
        new.dead_reason = Some(format!(
            "cannot decrypt the stored request: {why}; list the key under storage.encryption.keys, restart, then retry the job"
        ));
        put_locked(t, &old, &new, &raw)?;
    }
    let mut out = Vec::with_capacity(picked.len());
    for old in picked {
        let mut new = old.clone();
        new.state = JobState::InFlight;
        new.attempts = new.attempts.saturating_add(1);
        new.updated_at_ms = now_ms;
        put_job(t, Some(&old), Some(&new))?;
        out.push(new);
    }
    Ok(out)
}

pub(super) fn ack(t: &mut Tables<'_>, id: JobId, now_ms: u64) -> TxResult<()> {
    let old = must_load(t, id)?;
    if old.state == JobState::Delivered {
        return Ok(());
    }
    let mut new = old.clone();
    new.state = JobState::Delivered;
    new.updated_at_ms = now_ms;
    let mut expires = now_ms;
    if old.key_is_generated() {
        // The window starts now: `key_holder` counts it from the delivery (updated_at_ms).
        expires = now_ms.saturating_add(generated_key_window(t, &old)?);
    } else {
        let key = (old.route.as_str(), old.idempotency_key.as_str());
        let rec = match t.idem.get(key)? {
            Some(v) => Some(decode_idem(v.value())?),
            None => None,
        };
        if let Some(mut rec) = rec.filter(|r| r.id == id.as_u128()) {
            expires = now_ms.saturating_add(rec.window_ms);
            rec.expires_at_ms = expires;
            t.idem.insert(key, encode_idem(&rec).as_slice())?;
        }
    }
    t.expiry.insert((expires, id.as_u128()), ())?;
    put_job(t, Some(&old), Some(&new))
}

pub(super) fn reschedule(
    t: &mut Tables<'_>,
    id: JobId,
    next_attempt_at_ms: u64,
    last: LastOutcome,
) -> TxResult<()> {
    let old = must_load(t, id)?;
    if !old.state.is_pending() {
        return Ok(());
    }
    let mut new = old.clone();
    new.state = JobState::Retrying;
    new.next_attempt_at_ms = next_attempt_at_ms;
    new.updated_at_ms = last.at_ms;
    new.last = Some(truncate(last));
    put_job(t, Some(&old), Some(&new))
}

pub(super) fn dead_letter(
    t: &mut Tables<'_>,
    id: JobId,
    reason: String,
    last: Option<LastOutcome>,
) -> TxResult<()> {
    let old = must_load(t, id)?;
    if !old.state.is_pending() {
        return Ok(());
    }
    let mut new = old.clone();
    new.state = JobState::Dead;
    new.dead_reason = Some(reason);
    if let Some(last) = last {
        new.updated_at_ms = new.updated_at_ms.max(last.at_ms);
        new.last = Some(truncate(last));
    }
    put_job(t, Some(&old), Some(&new))
}

/// Due now; a job whose key is missing too (with the key still missing, the next lease
/// dead-letters it again).
fn make_due(t: &mut Tables<'_>, old: &Stored, now_ms: u64) -> TxResult<()> {
    let mut new = old.known().clone();
    if new.state == JobState::Dead {
        // A dead job brought back by an operator gets a fresh budget of attempts: with the
        // old count it would be dead again at its first lease (max_attempts, crash_loop).
        new.attempts = 0;
    }
    new.state = JobState::Retrying;
    new.next_attempt_at_ms = now_ms;
    new.updated_at_ms = now_ms;
    new.dead_reason = None;
    match old {
        Stored::Open(o) => put_job(t, Some(o), Some(&new)),
        Stored::Locked { head, raw, .. } => put_locked(t, head, &new, raw),
    }
}

pub(super) fn retry(t: &mut Tables<'_>, id: JobId, now_ms: u64) -> TxResult<bool> {
    let old = load_stored(&t.jobs, t.sealer.as_deref(), id)?
        .ok_or(TxError::Store(StoreError::NotFound))?;
    if !matches!(old.known().state, JobState::Dead | JobState::Retrying) {
        return Ok(false);
    }
    make_due(t, &old, now_ms)?;
    Ok(true)
}

/// Works without the job's key: removing needs only its clear fields.
pub(super) fn delete(t: &mut Tables<'_>, id: JobId) -> TxResult<bool> {
    let Some(old) = load_head(&t.jobs, id)? else {
        return Ok(false);
    };
    drop_idem_if_owned(t, &old)?;
    put_job(t, Some(&old), None)?;
    Ok(true)
}

fn drop_idem_if_owned(t: &mut Tables<'_>, job: &Job) -> TxResult<()> {
    if job.key_is_generated() {
        return Ok(());
    }
    let key = (job.route.as_str(), job.idempotency_key.as_str());
    let owned = match t.idem.get(key)? {
        Some(v) => decode_idem(v.value())?.id == job.id.as_u128(),
        None => false,
    };
    if owned {
        t.idem.remove(key)?;
    }
    Ok(())
}

pub(super) fn replay_dead(t: &mut Tables<'_>, route: &str, now_ms: u64) -> TxResult<u64> {
    let mut dead = Vec::new();
    for entry in t.by_route.range((route, 0u128)..=(route, u128::MAX))? {
        let (k, _) = entry?;
        // Only dead jobs are read in full (or found locked).
        let id = JobId::from_u128(k.value().1);
        if load_head(&t.jobs, id)?.is_some_and(|j| j.state == JobState::Dead) {
            if let Some(j) = load_stored(&t.jobs, t.sealer.as_deref(), id)? {
                dead.push(j);
            }
        }
    }
    for j in &dead {
        make_due(t, j, now_ms)?;
    }
    Ok(dead.len() as u64)
}

pub(super) fn set_route(
    t: &mut Tables<'_>,
    route: &str,
    change: impl FnOnce(&mut RouteRecordV1),
) -> TxResult<()> {
    let mut rec = route_record(&t.routes, route)?;
    change(&mut rec);
    t.routes.insert(route, encode_route(&rec).as_slice())?;
    Ok(())
}

pub(super) fn quota_acquire(
    t: &mut Tables<'_>,
    route: &str,
    index: usize,
    per_ms: u64,
    limit: u64,
    now_ms: u64,
) -> TxResult<Option<u64>> {
    let per = per_ms.max(1);
    let start = now_ms - now_ms % per;
    let key = (route, index as u64);
    let (win, count) = t.quotas.get(key)?.map(|v| v.value()).unwrap_or((start, 0));
    let count = if win == start { count } else { 0 };
    if count >= limit {
        return Ok(Some(start.saturating_add(per)));
    }
    t.quotas.insert(key, (start, count + 1))?;
    Ok(None)
}

pub(super) fn purge_expired(t: &mut Tables<'_>, now_ms: u64, batch: usize) -> TxResult<u64> {
    let mut expired: Vec<(u64, u128)> = Vec::new();
    for entry in t.expiry.range((0u64, 0u128)..(now_ms, 0u128))? {
        expired.push(entry?.0.value());
        if expired.len() >= batch {
            break;
        }
    }
    let mut purged = 0;
    for (exp, id) in expired {
        t.expiry.remove((exp, id))?;
        // Delivered jobs go by their clear fields: no decryption, and no key needed.
        let job = load_head(&t.jobs, JobId::from_u128(id))?;
        if let Some(job) = job.filter(|j| j.state == JobState::Delivered) {
            drop_idem_if_owned(t, &job)?;
            put_job(t, Some(&job), None)?;
            purged += 1;
        }
    }
    Ok(purged)
}

/// At open: every in_flight job becomes queued again, due now. Returns how many.
pub(super) fn recover_in_flight(t: &mut Tables<'_>, now_ms: u64) -> TxResult<u64> {
    let mut stuck = Vec::new();
    for entry in t.pending.iter()? {
        let (k, _) = entry?;
        let id = JobId::from_u128(k.value().2);
        // A job whose key is missing is requeued too: opening the store never needs a key.
        if load_head(&t.jobs, id)?.is_some_and(|j| j.state == JobState::InFlight) {
            if let Some(j) = load_stored(&t.jobs, t.sealer.as_deref(), id)? {
                stuck.push(j);
            }
        }
    }
    for old in &stuck {
        let mut new = old.known().clone();
        new.state = JobState::Queued;
        new.next_attempt_at_ms = now_ms;
        new.updated_at_ms = now_ms;
        match old {
            Stored::Open(o) => put_job(t, Some(o), Some(&new))?,
            Stored::Locked { head, raw, .. } => put_locked(t, head, &new, raw)?,
        }
    }
    Ok(stuck.len() as u64)
}
