//! Reads: a few read-only connections, each read one statement.
//!
//! Reads never go through the writer. Each runs on one of a few read-only
//! connections, on tokio's blocking threads, as one statement: in WAL mode
//! that is a snapshot of the last commit, taken without waiting for the
//! writer and without blocking it. A listing is a sequence of such pages,
//! each one short query resuming after the previous page's last id.

use std::{fmt, path::Path, sync::Arc};

use parking_lot::Mutex;
use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::Semaphore;

use super::{open::open_reader, schema::read_seq};
use crate::{
    store::{
        ListFilter, Page, StoreError,
        page::PageScan,
        stored::{self, Columns},
    },
    user::User,
};

/// Reads running at once, each on one connection and one blocking thread.
/// A couple of cores serve no more; the bound keeps a burst of GetUser and
/// ListUsers calls from opening connections and threads without limit.
pub const MAX_READERS: usize = 8;

/// The columns [`user_from_row`] reads, for one id.
pub(super) const SELECT_USER: &str =
    "SELECT id, first_name, last_name, address, verified, version FROM users WHERE id = ?1";

/// The read-only connections, reused between reads.
pub(super) struct Readers {
    path: Arc<Path>,
    /// Idle connections. A blocking lock, held only to push or pop one.
    idle: Arc<Mutex<Vec<Connection>>>,
    /// At most [`MAX_READERS`] reads run at once; closed with the store.
    permits: Arc<Semaphore>,
}

impl fmt::Debug for Readers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Readers")
            .field("path", &self.path)
            .field("idle", &self.idle.lock().len())
            .finish()
    }
}

impl Readers {
    pub(super) fn new(path: &Path) -> Self {
        Readers {
            path: path.into(),
            idle: Arc::new(Mutex::new(Vec::new())),
            permits: Arc::new(Semaphore::new(MAX_READERS)),
        }
    }

    pub(super) async fn get(&self, id: &str) -> Result<User, StoreError> {
        let key = id.to_owned();
        let user = self
            .run(move |conn| {
                conn.prepare_cached(SELECT_USER)?
                    .query_row([&key], |row| Ok(user_from_row(row)))
                    .optional()
            })
            .await?;
        user.unwrap_or_else(|| Err(StoreError::NotFound(id.to_owned())))
    }

    pub(super) async fn list_page(
        &self,
        filter: ListFilter,
        after: Option<&str>,
        max: usize,
    ) -> Result<Page, StoreError> {
        // Every id is non-empty, so "after the empty string" is the start.
        let after = after.unwrap_or("").to_owned();
        self.run(move |conn| list_page(conn, filter, &after, max))
            .await?
    }

    pub(super) async fn last_seq(&self) -> Result<u64, StoreError> {
        self.run(read_seq).await
    }

    pub(super) async fn count(&self) -> Result<u64, StoreError> {
        self.run(|conn| {
            conn.query_row("SELECT count(*) FROM users", [], |row| row.get::<_, i64>(0))
                .map(|n| n as u64)
        })
        .await
    }

    /// Runs `read` on a read connection, on a blocking thread. A failure is
    /// logged here, with what failed.
    ///
    /// If the caller goes away (a cancelled listing), the read already
    /// started finishes (one short statement) and its result is dropped.
    async fn run<T, F>(&self, read: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| StoreError::Internal("the store is closed".into()))?;
        let (path, idle) = (self.path.clone(), self.idle.clone());
        let read = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let popped = idle.lock().pop();
            let conn = match popped {
                Some(conn) => conn,
                None => open_reader(&path)?,
            };
            let result = read(&conn);
            idle.lock().push(conn);
            result
        })
        .await;
        let failure = match read {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(err)) => format!("SQLite read failed: {err}"),
            Err(err) => format!("SQLite read task failed: {err}"),
        };
        tracing::error!(path = %self.path.display(), "{failure}");
        Err(StoreError::Internal(failure))
    }

    /// Waits for the reads under way, then closes every connection; later
    /// reads fail. A read-only connection cannot remove the write-ahead log,
    /// so the writer's must close after these.
    pub(super) async fn close(&self) {
        if let Ok(all) = self.permits.acquire_many(MAX_READERS as u32).await {
            self.permits.close();
            self.idle.lock().clear();
            drop(all);
        }
    }
}

/// One listing page: a single statement, so a single WAL snapshot.
///
/// Reads users in id order after `after`, at most what the page may look
/// at and one more (see [`PageScan`]), and builds only the users that
/// match.
///
/// The outer error is SQLite's (the read failed); the inner one is the
/// page's, for a row that cannot be read (see [`PageScan::offer`]).
fn list_page(
    conn: &Connection,
    filter: ListFilter,
    after: &str,
    max: usize,
) -> rusqlite::Result<Result<Page, StoreError>> {
    let mut scan = PageScan::new(filter, max);
    let mut statement = conn.prepare_cached(
        "SELECT id, first_name, last_name, address, verified, version
         FROM users WHERE id > ?1 ORDER BY id LIMIT ?2",
    )?;
    let mut rows = statement.query(params![after, scan.read_limit() as i64])?;
    while let Some(row) = rows.next()? {
        let id = String::from_utf8_lossy(row.get_ref(0)?.as_bytes()?);
        let offered = scan.offer(&id, row.get(4)?, || user_from_row(row));
        match offered {
            Ok(true) => {}
            Ok(false) => break,
            Err(err) => return Ok(Err(err)),
        }
    }
    Ok(Ok(scan.finish()))
}

/// Builds a user from `id, first_name, last_name, address, verified,
/// version`, or says why the row holds none (see [`stored`]): the text is
/// read in place and copied once, into the user.
///
/// The TEXT columns' constraints bound their length, but SQLite stores any
/// bytes as TEXT: a shell can write text that is not UTF-8, which only
/// shows here.
pub(super) fn user_from_row(row: &rusqlite::Row<'_>) -> Result<User, StoreError> {
    const NAMES: [&str; 4] = ["id", "first_name", "last_name", "address"];
    let bytes = |index: usize| -> Result<&[u8], String> {
        row.get_ref(index)
            .and_then(|value| Ok(value.as_bytes()?))
            .map_err(|err| format!("{}: {err}", NAMES[index]))
    };
    let text = |index: usize| -> Result<&str, String> {
        std::str::from_utf8(bytes(index)?)
            .map_err(|err| format!("{}: not valid UTF-8 ({err})", NAMES[index]))
    };
    let columns = || -> Result<Columns<'_>, String> {
        Ok(Columns {
            text: [text(0)?, text(1)?, text(2)?, text(3)?],
            verified: row.get(4).map_err(|err| format!("verified: {err}"))?,
            version: row.get(5).map_err(|err| format!("version: {err}"))?,
        })
    };
    columns().and_then(stored::user).map_err(|detail| {
        let id = bytes(0).map(String::from_utf8_lossy).unwrap_or_default();
        stored::unreadable(&id, detail)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        store::{
            Store, StoreExt,
            page::{MAX_SCAN_PER_PAGE, tests::a_page_ends_exactly_at_the_end_of_the_table},
            sqlite::{BUSY_TIMEOUT, tests::open_new},
            tests::named,
        },
        user::NewUser,
    };

    fn ids(page: &Page) -> Vec<&str> {
        page.users.iter().map(|u| u.id()).collect()
    }

    #[tokio::test]
    async fn listing_pages_follow_id_order_and_the_filter() {
        let (store, _, _dir) = open_new();
        let users = (0..10)
            .map(|i| NewUser {
                verified: i % 2 == 0,
                ..named(&format!("u{i}"), "N")
            })
            .collect();
        store.create_many(users).await;
        let page = store
            .list_page(ListFilter::default(), None, 4)
            .await
            .unwrap();
        assert_eq!(ids(&page), ["u0", "u1", "u2", "u3"]);
        assert_eq!(page.next_after.as_deref(), Some("u3"));
        let verified = ListFilter {
            verified: Some(true),
        };
        let page = store.list_page(verified, Some("u3"), 100).await.unwrap();
        assert_eq!(ids(&page), ["u4", "u6", "u8"]);
        assert_eq!(page.next_after, None);
        let page = store.list_page(verified, Some("u3"), 2).await.unwrap();
        assert_eq!(ids(&page), ["u4", "u6"]);
        assert_eq!(page.next_after.as_deref(), Some("u6"));
    }

    #[tokio::test]
    async fn a_filter_that_matches_few_users_reads_bounded_pages() {
        let (store, _, _dir) = open_new();
        // One verified user, after more unverified ones than a page reads.
        let mut users: Vec<NewUser> = (0..MAX_SCAN_PER_PAGE + 10)
            .map(|i| named(&format!("u{i:06}"), "N"))
            .collect();
        users.push(NewUser {
            verified: true,
            ..named("v", "V")
        });
        store.create_many(users).await;
        let verified = ListFilter {
            verified: Some(true),
        };
        let first = store.list_page(verified, None, 100).await.unwrap();
        assert!(first.users.is_empty());
        let resume = format!("u{:06}", MAX_SCAN_PER_PAGE - 1);
        assert_eq!(first.next_after.as_deref(), Some(resume.as_str()));
        let second = store.list_page(verified, Some(&resume), 100).await.unwrap();
        assert_eq!(ids(&second), ["v"]);
        assert_eq!(second.next_after, None);
    }

    #[tokio::test]
    async fn a_page_that_reaches_the_last_user_ends_the_listing() {
        let (store, _, _dir) = open_new();
        a_page_ends_exactly_at_the_end_of_the_table(store).await;
    }

    #[tokio::test]
    async fn reads_do_not_wait_for_a_blocked_writer() {
        let (store, path, _dir) = open_new();
        store.create(named("a", "Ann")).await.unwrap();
        // Another connection takes the write lock: the writer's next
        // transaction waits for it.
        let blocker = Connection::open(&path).unwrap();
        blocker.execute_batch("BEGIN IMMEDIATE").unwrap();
        let write = tokio::spawn({
            let store = store.clone();
            async move { store.create(named("b", "Bob")).await }
        });
        let reads = async {
            let ann = store.get("a").await.unwrap();
            let page = store
                .list_page(ListFilter::default(), None, 10)
                .await
                .unwrap();
            (ann, page)
        };
        let (ann, page) = tokio::time::timeout(BUSY_TIMEOUT / 2, reads)
            .await
            .expect("reads finish while the writer waits");
        assert_eq!(ann.first_name(), "Ann");
        assert_eq!(page.users.len(), 1, "the pending write is not visible");
        assert!(!write.is_finished());
        blocker.execute_batch("ROLLBACK").unwrap();
        let change = write.await.unwrap().unwrap();
        assert_eq!(change.seq, 2);
    }
}
