//! Connection-level limits: the handshake timeout, the connection cap, and
//! gRPC's connection management (GOAWAY when idle or old).

use std::time::Duration;

use bytes::Bytes;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};
use tonic::transport::Endpoint;
use user_service::{
    Config, MemoryStore,
    proto::{SyncRequest, sync_request::Op, user_service_client::UserServiceClient},
};

use test_support::{
    FEED_CAPACITY, TestServer,
    raw::{self, GOAWAY, Recorder},
    request_stream, user, user_with_id, within,
};

async fn start(config: Config) -> TestServer {
    TestServer::start_with(MemoryStore::new(FEED_CAPACITY), config).await
}

/// Waits until the server closes `tcp` (EOF or a reset), reading and
/// dropping whatever it sends first (its SETTINGS).
async fn closed_by_server(mut tcp: TcpStream) {
    let mut buf = [0u8; 1024];
    while let Ok(n) = tcp.read(&mut buf).await {
        if n == 0 {
            return;
        }
    }
}

#[tokio::test]
async fn silent_and_preface_only_connections_are_closed_after_the_handshake_timeout() {
    const EACH: usize = 100;
    let mut config = Config::default();
    config.transport.handshake_timeout = Duration::from_millis(300);
    let server = start(config).await;
    let mut held = Vec::new();
    for _ in 0..EACH {
        held.push(TcpStream::connect(server.addr).await.unwrap());
        let mut preface_only = TcpStream::connect(server.addr).await.unwrap();
        preface_only
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .unwrap();
        held.push(preface_only);
    }
    // Meanwhile, a real client is served.
    let mut client = server.client().await;
    client.add_user(user("Served")).await.unwrap();
    within("the server to close every held connection", async {
        for tcp in held {
            closed_by_server(tcp).await;
        }
    })
    .await;
    assert_eq!(server.connections.handshake_timeouts(), 2 * EACH as u64);
    // The real client's connection finished its handshake: still open.
    client.add_user(user("Again")).await.unwrap();
    assert_eq!(server.connections.open(), 1);
}

#[tokio::test]
async fn connections_past_the_limit_are_closed_and_the_others_served() {
    let mut config = Config::default();
    config.transport.max_connections = 2;
    let server = start(config).await;
    let mut first = server.client().await;
    let mut second = server.client().await;
    first.add_user(user("First")).await.unwrap();
    second.add_user(user("Second")).await.unwrap();

    // A third connection is accepted and closed at once, before any byte.
    let third = TcpStream::connect(server.addr).await.unwrap();
    within("the third connection to be closed", closed_by_server(third)).await;
    assert_eq!(server.connections.refused(), 1);
    // What clients see (grpcio and grpc-go: UNAVAILABLE) is checked by the
    // grpcio suite against the server binary.
    let fourth = TcpStream::connect(server.addr).await.unwrap();
    within(
        "the fourth connection to be closed",
        closed_by_server(fourth),
    )
    .await;
    assert_eq!(server.connections.refused(), 2);

    // The others go on; once one closes, there is room again.
    first.add_user(user("First again")).await.unwrap();
    drop(second);
    within("the second connection to close", async {
        loop {
            if server.connections.open() < 2 {
                break;
            }
            tokio::task::yield_now().await;
        }
    })
    .await;
    server
        .client()
        .await
        .add_user(user("Fourth"))
        .await
        .unwrap();
}

/// An `h2` connection to `addr`, driven in the background; the returned
/// task ends when the connection does.
async fn h2_connect(
    addr: std::net::SocketAddr,
) -> (h2::client::SendRequest<Bytes>, tokio::task::JoinHandle<()>) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    let driver = tokio::spawn(async move {
        let _ = connection.await;
    });
    (client, driver)
}

/// Opens SyncUsers on `client` and sends one delete; returns the stream's
/// two halves once its Ack is in.
async fn open_sync(
    client: &mut h2::client::SendRequest<Bytes>,
) -> (h2::SendStream<Bytes>, h2::RecvStream) {
    let request = http::Request::post("http://localhost/grpcUser.UserService/SyncUsers")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let (response, mut send) = client.send_request(request, false).unwrap();
    send.send_data(delete_request(1), false).unwrap();
    let mut body = within("the reply", response).await.unwrap().into_body();
    within("the Ack", body.data()).await.unwrap().unwrap();
    (send, body)
}

fn delete_request(id: u64) -> Bytes {
    let message = SyncRequest {
        request_id: id,
        op: Some(Op::DeleteId("nobody".into())),
        expected_version: 0,
    };
    Bytes::from(raw::grpc_frame(&prost::Message::encode_to_vec(&message)))
}

#[tokio::test]
async fn an_old_connection_is_sent_goaway_its_stream_goes_on_and_new_calls_reconnect() {
    let mut config = Config::default();
    config.transport.max_connection_age = Some(Duration::from_millis(300));
    config.transport.max_connection_age_grace = None;
    let server = start(config).await;
    let recorder = Recorder::start(server.addr).await;
    let (mut client, _driver) = h2_connect(recorder.addr).await;
    let (mut send, mut body) = open_sync(&mut client).await;

    // h2 sends GOAWAY twice for a graceful shutdown: first with the
    // largest stream id, then, after a ping, with the last one it took.
    recorder.wait_for(GOAWAY, 2).await;
    assert_eq!(server.connections.aged_out(), 1);
    // The stream is not cut: it still answers, and ends cleanly.
    send.send_data(delete_request(2), false).unwrap();
    within("an Ack after GOAWAY", body.data())
        .await
        .unwrap()
        .unwrap();
    // New calls cannot use this connection any more...
    let request = http::Request::post("http://localhost/grpcUser.UserService/GetUser")
        .body(())
        .unwrap();
    let refused = client.send_request(request, true).map(drop).unwrap_err();
    assert!(refused.is_go_away(), "{refused}");
    // ...and a client's next call goes over a new one.
    server.client().await.add_user(user("After")).await.unwrap();
    send.send_data(Bytes::new(), true).unwrap();
    while let Some(data) = within("the end of the stream", body.data()).await {
        data.unwrap();
    }
    let trailers = body.trailers().await.unwrap().unwrap();
    assert_eq!(trailers["grpc-status"], "0");
}

#[tokio::test]
async fn past_the_age_grace_the_connection_is_closed_with_its_calls() {
    let mut config = Config::default();
    config.transport.max_connection_age = Some(Duration::from_millis(200));
    config.transport.max_connection_age_grace = Some(Duration::from_millis(200));
    let server = start(config).await;
    let recorder = Recorder::start(server.addr).await;
    let (mut client, driver) = h2_connect(recorder.addr).await;
    let (_send, mut body) = open_sync(&mut client).await;
    // The stream fails, after a last GOAWAY, and the connection closes.
    let end = within("the stream to be cut", async {
        loop {
            match body.data().await {
                Some(Ok(_)) => {}
                Some(Err(err)) => return Some(err),
                None => return None,
            }
        }
    })
    .await;
    let err = end.expect("the stream ends with an error");
    assert!(err.is_go_away() || err.is_io(), "{err}");
    within("the connection to close", driver).await.unwrap();
    assert!(recorder.count(GOAWAY) >= 2);
    assert_eq!(server.connections.aged_out(), 1);
    server.client().await.add_user(user("After")).await.unwrap();
}

#[tokio::test]
async fn an_idle_connection_is_sent_goaway_and_the_client_reconnects() {
    let mut config = Config::default();
    config.transport.max_connection_idle = Some(Duration::from_millis(200));
    let server = start(config).await;
    let recorder = Recorder::start(server.addr).await;
    let channel = Endpoint::from_shared(format!("http://{}", recorder.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = UserServiceClient::new(channel);
    client.add_user(user("Before")).await.unwrap();
    // The GOAWAY that takes no new stream (after h2's first one and a ping).
    recorder.wait_for(GOAWAY, 2).await;
    assert_eq!(server.connections.idle_closed(), 1);
    client.add_user(user("After")).await.unwrap();
    assert_eq!(recorder.connections(), 2);
}

#[tokio::test]
async fn a_connection_with_a_call_open_is_not_idle() {
    let mut config = Config::default();
    config.transport.max_connection_idle = Some(Duration::from_millis(100));
    let server = start(config).await;
    let streaming = Recorder::start(server.addr).await;
    let channel = Endpoint::from_shared(format!("http://{}", streaming.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = UserServiceClient::new(channel);
    let (requests, stream) = request_stream();
    let mut sync = client.sync_users(stream).await.unwrap().into_inner();
    // Another connection, idle once its call is done, is the clock: once
    // it has been sent GOAWAY, the stream's connection has carried its
    // call for longer than the idle time.
    let clock = Recorder::start(server.addr).await;
    let channel = Endpoint::from_shared(format!("http://{}", clock.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut clock_client = UserServiceClient::new(channel);
    clock_client.add_user(user_with_id("u0")).await.unwrap();
    clock.wait_for(GOAWAY, 1).await;
    within("the change", sync.message()).await.unwrap().unwrap();
    requests
        .send(SyncRequest {
            request_id: 1,
            op: Some(Op::DeleteId("u0".into())),
            expected_version: 0,
        })
        .await
        .unwrap();
    within("the Ack", sync.message()).await.unwrap().unwrap();
    assert_eq!(streaming.count(GOAWAY), 0);
    assert_eq!(server.connections.idle_closed(), 1);
}
