//! The changelog stays bounded: pruned by every replica to the last N
//! changes; a replica whose next change was pruned before it read it ends
//! its SyncUsers streams with ABORTED, never skipping; one that was away for
//! less catches up with no gap.

use std::time::{Duration, Instant};

use tonic::Code;

use test_support::{PATIENCE, postgres::TestSchema, user_named};

use crate::replica::{Replica, Sync, assert_gapless};

/// Runs `query` (one bigint) until `done` says so, bounded.
async fn until(schema: &TestSchema, query: &str, done: impl Fn(i64) -> bool) -> i64 {
    let db = schema.client().await;
    let started = Instant::now();
    loop {
        let value: i64 = db.query_one(query, &[]).await.unwrap().get(0);
        if done(value) {
            return value;
        }
        assert!(started.elapsed() < PATIENCE, "{query}: still {value}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_whose_next_change_was_pruned_ends_its_streams_with_aborted() {
    if test_support::postgres::skip_without_database() {
        return;
    }
    let schema = TestSchema::new().await;
    let a = Replica::start(&schema.url, &[]).await;
    let b = Replica::start(
        &schema.url,
        &["--changelog-keep", "10", "--changelog-prune-interval", "1"],
    )
    .await;
    let mut on_a = Sync::open(&a).await;
    let mut on_b = Sync::open(&b).await;
    let mut client = b.client().await;
    for i in 0..5 {
        client
            .add_user(user_named(&format!("u{i:03}"), "U"))
            .await
            .unwrap();
    }
    assert_gapless(&on_a.changes_through(5).await, 1);

    // A stops where it is; B writes on, and prunes what A has not read.
    a.pause();
    for i in 5..60 {
        client
            .add_user(user_named(&format!("u{i:03}"), "U"))
            .await
            .unwrap();
    }
    until(
        &schema,
        "SELECT min(first_seq) FROM user_change_batches",
        |min| min > 6,
    )
    .await;
    a.resume();

    let status = on_a.ended().await;
    assert_eq!(status.code(), Code::Aborted, "{status:?}");
    assert!(status.message().contains("pruned"), "{}", status.message());
    // B never fell behind: its stream has every change.
    assert_gapless(&on_b.changes_through(60).await, 1);
    // A goes on from the oldest change left: a new stream on it gets the
    // next change (after those A was still catching up with, if any),
    // with no gap.
    let mut again = Sync::open(&a).await;
    client.add_user(user_named("after", "A")).await.unwrap();
    let changes = again.changes_through(61).await;
    assert_gapless(&changes, changes[0].seq);
    assert_eq!(changes.last().unwrap().user.as_ref().unwrap().id, "after");
    // And the changelog holds about the last ten (one a commit here).
    until(
        &schema,
        "SELECT sum(last_seq - first_seq + 1)::int8 FROM user_change_batches",
        |n| n <= 10,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_away_for_less_than_the_changelog_keeps_catches_up_without_a_gap() {
    if test_support::postgres::skip_without_database() {
        return;
    }
    let schema = TestSchema::new().await;
    let a = Replica::start(&schema.url, &[]).await;
    let b = Replica::start(&schema.url, &["--changelog-prune-interval", "1"]).await;
    let mut on_a = Sync::open(&a).await;
    let mut client = b.client().await;
    client.add_user(user_named("first", "F")).await.unwrap();
    assert_eq!(on_a.next_change().await.seq, 1);
    a.pause();
    for i in 0..200 {
        client
            .add_user(user_named(&format!("u{i:03}"), "U"))
            .await
            .unwrap();
    }
    a.resume();
    let changes = on_a.changes_through(201).await;
    assert_gapless(&changes, 2);
}
