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

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::RwLock;
use redb::{Database, DatabaseError, Durability, WriteTransaction};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use super::ops::{Tables, TxError};
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
}

/// The reserve file beside the database: `<file>.reserve`.
pub(super) fn reserve_path(db: &Path) -> std::path::PathBuf {
    let mut name = db.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".reserve");
    db.with_file_name(name)
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

/// How the read-write database is opened (at start and on every reopen).
pub type Opener = Arc<dyn Fn(&Path, usize) -> Result<Database, DatabaseError> + Send + Sync>;

/// The plain file opener.
pub fn file_opener() -> Opener {
    Arc::new(|path, cache_size| {
        let file = super::prealloc::open_file(path)?;
        redb::Builder::new()
            .set_cache_size(cache_size)
            .create_with_backend(super::prealloc::PreallocFile::new(file, path)?)
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

/// Opens the database file at `shared.path` (no checks; those ran at first open).
pub(super) fn open_database(shared: &Shared) -> Result<Database, DatabaseError> {
    (shared.opener)(&shared.path, shared.cache_size)
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
pub(super) fn run(shared: Arc<Shared>, mut rx: mpsc::Receiver<BoxRequest>) {
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
        let end = run_batch(&shared, &mut batch, &mut last_reopen);
        if matches!(end, BatchEnd::Failed { full: true, .. }) {
            enter_full_mode(&shared);
            last_reserve = Some(Instant::now());
        }
        for r in batch.drain(..) {
            r.finish(&end);
        }
    }
    shared.db.write().take();
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

fn current_db(shared: &Shared, last_reopen: &mut Option<Instant>) -> Result<Arc<Database>, String> {
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
) -> BatchEnd {
    let db = match current_db(shared, last_reopen) {
        Ok(db) => db,
        Err(message) => {
            return BatchEnd::Failed {
                full: false,
                message,
            }
        }
    };
    match apply_and_commit(shared, &db, batch) {
        Ok(()) => {
            shared.commits.fetch_add(1, Ordering::AcqRel);
            shared.healthy.store(true, Ordering::Release);
            BatchEnd::Committed
        }
        Err(e) => {
            tracing::error!(path = %shared.path.display(), error = %e, batch = batch.len(), "job store commit failed");
            shared.healthy.store(false, Ordering::Release);
            BatchEnd::from_error(&e)
        }
    }
}

fn apply_and_commit(
    shared: &Shared,
    db: &Database,
    batch: &mut [BoxRequest],
) -> Result<(), redb::Error> {
    let mut tx = db.begin_write()?;
    tx.set_durability(Durability::Immediate)?;
    if let Err(e) = apply_all(&tx, shared, batch) {
        tx.abort()?;
        return Err(e);
    }
    tx.commit()?;
    Ok(())
}

/// Every request of the batch against one set of open tables, then the counters written back.
fn apply_all(
    tx: &WriteTransaction,
    shared: &Shared,
    batch: &mut [BoxRequest],
) -> Result<(), redb::Error> {
    let mut tables = Tables::open(tx, shared.sealer.clone()).map_err(|e| as_storage(shared, e))?;
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
