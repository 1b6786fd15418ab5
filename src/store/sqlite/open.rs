//! The file: inspecting it before anything writes, refusing what is not
//! this service's, opening the connections with the store's settings, and
//! creating or migrating the schema.
//!
//! First the file is locked ([`lock`]): one server at a time. Then, before
//! anything writes to an existing file, it is inspected read-only: a
//! file that is not SQLite, is another program's database, is corrupted, or
//! has a newer schema than this build knows is refused with an
//! [`OpenError`] and left as it was. The schema (see `schema`) is recorded
//! in a `schema_version` table, and the SQLite header's application id
//! marks the file as this service's.

use std::{
    fmt,
    fs::{File, TryLockError},
    io::{self, Read},
    path::{Path, PathBuf},
    time::Duration,
};

use rusqlite::{Connection, ErrorCode, OpenFlags};

use super::schema::{SCHEMA_VERSION, migrate};
use crate::store::stored::RowNames;

/// Marks a database file as this service's, in the SQLite header
/// (`PRAGMA application_id`): the bytes "USRV". A database with another id
/// belongs to another program and is never written to.
pub const APPLICATION_ID: i32 = 0x5553_5256;

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
pub const WAL_AUTOCHECKPOINT_PAGES: u32 = (64 << 20) / SQLITE_PAGE_BYTES;

/// The page size of a new database file, in bytes (SQLite's default is
/// 4096). Larger pages mean fewer page splits, fewer pages to look up and
/// fewer WAL frames per row written: bulk imports write about 10% more rows
/// per second than with 4 KiB pages. An existing file keeps the page size it
/// was created with.
pub const SQLITE_PAGE_BYTES: u32 = 16 * 1024;

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
    #[error(
        "{}: the stored users with ids {ids} break the limits every user is held to \
         (docs/storage.md); refusing to migrate the file to schema version {SCHEMA_VERSION} \
         (file left untouched): fix or delete them with the sqlite3 shell, then start again",
        path.display()
    )]
    OutsideLimits { path: PathBuf, ids: RowNames },
    #[error(
        "{}: in use by another user-service (it holds the file's lock); refusing to start \
         a second server on it, whose changes the first one's SyncUsers streams would \
         never see: stop the other server first, or give this one another file", path.display()
    )]
    Locked { path: PathBuf },
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
                | OpenError::OutsideLimits { .. }
        )
    }

    /// Whether another server holds the file (see `lock`): a condition
    /// that ends when that server exits.
    pub fn is_locked(&self) -> bool {
        matches!(self, OpenError::Locked { .. })
    }

    pub(super) fn sqlite(path: &Path, source: rusqlite::Error) -> OpenError {
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

/// The lock that makes a database file one server's: an exclusive
/// `flock(2)` on the file itself, held through an open descriptor for as
/// long as the store has connections to the file.
///
/// One server at a time, because the change feed lives in the server: a
/// second server's commits would take seqs that the first one's SyncUsers
/// streams never see, silently breaking the gapless feed. The lock belongs
/// to the open descriptor, so the kernel drops it when the process ends,
/// however it ends (`kill -9` included): a restart after a crash is never
/// blocked, and there is no stale lock file to clean up.
///
/// The database file itself is locked, not a file beside it, so that every
/// path to it (a symlink, `./users.db` and `/srv/users.db`) meets the same
/// lock. It does not meet SQLite's own locks: those are POSIX record locks
/// (`fcntl`), which on Linux are independent of `flock`, so the `sqlite3`
/// shell still opens the file beside a running server. One rule follows
/// from POSIX locks, though: closing *any* descriptor of a file drops every
/// POSIX lock the process holds on it, SQLite's included. So this
/// descriptor is held until the last SQLite connection of the store has
/// closed (the writer thread drops it after closing its connection, the
/// last one).
#[derive(Debug)]
pub(super) struct FileLock {
    _file: File,
}

/// Takes the file's [`FileLock`], creating the file (empty, as SQLite would)
/// if there is none, or fails at once with [`OpenError::Locked`] if another
/// process holds it.
pub(super) fn lock(path: &Path) -> Result<FileLock, OpenError> {
    let io_err = |source| OpenError::Io {
        path: path.to_owned(),
        source,
    };
    let file = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(io_err)?;
    match file.try_lock() {
        Ok(()) => Ok(FileLock { _file: file }),
        Err(TryLockError::WouldBlock) => Err(OpenError::Locked {
            path: path.to_owned(),
        }),
        Err(TryLockError::Error(err)) => Err(io_err(err)),
    }
}

/// Makes `path` ready for the store: inspects it, opens the write
/// connection, creates or migrates the schema. Returns the connection and
/// the seq of the last change.
pub(super) fn open(path: &Path, durability: Durability) -> Result<(Connection, u64), OpenError> {
    inspect(path)?;
    let mut conn = open_writer(path, durability)?;
    let seq = migrate(&mut conn, path)?;
    Ok((conn, seq))
}

/// The first bytes of every SQLite database file.
const SQLITE_MAGIC: &[u8; 16] = b"SQLite format 3\0";

/// The size of the SQLite file header: a database file is never shorter.
const SQLITE_HEADER_LEN: u64 = 100;

/// What an existing file holds.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Existing {
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
    let conn = open_reader(path).map_err(|err| OpenError::sqlite(path, err))?;
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
pub(super) fn classify(conn: &Connection, path: &Path) -> Result<Existing, OpenError> {
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

/// Opens a write connection to `path` with every setting the store's writer
/// uses: the page size of a new file, WAL, `durability`, the larger page
/// cache, the checkpoint interval. Public so that a benchmark of SQLite
/// alone measures SQLite as the store configures it.
pub fn open_writer(path: &Path, durability: Durability) -> Result<Connection, OpenError> {
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
    conn.execute_batch(&format!("PRAGMA page_size = {SQLITE_PAGE_BYTES};"))
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
    // The schema's CHECK constraints (see `schema`) hold other programs to
    // the API's limits; this connection's rows were validated by the same
    // rules before they were queued. Checked again here, the constraints
    // took more than half a bulk import's time in the writer (an id is
    // matched character by character, twice, per row). Migrations turn
    // them back on.
    conn.execute_batch(&format!(
        "PRAGMA synchronous = {}; PRAGMA cache_size = -{WRITER_CACHE_KIB};
         PRAGMA wal_autocheckpoint = {WAL_AUTOCHECKPOINT_PAGES};
         PRAGMA ignore_check_constraints = ON;",
        durability.pragma()
    ))
    .map_err(sqlite)?;
    Ok(conn)
}

/// Opens a read-only connection: what inspects a file, and what serves
/// reads.
pub(super) fn open_reader(path: &Path) -> rusqlite::Result<Connection> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    Ok(conn)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{
        SqliteStore, Store, StoreExt,
        sqlite::tests::{open_new, options, wal},
        tests::named,
    };

    #[tokio::test]
    async fn a_new_file_gets_the_larger_page_size() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users.db");
        SqliteStore::open(&path, options()).unwrap().close().await;
        let size: u32 = open_reader(&path)
            .unwrap()
            .query_row("PRAGMA page_size", [], |row| row.get(0))
            .unwrap();
        assert_eq!(size, SQLITE_PAGE_BYTES);
    }

    #[tokio::test]
    async fn a_file_is_one_stores_until_it_closes() {
        let (store, path, _dir) = open_new();
        let err = SqliteStore::open(&path, options()).unwrap_err();
        assert!(err.is_locked(), "{err:?}");
        assert!(!err.is_refusal());
        assert!(
            err.to_string().contains("in use by another user-service"),
            "{err}"
        );
        // Through another path to the same file too.
        let other_path = path.parent().unwrap().join(".").join("users.db");
        assert!(
            SqliteStore::open(&other_path, options())
                .unwrap_err()
                .is_locked()
        );
        store.close().await;
        SqliteStore::open(&path, options()).unwrap().close().await;
    }

    #[tokio::test]
    async fn dropping_the_last_handle_gives_the_file_back() {
        let (store, path, _dir) = open_new();
        store.create(named("a", "Ann")).await.unwrap();
        drop(store);
        // The writer thread lets the lock go once it has closed its
        // connection, after the last handle is gone: wait for that.
        let waiting = std::time::Instant::now();
        let reopened = loop {
            match SqliteStore::open(&path, options()) {
                Ok(store) => break store,
                Err(err) if err.is_locked() && waiting.elapsed() < Duration::from_secs(10) => {
                    std::thread::yield_now();
                }
                Err(err) => panic!("{err}"),
            }
        };
        assert_eq!(reopened.count().await.unwrap(), 1);
        reopened.close().await;
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
        SqliteStore::open(&path, options()).unwrap().close().await;
        let conn = Connection::open(&path).unwrap();
        conn.execute(
            "UPDATE schema_version SET version = ?1",
            [SCHEMA_VERSION + 1],
        )
        .unwrap();
        drop(conn);
        assert!(!wal(&path).exists(), "every connection closed");
        assert_refused(
            &path,
            |e| matches!(e, OpenError::NewerSchema { found, .. } if *found == SCHEMA_VERSION + 1),
        );
    }

    #[tokio::test]
    async fn a_corrupted_store_is_refused_untouched() {
        let (store, path, _dir) = open_new();
        let users = (0..2000).map(|i| named(&format!("u{i:05}"), "N")).collect();
        store.create_many(users).await;
        store.close().await;
        // Overwrite pages in the middle of the users tree.
        let mut bytes = std::fs::read(&path).unwrap();
        assert!(bytes.len() > 16 * 4096, "{}", bytes.len());
        bytes[8 * 4096..12 * 4096].fill(0xa5);
        std::fs::write(&path, &bytes).unwrap();
        assert_refused(&path, |e| matches!(e, OpenError::Corrupt { .. }));
    }
}
