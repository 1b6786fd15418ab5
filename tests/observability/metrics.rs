//! The exact counts after a known set of calls, and the service's own.

use std::time::Duration;

use prost::Message;
use test_support::{
    FEED_CAPACITY, StuckReads, TestServer, http_get, raw, request_stream, user, user_with_id,
    within,
};
use tonic::{Code, Request};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
use user_service::{
    Config, MemoryStore,
    proto::{GetUserRequest, ListUsersRequest, SyncRequest, sync_request::Op},
};

use crate::{labels, parse};

/// The services and methods, with their gRPC type, as the metrics label
/// them.
const METHODS: [(&str, &str, &str); 9] = [
    ("grpcUser.UserService", "AddUser", "unary"),
    ("grpcUser.UserService", "GetUser", "unary"),
    ("grpcUser.UserService", "ListUsers", "server_stream"),
    ("grpcUser.UserService", "BulkAddUsers", "client_stream"),
    ("grpcUser.UserService", "SyncUsers", "bidi_stream"),
    ("grpc.health.v1.Health", "Check", "unary"),
    ("grpc.health.v1.Health", "Watch", "server_stream"),
    (
        "grpc.reflection.v1.ServerReflection",
        "ServerReflectionInfo",
        "bidi_stream",
    ),
    (
        "grpc.reflection.v1alpha.ServerReflection",
        "ServerReflectionInfo",
        "bidi_stream",
    ),
];

const CODES: [&str; 17] = [
    "OK",
    "Canceled",
    "Unknown",
    "InvalidArgument",
    "DeadlineExceeded",
    "NotFound",
    "AlreadyExists",
    "PermissionDenied",
    "ResourceExhausted",
    "FailedPrecondition",
    "Aborted",
    "OutOfRange",
    "Unimplemented",
    "Internal",
    "Unavailable",
    "DataLoss",
    "Unauthenticated",
];

/// What the calls below must add up to, per method: started, messages
/// received and sent, and the calls handled by code (every other code 0).
struct Expected {
    method: &'static str,
    started: f64,
    received: f64,
    sent: f64,
    handled: &'static [(&'static str, f64)],
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_exactly_the_calls_made() {
    // GetUser of "stuck" never ends: the server is still shutting down,
    // and serving its metrics, when they are read at the end.
    let store = StuckReads::get_of(MemoryStore::new(FEED_CAPACITY), "stuck");
    let config = Config {
        shutdown_grace: Duration::from_secs(600),
        ..Config::default()
    };
    let mut server = TestServer::start_with_metrics(store.clone(), config).await;
    let mut client = server.client().await;

    // Unary: 2 OK, 1 invalid, 1 duplicate; 1 OK, 1 unknown id.
    client.add_user(user_with_id("ada")).await.unwrap();
    client.add_user(user_with_id("bob")).await.unwrap();
    let invalid = client.add_user(user(" ")).await.unwrap_err();
    assert_eq!(invalid.code(), Code::InvalidArgument);
    let duplicate = client.add_user(user_with_id("ada")).await.unwrap_err();
    assert_eq!(duplicate.code(), Code::AlreadyExists);
    client
        .get_user(GetUserRequest { id: "ada".into() })
        .await
        .unwrap();
    let missing = client
        .get_user(GetUserRequest {
            id: "nobody".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);

    // Server streaming: a listing of 2 users; an invalid cursor.
    let mut listing = client
        .list_users(ListUsersRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut listed = 0;
    while listing.message().await.unwrap().is_some() {
        listed += 1;
    }
    assert_eq!(listed, 2);
    let refused = client
        .list_users(ListUsersRequest {
            after_id: "a b".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);

    // Client streaming: 3 rows, one invalid.
    let rows = vec![user_with_id("c1"), user(""), user_with_id("c2")];
    let report = client
        .bulk_add_users(tokio_stream::iter(rows))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((report.added, report.failed), (2, 1));

    // Bidirectional: an upsert (its Ack and its Change) and a delete of an
    // unknown id (its Ack), then the client closes its side.
    let (requests, stream) = request_stream();
    let mut sync = client.sync_users(stream).await.unwrap().into_inner();
    requests
        .send(SyncRequest {
            request_id: 1,
            op: Some(Op::Upsert(user_with_id("sy"))),
            expected_version: 0,
        })
        .await
        .unwrap();
    requests
        .send(SyncRequest {
            request_id: 2,
            op: Some(Op::DeleteId("nobody".into())),
            expected_version: 0,
        })
        .await
        .unwrap();
    drop(requests);
    let mut replies = 0;
    while within("a reply", sync.message()).await.unwrap().is_some() {
        replies += 1;
    }
    assert_eq!(replies, 3);

    // A stream the client cancels: it resets it (RST_STREAM, CANCEL).
    let (response, mut send) = raw::h2_open(
        server.addr,
        "/grpcUser.UserService/SyncUsers",
        &[("content-type", "application/grpc")],
    )
    .await;
    within("the reply's head", response).await.unwrap();
    send.send_reset(h2::Reason::CANCEL);
    within(
        "the cancelled stream to end",
        server.gauges.wait_until(|g| g.subscribers() == 0),
    )
    .await;

    // Imports that break off after a row: one the client cancels
    // (RST_STREAM, CANCEL), one whose connection the client closes. Both
    // count the row and are recorded as cancelled; the row is stored once
    // (the second is a duplicate).
    let row = raw::grpc_frame(&user_with_id("broken").encode_to_vec());
    let started = async |conn: &mut raw::RawConn| {
        conn.open(1, "/grpcUser.UserService/BulkAddUsers")
            .await
            .unwrap();
        conn.send(raw::DATA, 0, 1, &row).await.unwrap();
        within(
            "the import to start",
            server.gauges.wait_until(|g| g.in_flight_calls() == 1),
        )
        .await;
    };
    let mut cancelled = raw::RawConn::connect(server.addr).await;
    started(&mut cancelled).await;
    cancelled
        .send(raw::RST_STREAM, 0, 1, &raw::CANCEL.to_be_bytes())
        .await
        .unwrap();
    within(
        "the cancelled import to end",
        server.gauges.wait_until(|g| g.in_flight_calls() == 0),
    )
    .await;
    let mut closed = raw::RawConn::connect(server.addr).await;
    started(&mut closed).await;
    closed.close_write().await.unwrap();
    within(
        "the abandoned import to end",
        server.gauges.wait_until(|g| g.in_flight_calls() == 0),
    )
    .await;

    // A stream still open at its deadline.
    let (_keep_open, stream) = request_stream::<SyncRequest>();
    let mut request = Request::new(stream);
    request.set_timeout(Duration::from_millis(200));
    let mut timed = client.sync_users(request).await.unwrap().into_inner();
    let status = within("the deadline", timed.message()).await.unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded);

    // A health check.
    HealthClient::new(server.channel().await)
        .check(HealthCheckRequest::default())
        .await
        .unwrap();

    // A stream open at shutdown, and a call that keeps the server shutting
    // down.
    let (_keep_open, stream) = request_stream::<SyncRequest>();
    let mut open = client.sync_users(stream).await.unwrap().into_inner();
    let mut stuck_client = server.client().await;
    let stuck = tokio::spawn(async move {
        stuck_client
            .get_user(GetUserRequest { id: "stuck".into() })
            .await
    });
    // Its request counts as received once decoded, which is before its
    // handler reaches the store; it counts as in flight from its head on,
    // before its request is read.
    within(
        "the stuck call's request to reach the store",
        store.wait_until_stuck(1),
    )
    .await;
    server.begin_shutdown();
    let status = within("shutdown to end the stream", open.message())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);
    within(
        "the stream's call to end",
        server.gauges.wait_until(|g| g.in_flight_calls() == 1),
    )
    .await;

    let (status, text) = http_get(server.metrics_addr.unwrap(), "/metrics").await;
    assert_eq!(status, 200);
    let samples = parse(&text);
    let expected = [
        Expected {
            method: "AddUser",
            started: 4.0,
            received: 4.0,
            sent: 2.0,
            handled: &[
                ("OK", 2.0),
                ("InvalidArgument", 1.0),
                ("AlreadyExists", 1.0),
            ],
        },
        Expected {
            method: "GetUser",
            // The stuck call has started, not ended.
            started: 3.0,
            received: 3.0,
            sent: 1.0,
            handled: &[("OK", 1.0), ("NotFound", 1.0)],
        },
        Expected {
            method: "ListUsers",
            started: 2.0,
            received: 2.0,
            sent: 2.0,
            handled: &[("OK", 1.0), ("InvalidArgument", 1.0)],
        },
        Expected {
            method: "BulkAddUsers",
            started: 3.0,
            received: 5.0,
            sent: 1.0,
            handled: &[("OK", 1.0), ("Canceled", 2.0)],
        },
        Expected {
            method: "SyncUsers",
            started: 4.0,
            received: 2.0,
            sent: 3.0,
            handled: &[
                ("OK", 1.0),
                ("Canceled", 1.0),
                ("DeadlineExceeded", 1.0),
                ("Unavailable", 1.0),
            ],
        },
        Expected {
            method: "Check",
            started: 1.0,
            received: 1.0,
            sent: 1.0,
            handled: &[("OK", 1.0)],
        },
    ];
    for (service, method, kind) in METHODS {
        let want = expected.iter().find(|e| e.method == method);
        let base = [
            ("grpc_type", kind),
            ("grpc_service", service),
            ("grpc_method", method),
        ];
        let get = |name: &str, extra: &[(&str, &str)]| {
            let mut all = base.to_vec();
            all.extend_from_slice(extra);
            let key = (name.to_owned(), labels(&all));
            *samples
                .get(&key)
                .unwrap_or_else(|| panic!("no sample {key:?} in:\n{text}"))
        };
        let counts = |e: Option<&Expected>| match e {
            Some(e) => (e.started, e.received, e.sent),
            None => (0.0, 0.0, 0.0),
        };
        assert_eq!(
            (
                get("grpc_server_started_total", &[]),
                get("grpc_server_msg_received_total", &[]),
                get("grpc_server_msg_sent_total", &[]),
            ),
            counts(want),
            "{service}/{method}: started, received, sent"
        );
        let mut ended = 0.0;
        for code in CODES {
            let count = want
                .and_then(|e| e.handled.iter().find(|(c, _)| *c == code))
                .map_or(0.0, |(_, n)| *n);
            ended += count;
            assert_eq!(
                get("grpc_server_handled_total", &[("grpc_code", code)]),
                count,
                "{service}/{method} {code}"
            );
        }
        assert_eq!(
            get("grpc_server_handling_seconds_count", &[]),
            ended,
            "{service}/{method}: one latency per call ended"
        );
    }

    // The service's own figures: users (ada, bob, c1, c2, broken, sy), one
    // change each, nothing refused, one call (the stuck one) in flight.
    let service = |name: &str, extra: &[(&str, &str)]| {
        *samples
            .get(&(name.to_owned(), labels(extra)))
            .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
    };
    assert_eq!(service("user_service_users", &[]), 6.0);
    assert_eq!(service("user_service_last_seq", &[]), 6.0);
    assert_eq!(service("user_service_calls_in_flight", &[]), 1.0);
    assert_eq!(service("user_service_feed_subscribers", &[]), 0.0);
    for limit in ["in_flight", "subscribers", "auth"] {
        assert_eq!(
            service("user_service_calls_refused_total", &[("limit", limit)]),
            0.0
        );
    }
    assert!(service("user_service_connections_accepted_total", &[]) >= 2.0);
    assert!(service("process_resident_memory_bytes", &[]) > 0.0);
    assert!(service("process_open_fds", &[]) > 0.0);
    stuck.abort();
}

#[tokio::test]
async fn refusals_and_lagging_subscribers_are_counted() {
    let mut config = Config::default();
    config.limits.max_subscribers = 1;
    config.auth_token = Some(user_service::auth::AuthToken::new("secret").unwrap());
    let server = TestServer::start_with_metrics(MemoryStore::new(8), config).await;
    let mut client = server.client().await;
    fn with_token<T>(message: T) -> Request<T> {
        let mut request = Request::new(message);
        request
            .metadata_mut()
            .insert("authorization", "Bearer secret".parse().unwrap());
        request
    }
    // The token.
    let refused = client.add_user(user("NoToken")).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    // The subscriber cap, and a subscriber that falls behind a feed of 8.
    let (_keep_open, stream) = request_stream::<SyncRequest>();
    let mut lagging = client
        .sync_users(with_token(stream))
        .await
        .unwrap()
        .into_inner();
    let (_keep_open_too, stream) = request_stream::<SyncRequest>();
    let second = client.sync_users(with_token(stream)).await.unwrap_err();
    assert_eq!(second.code(), Code::ResourceExhausted);
    let rows: Vec<_> = (0..100).map(|i| user(&format!("u{i}"))).collect();
    client
        .bulk_add_users(with_token(tokio_stream::iter(rows)))
        .await
        .unwrap();
    let status = within("the lagging stream to end", async {
        loop {
            if let Err(status) = lagging.message().await {
                return status;
            }
        }
    })
    .await;
    assert_eq!(status.code(), Code::Aborted);

    let (_, text) = http_get(server.metrics_addr.unwrap(), "/metrics").await;
    let samples = parse(&text);
    let get = |name: &str, extra: &[(&str, &str)]| samples[&(name.to_owned(), labels(extra))];
    assert_eq!(
        get("user_service_calls_refused_total", &[("limit", "auth")]),
        1.0
    );
    assert_eq!(
        get(
            "user_service_calls_refused_total",
            &[("limit", "subscribers")]
        ),
        1.0
    );
    assert_eq!(get("user_service_feed_subscribers_lagged_total", &[]), 1.0);
}
