//! The SQLite store: users in one file that survives restarts and crashes.
//!
//! A call reads down these files:
//!
//! - here, [`SqliteStore`]: opening, closing, and each [`Store`] method
//!   handing its work to the writer or to the readers;
//! - `open`: the file, inspected and refused if it is not ours, and the
//!   connections' settings; `schema`: the tables, their constraints, and
//!   the migrations;
//! - `writer`: the one thread that owns the write connection and commits
//!   every write by [`group_commit`], taking commands from its parking
//!   `inbox`;
//! - `apply`: one batch, applied in one transaction;
//! - `read`: GetUser and listing pages on a few read-only connections,
//!   which never wait for the writer (WAL mode).
//!
//! The file is in WAL mode: `PATH-wal` and `PATH-shm` sit beside it while
//! the store is open, and locked: one store, so one server, at a time
//! (`open::FileLock`). [`SqliteStore::close`] (or dropping the last handle)
//! closes every connection, the writer's last, which checkpoints the log
//! into the file and removes it: the file alone then holds every user.

mod apply;
mod inbox;
mod open;
mod read;
mod schema;
mod writer;

use std::{path::Path, sync::Arc};

use parking_lot::Mutex;
use prometheus_client::encoding::DescriptorEncoder;
use tokio::sync::watch;

pub use open::{
    APPLICATION_ID, BUSY_TIMEOUT, Durability, OpenError, SQLITE_PAGE_BYTES,
    WAL_AUTOCHECKPOINT_PAGES, WRITER_CACHE_KIB, open_writer,
};
pub use read::MAX_READERS;
pub use schema::SCHEMA_VERSION;

use self::{read::Readers, writer::WriterThread};
use super::{
    ChangeFeed, ListFilter, Ops, Page, Results, Store, StoreError, StoreHealth, Subscription,
    group_commit::{self, WriteStats, Writes},
};
use crate::user::User;

/// How to open a [`SqliteStore`].
#[derive(Debug, Clone, Copy)]
pub struct SqliteOptions {
    pub durability: Durability,
    /// How far a change-feed subscriber may fall behind before it is cut off
    /// (see [`ChangeFeed`]).
    pub feed_capacity: usize,
}

/// Users in a SQLite file, durable once a write is acknowledged.
///
/// A cheap handle: clones share the writer, the readers and the feed.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    // Fields drop in this order when the last handle goes without `close`:
    // the read connections close before the writer's queue, so that the
    // writer's connection is the last to close and checkpoints and removes
    // the write-ahead log (a read-only connection cannot).
    readers: Readers,
    writes: Writes,
    /// The writer's commits, for the metrics endpoint.
    stats: WriteStats,
    /// Taken by the first `close`.
    writer: Mutex<Option<WriterThread>>,
    feed: ChangeFeed,
    health: watch::Receiver<StoreHealth>,
}

impl SqliteStore {
    /// Opens (creating or migrating) the store at `path` and starts its
    /// writer thread. Blocks while it inspects the file: call it at startup.
    pub fn open(path: impl AsRef<Path>, options: SqliteOptions) -> Result<SqliteStore, OpenError> {
        let path = path.as_ref();
        let lock = open::lock(path)?;
        let (conn, seq) = open::open(path, options.durability)?;
        tracing::info!(
            path = %path.display(),
            schema = SCHEMA_VERSION,
            seq,
            durability = %options.durability,
            "opened SQLite store"
        );
        let feed = ChangeFeed::new(options.feed_capacity);
        let (writes, receiver) = group_commit::queue();
        let (health_sender, health) = watch::channel(StoreHealth::Serving);
        // Counted once here (the file was just read whole by its check);
        // from then on the commits keep the count.
        let users: i64 = conn
            .query_row("SELECT count(*) FROM users", [], |row| row.get(0))
            .map_err(|source| OpenError::Sqlite {
                path: path.to_owned(),
                source,
            })?;
        let stats = WriteStats::default();
        stats.start_from(users.unsigned_abs(), seq);
        let writer = WriterThread::spawn(
            conn,
            lock,
            receiver,
            feed.clone(),
            stats.clone(),
            health_sender,
        )
        .map_err(|source| OpenError::Io {
            path: path.to_owned(),
            source,
        })?;
        Ok(SqliteStore {
            shared: Arc::new(Shared {
                readers: Readers::new(path),
                writes,
                stats,
                writer: Mutex::new(Some(writer)),
                feed,
                health,
            }),
        })
    }

    /// The seq of the last committed change (0 before the first).
    pub async fn last_seq(&self) -> Result<u64, StoreError> {
        self.shared.readers.last_seq().await
    }

    /// How many users are stored.
    pub async fn count(&self) -> Result<u64, StoreError> {
        self.shared.readers.count().await
    }
}

impl Store for SqliteStore {
    /// One command to the writer: the ops (their users built on the
    /// caller's thread, to keep the writer's work to the SQL) share its
    /// next commit.
    async fn write(&self, ops: Ops) -> Results {
        self.shared.writes.submit(ops).await
    }

    async fn get(&self, id: &str) -> Result<User, StoreError> {
        self.shared.readers.get(id).await
    }

    async fn list_page(
        &self,
        filter: ListFilter,
        after: Option<&str>,
        max: usize,
    ) -> Result<Page, StoreError> {
        self.shared.readers.list_page(filter, after, max).await
    }

    fn subscribe(&self) -> Subscription {
        self.shared.feed.subscribe()
    }

    /// Not serving once the writer has stopped taking writes: it died, or a
    /// commit failed in its fsync (see `writer`), or the store was closed.
    fn health(&self) -> watch::Receiver<StoreHealth> {
        self.shared.health.clone()
    }

    fn encode_metrics(&self, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        self.shared.stats.encode(encoder, &self.shared.writes)
    }

    /// Waits for the reads under way and closes the read connections, then
    /// has the writer commit the writes already queued and close the write
    /// connection, last: that checkpoints the write-ahead log into the file
    /// and removes it. Returns once all that is done. The first call closes;
    /// later calls return at once.
    async fn close(&self) {
        let Some(writer) = self.shared.writer.lock().take() else {
            return;
        };
        self.shared.readers.close().await;
        if let Err(err) = tokio::task::spawn_blocking(move || writer.close()).await {
            tracing::error!(error = %err, "closing the SQLite writer failed");
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::store::{
        StoreExt,
        tests::{self, named},
    };

    pub(crate) fn options() -> SqliteOptions {
        SqliteOptions {
            durability: Durability::Full,
            feed_capacity: 1024,
        }
    }

    /// The write-ahead log beside `path`.
    pub(crate) fn wal(path: &Path) -> PathBuf {
        path.with_extension("db-wal")
    }

    /// A store on a new file in a new temporary directory: the store, the
    /// file's path, and the directory (deleted when dropped).
    pub(crate) fn open_new() -> (SqliteStore, PathBuf, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users.db");
        let store = SqliteStore::open(&path, options()).unwrap();
        (store, path, dir)
    }

    #[tokio::test]
    async fn restart_keeps_users_versions_and_seq() {
        let (store, path, _dir) = open_new();
        let created = store.create(named("", "Ann")).await.unwrap();
        store.upsert(named("b", "Bob"), None).await.unwrap();
        store.upsert(named("b", "Bobby"), Some(1)).await.unwrap();
        store.upsert(named("c", "Cy"), None).await.unwrap();
        store.delete("c", None).await.unwrap();
        assert_eq!(store.last_seq().await.unwrap(), 5);
        store.close().await;

        let store = SqliteStore::open(&path, options()).unwrap();
        assert_eq!(store.last_seq().await.unwrap(), 5);
        assert_eq!(store.count().await.unwrap(), 2);
        let ann = store.get(created.user.id()).await.unwrap();
        assert_eq!(ann, created.user);
        let bob = store.get("b").await.unwrap();
        assert_eq!((bob.first_name(), bob.version()), ("Bobby", 2));
        assert_eq!(
            store.get("c").await.unwrap_err(),
            StoreError::NotFound("c".into())
        );
        // The next change continues the seq: no gap, no reuse.
        let mut feed = store.subscribe();
        let next = store.upsert(named("b", "Rob"), Some(2)).await.unwrap();
        assert_eq!((next.seq, next.user.version()), (6, 3));
        assert_eq!(feed.try_recv().unwrap(), next);
        // Ids made after the restart still sort after those made before.
        let later = store.create(named("", "Dee")).await.unwrap();
        assert!(later.user.id() > created.user.id());
    }

    #[tokio::test]
    async fn failed_ops_in_a_shared_batch_commit_nothing() {
        let (store, _, _dir) = open_new();
        let mut feed = store.subscribe();
        store.upsert(named("x", "X"), None).await.unwrap();
        // Many concurrent ops, so that they share batches; half must fail.
        let mut tasks = Vec::new();
        for i in 0..200u64 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                match i % 4 {
                    0 => store.upsert(named("x", "stale"), Some(99)).await,
                    1 => store.create(named("x", "dup")).await,
                    2 => store.create(named(&format!("u{i}"), "N")).await,
                    _ => store.upsert(named(&format!("v{i}"), "N"), Some(0)).await,
                }
            }));
        }
        let mut ok = 0;
        for task in tasks {
            if task.await.unwrap().is_ok() {
                ok += 1;
            }
        }
        assert_eq!(ok, 100);
        assert_eq!(store.last_seq().await.unwrap(), 101);
        assert_eq!(store.count().await.unwrap(), 101);
        assert_eq!(store.get("x").await.unwrap().first_name(), "X");
        let seqs: Vec<u64> = (0..101).map(|_| feed.try_recv().unwrap().seq).collect();
        assert_eq!(seqs, (1..=101).collect::<Vec<_>>(), "gapless, in order");
        assert!(feed.try_recv().is_err(), "failed ops are not published");
    }

    #[tokio::test]
    async fn apply_many_applies_each_op_in_order() {
        let (store, _, _dir) = open_new();
        tests::apply_many_applies_each_op_in_order(store).await;
    }

    #[tokio::test]
    async fn a_failed_transaction_commits_and_publishes_nothing() {
        let (store, path, _dir) = open_new();
        store.create(named("a", "Ann")).await.unwrap();
        // A storage failure in the middle of a batch, staged with a trigger.
        let other = rusqlite::Connection::open(&path).unwrap();
        other
            .execute_batch(
                "CREATE TRIGGER fail BEFORE INSERT ON users WHEN NEW.first_name = 'boom'
                 BEGIN SELECT RAISE(ABORT, 'disk on fire'); END;",
            )
            .unwrap();
        let mut feed = store.subscribe();
        let results = store
            .create_many(vec![named("b", "Bob"), named("c", "boom")])
            .await;
        assert!(
            results
                .iter()
                .all(|r| matches!(r, Err(StoreError::Internal(_)))),
            "{results:?}"
        );
        assert!(feed.try_recv().is_err(), "nothing published");
        assert_eq!(store.last_seq().await.unwrap(), 1);
        assert_eq!(
            store.get("b").await.unwrap_err(),
            StoreError::NotFound("b".into()),
            "the op before the failure was rolled back too"
        );
        // The store goes on, with the next seq, and still serves.
        other.execute_batch("DROP TRIGGER fail").unwrap();
        let next = store.create(named("d", "Dee")).await.unwrap();
        assert_eq!(next.seq, 2);
        assert_eq!(feed.try_recv().unwrap(), next);
        assert_eq!(*store.health().borrow(), StoreHealth::Serving);
    }

    #[tokio::test]
    async fn close_commits_what_was_queued_and_leaves_the_file_whole() {
        let (store, path, dir) = open_new();
        let mut health = store.health();
        assert!(wal(&path).exists(), "WAL mode while open");
        // Writes racing the close: each either commits or fails whole.
        let writes: Vec<_> = (0..50)
            .map(|i| {
                let store = store.clone();
                let users = (0..20)
                    .map(|j| named(&format!("u{i:02}-{j:02}"), "N"))
                    .collect();
                tokio::spawn(async move { store.create_many(users).await })
            })
            .collect();
        tokio::task::yield_now().await;
        store.close().await;
        assert!(
            !wal(&path).exists(),
            "close checkpoints and removes the log"
        );
        assert!(!path.with_extension("db-shm").exists());
        assert_eq!(*health.borrow_and_update(), StoreHealth::NotServing);
        let mut committed = 0i64;
        for write in writes {
            for result in write.await.unwrap() {
                match result {
                    Ok(_) => committed += 1,
                    Err(err) => assert!(matches!(err, StoreError::Internal(_)), "{err:?}"),
                }
            }
        }
        // The file alone, copied elsewhere, holds every committed user.
        let copy = dir.path().join("copy.db");
        std::fs::copy(&path, &copy).unwrap();
        let stored: i64 = rusqlite::Connection::open(&copy)
            .unwrap()
            .query_row("SELECT count(*) FROM users", [], |row| row.get(0))
            .unwrap();
        assert_eq!(stored, committed);
        // Closed: every call fails, and a second close returns at once.
        assert!(matches!(
            store.create(named("late", "N")).await,
            Err(StoreError::Internal(_))
        ));
        assert!(matches!(
            store.get("u00-00").await,
            Err(StoreError::Internal(_))
        ));
        store.close().await;
    }
}
