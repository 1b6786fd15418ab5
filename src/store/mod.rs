//! The shared user store: the [`Store`] trait every backend implements, its
//! errors, the ops it applies, and the change feed. Three backends:
//! [`MemoryStore`] (lost on exit), [`SqliteStore`] (durable, the server's
//! default) and [`PostgresStore`] (durable, one database shared by any
//! number of replicas of the server).
//!
//! The RPC code only sees this trait, so a backend can be swapped without
//! touching it. The trait is what backends do differently: one write of a
//! list of ops, reads, the feed, health, close and metrics; the writes the
//! service calls (create, upsert, delete, their batches) are built once on
//! top of it, in [`StoreExt`]. Callers validate input first (see
//! `validate`); a store trusts that what it is handed follows the rules,
//! but not what it reads back ([`stored`]).
//!
//! [`location`] reads where the store is, as `--store` names it. What
//! backends share lives here too: [`PreparedOp`] (a write with its user
//! built), the listing page rules ([`page`]), decoding stored rows
//! ([`stored`]), group commit
//! ([`group_commit`]): the queue, batching policy and reply path of a
//! durable backend whose writes go through one writer, and what its commits
//! add up to for the metrics ([`write_stats`]).

mod feed;
pub mod group_commit;
pub mod location;
mod memory;
pub mod page;
pub mod postgres;
pub mod sqlite;
pub mod stored;
pub mod write_stats;

use std::future::Future;

use prometheus_client::encoding::DescriptorEncoder;
use smallvec::{SmallVec, smallvec};
use tokio::sync::watch;
use uuid::Uuid;

pub use feed::{ChangeFeed, Changes, FeedError, Subscription, TryRecvError};
pub use location::{LocationError, StoreLocation};
pub use memory::MemoryStore;
pub use page::{ListFilter, Page};
pub use postgres::PostgresStore;
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
    /// may succeed once room is made. The text is for logs, not for clients;
    /// the store has logged the failure where it happened.
    #[error("storage full: {0}")]
    Full(String),
    /// The backend is out of reach (a database server that went away); the
    /// write may be retried once it is back. A write that failed this way
    /// in the middle of its commit may have committed: only an
    /// acknowledgement says that it did. The text is for logs.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    /// The backend failed. The text is for logs, not for clients; the store
    /// has logged the failure where it happened.
    #[error("storage failure: {0}")]
    Internal(String),
    /// The stored user `id` cannot be read back: its row breaks the rules
    /// every stored user follows (another program wrote it, see [`stored`]).
    /// `detail` says how, for logs; the store has logged it.
    #[error("stored user {id:?} cannot be read: {detail}")]
    Unreadable { id: String, detail: String },
}

/// Whether a store can take writes, as health checks should report it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreHealth {
    Serving,
    /// Every write fails until the cause is fixed (a writer that died, a
    /// database out of reach); the store has logged why.
    NotServing,
}

/// Builds the user a create stores, at version 1: `user` with its own id, or
/// a new server-assigned one when `user.id` is empty. Shared by every
/// backend, so that ids look and sort the same whatever the store.
pub(crate) fn prepare_user(user: &NewUser) -> User {
    if user.id.is_empty() {
        // UUIDv7 is time-ordered and the `uuid` crate keeps a counter so
        // that ids made in the same millisecond still increase; the
        // lowercase text form sorts like the bytes.
        let mut buf = Uuid::encode_buffer();
        let id = Uuid::now_v7().hyphenated().encode_lower(&mut buf);
        User::new(id, user, 1)
    } else {
        User::new(&user.id, user, 1)
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

/// One write of a sequence given to [`StoreExt::apply_many`].
#[derive(Debug, Clone, PartialEq)]
pub enum WriteOp {
    /// As [`StoreExt::upsert`].
    Upsert {
        user: NewUser,
        expected_version: Option<u64>,
    },
    /// As [`StoreExt::delete`].
    Delete {
        id: String,
        expected_version: Option<u64>,
    },
}

/// A write as a backend applies it: the user built (its id assigned) on the
/// caller's thread, before any lock or queue, so that the critical section
/// or the writer only does the store's own work.
#[derive(Debug, Clone, PartialEq)]
pub enum PreparedOp {
    /// Store `user`; fails if its id is taken.
    Create(User),
    /// Store `user` (version 1) if its id is free; otherwise replace the
    /// stored user with `user` at the next version. With `expected_version`
    /// set, the stored version (0 when none) must equal it.
    Upsert {
        user: User,
        expected_version: Option<u64>,
    },
    /// Remove the user; with `expected_version` set, its version must equal
    /// it.
    Delete {
        id: String,
        expected_version: Option<u64>,
    },
}

impl PreparedOp {
    pub fn create(user: &NewUser) -> PreparedOp {
        PreparedOp::Create(prepare_user(user))
    }

    pub fn prepare(op: WriteOp) -> PreparedOp {
        match op {
            WriteOp::Upsert {
                user,
                expected_version,
            } => PreparedOp::Upsert {
                user: prepare_user(&user),
                expected_version,
            },
            WriteOp::Delete {
                id,
                expected_version,
            } => PreparedOp::Delete {
                id,
                expected_version,
            },
        }
    }
}

/// The ops of one [`Store::write`]. Most writes are a single op (AddUser, a
/// lone upsert or delete): it is held inline, so that such a write reaches
/// the store, and a durable backend's writer, without a heap allocation for
/// its list. A batch spills to the heap as a `Vec` would.
pub type Ops = SmallVec<[PreparedOp; 1]>;

/// What one [`Store::write`] did: one result per op, in order (inline for a
/// single op, as [`Ops`]).
pub type Results = SmallVec<[Result<Change, StoreError>; 1]>;

/// A user store shared by every call: what a backend implements.
///
/// The trait holds only what backends really do differently; the write
/// calls the service makes (create, upsert, delete, and their batches) are
/// built once on [`Store::write`], in [`StoreExt`]. Every method is
/// required, none has a default: a wrapper around a store (a test's fault
/// injection) that forgot one would otherwise silently change what the
/// store does (report a failed store as serving, skip its close, drop its
/// metrics, or write op by op past its group commit).
///
/// Implementations are cheap-to-clone handles.
pub trait Store: Clone + Send + Sync + Unpin + 'static {
    /// Applies `ops` in order and returns one result per op, in order.
    ///
    /// Every op is atomic: it commits completely, with the next seq, and is
    /// published to the change feed in commit order, or it fails and
    /// commits nothing, using no seq; an op that fails does not stop the
    /// ops after it. The ops of one call share the work where the backend
    /// can: the memory store takes its lock once, a durable backend sends
    /// them to its writer as one command, committed in one transaction.
    /// That is what makes bulk import fast, and how SyncUsers lets the
    /// requests of a stream that arrived together share a commit.
    fn write(&self, ops: Ops) -> impl Future<Output = Results> + Send;

    /// Reads one user.
    fn get(&self, id: &str) -> impl Future<Output = Result<User, StoreError>> + Send;

    /// Reads up to `max` users matching `filter` with ids strictly after
    /// `after` (from the start when `None`), in ascending id order, by the
    /// rules of [`page`].
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

    /// Whether the store can take writes, now and as it changes. A store
    /// that cannot fail on its own (the memory store) returns a receiver
    /// that stays [`StoreHealth::Serving`].
    fn health(&self) -> watch::Receiver<StoreHealth>;

    /// Finishes the writes already handed over, then releases what the store
    /// holds (threads, connections, files), so that what it wrote is complete
    /// on its own. Calls on any handle after it fail with
    /// [`StoreError::Internal`] (the memory store holds nothing to release
    /// and goes on).
    fn close(&self) -> impl Future<Output = ()> + Send;

    /// Encodes what the store reports of itself at a metrics scrape: users
    /// stored, the last seq, and for a store with a writer its commits.
    /// Called at each scrape, never on the path of a call.
    fn encode_metrics(&self, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error>;
}

/// The writes the service makes, built once for every [`Store`] on its one
/// [`Store::write`]: each builds its ops on the caller's thread and hands
/// them over in one call. Implemented for every store by the one blanket
/// impl below, so no store can override a method and change what it means.
pub trait StoreExt: Store {
    /// Stores a new user with version 1, assigning a UUIDv7 when `user.id` is
    /// empty. An id already stored is [`StoreError::AlreadyExists`].
    fn create(&self, user: NewUser) -> impl Future<Output = Result<Change, StoreError>> + Send {
        self.write_one(PreparedOp::create(&user))
    }

    /// Creates each user in order, as [`StoreExt::create`] would one by one,
    /// and returns one result per user; one [`Store::write`], so that the
    /// batch commits together.
    fn create_many(
        &self,
        users: Vec<NewUser>,
    ) -> impl Future<Output = Vec<Result<Change, StoreError>>> + Send {
        let ops = users.iter().map(PreparedOp::create).collect();
        async move { self.write(ops).await.into_vec() }
    }

    /// Creates or replaces a user. Replacing bumps the version; an empty id
    /// creates a user with a new id. With `expected_version` set, the stored
    /// version (0 when there is none) must equal it.
    fn upsert(
        &self,
        user: NewUser,
        expected_version: Option<u64>,
    ) -> impl Future<Output = Result<Change, StoreError>> + Send {
        self.write_one(PreparedOp::prepare(WriteOp::Upsert {
            user,
            expected_version,
        }))
    }

    /// Deletes a user. With `expected_version` set, the stored version must
    /// equal it.
    fn delete(
        &self,
        id: &str,
        expected_version: Option<u64>,
    ) -> impl Future<Output = Result<Change, StoreError>> + Send {
        self.write_one(PreparedOp::Delete {
            id: id.to_owned(),
            expected_version,
        })
    }

    /// Applies each op in order, as [`StoreExt::upsert`] and
    /// [`StoreExt::delete`] would one after the other, and returns one
    /// result per op; one [`Store::write`], so that the ops share a commit.
    fn apply_many(
        &self,
        ops: Vec<WriteOp>,
    ) -> impl Future<Output = Vec<Result<Change, StoreError>>> + Send {
        let ops = ops.into_iter().map(PreparedOp::prepare).collect();
        async move { self.write(ops).await.into_vec() }
    }

    /// [`Store::write`] of one op, held inline: no allocation for the list.
    fn write_one(&self, op: PreparedOp) -> impl Future<Output = Result<Change, StoreError>> + Send {
        let ops: Ops = smallvec![op];
        async move {
            self.write(ops).await.into_iter().next().unwrap_or_else(|| {
                Err(StoreError::Internal(
                    "the store returned no result for a write".into(),
                ))
            })
        }
    }
}

impl<S: Store> StoreExt for S {}

#[cfg(test)]
pub(crate) mod tests {
    use super::{ListFilter, Store, StoreError, StoreExt, WriteOp};
    use crate::user::{ChangeKind, NewUser};

    /// A user with an id (empty: assigned by the store) and a first name.
    pub(crate) fn named(id: &str, first_name: &str) -> NewUser {
        NewUser {
            id: id.into(),
            first_name: first_name.into(),
            ..NewUser::default()
        }
    }

    /// What `write` (through `apply_many`) must do in every backend: each op in order, one result
    /// per op, failed ops using no seq, the changes published in order.
    pub(crate) async fn apply_many_applies_each_op_in_order(store: impl Store) {
        let mut feed = store.subscribe();
        let upsert = |id: &str, expected_version| WriteOp::Upsert {
            user: named(id, "N"),
            expected_version,
        };
        let results = store
            .apply_many(vec![
                upsert("a", None),
                upsert("a", Some(1)),
                upsert("a", Some(1)),
                WriteOp::Delete {
                    id: "b".into(),
                    expected_version: None,
                },
                WriteOp::Delete {
                    id: "a".into(),
                    expected_version: Some(2),
                },
            ])
            .await;
        let outcomes: Vec<_> = results
            .iter()
            .map(|r| r.as_ref().map(|c| (c.seq, c.kind, c.user.version())))
            .collect();
        assert_eq!(
            outcomes,
            [
                Ok((1, ChangeKind::Created, 1)),
                Ok((2, ChangeKind::Updated, 2)),
                Err(&StoreError::VersionMismatch {
                    expected: 1,
                    actual: 2
                }),
                Err(&StoreError::NotFound("b".into())),
                Ok((3, ChangeKind::Deleted, 2)),
            ]
        );
        for seq in 1..=3 {
            assert_eq!(feed.try_recv().unwrap().seq, seq);
        }
        assert!(feed.try_recv().is_err());
        let page = store
            .list_page(ListFilter::default(), None, 10)
            .await
            .unwrap();
        assert!(page.users.is_empty());
    }
}
