//! Long batches of creates (BulkAddUsers batches, several streams' batches
//! committed together) through binary `COPY`.
//!
//! First the direct way: when the batch's ids are distinct, its users are
//! copied straight into `users`, and their changes, packed as one batch
//! (see `packed`), appended to the changelog with the seqs the counter row
//! hands out by the statement every write transaction ends with (see
//! `apply`), in one transaction.
//! `COPY` writes a table at about twice the rate of the `INSERT ... ON
//! CONFLICT` that must find out which ids are free. An id already stored
//! fails the copy as a whole (a unique violation): the transaction is
//! rolled back, and the batch goes the careful way.
//!
//! The careful way: the rows are copied into a temporary staging table of
//! the writer's connection, numbered in their order; then the statement
//! that stores a batch of creates (see `apply`) reads them from there
//! instead of from arrays (each row with its change packed beside it): it
//! stores those whose id is free, takes their seqs, appends their changes,
//! and says which rows were stored. The staging
//! table empties itself at every commit (`ON COMMIT DELETE ROWS`).

use std::{collections::HashSet, pin::pin};

use tokio_postgres::{
    Client, Statement, Transaction,
    binary_copy::BinaryCopyInWriter,
    error::SqlState,
    types::{ToSql, Type},
};

use super::{
    apply::{PACKED_SIZE_HINT, packed_each},
    packed,
    tailer::Announce,
};
use crate::user::{ChangeKind, User};

/// Batches of at least this many creates go through `COPY`; smaller ones
/// send their rows as arrays, in the statement itself, which needs no
/// transaction around it (one round trip, where `COPY` takes several). See
/// BENCHMARKS.md for how they compare.
pub(super) const COPY_MIN_ROWS: usize = 256;

pub(super) struct Statements {
    stage: Statement,
    users: Statement,
}

impl Statements {
    /// Creates the connection's staging table and prepares the statements.
    pub(super) async fn prepare(client: &Client) -> Result<Self, tokio_postgres::Error> {
        client
            .batch_execute(
                "CREATE TEMPORARY TABLE IF NOT EXISTS user_import (
                     ord integer NOT NULL,
                     id text NOT NULL,
                     first_name text NOT NULL,
                     last_name text NOT NULL,
                     address text NOT NULL,
                     verified boolean NOT NULL,
                     packed bytea NOT NULL
                 ) ON COMMIT DELETE ROWS",
            )
            .await?;
        Ok(Statements {
            stage: client
                .prepare(
                    "COPY user_import (ord, id, first_name, last_name, address, verified,
                         packed)
                     FROM STDIN (FORMAT binary)",
                )
                .await?,
            users: client
                .prepare(
                    "COPY users (id, first_name, last_name, address, verified, version)
                     FROM STDIN (FORMAT binary)",
                )
                .await?,
        })
    }
}

/// The direct way: stores every user of `users` and their changes (`log`
/// appends them, see `apply`); returns the seq before the first, or `None`
/// (nothing written) if an id was taken or repeated.
pub(super) async fn copy_new(
    client: &mut Client,
    statements: &Statements,
    log: &Statement,
    announce: &Announce,
    users: &[&User],
) -> Result<Option<u64>, tokio_postgres::Error> {
    let mut ids = HashSet::with_capacity(users.len());
    if !users.iter().all(|user| ids.insert(user.id())) {
        return Ok(None);
    }
    let tx = client.transaction().await?;
    // The changes are packed while PostgreSQL inserts the rows sent before:
    // the writer's commit waits for neither on its own.
    let copied = async {
        let sink = tx.copy_in(&statements.users).await?;
        let mut writer = pin!(BinaryCopyInWriter::new(sink, &USER_COLUMNS));
        let mut changes = Vec::with_capacity(users.len() * PACKED_SIZE_HINT);
        for user in users {
            let row: [&(dyn ToSql + Sync); 6] = [
                &user.id(),
                &user.first_name(),
                &user.last_name(),
                &user.address(),
                &user.verified(),
                &1i64,
            ];
            writer.as_mut().write(&row).await?;
            packed::element(ChangeKind::Created, user, &mut changes);
        }
        writer.finish().await?;
        Ok::<_, tokio_postgres::Error>(changes)
    };
    let changes = match copied.await {
        Err(err) if err.code() == Some(&SqlState::UNIQUE_VIOLATION) => return Ok(None),
        other => other?,
    };
    // The counter last, as in every write transaction (see `apply`).
    let n = users.len() as i64;
    let row = match &announce.channel {
        Some(channel) => {
            tx.query_one(log, &[&n, &changes, channel, &announce.prefix])
                .await?
        }
        None => tx.query_one(log, &[&n, &changes]).await?,
    };
    let base: i64 = row.try_get(0)?;
    tx.commit().await?;
    Ok(Some(base as u64))
}

/// The columns `COPY` writes to `users`.
const USER_COLUMNS: [Type; 6] = [
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::BOOL,
    Type::INT8,
];

/// The columns `COPY` writes to the staging table.
const STAGE_COLUMNS: [Type; 7] = [
    Type::INT4,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::BOOL,
    Type::BYTEA,
];

/// The careful way's first step: copies `users` into the staging table,
/// numbered from 1 in their order, each with its change packed.
pub(super) async fn stage(
    tx: &Transaction<'_>,
    statements: &Statements,
    users: &[&User],
) -> Result<(), tokio_postgres::Error> {
    let sink = tx.copy_in(&statements.stage).await?;
    let mut writer = pin!(BinaryCopyInWriter::new(sink, &STAGE_COLUMNS));
    let packed = packed_each(users);
    for ((ord, user), packed) in (1i32..).zip(users).zip(&packed) {
        let row: [&(dyn ToSql + Sync); 7] = [
            &ord,
            &user.id(),
            &user.first_name(),
            &user.last_name(),
            &user.address(),
            &user.verified(),
            packed,
        ];
        writer.as_mut().write(&row).await?;
    }
    writer.finish().await?;
    Ok(())
}
