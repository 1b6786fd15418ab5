//! Long runs of creates (a BulkAddUsers batch, several streams' batches
//! committed together) through binary `COPY`.
//!
//! The rows are copied into a temporary staging table of the writer's
//! connection, in their order, then moved into `users` by one `INSERT ...
//! SELECT ... ON CONFLICT DO NOTHING RETURNING id`: an id that already
//! exists, or that came earlier in the run, is not stored, and the ids
//! returned say which were. The staging table empties itself at every
//! commit (`ON COMMIT DELETE ROWS`).

use std::{collections::HashSet, pin::pin};

use tokio_postgres::{
    Client, Statement, Transaction, binary_copy::BinaryCopyInWriter, types::Type,
};

use crate::user::User;

/// Runs of at least this many creates go through `COPY`; shorter ones are
/// one `INSERT` over arrays (see `apply`), which takes one round trip
/// fewer. See BENCHMARKS.md for how the two compare.
pub(super) const COPY_MIN_ROWS: usize = 256;

pub(super) struct Statements {
    copy_in: Statement,
    insert: Statement,
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
            insert: client
                .prepare(
                    "INSERT INTO users (id, first_name, last_name, address, verified, version)
                     SELECT id, first_name, last_name, address, verified, 1
                     FROM user_import ORDER BY ord
                     ON CONFLICT (id) DO NOTHING RETURNING id",
                )
                .await?,
        })
    }
}

/// Stores each user of `run` whose id is free (the first of equal ids);
/// returns the ids stored.
pub(super) async fn insert_new(
    tx: &Transaction<'_>,
    statements: &Statements,
    run: &[&User],
) -> Result<HashSet<String>, tokio_postgres::Error> {
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
    for (ord, user) in run.iter().enumerate() {
        let ord = ord as i32;
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
    Ok(tx
        .query(&statements.insert, &[])
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect())
}
