//! Clients that vanish mid-call, in every pattern: the server gives back
//! every in-flight slot and subscription. Memory held for a client that
//! never stops sending, and shutdown under load.

use std::time::Duration;

use user_service::{
    Config, MemoryStore, Store,
    proto::{self, GetUserRequest, ListUsersRequest, SyncRequest},
};

use test_support::{FEED_CAPACITY, TestServer, request_stream, rss_bytes, user, within};

use crate::deadlines::start_stuck;

async fn settled(server: &TestServer) {
    within(
        "the server to let go of the call",
        server
            .gauges
            .wait_until(|g| g.in_flight_calls() == 0 && g.subscribers() == 0),
    )
    .await;
}

#[tokio::test]
async fn a_listing_abandoned_mid_stream_is_released() {
    let server = TestServer::start().await;
    let rows: Vec<proto::User> = (0..5000).map(|i| user(&format!("u{i}"))).collect();
    let mut client = server.client().await;
    client
        .bulk_add_users(tokio_stream::iter(rows))
        .await
        .unwrap();

    // A receive window of ~1000 users, so the listing cannot finish unread.
    let mut reader = server.small_window_client().await;
    let mut stream = reader
        .list_users(ListUsersRequest::default())
        .await
        .unwrap()
        .into_inner();
    within("a user", stream.message()).await.unwrap().unwrap();
    assert_eq!(server.gauges.in_flight_calls(), 1);
    drop(stream);
    drop(reader);
    settled(&server).await;
}

#[tokio::test]
async fn an_import_abandoned_mid_stream_is_released() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let (tx, rows) = request_stream::<proto::User>();
    tx.send(user("first")).await.unwrap();
    let import = tokio::spawn(async move { client.bulk_add_users(rows).await });
    within(
        "the import to start",
        server.gauges.wait_until(|g| g.in_flight_calls() == 1),
    )
    .await;
    import.abort();
    let _ = import.await;
    drop(tx);
    settled(&server).await;
}

#[tokio::test]
async fn a_sync_stream_abandoned_mid_stream_is_released() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let (tx, requests) = request_stream::<SyncRequest>();
    let mut stream = client.sync_users(requests).await.unwrap().into_inner();
    tx.send(SyncRequest {
        request_id: 1,
        op: Some(proto::sync_request::Op::Upsert(user("x"))),
        expected_version: 0,
    })
    .await
    .unwrap();
    within("an event", stream.message()).await.unwrap().unwrap();
    assert_eq!(server.gauges.subscribers(), 1);
    // The whole connection goes, without closing the call.
    drop(stream);
    drop(client);
    drop(tx);
    settled(&server).await;
}

#[tokio::test]
async fn a_unary_call_abandoned_before_its_reply_is_released() {
    let server = start_stuck().await;
    let mut client = server.client().await;
    let call =
        tokio::spawn(async move { client.get_user(GetUserRequest { id: "a".into() }).await });
    within(
        "the call to arrive",
        server.gauges.wait_until(|g| g.in_flight_calls() == 1),
    )
    .await;
    call.abort();
    let _ = call.await;
    settled(&server).await;
}

#[tokio::test]
async fn a_bulk_writer_that_never_stops_is_held_to_bounded_memory() {
    const ROWS: usize = 40_000;
    let server = TestServer::start().await;
    let mut client = server.client().await;
    // Rows of ~2.5 KB that fail validation, so nothing is stored: 100 MB
    // streamed in, made lazily on the client side.
    let row = proto::User {
        first_name: String::new(),
        last_name: "x".repeat(2500),
        ..user("")
    };
    let rows = tokio_stream::iter(std::iter::repeat_n(row, ROWS));
    let before = rss_bytes(std::process::id());
    // Longer than the usual patience: 100 MB through a debug build.
    let reply = tokio::time::timeout(Duration::from_secs(120), client.bulk_add_users(rows))
        .await
        .expect("the import to finish")
        .unwrap()
        .into_inner();
    let growth = rss_bytes(std::process::id()).saturating_sub(before);
    assert_eq!((reply.added, reply.failed), (0, ROWS as u64));
    assert_eq!(reply.errors.len(), 100);
    // Flow control and the import's batch bound what is held at once.
    assert!(growth < 32 << 20, "memory grew by {growth} bytes");
    println!(
        "bulk writer: {ROWS} rows of 2.5 KB streamed, RSS grew {} KiB",
        growth >> 10
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_under_load_loses_no_acknowledged_write() {
    const WRITERS: usize = 8;
    /// Acknowledged writes before shutdown starts.
    const BEFORE: usize = 200;
    let store = MemoryStore::new(FEED_CAPACITY);
    let mut server = TestServer::start_with(store.clone(), Config::default()).await;

    // A SyncUsers stream open throughout: it must end with a status.
    let mut watcher = server.client().await;
    let (_keep_open, requests) = request_stream::<SyncRequest>();
    let mut feed = watcher.sync_users(requests).await.unwrap().into_inner();

    let (acked_tx, mut acked_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let mut client = server.client().await;
        let acked = acked_tx.clone();
        writers.push(tokio::spawn(async move {
            // Writes until the server stops taking them.
            for i in 0.. {
                match client.add_user(user(&format!("w{w}-{i}"))).await {
                    Ok(reply) => {
                        let _ = acked.send(reply.into_inner().user.unwrap().id);
                    }
                    Err(_) => return,
                }
            }
        }));
    }
    drop(acked_tx);
    let mut acknowledged = Vec::new();
    while acknowledged.len() < BEFORE {
        acknowledged.push(
            within("writes before shutdown", acked_rx.recv())
                .await
                .unwrap(),
        );
    }

    server.begin_shutdown();
    let status = loop {
        match within("the feed to end", feed.message()).await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("the feed ended with OK on shutdown"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), tonic::Code::Unavailable);
    for writer in writers {
        within("a writer to stop", writer).await.unwrap();
    }
    while let Some(id) = acked_rx.recv().await {
        acknowledged.push(id);
    }
    within("the server to stop", server.stop()).await.unwrap();

    // Every write a client saw acknowledged is stored.
    for id in &acknowledged {
        store.get(id).await.unwrap();
    }
    assert_eq!(
        store.len(),
        acknowledged.len(),
        "no write stored unacknowledged either"
    );
    println!(
        "shutdown under load: {} acknowledged writes, all stored",
        acknowledged.len()
    );
}
