//! The call guard: limits tonic does not enforce on its own, around every
//! call on the port.
//!
//! [`CallGuard`] is a tower layer on the whole server. For each call it:
//! - refuses a request that is not gRPC (its content-type) with HTTP 415;
//! - takes an in-flight slot (UserService calls only, so health checks keep
//!   answering under load), or answers `RESOURCE_EXHAUSTED` at once: excess
//!   calls are refused, never queued;
//! - reads `grpc-timeout` ([`grpc_timeout()`]) and ends the call with
//!   `DEADLINE_EXCEEDED` when the deadline passes, whether the handler is
//!   still running or has returned a response stream that is still open.
//!   tonic alone only bounds the handler, and answers `CANCELLED` when it
//!   does;
//! - ends the call at shutdown, by one rule for every service (see
//!   [`GuardedBody`]);
//! - holds the slot until the response body is finished or dropped, so a
//!   client that disconnects mid-stream gives its slot back;
//! - ends a call whose handler or response stream panics with `INTERNAL`
//!   (`panic.rs`).

mod body;
mod grpc_timeout;
mod panic;

use std::{
    future::Future,
    panic::AssertUnwindSafe,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use futures::FutureExt as _;
use http_body::Body;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::Status;
use tower_service::Service;

pub use body::GuardedBody;
pub use grpc_timeout::grpc_timeout;

use self::panic::Caught;
use crate::{
    gauges::{Gauges, Slots},
    proto::user_service_server::SERVICE_NAME,
};

/// The tower layer that puts a [`CallGuard`] around every call.
#[derive(Debug, Clone)]
pub struct CallGuardLayer {
    gauges: Gauges,
    slots: Slots,
    shutdown: Arc<CancellationToken>,
}

impl CallGuardLayer {
    /// At most `max_in_flight` UserService calls at once, counted in
    /// `gauges` (as are refusals and panics); `shutdown` is cancelled when
    /// the server starts shutting down.
    pub fn new(gauges: &Gauges, max_in_flight: usize, shutdown: CancellationToken) -> Self {
        CallGuardLayer {
            gauges: gauges.clone(),
            slots: gauges.in_flight_slots(max_in_flight),
            shutdown: Arc::new(shutdown),
        }
    }
}

impl<S> tower_layer::Layer<S> for CallGuardLayer {
    type Service = CallGuard<S>;

    fn layer(&self, inner: S) -> CallGuard<S> {
        CallGuard {
            inner,
            gauges: self.gauges.clone(),
            slots: self.slots.clone(),
            shutdown: self.shutdown.clone(),
        }
    }
}

/// See the module documentation.
#[derive(Debug, Clone)]
pub struct CallGuard<S> {
    inner: S,
    gauges: Gauges,
    slots: Slots,
    /// Shared, not cloned: the service is cloned for every call, and a
    /// clone of a token (and its drop) takes the token's lock.
    shutdown: Arc<CancellationToken>,
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for CallGuard<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResBody: Body<Error = Status> + Default + Send + Unpin + 'static,
{
    type Response = http::Response<GuardedBody<ResBody>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        if !is_grpc(request.headers()) {
            // As the gRPC spec asks: 415, so that no HTTP client takes the
            // error for a success, with a gRPC status for gRPC clients.
            let mut refused =
                GuardedBody::status(Status::internal("content-type must be application/grpc"));
            *refused.status_mut() = http::StatusCode::UNSUPPORTED_MEDIA_TYPE;
            return Box::pin(std::future::ready(Ok(refused)));
        }
        // UserService calls take a slot; health checks keep answering
        // under load.
        let slot = if is_user_service(request.uri().path()) {
            match self.slots.try_take() {
                Some(slot) => Some(slot),
                None => {
                    let refused =
                        Status::resource_exhausted("too many calls in flight; retry with backoff");
                    return Box::pin(std::future::ready(Ok(GuardedBody::status(refused))));
                }
            }
        } else {
            None
        };
        let shutdown = Arc::clone(&self.shutdown);
        // Taken now, synchronously: tonic's own timer for the same header is
        // started after this returns, so this deadline is never the later
        // one, and the call ends with DEADLINE_EXCEEDED rather than tonic's
        // CANCELLED.
        let deadline = grpc_timeout(request.headers()).map(|timeout| Instant::now() + timeout);
        let caught = Caught::of(&request, &self.gauges);
        // A handler may panic in `call` itself or in the future it returns.
        let call = match std::panic::catch_unwind(AssertUnwindSafe(|| self.inner.call(request))) {
            Ok(call) => AssertUnwindSafe(call).catch_unwind(),
            Err(panic) => {
                let status = caught.report(&*panic);
                return Box::pin(std::future::ready(Ok(GuardedBody::status(status))));
            }
        };
        Box::pin(async move {
            let handled = match deadline {
                None => call.await,
                Some(deadline) => match tokio::time::timeout_at(deadline, call).await {
                    Ok(handled) => handled,
                    Err(_) => return Ok(GuardedBody::status(deadline_exceeded())),
                },
            };
            let response = match handled {
                Ok(response) => response?,
                Err(panic) => return Ok(GuardedBody::status(caught.report(&*panic))),
            };
            Ok(response.map(|body| GuardedBody::new(body, deadline, shutdown, slot, Some(caught))))
        })
    }
}

/// Whether `path` names a UserService method (`/grpcUser.UserService/...`):
/// those calls take an in-flight slot.
fn is_user_service(path: &str) -> bool {
    path.strip_prefix('/')
        .and_then(|path| path.strip_prefix(SERVICE_NAME))
        .is_some_and(|method| method.starts_with('/'))
}

/// Whether the request says it is gRPC (`application/grpc`, optionally
/// followed by `+proto` or `;` parameters).
fn is_grpc(headers: &http::HeaderMap) -> bool {
    headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("application/grpc"))
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('+') || rest.starts_with(';'))
}

fn deadline_exceeded() -> Status {
    Status::deadline_exceeded("deadline exceeded")
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use http_body::Frame;

    use super::*;
    use crate::gauges::Gauges;

    #[test]
    fn user_service_paths() {
        assert!(is_user_service("/grpcUser.UserService/AddUser"));
        assert!(!is_user_service("/grpcUser.UserServiceX/AddUser"));
        assert!(!is_user_service("/grpc.health.v1.Health/Check"));
        assert!(!is_user_service("grpcUser.UserService/AddUser"));
        assert!(!is_user_service("/"));
    }

    #[test]
    fn grpc_content_types() {
        let with = |ct: &str| {
            let mut headers = http::HeaderMap::new();
            headers.insert(http::header::CONTENT_TYPE, ct.parse().unwrap());
            is_grpc(&headers)
        };
        assert!(with("application/grpc"));
        assert!(with("application/grpc+proto"));
        assert!(with("application/grpc;charset=utf-8"));
        assert!(!with("application/grpcx"));
        assert!(!with("application/json"));
        assert!(!with("text/plain"));
        assert!(!is_grpc(&http::HeaderMap::new()));
    }

    /// A response body that never ends: it has `ready` data frames ready
    /// (`usize::MAX`: always one more, like a listing), then nothing, like
    /// an idle SyncUsers stream.
    #[derive(Default)]
    struct Endless {
        ready: usize,
    }

    impl Body for Endless {
        type Data = bytes::Bytes;
        type Error = Status;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<bytes::Bytes>, Status>>> {
            if self.ready == 0 {
                return Poll::Pending;
            }
            if self.ready != usize::MAX {
                self.ready -= 1;
            }
            Poll::Ready(Some(Ok(Frame::data(bytes::Bytes::from_static(b"message")))))
        }
    }

    /// A service whose handler returns an endless stream at once (with
    /// `ready` frames ready), or (with `stuck`) never returns at all.
    #[derive(Clone, Default)]
    struct Handler {
        stuck: bool,
        ready: usize,
    }

    impl Service<http::Request<()>> for Handler {
        type Response = http::Response<Endless>;
        type Error = std::convert::Infallible;
        type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: http::Request<()>) -> Self::Future {
            let Handler { stuck, ready } = *self;
            Box::pin(async move {
                if stuck {
                    std::future::pending::<()>().await;
                }
                Ok(http::Response::new(Endless { ready }))
            })
        }
    }

    fn guard(stuck: bool, max_in_flight: usize) -> (CallGuard<Handler>, Gauges) {
        let (guard, gauges, _) = guard_with(
            Handler {
                stuck,
                ..Handler::default()
            },
            max_in_flight,
        );
        (guard, gauges)
    }

    fn guard_with(
        handler: Handler,
        max_in_flight: usize,
    ) -> (CallGuard<Handler>, Gauges, CancellationToken) {
        let gauges = Gauges::default();
        let shutdown = CancellationToken::new();
        let layer = CallGuardLayer::new(&gauges, max_in_flight, shutdown.clone());
        let guard = tower_layer::Layer::layer(&layer, handler);
        (guard, gauges, shutdown)
    }

    /// Starts a call on `path` whose stream has `ready` frames ready, shuts
    /// the server down, and returns what the body sends then: the number of
    /// data frames, and the final status.
    async fn frames_after_shutdown(path: &str, ready: usize) -> (usize, String) {
        let handler = Handler {
            ready,
            ..Handler::default()
        };
        let (mut guard, gauges, shutdown) = guard_with(handler, 8);
        let request = http::Request::post(path)
            .header("content-type", "application/grpc")
            .body(())
            .unwrap();
        let mut body = guard.call(request).await.unwrap().into_body();
        shutdown.cancel();
        let mut data = 0;
        loop {
            let frame = next_frame(&mut body).await.unwrap().unwrap();
            match frame.into_data() {
                Ok(_) => data += 1,
                Err(frame) => {
                    assert!(next_frame(&mut body).await.is_none());
                    assert_eq!(gauges.in_flight_calls(), 0);
                    let trailers = frame.into_trailers().unwrap();
                    return (data, grpc_status(&trailers).unwrap().to_owned());
                }
            }
        }
    }

    #[tokio::test]
    async fn at_shutdown_a_stream_sends_one_ready_frame_then_ends_unavailable() {
        for path in [
            "/grpcUser.UserService/SyncUsers",
            "/grpc.health.v1.Health/Watch",
        ] {
            // Nothing ready: ended at once.
            assert_eq!(frames_after_shutdown(path, 0).await, (0, "14".into()));
            // What is ready goes out first (tonic packs it into one frame).
            assert_eq!(frames_after_shutdown(path, 1).await, (1, "14".into()));
            // A stream that always has more is still ended.
            assert_eq!(
                frames_after_shutdown(path, usize::MAX).await,
                (1, "14".into())
            );
        }
    }

    /// A unary reply as tonic builds it: one data frame, then trailers
    /// with an OK status, both ready.
    struct Unary {
        sent: usize,
    }

    impl Body for Unary {
        type Data = bytes::Bytes;
        type Error = Status;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<bytes::Bytes>, Status>>> {
            self.sent += 1;
            Poll::Ready(match self.sent {
                1 => Some(Ok(Frame::data(bytes::Bytes::from_static(b"reply")))),
                2 => {
                    let mut trailers = http::HeaderMap::new();
                    trailers.insert("grpc-status", "0".parse().unwrap());
                    Some(Ok(Frame::trailers(trailers)))
                }
                _ => None,
            })
        }
    }

    #[tokio::test]
    async fn at_shutdown_a_unary_reply_that_is_ready_completes() {
        let shutdown = CancellationToken::new();
        shutdown.cancel();
        let mut body = GuardedBody::new(Unary { sent: 0 }, None, Arc::new(shutdown), None, None);
        let data = next_frame(&mut body).await.unwrap().unwrap();
        assert!(data.is_data());
        let trailers = next_frame(&mut body).await.unwrap().unwrap();
        assert_eq!(grpc_status(trailers.trailers_ref().unwrap()), Some("0"));
        assert!(next_frame(&mut body).await.is_none());
    }

    fn request(timeout: Option<&str>, content_type: &str) -> http::Request<()> {
        let mut request = http::Request::post("/grpcUser.UserService/SyncUsers")
            .header("content-type", content_type)
            .body(())
            .unwrap();
        if let Some(timeout) = timeout {
            request
                .headers_mut()
                .insert("grpc-timeout", timeout.parse().unwrap());
        }
        request
    }

    fn grpc_status(headers: &http::HeaderMap) -> Option<&str> {
        headers.get("grpc-status").map(|v| v.to_str().unwrap())
    }

    async fn next_frame<B: Body + Unpin>(body: &mut B) -> Option<Result<Frame<B::Data>, B::Error>> {
        std::future::poll_fn(|cx| Pin::new(&mut *body).poll_frame(cx)).await
    }

    #[tokio::test(start_paused = true)]
    async fn an_open_stream_ends_with_deadline_exceeded_at_its_deadline() {
        let (mut guard, gauges) = guard(false, 8);
        let started = Instant::now();
        let response = guard
            .call(request(Some("250m"), "application/grpc"))
            .await
            .unwrap();
        assert_eq!(grpc_status(response.headers()), None);
        assert_eq!(gauges.in_flight_calls(), 1);
        let mut body = response.into_body();
        let frame = next_frame(&mut body).await.unwrap().unwrap();
        assert_eq!(started.elapsed(), Duration::from_millis(250));
        assert_eq!(grpc_status(frame.trailers_ref().unwrap()), Some("4"));
        assert!(next_frame(&mut body).await.is_none());
        // The call is over: its slot is back even before the body is dropped.
        assert_eq!(gauges.in_flight_calls(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stuck_handler_ends_with_deadline_exceeded_at_its_deadline() {
        let (mut guard, gauges) = guard(true, 8);
        let started = Instant::now();
        let response = guard
            .call(request(Some("1S"), "application/grpc"))
            .await
            .unwrap();
        assert_eq!(started.elapsed(), Duration::from_secs(1));
        assert_eq!(grpc_status(response.headers()), Some("4"));
        drop(response);
        assert_eq!(gauges.in_flight_calls(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_deadline_or_shutdown_a_stream_stays_open() {
        let (mut guard, _) = guard(false, 8);
        let response = guard.call(request(None, "application/grpc")).await.unwrap();
        let mut body = response.into_body();
        let frame = tokio::time::timeout(Duration::from_secs(3600), next_frame(&mut body)).await;
        assert!(frame.is_err(), "the stream ended on its own");
    }

    #[tokio::test]
    async fn calls_past_the_cap_are_refused_and_slots_come_back() {
        let (mut guard, gauges) = guard(false, 1);
        let first = guard.call(request(None, "application/grpc")).await.unwrap();
        let refused = guard.call(request(None, "application/grpc")).await.unwrap();
        assert_eq!(grpc_status(refused.headers()), Some("8"));
        assert_eq!(gauges.in_flight_calls(), 1);
        drop(first);
        assert_eq!(gauges.in_flight_calls(), 0);
        let again = guard.call(request(None, "application/grpc")).await.unwrap();
        assert_eq!(grpc_status(again.headers()), None);
    }

    #[tokio::test]
    async fn non_grpc_requests_get_415() {
        let (mut guard, gauges) = guard(false, 8);
        let response = guard.call(request(None, "text/plain")).await.unwrap();
        assert_eq!(response.status(), http::StatusCode::UNSUPPORTED_MEDIA_TYPE);
        assert_eq!(grpc_status(response.headers()), Some("13"));
        assert_eq!(gauges.in_flight_calls(), 0);
    }

    /// A handler that panics where it is told to: in `call` itself, in the
    /// future it returns (the handler proper), or in its response stream.
    #[derive(Clone, Copy)]
    enum PanicsIn {
        Call,
        Handler,
        Stream,
    }

    /// A response stream that panics when polled.
    #[derive(Default)]
    struct PanickingStream;

    impl Body for PanickingStream {
        type Data = bytes::Bytes;
        type Error = Status;

        fn poll_frame(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<bytes::Bytes>, Status>>> {
            panic!("the stream panics");
        }
    }

    impl Service<http::Request<()>> for PanicsIn {
        type Response = http::Response<PanickingStream>;
        type Error = std::convert::Infallible;
        type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: http::Request<()>) -> Self::Future {
            let panics = *self;
            assert!(!matches!(panics, PanicsIn::Call), "call panics");
            Box::pin(async move {
                assert!(!matches!(panics, PanicsIn::Handler), "the future panics");
                Ok(http::Response::new(PanickingStream))
            })
        }
    }

    #[tokio::test]
    async fn a_handler_that_panics_anywhere_ends_its_call_with_internal() {
        let gauges = Gauges::default();
        let layer = CallGuardLayer::new(&gauges, 8, CancellationToken::new());
        for panics in [PanicsIn::Call, PanicsIn::Handler] {
            let mut guard = tower_layer::Layer::layer(&layer, panics);
            let response = guard.call(request(None, "application/grpc")).await.unwrap();
            assert_eq!(grpc_status(response.headers()), Some("13"));
        }
        let mut guard = tower_layer::Layer::layer(&layer, PanicsIn::Stream);
        let response = guard.call(request(None, "application/grpc")).await.unwrap();
        assert_eq!(grpc_status(response.headers()), None);
        let mut body = response.into_body();
        let frame = next_frame(&mut body).await.unwrap().unwrap();
        assert_eq!(grpc_status(frame.trailers_ref().unwrap()), Some("13"));
        assert!(next_frame(&mut body).await.is_none());
        assert_eq!(gauges.panicked_calls(), 3);
        assert_eq!(gauges.in_flight_calls(), 0);
    }
}
