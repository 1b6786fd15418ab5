//! Hostile or broken input gets a proper gRPC status (or, for broken
//! HTTP/2, a closed connection) and the server keeps serving. Compressed
//! calls work both ways.

use prost::Message;
use tonic::codec::CompressionEncoding;
use user_service::proto::{
    GetUserRequest, ListUsersRequest, SyncRequest, sync_request::Op,
    user_service_client::UserServiceClient,
};

use test_support::{
    TestServer,
    raw::{self, RawConn, h2_call},
    user, user_with_id, within,
};

const ADD_USER: &str = "/grpcUser.UserService/AddUser";
const GRPC: &str = "application/grpc";

/// The server still answers a well-formed call.
async fn still_serving(server: &TestServer) {
    within(
        "a call after the bad input",
        server.client().await.add_user(user("Fine")),
    )
    .await
    .unwrap();
}

async fn grpc_status(server: &TestServer, path: &str, content_type: &str, body: Vec<u8>) -> i32 {
    let outcome = h2_call(server.addr, path, content_type, body).await;
    outcome
        .grpc_status
        .unwrap_or_else(|| panic!("no grpc-status: {outcome:?}"))
}

#[tokio::test]
async fn bytes_that_are_not_protobuf_are_internal() {
    let server = TestServer::start().await;
    // Field 1 as a length-delimited string whose length runs past the end.
    let garbage = raw::grpc_frame(&[0x0a, 0xff, 0xff, 0xff, 0x0f, b'x']);
    assert_eq!(
        grpc_status(&server, ADD_USER, GRPC, garbage).await,
        tonic::Code::Internal as i32
    );
    // Invalid UTF-8 in a string field.
    let bad_utf8 = raw::grpc_frame(&[0x0a, 0x02, 0xc3, 0x28]);
    assert_eq!(
        grpc_status(&server, ADD_USER, GRPC, bad_utf8).await,
        tonic::Code::Internal as i32
    );
    still_serving(&server).await;
}

#[tokio::test]
async fn sync_requests_before_a_bad_message_are_applied_then_the_call_fails() {
    let server = TestServer::start().await;
    // Two good requests and a broken one, arriving together: the server
    // reads them as one batch.
    let mut body = Vec::new();
    for (request_id, id) in [(1, "before-1"), (2, "before-2")] {
        let request = SyncRequest {
            request_id,
            op: Some(Op::Upsert(user_with_id(id))),
            expected_version: 0,
        };
        body.extend(raw::grpc_frame(&request.encode_to_vec()));
    }
    body.extend(raw::grpc_frame(&[0x0a, 0xff, 0xff, 0xff, 0x0f, b'x']));
    assert_eq!(
        grpc_status(&server, "/grpcUser.UserService/SyncUsers", GRPC, body).await,
        tonic::Code::Internal as i32
    );
    let mut client = server.client().await;
    for id in ["before-1", "before-2"] {
        let request = GetUserRequest { id: id.into() };
        let stored = client.get_user(request).await.unwrap().into_inner();
        assert_eq!(stored.version, 1, "{id}");
    }
    still_serving(&server).await;
}

#[tokio::test]
async fn a_well_formed_raw_call_succeeds() {
    // The raw client itself works, so the failures above are the input's.
    let server = TestServer::start().await;
    let body = raw::grpc_frame(&user("Raw").encode_to_vec());
    assert_eq!(grpc_status(&server, ADD_USER, GRPC, body).await, 0);
    let body = raw::grpc_frame(&user("Raw2").encode_to_vec());
    assert_eq!(
        grpc_status(&server, ADD_USER, "application/grpc+proto", body).await,
        0
    );
}

#[tokio::test]
async fn a_wrong_content_type_is_refused() {
    let server = TestServer::start().await;
    let body = raw::grpc_frame(&user("Plain").encode_to_vec());
    let outcome = h2_call(server.addr, ADD_USER, "text/plain", body).await;
    assert_eq!(
        outcome.http_status,
        http::StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "{outcome:?}"
    );
    assert_eq!(
        outcome.grpc_status,
        Some(tonic::Code::Internal as i32),
        "{outcome:?}"
    );
    still_serving(&server).await;
}

#[tokio::test]
async fn unknown_methods_and_services_are_unimplemented() {
    let server = TestServer::start().await;
    let body = raw::grpc_frame(&[]);
    for path in ["/grpcUser.UserService/DropUsers", "/no.Such/Service", "/"] {
        assert_eq!(
            grpc_status(&server, path, GRPC, body.clone()).await,
            tonic::Code::Unimplemented as i32,
            "{path}"
        );
    }
    still_serving(&server).await;
}

#[tokio::test]
async fn broken_grpc_framing_is_refused() {
    let server = TestServer::start().await;
    // A length prefix of 100 MiB: over the message limit, refused before
    // anything is buffered.
    let mut huge = vec![0];
    huge.extend_from_slice(&(100u32 << 20).to_be_bytes());
    huge.extend_from_slice(b"abc");
    assert_eq!(
        grpc_status(&server, ADD_USER, GRPC, huge).await,
        tonic::Code::OutOfRange as i32
    );
    // A message cut short by the end of the stream.
    let mut truncated = raw::grpc_frame(&user("Cut").encode_to_vec());
    truncated.truncate(truncated.len() - 3);
    assert_eq!(
        grpc_status(&server, ADD_USER, GRPC, truncated).await,
        tonic::Code::Internal as i32
    );
    // The compressed flag without a grpc-encoding.
    let mut flagged = raw::grpc_frame(&user("Flag").encode_to_vec());
    flagged[0] = 1;
    assert_eq!(
        grpc_status(&server, ADD_USER, GRPC, flagged).await,
        tonic::Code::Internal as i32
    );
    // No message at all for a unary call.
    assert_eq!(
        grpc_status(&server, ADD_USER, GRPC, Vec::new()).await,
        tonic::Code::Internal as i32
    );
    still_serving(&server).await;
}

#[tokio::test]
async fn an_oversized_http2_frame_closes_only_that_connection() {
    let server = TestServer::start().await;
    let mut conn = RawConn::connect(server.addr).await;
    conn.open(1, ADD_USER).await.unwrap();
    // The default SETTINGS_MAX_FRAME_SIZE is 16 KiB.
    let _ = conn
        .send(raw::DATA, raw::END_STREAM, 1, &vec![0; 20_000])
        .await;
    let goaway = conn
        .next_where(|f| f.kind == raw::GOAWAY)
        .await
        .expect("GOAWAY");
    assert_eq!(goaway.error_code(), raw::FRAME_SIZE_ERROR);
    still_serving(&server).await;
}

#[tokio::test]
async fn gzip_and_zstd_work_both_ways() {
    let server = TestServer::start().await;
    for (encoding, name) in [
        (CompressionEncoding::Gzip, "gzip"),
        (CompressionEncoding::Zstd, "zstd"),
    ] {
        let mut client = UserServiceClient::new(server.channel().await)
            .send_compressed(encoding)
            .accept_compressed(encoding);
        let reply = client.add_user(user(name)).await.unwrap();
        assert_eq!(reply.metadata().get("grpc-encoding").unwrap(), name);

        let rows: Vec<_> = (0..50).map(|i| user(&format!("{name}{i}"))).collect();
        let reply = client
            .bulk_add_users(tokio_stream::iter(rows))
            .await
            .unwrap();
        assert_eq!(reply.get_ref().added, 50);

        let listing = client
            .list_users(ListUsersRequest::default())
            .await
            .unwrap();
        assert_eq!(listing.metadata().get("grpc-encoding").unwrap(), name);
        let mut stream = listing.into_inner();
        let mut count = 0;
        while within("a user", stream.message()).await.unwrap().is_some() {
            count += 1;
        }
        assert!(count >= 51);
    }
}
