//! The schema: created and migrated in one transaction when the store
//! opens, its version recorded in `schema_version`.
//!
//! Since version 3 the `users` table holds every row to the limits the API
//! holds a new user to (`validate`), with CHECK constraints, so that a row
//! written with the sqlite3 shell that breaks them is refused by SQLite
//! itself. A file migrated from an older version keeps every user: one that
//! breaks the limits makes the migration refuse the file, naming it, for an
//! operator to fix or delete, rather than be dropped or changed. (SQLite
//! cannot add a constraint to a table that has rows: the migration copies
//! them into a new table, and `PRAGMA quick_check`, which every open runs,
//! would refuse a file whose rows broke its constraints anyway.)
//!
//! The store's own writer skips the constraints: every row it writes was
//! validated by the same rules before it was queued, and checking again
//! cost more than half of a bulk import's time (see `open_writer`).

use std::path::Path;

use rusqlite::{Connection, TransactionBehavior};

use super::open::{APPLICATION_ID, Existing, OpenError, classify};
use crate::store::stored::{MAX_NAMED_ROWS, RowNames};

/// The schema version this build writes. An older file is migrated on open;
/// a newer one is refused, since this build cannot know what it means.
pub const SCHEMA_VERSION: i64 = 3;

/// One step of the schema, from the version before it.
pub(super) struct Migration {
    /// Runs first.
    pub sql: &'static str,
    /// Then, in the same transaction: what may refuse the file instead.
    pub then: Option<Check>,
}

/// A check of the file a migration runs after its SQL.
type Check = fn(&Connection, &Path) -> Result<(), OpenError>;

/// `MIGRATIONS[v]` takes a file from schema version `v` to `v + 1`. Each runs
/// in the transaction that also records the new version.
pub(super) const MIGRATIONS: &[Migration] = &[
    // 0 -> 1: users keyed by id, and the seq of the last change.
    //
    // `WITHOUT ROWID` stores each user in the id-ordered B-tree itself: one
    // tree, listed in id order without a lookup, and server-assigned UUIDv7
    // ids append at its right edge. TEXT's default BINARY collation compares
    // bytes, which is the order the contract promises. STRICT makes SQLite
    // enforce the column types.
    Migration {
        sql: "CREATE TABLE users (
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
        then: None,
    },
    // 1 -> 2: no index on `verified`. It made every insert write a second
    // B-tree, which cost bulk imports about a third of their rate, to serve
    // a filter on a boolean: a listing page now scans the id order and skips
    // non-matching users, at most `MAX_SCAN_PER_PAGE` rows per page (see
    // `store::page`).
    Migration {
        sql: "DROP INDEX users_by_verified;",
        then: None,
    },
    // 2 -> 3: the API's limits as constraints: an id of 1 to 64 characters
    // of [A-Za-z0-9_-]; a first name that is not blank (the characters
    // trimmed are those Rust's `str::trim` trims, as `validate` does); each
    // text field at most 256 bytes (SQLite's `length` counts characters,
    // its BLOB's length bytes); `verified` 0 or 1; versions from 1; seqs
    // from 0. Only functions the sqlite3 shell has had for years, so that
    // any shell that can open the file (3.37 or later, for STRICT) can
    // write to it.
    //
    // The users are copied into the new table with `OR IGNORE`, which
    // skips a row that breaks a constraint; `keep_every_user` then refuses
    // the file if the copy left any behind.
    Migration {
        sql: "ALTER TABLE users RENAME TO users_v2;
              CREATE TABLE users (
                  id TEXT PRIMARY KEY NOT NULL CONSTRAINT id_rules
                      CHECK (length(id) BETWEEN 1 AND 64 AND id NOT GLOB '*[^A-Za-z0-9_-]*'),
                  first_name TEXT NOT NULL CONSTRAINT first_name_rules
                      CHECK (length(CAST(first_name AS BLOB)) <= 256
                             AND trim(first_name, char(9, 10, 11, 12, 13, 32, 133, 160, 5760,
                                 8192, 8193, 8194, 8195, 8196, 8197, 8198, 8199, 8200, 8201,
                                 8202, 8232, 8233, 8239, 8287, 12288)) <> ''),
                  last_name TEXT NOT NULL CONSTRAINT last_name_rules
                      CHECK (length(CAST(last_name AS BLOB)) <= 256),
                  address TEXT NOT NULL CONSTRAINT address_rules
                      CHECK (length(CAST(address AS BLOB)) <= 256),
                  verified INTEGER NOT NULL CONSTRAINT verified_rules CHECK (verified IN (0, 1)),
                  version INTEGER NOT NULL CONSTRAINT version_rules CHECK (version >= 1)
              ) STRICT, WITHOUT ROWID;
              INSERT OR IGNORE INTO users (id, first_name, last_name, address, verified, version)
                  SELECT id, first_name, last_name, address, verified, version FROM users_v2;
              ALTER TABLE change_seq RENAME TO change_seq_v2;
              CREATE TABLE change_seq (
                  seq INTEGER NOT NULL CONSTRAINT seq_rules CHECK (seq >= 0)
              ) STRICT;
              INSERT INTO change_seq (seq) SELECT seq FROM change_seq_v2;
              DROP TABLE change_seq_v2;",
        then: Some(keep_every_user),
    },
];

/// After version 3's copy into the constrained `users`: the users it left
/// behind in `users_v2` break the limits, and refuse the file, named;
/// otherwise the old table goes.
fn keep_every_user(conn: &Connection, path: &Path) -> Result<(), OpenError> {
    let sqlite = |err| OpenError::sqlite(path, err);
    const LEFT_BEHIND: &str =
        "FROM users_v2 WHERE NOT EXISTS (SELECT 1 FROM users WHERE users.id = users_v2.id)";
    let total: i64 = conn
        .query_row(&format!("SELECT count(*) {LEFT_BEHIND}"), [], |row| {
            row.get(0)
        })
        .map_err(sqlite)?;
    if total == 0 {
        return conn.execute_batch("DROP TABLE users_v2").map_err(sqlite);
    }
    // As bytes: an id another program wrote need not be UTF-8.
    let first = conn
        .prepare(&format!(
            "SELECT CAST(id AS BLOB) {LEFT_BEHIND} ORDER BY id LIMIT {MAX_NAMED_ROWS}"
        ))
        .and_then(|mut statement| {
            statement
                .query_map([], |row| {
                    let id: Vec<u8> = row.get(0)?;
                    Ok(format!("{:?}", String::from_utf8_lossy(&id)))
                })?
                .collect::<rusqlite::Result<_>>()
        })
        .map_err(sqlite)?;
    Err(OpenError::OutsideLimits {
        path: path.to_owned(),
        ids: RowNames {
            first,
            total: total.unsigned_abs(),
        },
    })
}

/// Creates or migrates the schema in one transaction; returns the last seq.
pub(super) fn migrate(conn: &mut Connection, path: &Path) -> Result<u64, OpenError> {
    let sqlite = |err| OpenError::sqlite(path, err);
    // The writer's connection skips the constraints (see `open_writer`); a
    // migration copying users into a checked table must not: `OR IGNORE`
    // leaves behind only the rows it checks.
    let checks = |on: bool| format!("PRAGMA ignore_check_constraints = {}", !on);
    conn.execute_batch(&checks(true)).map_err(sqlite)?;
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
    for (version, migration) in MIGRATIONS.iter().enumerate().skip(from as usize) {
        tracing::info!(
            path = %path.display(),
            from = version,
            to = version + 1,
            "migrating schema"
        );
        tx.execute_batch(migration.sql).map_err(sqlite)?;
        if let Some(then) = migration.then {
            // A refusal drops the transaction: nothing is written.
            then(&tx, path)?;
        }
    }
    if from < SCHEMA_VERSION {
        tx.execute("UPDATE schema_version SET version = ?1", [SCHEMA_VERSION])
            .map_err(sqlite)?;
    }
    let seq = read_seq(&tx).map_err(sqlite)?;
    tx.commit().map_err(sqlite)?;
    conn.execute_batch(&checks(false)).map_err(sqlite)?;
    Ok(seq)
}

/// The seq of the last committed change, as stored (a negative one, which
/// the schema refuses, is an error rather than a wrapped number).
pub(super) fn read_seq(conn: &Connection) -> rusqlite::Result<u64> {
    let seq = conn
        .prepare_cached("SELECT seq FROM change_seq")?
        .query_row([], |row| row.get::<_, i64>(0))?;
    u64::try_from(seq).map_err(|_| rusqlite::Error::IntegralValueOutOfRange(0, seq))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{
        SqliteStore, Store,
        sqlite::{open::open_reader, tests::options},
    };

    /// A file as schema version `version` (1 or 2) left it, with `rows`
    /// (SQL value lists) in `users`.
    fn old_file(path: &Path, version: usize, rows: &[&str]) {
        let conn = Connection::open(path).unwrap();
        let mut sql = format!(
            "PRAGMA application_id = {APPLICATION_ID}; PRAGMA journal_mode = WAL;
             CREATE TABLE schema_version (version INTEGER NOT NULL) STRICT;
             INSERT INTO schema_version (version) VALUES ({version});"
        );
        for migration in &MIGRATIONS[..version] {
            sql.push_str(migration.sql);
        }
        for row in rows {
            sql.push_str(&format!("INSERT INTO users VALUES ({row});"));
        }
        conn.execute_batch(&sql).unwrap();
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
                MIGRATIONS[0].sql
            ))
            .unwrap();
        }
        let store = SqliteStore::open(&path, options()).unwrap();
        assert_eq!(store.get("a").await.unwrap().version(), 3);
        assert_eq!(store.last_seq().await.unwrap(), 5);
        store.close().await;
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
    async fn users_outside_the_limits_refuse_the_migration_naming_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users.db");
        let long = "x".repeat(257);
        let rows = [
            "'a', 'Ann', '', '', 1, 1".to_owned(),
            "'b c', 'Bad id', '', '', 0, 1".to_owned(),
            format!("'d', 'Dee', '{long}', '', 0, 1"),
            "'e', char(12288, 9), '', '', 0, 1".to_owned(),
            "'f', 'Zero', '', '', 0, 0".to_owned(),
        ];
        old_file(
            &path,
            2,
            &rows.iter().map(String::as_str).collect::<Vec<_>>(),
        );
        let before = std::fs::read(&path).unwrap();
        let err = SqliteStore::open(&path, options()).unwrap_err();
        assert!(err.is_refusal(), "{err:?}");
        let OpenError::OutsideLimits { ids, .. } = &err else {
            panic!("{err:?}");
        };
        assert_eq!(ids.first, ["\"b c\"", "\"d\"", "\"e\"", "\"f\""]);
        assert_eq!(ids.total, 4);
        assert!(err.to_string().contains("file left untouched"), "{err}");
        assert_eq!(std::fs::read(&path).unwrap(), before, "file changed");

        // Fixed (or deleted), every user is kept, under the constraints.
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(
            "DELETE FROM users WHERE id = 'b c';
             UPDATE users SET last_name = '' WHERE id = 'd';
             UPDATE users SET first_name = 'Eve' WHERE id = 'e';
             UPDATE users SET version = 1 WHERE id = 'f';",
        )
        .unwrap();
        drop(conn);
        let store = SqliteStore::open(&path, options()).unwrap();
        assert_eq!(store.count().await.unwrap(), 4);
        assert_eq!(store.get("e").await.unwrap().first_name(), "Eve");
        store.close().await;
        let conn = Connection::open(&path).unwrap();
        let refused = conn
            .execute("UPDATE users SET first_name = ?1 WHERE id = 'a'", [&long])
            .unwrap_err();
        assert!(
            refused.to_string().contains("first_name_rules"),
            "{refused}"
        );
        let tables: i64 = conn
            .query_row(
                "SELECT count(*) FROM sqlite_schema WHERE name LIKE '%_v2'",
                [],
                |row| row.get(0),
            )
            .unwrap();
        assert_eq!(tables, 0, "the old tables are gone");
    }

    /// The schema's blank first names are `validate`'s: every character
    /// Rust's `trim` trims, and no other.
    #[test]
    fn the_schema_trims_what_validation_trims() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users.db");
        let mut conn = Connection::open(&path).unwrap();
        migrate(&mut conn, &path).unwrap();
        // Checked, as for any connection but the store's writer.
        conn.execute_batch("PRAGMA ignore_check_constraints = OFF")
            .unwrap();
        // One transaction: a million statements, each refused or undone.
        let conn = conn.transaction().unwrap();
        let mut insert = conn
            .prepare("INSERT INTO users VALUES ('a', ?1, '', '', 0, 1)")
            .unwrap();
        for c in (0..=0x10FFFF).filter_map(char::from_u32) {
            let name = format!("{c}{c}");
            let stored = insert.execute([&name]).is_ok();
            assert_eq!(
                stored,
                !c.is_whitespace(),
                "U+{:04X}: stored {stored}",
                c as u32
            );
            if stored {
                conn.execute("DELETE FROM users", []).unwrap();
            }
        }
    }
}
