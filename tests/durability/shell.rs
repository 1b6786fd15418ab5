//! Rows written with the `sqlite3` shell, which the README offers for
//! looking at the data, into the file of a running server: the schema
//! refuses what breaks the API's limits, and what gets past it (text that is
//! not UTF-8, which SQLite's TEXT holds; checks turned off in the shell) is
//! answered `DATA_LOSS` naming the user, while the server goes on serving
//! the others.

use std::{
    path::Path,
    process::{Command, Output},
};

use test_support::{assert_damaged, list_after, user_named, within};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use user_service::proto::{
    GetUserRequest, SyncRequest, sync_request::Op, sync_response::Event,
    user_service_client::UserServiceClient, user_service_server::SERVICE_NAME,
};

use crate::{start, upsert, wait_for_health};

/// Runs `sql` with the sqlite3 shell on `db`, as an operator would; waits
/// for the server's writer if it holds the write lock.
fn sqlite3(db: &Path, sql: &str) -> Output {
    Command::new("sqlite3")
        .args(["-bail", "-cmd", ".timeout 5000"])
        .arg(db)
        .arg(sql)
        .output()
        .expect("the sqlite3 shell (Debian's sqlite3 package; scripts/install-test-tools.sh)")
}

/// [`sqlite3`], which must succeed.
pub(crate) fn sqlite3_ok(db: &Path, sql: &str) {
    let output = sqlite3(db, sql);
    assert!(
        output.status.success(),
        "sqlite3 {sql:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test]
async fn the_shell_cannot_write_a_user_outside_the_limits() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("users.db");
    let server = start(&db);
    let mut client = server.client().await;
    client.add_user(user_named("a", "Ann")).await.unwrap();
    for (sql, rule) in [
        (
            "UPDATE users SET first_name = printf('%.*c', 70000, 'x') WHERE id = 'a'",
            "first_name_rules",
        ),
        (
            "UPDATE users SET first_name = char(12288, 9) WHERE id = 'a'",
            "first_name_rules",
        ),
        (
            "UPDATE users SET address = printf('%.*c', 129, 'é') WHERE id = 'a'",
            "address_rules",
        ),
        (
            "INSERT INTO users VALUES ('a b', 'Ann', '', '', 0, 1)",
            "id_rules",
        ),
        (
            "UPDATE users SET verified = 2 WHERE id = 'a'",
            "verified_rules",
        ),
        (
            "UPDATE users SET version = 0 WHERE id = 'a'",
            "version_rules",
        ),
        ("UPDATE change_seq SET seq = -1", "seq_rules"),
    ] {
        let output = sqlite3(&db, sql);
        assert!(!output.status.success(), "{sql}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains(&format!("CHECK constraint failed: {rule}")),
            "{sql}: {stderr}"
        );
    }
    let ann = client
        .get_user(GetUserRequest { id: "a".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (ann.first_name.as_str(), ann.address.as_str()),
        ("Ann", "1 Long Street, Springfield")
    );
}

#[tokio::test]
async fn a_row_the_server_cannot_read_answers_data_loss_and_the_rest_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("users.db");
    let server = start(&db);
    let channel = server.channel().await;
    let mut client = UserServiceClient::new(channel.clone());
    for id in ["a", "b", "c", "d"] {
        client.add_user(user_named(id, "N")).await.unwrap();
    }
    // Text that is not UTF-8: SQLite's TEXT holds any bytes, and the
    // schema's limits, in bytes, let it through.
    sqlite3_ok(
        &db,
        "UPDATE users SET last_name = CAST(x'c328' AS TEXT) WHERE id = 'b'",
    );
    // A first name of 70,000 characters, with the shell's checks off.
    sqlite3_ok(
        &db,
        "PRAGMA ignore_check_constraints = ON;
         UPDATE users SET first_name = printf('%.*c', 70000, 'x') WHERE id = 'd'",
    );

    for id in ["b", "d"] {
        let request = GetUserRequest { id: id.into() };
        let status = client.get_user(request).await.unwrap_err();
        assert_damaged(&status, id);
    }
    for id in ["a", "c"] {
        let request = GetUserRequest { id: id.into() };
        let user = client.get_user(request).await.unwrap().into_inner();
        assert_eq!(user.first_name, "N");
    }
    // A listing returns the users before a damaged one, then ends with its
    // error; after its id, the listing goes on.
    let (ids, status) = list_after(&mut client, "").await;
    assert_eq!(ids, ["a"]);
    assert_damaged(&status.expect("the listing fails at b"), "b");
    let (ids, status) = list_after(&mut client, "b").await;
    assert_eq!(ids, ["c"]);
    assert_damaged(&status.expect("the listing fails at d"), "d");
    let (ids, status) = list_after(&mut client, "d").await;
    assert!(ids.is_empty() && status.is_none(), "{ids:?} {status:?}");

    // A delete reads the row back (its change carries the user as it was):
    // that op alone fails, and the writer goes on with the others.
    let delete = SyncRequest {
        request_id: 1,
        op: Some(Op::DeleteId("b".into())),
        expected_version: 0,
    };
    let replace = upsert(2, user_named("d", "Dee"), 0);
    let mut sync = client
        .sync_users(tokio_stream::iter([delete, replace]))
        .await
        .unwrap()
        .into_inner();
    let mut acks = Vec::new();
    while let Some(response) = within("a SyncUsers event", sync.message()).await.unwrap() {
        if let Some(Event::Ack(ack)) = response.event {
            acks.push(ack);
        }
    }
    assert_eq!(acks.len(), 2, "{acks:?}");
    assert_eq!(acks[0].code, Code::DataLoss as i32, "{:?}", acks[0]);
    assert_eq!(
        acks[0].message,
        "stored user \"b\" is damaged and cannot be read"
    );
    // An upsert replaces the stored row without reading it: a repair.
    assert_eq!(acks[1].code, Code::Ok as i32, "{:?}", acks[1]);
    let repaired = client
        .get_user(GetUserRequest { id: "d".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((repaired.first_name.as_str(), repaired.version), ("Dee", 2));
    client.add_user(user_named("e", "E")).await.unwrap();
    wait_for_health(channel, SERVICE_NAME, ServingStatus::Serving).await;

    let (status, log) = server.stop().await;
    assert!(status.success(), "{log}");
    assert!(log.contains("a stored user cannot be read"), "{log}");
    assert!(log.contains("not valid UTF-8"), "{log}");
    assert!(!log.contains("panicked"), "{log}");
}
