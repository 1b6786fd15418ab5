//! The access log (`--access-log`) and spans on stderr (`--trace-stderr`),
//! read from the real binary's stderr, in both log formats.

use std::{collections::BTreeMap, net::SocketAddr};

use test_support::{ServerProcess, connect_noting_peer, list_all, user_named};
use tonic::{
    Code,
    metadata::MetadataValue,
    transport::{Channel, Endpoint},
};
use user_service::proto::{GetUserRequest, user_service_client::UserServiceClient};

/// One connection to `server`, and the client's address on it.
async fn connect(server: &ServerProcess) -> (Channel, SocketAddr) {
    let endpoint = Endpoint::from_shared(server.url()).unwrap();
    connect_noting_peer(endpoint, server.addr).await
}

/// The fields of a text line after `marker`: `key=value` pairs, values
/// unquoted.
fn text_fields(line: &str, marker: &str) -> BTreeMap<String, String> {
    let (_, fields) = line
        .split_once(marker)
        .unwrap_or_else(|| panic!("no {marker:?} in {line}"));
    fields
        .split(' ')
        .map(|pair| {
            let (key, value) = pair.split_once('=').expect("key=value");
            (key.to_owned(), value.trim_matches('"').to_owned())
        })
        .collect()
}

/// A line's `duration_ms`, which must be a number of milliseconds; taken
/// out of `fields`, so that the rest can be compared exactly.
fn take_duration(fields: &mut BTreeMap<String, String>) {
    let duration = fields.remove("duration_ms").expect("duration_ms");
    let ms: f64 = duration.parse().expect("a number");
    assert!((0.0..60_000.0).contains(&ms), "{duration}");
}

/// What each call's line must say besides its duration:
/// (method, code, messages in, messages out).
const EXPECTED: [(&str, &str, u64, u64); 5] = [
    ("grpcUser.UserService/AddUser", "OK", 1, 1),
    ("grpcUser.UserService/GetUser", "NotFound", 1, 0),
    ("grpcUser.UserService/BulkAddUsers", "OK", 3, 1),
    ("grpcUser.UserService/ListUsers", "OK", 1, 4),
    // A method the server does not serve: in the log, unlike the metrics.
    ("grpcUser.UserService/Nothing", "Unimplemented", 0, 0),
];

/// Calls `/grpcUser.UserService/Nothing`, which no server serves.
async fn call_unknown_method(channel: Channel) {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let codec = tonic_prost::ProstCodec::<GetUserRequest, GetUserRequest>::default();
    let path = http::uri::PathAndQuery::from_static("/grpcUser.UserService/Nothing");
    let status = grpc
        .unary(tonic::Request::new(GetUserRequest::default()), path, codec)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unimplemented);
}

/// Starts the binary with the access log in `format`, makes the calls of
/// [`EXPECTED`] on one connection, and returns the server, each call's
/// line (in order) and the client's address.
async fn logged_calls(format: &str) -> (ServerProcess, Vec<String>, SocketAddr) {
    let server = ServerProcess::start(
        env!("CARGO_BIN_EXE_user-service"),
        &["--store", "memory", "--access-log", "--log-format", format],
    );
    let (channel, peer) = connect(&server).await;
    let mut client = UserServiceClient::new(channel.clone());
    client.add_user(user_named("ada", "Ada")).await.unwrap();
    let missing = client
        .get_user(GetUserRequest {
            id: "nobody".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    let rows = ["b", "c", "d"].map(|id| user_named(id, "N"));
    let report = client
        .bulk_add_users(tokio_stream::iter(rows))
        .await
        .unwrap();
    assert_eq!(report.into_inner().added, 3);
    assert_eq!(list_all(&mut client).await.len(), 4);
    call_unknown_method(channel).await;
    let mut lines = Vec::new();
    for (method, ..) in EXPECTED {
        let quoted = format!("\"{method}\"");
        let bare = format!("method={method} ");
        let wanted = if format == "json" { &quoted } else { &bare };
        lines.push(server.log_line(wanted).await);
    }
    (server, lines, peer)
}

#[tokio::test]
async fn the_access_log_has_one_text_line_per_call() {
    let (server, lines, peer) = logged_calls("text").await;
    for (line, (method, code, received, sent)) in lines.iter().zip(EXPECTED) {
        assert!(line.contains(" INFO user_service::access: call "), "{line}");
        let mut fields = text_fields(line, "user_service::access: call ");
        take_duration(&mut fields);
        let expected: BTreeMap<String, String> = [
            ("method", method.to_owned()),
            ("peer", peer.to_string()),
            ("grpc_code", code.to_owned()),
            ("messages_in", received.to_string()),
            ("messages_out", sent.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        assert_eq!(fields, expected, "{line}");
    }
    // One line per call, no more.
    let log = server.log();
    assert_eq!(
        log.matches("method=grpcUser.UserService/AddUser ").count(),
        1,
        "{log}"
    );
}

#[tokio::test]
async fn the_access_log_has_one_json_object_per_call() {
    let (_server, lines, peer) = logged_calls("json").await;
    for (line, (method, code, received, sent)) in lines.iter().zip(EXPECTED) {
        let object: serde_json::Value = serde_json::from_str(line).unwrap();
        assert_eq!(object["target"], "user_service::access", "{line}");
        assert_eq!(object["level"], "INFO", "{line}");
        let mut fields = object["fields"].as_object().unwrap().clone();
        let duration = fields.remove("duration_ms").unwrap();
        assert!(duration.as_f64().unwrap() >= 0.0, "{line}");
        assert_eq!(
            serde_json::Value::Object(fields),
            serde_json::json!({
                "message": "call",
                "method": method,
                "peer": peer.to_string(),
                "grpc_code": code,
                "messages_in": received,
                "messages_out": sent,
            }),
            "{line}"
        );
    }
}

#[tokio::test]
async fn without_the_flag_no_call_is_logged() {
    let server = ServerProcess::start(env!("CARGO_BIN_EXE_user-service"), &["--store", "memory"]);
    let mut client = server.client().await;
    client.add_user(user_named("ada", "Ada")).await.unwrap();
    let (status, log) = server.stop().await;
    assert!(status.success(), "{log}");
    assert!(!log.contains("user_service::access"), "{log}");
}

/// A client's trace: a W3C `traceparent` with these ids.
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN_ID: &str = "00f067aa0ba902b7";

/// Starts the binary with spans on stderr in `format` on a SQLite store,
/// makes one AddUser in the client's trace, and returns the call's span
/// line and its commit's.
async fn span_lines(format: &str) -> (String, String) {
    let dir = tempfile::tempdir().unwrap();
    let store = format!("sqlite:{}", dir.path().join("users.db").display());
    let server = ServerProcess::start(
        env!("CARGO_BIN_EXE_user-service"),
        &["--store", &store, "--trace-stderr", "--log-format", format],
    );
    let mut client = server.client().await;
    let mut request = tonic::Request::new(user_named("ada", "Ada"));
    let traceparent = format!("00-{TRACE_ID}-{CLIENT_SPAN_ID}-01");
    request.metadata_mut().insert(
        "traceparent",
        MetadataValue::try_from(traceparent.as_str()).unwrap(),
    );
    client.add_user(request).await.unwrap();
    let (call, commit) = if format == "json" {
        (
            r#""span":"grpcUser.UserService/AddUser""#,
            r#""span":"store.commit""#,
        )
    } else {
        (" SPAN grpcUser.UserService/AddUser ", " SPAN store.commit ")
    };
    (server.log_line(call).await, server.log_line(commit).await)
}

#[tokio::test]
async fn spans_go_to_stderr_as_text_lines() {
    let (call, commit) = span_lines("text").await;
    let call_fields = text_fields(&call, " SPAN grpcUser.UserService/AddUser ");
    let commit_fields = text_fields(&commit, " SPAN store.commit ");
    for (key, value) in [
        ("trace_id", TRACE_ID),
        ("parent_span_id", CLIENT_SPAN_ID),
        ("kind", "server"),
        ("status", "unset"),
        ("rpc.system", "grpc"),
        ("rpc.service", "grpcUser.UserService"),
        ("rpc.method", "AddUser"),
        ("rpc.grpc.status_code", "0"),
        ("client.address", "127.0.0.1"),
    ] {
        assert_eq!(
            call_fields.get(key).map(String::as_str),
            Some(value),
            "{key}: {call}"
        );
    }
    assert_eq!(commit_fields["trace_id"], TRACE_ID, "{commit}");
    assert_eq!(
        commit_fields["parent_span_id"], call_fields["span_id"],
        "{commit}"
    );
    assert_eq!(commit_fields["batch.ops"], "1", "{commit}");
    let mut call_fields = call_fields;
    take_duration(&mut call_fields);
}

#[tokio::test]
async fn spans_go_to_stderr_as_json_objects() {
    let (call, commit) = span_lines("json").await;
    let call: serde_json::Value = serde_json::from_str(&call).unwrap();
    let commit: serde_json::Value = serde_json::from_str(&commit).unwrap();
    assert_eq!(call["trace_id"], TRACE_ID, "{call}");
    assert_eq!(call["parent_span_id"], CLIENT_SPAN_ID, "{call}");
    assert_eq!(call["kind"], "server", "{call}");
    assert_eq!(call["status"], "unset", "{call}");
    assert_eq!(
        call["status_description"],
        serde_json::Value::Null,
        "{call}"
    );
    assert!(call["duration_ms"].as_f64().unwrap() >= 0.0, "{call}");
    let attributes = &call["attributes"];
    assert_eq!(attributes["rpc.method"], "AddUser", "{call}");
    assert_eq!(attributes["rpc.grpc.status_code"], 0, "{call}");
    assert_eq!(attributes["client.address"], "127.0.0.1", "{call}");
    assert!(call["timestamp"].as_str().unwrap().ends_with('Z'), "{call}");
    assert_eq!(commit["trace_id"], TRACE_ID, "{commit}");
    assert_eq!(commit["parent_span_id"], call["span_id"], "{commit}");
    assert_eq!(commit["attributes"]["batch.ops"], 1, "{commit}");
}
