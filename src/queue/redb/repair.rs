//! `spillway repair`: gets an operator back from a damaged store file without losing the jobs
//! that can still be read.
//!
//! The damaged file is never written to. Repair works on a copy: first redb's own integrity
//! check and repair (which may fall back to the last intact commit); when that fails, the copy
//! is opened as it is and read table by table, jobs from both ends, so one damaged page costs
//! only the records on it. When redb cannot open the file at all (a damaged page on the path
//! every open reads), the file is scanned for job records instead: a record counts only if it
//! decodes and its stored fingerprint (SHA-256 of method, path and body) matches, so damaged
//! bodies are never delivered; of several versions of one job (copy-on-write leaves old ones
//! in free pages) the most recently updated wins. A raw scan cannot tell a job purged or
//! deleted shortly before the damage from a live one, so such a job may come back (and be
//! delivered again under its own idempotency key); route pauses and quota counts are not
//! recovered by it. Sealed records (encryption at rest) are read only with the keys
//! ([`repair_with`]); their tag is the integrity check, and the raw scan finds where one ends
//! by decrypting its prefix until it parses.
//!
//! Every job, idempotency key, route pause and quota count recovered is written into a fresh
//! file through the same code the store uses (indexes and counters rebuilt, not copied). Then
//! the damaged file is renamed beside it (`<file>.damaged-<timestamp>`) and the fresh one takes
//! its name.
//!
//! Reads of a file corrupted outside redb may panic inside redb; each read step runs under
//! `catch_unwind`, so a panic ends that table's read, not the repair.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::Read;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use redb::{Database, Durability, ReadTransaction, ReadableDatabase, ReadableTable};
use sha2::{Digest, Sha256};

use super::ops::{self, Tables, TxError};
use super::schema::{
    self, decode_idem, decode_job_with, decode_route, encode_idem, encode_route, IdemRecordV1,
    ACCEPT_LOG_SEQ_KEY, SCHEMA_VERSION, SCHEMA_VERSION_KEY,
};
use crate::queue::crypt::Sealer;
use crate::queue::{Job, JobId, JobState};
use std::sync::Arc;

/// Jobs written per transaction of the fresh file.
const CHUNK: usize = 1000;

/// The first bytes of every redb file.
const REDB_MAGIC: [u8; 9] = [b'r', b'e', b'd', b'b', 0x1A, 0x0A, 0xA9, 0x0D, 0x0A];

/// Why a repair did not happen; the damaged file is unchanged in every case.
#[derive(Debug, thiserror::Error)]
pub enum RepairError {
    #[error(
        "{path} does not exist; spillway creates a fresh store there on start, nothing to repair"
    )]
    Missing { path: PathBuf },
    #[error("{path} is empty; spillway starts a fresh store in it, nothing to repair")]
    Empty { path: PathBuf },
    #[error("{path} is open in another process (a running spillway?); stop it, then repair")]
    AlreadyOpen { path: PathBuf },
    #[error(
        "{path} is not a spillway store ({what}); it was left as it is. If storage.path points at the wrong file, fix the config; to start with an empty queue, move the file away"
    )]
    NotAStore { path: PathBuf, what: String },
    #[error(
        "{path}: nothing in it can be read ({message}); it was left as it is. Move it away to start with an empty queue"
    )]
    Unreadable { path: PathBuf, message: String },
    #[error("{path} has schema version {found}; this spillway understands up to {supported}: repair it with a newer spillway")]
    NewerSchema {
        path: PathBuf,
        found: u64,
        supported: u64,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "writing the repaired store {path} failed: {message}; the damaged file was left as it is"
    )]
    Write { path: PathBuf, message: String },
}

/// What a repair saved and skipped, for the operator.
#[derive(Debug, Default, Clone)]
pub struct RepairReport {
    /// The store path; it now holds the repaired store.
    pub path: PathBuf,
    /// Where the damaged original was moved to.
    pub damaged_kept_as: PathBuf,
    /// How the file was read: redb's repair succeeded, or a table by table salvage.
    pub method: &'static str,
    /// Saved jobs by state (`queued`, `in_flight`, ...).
    pub jobs_saved: HashMap<&'static str, u64>,
    /// Job records found but unreadable (did not decode).
    pub jobs_skipped: u64,
    pub keys_saved: u64,
    /// Idempotency keys rebuilt from their job (their own record was lost).
    pub keys_rebuilt: u64,
    /// Keys dropped: unreadable, or their job was not saved.
    pub keys_skipped: u64,
    pub route_records_saved: u64,
    pub route_records_skipped: u64,
    pub quotas_saved: u64,
    /// What could not be read at all (a damaged page ends a table's read).
    pub notes: Vec<String>,
}

impl RepairReport {
    pub fn jobs_total(&self) -> u64 {
        self.jobs_saved.values().sum()
    }
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> RepairError + '_ {
    move |source| RepairError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What a file that is not a redb file looks like, for the message.
fn identify(head: &[u8]) -> String {
    if head.starts_with(b"SQLite format 3\0") {
        "it is an SQLite database".into()
    } else if head.starts_with(b"PK\x03\x04") {
        "it is a zip archive".into()
    } else if head
        .iter()
        .all(|b| b.is_ascii_graphic() || b.is_ascii_whitespace())
    {
        "it is a text file".into()
    } else {
        "it does not start with the redb header".into()
    }
}

/// A name beside `path` with a UTC timestamp, e.g. `queue.redb.damaged-20261128T180501Z`.
fn stamped(path: &Path, what: &str) -> PathBuf {
    let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now())
        .to_string()
        .replace(['-', ':'], "");
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(format!(".{what}-{now}"));
    let mut out = path.with_file_name(&name);
    // Two repairs within a second: never reuse a name.
    let mut n = 1;
    while out.exists() {
        let mut again = name.clone();
        again.push(format!("-{n}"));
        out = path.with_file_name(again);
        n += 1;
    }
    out
}

/// Runs `f`, turning a panic inside redb into an error message.
fn guarded<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|p| {
        p.downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .unwrap_or_else(|| "panic while reading".into())
    })
}

/// Repairs the store at `path`; see the module docs. The damaged file is renamed only once
/// the fresh one is fully written and synced.
pub fn repair(path: &Path) -> Result<RepairReport, RepairError> {
    repair_with(path, None)
}

/// [`repair`] with the keys of `storage.encryption`: sealed records are opened (which also
/// proves them intact) and written sealed again, under the primary key. Without keys they
/// are reported as skipped and stay in the kept original.
pub fn repair_with(path: &Path, sealer: Option<Arc<Sealer>>) -> Result<RepairReport, RepairError> {
    let meta = match fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(RepairError::Missing {
                path: path.to_path_buf(),
            })
        }
        Err(e) => return Err(io(path)(e)),
    };
    if meta.len() == 0 {
        return Err(RepairError::Empty {
            path: path.to_path_buf(),
        });
    }
    let mut head = [0u8; 16];
    let n = fs::File::open(path)
        .and_then(|mut f| f.read(&mut head))
        .map_err(io(path))?;
    if n < REDB_MAGIC.len() || head[..REDB_MAGIC.len()] != REDB_MAGIC {
        return Err(RepairError::NotAStore {
            path: path.to_path_buf(),
            what: identify(&head[..n]),
        });
    }
    // A read-only open takes a shared lock: it fails only if a writer holds the file.
    if let Ok(Err(redb::DatabaseError::DatabaseAlreadyOpen)) =
        guarded(|| redb::Builder::new().open_read_only(path).map(drop))
    {
        return Err(RepairError::AlreadyOpen {
            path: path.to_path_buf(),
        });
    }

    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let work = tempfile::Builder::new()
        .prefix(".spillway-repair-")
        .tempdir_in(dir)
        .map_err(io(dir))?;
    let mut notes = Vec::new();
    let (found, method) = match open_damaged(path, work.path(), &mut notes)? {
        Some((db, method)) => {
            let found = read_tree(&db, path, sealer.as_deref(), &mut notes);
            drop(db);
            (found?, method)
        }
        None => (
            scan_raw(path, sealer.as_deref(), &mut notes)?,
            "raw scan for job records",
        ),
    };
    drop(work);
    if found.jobs.is_empty() && found.jobs_skipped == 0 && method == "raw scan for job records" {
        return Err(RepairError::Unreadable {
            path: path.to_path_buf(),
            message: notes.join("; "),
        });
    }
    let fresh_path = stamped(path, "repairing");
    let result = write_fresh(found, &fresh_path, sealer);
    let mut report = match result {
        Ok(r) => r,
        Err(e) => {
            let _ = fs::remove_file(&fresh_path);
            return Err(e);
        }
    };
    report.method = method;
    report.notes = notes;

    let kept = stamped(path, "damaged");
    fs::rename(path, &kept).map_err(io(path))?;
    if let Err(e) = fs::rename(&fresh_path, path) {
        // Put the original back rather than leave no store at the configured path.
        let _ = fs::rename(&kept, path);
        return Err(io(path)(e));
    }
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
    report.path = path.to_path_buf();
    report.damaged_kept_as = kept;
    Ok(report)
}

/// Opens a copy of the damaged file: redb's check and repair first, as it is second. A
/// truncated file is padded with zeros to the length its header records, so that the pages
/// still there can be read (the missing ones read as damaged).
fn open_damaged(
    path: &Path,
    work: &Path,
    notes: &mut Vec<String>,
) -> Result<Option<(Database, &'static str)>, RepairError> {
    let mut pad_to: Option<u64> = None;
    for round in 0..2 {
        let copy = |name: &str| -> Result<PathBuf, RepairError> {
            let to = work.join(format!("{round}-{name}"));
            fs::copy(path, &to).map_err(io(path))?;
            if let Some(len) = pad_to {
                let f = fs::OpenOptions::new()
                    .write(true)
                    .open(&to)
                    .map_err(io(&to))?;
                f.set_len(len).map_err(io(&to))?;
            }
            Ok(to)
        };
        let checked = copy("checked.redb")?;
        let failure = match guarded(|| {
            redb::Builder::new()
                .set_check_integrity_on_open(true)
                .set_cache_size(64 << 20)
                .open(&checked)
        }) {
            Ok(Ok(db)) => return Ok(Some((db, "redb integrity check and repair"))),
            Ok(Err(e)) => e.to_string(),
            Err(p) => p,
        };
        notes.push(format!("redb's integrity check failed: {failure}"));
        let plain = copy("as-is.redb")?;
        let failure = match guarded(|| redb::Builder::new().set_cache_size(64 << 20).open(&plain)) {
            Ok(Ok(db)) => return Ok(Some((db, "table by table salvage"))),
            Ok(Err(e)) => e.to_string(),
            Err(p) => p,
        };
        notes.push(format!("opening it as it is failed: {failure}"));
        // redb names the length it expects: "file_len=N, layout_len=M".
        let layout = failure
            .split("layout_len=")
            .nth(1)
            .map(|r| {
                r.chars()
                    .take_while(char::is_ascii_digit)
                    .collect::<String>()
            })
            .and_then(|n| n.parse::<u64>().ok());
        match layout {
            Some(len) if round == 0 && len <= (1 << 40) => {
                notes.push(format!(
                    "the file is truncated; padded a copy to {len} bytes"
                ));
                pad_to = Some(len);
            }
            _ => break,
        }
    }
    Ok(None)
}

fn write_error(path: &Path) -> impl Fn(TxError) -> RepairError + '_ {
    move |e| RepairError::Write {
        path: path.to_path_buf(),
        message: match e {
            TxError::Store(e) => e.to_string(),
            TxError::Decode(m) => m,
            TxError::Storage(e) => e.to_string(),
            TxError::Sealed(m) => m,
        },
    }
}

/// One write transaction on the fresh file.
fn write<R>(
    db: &Database,
    path: &Path,
    sealer: Option<&Arc<Sealer>>,
    f: impl FnOnce(&mut Tables<'_>) -> Result<R, TxError>,
) -> Result<R, RepairError> {
    let run = || -> Result<R, TxError> {
        let mut tx = db.begin_write()?;
        tx.set_durability(Durability::Immediate)?;
        let r = {
            // Sealed again when the keys are at hand; otherwise only unsealed records were read.
            let mut tables = Tables::open(&tx, sealer.cloned())?;
            let r = f(&mut tables)?;
            tables.finish()?;
            r
        };
        tx.commit()?;
        Ok(r)
    };
    run().map_err(write_error(path))
}

/// Reads every entry of one table it can: `Ok(entries)`, and a note when a damaged page
/// ended the read early.
fn read_all<K, V, T>(
    tx: &ReadTransaction,
    def: redb::TableDefinition<'_, K, V>,
    mut map: impl FnMut(K::SelfType<'_>, V::SelfType<'_>) -> T,
) -> (Vec<T>, Option<String>)
where
    K: redb::Key + 'static,
    V: redb::Value + 'static,
{
    let mut out = Vec::new();
    let name = redb::TableHandle::name(&def).to_owned();
    let res = guarded(|| -> Result<(), String> {
        let t = match tx.open_table(def) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(()),
            Err(e) => return Err(e.to_string()),
        };
        for e in t.iter().map_err(|e| e.to_string())? {
            let (k, v) = e.map_err(|e| e.to_string())?;
            out.push(map(k.value(), v.value()));
        }
        Ok(())
    });
    let note = match res {
        Ok(Ok(())) => None,
        Ok(Err(e)) | Err(e) => Some(format!(
            "table {name}: reading stopped after {} entries: {e}",
            out.len()
        )),
    };
    (out, note)
}

/// Reads job records from the front until a damaged page, then from the back down to it.
fn read_jobs(tx: &ReadTransaction, notes: &mut Vec<String>) -> Vec<Vec<u8>> {
    let mut records: Vec<(u128, Vec<u8>)> = Vec::new();
    let forward = guarded(|| -> Result<(), String> {
        let t = match tx.open_table(schema::JOBS) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(()),
            Err(e) => return Err(e.to_string()),
        };
        for e in t.iter().map_err(|e| e.to_string())? {
            let (k, v) = e.map_err(|e| e.to_string())?;
            records.push((k.value(), v.value().to_vec()));
        }
        Ok(())
    });
    let stopped = match forward {
        Ok(Ok(())) => None,
        Ok(Err(e)) | Err(e) => Some(e),
    };
    if let Some(e) = &stopped {
        let last = records.last().map(|(k, _)| *k);
        let mut back: Vec<(u128, Vec<u8>)> = Vec::new();
        let backward = guarded(|| -> Result<(), String> {
            let t = tx.open_table(schema::JOBS).map_err(|e| e.to_string())?;
            let range = match last {
                Some(k) if k < u128::MAX => t.range(k + 1..),
                Some(_) => return Ok(()),
                None => t.range(0u128..),
            };
            for e in range.map_err(|e| e.to_string())?.rev() {
                let (k, v) = e.map_err(|e| e.to_string())?;
                back.push((k.value(), v.value().to_vec()));
            }
            Ok(())
        });
        let before = records.len();
        let from_back = back.len();
        records.extend(back);
        let reason = match backward {
            Ok(Ok(())) => String::new(),
            Ok(Err(e2)) | Err(e2) => format!("; from the end: {e2}"),
        };
        notes.push(format!(
            "jobs: a damaged page stopped the read after {before} records ({e}); {from_back} more read from the end{reason}"
        ));
    }
    records.into_iter().map(|(_, v)| v).collect()
}

/// Everything recovered from the damaged file, before it is written.
#[derive(Default)]
struct Found {
    jobs: Vec<Job>,
    jobs_skipped: u64,
    /// `None`: the record did not decode.
    idem: Vec<((String, String), Option<IdemRecordV1>)>,
    routes: Vec<(String, Option<schema::RouteRecordV1>)>,
    quotas: Vec<((String, u64), (u64, u64))>,
    /// The last accept-log batch the damaged file held (see `wal.rs`); 0 when unknown, so
    /// every batch still in the log is applied again at the next start (jobs found here are
    /// kept as they are).
    accept_log_seq: u64,
}

/// Reads every readable record of an open (possibly damaged) store.
fn read_tree(
    old: &Database,
    path: &Path,
    sealer: Option<&Sealer>,
    notes: &mut Vec<String>,
) -> Result<Found, RepairError> {
    let unreadable = |message: String| RepairError::Unreadable {
        path: path.to_path_buf(),
        message,
    };
    let tx = guarded(|| old.begin_read())
        .map_err(unreadable)?
        .map_err(|e| unreadable(e.to_string()))?;

    let (schema_rows, note) = read_all(&tx, schema::META, |k: &str, v: u64| (k.to_owned(), v));
    notes.extend(note);
    if let Some((_, found)) = schema_rows
        .iter()
        .find(|(k, _)| k == SCHEMA_VERSION_KEY)
        .filter(|(_, v)| *v > SCHEMA_VERSION)
    {
        return Err(RepairError::NewerSchema {
            path: path.to_path_buf(),
            found: *found,
            supported: SCHEMA_VERSION,
        });
    }

    let mut out = Found {
        accept_log_seq: schema_rows
            .iter()
            .find(|(k, _)| k == ACCEPT_LOG_SEQ_KEY)
            .map_or(0, |(_, v)| *v),
        ..Found::default()
    };
    for r in read_jobs(&tx, notes) {
        match decode_job_with(&r, sealer) {
            Ok(j) => out.jobs.push(j),
            Err(_) => out.jobs_skipped += 1,
        }
    }
    let (idem, note) = read_all(&tx, schema::IDEM, |k: (&str, &str), v: &[u8]| {
        ((k.0.to_owned(), k.1.to_owned()), decode_idem(v).ok())
    });
    notes.extend(note);
    out.idem = idem;
    let (routes, note) = read_all(&tx, schema::ROUTES, |k: &str, v: &[u8]| {
        (k.to_owned(), decode_route(v).ok())
    });
    notes.extend(note);
    out.routes = routes;
    let (quotas, note) = read_all(&tx, schema::QUOTAS, |k: (&str, u64), v: (u64, u64)| {
        ((k.0.to_owned(), k.1), v)
    });
    notes.extend(note);
    out.quotas = quotas;
    Ok(out)
}

/// Bytes read at once by the raw scan, and the overlap between windows (a record larger
/// than the overlap that straddles two windows is missed).
const SCAN_WINDOW: usize = 128 << 20;
const SCAN_OVERLAP: usize = 16 << 20;

/// The fingerprint the accept path stores: SHA-256 of method, NUL, path and query, NUL, body.
fn fingerprint(job: &Job) -> Option<[u8; 32]> {
    let uri: http::Uri = job.uri.parse().ok()?;
    let mut fp = Sha256::new();
    fp.update(job.method.as_str());
    fp.update([0]);
    fp.update(uri.path_and_query().map_or("/", |p| p.as_str()));
    fp.update([0]);
    fp.update(&job.body);
    Some(fp.finalize().into())
}

/// How far a version of a job got, to pick the latest of several copies.
fn rank(j: &Job) -> (u64, u32, u8) {
    let state = match j.state {
        JobState::Queued => 0,
        JobState::Retrying => 1,
        JobState::InFlight => 2,
        JobState::Dead => 3,
        JobState::Delivered => 4,
    };
    (j.updated_at_ms, j.attempts, state)
}

/// Scans the file's bytes for job records whose fingerprint matches; see the module docs.
fn scan_raw(
    path: &Path,
    sealer: Option<&Sealer>,
    notes: &mut Vec<String>,
) -> Result<Found, RepairError> {
    use std::io::{Seek, SeekFrom};
    let mut file = fs::File::open(path).map_err(io(path))?;
    let len = file.metadata().map_err(io(path))?.len();
    let mut best: HashMap<u128, Job> = HashMap::new();
    let mut rejected = 0u64;
    let mut start: u64 = 0;
    let mut buf = Vec::new();
    loop {
        file.seek(SeekFrom::Start(start)).map_err(io(path))?;
        buf.clear();
        (&mut file)
            .take(SCAN_WINDOW as u64)
            .read_to_end(&mut buf)
            .map_err(io(path))?;
        for off in 0..buf.len() {
            // Every record starts with its version byte; sealed ones (2) open only with keys.
            if buf[off] != 1 && !(buf[off] == 2 && sealer.is_some()) {
                continue;
            }
            let Ok(job) = schema::decode_job_prefix(&buf[off..], sealer) else {
                continue;
            };
            if job.id.as_uuid().get_version_num() != 7 || job.route.is_empty() {
                continue;
            }
            if fingerprint(&job) != Some(job.fingerprint) {
                rejected += 1;
                continue;
            }
            match best.get(&job.id.as_u128()) {
                Some(have) if rank(have) >= rank(&job) => {}
                _ => {
                    best.insert(job.id.as_u128(), job);
                }
            }
        }
        let end = start + buf.len() as u64;
        if end >= len || buf.is_empty() {
            break;
        }
        start = end.saturating_sub(SCAN_OVERLAP as u64).max(start + 1);
    }
    notes.push(format!(
        "redb cannot open the file, so it was scanned for job records: {} found intact{}; \
         route pauses and quota counts are not recovered this way, and a job purged or deleted \
         shortly before the damage may come back",
        best.len(),
        if rejected > 0 {
            format!(", {rejected} damaged ones dropped")
        } else {
            String::new()
        }
    ));
    let mut jobs: Vec<Job> = best.into_values().collect();
    jobs.sort_by_key(|j| j.id);
    Ok(Found {
        jobs,
        jobs_skipped: rejected,
        ..Found::default()
    })
}

/// The dedupe window given to a key rebuilt from its job (its own record was lost): the
/// default `dedupe_window`.
const REBUILT_KEY_WINDOW_MS: u64 = 24 * 3600 * 1000;

/// Writes what was found into a fresh store at `fresh`.
fn write_fresh(
    found: Found,
    fresh: &Path,
    sealer: Option<Arc<Sealer>>,
) -> Result<RepairReport, RepairError> {
    let Found {
        jobs,
        jobs_skipped,
        idem,
        routes,
        quotas,
        accept_log_seq,
    } = found;
    let mut report = RepairReport {
        jobs_skipped,
        ..RepairReport::default()
    };
    let _ = fs::remove_file(fresh);
    let db = redb::Builder::new()
        .create(fresh)
        .map_err(|e| RepairError::Write {
            path: fresh.to_path_buf(),
            message: e.to_string(),
        })?;
    // The schema version first, as a fresh store would have it.
    (|| -> Result<(), TxError> {
        let tx = db.begin_write()?;
        {
            let mut meta = tx.open_table(schema::META)?;
            meta.insert(SCHEMA_VERSION_KEY, SCHEMA_VERSION)?;
            meta.insert(ACCEPT_LOG_SEQ_KEY, accept_log_seq)?;
        }
        tx.commit()?;
        Ok(())
    })()
    .map_err(write_error(fresh))?;

    let mut saved: HashMap<u128, (String, String, JobState, u64, [u8; 32])> = HashMap::new();
    for chunk in jobs.chunks(CHUNK) {
        write(&db, fresh, sealer.as_ref(), |t| {
            for j in chunk {
                // A record twice (read from both ends) is written once.
                if t.jobs.get(j.id.as_u128())?.is_some() {
                    continue;
                }
                // A generated key has no row of its own; its window is kept with the job.
                // Delivered, it is purged at once, like a job whose key row is rebuilt.
                let delivered = j.state == JobState::Delivered;
                let generated = j.key_is_generated();
                let window = if generated && !delivered {
                    REBUILT_KEY_WINDOW_MS
                } else {
                    0
                };
                ops::insert_job(t, j, window)?;
                if delivered && generated {
                    t.expiry.insert((j.updated_at_ms, j.id.as_u128()), ())?;
                }
            }
            Ok(())
        })?;
        for j in chunk {
            saved.entry(j.id.as_u128()).or_insert_with(|| {
                *report.jobs_saved.entry(j.state.as_str()).or_default() += 1;
                (
                    j.route.clone(),
                    j.idempotency_key.clone(),
                    j.state,
                    j.updated_at_ms,
                    j.fingerprint,
                )
            });
        }
    }
    drop(jobs);

    // Keys whose job was saved; a saved job whose key record was lost gets one rebuilt, so
    // a client repeating the request is still answered with the original job.
    let mut owned: HashSet<u128> = HashSet::new();
    let mut keep: Vec<((String, String), IdemRecordV1)> = Vec::new();
    for ((route, key), rec) in idem {
        match rec {
            Some(rec) if saved.contains_key(&rec.id) => {
                owned.insert(rec.id);
                keep.push(((route, key), rec));
            }
            _ => report.keys_skipped += 1,
        }
    }
    report.keys_saved = keep.len() as u64;
    for (id, (route, key, state, updated, fingerprint)) in &saved {
        if owned.contains(id) || JobId::from_u128(*id).is_text(key) {
            continue;
        }
        let expires_at_ms = if *state == JobState::Delivered {
            *updated
        } else {
            u64::MAX
        };
        keep.push((
            (route.clone(), key.clone()),
            IdemRecordV1 {
                id: *id,
                fingerprint: *fingerprint,
                window_ms: REBUILT_KEY_WINDOW_MS,
                expires_at_ms,
            },
        ));
        report.keys_rebuilt += 1;
    }
    for chunk in keep.chunks(CHUNK) {
        write(&db, fresh, sealer.as_ref(), |t| {
            for ((route, key), rec) in chunk {
                t.idem
                    .insert((route.as_str(), key.as_str()), encode_idem(rec).as_slice())?;
                // Delivered jobs are purged when their key's window ends.
                if saved
                    .get(&rec.id)
                    .is_some_and(|s| s.2 == JobState::Delivered)
                {
                    t.expiry.insert((rec.expires_at_ms, rec.id), ())?;
                }
            }
            Ok(())
        })?;
    }

    write(&db, fresh, sealer.as_ref(), |t| {
        for (route, rec) in &routes {
            match rec {
                Some(rec) => {
                    t.routes
                        .insert(route.as_str(), encode_route(rec).as_slice())?;
                    report.route_records_saved += 1;
                }
                None => report.route_records_skipped += 1,
            }
        }
        for ((route, index), v) in &quotas {
            t.quotas.insert((route.as_str(), *index), *v)?;
            report.quotas_saved += 1;
        }
        Ok(())
    })?;
    db.close().map_err(|e| RepairError::Write {
        path: fresh.to_path_buf(),
        message: e.to_string(),
    })?;
    Ok(report)
}
