//! What is recorded of each call: metrics and a trace span.
//!
//! **Metrics**, under the names grpc-go's and grpc-ecosystem's Prometheus
//! interceptors use, so that existing dashboards work:
//! `grpc_server_started_total`, `grpc_server_handled_total` (with
//! `grpc_code`), `grpc_server_msg_received_total`,
//! `grpc_server_msg_sent_total` and `grpc_server_handling_seconds`, each
//! labelled `grpc_type`, `grpc_service` and `grpc_method`.
//!
//! **An access log line** per call when `--access-log` is on (see
//! [`super::access`]), written when the call's status is known.
//!
//! **A span** per call when traces are exported (see [`super::trace`]),
//! with OpenTelemetry's `rpc.*` attributes, the client's address and the
//! call's status, a child of the client's span when the request carries a
//! W3C `traceparent`; the handler and the response stream run inside it,
//! so store work shows as its children.
//!
//! [`ObserveCalls`] is a tower layer around the call guard, the one
//! observer of calls that all three are made from. The status of a
//! call is known only at its end: in the trailers, or in the head of a
//! Trailers-Only reply. A call that ends without one (the client reset the
//! stream, the connection dropped) is recorded as `Canceled`, as grpc-go
//! records a cancelled call.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll, ready},
    time::Instant,
};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, histogram::Histogram},
    registry::Registry,
};
use tonic::{Code, Status};
use tower_service::Service;

use super::{
    access::{self, CODE_NAMES},
    messages::Messages,
    trace,
};
use crate::transport;

/// What kind of call a method is, as the `grpc_type` label says it.
#[derive(Debug, Clone, Copy)]
pub(super) enum Kind {
    Unary,
    ClientStream,
    ServerStream,
    BidiStream,
}

impl Kind {
    fn label(self) -> &'static str {
        match self {
            Kind::Unary => "unary",
            Kind::ClientStream => "client_stream",
            Kind::ServerStream => "server_stream",
            Kind::BidiStream => "bidi_stream",
        }
    }
}

/// Every method served on the port, as (service, method, kind). Calls to other paths (which are
/// `UNIMPLEMENTED`) are not recorded: a label per path a client makes up
/// would grow the metrics without bound.
pub(super) const METHODS: [(&str, &str, Kind); 9] = [
    ("grpcUser.UserService", "AddUser", Kind::Unary),
    ("grpcUser.UserService", "GetUser", Kind::Unary),
    ("grpcUser.UserService", "ListUsers", Kind::ServerStream),
    ("grpcUser.UserService", "BulkAddUsers", Kind::ClientStream),
    ("grpcUser.UserService", "SyncUsers", Kind::BidiStream),
    ("grpc.health.v1.Health", "Check", Kind::Unary),
    ("grpc.health.v1.Health", "Watch", Kind::ServerStream),
    (
        "grpc.reflection.v1.ServerReflection",
        "ServerReflectionInfo",
        Kind::BidiStream,
    ),
    (
        "grpc.reflection.v1alpha.ServerReflection",
        "ServerReflectionInfo",
        Kind::BidiStream,
    ),
];

/// The index in [`METHODS`] of the method a request path names.
fn method_of(path: &str) -> Option<usize> {
    let (service, method) = path.strip_prefix('/')?.split_once('/')?;
    METHODS
        .iter()
        .position(|(s, m, _)| *s == service && *m == method)
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    grpc_type: &'static str,
    grpc_service: &'static str,
    grpc_method: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HandledLabels {
    grpc_type: &'static str,
    grpc_service: &'static str,
    grpc_method: &'static str,
    grpc_code: &'static str,
}

/// Buckets of `grpc_server_handling_seconds`: from 100 µs (a unary call
/// here) to 10 s (a long import or listing), about three per decade.
const SECONDS_BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// The metrics of one method: handles taken once, so that recording a call
/// is a few atomic additions, with no label lookup.
#[derive(Debug)]
struct MethodMetrics {
    started: Counter,
    handled: [Counter; 17],
    received: Counter,
    sent: Counter,
    seconds: Histogram,
}

/// The per-call metrics of every method, every series created at the start
/// (at 0), as dashboards expect.
#[derive(Debug)]
pub struct RpcMetrics {
    methods: Vec<MethodMetrics>,
}

impl RpcMetrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn new(registry: &mut Registry) -> Arc<Self> {
        let started = Family::<MethodLabels, Counter>::default();
        let handled = Family::<HandledLabels, Counter>::default();
        let received = Family::<MethodLabels, Counter>::default();
        let sent = Family::<MethodLabels, Counter>::default();
        let seconds = Family::<MethodLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(SECONDS_BUCKETS)
        });
        let methods = METHODS
            .iter()
            .map(|&(service, method, kind)| {
                let labels = MethodLabels {
                    grpc_type: kind.label(),
                    grpc_service: service,
                    grpc_method: method,
                };
                let handled_for = |code: &'static str| {
                    handled
                        .get_or_create(&HandledLabels {
                            grpc_type: kind.label(),
                            grpc_service: service,
                            grpc_method: method,
                            grpc_code: code,
                        })
                        .clone()
                };
                MethodMetrics {
                    started: started.get_or_create(&labels).clone(),
                    handled: CODE_NAMES.map(handled_for),
                    received: received.get_or_create(&labels).clone(),
                    sent: sent.get_or_create(&labels).clone(),
                    seconds: seconds.get_or_create(&labels).clone(),
                }
            })
            .collect();
        registry.register(
            "grpc_server_started",
            "Total number of RPCs started on the server",
            started,
        );
        registry.register(
            "grpc_server_handled",
            "Total number of RPCs completed on the server, regardless of success or failure",
            handled,
        );
        registry.register(
            "grpc_server_msg_received",
            "Total number of RPC stream messages received on the server",
            received,
        );
        registry.register(
            "grpc_server_msg_sent",
            "Total number of gRPC stream messages sent by the server",
            sent,
        );
        registry.register(
            "grpc_server_handling_seconds",
            "Histogram of response latency (seconds) of gRPC that had been application-level handled by the server",
            seconds,
        );
        Arc::new(RpcMetrics { methods })
    }
}

/// The tower layer that observes each call: its metrics in
/// [`RpcMetrics`] (`None`: none recorded), its access log line when
/// `access_log` is set and, when traces are exported, a span.
#[derive(Debug, Clone)]
pub struct ObserveCallsLayer {
    metrics: Option<Arc<RpcMetrics>>,
    access_log: bool,
}

impl ObserveCallsLayer {
    pub fn new(metrics: Option<Arc<RpcMetrics>>, access_log: bool) -> Self {
        ObserveCallsLayer {
            metrics,
            access_log,
        }
    }
}

impl<S> tower_layer::Layer<S> for ObserveCallsLayer {
    type Service = ObserveCalls<S>;

    fn layer(&self, inner: S) -> ObserveCalls<S> {
        ObserveCalls {
            inner,
            metrics: self.metrics.clone(),
            access_log: self.access_log,
        }
    }
}

/// See the module documentation.
#[derive(Debug, Clone)]
pub struct ObserveCalls<S> {
    inner: S,
    metrics: Option<Arc<RpcMetrics>>,
    access_log: bool,
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for ObserveCalls<S>
where
    S: Service<http::Request<Counted<ReqBody>>, Response = http::Response<ResBody>>,
    S::Future: Unpin,
{
    type Response = http::Response<Counted<ResBody>>;
    type Error = S::Error;
    type Future = Recording<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let tracing = trace::enabled();
        let path = request.uri().path();
        let method = method_of(path);
        // Metrics and spans only for the methods served (a label or a span
        // name per path a client makes up would grow without bound); the
        // access log for every call.
        let call = if (method.is_some() && (self.metrics.is_some() || tracing)) || self.access_log {
            let client = transport::client_addr(request.extensions());
            let span = method.filter(|_| tracing).map(|method| {
                let (service, name, _) = METHODS[method];
                trace::call_span(request.headers(), service, name, client)
            });
            let access = self.access_log.then(|| access::Entry::new(path, client));
            let metrics = method.and(self.metrics.clone());
            Some(Call::start(metrics, method, span, access))
        } else {
            None
        };
        let messages = call.as_ref().and_then(|call| {
            let metric = call.method_metrics().map(|m| m.received.clone());
            Messages::new(metric, call.access.as_ref().map(|a| a.received.clone()))
        });
        let span = call.as_ref().and_then(|call| call.span.clone());
        let request = request.map(|body| Counted {
            inner: body,
            messages,
            call: None,
            span: None,
        });
        // The handler runs in the call's span.
        let inner = match &span {
            Some(span) => span.in_scope(|| self.inner.call(request)),
            None => self.inner.call(request),
        };
        Recording { inner, call, span }
    }
}

/// One call being observed; recorded as `Canceled` if dropped unfinished.
struct Call {
    /// Set only for a method served (`method` is then its index).
    metrics: Option<Arc<RpcMetrics>>,
    method: Option<usize>,
    started: Instant,
    span: Option<tracing::Span>,
    access: Option<access::Entry>,
    finished: bool,
}

impl Call {
    fn start(
        metrics: Option<Arc<RpcMetrics>>,
        method: Option<usize>,
        span: Option<tracing::Span>,
        access: Option<access::Entry>,
    ) -> Self {
        let call = Call {
            metrics,
            method,
            started: Instant::now(),
            span,
            access,
            finished: false,
        };
        if let Some(metrics) = call.method_metrics() {
            metrics.started.inc();
        }
        call
    }

    fn method_metrics(&self) -> Option<&MethodMetrics> {
        Some(&self.metrics.as_ref()?.methods[self.method?])
    }

    /// Records the call's end with `code`.
    fn finish(mut self, code: Code) {
        self.record(code);
    }

    fn record(&mut self, code: Code) {
        self.finished = true;
        let elapsed = self.started.elapsed();
        if let Some(metrics) = self.method_metrics() {
            let index = (code as usize).min(CODE_NAMES.len() - 1);
            metrics.handled[index].inc();
            metrics.seconds.observe(elapsed.as_secs_f64());
        }
        if let Some(access) = &self.access {
            access.log(access::code_name(code), elapsed);
        }
        if let Some(span) = &self.span {
            trace::end_call(span, code);
        }
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        if !self.finished {
            self.record(Code::Cancelled);
        }
    }
}

/// The `grpc-status` of a head or of trailers, if it has one.
fn status_in(headers: &http::HeaderMap) -> Option<Code> {
    let value = headers.get("grpc-status")?.to_str().ok()?;
    Some(Code::from_i32(value.parse().ok()?))
}

/// The future of an observed call's response head.
pub struct Recording<F> {
    inner: F,
    call: Option<Call>,
    span: Option<tracing::Span>,
}

/// Dropped before its head (the client went away, the server stopped): the
/// call is recorded first, then `inner` goes, with the call's in-flight
/// slot (see [`Counted`]'s drop).
impl<F> Drop for Recording<F> {
    fn drop(&mut self) {
        drop(self.call.take());
    }
}

impl<F, B, E> Future for Recording<F>
where
    F: Future<Output = Result<http::Response<B>, E>> + Unpin,
{
    type Output = Result<http::Response<Counted<B>>, E>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        let response = {
            let _entered = this.span.as_ref().map(tracing::Span::enter);
            ready!(Pin::new(&mut this.inner).poll(cx))?
        };
        let mut call = this.call.take();
        // A Trailers-Only reply: its status is in the head.
        if let Some(code) = status_in(response.headers())
            && let Some(call) = call.take()
        {
            call.finish(code);
        }
        let messages = call.as_ref().and_then(|call| {
            let metric = call.method_metrics().map(|m| m.sent.clone());
            Messages::new(metric, call.access.as_ref().map(|a| a.sent.clone()))
        });
        let span = this.span.take();
        Poll::Ready(Ok(response.map(|body| Counted {
            inner: body,
            messages,
            call,
            span,
        })))
    }
}

/// A request or response body whose gRPC messages are counted, and, for a
/// response, whose trailers end the call's record.
pub struct Counted<B> {
    inner: B,
    messages: Option<Messages>,
    /// The call, on a response body, until its status is known.
    call: Option<Call>,
    /// The call's span, on a response body: the stream runs in it.
    span: Option<tracing::Span>,
}

/// A response body dropped before its status (the client reset the
/// stream, the connection dropped) records its call as `Canceled` first,
/// and only then lets the inner body go, with what it holds: the call's
/// in-flight slot and, for SyncUsers, its feed subscription. So whoever
/// sees those given back (a scrape of `user_service_calls_in_flight`, a
/// test waiting on the gauges) finds the call counted as handled. Fields
/// alone would drop the other way round, in declaration order.
impl<B> Drop for Counted<B> {
    fn drop(&mut self) {
        drop(self.call.take());
    }
}

impl<B> Body for Counted<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: ErrorCode,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = &mut *self;
        let _entered = this.span.as_ref().map(tracing::Span::enter);
        let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        match &frame {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref()
                    && let Some(messages) = &mut this.messages
                {
                    messages.count(data);
                } else if let Some(trailers) = frame.trailers_ref()
                    && let Some(call) = this.call.take()
                {
                    call.finish(status_in(trailers).unwrap_or(Code::Unknown));
                }
            }
            Some(Err(err)) => {
                if let Some(call) = this.call.take() {
                    call.finish(err.code());
                }
            }
            // The end without trailers: not a gRPC reply.
            None => {
                if let Some(call) = this.call.take() {
                    call.finish(Code::Unknown);
                }
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The gRPC code a body error stands for.
pub trait ErrorCode {
    fn code(&self) -> Code;
}

impl ErrorCode for Status {
    fn code(&self) -> Code {
        Status::code(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reads the `Canceled` count of AddUser when dropped, as a gauge
    /// watcher would once the in-flight slot it stands for is given back.
    struct Slot {
        cancelled: Counter,
        seen: Arc<std::sync::atomic::AtomicU64>,
    }

    impl Drop for Slot {
        fn drop(&mut self) {
            self.seen
                .store(self.cancelled.get(), std::sync::atomic::Ordering::SeqCst);
        }
    }

    #[test]
    fn a_dropped_call_is_recorded_before_its_slot_is_given_back() {
        let metrics = RpcMetrics::new(&mut Registry::default());
        let add_user = method_of("/grpcUser.UserService/AddUser").unwrap();
        let cancelled = metrics.methods[add_user].handled[Code::Cancelled as usize].clone();
        let slot = |seen: &Arc<_>| Slot {
            cancelled: cancelled.clone(),
            seen: Arc::clone(seen),
        };
        let call = || {
            Some(Call::start(
                Some(metrics.clone()),
                Some(add_user),
                None,
                None,
            ))
        };

        // Before the response head...
        let seen = Arc::default();
        drop(Recording {
            inner: slot(&seen),
            call: call(),
            span: None,
        });
        assert_eq!(seen.load(std::sync::atomic::Ordering::SeqCst), 1);
        // ...and with the response body unfinished.
        let seen = Arc::default();
        drop(Counted {
            inner: slot(&seen),
            messages: None,
            call: call(),
            span: None,
        });
        assert_eq!(seen.load(std::sync::atomic::Ordering::SeqCst), 2);
    }

    #[test]
    fn finds_every_method_and_nothing_else() {
        assert_eq!(method_of("/grpcUser.UserService/AddUser"), Some(0));
        assert_eq!(method_of("/grpc.health.v1.Health/Watch"), Some(6));
        assert_eq!(
            method_of("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"),
            Some(8)
        );
        assert_eq!(method_of("/grpcUser.UserService/Nothing"), None);
        assert_eq!(method_of("/"), None);
        assert_eq!(
            CODE_NAMES[Code::Unauthenticated as usize],
            "Unauthenticated"
        );
    }
}
