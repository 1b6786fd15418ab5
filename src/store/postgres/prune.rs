//! Pruning the changelog: it keeps the last `keep` changes and those of the
//! last `keep_for`, whichever are fewer; older ones are deleted. A row holds
//! a commit's changes (see `schema`): it is deleted whole, once its last
//! change is past both bounds, so a batch is never cut and a tailer that
//! finds the next batch missing knows every change of it was pruned.
//!
//! The changelog is what tailers read, a moment after each commit: it only
//! has to reach back as far as a replica may fall behind (a replica cut off
//! from the database, then back). A replica whose next change was pruned
//! ends its SyncUsers streams with ABORTED (see `tailer`), so the bounds
//! are how long and how far a replica may be away and have its streams go
//! on. Every replica prunes; deleting what another replica deleted a moment
//! before is no work.

use std::time::Duration;

use deadpool_postgres::Pool;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::connect::{Report, STATEMENT_TIMEOUT, pool_error};

/// Most changelog rows (commits' batches) deleted by one statement: keeps
/// each delete (and what it locks and logs) short. A round goes on until it
/// deletes fewer.
pub const PRUNE_BATCH: i64 = 10_000;

/// How much of the changelog to keep, and how often to prune it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Keep at most this many of the latest changes...
    pub keep: u64,
    /// ...and none older than this.
    pub keep_for: Duration,
    /// Prune this often.
    pub every: Duration,
}

/// The defaults: a million changes (a few hundred MB at most) or an hour,
/// pruned every ten seconds. A replica can then be cut off from the
/// database for many minutes, or fall a bulk import behind, and have its
/// streams go on.
pub const DEFAULT_RETENTION: Retention = Retention {
    keep: 1_000_000,
    keep_for: Duration::from_secs(60 * 60),
    every: Duration::from_secs(10),
};

/// Deletes the batches of changes past `retention`; returns how many rows.
pub(super) async fn prune(
    client: &deadpool_postgres::Client,
    retention: Retention,
) -> Result<u64, tokio_postgres::Error> {
    // The oldest batches at most PRUNE_BATCH at a time, found by the
    // primary key: no scan of the whole changelog to find a few to delete.
    // Neither reads the packed changes.
    let statement = client
        .prepare_cached(
            "WITH oldest AS (
                 SELECT last_seq, committed_at FROM user_change_batches
                 ORDER BY last_seq LIMIT $3
             )
             DELETE FROM user_change_batches c USING oldest
             WHERE c.last_seq = oldest.last_seq
               AND (oldest.last_seq <= (SELECT seq FROM user_change_seq) - $1
                    OR oldest.committed_at < now() - make_interval(secs => $2))",
        )
        .await?;
    let keep = i64::try_from(retention.keep).unwrap_or(i64::MAX);
    let keep_for = retention.keep_for.as_secs_f64();
    let mut deleted = 0;
    loop {
        let n = client
            .execute(&statement, &[&keep, &keep_for, &PRUNE_BATCH])
            .await?;
        deleted += n;
        if (n as i64) < PRUNE_BATCH {
            return Ok(deleted);
        }
    }
}

/// Prunes every `retention.every` until cancelled; a failure (the database
/// away) is logged and tried again next time.
pub(super) fn spawn(
    pool: Pool,
    retention: Retention,
    closing: CancellationToken,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut every = tokio::time::interval(retention.every);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = closing.cancelled() => return,
                _ = every.tick() => {}
            }
            let round = async {
                let client = pool
                    .get()
                    .await
                    .map_err(|err| pool_error(err).to_string())?;
                prune(&client, retention)
                    .await
                    .map_err(|err| Report(&err).to_string())
            };
            match tokio::time::timeout(STATEMENT_TIMEOUT * 6, round).await {
                Ok(Ok(0)) => {}
                Ok(Ok(deleted)) => tracing::debug!(deleted, "pruned the changelog"),
                Ok(Err(err)) => tracing::debug!(error = %err, "pruning the changelog failed"),
                Err(_) => tracing::debug!("pruning the changelog timed out"),
            }
        }
    })
}
