//! The shared user store: the [`Store`] trait every backend implements, its
//! errors, and the change feed. Two backends: [`MemoryStore`] (lost on exit)
//! and [`SqliteStore`] (durable, the server's default).
//!
//! The RPC code only sees this trait, so a backend can be swapped without
//! touching it. Callers validate input first (see `validate`); a store trusts
//! that ids and fields follow the rules.

mod feed;
mod memory;
pub mod sqlite;

use std::future::Future;

use uuid::Uuid;

pub use feed::{ChangeFeed, Subscription};
pub use memory::MemoryStore;
pub use sqlite::SqliteStore;

use crate::user::{Change, NewUser, User};

/// Why a store operation did not happen. A failed operation changes nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("user {0:?} already exists")]
    AlreadyExists(String),
    #[error("user {0:?} not found")]
    NotFound(String),
    /// The caller expected one version and the store holds another
    /// (`actual` is 0 when no such user exists).
    #[error("expected version {expected}, stored version is {actual}")]
    VersionMismatch { expected: u64, actual: u64 },
    /// The backend has no room for the write (a full disk); other writes
    /// may succeed once room is made. The text is for logs, not for clients.
    #[error("storage full: {0}")]
    Full(String),
    /// The backend failed. The text is for logs, not for clients.
    #[error("storage failure: {0}")]
    Internal(String),
}

/// Builds the user a create stores: `user` with its own id, or a new
/// server-assigned one when `user.id` is empty. Shared by every backend, so
/// that ids look and sort the same whatever the store.
pub(crate) fn prepare_user(user: &NewUser, version: u64) -> User {
    if user.id.is_empty() {
        // UUIDv7 is time-ordered and the `uuid` crate keeps a counter so
        // that ids made in the same millisecond still increase; the
        // lowercase text form sorts like the bytes.
        let mut buf = Uuid::encode_buffer();
        let id = Uuid::now_v7().hyphenated().encode_lower(&mut buf);
        User::new(id, user, version)
    } else {
        User::new(&user.id, user, version)
    }
}

/// Checks an op's `expected_version` against the stored version (0 when
/// there is no such user).
pub(crate) fn check_version(expected: Option<u64>, actual: u64) -> Result<(), StoreError> {
    match expected {
        Some(expected) if expected != actual => {
            Err(StoreError::VersionMismatch { expected, actual })
        }
        _ => Ok(()),
    }
}

/// Which users a listing returns.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ListFilter {
    /// `Some(v)`: only users whose `verified` equals `v`.
    pub verified: Option<bool>,
}

impl ListFilter {
    pub fn matches(&self, user: &User) -> bool {
        self.verified.is_none_or(|v| user.verified() == v)
    }
}

/// One page of a listing.
#[derive(Debug, Default)]
pub struct Page {
    /// Matching users in ascending id order.
    pub users: Vec<User>,
    /// Where the next page starts (strictly after this id), or `None` when the
    /// listing has reached the end. It can be past the last user returned:
    /// users the filter skipped are not scanned again.
    pub next_after: Option<String>,
}

/// One write of a sequence given to [`Store::apply_many`].
#[derive(Debug, Clone, PartialEq)]
pub enum WriteOp {
    /// As [`Store::upsert`].
    Upsert {
        user: NewUser,
        expected_version: Option<u64>,
    },
    /// As [`Store::delete`].
    Delete {
        id: String,
        expected_version: Option<u64>,
    },
}

/// A user store shared by every call.
///
/// Every write is atomic: it commits completely, with the next seq, and is
/// published to the change feed in commit order, or it fails and commits
/// nothing. Implementations are cheap-to-clone handles.
pub trait Store: Clone + Send + Sync + Unpin + 'static {
    /// Stores a new user with version 1, assigning a UUIDv7 when `user.id` is
    /// empty. An id already stored is [`StoreError::AlreadyExists`].
    fn create(&self, user: NewUser) -> impl Future<Output = Result<Change, StoreError>> + Send;

    /// Creates each user in order, as [`Store::create`] would one by one, and
    /// returns one result per user. Backends commit the batch together where
    /// they can, which is what makes bulk import fast.
    fn create_many(
        &self,
        users: Vec<NewUser>,
    ) -> impl Future<Output = Vec<Result<Change, StoreError>>> + Send;

    /// Creates or replaces a user. Replacing bumps the version; an empty id
    /// creates a user with a new id. With `expected_version` set, the stored
    /// version (0 when there is none) must equal it.
    fn upsert(
        &self,
        user: NewUser,
        expected_version: Option<u64>,
    ) -> impl Future<Output = Result<Change, StoreError>> + Send;

    /// Deletes a user. With `expected_version` set, the stored version must
    /// equal it.
    fn delete(
        &self,
        id: &str,
        expected_version: Option<u64>,
    ) -> impl Future<Output = Result<Change, StoreError>> + Send;

    /// Applies each op in order, as [`Store::upsert`] and [`Store::delete`]
    /// would one after the other, and returns one result per op. Backends
    /// override it to share work between the ops: the memory store takes its
    /// lock once, the SQLite store queues every op before it waits for the
    /// first, so that they share commits (SyncUsers hands over the requests
    /// of a stream that arrived together this way).
    fn apply_many(
        &self,
        ops: Vec<WriteOp>,
    ) -> impl Future<Output = Vec<Result<Change, StoreError>>> + Send {
        async move {
            let mut results = Vec::with_capacity(ops.len());
            for op in ops {
                results.push(match op {
                    WriteOp::Upsert {
                        user,
                        expected_version,
                    } => self.upsert(user, expected_version).await,
                    WriteOp::Delete {
                        id,
                        expected_version,
                    } => self.delete(&id, expected_version).await,
                });
            }
            results
        }
    }

    /// Reads one user.
    fn get(&self, id: &str) -> impl Future<Output = Result<User, StoreError>> + Send;

    /// Reads up to `max` users matching `filter` with ids strictly after
    /// `after` (from the start when `None`), in ascending id order.
    ///
    /// Each call is short: a listing is a sequence of pages, so that no lock
    /// or transaction is held while a client reads slowly.
    fn list_page(
        &self,
        filter: ListFilter,
        after: Option<&str>,
        max: usize,
    ) -> impl Future<Output = Result<Page, StoreError>> + Send;

    /// Subscribes to every change committed from now on.
    fn subscribe(&self) -> Subscription;
}
