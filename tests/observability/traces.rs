//! A call's span, received by an OTLP collector.

use opentelemetry_proto::tonic::{
    collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
        trace_service_server::{TraceService, TraceServiceServer},
    },
    common::v1::any_value::Value,
    trace::v1::{Span, span::SpanKind},
};
use test_support::{ServerProcess, user_with_id, within};
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};

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
    // The client's address, as OpenTelemetry names it; its port is the
    // client's own, whatever the system picked.
    assert_eq!(
        attribute(&call, "client.address"),
        Some(Value::StringValue("127.0.0.1".into()))
    );
    assert!(
        matches!(attribute(&call, "client.port"), Some(Value::IntValue(port)) if port > 0),
        "{call:?}"
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
