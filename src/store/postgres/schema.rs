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
//! - `user_change_batches` (since version 3): the changelog, one row per
//!   write transaction, keyed by the last seq it took, holding its changes
//!   (seqs `first_seq..=last_seq`, each with the user as the change left
//!   it) packed as protobuf (see `packed`), written in the same
//!   transaction; what every replica's tailer reads. Pruned whole (see
//!   `prune`). Its `changes` column is `STORAGE EXTERNAL`: a batch of more
//!   than ~2 kB (some 40 users) is kept out of line uncompressed, since
//!   compressing it would cost the writer's backend CPU on every commit for
//!   little (names and ids compress poorly), and a scan of the ranges (the
//!   tailer's, pruning's) never reads it. Up to version 2 the changelog was
//!   `user_changes`, one row per change; writing every user twice, once
//!   in `users` and once there, made a bulk import run at a quarter of the
//!   rate of `COPY` into `users` alone.
//!
//! Since version 2, CHECK constraints hold `users` (and, up to version 3,
//! `user_changes`) to the limits the API holds a new user to (`validate`),
//! so that a row written with psql that breaks them is refused by
//! PostgreSQL itself. A migration adds its constraints `NOT VALID` (no
//! scan), then [`validate_constraints`] looks for rows that break them: any
//! there refuse the database, named, for an operator to fix or delete,
//! rather than be dropped or changed, and the transaction is rolled back;
//! otherwise the constraints are validated. Both scan the tables once,
//! holding the lock the constraints took: writes from other replicas wait
//! for the migration, once. A packed batch is opaque to PostgreSQL: its
//! changes are held to the limits when the tailer decodes them.
//!
//! The migration to version 3 packs the changes of `user_changes` into
//! batches (the changes of one transaction share its `committed_at`) and
//! drops it. A replica of an older build would go on writing to the table
//! it drops, so the migration is refused while one is connected (see
//! [`OpenError::OlderReplicas`]); an older build started on a schema at
//! version 3 refuses it as newer.

use tokio_postgres::{Client, Transaction};

use super::{
    connect::{ConfigError, Report, is_connection_loss},
    packed,
};
use crate::store::{
    group_commit::MAX_BATCH_OPS,
    stored::{MAX_NAMED_ROWS, RowNames},
};

/// The schema version this build writes. An older database is migrated; a
/// newer one is refused, since this build cannot know what it means.
pub const SCHEMA_VERSION: i32 = 3;

/// The table that records the schema version.
pub const VERSION_TABLE: &str = "user_service_schema";

/// The tables a migration creates, which must not exist without
/// [`VERSION_TABLE`].
const OUR_TABLES: [&str; 4] = [
    "users",
    "user_change_seq",
    "user_changes",
    "user_change_batches",
];

/// Keys of the advisory lock held while a replica checks and migrates the
/// schema (the second is the current schema's name, hashed).
const MIGRATION_LOCK: i32 = 0x5553_5256; // "USRV"

/// Our tables, each with the column that names a row of it in a refusal.
/// A table that does not exist (`user_changes` from version 3 on) is passed
/// over.
const KEYED_TABLES: [(&str, &str); 4] = [
    ("users", "id"),
    ("user_changes", "seq"),
    ("user_change_seq", "seq"),
    ("user_change_batches", "last_seq"),
];

/// The version whose migration packs the changelog (see [`pack_changelog`]).
const PACKED_CHANGELOG: i32 = 3;

/// What a replica of a build before [`PACKED_CHANGELOG`] runs on its
/// tailer's connection every time it reads, and so what
/// `pg_stat_activity` shows for it between reads: how the migration finds
/// such replicas connected.
const OLD_TAILER_READ: &str = "FROM user_changes WHERE seq > $1 ORDER BY seq LIMIT $2";

/// `MIGRATIONS[v]` takes the schema from version `v` to `v + 1`. Each runs in
/// the transaction that also records the new version.
const MIGRATIONS: &[&str] = &[
    // 0 -> 1: the tables.
    "CREATE TABLE users (
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
     );",
    // 1 -> 2: the API's limits as constraints, on users and on the users
    // the changelog carries: an id of 1 to 64 bytes, none outside
    // [A-Za-z0-9_-] (the column's "C" collation makes the ranges ASCII); a
    // first name with a character that is not white space as Rust's
    // `char::is_whitespace` has it, which is what `validate`'s `trim`
    // leaves; each text field at most 256 bytes; versions from 1, seqs from
    // 0 (the counter) or 1 (a change), known kinds of change.
    //
    // Each rule is one cheap pass that stops early where it can: a regex
    // with a bounded repetition (`^[...]{1,64}$`) made every insert several
    // times slower, and a blank first name is found by its first character
    // that is not white space rather than by trimming.
    r#"ALTER TABLE users
         ADD CONSTRAINT id_rules
             CHECK (octet_length(id) BETWEEN 1 AND 64 AND id !~ '[^A-Za-z0-9_-]') NOT VALID,
         ADD CONSTRAINT first_name_rules
             CHECK (octet_length(first_name) <= 256 AND first_name
                 ~ U&'[^\0009-\000D\0020\0085\00A0\1680\2000-\200A\2028\2029\202F\205F\3000]')
             NOT VALID,
         ADD CONSTRAINT last_name_rules CHECK (octet_length(last_name) <= 256) NOT VALID,
         ADD CONSTRAINT address_rules CHECK (octet_length(address) <= 256) NOT VALID,
         ADD CONSTRAINT version_rules CHECK (version >= 1) NOT VALID;
     ALTER TABLE user_changes
         ADD CONSTRAINT seq_rules CHECK (seq >= 1) NOT VALID,
         ADD CONSTRAINT kind_rules CHECK (kind BETWEEN 1 AND 3) NOT VALID,
         ADD CONSTRAINT id_rules
             CHECK (octet_length(id) BETWEEN 1 AND 64 AND id !~ '[^A-Za-z0-9_-]') NOT VALID,
         ADD CONSTRAINT first_name_rules
             CHECK (octet_length(first_name) <= 256 AND first_name
                 ~ U&'[^\0009-\000D\0020\0085\00A0\1680\2000-\200A\2028\2029\202F\205F\3000]')
             NOT VALID,
         ADD CONSTRAINT last_name_rules CHECK (octet_length(last_name) <= 256) NOT VALID,
         ADD CONSTRAINT address_rules CHECK (octet_length(address) <= 256) NOT VALID,
         ADD CONSTRAINT version_rules CHECK (version >= 1) NOT VALID;
     ALTER TABLE user_change_seq
         ADD CONSTRAINT seq_rules CHECK (seq >= 0) NOT VALID;"#,
    // 2 -> 3: the changelog, one row per write transaction (see the module
    // doc); `pack_changelog` then moves `user_changes` into it and drops
    // it. Keyed by `last_seq`: the tailer reads the batches that end after
    // the last seq it published, in order, and pruning deletes the oldest.
    "CREATE TABLE user_change_batches (
         last_seq bigint PRIMARY KEY,
         first_seq bigint NOT NULL,
         changes bytea NOT NULL,
         committed_at timestamptz NOT NULL DEFAULT now(),
         CONSTRAINT seq_rules CHECK (first_seq >= 1 AND last_seq >= first_seq)
     );
     ALTER TABLE user_change_batches ALTER COLUMN changes SET STORAGE EXTERNAL;",
];

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
    #[error(
        "{target} schema {schema:?}: the rows of {table} with {key} {rows} break the limits \
         every user is held to (docs/scale-out.md); refusing to migrate to schema \
         version {SCHEMA_VERSION} (database left untouched): fix or delete them with psql, \
         then start again"
    )]
    OutsideLimits {
        target: String,
        schema: String,
        table: &'static str,
        /// What names the rows: `ids` or `seqs`.
        key: &'static str,
        rows: RowNames,
    },
    #[error(
        "{target} schema {schema:?}: {connections} connection(s) of a user-service build \
         older than schema version {PACKED_CHANGELOG} are open to this database (from \
         {clients}); refusing to migrate the schema while they write to it (database left \
         untouched): stop every replica of the older build, then start this one (see \
         docs/scale-out.md, \"Upgrading\")"
    )]
    OlderReplicas {
        target: String,
        schema: String,
        connections: i64,
        /// Where they connect from.
        clients: String,
    },
    #[error("{target}: {detail}")]
    Postgres { target: String, detail: String },
}

impl OpenError {
    /// Whether the database itself was refused (as opposed to a failure to
    /// reach or read it).
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            OpenError::NewerSchema { .. }
                | OpenError::Foreign { .. }
                | OpenError::NoSchema { .. }
                | OpenError::OutsideLimits { .. }
                | OpenError::OlderReplicas { .. }
        )
    }

    /// Whether the database could not be reached at all.
    pub fn is_unreachable(&self) -> bool {
        matches!(self, OpenError::Unreachable { .. })
    }

    pub(super) fn postgres(target: &str, source: tokio_postgres::Error) -> OpenError {
        let target = target.to_owned();
        let detail = Report(&source).to_string();
        // A database that does not exist is a setting to fix, not an outage.
        if source.code() == Some(&tokio_postgres::error::SqlState::INVALID_CATALOG_NAME) {
            OpenError::Config(ConfigError::NoDatabase { target, detail })
        } else if is_connection_loss(&source) {
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
            &[&[
                VERSION_TABLE,
                OUR_TABLES[0],
                OUR_TABLES[1],
                OUR_TABLES[2],
                OUR_TABLES[3],
            ]
            .as_slice()],
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
    if (1..PACKED_CHANGELOG).contains(&from) {
        refuse_older_replicas(&tx, target, &schema).await?;
    }
    for (version, sql) in MIGRATIONS.iter().enumerate().skip(from as usize) {
        tracing::info!(%schema, from = version, to = version + 1, "migrating schema");
        if version + 1 == PACKED_CHANGELOG as usize {
            // The changes to pack must first be held to the limits.
            validate_constraints(&tx, target, &schema).await?;
        }
        tx.batch_execute(sql).await.map_err(pg)?;
        if version + 1 == PACKED_CHANGELOG as usize {
            pack_changelog(&tx).await.map_err(pg)?;
        }
    }
    // A refusal drops the transaction: nothing is written.
    validate_constraints(&tx, target, &schema).await?;
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

/// Validates the CHECK constraints of our tables that a migration added
/// `NOT VALID`, or refuses the database, naming the first rows that break
/// them (by `KEYED_TABLES`' column), when there are any.
async fn validate_constraints(
    tx: &Transaction<'_>,
    target: &str,
    schema: &str,
) -> Result<(), OpenError> {
    let pg = |err| OpenError::postgres(target, err);
    for (table, key) in KEYED_TABLES {
        // The constraints' own expressions, as PostgreSQL keeps them: the
        // rows that break them are found by the very rules that will hold.
        let pending: Vec<(String, String)> = tx
            .query(
                "SELECT conname::text, pg_get_expr(conbin, conrelid) FROM pg_constraint
                 WHERE conrelid = to_regclass($1::text) AND contype = 'c'
                   AND NOT convalidated
                 ORDER BY conname",
                &[&table],
            )
            .await
            .map_err(pg)?
            .iter()
            .map(|row| (row.get(0), row.get(1)))
            .collect();
        if pending.is_empty() {
            continue;
        }
        let rules: Vec<String> = pending
            .iter()
            .map(|(_, expr)| format!("({expr})"))
            .collect();
        let breaking = format!("FROM {table} WHERE NOT ({})", rules.join(" AND "));
        let total: i64 = tx
            .query_one(&format!("SELECT count(*) {breaking}"), &[])
            .await
            .map_err(pg)?
            .get(0);
        if total > 0 {
            let first = tx
                .query(
                    &format!("SELECT {key}::text {breaking} ORDER BY {key} LIMIT {MAX_NAMED_ROWS}"),
                    &[],
                )
                .await
                .map_err(pg)?
                .iter()
                .map(|row| match key {
                    "id" => format!("{:?}", row.get::<_, &str>(0)),
                    _ => row.get::<_, String>(0),
                })
                .collect();
            return Err(OpenError::OutsideLimits {
                target: target.to_owned(),
                schema: schema.to_owned(),
                table,
                key: if key == "id" { "ids" } else { "seqs" },
                rows: RowNames {
                    first,
                    total: total.unsigned_abs(),
                },
            });
        }
        for (name, _) in &pending {
            tx.batch_execute(&format!("ALTER TABLE {table} VALIDATE CONSTRAINT {name}"))
                .await
                .map_err(pg)?;
        }
    }
    Ok(())
}

/// Refuses the migration to [`PACKED_CHANGELOG`] while a replica of an
/// older build is connected to the database (its tailer found by the read
/// it runs, [`OLD_TAILER_READ`]). `pg_stat_activity` does not say which
/// schema a connection reads, so one in another schema of the database
/// refuses it too; and it shows the text of a query only to its role, a
/// superuser or `pg_read_all_stats`, so replicas that connect as another
/// role are not seen (docs/scale-out.md says to stop them all first).
async fn refuse_older_replicas(
    tx: &Transaction<'_>,
    target: &str,
    schema: &str,
) -> Result<(), OpenError> {
    let row = tx
        .query_one(
            "SELECT count(*), coalesce(string_agg(DISTINCT coalesce(host(client_addr),
                 'a local socket') || ' as ' || application_name, ', '), '')
             FROM pg_stat_activity
             WHERE datname = current_database() AND pid <> pg_backend_pid()
               AND strpos(query, $1) > 0",
            &[&OLD_TAILER_READ],
        )
        .await
        .map_err(|err| OpenError::postgres(target, err))?;
    let connections: i64 = row.get(0);
    if connections == 0 {
        return Ok(());
    }
    Err(OpenError::OlderReplicas {
        target: target.to_owned(),
        schema: schema.to_owned(),
        connections,
        clients: row.get(1),
    })
}

/// Moves the changes of `user_changes` into `user_change_batches`, then
/// drops it: consecutive changes that share a `committed_at` (one
/// transaction's) make one batch, of at most [`MAX_BATCH_OPS`] changes as
/// the writer's are. Read [`MAX_BATCH_OPS`] rows at a time, so that a
/// changelog of a million changes is never all in memory.
async fn pack_changelog(tx: &Transaction<'_>) -> Result<(), tokio_postgres::Error> {
    let read = tx
        .prepare(
            "SELECT seq, kind, id, first_name, last_name, address, verified, version,
                    committed_at
             FROM user_changes WHERE $1 < seq ORDER BY seq LIMIT $2",
        )
        .await?;
    let write = tx
        .prepare(
            "INSERT INTO user_change_batches (first_seq, last_seq, changes, committed_at)
             VALUES ($1, $2, $3, $4)",
        )
        .await?;
    type Stamp = std::time::SystemTime;
    let mut open: Option<(i64, i64, Stamp, Vec<u8>)> = None;
    let mut after = 0i64;
    let (mut packed_rows, mut changes_packed) = (0u64, 0u64);
    loop {
        let rows = tx.query(&read, &[&after, &(MAX_BATCH_OPS as i64)]).await?;
        for row in &rows {
            let seq: i64 = row.try_get(0)?;
            let stamp: Stamp = row.try_get(8)?;
            let joins = open.as_ref().is_some_and(|(first, last, at, _)| {
                *last + 1 == seq && *at == stamp && seq - first < MAX_BATCH_OPS as i64
            });
            if !joins && let Some((first, last, at, changes)) = open.take() {
                tx.execute(&write, &[&first, &last, &changes, &at]).await?;
                packed_rows += 1;
            }
            let (_, last, _, changes) = open.get_or_insert_with(|| (seq, seq, stamp, Vec::new()));
            *last = seq;
            // The constraints were validated: the columns are the API's.
            packed::element_of(
                row.try_get(1)?,
                [
                    row.try_get(2)?,
                    row.try_get(3)?,
                    row.try_get(4)?,
                    row.try_get(5)?,
                ],
                row.try_get(6)?,
                row.try_get::<_, i64>(7)? as u64,
                changes,
            );
            after = seq;
            changes_packed += 1;
        }
        if rows.len() < MAX_BATCH_OPS {
            break;
        }
    }
    if let Some((first, last, at, changes)) = open.take() {
        tx.execute(&write, &[&first, &last, &changes, &at]).await?;
        packed_rows += 1;
    }
    tx.batch_execute("DROP TABLE user_changes").await?;
    tracing::info!(
        changes = changes_packed,
        batches = packed_rows,
        "packed the changelog into batches"
    );
    Ok(())
}
