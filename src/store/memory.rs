//! The in-memory store: an ordered set of users behind one lock.
//!
//! Every write builds its user ([`PreparedOp`]) before it takes the lock,
//! then applies and publishes under one hold of it; a batch of writes
//! (`create_many`, `apply_many`: one [`Store::write`]) takes it once. A listing page looks at no
//! more than [`MAX_SCAN_PER_PAGE`](super::page::MAX_SCAN_PER_PAGE) users under one read hold, so that a
//! filter that matches few users does not scan the whole store while
//! writers wait.

use std::{
    borrow::Borrow, cmp::Ordering, collections::BTreeSet, convert::Infallible, ops::Bound,
    sync::Arc,
};

use parking_lot::RwLock;
use prometheus_client::encoding::DescriptorEncoder;
use tokio::sync::watch;

use super::{
    ChangeFeed, ListFilter, Ops, Page, PreparedOp, Results, Store, StoreError, StoreHealth,
    Subscription, check_version, page::PageScan,
};
use crate::user::{Change, ChangeKind, User};

/// Users in memory, lost when the process exits.
///
/// A cheap handle: clones share the same users.
#[derive(Debug, Clone)]
pub struct MemoryStore {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    // A blocking (not async) lock, because no critical section awaits: each
    // operation takes it once, does its few map operations and releases it.
    // That is also what makes every write atomic even if the calling task is
    // cancelled. parking_lot's RwLock is small, fast when uncontended and lets
    // reads (GetUser, listing pages) run side by side.
    state: RwLock<State>,
    feed: ChangeFeed,
}

#[derive(Debug, Default)]
struct State {
    users: BTreeSet<Entry>,
    /// The seq of the last committed change.
    seq: u64,
}

/// A stored user in the tree, ordered by id.
///
/// Comparing ids is most of the work of an insert (a few dozen comparisons
/// per insert into a million users), and comparing two stored ids would
/// read two other allocations each time. So each entry also carries the
/// first 16 bytes of its id: two integer comparisons decide almost every
/// comparison, and only equal prefixes read the ids themselves.
#[derive(Debug, Clone)]
struct Entry {
    prefix: Prefix,
    user: User,
}

impl Entry {
    fn new(user: User) -> Self {
        Entry {
            prefix: Prefix::of(user.id()),
            user,
        }
    }
}

/// The first 16 bytes of an id, padded with zeros, as two big-endian
/// integers.
///
/// Prefixes order like the ids they come from, and equal ids have equal
/// prefixes: where two prefixes differ at a byte, either both ids have that
/// byte, or the shorter id ended before it and is a prefix of the longer one
/// (which has a non-zero byte there, or the padded prefixes would not
/// differ). So a prefix comparison that is not `Equal` is the ids' own order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Prefix([u64; 2]);

impl Prefix {
    fn of(id: &str) -> Self {
        let mut bytes = [0u8; 16];
        let len = id.len().min(16);
        bytes[..len].copy_from_slice(&id.as_bytes()[..len]);
        let (high, low) = bytes.split_at(8);
        Prefix([
            u64::from_be_bytes(high.try_into().expect("8 bytes")),
            u64::from_be_bytes(low.try_into().expect("8 bytes")),
        ])
    }
}

/// An id to look up: what the tree compares, whether stored or asked for.
/// The tree is searched with `&dyn IdKey` (through `Borrow`), so that a
/// lookup by id needs no `Entry`, and so no `User`.
trait IdKey {
    fn prefix(&self) -> Prefix;
    fn id(&self) -> &str;
}

impl IdKey for Entry {
    fn prefix(&self) -> Prefix {
        self.prefix
    }

    fn id(&self) -> &str {
        self.user.id()
    }
}

/// An id asked for, with its prefix.
struct Lookup<'a> {
    prefix: Prefix,
    id: &'a str,
}

impl<'a> Lookup<'a> {
    fn new(id: &'a str) -> Self {
        Lookup {
            prefix: Prefix::of(id),
            id,
        }
    }
}

impl IdKey for Lookup<'_> {
    fn prefix(&self) -> Prefix {
        self.prefix
    }

    fn id(&self) -> &str {
        self.id
    }
}

/// The one comparison of ids, used by inserts and lookups alike: the
/// prefixes, then, only if they are equal, the ids (`ids`).
fn compare(a: Prefix, b: Prefix, ids: impl FnOnce() -> Ordering) -> Ordering {
    a.cmp(&b).then_with(ids)
}

impl<'a> Borrow<dyn IdKey + 'a> for Entry {
    fn borrow(&self) -> &(dyn IdKey + 'a) {
        self
    }
}

impl Ord for dyn IdKey + '_ {
    fn cmp(&self, other: &Self) -> Ordering {
        compare(self.prefix(), other.prefix(), || self.id().cmp(other.id()))
    }
}

impl PartialOrd for dyn IdKey + '_ {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for dyn IdKey + '_ {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for dyn IdKey + '_ {}

impl Ord for Entry {
    fn cmp(&self, other: &Self) -> Ordering {
        // Not through `dyn IdKey`: inserts compare entries with no virtual
        // calls.
        compare(self.prefix, other.prefix, || {
            self.user.id().cmp(other.user.id())
        })
    }
}

impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}

impl Eq for Entry {}

impl MemoryStore {
    /// `feed_capacity`: how far a change-feed subscriber may fall behind
    /// before it is cut off (see [`ChangeFeed`]).
    pub fn new(feed_capacity: usize) -> Self {
        MemoryStore {
            shared: Arc::new(Shared {
                state: RwLock::new(State::default()),
                feed: ChangeFeed::new(feed_capacity),
            }),
        }
    }

    /// How many users are stored.
    pub fn len(&self) -> usize {
        self.shared.state.read().users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The seq of the last committed change (0 before the first).
    pub fn last_seq(&self) -> u64 {
        self.shared.state.read().seq
    }
}

impl State {
    /// Commits one change: the next seq, published while the lock is still
    /// held so that subscribers see changes in commit order.
    fn commit(&mut self, feed: &ChangeFeed, kind: ChangeKind, user: User) -> Change {
        self.seq += 1;
        let change = Change {
            seq: self.seq,
            kind,
            user,
        };
        feed.publish(change.clone());
        change
    }

    fn apply(&mut self, feed: &ChangeFeed, op: PreparedOp) -> Result<Change, StoreError> {
        match op {
            PreparedOp::Create(user) => self.create(feed, user),
            PreparedOp::Upsert {
                user,
                expected_version,
            } => self.upsert(feed, user, expected_version),
            PreparedOp::Delete {
                id,
                expected_version,
            } => self.delete(feed, &id, expected_version),
        }
    }

    fn create(&mut self, feed: &ChangeFeed, user: User) -> Result<Change, StoreError> {
        // One search of the tree, not two (`contains` then `insert`): a
        // BTreeSet insert leaves an existing equal entry as it is and says
        // so. Id comparisons are most of the cost of a bulk import.
        if !self.users.insert(Entry::new(user.clone())) {
            return Err(StoreError::AlreadyExists(user.id().to_owned()));
        }
        Ok(self.commit(feed, ChangeKind::Created, user))
    }

    /// `prepared`: the user to store if its id is free (version 1).
    fn upsert(
        &mut self,
        feed: &ChangeFeed,
        prepared: User,
        expected_version: Option<u64>,
    ) -> Result<Change, StoreError> {
        let stored = self
            .users
            .get(&Lookup::new(prepared.id()) as &dyn IdKey)
            .map(|entry| entry.user.version());
        check_version(expected_version, stored.unwrap_or(0))?;
        match stored {
            None => {
                self.users.insert(Entry::new(prepared.clone()));
                Ok(self.commit(feed, ChangeKind::Created, prepared))
            }
            Some(version) => {
                let user = prepared.with_version(version + 1);
                self.users.replace(Entry::new(user.clone()));
                Ok(self.commit(feed, ChangeKind::Updated, user))
            }
        }
    }

    fn delete(
        &mut self,
        feed: &ChangeFeed,
        id: &str,
        expected_version: Option<u64>,
    ) -> Result<Change, StoreError> {
        let key = Lookup::new(id);
        let stored = match self.users.get(&key as &dyn IdKey) {
            Some(stored) => stored.user.version(),
            None => return Err(StoreError::NotFound(id.to_owned())),
        };
        check_version(expected_version, stored)?;
        let Entry { user, .. } = self
            .users
            .take(&key as &dyn IdKey)
            .expect("checked above under the same lock");
        Ok(self.commit(feed, ChangeKind::Deleted, user))
    }
}

impl Store for MemoryStore {
    /// Applies every op, built outside the lock, in order under one hold of
    /// it.
    async fn write(&self, ops: Ops) -> Results {
        let mut state = self.shared.state.write();
        ops.into_iter()
            .map(|op| state.apply(&self.shared.feed, op))
            .collect()
    }

    async fn get(&self, id: &str) -> Result<User, StoreError> {
        let state = self.shared.state.read();
        match state.users.get(&Lookup::new(id) as &dyn IdKey) {
            Some(entry) => Ok(entry.user.clone()),
            None => Err(StoreError::NotFound(id.to_owned())),
        }
    }

    async fn list_page(
        &self,
        filter: ListFilter,
        after: Option<&str>,
        max: usize,
    ) -> Result<Page, StoreError> {
        let after = after.map(Lookup::new);
        let start = match &after {
            Some(after) => Bound::Excluded(after as &dyn IdKey),
            None => Bound::Unbounded,
        };
        let mut scan = PageScan::new(filter, max);
        let state = self.shared.state.read();
        for Entry { user, .. } in state.users.range::<dyn IdKey, _>((start, Bound::Unbounded)) {
            let Ok(offered) = scan.offer(user.id(), user.verified(), || {
                Ok::<_, Infallible>(user.clone())
            });
            if !offered {
                break;
            }
        }
        Ok(scan.finish())
    }

    fn subscribe(&self) -> Subscription {
        self.shared.feed.subscribe()
    }

    /// Always serving: nothing in memory can stop taking writes. The sender
    /// goes at once, so the value stays and no change ever comes.
    fn health(&self) -> watch::Receiver<StoreHealth> {
        watch::channel(StoreHealth::Serving).1
    }

    /// Nothing to finish or release: the users live as long as the handles.
    async fn close(&self) {}

    fn encode_metrics(&self, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let (users, last_seq) = {
            let state = self.shared.state.read();
            (state.users.len(), state.seq)
        };
        super::write_stats::encode_contents(encoder, users as u64, last_seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        store::{
            StoreExt,
            page::{MAX_SCAN_PER_PAGE, tests::a_page_ends_exactly_at_the_end_of_the_table},
            tests::{self, named},
        },
        user::NewUser,
    };

    fn store() -> MemoryStore {
        MemoryStore::new(1024)
    }

    #[test]
    fn entries_and_lookups_order_like_their_ids() {
        // Ids around the 16-byte prefix, with shared prefixes, zero bytes
        // (which look like the padding) and multi-byte characters.
        let pieces = ["", "\0", "a", "b", "0", "-", "zz", "é", "0193a4b2-c3d4-7e"];
        let mut rng = fastrand::Rng::with_seed(7);
        let ids: Vec<String> = (0..400)
            .map(|_| {
                (0..rng.usize(0..6))
                    .map(|_| pieces[rng.usize(..pieces.len())])
                    .collect()
            })
            .collect();
        let entry = |id: &str| Entry::new(User::new(id, &NewUser::default(), 1));
        for a in &ids {
            for b in &ids {
                let expected = a.cmp(b);
                assert_eq!(entry(a).cmp(&entry(b)), expected, "{a:?} vs {b:?}");
                let (a_key, b_key) = (Lookup::new(a), Lookup::new(b));
                let (a_key, b_key): (&dyn IdKey, &dyn IdKey) = (&a_key, &b_key);
                assert_eq!(a_key.cmp(b_key), expected, "{a:?} vs {b:?}");
            }
        }
    }

    #[tokio::test]
    async fn create_assigns_increasing_ids_and_version_one() {
        let store = store();
        let mut last = String::new();
        for _ in 0..1000 {
            let change = store.create(named("", "Ann")).await.unwrap();
            assert_eq!(change.kind, ChangeKind::Created);
            assert_eq!(change.user.version(), 1);
            assert!(change.user.id() > last.as_str(), "ids must increase");
            last = change.user.id().to_owned();
        }
        assert_eq!(store.len(), 1000);
    }

    #[tokio::test]
    async fn create_rejects_a_stored_id_and_commits_nothing() {
        let store = store();
        store.create(named("a", "Ann")).await.unwrap();
        let err = store.create(named("a", "Bob")).await.unwrap_err();
        assert_eq!(err, StoreError::AlreadyExists("a".into()));
        assert_eq!(store.get("a").await.unwrap().first_name(), "Ann");
        assert_eq!(store.last_seq(), 1);
    }

    #[tokio::test]
    async fn create_many_reports_each_row() {
        let store = store();
        let results = store
            .create_many(vec![named("a", "A"), named("b", "B"), named("a", "C")])
            .await;
        assert!(results[0].is_ok() && results[1].is_ok());
        assert_eq!(results[2], Err(StoreError::AlreadyExists("a".into())));
        let seqs: Vec<u64> = results[..2]
            .iter()
            .map(|r| r.as_ref().unwrap().seq)
            .collect();
        assert_eq!(seqs, [1, 2]);
    }

    #[tokio::test]
    async fn upsert_bumps_versions_and_checks_expected() {
        let store = store();
        let created = store.upsert(named("a", "A"), None).await.unwrap();
        assert_eq!(
            (created.kind, created.user.version()),
            (ChangeKind::Created, 1)
        );
        let updated = store.upsert(named("a", "B"), Some(1)).await.unwrap();
        assert_eq!(
            (updated.kind, updated.user.version()),
            (ChangeKind::Updated, 2)
        );
        assert_eq!(updated.user.first_name(), "B");
        let err = store.upsert(named("a", "C"), Some(1)).await.unwrap_err();
        assert_eq!(
            err,
            StoreError::VersionMismatch {
                expected: 1,
                actual: 2
            }
        );
        let err = store.upsert(named("new", "C"), Some(3)).await.unwrap_err();
        assert_eq!(
            err,
            StoreError::VersionMismatch {
                expected: 3,
                actual: 0
            }
        );
        assert_eq!(store.last_seq(), 2, "failed ops use no seq");
    }

    #[tokio::test]
    async fn delete_then_recreate_starts_at_version_one() {
        let store = store();
        store.upsert(named("a", "A"), None).await.unwrap();
        store.upsert(named("a", "A"), None).await.unwrap();
        let err = store.delete("a", Some(1)).await.unwrap_err();
        assert_eq!(
            err,
            StoreError::VersionMismatch {
                expected: 1,
                actual: 2
            }
        );
        let deleted = store.delete("a", Some(2)).await.unwrap();
        assert_eq!(
            (deleted.kind, deleted.user.version()),
            (ChangeKind::Deleted, 2)
        );
        assert_eq!(
            store.delete("a", None).await.unwrap_err(),
            StoreError::NotFound("a".into())
        );
        let again = store.upsert(named("a", "A"), None).await.unwrap();
        assert_eq!((again.kind, again.user.version()), (ChangeKind::Created, 1));
    }

    #[tokio::test]
    async fn apply_many_applies_each_op_in_order() {
        tests::apply_many_applies_each_op_in_order(store()).await;
    }

    #[tokio::test]
    async fn list_pages_in_id_order_with_filter() {
        let store = store();
        for i in 0..10 {
            let mut user = named(&format!("u{i}"), "N");
            user.verified = i % 2 == 0;
            store.create(user).await.unwrap();
        }
        let all = ListFilter::default();
        let page = store.list_page(all, None, 4).await.unwrap();
        let ids: Vec<&str> = page.users.iter().map(|u| u.id()).collect();
        assert_eq!(ids, ["u0", "u1", "u2", "u3"]);
        assert_eq!(page.next_after.as_deref(), Some("u3"));

        let page = store.list_page(all, Some("u7"), 4).await.unwrap();
        let ids: Vec<&str> = page.users.iter().map(|u| u.id()).collect();
        assert_eq!(ids, ["u8", "u9"]);
        assert_eq!(page.next_after, None);

        let verified = ListFilter {
            verified: Some(true),
        };
        let page = store.list_page(verified, None, 100).await.unwrap();
        let ids: Vec<&str> = page.users.iter().map(|u| u.id()).collect();
        assert_eq!(ids, ["u0", "u2", "u4", "u6", "u8"]);
    }

    #[tokio::test]
    async fn a_sparse_filter_scans_a_bounded_number_per_page() {
        let store = store();
        let users = (0..MAX_SCAN_PER_PAGE + 10)
            .map(|i| named(&format!("u{i:06}"), "N"))
            .collect();
        store.create_many(users).await;
        let verified = ListFilter {
            verified: Some(true),
        };
        let page = store.list_page(verified, None, 10).await.unwrap();
        assert!(page.users.is_empty());
        let resume = page.next_after.expect("more to scan");
        assert_eq!(resume, format!("u{:06}", MAX_SCAN_PER_PAGE - 1));
        let page = store.list_page(verified, Some(&resume), 10).await.unwrap();
        assert!(page.users.is_empty());
        assert_eq!(page.next_after, None);
    }

    #[tokio::test]
    async fn a_page_that_reaches_the_last_user_ends_the_listing() {
        a_page_ends_exactly_at_the_end_of_the_table(MemoryStore::new(16)).await;
    }

    #[tokio::test]
    async fn subscribers_see_changes_in_commit_order() {
        let store = store();
        let mut sub = store.subscribe();
        store.create(named("a", "A")).await.unwrap();
        store.upsert(named("a", "B"), None).await.unwrap();
        store.delete("a", None).await.unwrap();
        let kinds: Vec<(u64, ChangeKind)> = (0..3)
            .map(|_| sub.try_recv().map(|c| (c.seq, c.kind)).unwrap())
            .collect();
        assert_eq!(
            kinds,
            [
                (1, ChangeKind::Created),
                (2, ChangeKind::Updated),
                (3, ChangeKind::Deleted)
            ]
        );
    }
}
