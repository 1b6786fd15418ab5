//! What a restart finds: every write, and after a clean shutdown one
//! complete file.

use test_support::{user, user_named};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use user_service::proto::{self, sync_response::Event};

use crate::{next_seq, start, upsert};

#[tokio::test]
async fn a_restart_keeps_what_was_written() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("users.db");
    let server = start(&db);
    // The log names the store and its durability. (The address file is
    // written after this line, but the line may not have been collected
    // yet.)
    let listening = server.log_line("user-service listening").await;
    assert!(
        listening.contains(&format!("store=sqlite:{}", db.display()))
            && listening.contains("durability=full"),
        "{listening}"
    );
    let mut client = server.client().await;
    let added = client
        .add_user(user("Ann"))
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    let (tx, requests) = mpsc::channel(16);
    let mut sync = client
        .sync_users(ReceiverStream::new(requests))
        .await
        .unwrap()
        .into_inner();
    for (request_id, expected_version) in [(1, 0), (2, 1)] {
        tx.send(upsert(request_id, user_named("b", "Bob"), expected_version))
            .await
            .unwrap();
    }
    drop(tx);
    let mut last_seq = 0;
    while let Some(response) = sync.message().await.unwrap() {
        if let Some(Event::Ack(ack)) = response.event {
            assert_eq!(ack.code, 0, "{}", ack.message);
            last_seq = ack.seq;
        }
    }
    assert_eq!(last_seq, 3);
    server.kill();

    let server = start(&db);
    let mut client = server.client().await;
    let ann = client
        .get_user(proto::GetUserRequest {
            id: added.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ann, added);
    let bob = client
        .get_user(proto::GetUserRequest { id: "b".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(bob.version, 2);
    assert_eq!(next_seq(&mut client).await, 4);
}

/// A clean shutdown closes the store: the write-ahead log is checkpointed
/// into the file and removed, so that a copy of the file alone, as a backup
/// made after the server stopped would be, holds every user.
#[tokio::test]
async fn sigterm_leaves_every_user_in_the_database_file_alone() {
    /// Enough for a log of several MiB, which takes a while to checkpoint.
    const USERS: u64 = 50_000;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("users.db");
    let wal = dir.path().join("users.db-wal");
    let server = start(&db);
    let mut client = server.client().await;
    let rows = (0..USERS).map(|i| user(&format!("bulk {i}")));
    let report = client
        .bulk_add_users(tokio_stream::iter(rows))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(report.added, USERS);
    client.add_user(user("Ann")).await.unwrap();
    assert!(
        wal.exists(),
        "the log holds the writes while the server runs"
    );
    drop(client);

    // On a blocking thread: this runtime goes on serving the client's side
    // of the connection, which closes when the server says it is stopping.
    let (status, log) = server.stop().await;
    assert!(status.success(), "{status:?}: {log}");
    assert!(!wal.exists(), "the log was checkpointed and removed");
    assert!(!dir.path().join("users.db-shm").exists());
    let backup = tempfile::tempdir().unwrap();
    let copy = backup.path().join("users.db");
    std::fs::copy(&db, &copy).unwrap();
    let conn = rusqlite::Connection::open(&copy).unwrap();
    let users: i64 = conn
        .query_row("SELECT count(*) FROM users", [], |row| row.get(0))
        .unwrap();
    assert_eq!(users, USERS as i64 + 1);
    let seq: i64 = conn
        .query_row("SELECT seq FROM change_seq", [], |row| row.get(0))
        .unwrap();
    assert_eq!(seq, USERS as i64 + 1);
}
