//! Metrics and traces as operators' tools see them: the exact counts after
//! a known set of calls (errors, a cancelled stream, a deadline, a stream
//! ended by shutdown), the exposition checked by `promtool`, a real
//! Prometheus scraping the server, and the span of a call received by an
//! OTLP collector, continuing the client's trace.

use std::{
    collections::HashMap,
    net::SocketAddr,
    process::{Command, Stdio},
    time::Duration,
};

use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::any_value::Value,
    trace::v1::{Span, span::SpanKind},
};
use test_support::{
    FEED_CAPACITY, ServerProcess, StuckReads, TestServer, http_get, raw, request_stream, user,
    user_with_id, within,
};
use tokio::sync::mpsc;
use tonic::{Code, Request, Response, Status};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
use user_service::{
    Config, MemoryStore,
    proto::{GetUserRequest, ListUsersRequest, SyncRequest, sync_request::Op},
};

/// One sample of the exposition: the metric name and its labels, sorted.
type Series = (String, Vec<(String, String)>);

/// Parses the Prometheus text format: every sample, by name and labels.
fn parse(text: &str) -> HashMap<Series, f64> {
    let mut samples = HashMap::new();
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let (series, value) = line.rsplit_once(' ').expect("a value");
        let (name, labels) = match series.split_once('{') {
            Some((name, labels)) => (name, labels.trim_end_matches('}')),
            None => (series, ""),
        };
        let mut labels: Vec<(String, String)> = labels
            .split("\",")
            .filter(|l| !l.is_empty())
            .map(|l| {
                let (k, v) = l.split_once('=').expect("a label");
                (k.to_owned(), v.trim_matches('"').to_owned())
            })
            .collect();
        labels.sort();
        samples.insert((name.to_owned(), labels), value.parse().expect("a number"));
    }
    samples
}

fn labels(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut labels: Vec<_> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    labels.sort();
    labels
}

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
    let mut server = TestServer::start_with_metrics(store, config).await;
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
    within(
        "the stuck call to start",
        server.gauges.wait_until(|g| g.in_flight_calls() == 2),
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
            started: 1.0,
            received: 3.0,
            sent: 1.0,
            handled: &[("OK", 1.0)],
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

    // The service's own figures: users (ada, bob, c1, c2, sy), one change
    // each, nothing refused, one call (the stuck one) in flight.
    let service = |name: &str, extra: &[(&str, &str)]| {
        *samples
            .get(&(name.to_owned(), labels(extra)))
            .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
    };
    assert_eq!(service("user_service_users", &[]), 5.0);
    assert_eq!(service("user_service_last_seq", &[]), 5.0);
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
    let config = Config {
        max_subscribers: 1,
        auth_token: Some(user_service::auth::AuthToken::new("secret").unwrap()),
        ..Config::default()
    };
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

#[tokio::test]
async fn the_exposition_passes_promtool() {
    let server =
        TestServer::start_with_metrics(MemoryStore::new(FEED_CAPACITY), Config::default()).await;
    server.client().await.add_user(user("Ann")).await.unwrap();
    let (status, text) = http_get(server.metrics_addr.unwrap(), "/metrics").await;
    assert_eq!(status, 200);
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect(
            "promtool (Debian's prometheus package; scripts/install-test-tools.sh installs it)",
        );
    use std::io::Write;
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let output = promtool.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A free port on loopback, for a program that takes one (Prometheus).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test]
async fn a_real_prometheus_scrapes_the_server() {
    let server =
        TestServer::start_with_metrics(MemoryStore::new(FEED_CAPACITY), Config::default()).await;
    let mut client = server.client().await;
    for i in 0..3 {
        client.add_user(user(&format!("p{i}"))).await.unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: user-service\n    static_configs:\n      - targets: ['{}']\n",
            server.metrics_addr.unwrap()
        ),
    )
    .unwrap();
    let web: SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let mut prometheus = Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address={web}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect(
            "prometheus (Debian's prometheus package; scripts/install-test-tools.sh installs it)",
        );
    let query = "/api/v1/query?query=grpc_server_handled_total%7Bgrpc_method%3D%22AddUser%22%2Cgrpc_code%3D%22OK%22%7D";
    // Scrapes are every second: the figure shows up within a few.
    let value = within("Prometheus to have scraped the server", async {
        loop {
            // Prometheus takes a moment to listen.
            if let Ok(Ok(_)) = tokio::time::timeout(
                Duration::from_millis(200),
                tokio::net::TcpStream::connect(web),
            )
            .await
            {
                let (status, body) = http_get(web, query).await;
                if status == 200 {
                    let reply: serde_json::Value = serde_json::from_str(&body).unwrap();
                    if let Some(value) = reply["data"]["result"][0]["value"][1].as_str() {
                        break value.to_owned();
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    let _ = prometheus.kill();
    let _ = prometheus.wait();
    assert_eq!(value, "3");
}

/// An OTLP trace collector: every span it is sent.
struct Collector(mpsc::UnboundedSender<Span>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        for resource in request.into_inner().resource_spans {
            for scope in resource.scope_spans {
                for span in scope.spans {
                    let _ = self.0.send(span);
                }
            }
        }
        Ok(Response::new(ExportTraceServiceResponse::default()))
    }
}

fn attribute(span: &Span, key: &str) -> Option<Value> {
    span.attributes
        .iter()
        .find(|a| a.key == key)
        .and_then(|a| a.value.clone()?.value)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_calls_span_continues_the_clients_trace_and_holds_its_commit() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let collector_addr = listener.local_addr().unwrap();
    let (spans_tx, mut spans) = mpsc::unbounded_channel();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(Collector(spans_tx)))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let dir = tempfile::tempdir().unwrap();
    let store = format!("sqlite:{}", dir.path().join("users.db").display());
    let endpoint = format!("http://{collector_addr}");
    let server = ServerProcess::start(
        env!("CARGO_BIN_EXE_user-service"),
        &["--store", &store, "--otlp-endpoint", &endpoint],
    );

    // A client's trace: its trace id and the span the call is made in.
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent_id = "00f067aa0ba902b7";
    let mut request = Request::new(user_with_id("traced"));
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-{parent_id}-01").parse().unwrap(),
    );
    server.client().await.add_user(request).await.unwrap();
    // SIGTERM: the server sends the spans it still holds before it exits.
    let (status, log) = within("the server to stop", server.stop()).await;
    assert!(status.success(), "{log}");

    let hex = |bytes: &[u8]| bytes.iter().map(|b| format!("{b:02x}")).collect::<String>();
    let mut received = Vec::new();
    let call = within("the call's span", async {
        loop {
            let span = spans.recv().await.expect("spans");
            received.push(span.clone());
            if span.name == "grpcUser.UserService/AddUser" {
                break span;
            }
        }
    })
    .await;
    assert_eq!(hex(&call.trace_id), trace_id);
    assert_eq!(hex(&call.parent_span_id), parent_id);
    assert_eq!(call.kind, SpanKind::Server as i32);
    assert_eq!(
        attribute(&call, "rpc.system"),
        Some(Value::StringValue("grpc".into()))
    );
    assert_eq!(
        attribute(&call, "rpc.service"),
        Some(Value::StringValue("grpcUser.UserService".into()))
    );
    assert_eq!(
        attribute(&call, "rpc.method"),
        Some(Value::StringValue("AddUser".into()))
    );
    assert_eq!(
        attribute(&call, "rpc.grpc.status_code"),
        Some(Value::IntValue(0))
    );
    // The commit the call waited for is its child, with its batch size.
    let commit = within("the commit's span", async {
        loop {
            if let Some(span) = received
                .iter()
                .find(|s| s.name == "store.commit" && s.parent_span_id == call.span_id)
            {
                break span.clone();
            }
            received.push(spans.recv().await.expect("spans"));
        }
    })
    .await;
    assert_eq!(commit.trace_id, call.trace_id);
    assert_eq!(attribute(&commit, "batch.ops"), Some(Value::IntValue(1)));
}
