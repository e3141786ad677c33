//! A redb storage backend that fills the file with zeros ahead of the database's writes.
//!
//! redb grows its file with `set_len`, which leaves a hole. A commit that writes pages into the
//! hole makes the file system allocate blocks, and its `fdatasync` must then also write the
//! allocation metadata and the inode: more synchronous disk round trips on a commit that wanted
//! one. While the queue grows (a backlog building up), that is nearly every commit. Here a
//! filler thread writes zeros a few [`CHUNK`]s ahead of the highest write, by direct I/O, so the
//! blocks are allocated off the commit path and no commit's sync has to write the zeros out.
//! (Measured: +16-19% durable accepts/s while the queue grows; see benches/README.md.) Where
//! the file system has no direct I/O (tmpfs), nothing is filled: syncs cost little there.
//!
//! Only holes are filled, lowest first: redb writes pages into every part of a grown file, not
//! only at its end, and a hole a commit meets is filled on the commit path (zeros its sync must
//! then write out). The file is tracked in chunks, each with how far from its start it holds
//! data or zeros written here. A write first fills its own chunks up to its end when the filler
//! has not got there, so every write lands below the mark, and a fill, which only ever starts at
//! the mark, never overwrites a page redb wrote. The filler's direct write runs without the lock
//! (so commits elsewhere in the file go on); a write or resize that touches the chunk being
//! filled waits for it. What the file held at open counts as filled. Filling is best effort: a
//! failed fill (a full disk) leaves the hole, and the database's own write reports what
//! matters.
//!
//! The filler keeps off the database's writes, which otherwise wait for its direct writes: on
//! ext4 a direct write that allocates blocks holds the inode's lock for the whole device
//! write, so every page write waits for it, wherever in the file. After the file grew, the
//! filler ran back to back through the new space, each page of a commit waited for one of its
//! pieces, and a commit of a few hundred pages stalled every accept for 40-100 ms
//! (benches/README.md, "Seventh run"). So the filler starts a piece only after [`QUIET`]
//! without a database write (commits write their pages in bursts, with idle time between), or
//! once it deferred for [`MAX_DEFER`], so that writes that never pause cannot starve it.

use std::fs::File;
use std::ops::Bound;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Condvar, Mutex};
use redb::backends::FileBackend;
use redb::{BackendError, StorageBackend};
use tokio::time::Instant;

// redb 4 without `experimental-api-5`: data operations return `std::io::Error`.
type BackendIoError = std::io::Error;

/// The unit of filling: one block allocation (and one metadata write) per this much growth.
pub const CHUNK: u64 = 2 << 20;
/// How many chunks past the highest write the filler keeps filled.
const AHEAD: u64 = 2;
/// Zeros written per lock hold, so the filler never holds up a commit's writes for long.
const PIECE: usize = 128 << 10;
/// Direct I/O moves whole blocks from aligned memory.
const BLOCK: u64 = 4096;
/// Time without a database write after which the filler may write.
const QUIET: Duration = Duration::from_micros(200);
/// Longest the filler defers a piece to the database's writes.
const MAX_DEFER: Duration = Duration::from_millis(10);

#[repr(align(4096))]
struct Aligned([u8; PIECE]);
static ZEROS: Aligned = Aligned([0; PIECE]);

/// redb's file backend with zeros written ahead of its growth (see the module docs).
#[derive(Debug)]
pub struct PreallocFile {
    shared: Arc<Shared>,
    filler: Mutex<Option<std::thread::JoinHandle<()>>>,
}

#[derive(Debug)]
struct Shared {
    inner: FileBackend,
    /// The same file opened for direct I/O; `None` turns filling off.
    direct: Option<File>,
    state: Mutex<State>,
    /// Wakes the filler: the frontier moved, the length changed, or it is closing.
    wake: Condvar,
    /// Wakes writers waiting for the filler's write in flight to end.
    landed: Condvar,
}

#[derive(Debug)]
struct State {
    /// By chunk: bytes from the chunk's start that hold data or zeros (the rest is a hole).
    filled: Vec<u64>,
    len: u64,
    /// The chunk of the highest byte written since open.
    frontier: u64,
    /// The chunk the filler is writing into without the lock, if any.
    in_flight: Option<u64>,
    /// When the database last wrote.
    last_write: Option<Instant>,
    /// Since when the filler has deferred its next piece to the database's writes.
    deferring_since: Option<Instant>,
    closed: bool,
}

impl State {
    fn new(len: u64) -> Self {
        let chunks = len.div_ceil(CHUNK);
        Self {
            filled: (0..chunks).map(|i| (len - i * CHUNK).min(CHUNK)).collect(),
            len,
            frontier: chunks.saturating_sub(1),
            in_flight: None,
            last_write: None,
            deferring_since: None,
            closed: false,
        }
    }

    fn done(&self, c: u64) -> u64 {
        self.filled.get(c as usize).copied().unwrap_or(0)
    }

    fn set_done(&mut self, c: u64, done: u64) {
        if self.filled.len() <= c as usize {
            self.filled.resize(c as usize + 1, 0);
        }
        self.filled[c as usize] = done;
    }

    /// How much of chunk `c` lies below the file's length.
    fn room(&self, c: u64) -> u64 {
        self.len.saturating_sub(c * CHUNK).min(CHUNK)
    }

    /// Whether every byte of `offset..end` is below its chunk's mark.
    fn covers(&self, offset: u64, end: u64) -> bool {
        (offset / CHUNK..end.div_ceil(CHUNK))
            .all(|c| c * CHUNK + self.done(c) >= end.min((c + 1) * CHUNK))
    }

    /// The lowest chunk up to [`AHEAD`] past the frontier with a hole below the length.
    fn next_to_fill(&self) -> Option<u64> {
        (0..=self.frontier + AHEAD).find(|&c| self.done(c) < self.room(c))
    }

    /// How long the filler should still keep off the file at `now` (see the module docs).
    fn defer(&mut self, now: Instant) -> Option<Duration> {
        let quiet = self
            .last_write
            .map_or(QUIET, |t| now.saturating_duration_since(t));
        if quiet >= QUIET {
            self.deferring_since = None;
            return None;
        }
        let since = *self.deferring_since.get_or_insert(now);
        if now.saturating_duration_since(since) >= MAX_DEFER {
            self.deferring_since = None;
            return None;
        }
        Some(QUIET - quiet)
    }

    /// Whether the filler's write in flight lies in one of the chunks of `offset..end`.
    fn in_flight_in(&self, offset: u64, end: u64) -> bool {
        self.in_flight
            .is_some_and(|c| (offset / CHUNK..end.div_ceil(CHUNK)).contains(&c))
    }

    /// Zeros, through the page cache, from chunk `c`'s mark up to `upto` bytes into it.
    fn fill_to(&mut self, inner: &FileBackend, c: u64, upto: u64) -> Result<(), BackendIoError> {
        let mut done = self.done(c);
        let upto = upto.min(self.room(c));
        while done < upto {
            let n = (upto - done).min(PIECE as u64);
            inner.write(c * CHUNK + done, &ZEROS.0[..n as usize])?;
            done += n;
            self.set_done(c, done);
        }
        Ok(())
    }
}

/// Opens (or creates) the database file read-write, as redb's own `Builder::create` does.
pub fn open_file(path: &Path) -> std::io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
}

impl PreallocFile {
    /// Wraps `file`, the database at `path`; filling is on where `path` opens for direct I/O.
    pub fn new(file: File, path: &Path) -> std::io::Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        let len = file.metadata()?.len();
        let direct = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
            .open(path)
            .ok();
        let inner = FileBackend::new(file).map_err(std::io::Error::other)?;
        let on = direct.is_some();
        let shared = Arc::new(Shared {
            inner,
            direct,
            state: Mutex::new(State::new(len)),
            wake: Condvar::new(),
            landed: Condvar::new(),
        });
        let filler = if on {
            let s = shared.clone();
            Some(
                std::thread::Builder::new()
                    .name("spillway-prealloc".into())
                    .spawn(move || s.run())?,
            )
        } else {
            None
        };
        Ok(Self {
            shared,
            filler: Mutex::new(filler),
        })
    }

    fn filling(&self) -> bool {
        self.shared.direct.is_some()
    }

    fn stop(&self) {
        self.shared.state.lock().closed = true;
        self.shared.wake.notify_one();
        if let Some(t) = self.filler.lock().take() {
            let _ = t.join();
        }
    }
}

impl Shared {
    fn run(&self) {
        let Some(direct) = &self.direct else { return };
        let mut st = self.state.lock();
        while !st.closed {
            let Some(c) = st.next_to_fill() else {
                self.wake.wait(&mut st);
                continue;
            };
            if let Some(wait) = st.defer(Instant::now()) {
                self.wake.wait_for(&mut st, wait);
                continue;
            }
            let done = st.done(c);
            let n = (st.room(c) - done).min(PIECE as u64);
            let written = if done.is_multiple_of(BLOCK) && n.is_multiple_of(BLOCK) {
                // Claimed: writes and resizes touching chunk `c` wait until it lands.
                st.in_flight = Some(c);
                let r = parking_lot::MutexGuard::unlocked(&mut st, || {
                    direct.write_all_at(&ZEROS.0[..n as usize], c * CHUNK + done)
                });
                st.in_flight = None;
                self.landed.notify_all();
                r.map(|()| st.set_done(c, done + n))
            } else {
                // An unaligned tail (a length redb set off a block boundary).
                st.fill_to(&self.inner, c, done + n)
            };
            if written.is_err() {
                // Most likely a full disk: leave the hole; look again after the next write.
                self.wake.wait(&mut st);
                continue;
            }
            // Let the database's writes in between pieces.
            parking_lot::MutexGuard::bump(&mut st);
        }
    }
}

impl StorageBackend for PreallocFile {
    fn len(&self) -> Result<u64, BackendIoError> {
        self.shared.inner.len()
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), BackendIoError> {
        self.shared.inner.read(offset, out)
    }

    fn set_len(&self, len: u64) -> Result<(), BackendIoError> {
        if !self.filling() {
            return self.shared.inner.set_len(len);
        }
        let mut st = self.shared.state.lock();
        // A fill in flight past a shrunk length would grow the file back.
        while st.in_flight.is_some() {
            self.shared.landed.wait(&mut st);
        }
        // What lies beyond a shrunk length is gone: a hole again if the file grows back.
        for (c, done) in st.filled.iter_mut().enumerate() {
            *done = (*done).min(len.saturating_sub(c as u64 * CHUNK));
        }
        self.shared.inner.set_len(len)?;
        st.len = len;
        st.frontier = st.frontier.min(len.saturating_sub(1) / CHUNK);
        self.shared.wake.notify_one();
        Ok(())
    }

    fn sync_data(&self) -> Result<(), BackendIoError> {
        self.shared.inner.sync_data()
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), BackendIoError> {
        if self.filling() {
            let end = offset + data.len() as u64;
            let mut st = self.shared.state.lock();
            // Below the marks the filler never writes; above them it may be writing now.
            while !st.covers(offset, end) && st.in_flight_in(offset, end) {
                self.shared.landed.wait(&mut st);
            }
            if !st.covers(offset, end) {
                for c in offset / CHUNK..end.div_ceil(CHUNK) {
                    // Best effort: the write below reports what matters.
                    if st.fill_to(&self.shared.inner, c, end - c * CHUNK).is_err() {
                        break;
                    }
                }
            }
            st.last_write = Some(Instant::now());
            let last = end.saturating_sub(1) / CHUNK;
            if last > st.frontier {
                st.frontier = last;
                self.shared.wake.notify_one();
            }
        }
        self.shared.inner.write(offset, data)
    }

    fn close(&self) -> Result<(), BackendIoError> {
        // No zero may reach the file after this: a reopen gets a new backend on the same file.
        self.stop();
        self.shared.inner.close()
    }

    fn try_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.shared.inner.try_lock_range(start, end)
    }

    fn try_lock_shared_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> Result<bool, BackendError> {
        self.shared.inner.try_lock_shared_range(start, end)
    }

    fn lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.shared.inner.lock_range(start, end)
    }

    fn lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.shared.inner.lock_shared_range(start, end)
    }

    fn unlock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.shared.inner.unlock_range(start, end)
    }

    fn query_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.shared.inner.query_lock_range(start, end)
    }
}

impl Drop for PreallocFile {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(path: &Path) -> PreallocFile {
        PreallocFile::new(open_file(path).unwrap(), path).unwrap()
    }

    fn read(b: &PreallocFile, offset: u64, n: usize) -> Vec<u8> {
        let mut out = vec![0; n];
        b.read(offset, &mut out).unwrap();
        out
    }

    /// Polls until the filler has nothing left to do (it works ahead on its own thread).
    fn settled(b: &PreallocFile) {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        while b.shared.state.lock().next_to_fill().is_some() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "filler never caught up"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    /// A new file of `len` bytes (a hole) under the backend, in a directory of its own.
    fn fresh(len: u64) -> (tempfile::TempDir, std::path::PathBuf, PreallocFile) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let b = open(&path);
        assert!(b.filling(), "no direct I/O in {}", dir.path().display());
        b.set_len(len).unwrap();
        (dir, path, b)
    }

    #[test]
    fn zeros_never_overwrite_written_pages() {
        let (_dir, path, b) = fresh(8 * CHUNK);
        // Writes out of order, including one far past the frontier and one straddling chunks.
        let writes: Vec<(u64, u8)> = vec![
            (0, 1),
            (5 * CHUNK + 3 * BLOCK, 2),
            (4 * BLOCK, 3),
            (2 * CHUNK - BLOCK, 4),
            (3 * CHUNK + 7 * BLOCK, 5),
        ];
        for &(at, v) in &writes {
            b.write(at, &vec![v; 2 * BLOCK as usize]).unwrap();
            settled(&b);
        }
        for &(at, v) in &writes {
            assert!(
                read(&b, at, 2 * BLOCK as usize).iter().all(|&x| x == v),
                "{at}"
            );
        }
        // The filler went ahead of the far write (chunk 5) and filled chunk 4, skipped, below it.
        {
            let st = b.shared.state.lock();
            assert!((0..8).all(|c| st.done(c) == CHUNK));
        }
        assert_eq!(read(&b, 4 * CHUNK, 16), vec![0; 16]);
        assert_eq!(b.len().unwrap(), 8 * CHUNK);
        b.close().unwrap();

        // Reopened: what the file holds counts as filled; new writes past it still fill.
        let b = open(&path);
        b.set_len(10 * CHUNK).unwrap();
        b.write(9 * CHUNK, &[6; BLOCK as usize]).unwrap();
        settled(&b);
        for &(at, v) in &writes {
            assert!(
                read(&b, at, 2 * BLOCK as usize).iter().all(|&x| x == v),
                "{at}"
            );
        }
        assert!(read(&b, 9 * CHUNK, BLOCK as usize).iter().all(|&x| x == 6));
        assert_eq!(b.len().unwrap(), 10 * CHUNK);
    }

    #[test]
    fn the_filler_defers_to_database_writes_for_a_bounded_time() {
        let mut st = State::new(0);
        let t0 = Instant::now();
        assert_eq!(st.defer(t0), None, "no write yet");
        st.last_write = Some(t0);
        let us = Duration::from_micros;
        assert_eq!(st.defer(t0 + us(50)), Some(QUIET - us(50)));
        assert_eq!(st.defer(t0 + QUIET), None, "quiet long enough");
        // Writes that never pause: deferred from the first look, for MAX_DEFER at most.
        let first = t0 + QUIET + us(1);
        st.last_write = Some(first);
        assert!(st.defer(first).is_some());
        let late = first + MAX_DEFER;
        st.last_write = Some(late);
        assert_eq!(st.defer(late), None, "deferred long enough");
        assert!(st.defer(late).is_some(), "defers again after one piece");
    }

    #[test]
    fn writes_racing_the_filler_keep_their_data() {
        // Writes all over a grown file while the filler works through its holes without the
        // lock: no zero it writes may land on a page already written.
        let (_dir, _, b) = fresh(16 * CHUNK);
        let b = Arc::new(b);
        let writers: Vec<_> = (0..2u64)
            .map(|t| {
                let b = b.clone();
                std::thread::spawn(move || {
                    let mut at = Vec::new();
                    for i in 0..400u64 {
                        // Spread over all chunks, both threads, never the same block twice.
                        let block = (i * 7919 + t * 3) % (16 * CHUNK / BLOCK) / 2 * 2 + t;
                        let v = (block % 251) as u8 + 1;
                        b.write(block * BLOCK, &[v; BLOCK as usize]).unwrap();
                        at.push((block * BLOCK, v));
                    }
                    at
                })
            })
            .collect();
        let written: Vec<(u64, u8)> = writers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect();
        settled(&b);
        for (at, v) in written {
            assert!(read(&b, at, BLOCK as usize).iter().all(|&x| x == v), "{at}");
        }
        assert_eq!(b.len().unwrap(), 16 * CHUNK);
    }

    #[test]
    fn a_shrunk_file_that_grows_back_reads_zeros() {
        let (_dir, _, b) = fresh(4 * CHUNK);
        b.write(CHUNK, &[7; BLOCK as usize]).unwrap();
        b.write(3 * CHUNK, &[8; BLOCK as usize]).unwrap();
        settled(&b);
        b.set_len(CHUNK + BLOCK).unwrap();
        b.set_len(4 * CHUNK).unwrap();
        b.write(2 * CHUNK, &[9; BLOCK as usize]).unwrap();
        settled(&b);
        assert!(read(&b, CHUNK, BLOCK as usize).iter().all(|&x| x == 7));
        assert!(read(&b, 3 * CHUNK, BLOCK as usize).iter().all(|&x| x == 0));
        assert!(read(&b, 2 * CHUNK, BLOCK as usize).iter().all(|&x| x == 9));
    }

    #[test]
    fn a_database_on_it_round_trips() {
        const T: redb::TableDefinition<'_, u64, &[u8]> = redb::TableDefinition::new("t");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let db = redb::Builder::new()
            .create_with_backend(open(&path))
            .unwrap();
        for batch in 0..40u64 {
            let tx = db.begin_write().unwrap();
            {
                let mut t = tx.open_table(T).unwrap();
                for i in 0..100 {
                    t.insert(batch * 100 + i, [batch as u8; 1000].as_slice())
                        .unwrap();
                }
            }
            tx.commit().unwrap();
        }
        drop(db);
        let db = redb::Database::open(&path).unwrap();
        let tx = redb::ReadableDatabase::begin_read(&db).unwrap();
        let t = tx.open_table(T).unwrap();
        assert_eq!(redb::ReadableTableMetadata::len(&t).unwrap(), 4000);
        assert_eq!(
            t.get(3999).unwrap().unwrap().value(),
            [39u8; 1000].as_slice()
        );
    }
}
