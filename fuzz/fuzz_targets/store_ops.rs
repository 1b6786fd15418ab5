//! The in-memory store under arbitrary sequences of operations, checked
//! against a model: every result, every version, the listing, and a
//! gapless change feed.

#![no_main]

use std::collections::BTreeMap;

use arbitrary::Arbitrary;
use futures::executor::block_on;
use libfuzzer_sys::fuzz_target;
use user_service::{
    MemoryStore, Store,
    store::{ListFilter, StoreError},
    user::{ChangeKind, NewUser},
    validate,
};

/// Ids come from a small set so that operations collide; `None` asks the
/// store to assign one.
#[derive(Arbitrary, Debug, Clone, Copy)]
struct Id(Option<u8>);

impl Id {
    fn text(self) -> String {
        self.0.map(|n| format!("u{:02}", n % 24)).unwrap_or_default()
    }
}

#[derive(Arbitrary, Debug)]
enum Op {
    Create(Id, String, bool),
    CreateMany(Vec<(Id, bool)>),
    Upsert(Id, String, Option<u8>),
    Delete(Id, Option<u8>),
    Get(Id),
    List(Option<Id>, u8, Option<bool>),
}

/// What the store should hold: version and `verified` per id.
#[derive(Default)]
struct Model {
    users: BTreeMap<String, (u64, bool)>,
    seq: u64,
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

/// Most rows in one CreateMany; the feed is drained after every op, so it
/// only needs room for one op's changes.
const MAX_BATCH: usize = 32;

fuzz_target!(|ops: Vec<Op>| {
    let store = MemoryStore::new(MAX_BATCH);
    let mut feed = store.subscribe();
    let mut model = Model::default();
    for op in ops.into_iter().take(256) {
        // Each committed change must arrive on the feed with the next seq.
        let mut committed = |model: &mut Model, kind: ChangeKind, id: &str| {
            model.seq += 1;
            let change = feed.try_recv().expect("a change on the feed");
            assert_eq!((change.seq, change.kind, change.user.id()), (model.seq, kind, id));
        };
        match op {
            Op::Create(id, name, verified) => {
                let user = new_user(id, &name, verified);
                // The service validates before the store sees anything.
                if validate::new_user(&user).is_err() {
                    continue;
                }
                let result = block_on(store.create(user));
                let id = id.text();
                if !id.is_empty() && model.users.contains_key(&id) {
                    assert_eq!(result.unwrap_err(), StoreError::AlreadyExists(id));
                } else {
                    let change = result.unwrap();
                    let id = change.user.id().to_owned();
                    assert_eq!(change.user.version(), 1);
                    model.users.insert(id.clone(), (1, verified));
                    committed(&mut model, ChangeKind::Created, &id);
                }
            }
            Op::CreateMany(mut rows) => {
                rows.truncate(MAX_BATCH);
                let users = rows.iter().map(|&(id, v)| new_user(id, "Bulk", v)).collect();
                let results = block_on(store.create_many(users));
                assert_eq!(results.len(), rows.len());
                for ((id, verified), result) in rows.into_iter().zip(results) {
                    let id = id.text();
                    if !id.is_empty() && model.users.contains_key(&id) {
                        assert_eq!(result.unwrap_err(), StoreError::AlreadyExists(id));
                    } else {
                        let id = result.unwrap().user.id().to_owned();
                        model.users.insert(id.clone(), (1, verified));
                        committed(&mut model, ChangeKind::Created, &id);
                    }
                }
            }
            Op::Upsert(id, name, expected) => {
                let user = new_user(id, &name, false);
                if validate::new_user(&user).is_err() {
                    continue;
                }
                let expected = expected.map(u64::from);
                let result = block_on(store.upsert(user, expected));
                let id = id.text();
                let actual = model.users.get(&id).map_or(0, |&(v, _)| v);
                match expected {
                    // An empty id is never stored: its version is 0.
                    Some(expected) if expected != actual => assert_eq!(
                        result.unwrap_err(),
                        StoreError::VersionMismatch { expected, actual }
                    ),
                    _ => {
                        let change = result.unwrap();
                        let id = change.user.id().to_owned();
                        let kind = if model.users.contains_key(&id) {
                            ChangeKind::Updated
                        } else {
                            ChangeKind::Created
                        };
                        let version = if kind == ChangeKind::Created { 1 } else { actual + 1 };
                        assert_eq!(change.user.version(), version);
                        model.users.insert(id.clone(), (version, false));
                        committed(&mut model, kind, &id);
                    }
                }
            }
            Op::Delete(id, expected) => {
                let id = id.text();
                if validate::id("delete_id", &id).is_err() {
                    continue;
                }
                let expected = expected.map(u64::from);
                let result = block_on(store.delete(&id, expected));
                match model.users.get(&id).copied() {
                    None => assert_eq!(result.unwrap_err(), StoreError::NotFound(id)),
                    Some((version, _)) if expected.is_some_and(|e| e != version) => {
                        assert_eq!(
                            result.unwrap_err(),
                            StoreError::VersionMismatch {
                                expected: expected.unwrap(),
                                actual: version
                            }
                        )
                    }
                    Some(_) => {
                        result.unwrap();
                        model.users.remove(&id);
                        committed(&mut model, ChangeKind::Deleted, &id);
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
    assert!(feed.try_recv().is_err());
});
