//! The playground's limits, and input that breaks the WebSocket protocol:
//! each ends what it must and no more.

use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio_tungstenite::tungstenite::{Message, protocol::frame::coding::CloseCode};
use user_service::{
    Config,
    playground::{MAX_CALLS_PER_WEBSOCKET, MAX_WEBSOCKET_MESSAGE},
};

use super::ws::{Page, server};

const BULK_ADD_USERS: &str = "grpcUser.UserService/BulkAddUsers";

/// The close frame the server ends `page` with.
async fn closed_with(page: &mut Page) -> (CloseCode, String) {
    loop {
        match page.message().await {
            Message::Close(Some(frame)) => return (frame.code, frame.reason.to_string()),
            Message::Close(None) => panic!("closed without a code"),
            _ => continue,
        }
    }
}

#[tokio::test]
async fn calls_per_websocket_are_limited() {
    let server = server(Config::default()).await;
    let mut page = Page::open(server.addr).await;
    for id in 0..MAX_CALLS_PER_WEBSOCKET as u64 {
        page.start(id, BULK_ADD_USERS, None).await;
        // A client stream's reply, headers included, comes at its end.
        page.until(id, |e| e["type"] == "sent").await;
    }
    let over = MAX_CALLS_PER_WEBSOCKET as u64;
    page.start(over, BULK_ADD_USERS, None).await;
    let error = page.next().await;
    assert_eq!(error["type"], "error");
    assert_eq!(error["id"], over);
    assert!(
        error["error"].as_str().unwrap().contains("calls are open"),
        "{error}"
    );
    // Once one ends, another may start.
    page.send(json!({"type": "end", "id": 0})).await;
    page.until_status(0).await;
    page.start(over, BULK_ADD_USERS, None).await;
    page.until(over, |e| e["type"] == "sent").await;
}

#[tokio::test]
async fn a_message_over_the_limit_closes_that_websocket_only() {
    let server = server(Config::default()).await;
    let mut page = Page::open(server.addr).await;
    let mut other = Page::open(server.addr).await;
    let big = json!({"type": "start", "id": 1, "method": BULK_ADD_USERS,
        "message": {"firstName": "x".repeat(MAX_WEBSOCKET_MESSAGE)}});
    page.send(big).await;
    let (code, reason) = closed_with(&mut page).await;
    assert_eq!(code, CloseCode::Size);
    assert!(reason.contains("larger than"), "{reason}");
    // The other WebSocket, and the server, go on.
    other
        .start(1, "grpc.health.v1.Health/Check", Some(json!({})))
        .await;
    assert_eq!(
        other.until_status(1).await.pop().unwrap()["code_name"],
        "OK"
    );
}

#[tokio::test]
async fn a_malformed_frame_closes_that_websocket_with_a_protocol_error() {
    let server = server(Config::default()).await;
    let addr = server.addr;
    // The handshake by hand, then a frame a browser never sends: unmasked
    // (RFC 6455: a server must close the connection).
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let handshake = format!(
        "GET /ws HTTP/1.1\r\nHost: {addr}\r\nOrigin: http://{addr}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\n\r\n"
    );
    tcp.write_all(handshake.as_bytes()).await.unwrap();
    tcp.write_all(&[0x81, 0x02, b'{', b'}']).await.unwrap();
    let mut read = Vec::new();
    test_support::within("the close", tcp.read_to_end(&mut read))
        .await
        .unwrap();
    let read = String::from_utf8_lossy(&read);
    assert!(read.starts_with("HTTP/1.1 101"), "{read}");
    // The close frame: opcode 0x88, then code 1002 (0x03EA).
    let close = read.find('\u{FFFD}').map_or(&read[..], |_| &read[..]);
    assert!(read.contains("protocol error"), "{close}");
    let page = Page::open(addr).await;
    assert_eq!(page.hello["type"], "hello");
}

#[tokio::test]
async fn an_idle_websocket_is_closed_and_one_with_a_call_is_not() {
    let mut config = Config::default();
    config.transport.max_connection_idle = Some(Duration::from_secs(1));
    let server = server(config).await;
    let mut idle = Page::open(server.addr).await;
    let mut busy = Page::open(server.addr).await;
    busy.start(1, "grpcUser.UserService/SyncUsers", None).await;
    busy.until(1, |e| e["type"] == "received").await;
    let (code, reason) = closed_with(&mut idle).await;
    assert_eq!((code, reason.as_str()), (CloseCode::Away, "idle"));
    // Still served, past the idle limit: a change reaches it.
    let mut client = server.client().await;
    client.add_user(test_support::user("Ada")).await.unwrap();
    let change = busy
        .until(1, |e| e["type"] == "received" && e["part"] == "message")
        .await;
    assert_eq!(change["message"]["change"]["kind"], "CREATED");
    busy.socket.close(None).await.unwrap();
}

/// Users listed in the memory test: a listing the page could not hold.
const MILLION: usize = 1_000_000;

/// How much the server's resident memory may grow while a page that reads
/// nothing holds a listing of a million users open. Unbounded, the bridge
/// would hold the whole listing as events (about 150 MB of JSON); bounded,
/// it holds a queue of 64 events, a flow-control window and the socket
/// buffers.
const RSS_BOUND: u64 = 32 * 1024 * 1024;

#[tokio::test]
async fn a_page_that_never_reads_a_listing_of_a_million_users_leaves_server_memory_flat() {
    use test_support::{ServerProcess, rss_bytes, within};
    use user_service::proto;

    let server = ServerProcess::start(env!("CARGO_BIN_EXE_user-service"), &["--store", "memory"]);
    let mut client = server.client().await;
    let users = futures::stream::iter((0..MILLION).map(|i| proto::User {
        id: format!("u{i:07}"),
        first_name: "Ada".into(),
        last_name: "Lovelace".into(),
        address: "12 St James's Square, London".into(),
        ..Default::default()
    }));
    let imported = within("the import", client.bulk_add_users(users))
        .await
        .unwrap();
    assert_eq!(imported.into_inner().added, MILLION as u64);
    let baseline = rss_bytes(server.pid());

    // A page starts the listing and never reads its WebSocket again.
    let mut page = Page::open(server.addr).await;
    page.start(1, "grpcUser.UserService/ListUsers", Some(json!({})))
        .await;
    // A client that reads lists the million users meanwhile: once it has
    // them all, the stalled listing has had as long to run.
    let mut listed = 0;
    let mut stream = client
        .list_users(proto::ListUsersRequest::default())
        .await
        .unwrap()
        .into_inner();
    while within("the listing", stream.message())
        .await
        .unwrap()
        .is_some()
    {
        listed += 1;
    }
    assert_eq!(listed, MILLION);
    let grown = rss_bytes(server.pid()).saturating_sub(baseline);
    assert!(
        grown < RSS_BOUND,
        "the server grew by {} MiB with a page that does not read",
        grown / (1024 * 1024)
    );
    // The page is still served: reading again, it gets its messages.
    let first = page
        .until(1, |e| e["type"] == "received" && e["part"] == "message")
        .await;
    assert_eq!(first["message"]["id"], "u0000000");
    drop(page);
}
