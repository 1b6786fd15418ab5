//! Several replicas on one database: one sequence of changes for every
//! subscriber everywhere, an Ack's seq equal to its Change's, and replicas
//! taking turns on one user.

use std::collections::{HashMap, HashSet};

use prometheus_client::{collector::Collector, encoding::DescriptorEncoder, registry::Registry};
use tonic::Code;
use user_service::proto::{Change, sync_response::Event};
use user_service::store::{
    Store, StoreError, StoreExt,
    postgres::{PostgresOptions, PostgresStore},
};

use test_support::{postgres::TestSchema, user_named};

use crate::replica::{Replica, Sync, assert_gapless};

/// Ops each SyncUsers writer sends.
const OPS_PER_WRITER: u64 = 150;

/// AddUser calls each unary writer makes.
const ADDS_PER_WRITER: u64 = 100;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_show_every_subscriber_one_gapless_sequence() {
    if test_support::postgres::skip_without_database() {
        return;
    }
    every_subscriber_sees_one_gapless_sequence(2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_replicas_show_every_subscriber_one_gapless_sequence() {
    if test_support::postgres::skip_without_database() {
        return;
    }
    every_subscriber_sees_one_gapless_sequence(3).await;
}

/// Writers and subscribers on each replica, writing at once: every
/// subscriber receives exactly the same gapless sequence, every committed
/// write once, and each writer's OK Acks carry the seq of their Change,
/// which comes after the Ack.
async fn every_subscriber_sees_one_gapless_sequence(replicas: usize) {
    let schema = TestSchema::new().await;
    let mut servers = Vec::new();
    for _ in 0..replicas {
        servers.push(Replica::start(&schema.url, &[]).await);
    }
    // Subscribed before any write: they must see seq 1 onwards.
    let mut listeners = Vec::new();
    for server in &servers {
        listeners.push(Sync::open(server).await);
    }
    let mut syncs = Vec::new();
    let mut adds = Vec::new();
    for (r, server) in servers.iter().enumerate() {
        let sync = Sync::open(server).await;
        syncs.push(tokio::spawn(sync_writer(sync, r)));
        let client = server.client().await;
        adds.push(tokio::spawn(unary_writer(client, r)));
    }
    // Every committed write: its seq where the Ack told it (SyncUsers), its
    // id alone otherwise (AddUser's reply carries no seq).
    let mut by_seq = HashMap::new();
    for writer in syncs {
        for (seq, id) in writer.await.unwrap() {
            assert!(by_seq.insert(seq, id).is_none(), "seq {seq} twice");
        }
    }
    let mut ids: HashSet<String> = by_seq.values().cloned().collect();
    for writer in adds {
        for id in writer.await.unwrap() {
            assert!(ids.insert(id), "an id twice");
        }
    }
    let total = ids.len() as u64;
    assert_eq!(total, replicas as u64 * (OPS_PER_WRITER + ADDS_PER_WRITER));
    let mut sequences = Vec::new();
    for listener in &mut listeners {
        let changes = listener.changes_through(total).await;
        assert_gapless(&changes, 1);
        assert_eq!(changes.len() as u64, total);
        let mut seen = HashSet::new();
        for change in &changes {
            let id = &change.user.as_ref().unwrap().id;
            if let Some(acked) = by_seq.get(&change.seq) {
                assert_eq!(acked, id, "the Ack's seq is its Change's");
            }
            assert!(ids.contains(id) && seen.insert(id.clone()), "{id}");
        }
        sequences.push(changes);
    }
    for other in &sequences[1..] {
        assert_eq!(other, &sequences[0], "one sequence for every subscriber");
    }
}

/// Upserts `OPS_PER_WRITER` users of its own through one SyncUsers stream,
/// pipelined, checking the order the contract gives on its own stream: an
/// op's Ack, then its Change (with the same seq) before the next Ack.
/// Returns the (seq, id) of each op committed.
async fn sync_writer(mut sync: Sync, replica: usize) -> Vec<(u64, String)> {
    for i in 0..OPS_PER_WRITER {
        sync.upsert(i, user_named(&format!("s{replica}-{i:04}"), "S"), 0)
            .await;
    }
    let mut committed = Vec::new();
    let mut seen: Vec<Change> = Vec::new();
    let mut owed: Option<u64> = None;
    while committed.len() < OPS_PER_WRITER as usize {
        match sync.next().await.unwrap() {
            Event::Ack(ack) => {
                assert_eq!(ack.code, Code::Ok as i32, "{}", ack.message);
                assert!(owed.is_none(), "an Ack before the previous op's Change");
                assert!(
                    seen.iter().all(|c| c.seq != ack.seq),
                    "the Change of seq {} came before its Ack",
                    ack.seq
                );
                owed = Some(ack.seq);
                committed.push((ack.seq, ack.user.unwrap().id));
            }
            Event::Change(change) => {
                if owed == Some(change.seq) {
                    owed = None;
                }
                seen.push(change);
            }
        }
    }
    committed
}

/// AddUser `ADDS_PER_WRITER` times; the id of each.
async fn unary_writer(mut client: test_support::Client, replica: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..ADDS_PER_WRITER {
        let reply = client
            .add_user(user_named(&format!("a{replica}-{i:04}"), "A"))
            .await
            .unwrap()
            .into_inner();
        ids.push(reply.user.unwrap().id);
    }
    ids
}

/// Every replica upserts one user with the same expected version at once,
/// round after round: each round exactly one wins, the others get
/// FAILED_PRECONDITION, and the versions go up one a round.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_of_concurrent_upserts_with_one_expected_version_wins() {
    if test_support::postgres::skip_without_database() {
        return;
    }
    const ROUNDS: u64 = 20;
    let schema = TestSchema::new().await;
    let mut servers = Vec::new();
    for _ in 0..3 {
        servers.push(Replica::start(&schema.url, &[]).await);
    }
    let mut syncs = Vec::new();
    for server in &servers {
        syncs.push(Sync::open(server).await);
    }
    syncs[0].upsert(0, user_named("x", "v1"), 0).await;
    let (ack, _) = syncs[0].next_ack().await;
    assert_eq!((ack.code, ack.user.unwrap().version), (0, 1));
    for round in 1..=ROUNDS {
        for (r, sync) in syncs.iter().enumerate() {
            sync.upsert(round, user_named("x", &format!("r{round}-{r}")), round)
                .await;
        }
        let mut codes = Vec::new();
        for sync in &mut syncs {
            let (ack, _) = sync.next_ack().await;
            assert_eq!(ack.request_id, round);
            if ack.code == Code::Ok as i32 {
                assert_eq!(ack.user.unwrap().version, round + 1);
            }
            codes.push(Code::from(ack.code));
        }
        codes.sort_by_key(|code| *code as i32);
        assert_eq!(
            codes,
            [Code::Ok, Code::FailedPrecondition, Code::FailedPrecondition],
            "round {round}"
        );
    }
    let stored = servers[1]
        .client()
        .await
        .get_user(user_service::proto::GetUserRequest { id: "x".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stored.version, ROUNDS + 1);
}

/// A store's metrics, as a scrape would encode them.
fn scrape(store: &PostgresStore) -> String {
    #[derive(Debug)]
    struct Scraped(PostgresStore);
    impl Collector for Scraped {
        fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
            self.0.encode_metrics(&mut encoder)
        }
    }
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Scraped(store.clone())));
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    text
}

/// Users and the last seq count every replica's writes, as its tailer has
/// read them; the commit figures are the replica's own writer's. Once
/// closed, the store refuses every call.
#[tokio::test]
async fn metrics_count_every_replicas_writes_and_close_ends_the_store() {
    if test_support::postgres::skip_without_database() {
        return;
    }
    use user_service::user::NewUser;
    let schema = TestSchema::new().await;
    let open = || PostgresStore::open(&schema.url, PostgresOptions::new(64));
    let (a, b) = (open().await.unwrap(), open().await.unwrap());
    let user = |id: &str| NewUser {
        id: id.into(),
        first_name: "N".into(),
        ..NewUser::default()
    };
    b.create_many(vec![user("b1"), user("b2"), user("b3")])
        .await;
    b.delete("b2", None).await.unwrap();
    a.create(user("a1")).await.unwrap();
    // Replica A has read B's changes before its own (seq 5) was answered.
    assert_eq!(a.last_seq(), 5);
    let text = scrape(&a);
    assert!(text.contains("user_service_users 3\n"), "{text}");
    assert!(text.contains("user_service_last_seq 5\n"), "{text}");
    // One commit by A's writer, of one op.
    assert!(
        text.contains("user_service_write_batch_ops_count 1\n"),
        "{text}"
    );
    a.close().await;
    b.close().await;
    // Closed: every call fails, and a second close returns at once.
    assert!(matches!(
        a.create(user("late")).await,
        Err(StoreError::Internal(_))
    ));
    assert!(matches!(a.get("a1").await, Err(StoreError::Internal(_))));
    a.close().await;
}
