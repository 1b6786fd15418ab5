//! Each transport and call limit is on, and excess is refused at once.

use std::{
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use tonic::{Code, Request, metadata::MetadataValue};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
use user_service::{
    Config, MemoryStore,
    proto::{self, SyncRequest},
};

use test_support::{
    FEED_CAPACITY, TestServer,
    raw::{self, RawConn},
    request_stream, user, within,
};

async fn start(config: Config) -> TestServer {
    TestServer::start_with(MemoryStore::new(FEED_CAPACITY), config).await
}

#[tokio::test]
async fn messages_over_the_size_limit_are_refused_both_ways() {
    let mut config = Config::default();
    config.limits.max_message_size = 1024;
    let server = start(config).await;
    let mut client = server.client().await;

    // Decoding: a request over the limit.
    let big = proto::User {
        address: "x".repeat(2000),
        ..user("Big")
    };
    let status = client.add_user(big).await.unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");

    // Encoding: a reply over the limit (100 reported errors of ~60 bytes).
    let (tx, rows) = request_stream::<proto::User>();
    for _ in 0..100 {
        tx.send(user("")).await.unwrap();
    }
    drop(tx);
    let status = client.bulk_add_users(rows).await.unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");

    // The connection still serves calls within the limit.
    client.add_user(user("Small")).await.unwrap();
}

#[tokio::test]
async fn streams_past_the_per_connection_limit_are_refused() {
    let mut config = Config::default();
    config.transport.http2.max_concurrent_streams = 4;
    let server = start(config).await;

    // Advertised to well-behaved clients...
    let tcp = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    let connection = tokio::spawn(connection);
    let mut client = within("settings", client.ready()).await.unwrap();
    // The limit arrives with the server's first SETTINGS frame; one call
    // makes sure it has been read.
    let (response, _send) = client
        .send_request(
            http::Request::post(format!(
                "http://{}/grpc.health.v1.Health/Check",
                server.addr
            ))
            .header("content-type", "application/grpc")
            .body(())
            .unwrap(),
            true,
        )
        .unwrap();
    within("a response", response).await.unwrap();
    assert_eq!(client.current_max_send_streams(), 4);
    connection.abort();

    // ...and enforced on one that ignores it: four SyncUsers streams stay
    // open, the fifth is refused.
    let mut conn = RawConn::connect(server.addr).await;
    for stream in [1, 3, 5, 7, 9] {
        conn.open(stream, "/grpcUser.UserService/SyncUsers")
            .await
            .unwrap();
    }
    let refused = conn
        .next_where(|f| f.kind == raw::RST_STREAM)
        .await
        .expect("a reset");
    assert_eq!(refused.stream, 9);
    assert_eq!(refused.error_code(), raw::REFUSED_STREAM);
    within(
        "the four streams to count",
        server.gauges.wait_until(|g| g.subscribers() == 4),
    )
    .await;
}

#[tokio::test]
async fn a_peer_that_makes_the_server_reset_streams_is_disconnected() {
    const LIMIT: usize = 8;
    let mut config = Config::default();
    config.transport.http2.max_local_error_reset_streams = LIMIT;
    let server = start(config).await;
    let mut conn = RawConn::connect(server.addr).await;
    // A WINDOW_UPDATE that overflows a stream's window is a stream error:
    // the server resets the stream ("MadeYouReset"). Past the limit it sends
    // GOAWAY instead.
    for i in 0..(LIMIT as u32 * 4) {
        let stream = 1 + 2 * i;
        let overflow = 0x7fff_ffffu32.to_be_bytes();
        if conn
            .open(stream, "/grpcUser.UserService/SyncUsers")
            .await
            .is_err()
            || conn
                .send(raw::WINDOW_UPDATE, 0, stream, &overflow)
                .await
                .is_err()
        {
            break; // the server has closed the connection
        }
    }
    let goaway = conn
        .next_where(|f| f.kind == raw::GOAWAY)
        .await
        .expect("GOAWAY");
    assert_eq!(goaway.error_code(), raw::ENHANCE_YOUR_CALM);

    // Other clients are served.
    server.client().await.add_user(user("After")).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rapid_reset_burst_does_not_stop_other_clients() {
    /// Resets the attacker sends, over as many connections as it takes.
    const BURST: usize = 5000;
    /// Calls the other client makes at least, while the burst goes on.
    const CALLS: usize = 50;
    let server = start(Config::default()).await;
    let addr = server.addr;
    let sent = Arc::new(AtomicUsize::new(0));

    // HEADERS then RST_STREAM, again and again. The server may cut a
    // connection off (GOAWAY with ENHANCE_YOUR_CALM: h2's Rapid-Reset
    // defence); the attacker then reconnects and goes on.
    let attacker = tokio::spawn({
        let sent = sent.clone();
        async move {
            let mut cut_off = 0;
            'connections: while sent.load(Ordering::Acquire) < BURST {
                let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
                let (mut client, connection) = h2::client::handshake(tcp).await.unwrap();
                let connection = tokio::spawn(connection);
                while sent.load(Ordering::Acquire) < BURST {
                    let call = match client.clone().ready().await {
                        Ok(ready) => {
                            client = ready;
                            let request = http::Request::post(format!(
                                "http://{addr}/grpcUser.UserService/ListUsers"
                            ))
                            .header("content-type", "application/grpc")
                            .header("te", "trailers")
                            .body(())
                            .unwrap();
                            client.send_request(request, false)
                        }
                        Err(err) => Err(err),
                    };
                    match call {
                        Ok((_response, mut send)) => send.send_reset(h2::Reason::CANCEL),
                        Err(err) => {
                            // GOAWAY, or the socket closed right after it.
                            let calm = err.is_go_away()
                                && err.is_remote()
                                && err.reason() == Some(h2::Reason::ENHANCE_YOUR_CALM);
                            assert!(calm || err.is_io(), "{err}");
                            cut_off += 1;
                            connection.abort();
                            continue 'connections;
                        }
                    }
                    if sent.fetch_add(1, Ordering::AcqRel).is_multiple_of(64) {
                        tokio::task::yield_now().await;
                    }
                }
                connection.abort();
            }
            cut_off
        }
    });

    // Meanwhile another client's calls keep succeeding, for as long as the
    // burst lasts.
    let mut client = server.client().await;
    let mut calls = 0;
    // A generous bound: the burst is CPU-bound and CI machines are shared.
    tokio::time::timeout(Duration::from_secs(120), async {
        while calls < CALLS || !attacker.is_finished() {
            let reply = client.add_user(user(&format!("c{calls}"))).await.unwrap();
            let id = reply.into_inner().user.unwrap().id;
            client.get_user(proto::GetUserRequest { id }).await.unwrap();
            calls += 1;
        }
    })
    .await
    .expect("the burst to end");
    let cut_off = attacker.await.unwrap();
    println!(
        "rapid reset: {} HEADERS+RST_STREAM sent, {cut_off} connections cut off \
         (ENHANCE_YOUR_CALM); {calls} call pairs served meanwhile",
        sent.load(Ordering::Acquire)
    );
    // Nothing the burst started is still held.
    within(
        "in-flight calls to drain",
        server.gauges.wait_until(|g| g.in_flight_calls() == 0),
    )
    .await;
}

#[tokio::test]
async fn oversized_headers_are_refused() {
    let mut config = Config::default();
    config.transport.http2.max_header_list_size = 4096;
    let server = start(config).await;

    // Through the generated client: one large metadata value.
    let mut client = server.client().await;
    let mut request = Request::new(proto::GetUserRequest { id: "a".into() });
    let big: MetadataValue<_> = "v".repeat(8192).parse().unwrap();
    request.metadata_mut().insert("x-padding", big);
    let status = client.get_user(request).await.unwrap_err();
    // h2 answers HTTP 431 before any gRPC code runs; a gRPC client maps a
    // status-less HTTP error to UNKNOWN.
    assert_eq!(status.code(), Code::Unknown, "{status:?}");
    assert!(status.message().contains("431"), "{status:?}");

    // A CONTINUATION flood: one header block that never ends. The server
    // gives up on the connection instead of buffering it.
    let mut conn = RawConn::connect(server.addr).await;
    let mut first = raw::request_headers("/grpcUser.UserService/GetUser", "application/grpc");
    raw::push_literal(&mut first, b"x-flood", &[b'a'; 1000]);
    conn.send(raw::HEADERS, 0, 1, &first).await.unwrap();
    let mut chunk = Vec::new();
    for i in 0..10 {
        raw::push_literal(&mut chunk, format!("x-flood-{i}").as_bytes(), &[b'b'; 1000]);
    }
    let mut sent = 0;
    while sent < 64 * 1024 * 1024 {
        if conn.send(raw::CONTINUATION, 0, 1, &chunk).await.is_err() {
            break;
        }
        sent += chunk.len();
    }
    assert!(
        sent < 64 * 1024 * 1024,
        "the server read a 64 MiB header block"
    );
    let end = conn.next_where(|f| f.kind == raw::GOAWAY).await;
    if let Some(goaway) = end {
        assert_ne!(goaway.error_code(), 0, "{goaway:?}");
    }

    // Other clients are served.
    server.client().await.add_user(user("After")).await.unwrap();
}

#[tokio::test]
async fn idle_connections_are_pinged_and_closed_when_silent() {
    let mut config = Config::default();
    config.transport.http2.keepalive_interval = Some(Duration::from_millis(100));
    // Long enough for a busy client to answer, short for the test.
    config.transport.http2.keepalive_timeout = Duration::from_secs(1);
    let server = start(config).await;
    let mut conn = RawConn::connect(server.addr).await;
    let ping = conn
        .next_where(|f| f.kind == raw::PING)
        .await
        .expect("a ping");
    assert_eq!(ping.flags & raw::ACK, 0);
    // Not answered: the server closes the connection.
    while let Some(frame) = conn.read().await {
        assert_ne!(frame.kind, raw::HEADERS, "unexpected {frame:?}");
    }
    // A client that answers pings stays connected past several intervals.
    let mut client = server.client().await;
    let (_keep_open, requests) = request_stream::<SyncRequest>();
    let mut sync = client.sync_users(requests).await.unwrap().into_inner();
    let mut other = server.client().await;
    for i in 0..3 {
        // Each AddUser shows up on the open stream; waits are by event.
        other.add_user(user(&format!("u{i}"))).await.unwrap();
        within("a change", sync.message()).await.unwrap().unwrap();
    }
}

#[tokio::test]
async fn calls_past_the_in_flight_cap_are_refused_at_once() {
    let mut config = Config::default();
    config.limits.max_in_flight_calls = 2;
    let server = start(config).await;
    let mut client = server.client().await;
    let (a, requests_a) = request_stream::<SyncRequest>();
    let (_b, requests_b) = request_stream::<SyncRequest>();
    let sync_a = client.sync_users(requests_a).await.unwrap().into_inner();
    let _sync_b = client.sync_users(requests_b).await.unwrap().into_inner();
    assert_eq!(server.gauges.in_flight_calls(), 2);

    let status = client.add_user(user("Third")).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    let status = client
        .get_user(proto::GetUserRequest { id: "x".into() })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    // Health is not counted, so probes still answer.
    HealthClient::new(server.channel().await)
        .check(HealthCheckRequest::default())
        .await
        .unwrap();

    // A finished call gives its slot back.
    drop((a, sync_a));
    within(
        "a slot to free",
        server.gauges.wait_until(|g| g.in_flight_calls() == 1),
    )
    .await;
    client.add_user(user("Third")).await.unwrap();
    assert_eq!(server.gauges.in_flight_calls(), 1);
}

#[tokio::test]
async fn sync_streams_past_the_subscriber_cap_are_refused() {
    let mut config = Config::default();
    config.limits.max_subscribers = 1;
    let server = start(config).await;
    let mut client = server.client().await;
    let (a, requests_a) = request_stream::<SyncRequest>();
    let first = client.sync_users(requests_a).await.unwrap().into_inner();
    assert_eq!(server.gauges.subscribers(), 1);

    let (_b, requests_b) = request_stream::<SyncRequest>();
    let status = client.sync_users(requests_b).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    // The refused call let go of its in-flight slot before its reply went
    // out, though the client has not ended its request stream.
    assert_eq!(server.gauges.in_flight_calls(), 1);
    // Other calls are not affected.
    client.add_user(user("Other")).await.unwrap();

    drop((a, first));
    within(
        "the subscriber to go",
        server.gauges.wait_until(|g| g.subscribers() == 0),
    )
    .await;
    let (_c, requests_c) = request_stream::<SyncRequest>();
    client.sync_users(requests_c).await.unwrap();
}
