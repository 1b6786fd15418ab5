//! Traces: OpenTelemetry spans exported over OTLP (`--otlp-endpoint`),
//! through `tracing-opentelemetry`, or written to stderr
//! (`--trace-stderr`, see [`super::spans`]), or both. Off by default, and
//! then nothing is created: no span, no context extracted from the
//! request.
//!
//! When on, each call gets a span ([`call_span`], ended by [`end_call`])
//! with OpenTelemetry's RPC attributes (`rpc.system`, `rpc.service`,
//! `rpc.method`, `rpc.grpc.status_code`) and the client's address
//! (`client.address`, `client.port`), continuing the client's trace
//! when the request carries a W3C `traceparent`; the store's work for the
//! call shows as child spans ([`store_span`]: the commit the call waited
//! for, with its batch size).

use std::{
    net::SocketAddr,
    sync::atomic::{AtomicBool, Ordering},
};

use opentelemetry::{global, propagation::Extractor, trace::TracerProvider as _};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::{Resource, propagation::TraceContextPropagator, trace::SdkTracerProvider};
use tonic::Code;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use super::spans::StderrSpans;

/// The `tracing` target of every span this module makes: the exporting
/// layer takes these and only these, the log output none of them.
pub const TARGET: &str = "user_service::trace";

/// Whether spans are exported, so made.
static ENABLED: AtomicBool = AtomicBool::new(false);

/// Whether traces are exported: set once, at start, by [`Exporter::start`].
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// The span of one call to `service`/`method` from `client`, a child of
/// the client's span when `headers` carry one (`traceparent`).
pub fn call_span(
    headers: &http::HeaderMap,
    service: &str,
    method: &str,
    client: Option<SocketAddr>,
) -> tracing::Span {
    let span = tracing::info_span!(
        target: TARGET,
        "grpc.server",
        otel.name = format!("{service}/{method}"),
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        rpc.system = "grpc",
        rpc.service = service,
        rpc.method = method,
        rpc.grpc.status_code = tracing::field::Empty,
        client.address = client.map(|client| tracing::field::display(client.ip())),
        // As an i64: the exporter records unsigned integers as text.
        client.port = client.map(|client| i64::from(client.port())),
    );
    let parent =
        global::get_text_map_propagator(|propagator| propagator.extract(&HeaderExtractor(headers)));
    // Fails only when no exporting layer is installed, when there is no
    // trace to continue anyway.
    let _ = span.set_parent(parent);
    span
}

/// Records how the call of `span` ended.
pub fn end_call(span: &tracing::Span, code: Code) {
    span.record("rpc.grpc.status_code", code as i64);
    // OpenTelemetry's convention for servers: only codes that mean the
    // server failed are errors.
    if matches!(
        code,
        Code::Unknown
            | Code::DeadlineExceeded
            | Code::Unimplemented
            | Code::Internal
            | Code::Unavailable
            | Code::DataLoss
    ) {
        span.record("otel.status_code", "ERROR");
    }
}

/// A span for store work of `ops` ops (a commit the call waits for), or
/// `None` when traces are off. Its `batch.ops` (how many ops the commit
/// carried, from every call that shared it) is recorded once known.
pub fn store_span(name: &'static str, ops: usize) -> Option<tracing::Span> {
    enabled().then(|| {
        tracing::info_span!(
            target: TARGET,
            "store",
            otel.name = name,
            ops = ops as i64,
            batch.ops = tracing::field::Empty,
        )
    })
}

/// Reads the `traceparent` (and `tracestate`) of a request.
struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key)?.to_str().ok()
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// Why traces cannot be exported.
#[derive(Debug, thiserror::Error)]
#[error("cannot export traces to {endpoint}: {source}")]
pub struct ExportError {
    endpoint: String,
    source: opentelemetry_otlp::ExporterBuildError,
}

/// Where spans go: an OTLP collector, in batches sent in the background,
/// and stderr, each span as it ends.
#[derive(Debug)]
pub struct Exporter {
    provider: SdkTracerProvider,
}

impl Exporter {
    /// Exports spans from now on to the OTLP (gRPC) collector at `endpoint`
    /// if given, and to `stderr` if given. Call it inside the tokio
    /// runtime: the OTLP exporter's client runs on it.
    pub fn start(
        endpoint: Option<&str>,
        stderr: Option<StderrSpans>,
    ) -> Result<Exporter, ExportError> {
        let mut provider = SdkTracerProvider::builder();
        if let Some(endpoint) = endpoint {
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint)
                .build()
                .map_err(|source| ExportError {
                    endpoint: endpoint.to_owned(),
                    source,
                })?;
            provider = provider.with_batch_exporter(exporter);
        }
        if let Some(stderr) = stderr {
            provider = provider.with_simple_exporter(stderr);
        }
        let provider = provider
            .with_resource(
                Resource::builder()
                    .with_service_name("user-service")
                    .build(),
            )
            .build();
        global::set_text_map_propagator(TraceContextPropagator::new());
        ENABLED.store(true, Ordering::Relaxed);
        Ok(Exporter { provider })
    }

    /// The `tracing` layer that turns this module's spans into exported
    /// ones.
    pub fn layer<S>(&self) -> impl tracing_subscriber::Layer<S>
    where
        S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
    {
        use tracing_subscriber::Layer as _;
        tracing_opentelemetry::layer()
            .with_tracer(self.provider.tracer("user-service"))
            .with_filter(
                tracing_subscriber::filter::Targets::new()
                    .with_target(TARGET, tracing::Level::TRACE),
            )
    }

    /// Sends the spans not sent yet, then stops. Blocks: call it off the
    /// runtime's worker threads, or at the very end.
    pub fn shutdown(self) {
        if let Err(err) = self.provider.shutdown() {
            tracing::warn!(%err, "traces: the last spans could not be sent");
        }
    }
}
