//! The in-memory store under arbitrary sequences of operations, checked
//! against a model: every result, every version, the listing, and a
//! gapless change feed. Single writes and batches of mixed ops (one
//! `Store::write`, as SyncUsers makes them) are checked by the same model,
//! op by op.

#![no_main]

use std::collections::BTreeMap;

use arbitrary::Arbitrary;
use futures::executor::block_on;
use libfuzzer_sys::fuzz_target;
use user_service::{
    MemoryStore, Store,
    store::{ListFilter, StoreError, StoreExt, Subscription, WriteOp},
    user::{Change, ChangeKind, NewUser},
    validate,
};

/// Ids come from a small set so that operations collide; `None` asks the
/// store to assign one.
#[derive(Arbitrary, Debug, Clone, Copy)]
struct Id(Option<u8>);

impl Id {
    fn text(self) -> String {
        self.0
            .map(|n| format!("u{:02}", n % 24))
            .unwrap_or_default()
    }
}

#[derive(Arbitrary, Debug)]
enum Op {
    Create(Id, String, bool),
    CreateMany(Vec<(Id, bool)>),
    Upsert(Id, String, Option<u8>),
    Delete(Id, Option<u8>),
    /// Upserts (`true`) and deletes, in one write.
    ApplyMany(Vec<(bool, Id, Option<u8>)>),
    Get(Id),
    List(Option<Id>, u8, Option<bool>),
}

/// What the store should hold, version and `verified` per id, and the feed
/// it must publish on.
struct Model {
    users: BTreeMap<String, (u64, bool)>,
    seq: u64,
    feed: Subscription,
}

impl Model {
    /// Each committed change must arrive on the feed with the next seq.
    fn committed(&mut self, kind: ChangeKind, id: &str) {
        self.seq += 1;
        let change = self.feed.try_recv().expect("a change on the feed");
        assert_eq!(
            (change.seq, change.kind, change.user.id()),
            (self.seq, kind, id)
        );
    }

    /// Checks the result of creating `id` (empty: assigned by the store).
    fn created(&mut self, id: Id, verified: bool, result: Result<Change, StoreError>) {
        let id = id.text();
        if !id.is_empty() && self.users.contains_key(&id) {
            assert_eq!(result.unwrap_err(), StoreError::AlreadyExists(id));
        } else {
            let change = result.unwrap();
            let id = change.user.id().to_owned();
            assert_eq!(change.user.version(), 1);
            self.users.insert(id.clone(), (1, verified));
            self.committed(ChangeKind::Created, &id);
        }
    }

    /// Checks the result of upserting `id` (unverified) with `expected`.
    fn upserted(&mut self, id: &str, expected: Option<u64>, result: Result<Change, StoreError>) {
        let actual = self.users.get(id).map_or(0, |&(v, _)| v);
        match expected {
            // An empty id is never stored: its version is 0.
            Some(expected) if expected != actual => assert_eq!(
                result.unwrap_err(),
                StoreError::VersionMismatch { expected, actual }
            ),
            _ => {
                let change = result.unwrap();
                let id = change.user.id().to_owned();
                let kind = if self.users.contains_key(&id) {
                    ChangeKind::Updated
                } else {
                    ChangeKind::Created
                };
                let version = if kind == ChangeKind::Created {
                    1
                } else {
                    actual + 1
                };
                assert_eq!(change.user.version(), version);
                self.users.insert(id.clone(), (version, false));
                self.committed(kind, &id);
            }
        }
    }

    /// Checks the result of deleting `id` with `expected`.
    fn deleted(&mut self, id: String, expected: Option<u64>, result: Result<Change, StoreError>) {
        match self.users.get(&id).copied() {
            None => assert_eq!(result.unwrap_err(), StoreError::NotFound(id)),
            Some((version, _)) if expected.is_some_and(|e| e != version) => assert_eq!(
                result.unwrap_err(),
                StoreError::VersionMismatch {
                    expected: expected.unwrap(),
                    actual: version
                }
            ),
            Some(_) => {
                result.unwrap();
                self.users.remove(&id);
                self.committed(ChangeKind::Deleted, &id);
            }
        }
    }
}

fn new_user(id: Id, first_name: &str, verified: bool) -> NewUser {
    NewUser {
        id: id.text(),
        first_name: first_name.to_owned(),
        last_name: String::new(),
        address: String::new(),
        verified,
    }
}

/// Most rows in one CreateMany or ops in one ApplyMany; the feed is drained
/// after every op, so it only needs room for one op's changes.
const MAX_BATCH: usize = 32;

fuzz_target!(|ops: Vec<Op>| {
    let store = MemoryStore::new(MAX_BATCH);
    let mut model = Model {
        users: BTreeMap::new(),
        seq: 0,
        feed: store.subscribe(),
    };
    for op in ops.into_iter().take(256) {
        match op {
            Op::Create(id, name, verified) => {
                let user = new_user(id, &name, verified);
                // The service validates before the store sees anything.
                if validate::new_user(&user).is_err() {
                    continue;
                }
                model.created(id, verified, block_on(store.create(user)));
            }
            Op::CreateMany(mut rows) => {
                rows.truncate(MAX_BATCH);
                let users = rows
                    .iter()
                    .map(|&(id, v)| new_user(id, "Bulk", v))
                    .collect();
                let results = block_on(store.create_many(users));
                assert_eq!(results.len(), rows.len());
                for ((id, verified), result) in rows.into_iter().zip(results) {
                    model.created(id, verified, result);
                }
            }
            Op::Upsert(id, name, expected) => {
                let user = new_user(id, &name, false);
                if validate::new_user(&user).is_err() {
                    continue;
                }
                let expected = expected.map(u64::from);
                let result = block_on(store.upsert(user, expected));
                model.upserted(&id.text(), expected, result);
            }
            Op::Delete(id, expected) => {
                let id = id.text();
                if validate::id("delete_id", &id).is_err() {
                    continue;
                }
                let expected = expected.map(u64::from);
                let result = block_on(store.delete(&id, expected));
                model.deleted(id, expected, result);
            }
            Op::ApplyMany(mut ops) => {
                ops.truncate(MAX_BATCH);
                // As SyncUsers does: only valid ops reach the store.
                ops.retain(|&(upsert, id, _)| upsert || !id.text().is_empty());
                let writes = ops
                    .iter()
                    .map(|&(upsert, id, expected)| {
                        let expected_version = expected.map(u64::from);
                        match upsert {
                            true => WriteOp::Upsert {
                                user: new_user(id, "Sync", false),
                                expected_version,
                            },
                            false => WriteOp::Delete {
                                id: id.text(),
                                expected_version,
                            },
                        }
                    })
                    .collect();
                let results = block_on(store.apply_many(writes));
                assert_eq!(results.len(), ops.len());
                for ((upsert, id, expected), result) in ops.into_iter().zip(results) {
                    let expected = expected.map(u64::from);
                    match upsert {
                        true => model.upserted(&id.text(), expected, result),
                        false => model.deleted(id.text(), expected, result),
                    }
                }
            }
            Op::Get(id) => {
                let id = id.text();
                if id.is_empty() {
                    continue;
                }
                match (block_on(store.get(&id)), model.users.get(&id)) {
                    (Ok(user), Some(&(version, verified))) => {
                        assert_eq!((user.version(), user.verified()), (version, verified));
                    }
                    (Err(StoreError::NotFound(_)), None) => {}
                    (result, expected) => panic!("get {id}: {result:?}, expected {expected:?}"),
                }
            }
            Op::List(after, max, verified) => {
                let after = after.map(Id::text).filter(|a| !a.is_empty());
                let max = usize::from(max).max(1);
                let filter = ListFilter { verified };
                let page = block_on(store.list_page(filter, after.as_deref(), max)).unwrap();
                let listed: Vec<String> = page.users.iter().map(|u| u.id().to_owned()).collect();
                let expected: Vec<String> = model
                    .users
                    .iter()
                    .filter(|(id, _)| after.as_deref().is_none_or(|a| id.as_str() > a))
                    .filter(|(_, (_, v))| verified.is_none_or(|want| *v == want))
                    .map(|(id, _)| id.clone())
                    .take(max)
                    .collect();
                // A page may stop early (the store bounds each scan), and
                // then says where to resume.
                assert_eq!(listed, expected[..listed.len()]);
                assert!(listed.len() == expected.len() || page.next_after.is_some());
            }
        }
    }
    // Nothing was published that the model did not expect.
    assert!(model.feed.try_recv().is_err());
});
