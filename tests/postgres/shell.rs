//! Rows written with `psql`, which the README offers for looking at the
//! data, into a running replica's database: the schema refuses what breaks
//! the API's limits; a row that gets past it (its constraint dropped) is
//! answered `DATA_LOSS` naming the user while the replica serves the others,
//! and a changelog row the tailer cannot read ends the SyncUsers streams
//! with `DATA_LOSS` and turns health `NOT_SERVING`, never skipping it, until
//! the row is repaired.

use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use user_service::proto::{GetUserRequest, SyncRequest, sync_request::Op};

use test_support::{
    Client, PATIENCE, assert_damaged, list_after,
    postgres::{TestSchema, psql, psql_ok},
    user_named,
};

use crate::replica::{Replica, Sync, wait_for_health};

async fn get(client: &mut Client, id: &str) -> Result<user_service::proto::User, tonic::Status> {
    let request = GetUserRequest { id: id.into() };
    client
        .get_user(request)
        .await
        .map(|reply| reply.into_inner())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn psql_cannot_write_a_user_outside_the_limits() {
    let schema = TestSchema::new().await;
    let replica = Replica::start(&schema.url, &[]).await;
    let mut client = replica.client().await;
    client.add_user(user_named("a", "Ann")).await.unwrap();
    for (sql, rule) in [
        (
            "UPDATE users SET first_name = repeat('x', 70000) WHERE id = 'a'",
            "first_name_rules",
        ),
        (
            "UPDATE users SET first_name = ' ' WHERE id = 'a'",
            "first_name_rules",
        ),
        (
            "INSERT INTO users VALUES ('a b', 'Ann', '', '', false, 1)",
            "id_rules",
        ),
        (
            "UPDATE users SET version = 0 WHERE id = 'a'",
            "version_rules",
        ),
        (
            "INSERT INTO user_change_batches (first_seq, last_seq, changes)
                 VALUES (1000, 999, '')",
            "seq_rules",
        ),
    ] {
        let output = psql(&schema.url, sql);
        assert!(!output.status.success(), "{sql}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains(&format!("violates check constraint \"{rule}\"")),
            "{sql}: {stderr}"
        );
    }
    assert_eq!(get(&mut client, "a").await.unwrap().first_name, "Ann");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_user_the_replica_cannot_read_answers_data_loss_and_the_rest_is_served() {
    let schema = TestSchema::new().await;
    let replica = Replica::start(&schema.url, &[]).await;
    let mut client = replica.client().await;
    for id in ["a", "b", "c"] {
        client.add_user(user_named(id, "N")).await.unwrap();
    }
    // Past the limits, once the constraint is dropped: what an older
    // build's schema, or an operator, lets through.
    psql_ok(
        &schema.url,
        "ALTER TABLE users DROP CONSTRAINT first_name_rules;
         UPDATE users SET first_name = repeat('x', 70000) WHERE id = 'b'",
    );
    assert_damaged(&get(&mut client, "b").await.unwrap_err(), "b");
    for id in ["a", "c"] {
        assert_eq!(get(&mut client, id).await.unwrap().first_name, "N");
    }
    let (ids, status) = list_after(&mut client, "").await;
    assert_eq!(ids, ["a"]);
    assert_damaged(&status.expect("the listing fails at b"), "b");
    let (ids, status) = list_after(&mut client, "b").await;
    assert!(ids == ["c"] && status.is_none(), "{ids:?} {status:?}");

    // A delete of it fails alone; the op after it commits.
    let mut sync = Sync::open(&replica).await;
    let delete = SyncRequest {
        request_id: 1,
        op: Some(Op::DeleteId("b".into())),
        expected_version: 0,
    };
    sync.tx.as_ref().unwrap().send(delete).await.unwrap();
    sync.upsert(2, user_named("d", "Dee"), 0).await;
    let (failed, _) = sync.next_ack().await;
    assert_eq!(failed.code, Code::DataLoss as i32, "{failed:?}");
    assert_eq!(
        failed.message,
        "stored user \"b\" is damaged and cannot be read"
    );
    let (ok, _) = sync.next_ack().await;
    assert_eq!(ok.code, Code::Ok as i32, "{ok:?}");
    let mut health = replica.health().await;
    wait_for_health(&mut health, ServingStatus::Serving, PATIENCE).await;
    let log = replica.log();
    assert!(log.contains("a stored user cannot be read"), "{log}");
    assert!(!log.contains("panicked"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_change_the_tailer_cannot_read_ends_streams_until_it_is_repaired() {
    let schema = TestSchema::new().await;
    let replica = Replica::start(&schema.url, &[]).await;
    let mut health = replica.health().await;
    wait_for_health(&mut health, ServingStatus::Serving, PATIENCE).await;
    let mut client = replica.client().await;
    let mut before = Sync::open(&replica).await;
    client.add_user(user_named("a", "Ann")).await.unwrap();
    assert_eq!(before.next_change().await.seq, 1);

    // A change appended by hand, with the next seq, as the writer would,
    // past the limits: a blank first name. The protobuf of a batch of one
    // change {kind: 2, id: "a", first_name: " ", version: 2}.
    psql_ok(
        &schema.url,
        r"WITH taken AS (UPDATE user_change_seq SET seq = seq + 1 RETURNING seq)
          INSERT INTO user_change_batches (first_seq, last_seq, changes)
          SELECT seq, seq, '\x0a0a08021201611a01203802' FROM taken",
    );
    let status = before.ended().await;
    assert_eq!(status.code(), Code::DataLoss, "{status:?}");
    assert!(
        status.message().contains("change 2"),
        "{}",
        status.message()
    );
    wait_for_health(&mut health, ServingStatus::NotServing, PATIENCE).await;

    // Reads go on, writes commit, and a stream opened meanwhile is ended
    // too, never handed change 3.
    assert_eq!(get(&mut client, "a").await.unwrap().first_name, "Ann");
    let mut during = Sync::open(&replica).await;
    client.add_user(user_named("b", "Bob")).await.unwrap();
    let status = during.ended().await;
    assert_eq!(status.code(), Code::DataLoss, "{status:?}");

    // Repaired, the feed goes on from change 2, and health is back.
    // first_name: "Ann".
    psql_ok(
        &schema.url,
        r"UPDATE user_change_batches SET changes = '\x0a0c08021201611a03416e6e3802'
          WHERE first_seq = 2",
    );
    wait_for_health(&mut health, ServingStatus::Serving, PATIENCE).await;
    let mut after = Sync::open(&replica).await;
    client.add_user(user_named("c", "Cy")).await.unwrap();
    let change = after.next_change().await;
    assert_eq!(change.seq, 4);
    assert_eq!(change.user.unwrap().id, "c");
    let log = replica.log();
    assert!(
        log.contains("a change in the changelog cannot be read"),
        "{log}"
    );
    assert!(!log.contains("panicked"), "{log}");
}
