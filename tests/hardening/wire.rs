//! What the server puts on the wire, frame by frame, as clients other than
//! tonic's read it: grpc-go and grpcio take a call's status only from a
//! HEADERS frame with END_STREAM (Trailers-Only) or from trailers, and a
//! stream the server resets counts against the connection.
//!
//! A recording proxy ([`Recorder`]) sits between an `h2` client and the
//! server and notes every frame the server sends; the `h2` client decodes
//! the headers.

use std::net::SocketAddr;

use bytes::Bytes;
use futures::StreamExt;
use prost::Message;
use tokio::net::TcpStream;
use user_service::{
    Config, MemoryStore,
    auth::AuthToken,
    proto::{GetUserRequest, ListUsersRequest, SyncRequest, User, sync_request::Op},
};

use test_support::{
    FEED_CAPACITY, TestServer,
    raw::{self, GOAWAY, HEADERS, RST_STREAM, RawConn, Recorder, Sent, grpc_frame},
    user, user_with_id, within,
};

const END_STREAM: u8 = 0x1;

/// A call made through the recorder: `path`, a request body of `messages`,
/// each in its own DATA frame and END_STREAM in an empty one (as grpc-go
/// sends them), and `headers`. Returns the gRPC status, from the response
/// headers or the trailers, and the frames the server sent for it.
async fn call(
    server: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    messages: &[Vec<u8>],
) -> (Option<String>, Vec<Sent>) {
    let recorder = Recorder::start(server).await;
    let mut all = vec![("content-type", "application/grpc")];
    all.extend_from_slice(headers);
    let (response, mut send) = raw::h2_open(recorder.addr, path, &all).await;
    for message in messages {
        send.send_data(Bytes::from(grpc_frame(message)), false)
            .unwrap();
    }
    send.send_data(Bytes::new(), true).unwrap();
    let status = within("the reply", async {
        let response = response.await.unwrap();
        if let Some(status) = response.headers().get("grpc-status") {
            return Some(status.to_str().unwrap().to_owned());
        }
        let mut body = response.into_body();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.unwrap();
            let _ = body.flow_control().release_capacity(chunk.len());
        }
        let trailers = body.trailers().await.unwrap()?;
        Some(trailers.get("grpc-status")?.to_str().unwrap().to_owned())
    })
    .await;
    // The proxy forwards each frame after recording it, so all of this
    // call's frames are recorded by the time the client has read them.
    (status, recorder.response_frames(1))
}

/// The frames of a Trailers-Only reply: one HEADERS frame that ends the
/// stream.
fn trailers_only() -> Vec<Sent> {
    vec![Sent {
        kind: HEADERS,
        flags: END_STREAM | raw::END_HEADERS,
        stream: 1,
    }]
}

/// With and without a client deadline, as most clients set one.
const DEADLINES: [&[(&str, &str)]; 2] = [&[], &[("grpc-timeout", "10S")]];

fn encoded(message: impl Message) -> Vec<u8> {
    message.encode_to_vec()
}

#[tokio::test]
async fn an_error_reply_is_one_headers_frame_on_every_method_kind() {
    let server = TestServer::start().await;
    let sync_delete = encoded(SyncRequest {
        request_id: 1,
        op: Some(Op::DeleteId("nobody".into())),
        expected_version: 0,
    });
    let cases: [(&str, Vec<Vec<u8>>, &str); 4] = [
        // Unary: an unknown id.
        (
            "/grpcUser.UserService/GetUser",
            vec![encoded(GetUserRequest {
                id: "nobody".into(),
            })],
            "5",
        ),
        // Unary: an invalid user.
        (
            "/grpcUser.UserService/AddUser",
            vec![encoded(User::default())],
            "3",
        ),
        // Server streaming: an invalid cursor.
        (
            "/grpcUser.UserService/ListUsers",
            vec![encoded(ListUsersRequest {
                after_id: "not an id".into(),
                ..Default::default()
            })],
            "3",
        ),
        // An unknown method.
        ("/grpcUser.UserService/Nothing", vec![sync_delete], "12"),
    ];
    for headers in DEADLINES {
        for (path, messages, code) in &cases {
            let (status, frames) = call(server.addr, path, headers, messages).await;
            assert_eq!(status.as_deref(), Some(*code), "{path} {headers:?}");
            assert_eq!(frames, trailers_only(), "{path} {headers:?}");
        }
    }
}

#[tokio::test]
async fn refused_calls_are_one_headers_frame_on_every_method_kind() {
    // Without the token every method is refused before its handler runs,
    // client streaming and bidirectional included.
    let server = TestServer::start_with(
        MemoryStore::new(FEED_CAPACITY),
        Config {
            auth_token: Some(AuthToken::new("secret").unwrap()),
            ..Config::default()
        },
    )
    .await;
    let add = encoded(user("Ann"));
    for headers in DEADLINES {
        for method in [
            "AddUser",
            "GetUser",
            "ListUsers",
            "BulkAddUsers",
            "SyncUsers",
        ] {
            let path = format!("/grpcUser.UserService/{method}");
            let (status, frames) =
                call(server.addr, &path, headers, std::slice::from_ref(&add)).await;
            assert_eq!(status.as_deref(), Some("16"), "{method} {headers:?}");
            assert_eq!(frames, trailers_only(), "{method} {headers:?}");
        }
    }
}

#[tokio::test]
async fn calls_refused_by_a_limit_are_one_headers_frame() {
    let mut config = Config::default();
    config.limits.max_subscribers = 0;
    let server = TestServer::start_with(MemoryStore::new(FEED_CAPACITY), config).await;
    for headers in DEADLINES {
        let (status, frames) =
            call(server.addr, "/grpcUser.UserService/SyncUsers", headers, &[]).await;
        assert_eq!(status.as_deref(), Some("8"), "{headers:?}");
        assert_eq!(frames, trailers_only(), "{headers:?}");
    }
}

#[tokio::test]
async fn a_bulk_import_past_its_deadline_is_one_headers_frame() {
    let server = TestServer::start().await;
    let recorder = Recorder::start(server.addr).await;
    // The client sends one row and never ends its stream.
    let (response, mut send) = raw::h2_open(
        recorder.addr,
        "/grpcUser.UserService/BulkAddUsers",
        &[
            ("content-type", "application/grpc"),
            ("grpc-timeout", "200m"),
        ],
    )
    .await;
    send.send_data(Bytes::from(grpc_frame(&encoded(user("Ann")))), false)
        .unwrap();
    let response = within("the reply", response).await.unwrap();
    assert_eq!(response.headers()["grpc-status"], "4");
    assert_eq!(recorder.response_frames(1), trailers_only());
}

#[tokio::test]
async fn a_reply_with_a_body_ends_with_trailers() {
    let server = TestServer::start().await;
    server
        .client()
        .await
        .add_user(user_with_id("ada"))
        .await
        .unwrap();
    let cases = [
        (
            "/grpcUser.UserService/GetUser",
            encoded(GetUserRequest { id: "ada".into() }),
        ),
        (
            "/grpcUser.UserService/ListUsers",
            encoded(ListUsersRequest::default()),
        ),
    ];
    for headers in DEADLINES {
        for (path, message) in &cases {
            let (status, frames) =
                call(server.addr, path, headers, std::slice::from_ref(message)).await;
            assert_eq!(status.as_deref(), Some("0"), "{path} {headers:?}");
            let kinds: Vec<_> = frames.iter().map(|f| (f.kind, f.flags)).collect();
            assert_eq!(
                kinds,
                [
                    (HEADERS, raw::END_HEADERS),
                    (raw::DATA, 0),
                    (HEADERS, END_STREAM | raw::END_HEADERS),
                ],
                "{path} {headers:?}"
            );
        }
    }
}

/// Calls rejected by the thousand on one connection, each sent as grpc-go
/// sends a unary call (HEADERS, the message, then END_STREAM in an empty
/// DATA frame, without waiting for the reply), are each answered without a
/// reset, and the connection keeps working: h2 counts the streams a server
/// resets and cuts off a client that makes it reset too many.
#[tokio::test]
async fn rejected_calls_do_not_reset_streams_or_the_connection() {
    const CALLS: usize = 3000;
    let mut config = Config {
        auth_token: Some(AuthToken::new("secret").unwrap()),
        ..Config::default()
    };
    config.transport.http2.max_local_error_reset_streams = 64;
    let server = TestServer::start_with(MemoryStore::new(FEED_CAPACITY), config).await;
    let recorder = Recorder::start(server.addr).await;
    let tcp = TcpStream::connect(recorder.addr).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    let message = Bytes::from(grpc_frame(&encoded(user("Ann"))));
    let call = |token: Option<&'static str>| {
        let mut client = client.clone();
        let message = message.clone();
        async move {
            let mut request = http::Request::post("http://localhost/grpcUser.UserService/AddUser")
                .header("content-type", "application/grpc")
                .header("te", "trailers")
                .header("grpc-timeout", "10S");
            if let Some(token) = token {
                request = request.header("authorization", format!("Bearer {token}"));
            }
            client = client.ready().await.unwrap();
            let (response, mut send) = client
                .send_request(request.body(()).unwrap(), false)
                .unwrap();
            send.send_data(message, false).unwrap();
            send.send_data(Bytes::new(), true).unwrap();
            let response = response.await.unwrap();
            match response.headers().get("grpc-status") {
                Some(status) => status.to_str().unwrap().to_owned(),
                None => {
                    let mut body = response.into_body();
                    while let Some(chunk) = body.data().await {
                        let _ = body.flow_control().release_capacity(chunk.unwrap().len());
                    }
                    let trailers = body.trailers().await.unwrap().unwrap();
                    trailers["grpc-status"].to_str().unwrap().to_owned()
                }
            }
        }
    };
    // One call first, so that the client knows the server's settings, then
    // many at a time (fewer than the server's limit on concurrent streams).
    let mut rejected = vec![within("a rejected call", call(None)).await];
    let rest = within("the rejected calls", async {
        futures::stream::iter((1..CALLS).map(|_| call(None)))
            .buffer_unordered(256)
            .collect::<Vec<_>>()
            .await
    })
    .await;
    rejected.extend(rest);
    assert!(rejected.iter().all(|code| code == "16"), "{rejected:?}");
    assert_eq!(within("an accepted call", call(Some("secret"))).await, "0");
    assert_eq!(recorder.count(RST_STREAM), 0, "streams reset");
    assert_eq!(recorder.count(GOAWAY), 0, "connection closed");
}

/// The protection h2 gives against floods of tiny DATA frames still holds:
/// a client that sends 1-byte frames into a stream whose handler has
/// stopped reading (a SyncUsers client that never reads its replies) is cut
/// off with ENHANCE_YOUR_CALM long before it has filled the window, and
/// other clients are served.
#[tokio::test]
async fn a_flood_of_one_byte_data_frames_is_cut_off() {
    let server = TestServer::start().await;
    let mut conn = RawConn::connect(server.addr).await;
    conn.open(1, "/grpcUser.UserService/SyncUsers")
        .await
        .unwrap();
    let (mut reader, mut writer) = conn.split();
    // Frames from the server are read all along, so that its writes never
    // block on a full socket; the client never grants it more window.
    let goaway = tokio::spawn(async move {
        while let Some(frame) = reader.read().await {
            if frame.kind == GOAWAY {
                return Some(frame.error_code());
            }
        }
        None
    });
    // Deletes of unknown ids, one byte per frame: each gets an Ack until
    // the client's 64 KiB window for replies is full, then the handler
    // stops reading and the frames stay buffered in the server.
    let request = grpc_frame(&encoded(SyncRequest {
        request_id: 1,
        op: Some(Op::DeleteId("x".into())),
        expected_version: 0,
    }));
    let mut sent = 0usize;
    // The stream window is 1 MiB: sending that much without being cut off
    // means the budget is gone.
    'flood: while sent < user_service::transport::STREAM_WINDOW as usize {
        for byte in &request {
            if writer.send(raw::DATA, 0, 1, &[*byte]).await.is_err() {
                break 'flood;
            }
            sent += 1;
        }
    }
    let code = within("GOAWAY", goaway).await.unwrap();
    assert_eq!(
        code,
        Some(raw::ENHANCE_YOUR_CALM),
        "after {sent} one-byte frames"
    );
    server.client().await.add_user(user("After")).await.unwrap();
    // Generous: within a few hundred thousand frames, not a million.
    assert!(sent < 500_000, "cut off only after {sent} frames");
}
