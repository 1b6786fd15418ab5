//! The writer thread: the only write connection, and group commit over it.
//!
//! The thread owns the write connection. Its loop is the one of
//! [`group_commit`](crate::store::group_commit): gather a batch from the
//! [`Inbox`], [`apply`] it in one transaction, then publish and reply. A
//! reply means the write is committed (with `Durability::Full` fsynced, with
//! `Durability::Normal` handed to the OS).
//!
//! If a transaction fails it was rolled back whole: every op in it is
//! answered with an error (`StoreError::Full` for a full disk, otherwise
//! internal), nothing is published, and later batches are tried as usual, so
//! writes resume once the disk has room. A COMMIT that fails past writing
//! the log, in its fsync, leaves the writer refusing every later write,
//! because after a failed fsync the file's state is no longer known to this
//! process; a restart is what recovers it (SQLite replays or discards the
//! write-ahead log on open). That, and a writer thread that dies (a panic),
//! turn the store's health to [`StoreHealth::NotServing`].
//!
//! The thread ends when the store is closed (after the commands already
//! queued) or when every store handle has been dropped; it then closes its
//! connection, the last one, which checkpoints the write-ahead log into the
//! file and removes it.

use std::{
    any::Any,
    io,
    panic::{self, AssertUnwindSafe},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::Instant,
};

use rusqlite::Connection;
use tokio::sync::{mpsc, watch};

use super::{
    apply::{BatchError, apply, rolled_back_error},
    inbox::Inbox,
    open::FileLock,
};
use crate::store::{
    ChangeFeed, StoreError, StoreHealth,
    group_commit::{Batch, BatchResults, Command, GroupCommit, WriteStats},
};

/// The running writer thread, as the store holds it.
#[derive(Debug)]
pub(super) struct WriterThread {
    thread: thread::JoinHandle<()>,
    /// Tells the thread's [`Inbox`] to close.
    closing: Arc<AtomicBool>,
}

impl WriterThread {
    /// Starts the writer on `conn`, taking commands from `receiver`. The
    /// thread holds the file's `lock` until it has closed `conn`, the
    /// store's last connection (see [`FileLock`] for why not before).
    pub(super) fn spawn(
        conn: Connection,
        lock: FileLock,
        receiver: mpsc::Receiver<Command>,
        feed: ChangeFeed,
        stats: WriteStats,
        health: watch::Sender<StoreHealth>,
    ) -> io::Result<WriterThread> {
        Self::spawn_running(conn, lock, receiver, feed, stats, health, Writer::run)
    }

    /// [`WriterThread::spawn`], the thread running `run` (the writer's
    /// loop, or a test's stand-in for it) and catching its panic.
    fn spawn_running(
        conn: Connection,
        lock: FileLock,
        receiver: mpsc::Receiver<Command>,
        feed: ChangeFeed,
        stats: WriteStats,
        health: watch::Sender<StoreHealth>,
        run: fn(&mut Writer),
    ) -> io::Result<WriterThread> {
        let closing = Arc::new(AtomicBool::new(false));
        let inbox_closing = closing.clone();
        let thread = thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn(move || {
                let inbox = Inbox::new(receiver, inbox_closing);
                let mut writer =
                    Writer::new(conn, inbox, GroupCommit::new(Some(feed), stats), health);
                let ran = panic::catch_unwind(AssertUnwindSafe(|| run(&mut writer)));
                writer.stop(ran.err());
                drop(lock);
            })?;
        Ok(WriterThread { thread, closing })
    }

    /// Has the writer commit what is queued, then stop and close its
    /// connection; returns once it has. Blocks: call it on a blocking
    /// thread.
    pub(super) fn close(self) {
        self.closing.store(true, Ordering::Release);
        self.thread.thread().unpark();
        // The thread catches its own panics: an error here is one in
        // closing the connection, which it has logged.
        let _ = self.thread.join();
    }
}

/// The writer thread's state.
struct Writer {
    conn: Connection,
    inbox: Inbox,
    group: GroupCommit,
    health: watch::Sender<StoreHealth>,
    /// Set after a COMMIT that failed past writing the log (in its fsync):
    /// every later write is refused with it.
    failed: Option<String>,
}

impl Writer {
    fn new(
        conn: Connection,
        inbox: Inbox,
        group: GroupCommit,
        health: watch::Sender<StoreHealth>,
    ) -> Self {
        Writer {
            conn,
            inbox,
            group,
            health,
            failed: None,
        }
    }

    /// Commits batches until the inbox ends (the store closed or dropped).
    fn run(&mut self) {
        while let Some(first) = self.inbox.recv() {
            let mut batch = self.group.start(first, || self.inbox.try_recv());
            while let Some(deadline) = batch.wait_until() {
                let Some(command) = self.inbox.recv_until(deadline) else {
                    break;
                };
                batch.add(command, || self.inbox.try_recv());
            }
            let started = Instant::now();
            let outcome = self.commit(&batch);
            self.group.finish(batch, started.elapsed(), outcome);
        }
    }

    /// Applies and commits `batch`: one result per op, or the error every
    /// op gets. Logs a failure, once for the batch.
    fn commit(&mut self, batch: &Batch) -> Result<BatchResults, StoreError> {
        if let Some(reason) = &self.failed {
            return Err(StoreError::Internal(reason.clone()));
        }
        match apply(&self.conn, batch.ops()) {
            Ok(results) => Ok(results),
            Err(BatchError::RolledBack(err)) => {
                tracing::error!(error = %err, ops = batch.len(), "SQLite write failed; batch rolled back");
                Err(rolled_back_error(&err))
            }
            Err(BatchError::Commit(err)) => {
                tracing::error!(
                    error = %err,
                    ops = batch.len(),
                    "SQLite commit failed; refusing further writes until restart"
                );
                let reason = format!("SQLite commit failed ({err}); restart the server");
                self.failed = Some(reason.clone());
                self.health.send_replace(StoreHealth::NotServing);
                Err(StoreError::Internal(reason))
            }
        }
    }

    /// After the loop: turns health to not serving (the store takes no more
    /// writes) and closes the connection. `panic` is why the loop ended
    /// early, if it did.
    fn stop(self, panic: Option<Box<dyn Any + Send>>) {
        self.health.send_replace(StoreHealth::NotServing);
        match panic {
            Some(panic) => {
                let message = panic
                    .downcast_ref::<&str>()
                    .copied()
                    .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
                    .unwrap_or("(no message)");
                tracing::error!(
                    panic = message,
                    "the SQLite writer died; writes fail until the server is restarted"
                );
            }
            None => tracing::debug!("SQLite writer stopped"),
        }
        if let Err((_, err)) = self.conn.close() {
            tracing::error!(error = %err, "closing the SQLite write connection failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::store::{
        PreparedOp,
        group_commit::{self, Writes},
        sqlite::open::{Durability, lock, open},
        tests::named,
    };

    /// A writer on a new file in `dir`, driven by hand, and the other end of
    /// its queue.
    fn writer(dir: &tempfile::TempDir, feed: ChangeFeed) -> (Writer, Writes) {
        let (conn, _) = open(&dir.path().join("users.db"), Durability::Full).unwrap();
        let (writes, receiver) = group_commit::queue();
        let inbox = Inbox::new(receiver, Arc::new(AtomicBool::new(false)));
        let (health, _) = watch::channel(StoreHealth::Serving);
        let group = GroupCommit::new(Some(feed), WriteStats::default());
        (Writer::new(conn, inbox, group, health), writes)
    }

    /// Commits one batch of `ops` as the writer's loop would; returns the
    /// results.
    fn commit(writer: &mut Writer, ops: Vec<PreparedOp>) -> BatchResults {
        let (command, mut replied) = Command::for_test(ops);
        let batch = writer.group.start(command, || None);
        let outcome = writer.commit(&batch);
        writer.group.finish(batch, Duration::ZERO, outcome);
        replied.try_recv().unwrap()
    }

    /// A full disk, staged with SQLite's own page limit (which fails the same
    /// way, with SQLITE_FULL): the batch is answered with `Full` and rolled
    /// back, and the writer goes on once there is room.
    #[test]
    fn a_full_database_fails_the_batch_and_the_writer_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let feed = ChangeFeed::new(1024);
        let mut published = feed.subscribe();
        let (mut writer, _writes) = writer(&dir, feed);
        let pages: i64 = writer
            .conn
            .query_row("PRAGMA page_count", [], |row| row.get(0))
            .unwrap();
        writer
            .conn
            .execute_batch(&format!("PRAGMA max_page_count = {pages}"))
            .unwrap();
        // One batch of users far larger than the pages left.
        let create = |count: usize| {
            (0..count)
                .map(|i| PreparedOp::create(&named(&format!("u{i:05}"), &"x".repeat(200))))
                .collect()
        };
        let results = commit(&mut writer, create(1000));
        assert_eq!(results.len(), 1000);
        assert!(
            results
                .iter()
                .all(|r| matches!(r, Err(StoreError::Full(_)))),
            "{:?}",
            results[0]
        );
        assert!(writer.failed.is_none(), "the writer still takes writes");
        assert_eq!(*writer.health.borrow(), StoreHealth::Serving);
        assert!(published.try_recv().is_err(), "nothing published");

        // Room again: the next batch commits, with the first seq.
        writer
            .conn
            .execute_batch("PRAGMA max_page_count = 1073741823")
            .unwrap();
        let results = commit(&mut writer, create(1000));
        assert_eq!(results[0].as_ref().unwrap().seq, 1);
        assert!(results.iter().all(Result::is_ok));
        assert_eq!(published.try_recv().unwrap().seq, 1);
    }

    /// A writer thread that dies (a panic: a bug, since nothing it reads
    /// can make it panic) turns health to not serving: the write it took
    /// fails, and every write after it fails with an internal error instead
    /// of waiting.
    #[tokio::test]
    async fn a_writer_that_dies_turns_health_to_not_serving() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users.db");
        let lock = lock(&path).unwrap();
        let (conn, _) = open(&path, Durability::Full).unwrap();
        let (writes, receiver) = group_commit::queue();
        let (health_sender, mut health) = watch::channel(StoreHealth::Serving);
        let thread = WriterThread::spawn_running(
            conn,
            lock,
            receiver,
            ChangeFeed::new(16),
            WriteStats::default(),
            health_sender,
            |writer| {
                let _taken = writer.inbox.recv();
                panic!("a bug in the writer");
            },
        )
        .unwrap();
        assert_eq!(*health.borrow_and_update(), StoreHealth::Serving);
        let delete = || PreparedOp::Delete {
            id: "a".into(),
            expected_version: None,
        };
        let died = writes.submit(smallvec::smallvec![delete()]).await;
        assert!(
            matches!(died.as_slice(), [Err(StoreError::Internal(_))]),
            "{died:?}"
        );
        tokio::time::timeout(
            Duration::from_secs(10),
            health.wait_for(|h| *h == StoreHealth::NotServing),
        )
        .await
        .expect("health changes")
        .unwrap();
        let after = writes.submit(smallvec::smallvec![delete()]).await;
        assert!(
            matches!(after.as_slice(), [Err(StoreError::Internal(_))]),
            "{after:?}"
        );
        tokio::task::spawn_blocking(move || thread.close())
            .await
            .unwrap();
    }
}
