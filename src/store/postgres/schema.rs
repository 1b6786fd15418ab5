//! The schema: created and migrated by the program, in the connection's
//! current schema (the first of its `search_path`, `public` by default), and
//! a newer one refused.
//!
//! The version is recorded in `user_service_schema`. Every replica checks it
//! when it starts, under an advisory lock so that replicas starting together
//! migrate once: an older schema is migrated in one transaction, a newer one
//! (written by a later build) is refused with [`OpenError::NewerSchema`]
//! and nothing is touched, and tables of ours found without the version
//! table (another program's `users`, say) are refused too.
//!
//! The tables:
//! - `users`: one row per user, keyed by id in byte order (`COLLATE "C"`,
//!   the order the contract lists in).
//! - `user_change_seq`: one row, the seq of the last committed change. Every
//!   write transaction takes its seqs from it with `UPDATE ... SET seq =
//!   seq + n`, holding the row lock to its commit: seqs are then handed out
//!   in commit order, and a rollback gives them back, so there is never a
//!   gap.
//! - `user_changes`: the changelog, one row per committed change with the
//!   user as the change left it, written in the same transaction; what every
//!   replica's tailer reads. Pruned (see `prune`).

use tokio_postgres::Client;

use super::connect::{ConfigError, Report, is_connection_loss};

/// The schema version this build writes. An older database is migrated; a
/// newer one is refused, since this build cannot know what it means.
pub const SCHEMA_VERSION: i32 = 1;

/// The table that records the schema version.
pub const VERSION_TABLE: &str = "user_service_schema";

/// The tables a migration creates, which must not exist without
/// [`VERSION_TABLE`].
const OUR_TABLES: [&str; 3] = ["users", "user_change_seq", "user_changes"];

/// Keys of the advisory lock held while a replica checks and migrates the
/// schema (the second is the current schema's name, hashed).
const MIGRATION_LOCK: i32 = 0x5553_5256; // "USRV"

/// `MIGRATIONS[v]` takes the schema from version `v` to `v + 1`. Each runs in
/// the transaction that also records the new version.
const MIGRATIONS: &[&str] = &["CREATE TABLE users (
         id text COLLATE \"C\" PRIMARY KEY,
         first_name text NOT NULL,
         last_name text NOT NULL,
         address text NOT NULL,
         verified boolean NOT NULL,
         version bigint NOT NULL
     );
     CREATE TABLE user_change_seq (
         only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row),
         seq bigint NOT NULL
     );
     INSERT INTO user_change_seq (seq) VALUES (0);
     -- kind: 1 created, 2 updated, 3 deleted. committed_at is the
     -- transaction's start, close enough to prune by age.
     CREATE TABLE user_changes (
         seq bigint PRIMARY KEY,
         kind smallint NOT NULL,
         id text COLLATE \"C\" NOT NULL,
         first_name text NOT NULL,
         last_name text NOT NULL,
         address text NOT NULL,
         verified boolean NOT NULL,
         version bigint NOT NULL,
         committed_at timestamptz NOT NULL DEFAULT now()
     );"];

/// Why the store could not be opened. Every refusal leaves the database as
/// it was.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot reach PostgreSQL at {target}: {detail}")]
    Unreachable { target: String, detail: String },
    #[error(
        "{target} schema {schema:?}: version {found} is newer than this build supports \
         ({supported}); refusing to use it (database left untouched); run a newer user-service"
    )]
    NewerSchema {
        target: String,
        schema: String,
        found: i32,
        supported: i32,
    },
    #[error(
        "{target} schema {schema:?}: table {table:?} exists but is not user-service's \
         (no {VERSION_TABLE} table); refusing to use it (database left untouched)"
    )]
    Foreign {
        target: String,
        schema: String,
        table: String,
    },
    #[error("{target}: no schema to create tables in (the search_path names none that exists)")]
    NoSchema { target: String },
    #[error("{target}: {detail}")]
    Postgres { target: String, detail: String },
}

impl OpenError {
    /// Whether the database itself was refused (as opposed to a failure to
    /// reach or read it).
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            OpenError::NewerSchema { .. } | OpenError::Foreign { .. } | OpenError::NoSchema { .. }
        )
    }

    /// Whether the database could not be reached at all.
    pub fn is_unreachable(&self) -> bool {
        matches!(self, OpenError::Unreachable { .. })
    }

    pub(super) fn postgres(target: &str, source: tokio_postgres::Error) -> OpenError {
        let target = target.to_owned();
        let detail = Report(&source).to_string();
        if is_connection_loss(&source) {
            OpenError::Unreachable { target, detail }
        } else {
            OpenError::Postgres { target, detail }
        }
    }
}

/// What the store found when it opened, all read in one snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Opened {
    /// The schema the tables are in.
    pub schema: String,
    /// The seq of the last committed change.
    pub seq: u64,
    /// Users stored at that seq.
    pub users: u64,
}

/// Creates or migrates the schema, or refuses it; returns what is there.
pub(super) async fn migrate(client: &mut Client, target: &str) -> Result<Opened, OpenError> {
    let pg = |err| OpenError::postgres(target, err);
    // Read committed: each statement sees what committed before it, so a
    // replica that waited for the lock sees what the one that held it
    // migrated.
    let tx = client.transaction().await.map_err(pg)?;
    tx.execute(
        "SELECT pg_advisory_xact_lock($1, hashtext(coalesce(current_schema(), '')))",
        &[&MIGRATION_LOCK],
    )
    .await
    .map_err(pg)?;
    let schema: Option<String> = tx
        .query_one("SELECT current_schema()", &[])
        .await
        .map_err(pg)?
        .get(0);
    let Some(schema) = schema else {
        return Err(OpenError::NoSchema {
            target: target.to_owned(),
        });
    };
    let existing: Vec<String> = tx
        .query(
            "SELECT tablename::text FROM pg_tables WHERE schemaname = current_schema()
             AND tablename = ANY($1)",
            &[&[VERSION_TABLE, OUR_TABLES[0], OUR_TABLES[1], OUR_TABLES[2]].as_slice()],
        )
        .await
        .map_err(pg)?
        .iter()
        .map(|row| row.get(0))
        .collect();
    let from = if existing.iter().any(|t| t == VERSION_TABLE) {
        let found: i32 = tx
            .query_one(&format!("SELECT version FROM {VERSION_TABLE}"), &[])
            .await
            .map_err(pg)?
            .get(0);
        if found > SCHEMA_VERSION {
            return Err(OpenError::NewerSchema {
                target: target.to_owned(),
                schema,
                found,
                supported: SCHEMA_VERSION,
            });
        }
        found
    } else {
        if let Some(table) = existing.into_iter().next() {
            return Err(OpenError::Foreign {
                target: target.to_owned(),
                schema,
                table,
            });
        }
        tx.batch_execute(&format!(
            "CREATE TABLE {VERSION_TABLE} (version integer NOT NULL);
             INSERT INTO {VERSION_TABLE} (version) VALUES (0);"
        ))
        .await
        .map_err(pg)?;
        0
    };
    for (version, sql) in MIGRATIONS.iter().enumerate().skip(from as usize) {
        tracing::info!(%schema, from = version, to = version + 1, "migrating schema");
        tx.batch_execute(sql).await.map_err(pg)?;
    }
    if from < SCHEMA_VERSION {
        tx.execute(
            &format!("UPDATE {VERSION_TABLE} SET version = $1"),
            &[&SCHEMA_VERSION],
        )
        .await
        .map_err(pg)?;
    }
    // One statement, one snapshot: the users counted are those at the seq.
    let row = tx
        .query_one(
            "SELECT (SELECT seq FROM user_change_seq), (SELECT count(*) FROM users)",
            &[],
        )
        .await
        .map_err(pg)?;
    let (seq, users): (i64, i64) = (row.get(0), row.get(1));
    tx.commit().await.map_err(pg)?;
    Ok(Opened {
        schema,
        seq: seq as u64,
        users: users as u64,
    })
}
