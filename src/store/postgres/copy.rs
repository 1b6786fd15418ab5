//! Long runs of creates (a BulkAddUsers batch, several streams' batches
//! committed together) through binary `COPY`.
//!
//! The rows are copied into a temporary staging table of the writer's
//! connection, numbered in their order; then the statement that stores a
//! batch of creates (see `apply`) reads them from there instead of from
//! arrays: it stores those whose id is free, takes their seqs, appends
//! their changes, and says which rows were stored. The staging table
//! empties itself at every commit (`ON COMMIT DELETE ROWS`).

use std::pin::pin;

use tokio_postgres::{
    Client, Statement, Transaction, binary_copy::BinaryCopyInWriter, types::Type,
};

use crate::user::User;

/// Batches of at least this many creates go through `COPY`; smaller ones
/// send their rows as arrays, in the statement itself, which needs no
/// transaction around it (one round trip, where `COPY` takes four). See
/// BENCHMARKS.md for how the two compare.
pub(super) const COPY_MIN_ROWS: usize = 256;

pub(super) struct Statements {
    copy_in: Statement,
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
                     verified boolean NOT NULL
                 ) ON COMMIT DELETE ROWS",
            )
            .await?;
        Ok(Statements {
            copy_in: client
                .prepare(
                    "COPY user_import (ord, id, first_name, last_name, address, verified)
                     FROM STDIN (FORMAT binary)",
                )
                .await?,
        })
    }
}

/// Copies `users` into the staging table, numbered from 1 in their order.
pub(super) async fn stage(
    tx: &Transaction<'_>,
    statements: &Statements,
    users: &[&User],
) -> Result<(), tokio_postgres::Error> {
    let sink = tx.copy_in(&statements.copy_in).await?;
    let mut writer = pin!(BinaryCopyInWriter::new(
        sink,
        &[
            Type::INT4,
            Type::TEXT,
            Type::TEXT,
            Type::TEXT,
            Type::TEXT,
            Type::BOOL
        ],
    ));
    for (ord, user) in (1..).zip(users) {
        let ord: i32 = ord;
        writer
            .as_mut()
            .write(&[
                &ord,
                &user.id(),
                &user.first_name(),
                &user.last_name(),
                &user.address(),
                &user.verified(),
            ])
            .await?;
    }
    writer.finish().await?;
    Ok(())
}
