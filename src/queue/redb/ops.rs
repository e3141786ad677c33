//! What each write does inside the writer's transaction, and the reads beside them.
//!
//! Every change to a job goes through [`put_job`], which keeps the index tables and the
//! per-route counters in step with the job record in the same transaction.

use redb::{ReadableTable, WriteTransaction};

use super::schema::{
    decode_idem, decode_job, decode_route, encode_idem, encode_job, encode_route, DecodeError,
    IdemRecordV1, RouteRecordV1, BY_ROUTE, COUNTERS, DUE, EXPIRY, IDEM, JOBS, ORDER, PENDING,
    QUOTAS, ROUTES,
};
use crate::queue::{Job, JobId, JobState, LastOutcome, NewJob, StoreError, BODY_PREFIX_MAX};

/// A failed step: either the caller's answer (`Store`), a record that does not decode, or
/// storage trouble that fails the whole batch.
#[derive(Debug)]
pub(super) enum TxError {
    Store(StoreError),
    Decode(String),
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
        TxError::Decode(e.0)
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
    id: JobId,
) -> TxResult<Option<Job>> {
    match t.get(id.as_u128())? {
        Some(v) => Ok(Some(decode_job(v.value())?)),
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

pub(super) fn next_due(
    t: &impl ReadableTable<(&'static str, u64, u128), ()>,
    route: &str,
) -> TxResult<Option<u64>> {
    let mut r = t.range((route, 0u64, 0u128)..=(route, u64::MAX, u128::MAX))?;
    match r.next() {
        Some(e) => Ok(Some(e?.0.value().1)),
        None => Ok(None),
    }
}

fn truncate(mut last: LastOutcome) -> LastOutcome {
    last.body_prefix.truncate(BODY_PREFIX_MAX);
    last
}

// === put_job ===

fn bump(tx: &WriteTransaction, route: &str, state: JobState, up: bool) -> TxResult<()> {
    let mut t = tx.open_table(COUNTERS)?;
    let cur = counter(&t, route, state)?;
    let next = if up { cur + 1 } else { cur.saturating_sub(1) };
    t.insert((route, state.as_str()), next)?;
    Ok(())
}

/// Replaces `old` by `new` (either may be absent), keeping every index and counter in step.
pub(super) fn put_job(tx: &WriteTransaction, old: Option<&Job>, new: Option<&Job>) -> TxResult<()> {
    if let Some(o) = old {
        let id = o.id.as_u128();
        let r = o.route.as_str();
        if o.state.is_due_kind() {
            tx.open_table(DUE)?.remove((r, o.next_attempt_at_ms, id))?;
        }
        if o.state.is_pending() {
            tx.open_table(PENDING)?.remove((r, o.created_at_ms, id))?;
            if let Some(k) = &o.ordering_key {
                tx.open_table(ORDER)?.remove((r, k.as_str(), id))?;
            }
        }
        bump(tx, r, o.state, false)?;
    }
    match new {
        Some(n) => {
            let id = n.id.as_u128();
            let r = n.route.as_str();
            tx.open_table(JOBS)?.insert(id, encode_job(n).as_slice())?;
            if n.state.is_due_kind() {
                tx.open_table(DUE)?
                    .insert((r, n.next_attempt_at_ms, id), ())?;
            }
            if n.state.is_pending() {
                tx.open_table(PENDING)?
                    .insert((r, n.created_at_ms, id), ())?;
                if let Some(k) = &n.ordering_key {
                    tx.open_table(ORDER)?.insert((r, k.as_str(), id), ())?;
                }
            }
            if old.is_none() {
                tx.open_table(BY_ROUTE)?.insert((r, id), ())?;
            }
            bump(tx, r, n.state, true)?;
        }
        None => {
            if let Some(o) = old {
                let id = o.id.as_u128();
                tx.open_table(JOBS)?.remove(id)?;
                tx.open_table(BY_ROUTE)?.remove((o.route.as_str(), id))?;
            }
        }
    }
    Ok(())
}

fn must_load(tx: &WriteTransaction, id: JobId) -> TxResult<Job> {
    let t = tx.open_table(JOBS)?;
    load_job(&t, id)?.ok_or(TxError::Store(StoreError::NotFound))
}

// === writes ===

pub(super) fn enqueue(
    tx: &WriteTransaction,
    job: NewJob,
    dedupe_window_ms: u64,
    max_depth: u64,
) -> TxResult<EnqueueStep> {
    let now = job.created_at_ms;
    let existing = {
        let idem = tx.open_table(IDEM)?;
        let rec = match idem.get((job.route.as_str(), job.idempotency_key.as_str()))? {
            Some(v) => Some(decode_idem(v.value())?),
            None => None,
        };
        rec
    };
    if let Some(rec) = existing {
        let held = {
            let jobs = tx.open_table(JOBS)?;
            match load_job(&jobs, JobId::from_u128(rec.id))? {
                Some(j) => j.state != JobState::Delivered || now < rec.expires_at_ms,
                None => false,
            }
        };
        if held {
            let id = JobId::from_u128(rec.id);
            return Ok(if rec.fingerprint == job.fingerprint {
                EnqueueStep::Duplicate(id)
            } else {
                EnqueueStep::KeyConflict(id)
            });
        }
    }
    let depth = {
        let c = tx.open_table(COUNTERS)?;
        counter(&c, &job.route, JobState::Queued)?
            + counter(&c, &job.route, JobState::InFlight)?
            + counter(&c, &job.route, JobState::Retrying)?
    };
    if depth >= max_depth {
        return Ok(EnqueueStep::QueueFull);
    }
    let job = Job::from_new(job);
    let rec = IdemRecordV1 {
        id: job.id.as_u128(),
        fingerprint: job.fingerprint,
        window_ms: dedupe_window_ms,
        expires_at_ms: u64::MAX,
    };
    tx.open_table(IDEM)?.insert(
        (job.route.as_str(), job.idempotency_key.as_str()),
        encode_idem(&rec).as_slice(),
    )?;
    put_job(tx, None, Some(&job))?;
    Ok(EnqueueStep::Stored(job.id))
}

pub(super) fn lease_due(
    tx: &WriteTransaction,
    route: &str,
    now_ms: u64,
    limit: usize,
) -> TxResult<Vec<Job>> {
    let ctl = route_record(&tx.open_table(ROUTES)?, route)?;
    if ctl.paused || ctl.paused_until_ms.is_some_and(|u| u > now_ms) || limit == 0 {
        return Ok(Vec::new());
    }
    let mut picked = Vec::new();
    {
        let due = tx.open_table(DUE)?;
        let jobs = tx.open_table(JOBS)?;
        let order = tx.open_table(ORDER)?;
        for entry in due.range((route, 0u64, 0u128)..=(route, now_ms, u128::MAX))? {
            let (k, _) = entry?;
            let id = JobId::from_u128(k.value().2);
            let Some(job) = load_job(&jobs, id)? else {
                continue;
            };
            if let Some(key) = &job.ordering_key {
                if first_in_order(&order, route, key)? != Some(id.as_u128()) {
                    continue;
                }
            }
            picked.push(job);
            if picked.len() >= limit {
                break;
            }
        }
    }
    let mut out = Vec::with_capacity(picked.len());
    for old in picked {
        let mut new = old.clone();
        new.state = JobState::InFlight;
        new.attempts = new.attempts.saturating_add(1);
        new.updated_at_ms = now_ms;
        put_job(tx, Some(&old), Some(&new))?;
        out.push(new);
    }
    Ok(out)
}

pub(super) fn ack(tx: &WriteTransaction, id: JobId, now_ms: u64) -> TxResult<()> {
    let old = must_load(tx, id)?;
    if old.state == JobState::Delivered {
        return Ok(());
    }
    let mut new = old.clone();
    new.state = JobState::Delivered;
    new.updated_at_ms = now_ms;
    let mut expires = now_ms;
    {
        let mut idem = tx.open_table(IDEM)?;
        let key = (old.route.as_str(), old.idempotency_key.as_str());
        let rec = match idem.get(key)? {
            Some(v) => Some(decode_idem(v.value())?),
            None => None,
        };
        if let Some(mut rec) = rec.filter(|r| r.id == id.as_u128()) {
            expires = now_ms.saturating_add(rec.window_ms);
            rec.expires_at_ms = expires;
            idem.insert(key, encode_idem(&rec).as_slice())?;
        }
    }
    tx.open_table(EXPIRY)?.insert((expires, id.as_u128()), ())?;
    put_job(tx, Some(&old), Some(&new))
}

pub(super) fn reschedule(
    tx: &WriteTransaction,
    id: JobId,
    next_attempt_at_ms: u64,
    last: LastOutcome,
) -> TxResult<()> {
    let old = must_load(tx, id)?;
    if !old.state.is_pending() {
        return Ok(());
    }
    let mut new = old.clone();
    new.state = JobState::Retrying;
    new.next_attempt_at_ms = next_attempt_at_ms;
    new.updated_at_ms = last.at_ms;
    new.last = Some(truncate(last));
    put_job(tx, Some(&old), Some(&new))
}

pub(super) fn dead_letter(
    tx: &WriteTransaction,
    id: JobId,
    reason: String,
    last: Option<LastOutcome>,
) -> TxResult<()> {
    let old = must_load(tx, id)?;
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
    put_job(tx, Some(&old), Some(&new))
}

fn make_due(tx: &WriteTransaction, old: &Job, now_ms: u64) -> TxResult<()> {
    let mut new = old.clone();
    new.state = JobState::Retrying;
    new.next_attempt_at_ms = now_ms;
    new.updated_at_ms = now_ms;
    new.dead_reason = None;
    put_job(tx, Some(old), Some(&new))
}

pub(super) fn retry(tx: &WriteTransaction, id: JobId, now_ms: u64) -> TxResult<bool> {
    let old = must_load(tx, id)?;
    if !matches!(old.state, JobState::Dead | JobState::Retrying) {
        return Ok(false);
    }
    make_due(tx, &old, now_ms)?;
    Ok(true)
}

pub(super) fn delete(tx: &WriteTransaction, id: JobId) -> TxResult<bool> {
    let old = {
        let t = tx.open_table(JOBS)?;
        load_job(&t, id)?
    };
    let Some(old) = old else {
        return Ok(false);
    };
    drop_idem_if_owned(tx, &old)?;
    put_job(tx, Some(&old), None)?;
    Ok(true)
}

fn drop_idem_if_owned(tx: &WriteTransaction, job: &Job) -> TxResult<()> {
    let mut idem = tx.open_table(IDEM)?;
    let key = (job.route.as_str(), job.idempotency_key.as_str());
    let owned = match idem.get(key)? {
        Some(v) => decode_idem(v.value())?.id == job.id.as_u128(),
        None => false,
    };
    if owned {
        idem.remove(key)?;
    }
    Ok(())
}

pub(super) fn replay_dead(tx: &WriteTransaction, route: &str, now_ms: u64) -> TxResult<u64> {
    let dead = {
        let by_route = tx.open_table(BY_ROUTE)?;
        let jobs = tx.open_table(JOBS)?;
        let mut dead = Vec::new();
        for entry in by_route.range((route, 0u128)..=(route, u128::MAX))? {
            let (k, _) = entry?;
            if let Some(j) = load_job(&jobs, JobId::from_u128(k.value().1))? {
                if j.state == JobState::Dead {
                    dead.push(j);
                }
            }
        }
        dead
    };
    for j in &dead {
        make_due(tx, j, now_ms)?;
    }
    Ok(dead.len() as u64)
}

pub(super) fn set_route(
    tx: &WriteTransaction,
    route: &str,
    change: impl FnOnce(&mut RouteRecordV1),
) -> TxResult<()> {
    let mut t = tx.open_table(ROUTES)?;
    let mut rec = route_record(&t, route)?;
    change(&mut rec);
    t.insert(route, encode_route(&rec).as_slice())?;
    Ok(())
}

pub(super) fn quota_acquire(
    tx: &WriteTransaction,
    route: &str,
    index: usize,
    per_ms: u64,
    limit: u64,
    now_ms: u64,
) -> TxResult<Option<u64>> {
    let per = per_ms.max(1);
    let start = now_ms - now_ms % per;
    let mut t = tx.open_table(QUOTAS)?;
    let key = (route, index as u64);
    let (win, count) = t.get(key)?.map(|v| v.value()).unwrap_or((start, 0));
    let count = if win == start { count } else { 0 };
    if count >= limit {
        return Ok(Some(start.saturating_add(per)));
    }
    t.insert(key, (start, count + 1))?;
    Ok(None)
}

pub(super) fn purge_expired(tx: &WriteTransaction, now_ms: u64, batch: usize) -> TxResult<u64> {
    let expired: Vec<(u64, u128)> = {
        let t = tx.open_table(EXPIRY)?;
        let mut v = Vec::new();
        for entry in t.range((0u64, 0u128)..(now_ms, 0u128))? {
            v.push(entry?.0.value());
            if v.len() >= batch {
                break;
            }
        }
        v
    };
    let mut purged = 0;
    for (exp, id) in expired {
        tx.open_table(EXPIRY)?.remove((exp, id))?;
        let job = {
            let t = tx.open_table(JOBS)?;
            load_job(&t, JobId::from_u128(id))?
        };
        if let Some(job) = job.filter(|j| j.state == JobState::Delivered) {
            drop_idem_if_owned(tx, &job)?;
            put_job(tx, Some(&job), None)?;
            purged += 1;
        }
    }
    Ok(purged)
}

/// At open: every in_flight job becomes queued again, due now. Returns how many.
pub(super) fn recover_in_flight(tx: &WriteTransaction, now_ms: u64) -> TxResult<u64> {
    let stuck = {
        let pending = tx.open_table(PENDING)?;
        let jobs = tx.open_table(JOBS)?;
        let mut v = Vec::new();
        for entry in pending.iter()? {
            let (k, _) = entry?;
            if let Some(j) = load_job(&jobs, JobId::from_u128(k.value().2))? {
                if j.state == JobState::InFlight {
                    v.push(j);
                }
            }
        }
        v
    };
    for old in &stuck {
        let mut new = old.clone();
        new.state = JobState::Queued;
        new.next_attempt_at_ms = now_ms;
        new.updated_at_ms = now_ms;
        put_job(tx, Some(old), Some(&new))?;
    }
    Ok(stuck.len() as u64)
}
