//! Clients that vanish mid-call, in every pattern: the server gives back
//! every in-flight slot and subscription.

use user_service::proto::{self, GetUserRequest, ListUsersRequest, SyncRequest};

use crate::{
    common::{TestServer, request_stream, user, within},
    deadlines::start_stuck,
};

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
    let channel = tonic::transport::Endpoint::from_shared(server.url())
        .unwrap()
        .initial_stream_window_size(64 * 1024)
        .initial_connection_window_size(64 * 1024)
        .connect()
        .await
        .unwrap();
    let mut reader = proto::user_service_client::UserServiceClient::new(channel);
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

/// Resident memory of this process (server and client), from /proc.
fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("/proc/self/statm");
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

#[tokio::test]
async fn a_bulk_writer_that_never_stops_is_held_to_bounded_memory() {
    const ROWS: usize = 200_000;
    let server = TestServer::start().await;
    let mut client = server.client().await;
    // Rows of ~1 KiB that fail validation, so nothing is stored: 200 MB
    // streamed in, made lazily on the client side.
    let row = proto::User {
        first_name: String::new(),
        last_name: "x".repeat(1000),
        ..user("")
    };
    let rows = tokio_stream::iter(std::iter::repeat_n(row, ROWS));
    let before = rss_bytes();
    let reply = within("the import", client.bulk_add_users(rows))
        .await
        .unwrap()
        .into_inner();
    let growth = rss_bytes().saturating_sub(before);
    assert_eq!((reply.added, reply.failed), (0, ROWS as u64));
    assert_eq!(reply.errors.len(), 100);
    // Flow control and the import's batch bound what is held at once.
    assert!(growth < 32 << 20, "memory grew by {growth} bytes");
    println!(
        "bulk writer: {ROWS} rows of 1 KiB streamed, RSS grew {} KiB",
        growth >> 10
    );
}
