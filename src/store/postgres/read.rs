//! Reads: GetUser and listing pages, each one statement on a pooled
//! connection, never through the writer.
//!
//! A listing is a sequence of pages, each one short query resuming after the
//! previous page's last id by the primary key's index: no transaction is
//! held across pages. A read that finds its pooled connection closed (the
//! server restarted, or ended it) is tried once more on a new one; reads
//! change nothing, so that is always safe.

use deadpool_postgres::Pool;

use super::{
    connect::{Report, STATEMENT_TIMEOUT, is_connection_loss, pool_error, store_error},
    rows,
};
use crate::{
    store::{ListFilter, Page, StoreError, page::PageScan},
    user::User,
};

const SELECT_USER: &str =
    "SELECT id, first_name, last_name, address, verified, version FROM users WHERE id = $1";

const SELECT_PAGE: &str = "SELECT id, first_name, last_name, address, verified, version
     FROM users WHERE id > $1 ORDER BY id LIMIT $2";

pub(super) async fn get(pool: &Pool, id: &str) -> Result<User, StoreError> {
    const WHAT: &str = "PostgreSQL read";
    for retry in [true, false] {
        let client = checkout(pool, WHAT).await?;
        let read = tokio::time::timeout(STATEMENT_TIMEOUT, async {
            let statement = client.prepare_cached(SELECT_USER).await?;
            client.query_opt(&statement, &[&id]).await
        })
        .await;
        let Some(row) = settle(WHAT, client, read, retry)? else {
            continue;
        };
        return match row {
            Some(row) => rows::user(&row),
            None => Err(StoreError::NotFound(id.to_owned())),
        };
    }
    unreachable!("the last try settles")
}

/// One listing page: reads users in id order after `after`, at most what the
/// page may look at and one more (see [`PageScan`]), and builds only those
/// that match.
pub(super) async fn list_page(
    pool: &Pool,
    filter: ListFilter,
    after: Option<&str>,
    max: usize,
) -> Result<Page, StoreError> {
    const WHAT: &str = "PostgreSQL listing";
    // Every id is non-empty, so "after the empty string" is the start.
    let after = after.unwrap_or("");
    let mut scan = PageScan::new(filter, max);
    let limit = scan.read_limit() as i64;
    for retry in [true, false] {
        let client = checkout(pool, WHAT).await?;
        let read = tokio::time::timeout(STATEMENT_TIMEOUT, async {
            let statement = client.prepare_cached(SELECT_PAGE).await?;
            client.query(&statement, &[&after, &limit]).await
        })
        .await;
        let Some(rows) = settle(WHAT, client, read, retry)? else {
            continue;
        };
        let failed = |err| store_error(WHAT, &err);
        for row in &rows {
            let id: &str = row.try_get(0).map_err(failed)?;
            let verified: bool = row.try_get(4).map_err(failed)?;
            if !scan.offer(id, verified, || rows::user(row))? {
                break;
            }
        }
        return Ok(scan.finish());
    }
    unreachable!("the last try settles")
}

/// A pooled connection, or why there is none (logged).
async fn checkout(pool: &Pool, what: &str) -> Result<deadpool_postgres::Object, StoreError> {
    pool.get().await.map_err(|err| {
        let err = pool_error(err);
        tracing::warn!(error = %err, "{what} failed");
        err
    })
}

/// What a read on `client` came to: its value, `None` to try once more on
/// another connection (this one was lost, and `retry` allows it), or the
/// error (logged here, with `what` failed).
fn settle<T>(
    what: &str,
    client: deadpool_postgres::Object,
    read: Result<Result<T, tokio_postgres::Error>, tokio::time::error::Elapsed>,
    retry: bool,
) -> Result<Option<T>, StoreError> {
    let err = match read {
        Ok(Ok(value)) => return Ok(Some(value)),
        Ok(Err(err)) if is_connection_loss(&err) => {
            // Not back into the pool.
            let _ = deadpool_postgres::Object::take(client);
            if retry {
                tracing::debug!(error = %Report(&err), "{what}: connection lost; trying another");
                return Ok(None);
            }
            store_error(what, &err)
        }
        Ok(Err(err)) => store_error(what, &err),
        Err(_) => {
            let _ = deadpool_postgres::Object::take(client);
            StoreError::Unavailable(format!("{what} timed out"))
        }
    };
    tracing::warn!(error = %err, "{what} failed");
    Err(err)
}
