//! `grpc-timeout` bounds every method, streams included: the call ends with
//! `DEADLINE_EXCEEDED` when the deadline passes, whatever the handler or the
//! stream is doing, and gives back what it held.

use std::{
    future::Future,
    time::{Duration, Instant},
};

use prost::Message;
use tonic::{Code, Request, Status};
use user_service::{
    Config, MemoryStore,
    proto::{self, GetUserRequest, ListUsersRequest, SyncRequest, sync_response::Event},
};

use test_support::{
    FEED_CAPACITY, StuckReads, TestServer, list_all, raw, request_stream, user, within,
};

/// Short enough to keep the tests fast; long enough that every call is well
/// under way when it passes.
const DEADLINE: Duration = Duration::from_millis(500);

pub async fn start_stuck() -> TestServer {
    TestServer::start_with(
        StuckReads::all(MemoryStore::new(FEED_CAPACITY)),
        Config::default(),
    )
    .await
}

fn with_deadline<T>(message: T) -> Request<T> {
    let mut request = Request::new(message);
    request.set_timeout(DEADLINE);
    request
}

/// Runs `call`, which must fail with DEADLINE_EXCEEDED no sooner than the
/// deadline after `started` (taken before the call was made).
async fn expect_deadline_exceeded<T>(
    what: &str,
    started: Instant,
    call: impl Future<Output = Result<T, Status>>,
) {
    let status = match within(what, call).await {
        Ok(_) => panic!("{what}: succeeded past its deadline"),
        Err(status) => status,
    };
    assert_eq!(status.code(), Code::DeadlineExceeded, "{what}: {status:?}");
    assert!(started.elapsed() >= DEADLINE, "{what} ended early");
}

/// The generated client enforces a deadline itself too (and reports
/// CANCELLED), racing the server; calls whose reply is a single message are
/// made with a raw client instead, so that what is tested is the server.
async fn raw_with_deadline(
    server: &TestServer,
    path: &str,
    messages: &[Vec<u8>],
    close: bool,
) -> (h2::client::ResponseFuture, h2::SendStream<bytes::Bytes>) {
    let timeout = format!("{}m", DEADLINE.as_millis());
    let (response, mut send) = raw::h2_open(
        server.addr,
        path,
        &[
            ("content-type", "application/grpc"),
            ("grpc-timeout", &timeout),
        ],
    )
    .await;
    let mut body = Vec::new();
    for message in messages {
        body.extend(raw::grpc_frame(message));
    }
    send.send_data(body.into(), close).unwrap();
    (response, send)
}

/// `started` is taken before the call was opened.
async fn expect_raw_deadline_exceeded(
    what: &str,
    started: Instant,
    response: h2::client::ResponseFuture,
) {
    let outcome = within(what, raw::outcome(response)).await;
    assert_eq!(
        outcome.grpc_status,
        Some(Code::DeadlineExceeded as i32),
        "{what}: {outcome:?}"
    );
    assert!(started.elapsed() >= DEADLINE, "{what} ended early");
}

#[tokio::test]
async fn a_stuck_unary_call_ends_at_its_deadline() {
    let server = start_stuck().await;
    let request = GetUserRequest { id: "a".into() }.encode_to_vec();
    let started = Instant::now();
    let (response, _send) =
        raw_with_deadline(&server, "/grpcUser.UserService/GetUser", &[request], true).await;
    within(
        "the call to arrive",
        server.gauges.wait_until(|g| g.in_flight_calls() == 1),
    )
    .await;
    expect_raw_deadline_exceeded("GetUser", started, response).await;
    within(
        "the slot back",
        server.gauges.wait_until(|g| g.in_flight_calls() == 0),
    )
    .await;
}

#[tokio::test]
async fn a_stuck_listing_ends_at_its_deadline() {
    let server = start_stuck().await;
    let mut client = server.client().await;
    let started = Instant::now();
    let mut stream = client
        .list_users(with_deadline(ListUsersRequest::default()))
        .await
        .unwrap()
        .into_inner();
    expect_deadline_exceeded("ListUsers", started, stream.message()).await;
    within(
        "the slot back",
        server.gauges.wait_until(|g| g.in_flight_calls() == 0),
    )
    .await;
}

#[tokio::test]
async fn an_idle_sync_stream_ends_at_its_deadline() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let (tx, requests) = request_stream::<SyncRequest>();
    let started = Instant::now();
    let mut stream = client
        .sync_users(with_deadline(requests))
        .await
        .unwrap()
        .into_inner();
    // Requests before the deadline are answered as usual.
    tx.send(SyncRequest {
        request_id: 1,
        op: Some(proto::sync_request::Op::Upsert(user("Early"))),
        expected_version: 0,
    })
    .await
    .unwrap();
    let mut acked = false;
    let status = loop {
        match within("SyncUsers", stream.message()).await {
            Ok(Some(response)) => acked |= matches!(response.event, Some(Event::Ack(_))),
            Ok(None) => panic!("SyncUsers ended with OK past its deadline"),
            Err(status) => break status,
        }
    };
    assert!(acked);
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(started.elapsed() >= DEADLINE);
    within(
        "the subscriber to go",
        server
            .gauges
            .wait_until(|g| g.subscribers() == 0 && g.in_flight_calls() == 0),
    )
    .await;
}

#[tokio::test]
async fn an_unfinished_bulk_import_ends_at_its_deadline_keeping_its_rows() {
    let server = TestServer::start().await;
    let mut watcher = server.client().await;
    let (_watch, watch_requests) = request_stream::<SyncRequest>();
    let mut changes = watcher
        .sync_users(watch_requests)
        .await
        .unwrap()
        .into_inner();

    let rows: Vec<Vec<u8>> = (0..3)
        .map(|i| user(&format!("row{i}")).encode_to_vec())
        .collect();
    // The client never closes its stream.
    let started = Instant::now();
    let (response, _send) =
        raw_with_deadline(&server, "/grpcUser.UserService/BulkAddUsers", &rows, false).await;
    // The rows are committed as they arrive...
    for _ in 0..3 {
        within("a change", changes.message())
            .await
            .unwrap()
            .unwrap();
    }
    // ...and the import ends at the deadline with them stored.
    expect_raw_deadline_exceeded("BulkAddUsers", started, response).await;
    let users = list_all(&mut server.client().await).await;
    assert_eq!(users.len(), 3);
    within(
        "the slot back",
        server.gauges.wait_until(|g| g.in_flight_calls() == 1),
    )
    .await;
}

#[tokio::test]
async fn calls_within_their_deadline_are_unaffected() {
    let server = TestServer::start().await;
    let mut client = server.client().await;
    let mut request = Request::new(user("Quick"));
    request.set_timeout(Duration::from_secs(30));
    let id = client
        .add_user(request)
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap()
        .id;
    let mut request = Request::new(GetUserRequest { id });
    request.set_timeout(Duration::from_secs(30));
    client.get_user(request).await.unwrap();
    let mut request = Request::new(ListUsersRequest::default());
    request.set_timeout(Duration::from_secs(30));
    let mut stream = client.list_users(request).await.unwrap().into_inner();
    assert!(stream.message().await.unwrap().is_some());
    assert!(stream.message().await.unwrap().is_none());
}
