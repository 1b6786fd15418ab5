//! Applying one batch: every op of it in one transaction, with its seqs
//! taken from the counter row and its changes appended to the changelog in
//! that same transaction.
//!
//! The ops run in order. Each checks before it writes (the id is free, the
//! expected version matches), so an op that fails writes nothing and uses no
//! seq while the others go on: a run of creates is one `INSERT ... ON
//! CONFLICT DO NOTHING` over all of them; an upsert or a delete locks its
//! row (`FOR UPDATE`) before it checks the version, so that replicas writing
//! the same user take turns. Then one statement takes as many seqs as there
//! were changes from the counter row, appends the changes to the changelog
//! as one row (packed, see `packed`), and asks PostgreSQL to notify the
//! tailers once it commits.
//!
//! The counter row is locked last, just before COMMIT, and held through it:
//! replicas take turns only for that moment, seqs go out in commit order,
//! and a transaction that holds the counter never waits for a user row
//! another one holds (so the two locks cannot deadlock). Users locked in
//! different orders by two replicas can: PostgreSQL then fails one
//! transaction, which is run again.
//!
//! A batch of creates only (AddUser calls, BulkAddUsers batches: the bulk of
//! the traffic) takes a shorter way, with the same order of locks: a small
//! one is one statement, run as its own transaction, that stores the users
//! whose ids are free, takes their seqs and appends their changes, in one
//! round trip where the general path takes four; a long one goes through
//! binary `COPY` (see `copy`).

use tokio_postgres::{
    Client, Statement, Transaction,
    error::SqlState,
    types::{ToSql, Type},
};

use super::{
    connect::Report,
    copy::{self, COPY_MIN_ROWS},
    packed, rows,
    tailer::Announce,
};
use crate::{
    store::{
        PreparedOp, StoreError, check_version,
        group_commit::{Batch, BatchResults},
    },
    user::{Change, ChangeKind, User},
};

/// How many times a batch that lost a deadlock (or a serialization
/// conflict) is run again before its ops fail.
const MAX_ATTEMPTS: usize = 3;

/// The writer's statements, prepared once per connection.
pub(super) struct Statements {
    /// A batch of creates only, from arrays: `$1`..`$5` the columns.
    create_all: Statement,
    /// The same from the staging table `copy` fills.
    create_staged: Statement,
    insert_new: Statement,
    version_of: Statement,
    insert: Statement,
    update: Statement,
    user_of: Statement,
    delete: Statement,
    log: Statement,
    copy: copy::Statements,
}

impl Statements {
    pub(super) async fn prepare(
        client: &Client,
        announce: &Announce,
    ) -> Result<Self, tokio_postgres::Error> {
        let text_array = Type::TEXT_ARRAY;
        let bool_array = Type::BOOL_ARRAY;
        // Appends the changes, packed (`$2`), as one batch with the next
        // `$1` seqs; returns the seq before the first of them.
        let log = format!(
            "WITH taken AS (
                 UPDATE user_change_seq SET seq = seq + $1
                 RETURNING seq - $1 AS base, seq AS last
             ), logged AS (
                 INSERT INTO user_change_batches (first_seq, last_seq, changes)
                 SELECT base + 1, last, $2 FROM taken
             )
             SELECT base{} FROM taken",
            match &announce.channel {
                Some(_) => ", pg_notify($3, $4 || last) IS NULL",
                None => "",
            }
        );
        let copy = copy::Statements::prepare(client).await?;
        let arrays = "SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], \
                      $5::bool[], $6::bytea[]) WITH ORDINALITY AS u(id, f, l, a, v, packed, n)";
        let staged = "SELECT id, first_name AS f, last_name AS l, address AS a, verified AS v, \
                      packed, ord::bigint AS n FROM user_import";
        Ok(Statements {
            create_all: client
                .prepare(&create_statement(arrays, 7, announce))
                .await?,
            create_staged: client
                .prepare(&create_statement(staged, 1, announce))
                .await?,
            // Writes nothing for an id that is taken (by an earlier row of
            // the same statement too: the first of equal ids wins), and
            // returns the ids it stored.
            insert_new: client
                .prepare_typed(
                    "INSERT INTO users (id, first_name, last_name, address, verified, version)
                     SELECT id, f, l, a, v, 1
                     FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::bool[])
                          AS u(id, f, l, a, v)
                     ON CONFLICT (id) DO NOTHING RETURNING id",
                    &[
                        text_array.clone(),
                        text_array.clone(),
                        text_array.clone(),
                        text_array,
                        bool_array,
                    ],
                )
                .await?,
            version_of: client
                .prepare("SELECT version FROM users WHERE id = $1 FOR UPDATE")
                .await?,
            insert: client
                .prepare(
                    "INSERT INTO users (id, first_name, last_name, address, verified, version)
                     VALUES ($1, $2, $3, $4, $5, 1) ON CONFLICT (id) DO NOTHING",
                )
                .await?,
            update: client
                .prepare(
                    "UPDATE users SET first_name = $2, last_name = $3, address = $4,
                     verified = $5, version = $6 WHERE id = $1",
                )
                .await?,
            user_of: client
                .prepare(
                    "SELECT id, first_name, last_name, address, verified, version
                     FROM users WHERE id = $1 FOR UPDATE",
                )
                .await?,
            delete: client.prepare("DELETE FROM users WHERE id = $1").await?,
            log: client.prepare(&log).await?,
            copy,
        })
    }
}

/// The statement that stores a batch of creates only, the rows coming from
/// `input` (columns `id, f, l, a, v`, `packed`, each row's change as
/// `packed::element` encodes it, and `n`, each row's place from 1): stores
/// those whose id is free (the first of equal ids), takes as many seqs from
/// the counter row, appends their changes to the changelog as one batch
/// (their `packed` concatenated in seq order: a `ChangeBatch`), and returns
/// each stored row's `n` and seq. `$notify` and the next parameter
/// are the NOTIFY channel and payload prefix, when commits announce.
fn create_statement(input: &str, notify: usize, announce: &Announce) -> String {
    let (announced, from) = match announce.channel {
        Some(_) => (
            format!(
                ", announced AS (SELECT pg_notify(${notify}, ${} || last) FROM taken)",
                notify + 1
            ),
            ", announced",
        ),
        None => (String::new(), ""),
    };
    format!(
        "WITH input AS ({input}),
         stored AS (
             INSERT INTO users (id, first_name, last_name, address, verified, version)
             SELECT id, f, l, a, v, 1 FROM input ORDER BY n
             ON CONFLICT (id) DO NOTHING RETURNING id
         ),
         numbered AS (
             SELECT first.n, row_number() OVER (ORDER BY first.n) AS k
             FROM (SELECT min(input.n) AS n FROM input JOIN stored USING (id)
                   GROUP BY input.id) AS first
         ),
         taken AS (
             UPDATE user_change_seq SET seq = seq + (SELECT count(*) FROM numbered)
             RETURNING seq - (SELECT count(*) FROM numbered) AS base, seq AS last
         ),
         logged AS (
             INSERT INTO user_change_batches (first_seq, last_seq, changes)
             SELECT taken.base + 1, taken.last,
                    (SELECT string_agg(input.packed, ''::bytea ORDER BY numbered.k)
                     FROM numbered JOIN input USING (n))
             FROM taken WHERE taken.last > taken.base
         ){announced}
         SELECT numbered.n, taken.base + numbered.k FROM taken, numbered{from}"
    )
}

/// Runs `batch` in one transaction and commits it; one result per op. A
/// transaction that lost a deadlock is run again, up to [`MAX_ATTEMPTS`]
/// times.
pub(super) async fn apply(
    client: &mut Client,
    statements: &Statements,
    announce: &Announce,
    batch: &Batch,
) -> Result<BatchResults, tokio_postgres::Error> {
    let creates: Option<Vec<&User>> = batch
        .ops()
        .map(|op| match op {
            PreparedOp::Create(user) => Some(user),
            _ => None,
        })
        .collect();
    let mut attempt = 1;
    loop {
        let outcome = match &creates {
            Some(users) => create_only(client, statements, announce, users).await,
            None => apply_once(client, statements, announce, batch).await,
        };
        match outcome {
            Err(err) if attempt < MAX_ATTEMPTS && is_conflict(&err) => {
                tracing::debug!(error = %Report(&err), attempt, "write transaction conflicted; running it again");
                attempt += 1;
            }
            outcome => return outcome,
        }
    }
}

/// A transaction PostgreSQL rolled back to break a deadlock or a
/// serialization conflict: running it again may succeed.
fn is_conflict(err: &tokio_postgres::Error) -> bool {
    matches!(
        err.code(),
        Some(&SqlState::T_R_DEADLOCK_DETECTED | &SqlState::T_R_SERIALIZATION_FAILURE)
    )
}

/// Each user's create as `packed::element` encodes it, for the statement
/// that stores creates to concatenate those it stores.
pub(super) fn packed_each(users: &[&User]) -> Vec<Vec<u8>> {
    users
        .iter()
        .map(|user| {
            let mut element = Vec::with_capacity(PACKED_SIZE_HINT);
            packed::element(ChangeKind::Created, user, &mut element);
            element
        })
        .collect()
}

/// Room for a typical user's packed create (its fields are at most 4 x 256
/// bytes; most are a few dozen): one allocation each.
pub(super) const PACKED_SIZE_HINT: usize = 96;

/// A batch of creates only, as one statement: its own transaction.
async fn create_only(
    client: &mut Client,
    statements: &Statements,
    announce: &Announce,
    users: &[&User],
) -> Result<BatchResults, tokio_postgres::Error> {
    let notify: Vec<&(dyn ToSql + Sync)> = match &announce.channel {
        Some(channel) => vec![channel, &announce.prefix],
        None => Vec::new(),
    };
    let rows = if users.len() >= COPY_MIN_ROWS {
        if let Some(base) =
            copy::copy_new(client, &statements.copy, &statements.log, announce, users).await?
        {
            return Ok(users
                .iter()
                .zip(base + 1..)
                .map(|(user, seq)| {
                    Ok(Change {
                        seq,
                        kind: ChangeKind::Created,
                        user: (*user).clone(),
                    })
                })
                .collect());
        }
        let tx = client.transaction().await?;
        copy::stage(&tx, &statements.copy, users).await?;
        let rows = tx.query(&statements.create_staged, &notify).await?;
        tx.commit().await?;
        rows
    } else {
        let column = |field: fn(&User) -> &str| users.iter().map(|u| field(u)).collect::<Vec<_>>();
        let (ids, firsts, lasts, addresses) = (
            column(User::id),
            column(User::first_name),
            column(User::last_name),
            column(User::address),
        );
        let verified: Vec<bool> = users.iter().map(|u| u.verified()).collect();
        let packed = packed_each(users);
        let mut params: Vec<&(dyn ToSql + Sync)> =
            vec![&ids, &firsts, &lasts, &addresses, &verified, &packed];
        params.extend(notify);
        // Outside a transaction: the statement is one, committed on its own.
        client.query(&statements.create_all, &params).await?
    };
    let mut seqs = vec![None; users.len()];
    for row in rows {
        let n: i64 = row.try_get(0)?;
        let seq: i64 = row.try_get(1)?;
        seqs[n as usize - 1] = Some(seq as u64);
    }
    Ok(users
        .iter()
        .zip(seqs)
        .map(|(user, seq)| match seq {
            Some(seq) => Ok(Change {
                seq,
                kind: ChangeKind::Created,
                user: (*user).clone(),
            }),
            None => Err(StoreError::AlreadyExists(user.id().to_owned())),
        })
        .collect())
}

async fn apply_once(
    client: &mut Client,
    statements: &Statements,
    announce: &Announce,
    batch: &Batch,
) -> Result<BatchResults, tokio_postgres::Error> {
    let tx = client.transaction().await?;
    let mut changes = Changes::default();
    let mut outcomes: Vec<Result<usize, StoreError>> = Vec::with_capacity(batch.len());
    let mut ops = batch.ops().peekable();
    while let Some(op) = ops.next() {
        match op {
            PreparedOp::Create(first) => {
                // This create and those right after it, as one statement.
                let mut run = vec![first];
                while let Some(PreparedOp::Create(user)) = ops.peek() {
                    run.push(user);
                    ops.next();
                }
                create_run(&tx, statements, &run, &mut changes, &mut outcomes).await?;
            }
            PreparedOp::Upsert {
                user,
                expected_version,
            } => {
                let outcome = upsert(&tx, statements, user, *expected_version).await?;
                outcomes.push(outcome.map(|(kind, user)| changes.push(kind, user)));
            }
            PreparedOp::Delete {
                id,
                expected_version,
            } => {
                let outcome = delete(&tx, statements, id, *expected_version).await?;
                outcomes.push(outcome.map(|user| changes.push(ChangeKind::Deleted, user)));
            }
        }
    }
    let base = if changes.is_empty() {
        0
    } else {
        changes.log(&tx, statements, announce).await?
    };
    tx.commit().await?;
    Ok(changes.results(base, outcomes))
}

/// Creates each user of `run` (creates among other ops) whose id is free,
/// in order.
async fn create_run(
    tx: &Transaction<'_>,
    statements: &Statements,
    run: &[&User],
    changes: &mut Changes,
    outcomes: &mut Vec<Result<usize, StoreError>>,
) -> Result<(), tokio_postgres::Error> {
    let mut stored: std::collections::HashSet<String> = {
        let column = |field: fn(&User) -> &str| run.iter().map(|u| field(u)).collect::<Vec<_>>();
        let verified: Vec<bool> = run.iter().map(|u| u.verified()).collect();
        tx.query(
            &statements.insert_new,
            &[
                &column(User::id),
                &column(User::first_name),
                &column(User::last_name),
                &column(User::address),
                &verified,
            ],
        )
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect()
    };
    for user in run {
        // The first of equal ids was stored; any other is refused.
        outcomes.push(if stored.remove(user.id()) {
            Ok(changes.push(ChangeKind::Created, (*user).clone()))
        } else {
            Err(StoreError::AlreadyExists(user.id().to_owned()))
        });
    }
    Ok(())
}

/// Stores `user` at version 1 if its id is free, or replaces the stored user
/// at the next version; the stored version must match `expected_version`.
async fn upsert(
    tx: &Transaction<'_>,
    statements: &Statements,
    user: &User,
    expected_version: Option<u64>,
) -> Result<Result<(ChangeKind, User), StoreError>, tokio_postgres::Error> {
    // Twice at most: a user another replica created after the first look
    // is locked and looked at again.
    for _ in 0..2 {
        let stored: Option<i64> = tx
            .query_opt(&statements.version_of, &[&user.id()])
            .await?
            .map(|row| row.get(0));
        let stored = stored.map(|v| v as u64);
        if let Err(err) = check_version(expected_version, stored.unwrap_or(0)) {
            return Ok(Err(err));
        }
        match stored {
            None => {
                let inserted = tx
                    .execute(
                        &statements.insert,
                        &[
                            &user.id(),
                            &user.first_name(),
                            &user.last_name(),
                            &user.address(),
                            &user.verified(),
                        ],
                    )
                    .await?;
                if inserted == 1 {
                    return Ok(Ok((ChangeKind::Created, user.clone())));
                }
            }
            Some(version) => {
                let updated = user.clone().with_version(version + 1);
                tx.execute(
                    &statements.update,
                    &[
                        &updated.id(),
                        &updated.first_name(),
                        &updated.last_name(),
                        &updated.address(),
                        &updated.verified(),
                        &(updated.version() as i64),
                    ],
                )
                .await?;
                return Ok(Ok((ChangeKind::Updated, updated)));
            }
        }
    }
    // Created and deleted again under our feet twice: a conflict like a
    // deadlock, for the caller to retry.
    Ok(Err(StoreError::Unavailable(format!(
        "user {:?} kept changing while it was being written",
        user.id()
    ))))
}

/// Removes the user `id`; its version must match `expected_version`.
async fn delete(
    tx: &Transaction<'_>,
    statements: &Statements,
    id: &str,
    expected_version: Option<u64>,
) -> Result<Result<User, StoreError>, tokio_postgres::Error> {
    let Some(row) = tx.query_opt(&statements.user_of, &[&id]).await? else {
        return Ok(Err(StoreError::NotFound(id.to_owned())));
    };
    // Its change would carry the user as it was: a row that cannot be read
    // is not deleted, and the other ops go on.
    let user = match rows::user(&row) {
        Ok(user) => user,
        Err(unreadable) => return Ok(Err(unreadable)),
    };
    if let Err(err) = check_version(expected_version, user.version()) {
        return Ok(Err(err));
    }
    tx.execute(&statements.delete, &[&id]).await?;
    Ok(Ok(user))
}

/// The changes a transaction makes, in order, waiting for their seqs.
#[derive(Default)]
struct Changes {
    changes: Vec<(ChangeKind, User)>,
}

impl Changes {
    /// Adds a change; returns its place among them.
    fn push(&mut self, kind: ChangeKind, user: User) -> usize {
        self.changes.push((kind, user));
        self.changes.len() - 1
    }

    fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }

    /// Takes the next seqs from the counter row and appends the changes to
    /// the changelog, packed as one batch; returns the seq before the first
    /// of them.
    async fn log(
        &self,
        tx: &Transaction<'_>,
        statements: &Statements,
        announce: &Announce,
    ) -> Result<u64, tokio_postgres::Error> {
        let n = self.changes.len() as i64;
        let changes = packed::batch(self.changes.iter().map(|(kind, user)| (*kind, user)));
        let row = match &announce.channel {
            Some(channel) => {
                tx.query_one(&statements.log, &[&n, &changes, channel, &announce.prefix])
                    .await?
            }
            None => tx.query_one(&statements.log, &[&n, &changes]).await?,
        };
        let base: i64 = row.try_get(0)?;
        Ok(base as u64)
    }

    /// Each op's result, its change numbered from `base + 1`.
    fn results(self, base: u64, outcomes: Vec<Result<usize, StoreError>>) -> BatchResults {
        let mut changes: Vec<Option<(ChangeKind, User)>> =
            self.changes.into_iter().map(Some).collect();
        outcomes
            .into_iter()
            .map(|outcome| {
                outcome.map(|index| {
                    let (kind, user) = changes[index].take().expect("each change used once");
                    Change {
                        seq: base + index as u64 + 1,
                        kind,
                        user,
                    }
                })
            })
            .collect()
    }
}
