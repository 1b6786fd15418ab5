//! The SQLite store: users in one file that survives restarts and crashes.
//!
//! # Writes: one writer thread, group commit
//!
//! One thread owns the only write connection. Callers send it a command over
//! a bounded channel and await a oneshot reply. The thread takes the first
//! command waiting, then every other command that has already arrived (up to
//! [`MAX_BATCH_OPS`] ops), applies them all in one transaction and commits
//! once: writes that arrive together, from every concurrent call, share one
//! commit and one fsync, so throughput does not fall to one fsync per user.
//! When a small batch (under [`SMALL_BATCH_OPS`]) has fewer ops than the
//! previous batch held, the others are usually a moment away, so the writer
//! waits for them a little (at most half the last commit's duration, never
//! more than [`MAX_COMMIT_DELAY`]): with a slow fsync that makes batches
//! larger, a lone sequential writer never waits, and a large batch (a bulk
//! import) has nothing to gain from waiting.
//!
//! Inside the batch each op checks before it writes (the id is free, the
//! expected version matches), so an op that fails writes nothing and uses no
//! seq, while the others go on. The seq of the last change is stored in the
//! same transaction. Only once the commit has returned are the changes
//! published to the feed, in commit order, and the callers answered: a reply
//! means the write is committed (with [`Durability::Full`] fsynced, with
//! [`Durability::Normal`] handed to the OS). If the
//! transaction fails, it is rolled back whole, every op in it is answered
//! with an error (`StoreError::Full` for a full disk, otherwise internal)
//! and nothing is published; later batches are tried as usual, so writes
//! resume once the disk has room. The exception is a COMMIT that fails past
//! writing the log, in its fsync: that leaves the writer refusing every later
//! write, because after a failed fsync the file's state is no longer known to
//! this process, and a restart is what recovers it (SQLite replays or
//! discards the write-ahead log on open).
//!
//! # Reads
//!
//! Reads never go through the writer. A few read-only connections, used on
//! tokio's blocking threads, each run one statement: in WAL mode that is a
//! snapshot of the last commit, taken without waiting for the writer and
//! without blocking it. A listing is a sequence of such pages, each one short
//! query resuming after the previous page's last id.
//!
//! # The file
//!
//! WAL journal. The schema is created and migrated on open, recorded in a
//! `schema_version` table; the SQLite header's application id marks the file
//! as this service's. Before anything writes to an existing file it is
//! inspected read-only: a file that is not SQLite, is another program's
//! database, is corrupted, or has a newer schema than this build knows is
//! refused with an [`OpenError`] and left as it was.

use std::{
    fmt,
    fs::File,
    io::{self, Read},
    path::{Path, PathBuf},
    sync::Arc,
    task::{Context, Poll, Wake, Waker},
    thread,
    time::{Duration, Instant},
};

use parking_lot::Mutex;
use rusqlite::{Connection, ErrorCode, OpenFlags, OptionalExtension, TransactionBehavior, params};
use tokio::sync::{Semaphore, mpsc, oneshot};

use super::{
    ChangeFeed, ListFilter, Page, Store, StoreError, Subscription, WriteOp, check_version,
    prepare_user,
};
use crate::user::{Change, ChangeKind, NewUser, User};

/// Marks a database file as this service's, in the SQLite header
/// (`PRAGMA application_id`): the bytes "USRV". A database with another id
/// belongs to another program and is never written to.
pub const APPLICATION_ID: i32 = 0x5553_5256;

/// The schema version this build writes. An older file is migrated on open;
/// a newer one is refused, since this build cannot know what it means.
pub const SCHEMA_VERSION: i64 = 2;

/// `MIGRATIONS[v]` takes a file from schema version `v` to `v + 1`. Each runs
/// in the transaction that also records the new version.
const MIGRATIONS: &[&str] = &[
    // 0 -> 1: users keyed by id, and the seq of the last change.
    //
    // `WITHOUT ROWID` stores each user in the id-ordered B-tree itself: one
    // tree, listed in id order without a lookup, and server-assigned UUIDv7
    // ids append at its right edge. TEXT's default BINARY collation compares
    // bytes, which is the order the contract promises. STRICT makes SQLite
    // enforce the column types.
    "CREATE TABLE users (
         id TEXT PRIMARY KEY NOT NULL,
         first_name TEXT NOT NULL,
         last_name TEXT NOT NULL,
         address TEXT NOT NULL,
         verified INTEGER NOT NULL,
         version INTEGER NOT NULL
     ) STRICT, WITHOUT ROWID;
     CREATE INDEX users_by_verified ON users (verified, id);
     CREATE TABLE change_seq (seq INTEGER NOT NULL) STRICT;
     INSERT INTO change_seq (seq) VALUES (0);",
    // 1 -> 2: no index on `verified`. It made every insert write a second
    // B-tree, which cost bulk imports about a third of their rate, to serve
    // a filter on a boolean: a listing page now scans the id order and skips
    // non-matching users, at most `MAX_PAGE` rows per page (see `list`).
    "DROP INDEX users_by_verified;",
];

/// Most ops (users created, upserts, deletes) committed in one transaction.
/// Bounds the latency a write waits behind others and the memory a batch
/// holds, while staying large enough that bulk imports commit thousands of
/// rows per fsync.
pub const MAX_BATCH_OPS: usize = 8192;

/// Only a batch of fewer ops than this waits for more: a commit's fixed
/// cost (mostly the fsync) is already shared out thinly in a larger one.
pub const SMALL_BATCH_OPS: usize = 256;

/// The writer waits for more writes at most the last commit's duration
/// divided by this: a commit that takes long (a slow fsync) is worth a short
/// wait that lets it carry more writes; a fast one is not held back.
pub const COMMIT_DELAY_DIVISOR: u32 = 2;

/// And never longer than this, whatever a commit cost, so that a write's
/// latency stays bounded.
pub const MAX_COMMIT_DELAY: Duration = Duration::from_millis(2);

/// Commands waiting for the writer. Callers wait for room (backpressure)
/// rather than queue without bound; 1024 covers every call the server admits
/// on a connection (`MAX_CONCURRENT_STREAMS`) with one op in flight each.
pub const WRITE_QUEUE: usize = 1024;

/// Reads running at once, each on one connection and one blocking thread.
/// A couple of cores serve no more; the bound keeps a burst of GetUser and
/// ListUsers calls from opening connections and threads without limit.
pub const MAX_READERS: usize = 8;

/// Most users one listing page reads, whatever the caller asks: bounds the
/// memory and the time of one query.
pub const MAX_PAGE: usize = 4096;

/// The writer's page cache, in KiB (SQLite's default is 2 MiB). Inserts at
/// random places in the id tree (client-supplied random ids) touch a page
/// per row; a larger cache keeps the tree's upper levels and recently
/// touched leaves in memory.
pub const WRITER_CACHE_KIB: u64 = 64 * 1024;

/// WAL pages after which a commit checkpoints the log into the database file
/// (SQLite's default is 1000 pages, 4 MiB with 4 KiB pages). Each checkpoint
/// copies pages back and fsyncs the database file; with a 64 MiB log, bulk
/// imports checkpoint a sixteenth as often, and a page rewritten by several
/// transactions (random ids) is copied once. The log file grows to about
/// that size (16 MiB for a file created with 4 KiB pages).
pub const WAL_AUTOCHECKPOINT_PAGES: u32 = (64 << 20) / PAGE_SIZE;

/// The page size of a new database file, in bytes (SQLite's default is
/// 4096). Larger pages mean fewer page splits, fewer pages to look up and
/// fewer WAL frames per row written: bulk imports write about 10% more rows
/// per second than with 4 KiB pages. An existing file keeps the page size it
/// was created with.
pub const PAGE_SIZE: u32 = 16 * 1024;

/// How long a connection waits for a lock held by another connection before
/// failing. Readers never wait for the writer in WAL mode; this covers the
/// short exclusive moments (recovery on open, checkpoints) and a second
/// process on the same file.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// When a commit counts as done, set with `--sync`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Durability {
    /// Every commit is fsynced before its writes are acknowledged: an
    /// acknowledged write survives a power cut (`synchronous = FULL`).
    #[default]
    Full,
    /// Commits reach the OS before they are acknowledged but are fsynced only
    /// at checkpoints: an acknowledged write survives a crash of the process,
    /// not of the machine (`synchronous = NORMAL`).
    Normal,
}

impl Durability {
    fn pragma(self) -> &'static str {
        match self {
            Durability::Full => "FULL",
            Durability::Normal => "NORMAL",
        }
    }
}

impl fmt::Display for Durability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Durability::Full => "full (fsync before every acknowledgement; survives power loss)",
            Durability::Normal => {
                "normal (no fsync before acknowledgement; survives a process crash, not power loss)"
            }
        })
    }
}

/// How to open a [`SqliteStore`].
#[derive(Debug, Clone, Copy)]
pub struct SqliteOptions {
    pub durability: Durability,
    /// How far a change-feed subscriber may fall behind before it is cut off
    /// (see [`ChangeFeed`]).
    pub feed_capacity: usize,
}

/// Why a database file could not be opened. Every refusal leaves the file
/// as it was.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("{}: not a SQLite database; refusing to use it (file left untouched)", path.display())]
    NotSqlite { path: PathBuf },
    #[error(
        "{}: a SQLite database that is not a user-service store ({detail}); \
         refusing to use it (file left untouched)", path.display()
    )]
    Foreign { path: PathBuf, detail: String },
    #[error(
        "{}: schema version {found} is newer than this build supports ({supported}); \
         refusing to use it (file left untouched); run a newer user-service", path.display()
    )]
    NewerSchema {
        path: PathBuf,
        found: i64,
        supported: i64,
    },
    #[error("{}: the database is corrupted ({detail}); refusing to use it (file left untouched)", path.display())]
    Corrupt { path: PathBuf, detail: String },
    #[error("{}: cannot switch to WAL mode (journal mode stays {mode})", path.display())]
    NoWal { path: PathBuf, mode: String },
    #[error("{}: {source}", path.display())]
    Sqlite {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
}

impl OpenError {
    /// Whether the file itself was refused (as opposed to an I/O or SQLite
    /// failure while opening it).
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            OpenError::NotSqlite { .. }
                | OpenError::Foreign { .. }
                | OpenError::NewerSchema { .. }
                | OpenError::Corrupt { .. }
        )
    }

    fn sqlite(path: &Path, source: rusqlite::Error) -> OpenError {
        let path = path.to_owned();
        match source.sqlite_error_code() {
            Some(ErrorCode::NotADatabase) => OpenError::NotSqlite { path },
            Some(ErrorCode::DatabaseCorrupt) => OpenError::Corrupt {
                path,
                detail: source.to_string(),
            },
            _ => OpenError::Sqlite { path, source },
        }
    }
}

/// Users in a SQLite file, durable once a write is acknowledged.
///
/// A cheap handle: clones share the writer, the readers and the feed. The
/// writer thread stops when the last handle is dropped.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    // Fields drop in this order: the read connections close before the
    // writer is told to stop, so that the writer's connection is the last
    // to close and checkpoints and removes the write-ahead log (a read-only
    // connection cannot).
    readers: Readers,
    commands: mpsc::Sender<Command>,
    feed: ChangeFeed,
}

impl SqliteStore {
    /// Opens (creating or migrating) the store at `path` and starts its
    /// writer thread. Blocks while it inspects the file: call it at startup.
    pub fn open(path: impl AsRef<Path>, options: SqliteOptions) -> Result<SqliteStore, OpenError> {
        let path = path.as_ref();
        inspect(path)?;
        let mut conn = open_writer(path, options.durability)?;
        let seq = migrate(&mut conn, path)?;
        tracing::info!(
            path = %path.display(),
            schema = SCHEMA_VERSION,
            seq,
            durability = %options.durability,
            "opened SQLite store"
        );

        let feed = ChangeFeed::new(options.feed_capacity);
        let (commands, receiver) = mpsc::channel(WRITE_QUEUE);
        let writer_feed = feed.clone();
        thread::Builder::new()
            .name("sqlite-writer".into())
            .spawn(move || {
                Writer {
                    conn,
                    inbox: Inbox::new(receiver),
                    feed: writer_feed,
                    failed: None,
                }
                .run()
            })
            .map_err(|source| OpenError::Io {
                path: path.to_owned(),
                source,
            })?;
        Ok(SqliteStore {
            shared: Arc::new(Shared {
                readers: Readers::new(path),
                commands,
                feed,
            }),
        })
    }

    /// The seq of the last committed change (0 before the first).
    pub async fn last_seq(&self) -> Result<u64, StoreError> {
        self.shared
            .readers
            .run(|conn| read_seq(conn).map(|seq| seq as u64))
            .await
    }

    /// How many users are stored.
    pub async fn count(&self) -> Result<u64, StoreError> {
        self.shared
            .readers
            .run(|conn| {
                conn.query_row("SELECT count(*) FROM users", [], |row| row.get::<_, i64>(0))
                    .map(|n| n as u64)
            })
            .await
    }

    /// The change feed, e.g. to count subscribers.
    pub fn feed(&self) -> &ChangeFeed {
        &self.shared.feed
    }

    /// Sends one command to the writer and waits for its reply.
    async fn write<T>(
        &self,
        command: Command,
        reply: oneshot::Receiver<T>,
    ) -> Result<T, StoreError> {
        self.shared
            .commands
            .send(command)
            .await
            .map_err(|_| writer_stopped())?;
        reply.await.map_err(|_| write_dropped())
    }
}

/// A write sent after the writer thread stopped (every handle dropped, or a
/// panic).
fn writer_stopped() -> StoreError {
    StoreError::Internal("the SQLite writer has stopped".into())
}

/// A write the writer thread took but never answered.
fn write_dropped() -> StoreError {
    StoreError::Internal("the SQLite writer dropped a write".into())
}

impl Store for SqliteStore {
    async fn create(&self, user: NewUser) -> Result<Change, StoreError> {
        let (reply, receiver) = oneshot::channel();
        let user = prepare_user(&user, 1);
        self.write(Command::CreateOne { user, reply }, receiver)
            .await?
    }

    async fn create_many(&self, users: Vec<NewUser>) -> Vec<Result<Change, StoreError>> {
        let count = users.len();
        // Ids and users are built here, on the caller's thread, to keep the
        // writer's work to the SQL.
        let users = users.iter().map(|user| prepare_user(user, 1)).collect();
        let (reply, receiver) = oneshot::channel();
        match self.write(Command::Create { users, reply }, receiver).await {
            Ok(results) => results,
            Err(err) => vec![Err(err); count],
        }
    }

    async fn upsert(
        &self,
        user: NewUser,
        expected_version: Option<u64>,
    ) -> Result<Change, StoreError> {
        let (reply, receiver) = oneshot::channel();
        let op = WriteOp::Upsert {
            user,
            expected_version,
        };
        self.write(Command::of(op, reply), receiver).await?
    }

    async fn delete(&self, id: &str, expected_version: Option<u64>) -> Result<Change, StoreError> {
        let (reply, receiver) = oneshot::channel();
        let op = WriteOp::Delete {
            id: id.to_owned(),
            expected_version,
        };
        self.write(Command::of(op, reply), receiver).await?
    }

    async fn apply_many(&self, ops: Vec<WriteOp>) -> Vec<Result<Change, StoreError>> {
        // Every op is queued, in order, before the first reply is awaited:
        // ops that arrive together share the writer's next commit.
        let count = ops.len();
        let mut replies = Vec::with_capacity(count);
        for op in ops {
            let (reply, receiver) = oneshot::channel();
            if self
                .shared
                .commands
                .send(Command::of(op, reply))
                .await
                .is_err()
            {
                break;
            }
            replies.push(receiver);
        }
        let mut results = Vec::with_capacity(count);
        for receiver in replies {
            results.push(receiver.await.unwrap_or_else(|_| Err(write_dropped())));
        }
        results.resize_with(count, || Err(writer_stopped()));
        results
    }

    async fn get(&self, id: &str) -> Result<User, StoreError> {
        let key = id.to_owned();
        let user = self
            .shared
            .readers
            .run(move |conn| {
                conn.prepare_cached(
                    "SELECT id, first_name, last_name, address, verified, version
                     FROM users WHERE id = ?1",
                )?
                .query_row([&key], user_from_row)
                .optional()
            })
            .await?;
        user.ok_or_else(|| StoreError::NotFound(id.to_owned()))
    }

    async fn list_page(
        &self,
        filter: ListFilter,
        after: Option<&str>,
        max: usize,
    ) -> Result<Page, StoreError> {
        // Every id is non-empty, so "after the empty string" is the start.
        let after = after.unwrap_or("").to_owned();
        let (users, next_after) = self
            .shared
            .readers
            .run(move |conn| list(conn, filter, &after, max))
            .await?;
        Ok(Page { users, next_after })
    }

    fn subscribe(&self) -> Subscription {
        self.shared.feed.subscribe()
    }
}

/// One listing page: a single statement, so a single WAL snapshot.
///
/// Reads users in id order after `after` and keeps those that match, until
/// it has `max` of them or has looked at [`MAX_PAGE`] rows. A filter that
/// matches few users therefore yields short (even empty) pages rather than
/// one long query. Returns the users and where the next page starts (`None`
/// at the end of the table).
fn list(
    conn: &Connection,
    filter: ListFilter,
    after: &str,
    max: usize,
) -> rusqlite::Result<(Vec<User>, Option<String>)> {
    let max = max.min(MAX_PAGE);
    // Unfiltered, every row read is returned: read no more than asked for.
    let scan = if filter.verified.is_none() {
        max
    } else {
        MAX_PAGE
    };
    let mut statement = conn.prepare_cached(
        "SELECT id, first_name, last_name, address, verified, version
         FROM users WHERE id > ?1 ORDER BY id LIMIT ?2",
    )?;
    let mut rows = statement.query(params![after, scan as i64])?;
    let mut users = Vec::with_capacity(max);
    // The id of the last row read, matching or not; one buffer, reused.
    let mut last_id = String::new();
    let mut scanned = 0;
    while users.len() < max {
        let Some(row) = rows.next()? else {
            return Ok((users, (scanned == scan).then_some(last_id)));
        };
        scanned += 1;
        last_id.clear();
        last_id.push_str(row.get_ref(0)?.as_str()?);
        let verified: bool = row.get(4)?;
        if filter.verified.is_none_or(|v| v == verified) {
            users.push(user_from_row(row)?);
        }
    }
    // Full page; more rows may follow.
    Ok((users, (max > 0).then_some(last_id)))
}

/// Builds a user from `id, first_name, last_name, address, verified, version`.
///
/// The text is read in place and copied once, into the user.
fn user_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<User> {
    let text = |index| row.get_ref(index)?.as_str().map_err(rusqlite::Error::from);
    let version: i64 = row.get(5)?;
    Ok(User::from_fields(
        [text(0)?, text(1)?, text(2)?, text(3)?],
        row.get(4)?,
        version as u64,
    ))
}

fn read_seq(conn: &Connection) -> rusqlite::Result<i64> {
    conn.prepare_cached("SELECT seq FROM change_seq")?
        .query_row([], |row| row.get(0))
}

// ---------------------------------------------------------------------------
// Reads

/// The read-only connections, reused between reads.
struct Readers {
    path: Arc<Path>,
    /// Idle connections. A blocking lock, held only to push or pop one.
    idle: Arc<Mutex<Vec<Connection>>>,
    /// At most [`MAX_READERS`] reads run at once.
    permits: Arc<Semaphore>,
}

impl fmt::Debug for Readers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Readers")
            .field("path", &self.path)
            .field("idle", &self.idle.lock().len())
            .finish()
    }
}

impl Readers {
    fn new(path: &Path) -> Self {
        Readers {
            path: path.into(),
            idle: Arc::new(Mutex::new(Vec::new())),
            permits: Arc::new(Semaphore::new(MAX_READERS)),
        }
    }

    /// Runs `read` on a read connection, on a blocking thread.
    ///
    /// If the caller goes away (a cancelled listing), the read already
    /// started finishes (one short statement) and its result is dropped.
    async fn run<T, F>(&self, read: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| StoreError::Internal("readers closed".into()))?;
        let (path, idle) = (self.path.clone(), self.idle.clone());
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let popped = idle.lock().pop();
            let conn = match popped {
                Some(conn) => conn,
                None => open_reader(&path)?,
            };
            let result = read(&conn);
            idle.lock().push(conn);
            result
        })
        .await
        .map_err(|err| StoreError::Internal(format!("read task failed: {err}")))?
        .map_err(internal)
    }
}

fn open_reader(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    Ok(conn)
}

fn internal(err: rusqlite::Error) -> StoreError {
    StoreError::Internal(format!("SQLite: {err}"))
}

// ---------------------------------------------------------------------------
// Writes

/// A write for the writer thread, with where to send its result.
enum Command {
    /// `create_many`: users built (ids assigned) by the caller.
    Create {
        users: Vec<User>,
        reply: oneshot::Sender<Vec<Result<Change, StoreError>>>,
    },
    /// `create`: the same for one user, without the vectors.
    CreateOne {
        user: User,
        reply: oneshot::Sender<Result<Change, StoreError>>,
    },
    Upsert {
        /// The user to store if the id is free (version 1, id assigned);
        /// at the next version, its replacement when the id is taken.
        created: User,
        expected_version: Option<u64>,
        reply: oneshot::Sender<Result<Change, StoreError>>,
    },
    Delete {
        id: String,
        expected_version: Option<u64>,
        reply: oneshot::Sender<Result<Change, StoreError>>,
    },
}

impl Command {
    /// The command for one upsert or delete, the user built (and its id
    /// assigned) here, on the caller's thread.
    fn of(op: WriteOp, reply: oneshot::Sender<Result<Change, StoreError>>) -> Command {
        match op {
            WriteOp::Upsert {
                user,
                expected_version,
            } => Command::Upsert {
                created: prepare_user(&user, 1),
                expected_version,
                reply,
            },
            WriteOp::Delete {
                id,
                expected_version,
            } => Command::Delete {
                id,
                expected_version,
                reply,
            },
        }
    }

    fn ops(&self) -> usize {
        match self {
            Command::Create { users, .. } => users.len(),
            Command::CreateOne { .. } | Command::Upsert { .. } | Command::Delete { .. } => 1,
        }
    }

    fn reply(self, outcome: Outcome) {
        // A send fails only when the caller has gone away (its call was
        // cancelled); the write stays committed all the same.
        match (self, outcome) {
            (Command::Create { reply, .. }, Outcome::Many(results)) => {
                let _ = reply.send(results);
            }
            (
                Command::CreateOne { reply, .. }
                | Command::Upsert { reply, .. }
                | Command::Delete { reply, .. },
                Outcome::One(result),
            ) => {
                let _ = reply.send(result);
            }
            (command, _) => command.fail(StoreError::Internal("mismatched write outcome".into())),
        }
    }

    fn fail(self, err: StoreError) {
        match self {
            Command::Create { users, reply } => {
                let _ = reply.send(vec![Err(err); users.len()]);
            }
            Command::CreateOne { reply, .. }
            | Command::Upsert { reply, .. }
            | Command::Delete { reply, .. } => {
                let _ = reply.send(Err(err));
            }
        }
    }
}

/// What a command did, before it is sent back.
enum Outcome {
    Many(Vec<Result<Change, StoreError>>),
    One(Result<Change, StoreError>),
}

/// Why a batch did not commit.
enum BatchError {
    /// A statement failed, or COMMIT could not write the log (a full disk,
    /// a failed write): the transaction was rolled back, nothing changed, and
    /// later batches may succeed.
    RolledBack(rusqlite::Error),
    /// COMMIT failed past writing the log (its fsync): what reached the disk
    /// is unknown.
    Commit(rusqlite::Error),
}

/// Whether a failed COMMIT failed while writing the log, before any fsync.
/// SQLite then rolls the transaction back: frames written before the failed
/// one are never marked committed (the log index does not take them in, and
/// recovery stops at the last valid commit frame), so the file is as it was
/// and the next transaction writes over them. A failed fsync is another
/// matter: the kernel may have dropped pages it could not write, and no
/// later fsync would report it.
fn failed_before_sync(err: &rusqlite::Error) -> bool {
    err.sqlite_error().is_some_and(|e| {
        e.code == ErrorCode::DiskFull || e.extended_code == rusqlite::ffi::SQLITE_IOERR_WRITE
    })
}

/// What the callers of a batch that was rolled back get: a full disk is
/// [`StoreError::Full`] (room may come back), anything else internal.
fn rolled_back_error(err: &rusqlite::Error) -> StoreError {
    if err.sqlite_error_code() == Some(ErrorCode::DiskFull) {
        StoreError::Full(format!("SQLite: {err}"))
    } else {
        StoreError::Internal(format!("SQLite write failed: {err}"))
    }
}

/// The writer thread's end of the command channel.
///
/// The writer is a plain thread that parks while it waits, woken by the
/// channel through [`Unpark`]. Its timed waits are a fraction of a commit,
/// often a few hundred microseconds: `park_timeout` keeps them that short,
/// where a tokio timer would round each up to its next millisecond tick.
struct Inbox {
    receiver: mpsc::Receiver<Command>,
    /// Unparks the thread that made the inbox.
    waker: Waker,
}

/// Wakes a parked thread.
struct Unpark(thread::Thread);

impl Wake for Unpark {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.0.unpark();
    }
}

impl Inbox {
    /// Made on the thread that will receive.
    fn new(receiver: mpsc::Receiver<Command>) -> Self {
        Inbox {
            receiver,
            waker: Waker::from(Arc::new(Unpark(thread::current()))),
        }
    }

    /// The next command, waiting as long as it takes; `None` once every
    /// sender has gone.
    fn recv(&mut self) -> Option<Command> {
        self.recv_until(None)
    }

    /// The next command, waiting until `deadline` at most (`None`: no
    /// limit); `None` at the deadline or once every sender has gone.
    fn recv_until(&mut self, deadline: Option<Instant>) -> Option<Command> {
        let mut cx = Context::from_waker(&self.waker);
        loop {
            if let Poll::Ready(command) = self.receiver.poll_recv(&mut cx) {
                return command;
            }
            // A wake-up can come early or be spurious: poll again, and
            // check the deadline, either way.
            match deadline {
                None => thread::park(),
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return None;
                    }
                    thread::park_timeout(left);
                }
            }
        }
    }

    /// A command that has already arrived, without waiting.
    fn try_recv(&mut self) -> Option<Command> {
        self.receiver.try_recv().ok()
    }
}

/// The writer thread's state.
struct Writer {
    conn: Connection,
    inbox: Inbox,
    feed: ChangeFeed,
    /// Set after a COMMIT that failed past writing the log (in its fsync):
    /// every later write is refused with it.
    failed: Option<String>,
}

impl Writer {
    /// Commits batches until every store handle has been dropped.
    fn run(mut self) {
        let mut batch = Vec::new();
        // Ops in the previous batch: how many writers were active a moment
        // ago, and so how many to wait for.
        let mut expected = 0;
        let mut last_commit = Duration::ZERO;
        while let Some(first) = self.inbox.recv() {
            // Group commit: everything that arrived while the previous batch
            // was committing goes into this one.
            let mut ops = first.ops();
            batch.push(first);
            ops += self.take_waiting(&mut batch, ops);
            // When fewer writes are here than the last batch held, the
            // others are most likely on their way (their callers are still
            // handling the last replies): wait a little for them, a fraction
            // of what a commit costs, rather than pay a whole commit for a
            // few. A lone sequential writer (expected 1) never waits, and
            // neither does a large batch.
            let target = expected.min(SMALL_BATCH_OPS);
            if ops < target {
                let delay = (last_commit / COMMIT_DELAY_DIVISOR).min(MAX_COMMIT_DELAY);
                let deadline = Instant::now() + delay;
                while ops < target {
                    let Some(command) = self.inbox.recv_until(Some(deadline)) else {
                        break;
                    };
                    ops += command.ops();
                    batch.push(command);
                    ops += self.take_waiting(&mut batch, ops);
                }
            }
            expected = ops;
            let started = Instant::now();
            self.commit(&mut batch);
            last_commit = started.elapsed();
        }
        tracing::debug!("SQLite writer stopped");
    }

    /// Moves the commands already waiting into `batch`, up to
    /// [`MAX_BATCH_OPS`] ops in all; returns how many ops it added.
    fn take_waiting(&mut self, batch: &mut Vec<Command>, mut ops: usize) -> usize {
        let before = ops;
        while ops < MAX_BATCH_OPS {
            match self.inbox.try_recv() {
                Some(command) => {
                    ops += command.ops();
                    batch.push(command);
                }
                None => break,
            }
        }
        ops - before
    }

    /// Applies and commits `batch`, publishes its changes, then answers each
    /// command. Leaves `batch` empty.
    fn commit(&mut self, batch: &mut Vec<Command>) {
        if let Some(reason) = &self.failed {
            for command in batch.drain(..) {
                command.fail(StoreError::Internal(reason.clone()));
            }
            return;
        }
        match apply(&self.conn, batch) {
            Ok(outcomes) => {
                // Committed: now, and only now, the feed and the callers.
                for outcome in &outcomes {
                    let changes: &[Result<Change, StoreError>] = match outcome {
                        Outcome::Many(results) => results,
                        Outcome::One(result) => std::slice::from_ref(result),
                    };
                    for change in changes.iter().flatten() {
                        self.feed.publish(change.clone());
                    }
                }
                for (command, outcome) in batch.drain(..).zip(outcomes) {
                    command.reply(outcome);
                }
            }
            Err(BatchError::RolledBack(err)) => {
                tracing::error!(error = %err, "SQLite write failed; batch rolled back");
                let error = rolled_back_error(&err);
                for command in batch.drain(..) {
                    command.fail(error.clone());
                }
            }
            Err(BatchError::Commit(err)) => {
                tracing::error!(
                    error = %err,
                    "SQLite commit failed; refusing further writes until restart"
                );
                let reason = format!("SQLite commit failed ({err}); restart the server");
                self.failed = Some(reason.clone());
                for command in batch.drain(..) {
                    command.fail(StoreError::Internal(reason.clone()));
                }
            }
        }
    }
}

/// Statements of one batch, prepared (from the connection's cache) once.
struct Statements<'t> {
    insert_new: rusqlite::CachedStatement<'t>,
    insert: rusqlite::CachedStatement<'t>,
    update: rusqlite::CachedStatement<'t>,
    version_of: rusqlite::CachedStatement<'t>,
    user_of: rusqlite::CachedStatement<'t>,
    delete: rusqlite::CachedStatement<'t>,
}

impl<'t> Statements<'t> {
    fn prepare(conn: &'t Connection) -> rusqlite::Result<Self> {
        Ok(Statements {
            // Writes nothing when the id is taken: the pre-check and the
            // write in one step.
            insert_new: conn.prepare_cached(
                "INSERT INTO users (id, first_name, last_name, address, verified, version)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6) ON CONFLICT (id) DO NOTHING",
            )?,
            insert: conn.prepare_cached(
                "INSERT INTO users (id, first_name, last_name, address, verified, version)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?,
            update: conn.prepare_cached(
                "UPDATE users SET first_name = ?2, last_name = ?3, address = ?4,
                 verified = ?5, version = ?6 WHERE id = ?1",
            )?,
            version_of: conn.prepare_cached("SELECT version FROM users WHERE id = ?1")?,
            user_of: conn.prepare_cached(
                "SELECT id, first_name, last_name, address, verified, version
                 FROM users WHERE id = ?1",
            )?,
            delete: conn.prepare_cached("DELETE FROM users WHERE id = ?1")?,
        })
    }
}

/// Runs an insert or update statement for `user` (`?1` id ... `?6` version).
fn write_user(
    statement: &mut rusqlite::CachedStatement<'_>,
    user: &User,
) -> rusqlite::Result<usize> {
    // A version is far below i64::MAX: one per update.
    statement.execute(params![
        user.id(),
        user.first_name(),
        user.last_name(),
        user.address(),
        user.verified(),
        user.version() as i64,
    ])
}

/// Inserts `user` unless its id is taken.
fn insert_new(
    st: &mut Statements<'_>,
    next: &mut impl FnMut(ChangeKind, User) -> Change,
    user: &User,
) -> rusqlite::Result<Result<Change, StoreError>> {
    Ok(if write_user(&mut st.insert_new, user)? == 0 {
        Err(StoreError::AlreadyExists(user.id().to_owned()))
    } else {
        Ok(next(ChangeKind::Created, user.clone()))
    })
}

/// Runs every command of `batch` in one transaction and commits it.
///
/// BEGIN and COMMIT run as cached statements: parsing them anew for every
/// batch, as `Connection::transaction` does, took about 6% of the writer's
/// time under 64 concurrent AddUser calls.
fn apply(conn: &Connection, batch: &[Command]) -> Result<Vec<Outcome>, BatchError> {
    run_cached(conn, "BEGIN IMMEDIATE").map_err(BatchError::RolledBack)?;
    let outcomes = match apply_in(conn, batch) {
        Ok(outcomes) => outcomes,
        Err(err) => {
            roll_back(conn);
            return Err(BatchError::RolledBack(err));
        }
    };
    if let Err(err) = run_cached(conn, "COMMIT") {
        roll_back(conn);
        return Err(if failed_before_sync(&err) {
            BatchError::RolledBack(err)
        } else {
            BatchError::Commit(err)
        });
    }
    Ok(outcomes)
}

/// Runs a statement that returns no rows, prepared once per connection.
fn run_cached(conn: &Connection, sql: &str) -> rusqlite::Result<()> {
    conn.prepare_cached(sql)?.execute([]).map(drop)
}

/// Ends a failed transaction, unless SQLite already has.
fn roll_back(conn: &Connection) {
    if !conn.is_autocommit()
        && let Err(err) = conn.execute_batch("ROLLBACK")
    {
        tracing::error!(error = %err, "SQLite rollback failed");
    }
}

/// The body of [`apply`]'s transaction.
fn apply_in(conn: &Connection, batch: &[Command]) -> rusqlite::Result<Vec<Outcome>> {
    // Read inside the write transaction, not cached in memory: the stored
    // seq is the truth even if another process wrote to the file.
    let first_seq = read_seq(conn)? as u64;
    let mut seq = first_seq;
    let mut outcomes = Vec::with_capacity(batch.len());
    {
        let mut st = Statements::prepare(conn)?;
        let mut next = |kind, user: User| {
            seq += 1;
            Change { seq, kind, user }
        };
        for command in batch {
            let outcome = match command {
                Command::Create { users, .. } => Outcome::Many(
                    users
                        .iter()
                        .map(|user| insert_new(&mut st, &mut next, user))
                        .collect::<rusqlite::Result<_>>()?,
                ),
                Command::CreateOne { user, .. } => {
                    Outcome::One(insert_new(&mut st, &mut next, user)?)
                }
                Command::Upsert {
                    created,
                    expected_version,
                    ..
                } => {
                    let stored: Option<i64> = st
                        .version_of
                        .query_row([created.id()], |row| row.get(0))
                        .optional()?;
                    let stored = stored.map(|v| v as u64);
                    Outcome::One(
                        match check_version(*expected_version, stored.unwrap_or(0)) {
                            Err(err) => Err(err),
                            Ok(()) => match stored {
                                None => {
                                    write_user(&mut st.insert, created)?;
                                    Ok(next(ChangeKind::Created, created.clone()))
                                }
                                Some(version) => {
                                    // A copy: the command keeps `created`
                                    // until its reply.
                                    let updated = created.clone().with_version(version + 1);
                                    write_user(&mut st.update, &updated)?;
                                    Ok(next(ChangeKind::Updated, updated))
                                }
                            },
                        },
                    )
                }
                Command::Delete {
                    id,
                    expected_version,
                    ..
                } => {
                    let stored = st.user_of.query_row([id], user_from_row).optional()?;
                    Outcome::One(match stored {
                        None => Err(StoreError::NotFound(id.clone())),
                        Some(user) => match check_version(*expected_version, user.version()) {
                            Err(err) => Err(err),
                            Ok(()) => {
                                st.delete.execute([id])?;
                                Ok(next(ChangeKind::Deleted, user))
                            }
                        },
                    })
                }
            };
            outcomes.push(outcome);
        }
    }
    if seq != first_seq {
        conn.prepare_cached("UPDATE change_seq SET seq = ?1")?
            .execute([seq as i64])?;
    }
    Ok(outcomes)
}

// ---------------------------------------------------------------------------
// Opening the file

/// The first bytes of every SQLite database file.
const SQLITE_MAGIC: &[u8; 16] = b"SQLite format 3\0";

/// The size of the SQLite file header: a database file is never shorter.
const SQLITE_HEADER_LEN: u64 = 100;

/// What an existing file holds.
#[derive(Debug, PartialEq, Eq)]
enum Existing {
    /// No file, an empty one, or a database with nothing in it.
    New,
    /// This service's store at a schema version this build can open.
    Ours { version: i64 },
}

/// Looks at the file without writing to it, and refuses what is not ours.
fn inspect(path: &Path) -> Result<Existing, OpenError> {
    let io_err = |source| OpenError::Io {
        path: path.to_owned(),
        source,
    };
    let len = match std::fs::metadata(path) {
        Ok(meta) => meta.len(),
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Existing::New),
        Err(err) => return Err(io_err(err)),
    };
    // An empty file may still have a write-ahead log beside it (a crash
    // right after creation): let SQLite look.
    if len > 0 {
        let mut magic = [0u8; 16];
        let read = File::open(path).and_then(|mut file| file.read_exact(&mut magic));
        if len < SQLITE_HEADER_LEN
            || matches!(&read, Err(err) if err.kind() == io::ErrorKind::UnexpectedEof)
            || &magic != SQLITE_MAGIC
        {
            return Err(OpenError::NotSqlite {
                path: path.to_owned(),
            });
        }
        read.map_err(io_err)?;
    }
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|err| OpenError::sqlite(path, err))?;
    conn.busy_timeout(BUSY_TIMEOUT)
        .map_err(|err| OpenError::sqlite(path, err))?;
    let existing = classify(&conn, path)?;
    if existing != Existing::New {
        // Reads every page of the tables and indexes; a damaged file is
        // refused here rather than failing requests later.
        let problems: Vec<String> = conn
            .prepare("PRAGMA quick_check(5)")
            .and_then(|mut st| {
                st.query_map([], |row| row.get::<_, String>(0))?
                    .collect::<rusqlite::Result<_>>()
            })
            .map_err(|err| OpenError::sqlite(path, err))?;
        if problems != ["ok"] {
            return Err(OpenError::Corrupt {
                path: path.to_owned(),
                detail: problems.join("; "),
            });
        }
    }
    Ok(existing)
}

/// Decides what a database holds, from its application id and schema.
fn classify(conn: &Connection, path: &Path) -> Result<Existing, OpenError> {
    let sqlite = |err| OpenError::sqlite(path, err);
    let application_id: i32 = conn
        .query_row("PRAGMA application_id", [], |row| row.get(0))
        .map_err(sqlite)?;
    let objects: i64 = conn
        .query_row("SELECT count(*) FROM sqlite_schema", [], |row| row.get(0))
        .map_err(sqlite)?;
    match application_id {
        0 if objects == 0 => Ok(Existing::New),
        0 => Err(OpenError::Foreign {
            path: path.to_owned(),
            detail: format!("{objects} schema objects and no user-service application id"),
        }),
        APPLICATION_ID => {
            let version: i64 = conn
                .query_row("SELECT version FROM schema_version", [], |row| row.get(0))
                .map_err(|err| OpenError::Corrupt {
                    path: path.to_owned(),
                    detail: format!("no schema version: {err}"),
                })?;
            if version > SCHEMA_VERSION {
                return Err(OpenError::NewerSchema {
                    path: path.to_owned(),
                    found: version,
                    supported: SCHEMA_VERSION,
                });
            }
            Ok(Existing::Ours { version })
        }
        other => Err(OpenError::Foreign {
            path: path.to_owned(),
            detail: format!("application id {other:#010x}"),
        }),
    }
}

/// Opens the write connection: WAL, the chosen durability, a larger cache.
fn open_writer(path: &Path, durability: Durability) -> Result<Connection, OpenError> {
    let sqlite = |err| OpenError::sqlite(path, err);
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(sqlite)?;
    conn.busy_timeout(BUSY_TIMEOUT).map_err(sqlite)?;
    // Takes effect only on a new, empty file, and must come before WAL mode
    // is set (which writes the file's first page).
    conn.execute_batch(&format!("PRAGMA page_size = {PAGE_SIZE};"))
        .map_err(sqlite)?;
    let mode: String = conn
        .query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))
        .map_err(sqlite)?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(OpenError::NoWal {
            path: path.to_owned(),
            mode,
        });
    }
    conn.execute_batch(&format!(
        "PRAGMA synchronous = {}; PRAGMA cache_size = -{WRITER_CACHE_KIB};
         PRAGMA wal_autocheckpoint = {WAL_AUTOCHECKPOINT_PAGES};",
        durability.pragma()
    ))
    .map_err(sqlite)?;
    Ok(conn)
}

/// Creates or migrates the schema in one transaction; returns the last seq.
fn migrate(conn: &mut Connection, path: &Path) -> Result<u64, OpenError> {
    let sqlite = |err| OpenError::sqlite(path, err);
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(sqlite)?;
    // Again, under the write lock: the file may have changed since it was
    // inspected.
    let from = match classify(&tx, path)? {
        Existing::New => {
            tx.execute_batch(&format!(
                "PRAGMA application_id = {APPLICATION_ID};
                 CREATE TABLE schema_version (version INTEGER NOT NULL) STRICT;
                 INSERT INTO schema_version (version) VALUES (0);"
            ))
            .map_err(sqlite)?;
            0
        }
        Existing::Ours { version } => version,
    };
    for (version, sql) in MIGRATIONS.iter().enumerate().skip(from as usize) {
        tracing::info!(
            path = %path.display(),
            from = version,
            to = version + 1,
            "migrating schema"
        );
        tx.execute_batch(sql).map_err(sqlite)?;
    }
    if from < SCHEMA_VERSION {
        tx.execute("UPDATE schema_version SET version = ?1", [SCHEMA_VERSION])
            .map_err(sqlite)?;
    }
    let seq = read_seq(&tx).map_err(sqlite)?;
    tx.commit().map_err(sqlite)?;
    Ok(seq as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options() -> SqliteOptions {
        SqliteOptions {
            durability: Durability::Full,
            feed_capacity: 1024,
        }
    }

    fn named(id: &str, first_name: &str) -> NewUser {
        NewUser {
            id: id.into(),
            first_name: first_name.into(),
            ..NewUser::default()
        }
    }

    /// A command for the inbox tests, and the receiver of its reply.
    fn delete_command() -> (Command, oneshot::Receiver<Result<Change, StoreError>>) {
        let (reply, replied) = oneshot::channel();
        let command = Command::Delete {
            id: "x".into(),
            expected_version: None,
            reply,
        };
        (command, replied)
    }

    /// A full disk, staged with SQLite's own page limit (which fails the same
    /// way, with SQLITE_FULL): the batch is answered with `Full` and rolled
    /// back, and the writer goes on once there is room.
    #[test]
    fn a_full_database_fails_the_batch_and_the_writer_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users.db");
        let mut conn = open_writer(&path, Durability::Full).unwrap();
        migrate(&mut conn, &path).unwrap();
        let pages: i64 = conn
            .query_row("PRAGMA page_count", [], |row| row.get(0))
            .unwrap();
        conn.execute_batch(&format!("PRAGMA max_page_count = {pages}"))
            .unwrap();
        let (_commands, receiver) = mpsc::channel(1);
        let feed = ChangeFeed::new(1024);
        let mut published = feed.subscribe();
        let mut writer = Writer {
            conn,
            inbox: Inbox::new(receiver),
            feed,
            failed: None,
        };
        // One batch of users far larger than the pages left.
        let create = |count: usize| {
            let users = (0..count)
                .map(|i| prepare_user(&named(&format!("u{i:05}"), &"x".repeat(200)), 1))
                .collect();
            let (reply, receiver) = oneshot::channel();
            (Command::Create { users, reply }, receiver)
        };
        let (command, mut receiver) = create(1000);
        writer.commit(&mut vec![command]);
        let results = receiver.try_recv().unwrap();
        assert_eq!(results.len(), 1000);
        assert!(
            results
                .iter()
                .all(|r| matches!(r, Err(StoreError::Full(_)))),
            "{:?}",
            results[0]
        );
        assert!(writer.failed.is_none(), "the writer still takes writes");
        assert!(published.try_recv().is_err(), "nothing published");

        // Room again: the next batch commits, with the first seq.
        writer
            .conn
            .execute_batch("PRAGMA max_page_count = 1073741823")
            .unwrap();
        let (command, mut receiver) = create(1000);
        writer.commit(&mut vec![command]);
        let results = receiver.try_recv().unwrap();
        assert_eq!(results[0].as_ref().unwrap().seq, 1);
        assert!(results.iter().all(Result::is_ok));
        assert_eq!(published.try_recv().unwrap().seq, 1);
    }

    #[test]
    fn only_a_failed_log_write_counts_as_rolled_back() {
        let error = |code| rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(code), None);
        let full = error(rusqlite::ffi::SQLITE_FULL);
        assert!(failed_before_sync(&full));
        assert!(matches!(rolled_back_error(&full), StoreError::Full(_)));
        let write = error(rusqlite::ffi::SQLITE_IOERR_WRITE);
        assert!(failed_before_sync(&write));
        assert!(matches!(rolled_back_error(&write), StoreError::Internal(_)));
        // After a failed fsync the file's state is unknown.
        assert!(!failed_before_sync(&error(
            rusqlite::ffi::SQLITE_IOERR_FSYNC
        )));
        assert!(!failed_before_sync(&error(rusqlite::ffi::SQLITE_IOERR)));
    }

    #[test]
    fn the_inbox_wakes_for_a_command_sent_from_another_thread() {
        let (sender, receiver) = mpsc::channel(4);
        let mut inbox = Inbox::new(receiver);
        let sending = thread::spawn(move || {
            // Long enough that the inbox is most likely parked by then; the
            // command arrives whenever it is sent, either way.
            thread::sleep(Duration::from_millis(50));
            let (command, _replied) = delete_command();
            sender.blocking_send(command).unwrap();
        });
        let received = inbox.recv_until(Some(Instant::now() + Duration::from_secs(30)));
        assert!(matches!(received, Some(Command::Delete { .. })));
        sending.join().unwrap();
        // Every sender gone: the inbox says so instead of waiting.
        assert!(inbox.recv().is_none());
    }

    #[test]
    fn a_timed_wait_ends_at_its_deadline_not_before() {
        let (sender, receiver) = mpsc::channel(4);
        let mut inbox = Inbox::new(receiver);
        let wait = Duration::from_micros(300);
        let started = Instant::now();
        assert!(inbox.recv_until(Some(started + wait)).is_none());
        assert!(started.elapsed() >= wait);
        assert!(inbox.try_recv().is_none());
        // A command already there is taken without waiting at all.
        sender.try_send(delete_command().0).unwrap();
        assert!(inbox.recv_until(Some(Instant::now())).is_some());
    }

    /// Waits (bounded) until every connection to `path` has closed: the last
    /// one to close checkpoints the log and deletes it.
    fn wait_closed(path: &Path) {
        let wal = path.with_extension("db-wal");
        let deadline = Instant::now() + Duration::from_secs(10);
        while wal.exists() {
            assert!(Instant::now() < deadline, "the store did not close");
            thread::sleep(Duration::from_millis(5));
        }
    }

    #[tokio::test]
    async fn restart_keeps_users_versions_and_seq() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users.db");
        let store = SqliteStore::open(&path, options()).unwrap();
        let created = store.create(named("", "Ann")).await.unwrap();
        store.upsert(named("b", "Bob"), None).await.unwrap();
        store.upsert(named("b", "Bobby"), Some(1)).await.unwrap();
        store.upsert(named("c", "Cy"), None).await.unwrap();
        store.delete("c", None).await.unwrap();
        assert_eq!(store.last_seq().await.unwrap(), 5);
        drop(store);
        wait_closed(&path);

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
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path().join("users.db"), options()).unwrap();
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
    async fn listing_pages_follow_id_order_and_the_filter() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users.db");
        let store = SqliteStore::open(&path, options()).unwrap();
        let users = (0..10)
            .map(|i| NewUser {
                verified: i % 2 == 0,
                ..named(&format!("u{i}"), "N")
            })
            .collect();
        store.create_many(users).await;
        let page = store
            .list_page(ListFilter::default(), None, 4)
            .await
            .unwrap();
        let ids: Vec<&str> = page.users.iter().map(|u| u.id()).collect();
        assert_eq!(ids, ["u0", "u1", "u2", "u3"]);
        assert_eq!(page.next_after.as_deref(), Some("u3"));
        let verified = ListFilter {
            verified: Some(true),
        };
        let page = store.list_page(verified, Some("u3"), 100).await.unwrap();
        let ids: Vec<&str> = page.users.iter().map(|u| u.id()).collect();
        assert_eq!(ids, ["u4", "u6", "u8"]);
        assert_eq!(page.next_after, None);
        let page = store.list_page(verified, Some("u3"), 2).await.unwrap();
        let ids: Vec<&str> = page.users.iter().map(|u| u.id()).collect();
        assert_eq!(ids, ["u4", "u6"]);
        assert_eq!(page.next_after.as_deref(), Some("u6"));
    }

    #[test]
    fn a_new_file_gets_the_larger_page_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users.db");
        drop(SqliteStore::open(&path, options()).unwrap());
        let size: u32 = open_reader(&path)
            .unwrap()
            .query_row("PRAGMA page_size", [], |row| row.get(0))
            .unwrap();
        assert_eq!(size, PAGE_SIZE);
    }

    #[tokio::test]
    async fn a_filter_that_matches_few_users_reads_bounded_pages() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path().join("users.db"), options()).unwrap();
        // One verified user, after more unverified ones than a page reads.
        let mut users: Vec<NewUser> = (0..MAX_PAGE + 10)
            .map(|i| named(&format!("u{i:06}"), "N"))
            .collect();
        users.push(NewUser {
            verified: true,
            ..named("v", "V")
        });
        store.create_many(users).await;
        let verified = ListFilter {
            verified: Some(true),
        };
        let first = store.list_page(verified, None, 100).await.unwrap();
        assert!(first.users.is_empty());
        let resume = format!("u{:06}", MAX_PAGE - 1);
        assert_eq!(first.next_after.as_deref(), Some(resume.as_str()));
        let second = store.list_page(verified, Some(&resume), 100).await.unwrap();
        let ids: Vec<&str> = second.users.iter().map(|u| u.id()).collect();
        assert_eq!(ids, ["v"]);
        assert_eq!(second.next_after, None);
    }

    #[tokio::test]
    async fn a_version_1_file_is_migrated_keeping_its_users() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users.db");
        {
            // A file as the version 1 schema left it, with one user.
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(&format!(
                "PRAGMA application_id = {APPLICATION_ID};
                 CREATE TABLE schema_version (version INTEGER NOT NULL) STRICT;
                 INSERT INTO schema_version (version) VALUES (1);
                 {}
                 INSERT INTO users VALUES ('a', 'Ann', '', '', 1, 3);
                 UPDATE change_seq SET seq = 5;",
                MIGRATIONS[0]
            ))
            .unwrap();
        }
        let store = SqliteStore::open(&path, options()).unwrap();
        assert_eq!(store.get("a").await.unwrap().version(), 3);
        assert_eq!(store.last_seq().await.unwrap(), 5);
        drop(store);
        let conn = open_reader(&path).unwrap();
        let version: i64 = conn
            .query_row("SELECT version FROM schema_version", [], |row| row.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
        let indexes: i64 = conn
            .query_row(
                "SELECT count(*) FROM sqlite_schema WHERE name = 'users_by_verified'",
                [],
                |row| row.get(0),
            )
            .unwrap();
        assert_eq!(indexes, 0);
    }

    #[tokio::test]
    async fn a_failed_transaction_commits_and_publishes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users.db");
        let store = SqliteStore::open(&path, options()).unwrap();
        store.create(named("a", "Ann")).await.unwrap();
        // A storage failure in the middle of a batch, staged with a trigger.
        let other = Connection::open(&path).unwrap();
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
        // The store goes on, with the next seq.
        other.execute_batch("DROP TRIGGER fail").unwrap();
        let next = store.create(named("d", "Dee")).await.unwrap();
        assert_eq!(next.seq, 2);
        assert_eq!(feed.try_recv().unwrap(), next);
    }

    #[tokio::test]
    async fn reads_do_not_wait_for_a_blocked_writer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users.db");
        let store = SqliteStore::open(&path, options()).unwrap();
        store.create(named("a", "Ann")).await.unwrap();
        // Another connection takes the write lock: the writer's next
        // transaction waits for it.
        let blocker = Connection::open(&path).unwrap();
        blocker.execute_batch("BEGIN IMMEDIATE").unwrap();
        let write = tokio::spawn({
            let store = store.clone();
            async move { store.create(named("b", "Bob")).await }
        });
        let reads = async {
            let ann = store.get("a").await.unwrap();
            let page = store
                .list_page(ListFilter::default(), None, 10)
                .await
                .unwrap();
            (ann, page)
        };
        let (ann, page) = tokio::time::timeout(BUSY_TIMEOUT / 2, reads)
            .await
            .expect("reads finish while the writer waits");
        assert_eq!(ann.first_name(), "Ann");
        assert_eq!(page.users.len(), 1, "the pending write is not visible");
        assert!(!write.is_finished());
        blocker.execute_batch("ROLLBACK").unwrap();
        let change = write.await.unwrap().unwrap();
        assert_eq!(change.seq, 2);
    }

    fn assert_refused(path: &Path, expect: fn(&OpenError) -> bool) {
        let before = std::fs::read(path).unwrap();
        let err = SqliteStore::open(path, options()).unwrap_err();
        assert!(expect(&err), "{err:?}");
        assert!(err.is_refusal());
        assert!(err.to_string().contains("left untouched"), "{err}");
        assert_eq!(std::fs::read(path).unwrap(), before, "file changed");
    }

    #[test]
    fn a_file_that_is_not_sqlite_is_refused_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users.db");
        std::fs::write(&path, "name,address\n".repeat(500)).unwrap();
        assert_refused(&path, |e| matches!(e, OpenError::NotSqlite { .. }));
        std::fs::write(&path, b"SQLite format 3\0 but short").unwrap();
        assert_refused(&path, |e| matches!(e, OpenError::NotSqlite { .. }));
    }

    #[test]
    fn another_programs_database_is_refused_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users.db");
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch("CREATE TABLE notes (body TEXT); INSERT INTO notes VALUES ('hi');")
            .unwrap();
        drop(conn);
        assert_refused(&path, |e| matches!(e, OpenError::Foreign { .. }));
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch("PRAGMA application_id = 42;").unwrap();
        drop(conn);
        assert_refused(&path, |e| matches!(e, OpenError::Foreign { .. }));
    }

    #[tokio::test]
    async fn a_newer_schema_is_refused_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users.db");
        drop(SqliteStore::open(&path, options()).unwrap());
        wait_closed(&path);
        let conn = Connection::open(&path).unwrap();
        conn.execute(
            "UPDATE schema_version SET version = ?1",
            [SCHEMA_VERSION + 1],
        )
        .unwrap();
        drop(conn);
        wait_closed(&path);
        assert_refused(
            &path,
            |e| matches!(e, OpenError::NewerSchema { found, .. } if *found == SCHEMA_VERSION + 1),
        );
    }

    #[tokio::test]
    async fn a_corrupted_store_is_refused_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users.db");
        let store = SqliteStore::open(&path, options()).unwrap();
        let users = (0..2000).map(|i| named(&format!("u{i:05}"), "N")).collect();
        store.create_many(users).await;
        drop(store);
        wait_closed(&path);
        // Overwrite pages in the middle of the users tree.
        let mut bytes = std::fs::read(&path).unwrap();
        assert!(bytes.len() > 16 * 4096, "{}", bytes.len());
        bytes[8 * 4096..12 * 4096].fill(0xa5);
        std::fs::write(&path, &bytes).unwrap();
        assert_refused(&path, |e| matches!(e, OpenError::Corrupt { .. }));
    }
}
