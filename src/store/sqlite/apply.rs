//! Applying one batch: every op of it in one transaction, one commit.
//!
//! Each op checks before it writes (the id is free, the expected version
//! matches), so an op that fails writes nothing and uses no seq, while the
//! others go on. The seq of the last change is stored in the same
//! transaction. If any statement fails, or COMMIT cannot write the log, the
//! transaction is rolled back whole ([`BatchError::RolledBack`]); a COMMIT
//! that fails past writing the log, in its fsync, is another matter
//! ([`BatchError::Commit`]): what reached the disk is then unknown.

use rusqlite::{CachedStatement, Connection, ErrorCode, OptionalExtension, params};

use super::{
    read::{SELECT_USER, user_from_row},
    schema::read_seq,
};
use crate::{
    store::{PreparedOp, StoreError, check_version, group_commit::BatchResults},
    user::{Change, ChangeKind, User},
};

/// Why a batch did not commit.
#[derive(Debug)]
pub(super) enum BatchError {
    /// A statement failed, or COMMIT could not write the log (a full disk,
    /// a failed write): the transaction was rolled back, nothing changed, and
    /// later batches may succeed.
    RolledBack(rusqlite::Error),
    /// COMMIT failed past writing the log (its fsync): what reached the disk
    /// is unknown.
    Commit(rusqlite::Error),
}

/// Runs `ops` in one transaction and commits it; one result per op.
///
/// BEGIN and COMMIT run as cached statements: parsing them anew for every
/// batch, as `Connection::transaction` does, took about 6% of the writer's
/// time under 64 concurrent AddUser calls.
pub(super) fn apply<'a>(
    conn: &Connection,
    ops: impl Iterator<Item = &'a PreparedOp>,
) -> Result<BatchResults, BatchError> {
    run_cached(conn, "BEGIN IMMEDIATE").map_err(BatchError::RolledBack)?;
    let results = match apply_in(conn, ops) {
        Ok(results) => results,
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
    Ok(results)
}

/// The body of [`apply`]'s transaction.
fn apply_in<'a>(
    conn: &Connection,
    ops: impl Iterator<Item = &'a PreparedOp>,
) -> rusqlite::Result<BatchResults> {
    // Read inside the write transaction, not cached in memory: the stored
    // seq is the truth even if another process wrote to the file.
    let first_seq = read_seq(conn)?;
    let mut batch = Transaction {
        statements: Statements::prepare(conn)?,
        seq: first_seq,
    };
    let results = ops
        .map(|op| batch.apply(op))
        .collect::<rusqlite::Result<_>>()?;
    if batch.seq != first_seq {
        conn.prepare_cached("UPDATE change_seq SET seq = ?1")?
            .execute([batch.seq as i64])?;
    }
    Ok(results)
}

/// A batch's transaction under way: its statements, and the last seq used.
struct Transaction<'c> {
    statements: Statements<'c>,
    seq: u64,
}

/// Statements of one batch, prepared (from the connection's cache) once.
struct Statements<'c> {
    insert_new: CachedStatement<'c>,
    insert: CachedStatement<'c>,
    update: CachedStatement<'c>,
    version_of: CachedStatement<'c>,
    user_of: CachedStatement<'c>,
    delete: CachedStatement<'c>,
}

impl Transaction<'_> {
    /// Applies one op: `Ok` with the op's own result (an op that fails
    /// writes nothing), `Err` when a statement failed and the whole
    /// transaction must be rolled back.
    fn apply(&mut self, op: &PreparedOp) -> rusqlite::Result<Result<Change, StoreError>> {
        let st = &mut self.statements;
        Ok(match op {
            PreparedOp::Create(user) => {
                if write_user(&mut st.insert_new, user)? == 0 {
                    Err(StoreError::AlreadyExists(user.id().to_owned()))
                } else {
                    Ok(self.next(ChangeKind::Created, user.clone()))
                }
            }
            PreparedOp::Upsert {
                user,
                expected_version,
            } => {
                let stored: Option<i64> = st
                    .version_of
                    .query_row([user.id()], |row| row.get(0))
                    .optional()?;
                let stored = stored.map(|v| v as u64);
                match check_version(*expected_version, stored.unwrap_or(0)) {
                    Err(err) => Err(err),
                    Ok(()) => match stored {
                        None => {
                            write_user(&mut st.insert, user)?;
                            Ok(self.next(ChangeKind::Created, user.clone()))
                        }
                        Some(version) => {
                            // A copy: the command keeps `user` until its
                            // reply.
                            let updated = user.clone().with_version(version + 1);
                            write_user(&mut st.update, &updated)?;
                            Ok(self.next(ChangeKind::Updated, updated))
                        }
                    },
                }
            }
            PreparedOp::Delete {
                id,
                expected_version,
            } => match st
                .user_of
                .query_row([id], |row| Ok(user_from_row(row)))
                .optional()?
            {
                None => Err(StoreError::NotFound(id.clone())),
                // Its change would carry the user as it was: a row that
                // cannot be read is not deleted, and the others go on.
                Some(Err(unreadable)) => Err(unreadable),
                Some(Ok(user)) => match check_version(*expected_version, user.version()) {
                    Err(err) => Err(err),
                    Ok(()) => {
                        st.delete.execute([id])?;
                        Ok(self.next(ChangeKind::Deleted, user))
                    }
                },
            },
        })
    }

    /// The change a successful op makes, with the next seq.
    fn next(&mut self, kind: ChangeKind, user: User) -> Change {
        self.seq += 1;
        Change {
            seq: self.seq,
            kind,
            user,
        }
    }
}

impl<'c> Statements<'c> {
    fn prepare(conn: &'c Connection) -> rusqlite::Result<Self> {
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
            user_of: conn.prepare_cached(SELECT_USER)?,
            delete: conn.prepare_cached("DELETE FROM users WHERE id = ?1")?,
        })
    }
}

/// Runs an insert or update statement for `user` (`?1` id ... `?6` version).
fn write_user(statement: &mut CachedStatement<'_>, user: &User) -> rusqlite::Result<usize> {
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
pub(super) fn rolled_back_error(err: &rusqlite::Error) -> StoreError {
    if err.sqlite_error_code() == Some(ErrorCode::DiskFull) {
        StoreError::Full(format!("SQLite: {err}"))
    } else {
        StoreError::Internal(format!("SQLite write failed: {err}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
