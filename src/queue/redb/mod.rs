//! `RedbStore`: the embedded backend of [`JobStore`]: open, recover (in_flight → queued), and the
//! trait, with writes through the group-commit writer and reads in read transactions.
//!
//! Invariants: only the writer thread (`commit.rs`) opens write transactions after open; a file
//! that is not ours or has a newer schema is refused before anything is written to it.

mod commit;
mod ops;
mod prealloc;
pub mod repair;
pub mod schema;
pub(crate) mod wal;

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use parking_lot::{Mutex, RwLock};
use redb::{Database, DatabaseError, ReadTransaction, ReadableDatabase, WriteTransaction};
use tokio::sync::mpsc;

use self::commit::{BoxRequest, LogState, Pending, RecoverError, Shared};
use self::ops::{EnqueueStep, TxError};
use self::schema::{SCHEMA_VERSION, SCHEMA_VERSION_KEY};
use super::crypt::Sealer;
use super::{
    Durable, EnqueueOutcome, Job, JobId, JobState, JobStore, LastOutcome, NewJob, RouteStats,
    StoreError,
};

pub(crate) use self::commit::Opener;
pub use self::commit::MAX_BATCH;
pub use self::prealloc::{open_file, PreallocFile};

/// Requests that may wait for the writer; an enqueue beyond this answers `Busy`.
pub const CHANNEL_CAPACITY: usize = 1024;

/// The redb job store. Dropping it stops the writer after the batch in progress.
pub struct RedbStore {
    shared: Arc<Shared>,
    tx: Option<mpsc::Sender<BoxRequest>>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn open_error(path: &Path, e: DatabaseError) -> StoreError {
    match e {
        DatabaseError::DatabaseAlreadyOpen => StoreError::AlreadyOpen {
            path: path.to_path_buf(),
        },
        DatabaseError::Storage(redb::StorageError::Io(io))
            if !matches!(
                io.kind(),
                std::io::ErrorKind::InvalidData | std::io::ErrorKind::UnexpectedEof
            ) =>
        {
            StoreError::Unavailable(format!("{}: {io}", path.display()))
        }
        other => StoreError::Corrupt {
            path: path.to_path_buf(),
            message: other.to_string(),
        },
    }
}

fn tx_open_error(path: &Path, e: TxError) -> StoreError {
    match e {
        TxError::Store(e) => e,
        TxError::Decode(message) => StoreError::Corrupt {
            path: path.to_path_buf(),
            message,
        },
        TxError::Sealed(message) => StoreError::Sealed(message),
        TxError::Storage(e) => StoreError::Corrupt {
            path: path.to_path_buf(),
            message: e.to_string(),
        },
    }
}

fn check_schema(path: &Path, found: Option<u64>) -> Result<(), StoreError> {
    match found {
        Some(v) if v > SCHEMA_VERSION => Err(StoreError::NewerSchema {
            path: path.to_path_buf(),
            found: v,
            supported: SCHEMA_VERSION,
        }),
        _ => Ok(()),
    }
}

fn read_schema(tx: &ReadTransaction) -> Result<Option<u64>, TxError> {
    match tx.open_table(schema::META) {
        Ok(t) => Ok(redb::ReadableTable::get(&t, SCHEMA_VERSION_KEY)?.map(|v| v.value())),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Creates every table, brings an older schema up to date, writes the schema version and
/// requeues in_flight jobs.
fn init(tx: &WriteTransaction, now: u64, sealer: Option<Arc<Sealer>>) -> Result<u64, TxError> {
    {
        let mut meta = tx.open_table(schema::META)?;
        let found = redb::ReadableTable::get(&meta, SCHEMA_VERSION_KEY)?.map(|v| v.value());
        if found == Some(1) {
            let moved = migrate_v1(tx)?;
            tracing::info!(jobs = moved, "job store migrated from schema 1 to 2");
        }
        if found != Some(SCHEMA_VERSION) {
            meta.insert(SCHEMA_VERSION_KEY, SCHEMA_VERSION)?;
        }
    }
    let mut tables = ops::Tables::open(tx, sealer)?;
    let n = ops::recover_in_flight(&mut tables, now)?;
    tables.finish()?;
    Ok(n)
}

/// Schema 1 to 2: the per-route table gets a value (see `schema::BY_ROUTE`), in the caller's
/// transaction, so a crash leaves either schema whole. Jobs of schema 1 all have their own
/// idempotency rows, so every entry gets the value 0. Returns how many entries moved.
fn migrate_v1(tx: &WriteTransaction) -> Result<u64, TxError> {
    use redb::ReadableTable;
    let mut by_route = tx.open_table(schema::BY_ROUTE)?;
    let mut moved = 0u64;
    for e in tx.open_table(schema::v1::BY_ROUTE)?.iter()? {
        let (k, _) = e?;
        by_route.insert(k.value(), 0)?;
        moved += 1;
    }
    tx.delete_table(schema::v1::BY_ROUTE)?;
    Ok(moved)
}

#[cfg(unix)]
fn create_private_file(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    match fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(not(unix))]
fn create_private_file(_path: &Path) -> std::io::Result<()> {
    Ok(())
}

fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    let mut b = fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        b.mode(0o700);
    }
    b.create(dir)
}

impl RedbStore {
    /// Opens (or creates) the store at `path`, with redb's cache capped at `cache_size_bytes`.
    ///
    /// A file that is not a redb database, or one written by a newer schema, is refused and left
    /// byte-identical. Jobs left in_flight by a crash become queued again, due now.
    ///
    /// An existing file is opened with redb's integrity check, so bytes changed outside redb
    /// are refused as [`StoreError::Corrupt`] naming the file before anything is written. Where
    /// redb panics on such a file instead, that becomes the same error.
    pub fn open(path: impl AsRef<Path>, cache_size_bytes: usize) -> Result<Self, StoreError> {
        Self::open_sealed(path, cache_size_bytes, None)
    }

    /// [`Self::open`] with encryption at rest: job records are written sealed with the
    /// sealer's primary key, and sealed records are read with any of its keys. Without a
    /// sealer, records are written unsealed and sealed ones cannot be read (the jobs fail with
    /// [`StoreError::Sealed`] naming the key; opening still succeeds).
    pub fn open_sealed(
        path: impl AsRef<Path>,
        cache_size_bytes: usize,
        sealer: Option<Arc<Sealer>>,
    ) -> Result<Self, StoreError> {
        let path = path.as_ref();
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            Self::open_inner(
                path,
                cache_size_bytes,
                commit::file_opener(),
                CHANNEL_CAPACITY,
                sealer,
            )
        }))
        .unwrap_or_else(|p| {
            let what = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_default();
            Err(StoreError::Corrupt {
                path: path.to_path_buf(),
                message: format!("redb could not read it: {what}"),
            })
        })
    }

    /// [`Self::open`] with another way to open the read-write database (fault injection).
    #[cfg(test)]
    pub(crate) fn open_with(
        path: impl AsRef<Path>,
        cache_size_bytes: usize,
        opener: Opener,
        channel_capacity: usize,
    ) -> Result<Self, StoreError> {
        Self::open_inner(path, cache_size_bytes, opener, channel_capacity, None)
    }

    fn open_inner(
        path: impl AsRef<Path>,
        cache_size_bytes: usize,
        opener: Opener,
        channel_capacity: usize,
        sealer: Option<Arc<Sealer>>,
    ) -> Result<Self, StoreError> {
        let path = path.as_ref().to_path_buf();
        let unavailable =
            |e: std::io::Error| StoreError::Unavailable(format!("{}: {e}", path.display()));
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            create_private_dir(dir).map_err(unavailable)?;
        }
        let existing = fs::metadata(&path).map(|m| m.len() > 0).unwrap_or(false);
        if existing {
            // Look before writing: a read-only open never modifies the file.
            match redb::Builder::new()
                .set_cache_size(cache_size_bytes.min(1 << 20))
                .open_read_only(&path)
            {
                Ok(db) => {
                    let found = db
                        .begin_read()
                        .map_err(|e| tx_open_error(&path, e.into()))
                        .and_then(|tx| read_schema(&tx).map_err(|e| tx_open_error(&path, e)))?;
                    drop(db);
                    check_schema(&path, found)?;
                }
                // Needs repair after a crash: the read-write open below repairs it.
                Err(DatabaseError::RepairAborted) => {}
                Err(e) => return Err(open_error(&path, e)),
            }
        } else {
            create_private_file(&path).map_err(unavailable)?;
        }
        // A plain open trusts the file: bytes changed outside redb are found (or panic) only
        // when a page is read, maybe after this open has committed. So the first open verifies
        // the checksum of every page of the committed trees before anything is written; it
        // reads the whole store once, as redb's own repair after a crash does.
        let db = opener(
            &path,
            redb::Builder::new()
                .set_cache_size(cache_size_bytes)
                .set_check_integrity_on_open(existing),
        )
        .map_err(|e| open_error(&path, e))?;
        let found = db
            .begin_read()
            .map_err(|e| tx_open_error(&path, e.into()))
            .and_then(|tx| read_schema(&tx).map_err(|e| tx_open_error(&path, e)))?;
        check_schema(&path, found)?;
        let recovered = (|| -> Result<u64, TxError> {
            let mut tx = db.begin_write()?;
            tx.set_durability(redb::Durability::Immediate)?;
            let n = init(&tx, now_ms(), sealer.clone())?;
            tx.commit()?;
            Ok(n)
        })()
        .map_err(|e| tx_open_error(&path, e))?;
        if recovered > 0 {
            tracing::info!(path = %path.display(), recovered, "in_flight jobs requeued after restart");
        }
        let log = open_accept_log(&db, &path, sealer.clone())?;
        let shared = Arc::new(Shared {
            db: RwLock::new(Some(Arc::new(db))),
            healthy: AtomicBool::new(true),
            commits: AtomicU64::new(0),
            path,
            cache_size: cache_size_bytes,
            opener,
            sealer,
            full: AtomicBool::new(false),
            logged: AtomicU64::new(0),
        });
        // Space held back for deliveries when the disk fills; without room for it the store
        // starts in full mode (accepts refused, deliveries go on).
        if let Err(e) = commit::ensure_reserve(&shared.path, commit::RESERVE_BYTES) {
            tracing::error!(path = %shared.path.display(), error = %e, "no room for the disk reserve; accepts answer 503 until space returns");
            shared.full.store(true, Ordering::Release);
        }
        let (tx, rx) = mpsc::channel(channel_capacity.max(1));
        let writer_shared = shared.clone();
        let writer = std::thread::Builder::new()
            .name("spillway-queue-writer".into())
            .spawn(move || commit::run(writer_shared, rx, log))
            .map_err(|e| StoreError::Unavailable(format!("spawn writer thread: {e}")))?;
        Ok(Self {
            shared,
            tx: Some(tx),
            writer: Mutex::new(Some(writer)),
        })
    }

    /// Write transactions committed by the writer so far (group commit makes this smaller than
    /// the number of writes).
    pub fn commits(&self) -> u64 {
        self.shared.commits.load(Ordering::Acquire)
    }

    /// Of [`Self::commits`], those made durable by the accept log rather than by redb.
    pub fn logged_commits(&self) -> u64 {
        self.shared.logged.load(Ordering::Acquire)
    }

    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    async fn submit<R, F>(&self, wait: bool, work: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&mut ops::Tables<'_>) -> Result<R, TxError> + Send + 'static,
    {
        let sender = self.tx.as_ref().ok_or(StoreError::Closed)?;
        // Only enqueues skip waiting for room in the channel, and only they grow the store.
        let (req, rx) = Pending::new(work, !wait);
        let req: BoxRequest = Box::new(req);
        if wait {
            sender.send(req).await.map_err(|_| StoreError::Closed)?;
        } else {
            sender.try_send(req).map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => StoreError::Busy,
                mpsc::error::TrySendError::Closed(_) => StoreError::Closed,
            })?;
        }
        rx.await.map_err(|_| StoreError::Closed)?
    }

    async fn read<R, F>(&self, work: F) -> Result<R, StoreError>
    where
        R: Send + 'static,
        F: FnOnce(&ReadTransaction) -> Result<R, TxError> + Send + 'static,
    {
        let db: Arc<Database> = self
            .shared
            .db
            .read()
            .clone()
            .ok_or_else(|| StoreError::Unavailable("the store is reopening".into()))?;
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || {
            let tx = db.begin_read().map_err(|e| shared.map_tx_error(e.into()))?;
            work(&tx).map_err(|e| shared.map_tx_error(e))
        })
        .await
        .map_err(|e| StoreError::Unavailable(format!("read task: {e}")))?
    }
}

impl Drop for RedbStore {
    fn drop(&mut self) {
        self.tx.take();
        self.shared.db.write().take();
        if let Some(h) = self.writer.lock().take() {
            // The writer ends once the channel is closed and drained.
            let _ = h.join();
        }
    }
}

#[async_trait]
impl JobStore for RedbStore {
    async fn enqueue(
        &self,
        job: NewJob,
        dedupe_window_ms: u64,
        max_depth: u64,
    ) -> Result<EnqueueOutcome, StoreError> {
        let job = Job::from_new(job);
        let record = schema::encode_job_with(&job, self.shared.sealer.as_deref())
            .map_err(|e| StoreError::Sealed(format!("job {}: {e}", job.id)))?;
        let head = ops::head_only(job);
        let step = self
            .submit(false, move |tx| {
                ops::enqueue(tx, head, record, dedupe_window_ms, max_depth)
            })
            .await?;
        // The commit returned: the ids are durable now.
        Ok(match step {
            EnqueueStep::Stored(id) => EnqueueOutcome::Stored(Durable::after_commit(id)),
            EnqueueStep::Duplicate(id) => EnqueueOutcome::Duplicate(Durable::after_commit(id)),
            EnqueueStep::KeyConflict(id) => EnqueueOutcome::KeyConflict(id),
            EnqueueStep::QueueFull => EnqueueOutcome::QueueFull,
        })
    }

    async fn lease_due(
        &self,
        route: &str,
        now_ms: u64,
        limit: usize,
    ) -> Result<Vec<Job>, StoreError> {
        let route = route.to_owned();
        self.submit(true, move |tx| ops::lease_due(tx, &route, now_ms, limit))
            .await
    }

    async fn ack(&self, id: JobId, now_ms: u64) -> Result<(), StoreError> {
        self.submit(true, move |tx| ops::ack(tx, id, now_ms)).await
    }

    async fn reschedule(
        &self,
        id: JobId,
        next_attempt_at_ms: u64,
        last: LastOutcome,
    ) -> Result<(), StoreError> {
        self.submit(true, move |tx| {
            ops::reschedule(tx, id, next_attempt_at_ms, last)
        })
        .await
    }

    async fn dead_letter(
        &self,
        id: JobId,
        reason: String,
        last: Option<LastOutcome>,
    ) -> Result<(), StoreError> {
        self.submit(true, move |tx| ops::dead_letter(tx, id, reason, last))
            .await
    }

    async fn get(&self, id: JobId) -> Result<Option<Job>, StoreError> {
        let sealer = self.shared.sealer.clone();
        self.read(move |tx| ops::load_job(&tx.open_table(schema::JOBS)?, sealer.as_deref(), id))
            .await
    }

    async fn list(
        &self,
        route: Option<&str>,
        state: Option<JobState>,
        limit: usize,
        cursor: Option<JobId>,
    ) -> Result<Vec<Job>, StoreError> {
        let route = route.map(str::to_owned);
        let sealer = self.shared.sealer.clone();
        self.read(move |tx| {
            let jobs = tx.open_table(schema::JOBS)?;
            let upper = cursor.map(|c| c.as_u128()).unwrap_or(u128::MAX);
            let keep = |j: &Job| state.is_none_or(|s| j.state == s);
            let mut out = Vec::new();
            if limit == 0 {
                return Ok(out);
            }
            let mut push = |id: u128| -> Result<bool, TxError> {
                if cursor.is_some() && id == upper {
                    return Ok(false);
                }
                // A job whose key is missing is listed by its clear fields (uri empty).
                let found = ops::load_stored(&jobs, sealer.as_deref(), JobId::from_u128(id))?;
                if let Some(j) = found.map(ops::Stored::into_known) {
                    if keep(&j) {
                        out.push(j);
                    }
                }
                Ok(out.len() >= limit)
            };
            match &route {
                Some(r) => {
                    let by_route = tx.open_table(schema::BY_ROUTE)?;
                    for e in by_route
                        .range((r.as_str(), 0u128)..=(r.as_str(), upper))?
                        .rev()
                    {
                        if push(e?.0.value().1)? {
                            break;
                        }
                    }
                }
                None => {
                    let all = tx.open_table(schema::JOBS)?;
                    for e in all.range(0u128..=upper)?.rev() {
                        if push(e?.0.value())? {
                            break;
                        }
                    }
                }
            }
            Ok(out)
        })
        .await
    }

    async fn retry(&self, id: JobId, now_ms: u64) -> Result<bool, StoreError> {
        self.submit(true, move |tx| ops::retry(tx, id, now_ms))
            .await
    }

    async fn delete(&self, id: JobId) -> Result<bool, StoreError> {
        self.submit(true, move |tx| ops::delete(tx, id)).await
    }

    async fn replay_dead(&self, route: &str, now_ms: u64) -> Result<u64, StoreError> {
        let route = route.to_owned();
        self.submit(true, move |tx| ops::replay_dead(tx, &route, now_ms))
            .await
    }

    async fn set_paused(&self, route: &str, paused: bool) -> Result<(), StoreError> {
        let route = route.to_owned();
        self.submit(true, move |tx| {
            ops::set_route(tx, &route, |r| {
                r.paused = paused;
                if !paused {
                    r.paused_until_ms = None;
                }
            })
        })
        .await
    }

    async fn pause_until(&self, route: &str, until_ms: u64) -> Result<(), StoreError> {
        let route = route.to_owned();
        self.submit(true, move |tx| {
            ops::set_route(tx, &route, |r| r.paused_until_ms = Some(until_ms))
        })
        .await
    }

    async fn route_control(&self, route: &str) -> Result<(bool, Option<u64>), StoreError> {
        let route = route.to_owned();
        self.read(move |tx| {
            let r = ops::route_record(&tx.open_table(schema::ROUTES)?, &route)?;
            Ok((r.paused, r.paused_until_ms))
        })
        .await
    }

    async fn quota_acquire(
        &self,
        route: &str,
        index: usize,
        per_ms: u64,
        limit: u64,
        now_ms: u64,
    ) -> Result<Option<u64>, StoreError> {
        let route = route.to_owned();
        self.submit(true, move |tx| {
            ops::quota_acquire(tx, &route, index, per_ms, limit, now_ms)
        })
        .await
    }

    async fn next_due(&self, route: &str) -> Result<Option<u64>, StoreError> {
        let route = route.to_owned();
        self.read(move |tx| ops::first_time(&tx.open_table(schema::DUE)?, &route))
            .await
    }

    async fn stats(&self, route: &str) -> Result<RouteStats, StoreError> {
        let route = route.to_owned();
        self.read(move |tx| {
            let c = tx.open_table(schema::COUNTERS)?;
            let r = route.as_str();
            let oldest = ops::first_time(&tx.open_table(schema::PENDING)?, r)?;
            Ok(RouteStats {
                queued: ops::counter(&c, r, JobState::Queued)?,
                in_flight: ops::counter(&c, r, JobState::InFlight)?,
                retrying: ops::counter(&c, r, JobState::Retrying)?,
                dead: ops::counter(&c, r, JobState::Dead)?,
                delivered_kept: ops::counter(&c, r, JobState::Delivered)?,
                oldest_queued_created_at_ms: oldest,
            })
        })
        .await
    }

    async fn routes(&self) -> Result<Vec<String>, StoreError> {
        self.read(|tx| {
            let c = tx.open_table(schema::COUNTERS)?;
            // Keys sort by (route, state), so one pass sees each route's counters together.
            let mut out: Vec<String> = Vec::new();
            for e in redb::ReadableTable::iter(&c)? {
                let (k, v) = e?;
                let (route, _) = k.value();
                if v.value() > 0 && out.last().map(String::as_str) != Some(route) {
                    out.push(route.to_owned());
                }
            }
            Ok(out)
        })
        .await
    }

    async fn purge_expired(&self, now_ms: u64, batch: usize) -> Result<u64, StoreError> {
        self.submit(true, move |tx| ops::purge_expired(tx, now_ms, batch))
            .await
    }

    fn healthy(&self) -> bool {
        self.shared.healthy.load(Ordering::Acquire) && !self.shared.full.load(Ordering::Acquire)
    }
}

/// `SPILLWAY_ACCEPT_LOG=off` turns the accept log off (every batch a durable redb commit); it
/// exists so benchmarks can measure what the log buys, not as a tuning knob.
fn accept_log_enabled() -> bool {
    std::env::var("SPILLWAY_ACCEPT_LOG").map_or(true, |v| v != "off")
}

/// Opens the accept log beside the database and applies what it holds beyond the database's
/// last durable commit. With the log turned off, a log left by an earlier run is applied,
/// then removed.
fn open_accept_log(
    db: &Database,
    path: &Path,
    sealer: Option<Arc<Sealer>>,
) -> Result<Option<LogState>, StoreError> {
    let enabled = accept_log_enabled();
    let log_path = wal::log_path(path);
    if !enabled && !log_path.exists() {
        return Ok(None);
    }
    let log = wal::AcceptLog::open(path)
        .map_err(|e| StoreError::Unavailable(format!("{}: {e}", log_path.display())))?;
    let mut state = LogState::new(log);
    match commit::recover_log(db, &mut state, sealer) {
        Ok(_) => {}
        Err(RecoverError::Unavailable(m)) => return Err(StoreError::Unavailable(m)),
        Err(RecoverError::Corrupt(m)) => {
            return Err(StoreError::Corrupt {
                path: log_path,
                message: m,
            })
        }
    }
    if !enabled {
        drop(state);
        fs::remove_file(&log_path)
            .map_err(|e| StoreError::Unavailable(format!("{}: {e}", log_path.display())))?;
        return Ok(None);
    }
    Ok(Some(state))
}

/// The path of the store file inside a data directory.
pub fn default_path(data_dir: &Path) -> PathBuf {
    data_dir.join("queue.redb")
}
