//! The group-commit writer: one thread owns every write transaction.
//!
//! Callers send a [`Request`] over a bounded channel. The writer takes everything waiting (up to
//! [`MAX_BATCH`]), applies it all in one write transaction with immediate durability, commits
//! once, then answers every waiter: with its own result if the commit returned, or with
//! [`StoreError::Unavailable`] if it did not. After a storage failure the store is marked
//! unhealthy and the database is reopened on a later batch, at most once per [`REOPEN_EVERY`].
//!
//! Disk full: the store keeps a reserve file of [`RESERVE_BYTES`] beside the database. When a
//! commit fails for lack of space, the reserve is deleted and the store enters full mode:
//! enqueues are refused at once with [`StoreError::Full`] (nothing is written for them), while
//! the state changes of jobs already stored (lease, ack, reschedule, dead letter) go on in the
//! space the reserve gave back, so delivery drains the queue. Every [`REOPEN_EVERY`] the writer
//! tries to write the reserve again; once it fits, full mode ends and accepts resume on their
//! own.
//!
//! Accept log: a batch made only of enqueues is committed without durability and made durable
//! by an append to the accept log instead (see `wal.rs` for why and how it is recovered). Its
//! waiters are answered only after that append is synced. If the append fails, the batch's
//! jobs are deleted again in a durable commit and its waiters get [`StoreError::Unavailable`].

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::RwLock;
use redb::{Database, DatabaseError, Durability, WriteTransaction};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::ops::{Logged, Tables, TxError};
use super::schema::{ACCEPT_LOG_SEQ_KEY, META};
use super::wal::{self, AcceptLog};
use crate::queue::crypt::Sealer;
use crate::queue::StoreError;

/// Most requests applied in one write transaction.
pub const MAX_BATCH: usize = 256;
/// Least time between two attempts to reopen a failed database.
pub const REOPEN_EVERY: Duration = Duration::from_secs(1);
/// Space held back for state changes of stored jobs when the disk fills up.
pub const RESERVE_BYTES: u64 = 4 << 20;

/// State shared by the writer thread and the readers.
pub(super) struct Shared {
    pub db: RwLock<Option<Arc<Database>>>,
    pub healthy: AtomicBool,
    pub commits: AtomicU64,
    pub path: std::path::PathBuf,
    pub cache_size: usize,
    /// Opens the database read-write; tests swap in a fault-injecting storage backend.
    pub opener: Opener,
    /// Encryption at rest of job records, when configured.
    pub sealer: Option<Arc<Sealer>>,
    /// Full mode (see the module docs): enqueues are refused until the reserve fits again.
    pub full: AtomicBool,
    /// Commits made durable by the accept log rather than by redb.
    pub logged: AtomicU64,
}

/// A file beside the database: `<file><suffix>`.
pub(super) fn beside(db: &Path, suffix: &str) -> std::path::PathBuf {
    let mut name = db.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(suffix);
    db.with_file_name(name)
}

/// The reserve file beside the database: `<file>.reserve`.
pub(super) fn reserve_path(db: &Path) -> std::path::PathBuf {
    beside(db, ".reserve")
}

/// Writes the reserve file (zeros, synced) if it is not there at full size. It first writes
/// `probe` bytes, then cuts the file to [`RESERVE_BYTES`]: a probe larger than the reserve
/// proves room beyond it. `Err` when the disk has no room; a partial file is removed.
pub(super) fn ensure_reserve(db: &Path, probe: u64) -> std::io::Result<()> {
    use std::io::Write;
    let path = reserve_path(db);
    if std::fs::metadata(&path).is_ok_and(|m| m.len() >= RESERVE_BYTES) {
        return Ok(());
    }
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&path)?;
        let zeros = vec![0u8; 64 * 1024];
        let mut left = probe.max(RESERVE_BYTES);
        while left > 0 {
            let n = left.min(zeros.len() as u64) as usize;
            f.write_all(&zeros[..n])?;
            left -= n as u64;
        }
        // tmpfs and friends report ENOSPC only here for some writes.
        f.sync_all()?;
        f.set_len(RESERVE_BYTES)?;
        f.sync_all()
    };
    write().inspect_err(|_| {
        let _ = std::fs::remove_file(&path);
    })
}

/// How the read-write database is opened (at start and on every reopen): the caller's builder
/// says how (cache size, integrity check), the opener supplies the storage under it.
pub type Opener =
    Arc<dyn Fn(&Path, &redb::Builder) -> Result<Database, DatabaseError> + Send + Sync>;

/// The plain file opener.
pub fn file_opener() -> Opener {
    Arc::new(|path, builder| {
        let file = super::prealloc::open_file(path)?;
        builder.create_with_backend(super::prealloc::PreallocFile::new(file, path)?)
    })
}

impl Shared {
    pub fn corrupt(&self, message: String) -> StoreError {
        StoreError::Corrupt {
            path: self.path.clone(),
            message,
        }
    }

    pub fn map_tx_error(&self, e: TxError) -> StoreError {
        match e {
            TxError::Store(e) => e,
            TxError::Decode(m) => self.corrupt(m),
            TxError::Sealed(m) => StoreError::Sealed(m),
            TxError::Storage(e) => storage_error(&e),
        }
    }
}

/// One storage error as the caller sees it.
pub(super) fn storage_error(e: &redb::Error) -> StoreError {
    match e {
        redb::Error::Io(io) if io.kind() == std::io::ErrorKind::StorageFull => StoreError::Full,
        other => StoreError::Unavailable(other.to_string()),
    }
}

/// How a batch ended, for answering each of its waiters.
#[derive(Clone, Debug)]
pub(super) enum BatchEnd {
    Committed,
    Failed { full: bool, message: String },
}

impl BatchEnd {
    fn error(&self) -> Option<StoreError> {
        match self {
            BatchEnd::Committed => None,
            BatchEnd::Failed { full: true, .. } => Some(StoreError::Full),
            BatchEnd::Failed { message, .. } => Some(StoreError::Unavailable(message.clone())),
        }
    }

    fn from_error(e: &redb::Error) -> Self {
        match storage_error(e) {
            StoreError::Full => BatchEnd::Failed {
                full: true,
                message: e.to_string(),
            },
            _ => BatchEnd::Failed {
                full: false,
                message: e.to_string(),
            },
        }
    }
}

/// One waiter's work in a batch.
pub(super) trait Request: Send {
    /// Applies the work; an `Err` is storage trouble that fails the whole batch.
    fn apply(&mut self, t: &mut Tables<'_>, shared: &Shared) -> Result<(), redb::Error>;
    /// Answers the waiter once the batch ended.
    fn finish(self: Box<Self>, end: &BatchEnd);
    /// Whether the request adds to the store (an enqueue); refused in full mode.
    fn grows(&self) -> bool;
}

pub(super) type BoxRequest = Box<dyn Request>;

/// A request made from a closure; its result is sent only after the batch ended.
pub(super) struct Pending<R, F> {
    work: Option<F>,
    result: Option<Result<R, StoreError>>,
    reply: oneshot::Sender<Result<R, StoreError>>,
    grows: bool,
}

impl<R, F> Pending<R, F>
where
    R: Send + 'static,
    F: FnOnce(&mut Tables<'_>) -> Result<R, TxError> + Send + 'static,
{
    /// `grows`: the work adds to the store (see [`Request::grows`]).
    pub fn new(work: F, grows: bool) -> (Self, oneshot::Receiver<Result<R, StoreError>>) {
        let (reply, rx) = oneshot::channel();
        (
            Self {
                work: Some(work),
                result: None,
                reply,
                grows,
            },
            rx,
        )
    }
}

impl<R, F> Request for Pending<R, F>
where
    R: Send + 'static,
    F: FnOnce(&mut Tables<'_>) -> Result<R, TxError> + Send + 'static,
{
    fn apply(&mut self, t: &mut Tables<'_>, shared: &Shared) -> Result<(), redb::Error> {
        let Some(work) = self.work.take() else {
            return Ok(());
        };
        match work(t) {
            Ok(r) => self.result = Some(Ok(r)),
            Err(TxError::Storage(e)) => return Err(e),
            Err(e) => self.result = Some(Err(shared.map_tx_error(e))),
        }
        Ok(())
    }

    fn finish(self: Box<Self>, end: &BatchEnd) {
        let out = match (end.error(), self.result) {
            (Some(e), _) => Err(e),
            (None, Some(r)) => r,
            (None, None) => Err(StoreError::Unavailable("request was not applied".into())),
        };
        // The waiter may have gone away (request cancelled); nothing to do then.
        let _ = self.reply.send(out);
    }

    fn grows(&self) -> bool {
        self.grows
    }
}

/// Opens the database file at `shared.path` again (no integrity check: the first open ran it,
/// and redb still repairs what an unclean close left).
pub(super) fn open_database(shared: &Shared) -> Result<Database, DatabaseError> {
    (shared.opener)(
        &shared.path,
        redb::Builder::new().set_cache_size(shared.cache_size),
    )
}

/// `SPILLWAY_MAX_BATCH` lowers the batch bound (1 = one commit per request); it exists so
/// benchmarks can measure what group commit buys, not as a tuning knob.
fn max_batch() -> usize {
    std::env::var("SPILLWAY_MAX_BATCH")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .map_or(MAX_BATCH, |n| n.clamp(1, MAX_BATCH))
}

/// The writer loop; returns when every sender is gone.
pub(super) fn run(
    shared: Arc<Shared>,
    mut rx: mpsc::Receiver<BoxRequest>,
    mut log: Option<LogState>,
) {
    let stop = Arc::new(AtomicBool::new(false));
    let flusher = log.as_ref().and_then(|l| {
        wal::spawn_flusher(&shared.path, l.dirty.clone(), stop.clone())
            .inspect_err(|e| tracing::warn!(error = %e, "accept log: no background flush"))
            .ok()
    });
    let mut last_reopen: Option<Instant> = None;
    let mut last_reserve: Option<Instant> = None;
    let max_batch = max_batch();
    let mut batch: Vec<BoxRequest> = Vec::with_capacity(max_batch);
    // Waits for one request, then takes every other one already waiting, up to the bound.
    while rx.blocking_recv_many(&mut batch, max_batch) > 0 {
        if shared.full.load(Ordering::Acquire) {
            retry_reserve(&shared, &mut last_reserve);
        }
        if shared.full.load(Ordering::Acquire) {
            // Refused before any write: nothing of them is stored.
            let refused = BatchEnd::Failed {
                full: true,
                message: "the disk is full".into(),
            };
            let (grow, keep): (Vec<_>, Vec<_>) = batch.drain(..).partition(|r| r.grows());
            for r in grow {
                r.finish(&refused);
            }
            batch = keep;
            if batch.is_empty() {
                continue;
            }
        }
        let end = run_batch(&shared, &mut batch, &mut last_reopen, log.as_mut());
        if matches!(end, BatchEnd::Failed { full: true, .. }) {
            enter_full_mode(&shared);
            last_reserve = Some(Instant::now());
        }
        for r in batch.drain(..) {
            r.finish(&end);
        }
    }
    // Logged batches into a durable commit, so the next start has nothing to replay.
    if let (Some(l), Some(db)) = (log.as_mut(), shared.db.read().clone()) {
        if l.log.used() > 0 && shared.healthy.load(Ordering::Acquire) {
            match apply_and_commit(&shared, &db, &mut [], None) {
                Ok(_) => l.durable(false),
                Err(e) => tracing::warn!(error = %e, "job store: final commit failed"),
            }
        }
    }
    stop.store(true, Ordering::Release);
    if let Some(f) = flusher {
        f.thread().unpark();
        let _ = f.join();
    }
    shared.db.write().take();
}

/// The accept log as the writer keeps it.
pub(super) struct LogState {
    pub log: AcceptLog,
    /// When logged batches last went into a durable commit.
    last_durable: Instant,
    /// The last attempt to make a failed log ready again.
    last_ready_try: Option<Instant>,
    /// The batch whose append failed, while the database may not hold its retraction: never
    /// applied again (its waiters were refused).
    failed_seq: Option<u64>,
    /// Logged batches are outstanding (for the background flush).
    dirty: Arc<AtomicBool>,
}

impl LogState {
    pub fn new(log: AcceptLog) -> Self {
        Self {
            log,
            last_durable: Instant::now(),
            last_ready_try: None,
            failed_seq: None,
            dirty: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Whether `batch` may go to the log: only enqueues, and only while the batches outside a
    /// durable commit are few and recent.
    fn open_for(&self, batch: &[BoxRequest]) -> bool {
        self.log.is_ready()
            && self.last_durable.elapsed() < wal::CHECKPOINT_EVERY
            && self.log.used() < wal::CHECKPOINT_BYTES
            && batch.iter().all(|r| r.grows())
    }

    /// A durable commit returned: every logged batch is in the database. With `retry`, a log
    /// that failed is made ready again, at most once per [`REOPEN_EVERY`].
    fn durable(&mut self, retry: bool) {
        self.last_durable = Instant::now();
        self.dirty.store(false, Ordering::Release);
        if self.log.is_ready() {
            self.log.restart();
            return;
        }
        if !retry
            || self
                .last_ready_try
                .is_some_and(|t| t.elapsed() < REOPEN_EVERY)
        {
            return;
        }
        self.last_ready_try = Some(Instant::now());
        match self.log.make_ready() {
            Ok(()) => tracing::info!(path = %self.log.path().display(), "accept log in use again"),
            Err(e) => {
                tracing::warn!(path = %self.log.path().display(), error = %e, "accept log still unusable; accepts commit to the database")
            }
        }
    }
}

/// Why the accept log could not be recovered.
#[derive(Debug)]
pub(super) enum RecoverError {
    /// Reading the log or committing its batches failed.
    Unavailable(String),
    /// A batch of the log does not decode.
    Corrupt(String),
}

/// Applies the batches of the log that `db` does not hold yet, in one durable commit, then
/// makes the log ready for appends (a failure there only leaves it unused). Returns how many
/// jobs were stored again.
pub(super) fn recover_log(
    db: &Database,
    l: &mut LogState,
    sealer: Option<Arc<Sealer>>,
) -> Result<u64, RecoverError> {
    use redb::ReadableTable;
    let path = l.log.path().display().to_string();
    let batches = l.log.read_batches().map_err(|e| match e.kind() {
        std::io::ErrorKind::InvalidData => RecoverError::Corrupt(e.to_string()),
        _ => RecoverError::Unavailable(format!("{path}: {e}")),
    })?;
    let storage = |e: TxError| match e {
        TxError::Decode(m) | TxError::Sealed(m) => RecoverError::Corrupt(m),
        TxError::Store(e) => RecoverError::Unavailable(e.to_string()),
        TxError::Storage(e) => RecoverError::Unavailable(e.to_string()),
    };
    let failed = l.failed_seq;
    let stored = (|| -> Result<u64, TxError> {
        let mut tx = db.begin_write()?;
        tx.set_durability(Durability::Immediate)?;
        let mut stored = 0;
        {
            let mut meta = tx.open_table(META)?;
            let held = meta.get(ACCEPT_LOG_SEQ_KEY)?.map_or(0, |v| v.value());
            let last = batches.last().map_or(0, |b| b.seq).max(held);
            let mut t = Tables::open(&tx, sealer)?;
            for b in batches
                .iter()
                .filter(|b| b.seq > held && Some(b.seq) != failed)
            {
                for e in &b.entries {
                    stored += u64::from(super::ops::replay_logged(&mut t, &e.record, e.window_ms)?);
                }
            }
            t.finish()?;
            meta.insert(ACCEPT_LOG_SEQ_KEY, last)?;
            l.log.continue_after(last);
        }
        tx.commit()?;
        Ok(stored)
    })()
    .map_err(storage)?;
    l.failed_seq = None;
    l.durable(false);
    if let Err(e) = l.log.make_ready() {
        tracing::warn!(path = %path, error = %e, "accept log unusable; accepts commit to the database");
    }
    if stored > 0 {
        tracing::info!(path = %path, jobs = stored, "accepted jobs restored from the accept log");
    }
    Ok(stored)
}

/// The disk is full: give the reserve back for state changes and refuse enqueues.
fn enter_full_mode(shared: &Shared) {
    if shared.full.swap(true, Ordering::AcqRel) {
        return;
    }
    let released = std::fs::remove_file(reserve_path(&shared.path)).is_ok();
    tracing::error!(
        path = %shared.path.display(),
        released_reserve = released,
        "disk full: accepts answer 503 until space returns; stored jobs keep being delivered"
    );
}

/// In full mode, at most once per [`REOPEN_EVERY`]: if the reserve fits again, leave it.
fn retry_reserve(shared: &Shared, last: &mut Option<Instant>) {
    if last.is_some_and(|t| t.elapsed() < REOPEN_EVERY) {
        return;
    }
    *last = Some(Instant::now());
    // Leave full mode only with room for the reserve and as much again for accepts;
    // otherwise the next accept would fill the disk at once.
    if ensure_reserve(&shared.path, 2 * RESERVE_BYTES).is_ok() {
        shared.full.store(false, Ordering::Release);
        tracing::info!(path = %shared.path.display(), "disk space is back; accepting again");
    }
}

fn current_db(
    shared: &Shared,
    last_reopen: &mut Option<Instant>,
    log: Option<&mut LogState>,
) -> Result<Arc<Database>, String> {
    if shared.healthy.load(Ordering::Acquire) {
        if let Some(db) = shared.db.read().clone() {
            return Ok(db);
        }
    }
    if last_reopen.is_some_and(|t| t.elapsed() < REOPEN_EVERY) {
        return Err("the store failed and is waiting to reopen".into());
    }
    *last_reopen = Some(Instant::now());
    // Drop our handle first so the file lock can be taken again.
    shared.db.write().take();
    match open_database(shared) {
        Ok(db) => {
            // What the log holds beyond the database's last durable commit, before any use.
            if let Some(l) = log {
                if let Err(RecoverError::Unavailable(m) | RecoverError::Corrupt(m)) =
                    recover_log(&db, l, shared.sealer.clone())
                {
                    let log = l.log.path().display().to_string();
                    tracing::warn!(path = %log, error = %m, "accept log recovery failed");
                    return Err(format!("accept log {log}: recovery failed: {m}"));
                }
            }
            let db = Arc::new(db);
            *shared.db.write() = Some(db.clone());
            tracing::info!(path = %shared.path.display(), "job store reopened");
            Ok(db)
        }
        Err(e) => {
            tracing::warn!(path = %shared.path.display(), error = %e, "job store reopen failed");
            Err(format!("reopen failed: {e}"))
        }
    }
}

fn run_batch(
    shared: &Shared,
    batch: &mut [BoxRequest],
    last_reopen: &mut Option<Instant>,
    mut log: Option<&mut LogState>,
) -> BatchEnd {
    let db = match current_db(shared, last_reopen, log.as_deref_mut()) {
        Ok(db) => db,
        Err(message) => {
            return BatchEnd::Failed {
                full: false,
                message,
            }
        }
    };
    let logging = log.as_deref().filter(|l| l.open_for(batch)).map(|l| &l.log);
    let commit = apply_and_commit(shared, &db, batch, logging);
    match (commit, log) {
        (Ok(Commit::Logged { seq, logged }), Some(l)) => match l.log.append(seq, &logged.payload) {
            Ok(()) => {
                shared.commits.fetch_add(1, Ordering::AcqRel);
                shared.logged.fetch_add(1, Ordering::AcqRel);
                shared.healthy.store(true, Ordering::Release);
                l.dirty.store(true, Ordering::Release);
                BatchEnd::Committed
            }
            Err(e) => {
                tracing::error!(path = %l.log.path().display(), error = %e, batch = batch.len(), "accept log append failed; the batch is refused");
                l.failed_seq = Some(seq);
                retract(shared, &db, &logged.ids, l);
                BatchEnd::Failed {
                    full: false,
                    message: format!("accept log: {e}"),
                }
            }
        },
        // Logged only when a log was given; never answered as durable without it.
        (Ok(Commit::Logged { .. }), None) => BatchEnd::Failed {
            full: false,
            message: "a logged batch without the accept log".into(),
        },
        (Ok(Commit::Nothing), _) => {
            shared.healthy.store(true, Ordering::Release);
            BatchEnd::Committed
        }
        (Ok(Commit::Durable), log) => {
            shared.commits.fetch_add(1, Ordering::AcqRel);
            shared.healthy.store(true, Ordering::Release);
            if let Some(l) = log {
                l.durable(!shared.full.load(Ordering::Acquire));
            }
            BatchEnd::Committed
        }
        (Err(e), _) => {
            tracing::error!(path = %shared.path.display(), error = %e, batch = batch.len(), "job store commit failed");
            shared.healthy.store(false, Ordering::Release);
            BatchEnd::from_error(&e)
        }
    }
}

/// How a batch's commit returned.
enum Commit {
    /// Durable in the database.
    Durable,
    /// In the database without durability: durable once `logged` is appended to the log as
    /// batch `seq`.
    Logged { seq: u64, logged: Logged },
    /// Without durability and with nothing stored (duplicates, refusals): nothing to make
    /// durable, and earlier logged batches are still outside a durable commit.
    Nothing,
}

/// Applies the batch in one write transaction and commits it: durably, or, with `logging`,
/// without durability when the batch stored jobs that fit in the log.
fn apply_and_commit(
    shared: &Shared,
    db: &Database,
    batch: &mut [BoxRequest],
    logging: Option<&AcceptLog>,
) -> Result<Commit, redb::Error> {
    let mut tx = db.begin_write()?;
    tx.set_durability(Durability::Immediate)?;
    let logged = match apply_all(&tx, shared, batch, logging.is_some()) {
        Ok(l) => l,
        Err(e) => {
            tx.abort()?;
            return Err(e);
        }
    };
    let commit = match (logging, logged) {
        (Some(_), Some(l)) if l.ids.is_empty() => Commit::Nothing,
        (Some(log), Some(l)) if log.fits(l.payload.len()) => {
            let seq = log.next_seq();
            tx.open_table(META)?.insert(ACCEPT_LOG_SEQ_KEY, seq)?;
            Commit::Logged { seq, logged: l }
        }
        _ => Commit::Durable,
    };
    if !matches!(commit, Commit::Durable) {
        tx.set_durability(Durability::None)?;
    }
    tx.commit()?;
    Ok(commit)
}

/// Takes a batch whose append failed back out of the database, durably: its waiters are
/// refused, so its jobs must not be delivered. If that fails too, the database is reopened
/// later and recovery skips the batch (`failed_seq`).
fn retract(shared: &Shared, db: &Database, ids: &[super::JobId], l: &mut LogState) {
    let res = (|| -> Result<(), TxError> {
        let mut tx = db.begin_write()?;
        tx.set_durability(Durability::Immediate)?;
        let mut t = Tables::open(&tx, shared.sealer.clone())?;
        for id in ids {
            super::ops::delete(&mut t, *id)?;
        }
        t.finish()?;
        tx.commit()?;
        Ok(())
    })();
    match res {
        Ok(()) => {
            l.failed_seq = None;
            l.durable(!shared.full.load(Ordering::Acquire));
        }
        Err(e) => {
            tracing::error!(path = %shared.path.display(), error = ?e, "taking a refused batch back failed; reopening the store");
            shared.healthy.store(false, Ordering::Release);
        }
    }
}

/// Every request of the batch against one set of open tables, then the counters written back.
/// With `log`, returns what the batch stored, for the accept log.
fn apply_all(
    tx: &WriteTransaction,
    shared: &Shared,
    batch: &mut [BoxRequest],
    log: bool,
) -> Result<Option<Logged>, redb::Error> {
    let mut tables = Tables::open(tx, shared.sealer.clone()).map_err(|e| as_storage(shared, e))?;
    if log {
        tables.log_new_jobs();
    }
    for r in batch.iter_mut() {
        r.apply(&mut tables, shared)?;
    }
    tables.finish().map_err(|e| as_storage(shared, e))
}

/// Opening tables and writing counters fail only on storage trouble; a record that does not
/// decode there is reported the same way, failing the batch.
fn as_storage(shared: &Shared, e: TxError) -> redb::Error {
    match e {
        TxError::Storage(e) => e,
        other => redb::StorageError::Corrupted(shared.map_tx_error(other).to_string()).into(),
    }
}
