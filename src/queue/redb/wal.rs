//! The accept log: a small append-only file beside the database that makes a batch of accepts
//! durable with one sequential write and one `fdatasync`, instead of a redb commit with
//! immediate durability.
//!
//! Why: a durable redb commit syncs the pages the batch touched (jobs, four indexes, counters),
//! scattered over the file; on the disks we measured that sync costs 3-5 times a sequential
//! append of the same bytes. So a batch made only of enqueues is committed to redb without
//! durability (`Durability::None`: in memory and the page cache, seen by readers at once) and
//! its job records are appended here and synced before any waiter is answered. Every other
//! batch, and every [`CHECKPOINT_EVERY`] or [`CHECKPOINT_BYTES`], is a durable redb commit,
//! which makes everything before it durable; the log then starts again at its beginning.
//!
//! Recovery (at open and on every reopen of a failed database): redb comes back at its last
//! durable commit, whose `meta` row `accept_log_seq` names the last logged batch it holds; the
//! batches of the log after that one are applied again, in order, and committed durably. Each
//! logged redb commit writes its own sequence number to that row, so a durable commit always
//! records how far the log is already inside the database: a job deleted after it was logged
//! is not brought back.
//!
//! File: `<db>.accept-log`, [`LOG_BYTES`] of zeros written once (so appends never change the
//! file's size and `fdatasync` has no metadata to write), then records from offset 0:
//!
//! | field | bytes |
//! | --- | --- |
//! | magic `SPL1` | 4 (u32 LE) |
//! | payload length | 4 (u32 LE) |
//! | sequence number | 8 (u64 LE) |
//! | CRC-32 of sequence number and payload | 4 (u32 LE) |
//! | payload: entries of `window_ms` u64 LE, record length u32 LE, job record | length |
//!
//! Reading stops at the first record whose magic or checksum is wrong or whose sequence number
//! does not grow: a write torn by a crash, or what an earlier round left beyond the new tail.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Size of the log file: room for [`CHECKPOINT_BYTES`] and a large batch after them. A batch
/// that does not fit is committed durably to redb instead.
pub const LOG_BYTES: u64 = 4 << 20;
/// Longest time logged batches stay outside redb's durable state.
#[cfg(not(test))]
pub const CHECKPOINT_EVERY: Duration = Duration::from_millis(200);
/// Tests check replay after a crash, which needs the batches still in the log.
#[cfg(test)]
pub const CHECKPOINT_EVERY: Duration = Duration::from_secs(30);
/// Most log bytes between two durable commits. It bounds what a durable commit has to write
/// (redb keeps the pages of non-durable commits in its write buffer) and so the latency of the
/// batch that waits for it, and what recovery replays. At 1 MiB the checkpoint's write put
/// p99 accept latency over 5 ms at 50 clients; 512 KiB kept it under at the same rate
/// (benches/README.md, "Sixth run").
pub const CHECKPOINT_BYTES: u64 = 512 << 10;
/// How often the database file is synced in the background while logged batches are
/// outstanding, so the durable commit that ends them finds little left to write.
pub const PREFLUSH_EVERY: Duration = Duration::from_millis(30);

const MAGIC: u32 = 0x5350_4c31;
const HEADER: usize = 4 + 4 + 8 + 4;
const ENTRY_HEAD: usize = 8 + 4;

/// The log file beside the database: `<file>.accept-log`.
pub fn log_path(db: &Path) -> PathBuf {
    super::commit::beside(db, ".accept-log")
}

/// One job of a logged batch: its dedupe window and its record as the jobs table holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LogEntry {
    pub window_ms: u64,
    pub record: Vec<u8>,
}

/// One logged batch, as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LogBatch {
    pub seq: u64,
    pub entries: Vec<LogEntry>,
}

/// Appends one entry to a batch payload.
pub fn push_entry(payload: &mut Vec<u8>, window_ms: u64, record: &[u8]) {
    payload.extend_from_slice(&window_ms.to_le_bytes());
    payload.extend_from_slice(&(record.len() as u32).to_le_bytes());
    payload.extend_from_slice(record);
}

fn checksum(seq: u64, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&seq.to_le_bytes());
    h.update(payload);
    h.finalize()
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut v = [0u8; 4];
    v.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(v)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}

/// The entries of a payload whose checksum matched; `Err` means the writer wrote something
/// this code does not read (not a torn write: those fail the checksum).
fn parse_entries(payload: &[u8]) -> Result<Vec<LogEntry>, String> {
    let mut out = Vec::new();
    let mut at = 0;
    while at < payload.len() {
        if payload.len() - at < ENTRY_HEAD {
            return Err(format!("entry at {at} is cut short"));
        }
        let window_ms = u64_at(payload, at);
        let len = u32_at(payload, at + 8) as usize;
        at += ENTRY_HEAD;
        if payload.len() - at < len {
            return Err(format!("entry record at {at} is cut short"));
        }
        out.push(LogEntry {
            window_ms,
            record: payload[at..at + len].to_vec(),
        });
        at += len;
    }
    Ok(out)
}

/// Every whole batch in `bytes`, in order (see the module docs for where reading stops).
fn parse_batches(bytes: &[u8]) -> Result<Vec<LogBatch>, String> {
    let mut out: Vec<LogBatch> = Vec::new();
    let mut at = 0usize;
    while bytes.len() - at >= HEADER {
        if u32_at(bytes, at) != MAGIC {
            break;
        }
        let len = u32_at(bytes, at + 4) as usize;
        let seq = u64_at(bytes, at + 8);
        let crc = u32_at(bytes, at + 16);
        let body = at + HEADER;
        if bytes.len() - body < len {
            break;
        }
        let payload = &bytes[body..body + len];
        if checksum(seq, payload) != crc || out.last().is_some_and(|b| b.seq >= seq) {
            break;
        }
        let entries = parse_entries(payload).map_err(|e| format!("batch {seq}: {e}"))?;
        out.push(LogBatch { seq, entries });
        at = body + len;
    }
    Ok(out)
}

/// The open log. Only the writer thread uses it.
pub(crate) struct AcceptLog {
    path: PathBuf,
    file: File,
    /// Where the next record goes.
    offset: u64,
    next_seq: u64,
    /// The file is whole (full size, synced) and its tail is known; false after a failed
    /// write until [`AcceptLog::make_ready`] succeeds.
    ready: bool,
}

impl AcceptLog {
    /// Opens (or creates, empty) the log of the database at `db`. It is not ready for appends
    /// until [`AcceptLog::make_ready`], which callers run after recovery read it.
    pub fn open(db: &Path) -> io::Result<Self> {
        let path = log_path(db);
        let mut opts = std::fs::OpenOptions::new();
        opts.read(true).write(true).create(true).truncate(false);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let file = opts.open(&path)?;
        Ok(Self {
            path,
            file,
            offset: 0,
            next_seq: 1,
            ready: false,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every whole batch in the file. `Err(InvalidData)` when a batch with a valid checksum
    /// does not parse.
    pub fn read_batches(&self) -> io::Result<Vec<LogBatch>> {
        let bytes = std::fs::read(&self.path)?;
        parse_batches(&bytes).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }

    /// The next batch gets a sequence number above `seq` (the highest in the database or in
    /// the file).
    pub fn continue_after(&mut self, seq: u64) {
        self.next_seq = self.next_seq.max(seq + 1);
    }

    /// Writes the file out to its full size in zeros if it is not (first use, or a write that
    /// failed), syncs it, and starts appending at its beginning.
    pub fn make_ready(&mut self) -> io::Result<()> {
        if self.file.metadata()?.len() != LOG_BYTES {
            self.ready = false;
            if let Err(e) = self.fill() {
                // Give the space back: on a full disk the database needs it more.
                let _ = self.file.set_len(0);
                return Err(e);
            }
        }
        self.offset = 0;
        self.ready = true;
        Ok(())
    }

    fn fill(&mut self) -> io::Result<()> {
        self.file.set_len(0)?;
        let zeros = vec![0u8; 1 << 20];
        let mut at = 0u64;
        while at < LOG_BYTES {
            let n = (LOG_BYTES - at).min(zeros.len() as u64) as usize;
            self.file.write_all_at(&zeros[..n], at)?;
            at += n as u64;
        }
        // tmpfs and friends report ENOSPC only here for some writes.
        self.file.sync_all()?;
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    }

    pub fn is_ready(&self) -> bool {
        self.ready
    }

    /// Bytes appended since the last restart.
    pub fn used(&self) -> u64 {
        self.offset
    }

    /// Whether a batch of `payload_len` bytes fits after what is there.
    pub fn fits(&self, payload_len: usize) -> bool {
        self.offset + (HEADER + payload_len) as u64 <= LOG_BYTES
    }

    /// The sequence number the next batch will get.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// After a durable commit holds every logged batch: the next one goes at the beginning.
    pub fn restart(&mut self) {
        self.offset = 0;
    }

    /// Appends the batch `seq` (from [`AcceptLog::next_seq`]) and syncs it. On `Err` the log
    /// is no longer ready and the batch must not be answered as durable.
    pub fn append(&mut self, seq: u64, payload: &[u8]) -> io::Result<()> {
        let res = self.append_inner(seq, payload);
        if res.is_err() {
            self.ready = false;
        }
        res
    }

    fn append_inner(&mut self, seq: u64, payload: &[u8]) -> io::Result<()> {
        #[cfg(test)]
        if faults::failing(&self.path) {
            return Err(io::Error::other("injected accept log failure"));
        }
        if !self.ready || !self.fits(payload.len()) || seq < self.next_seq {
            return Err(io::Error::other("the accept log cannot take this batch"));
        }
        let len = u32::try_from(payload.len())
            .map_err(|_| io::Error::other("batch too large for the accept log"))?;
        let mut rec = Vec::with_capacity(HEADER + payload.len());
        rec.extend_from_slice(&MAGIC.to_le_bytes());
        rec.extend_from_slice(&len.to_le_bytes());
        rec.extend_from_slice(&seq.to_le_bytes());
        rec.extend_from_slice(&checksum(seq, payload).to_le_bytes());
        rec.extend_from_slice(payload);
        self.file.write_all_at(&rec, self.offset)?;
        self.file.sync_data()?;
        self.offset += rec.len() as u64;
        self.next_seq = seq + 1;
        Ok(())
    }
}

/// Syncs the database file every [`PREFLUSH_EVERY`] while `dirty` is set (logged batches not
/// yet in a durable commit); ends when `stop` is set.
pub fn spawn_flusher(
    db: &Path,
    dirty: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
) -> io::Result<std::thread::JoinHandle<()>> {
    let file = File::open(db)?;
    std::thread::Builder::new()
        .name("spillway-queue-flush".into())
        .spawn(move || {
            while !stop.load(Ordering::Acquire) {
                std::thread::park_timeout(PREFLUSH_EVERY);
                if dirty.swap(false, Ordering::AcqRel) {
                    // Only an optimisation: durability comes from the log and the checkpoint.
                    let _ = file.sync_data();
                }
            }
        })
}

/// Test-only fault injection: appends to the log at a path fail while it is set.
#[cfg(test)]
pub(crate) mod faults {
    use std::collections::HashSet;
    use std::path::{Path, PathBuf};

    use parking_lot::Mutex;

    static FAILING: Mutex<Option<HashSet<PathBuf>>> = Mutex::new(None);

    pub fn set_failing(path: &Path, on: bool) {
        let mut g = FAILING.lock();
        let set = g.get_or_insert_with(HashSet::new);
        if on {
            set.insert(path.to_path_buf());
        } else {
            set.remove(path);
        }
    }

    pub fn failing(path: &Path) -> bool {
        FAILING.lock().as_ref().is_some_and(|s| s.contains(path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(n: u8) -> Vec<u8> {
        let mut p = Vec::new();
        push_entry(&mut p, 1000 + n as u64, &[n; 10]);
        push_entry(&mut p, 0, &[n + 1; 3]);
        p
    }

    fn ready_log(dir: &Path) -> AcceptLog {
        let mut log = AcceptLog::open(&dir.join("q.redb")).unwrap();
        log.make_ready().unwrap();
        log
    }

    #[test]
    fn appended_batches_read_back_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = ready_log(dir.path());
        assert_eq!(std::fs::metadata(log.path()).unwrap().len(), LOG_BYTES);
        log.append(1, &payload(1)).unwrap();
        log.append(2, &payload(2)).unwrap();
        let got = log.read_batches().unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].seq, 1);
        assert_eq!(
            got[0].entries,
            vec![
                LogEntry {
                    window_ms: 1001,
                    record: vec![1; 10]
                },
                LogEntry {
                    window_ms: 0,
                    record: vec![2; 3]
                }
            ]
        );
        assert_eq!(got[1].seq, 2);
    }

    #[test]
    fn a_restart_hides_what_the_earlier_round_left() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = ready_log(dir.path());
        for seq in 1..=3 {
            log.append(seq, &payload(seq as u8)).unwrap();
        }
        log.restart();
        log.append(4, &payload(9)).unwrap();
        let got = log.read_batches().unwrap();
        // Batches 2 and 3 are still in the file after batch 4, but their numbers are lower.
        assert_eq!(got.iter().map(|b| b.seq).collect::<Vec<_>>(), vec![4]);
    }

    #[test]
    fn a_torn_record_ends_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = ready_log(dir.path());
        log.append(1, &payload(1)).unwrap();
        let second = log.used();
        log.append(2, &payload(2)).unwrap();
        // One flipped byte in the second batch's payload: its checksum no longer matches.
        log.file
            .write_all_at(&[0xff], second + HEADER as u64 + 3)
            .unwrap();
        let got = log.read_batches().unwrap();
        assert_eq!(got.iter().map(|b| b.seq).collect::<Vec<_>>(), vec![1]);
    }

    #[test]
    fn a_full_log_refuses_and_a_failed_append_unreadies_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = ready_log(dir.path());
        assert!(!log.fits(LOG_BYTES as usize));
        assert!(log.append(1, &vec![0; LOG_BYTES as usize]).is_err());
        assert!(!log.is_ready());
        assert!(log.append(2, &payload(1)).is_err(), "not ready");
        log.make_ready().unwrap();
        log.append(2, &payload(1)).unwrap();
    }

    #[test]
    fn a_log_of_the_wrong_size_is_rewritten_when_made_ready() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("q.redb");
        std::fs::write(log_path(&db), b"short").unwrap();
        let mut log = AcceptLog::open(&db).unwrap();
        assert!(log.read_batches().unwrap().is_empty());
        log.make_ready().unwrap();
        assert_eq!(std::fs::metadata(log.path()).unwrap().len(), LOG_BYTES);
        log.append(1, &payload(1)).unwrap();
        assert_eq!(log.read_batches().unwrap().len(), 1);
    }

    #[test]
    fn a_checksummed_batch_that_does_not_parse_is_an_error() {
        let mut bytes = Vec::new();
        let bad = vec![1u8; 5]; // shorter than an entry head
        bytes.extend_from_slice(&MAGIC.to_le_bytes());
        bytes.extend_from_slice(&(bad.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&7u64.to_le_bytes());
        bytes.extend_from_slice(&checksum(7, &bad).to_le_bytes());
        bytes.extend_from_slice(&bad);
        assert!(parse_batches(&bytes).unwrap_err().contains("batch 7"));
    }
}
