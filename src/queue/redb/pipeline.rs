//! Commit pipelining: the `fdatasync` of one batch overlaps the building of the next.
//!
//! A durable redb commit writes its pages and header, then syncs the file, and the writer
//! could start nothing else until the sync returned. [`DeferSync`] sits under redb and turns
//! that sync into a debt ([`SyncPoint::owe`]): the commit returns once its writes are in the
//! file, the writer hands the batch to the sync thread, which pays the debt
//! ([`SyncPoint::sync_through`]) and only then answers the waiters. Meanwhile the writer
//! applies the next batch in memory. Ordering stays what it was: before any write or resize
//! reaches the file, the backend pays every debt first ([`SyncPoint::settle`]), so the file
//! never holds a byte of batch k+1 before batch k is durable, and no waiter is answered before
//! the sync that covers its batch returned.
//!
//! A failed sync is sticky: every later write fails, so redb stops using the handle and the
//! writer reopens the file; batches that waited on it answer as failed.

use std::io;
use std::ops::Bound;
use std::sync::Arc;

use parking_lot::{Condvar, Mutex};
use redb::{BackendError, StorageBackend};

/// Where the writer and the sync thread meet over the syncs owed to one file.
#[derive(Debug, Default)]
pub struct SyncPoint {
    state: Mutex<State>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct State {
    /// The file whose syncs are owed; `None` while no database is open.
    backend: Option<Arc<dyn StorageBackend>>,
    /// Syncs asked for so far; a ticket is this count when its commit returned.
    owed: u64,
    /// The count of `owed` that the last finished sync covers.
    synced: u64,
    syncing: bool,
    /// The first failed sync since the backend was attached; every later wait fails with it.
    failed: Option<(io::ErrorKind, String)>,
    /// Batches given to the sync thread, and answered by it.
    handed: u64,
    answered: u64,
}

impl SyncPoint {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// A new database handle over `backend`: nothing is owed on it and no failure carries over.
    fn attach(&self, backend: Arc<dyn StorageBackend>) {
        let mut st = self.state.lock();
        st.backend = Some(backend);
        st.synced = st.owed;
        st.failed = None;
    }

    fn detach(&self) {
        self.state.lock().backend = None;
    }

    /// The file has writes that a sync must cover before they count as durable.
    fn owe(&self) {
        self.state.lock().owed += 1;
    }

    /// What [`Self::sync_through`] must reach to cover every commit returned so far.
    pub fn ticket(&self) -> u64 {
        self.state.lock().owed
    }

    /// Returns once a sync covering `ticket` returned, running it here if none is under way.
    pub fn sync_through(&self, ticket: u64) -> io::Result<()> {
        self.wait_for(Some(ticket))
    }

    /// Pays every sync owed so far (before a write, a resize or a close).
    pub fn settle(&self) -> io::Result<()> {
        self.wait_for(None)
    }

    fn wait_for(&self, ticket: Option<u64>) -> io::Result<()> {
        let mut st = self.state.lock();
        loop {
            if st.synced >= ticket.unwrap_or(st.owed) {
                return Ok(());
            }
            if let Some((kind, message)) = &st.failed {
                return Err(io::Error::new(*kind, message.clone()));
            }
            if st.syncing {
                self.changed.wait(&mut st);
                continue;
            }
            let Some(backend) = st.backend.clone() else {
                return Err(io::Error::other("the job store file is closed"));
            };
            let upto = st.owed;
            st.syncing = true;
            let result = parking_lot::MutexGuard::unlocked(&mut st, || backend.sync_data());
            st.syncing = false;
            match result {
                Ok(()) => st.synced = st.synced.max(upto),
                Err(e) => st.failed = Some((e.kind(), e.to_string())),
            }
            self.changed.notify_all();
        }
    }

    /// A batch goes to the sync thread.
    pub fn handed(&self) {
        self.state.lock().handed += 1;
    }

    /// The sync thread answered a batch.
    pub fn answered(&self) {
        let mut st = self.state.lock();
        st.answered += 1;
        self.changed.notify_all();
    }

    /// Returns once every batch handed to the sync thread has been answered (before a reopen,
    /// so no answer is left depending on the old handle).
    pub fn drain(&self) {
        let mut st = self.state.lock();
        while st.answered < st.handed {
            self.changed.wait(&mut st);
        }
    }
}

/// A storage backend whose syncs are paid by [`SyncPoint`] (see the module docs).
#[derive(Debug)]
pub struct DeferSync {
    inner: Arc<dyn StorageBackend>,
    point: Arc<SyncPoint>,
}

impl DeferSync {
    pub fn new(inner: impl StorageBackend, point: &Arc<SyncPoint>) -> Self {
        let inner: Arc<dyn StorageBackend> = Arc::new(inner);
        point.attach(inner.clone());
        Self {
            inner,
            point: point.clone(),
        }
    }
}

impl StorageBackend for DeferSync {
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        self.inner.read(offset, out)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.point.settle()?;
        self.inner.set_len(len)
    }

    fn sync_data(&self) -> io::Result<()> {
        self.point.owe();
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.point.settle()?;
        self.inner.write(offset, data)
    }

    fn close(&self) -> io::Result<()> {
        let settled = self.point.settle();
        let closed = self.inner.close();
        self.point.detach();
        settled.and(closed)
    }

    fn try_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.inner.try_lock_range(start, end)
    }

    fn try_lock_shared_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> Result<bool, BackendError> {
        self.inner.try_lock_shared_range(start, end)
    }

    fn lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.lock_range(start, end)
    }

    fn lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.lock_shared_range(start, end)
    }

    fn unlock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.unlock_range(start, end)
    }

    fn query_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.inner.query_lock_range(start, end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// Records the order of operations reaching the file; a sync can be held or made to fail.
    #[derive(Debug, Default)]
    struct Recorder {
        log: Mutex<Vec<String>>,
        hold: Mutex<()>,
        fail: AtomicBool,
    }

    #[derive(Debug)]
    struct Rec(Arc<Recorder>);

    impl StorageBackend for Rec {
        fn len(&self) -> io::Result<u64> {
            Ok(0)
        }
        fn read(&self, _: u64, _: &mut [u8]) -> io::Result<()> {
            Ok(())
        }
        fn set_len(&self, len: u64) -> io::Result<()> {
            self.0.log.lock().push(format!("len {len}"));
            Ok(())
        }
        fn sync_data(&self) -> io::Result<()> {
            let _held = self.0.hold.lock();
            if self.0.fail.load(Ordering::SeqCst) {
                return Err(io::Error::new(io::ErrorKind::StorageFull, "no space"));
            }
            self.0.log.lock().push("sync".into());
            Ok(())
        }
        fn write(&self, offset: u64, _: &[u8]) -> io::Result<()> {
            self.0.log.lock().push(format!("write {offset}"));
            Ok(())
        }
    }

    fn setup() -> (Arc<Recorder>, Arc<SyncPoint>, DeferSync) {
        let rec = Arc::new(Recorder::default());
        let point = SyncPoint::new();
        let file = DeferSync::new(Rec(rec.clone()), &point);
        (rec, point, file)
    }

    #[test]
    fn a_write_waits_for_the_sync_owed_before_it() {
        let (rec, point, file) = setup();
        file.write(0, b"a").unwrap();
        file.sync_data().unwrap();
        // The commit returned, but nothing was synced yet: the sync is owed.
        assert_eq!(*rec.log.lock(), ["write 0"]);
        let ticket = point.ticket();
        file.write(4096, b"b").unwrap();
        assert_eq!(*rec.log.lock(), ["write 0", "sync", "write 4096"]);
        // The ticket was covered by the sync the write paid.
        point.sync_through(ticket).unwrap();
        file.set_len(8192).unwrap();
        assert_eq!(
            *rec.log.lock(),
            ["write 0", "sync", "write 4096", "len 8192"]
        );
    }

    #[test]
    fn a_waiter_is_answered_only_after_the_sync_returned() {
        let (rec, point, file) = setup();
        file.write(0, b"a").unwrap();
        file.sync_data().unwrap();
        let ticket = point.ticket();
        let held = rec.hold.lock();
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let p = point.clone();
        let waiter = std::thread::spawn(move || {
            let r = p.sync_through(ticket);
            done_tx.send(()).unwrap();
            r
        });
        // The sync is held: the waiter must still be waiting.
        assert!(done_rx
            .recv_timeout(std::time::Duration::from_millis(100))
            .is_err());
        drop(held);
        done_rx.recv().unwrap();
        waiter.join().unwrap().unwrap();
        assert_eq!(*rec.log.lock(), ["write 0", "sync"]);
        // A second waiter for the same ticket needs no new sync.
        point.sync_through(ticket).unwrap();
        assert_eq!(rec.log.lock().len(), 2);
    }

    #[test]
    fn a_failed_sync_fails_its_waiters_and_every_later_write() {
        let (rec, point, file) = setup();
        file.write(0, b"a").unwrap();
        file.sync_data().unwrap();
        let synced = point.ticket();
        point.sync_through(synced).unwrap();
        file.write(4096, b"b").unwrap();
        file.sync_data().unwrap();
        let lost = point.ticket();
        rec.fail.store(true, Ordering::SeqCst);
        let e = point.sync_through(lost).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::StorageFull);
        rec.fail.store(false, Ordering::SeqCst);
        // Sticky: the handle takes no more writes, and the lost ticket stays lost.
        assert!(file.write(8192, b"c").is_err());
        assert!(point.sync_through(lost).is_err());
        // What was synced before the failure stays answered as synced.
        point.sync_through(synced).unwrap();
        assert_eq!(*rec.log.lock(), ["write 0", "sync", "write 4096"]);
        // A new handle (a reopen) starts clean.
        drop(file);
        let file = DeferSync::new(Rec(rec.clone()), &point);
        file.write(8192, b"c").unwrap();
        file.sync_data().unwrap();
        point.sync_through(point.ticket()).unwrap();
    }

    #[test]
    fn drain_waits_for_every_handed_batch() {
        let point = SyncPoint::new();
        point.handed();
        point.handed();
        let p = point.clone();
        let answering = std::thread::spawn(move || {
            p.answered();
            p.answered();
        });
        point.drain();
        answering.join().unwrap();
        let st = point.state.lock();
        assert_eq!((st.handed, st.answered), (2, 2));
    }
}
