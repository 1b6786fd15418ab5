//! Limits tonic does not enforce on its own: a cap on calls in flight, a cap
//! on open SyncUsers subscriptions, and `grpc-timeout` over the whole call,
//! streams included; plus the gauges that count what is open.
//!
//! [`CallGuard`] is a tower layer on the whole server. For each call it:
//! - refuses a request that is not gRPC (its content-type) with HTTP 415;
//! - takes an in-flight slot (UserService calls only, so health checks keep
//!   answering under load), or answers `RESOURCE_EXHAUSTED` at once: excess
//!   calls are refused, never queued;
//! - reads `grpc-timeout` and ends the call with `DEADLINE_EXCEEDED` when the
//!   deadline passes, whether the handler is still running or has returned a
//!   response stream that is still open. tonic alone only bounds the handler,
//!   and answers `CANCELLED` when it does;
//! - holds the slot until the response body is finished or dropped, so a
//!   client that disconnects mid-stream gives its slot back;
//! - ends the response streams of the other services on the port (health
//!   `Watch`, reflection) with `UNAVAILABLE` once the server starts shutting
//!   down, as UserService's streams end themselves: tonic's graceful shutdown
//!   waits for every open stream, and a health `Watch` never ends on its own.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use http_body::{Body, Frame, SizeHint};
use tokio::{
    sync::Notify,
    time::{Instant, Sleep},
};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::Status;
use tower_service::Service;

/// Calls under this path prefix take an in-flight slot.
const LIMITED_PREFIX: &str = "/grpcUser.UserService/";

/// Live counts of what the server holds open, shared with whoever wants to
/// watch them (tests, and anything exporting metrics). Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Gauges {
    inner: Arc<GaugesInner>,
}

#[derive(Debug, Default)]
struct GaugesInner {
    in_flight: AtomicUsize,
    subscribers: AtomicUsize,
    /// Woken whenever a count changes.
    changed: Notify,
}

#[derive(Debug, Clone, Copy)]
enum Gauge {
    InFlight,
    Subscribers,
}

impl Gauges {
    /// UserService calls whose response is not finished yet (streams
    /// included).
    pub fn in_flight_calls(&self) -> usize {
        self.inner.in_flight.load(Ordering::Acquire)
    }

    /// Open SyncUsers streams.
    pub fn subscribers(&self) -> usize {
        self.inner.subscribers.load(Ordering::Acquire)
    }

    /// Waits until `done(self)` holds, re-checking whenever a count changes.
    pub async fn wait_until(&self, done: impl Fn(&Gauges) -> bool) {
        loop {
            let changed = self.inner.changed.notified();
            let mut changed = std::pin::pin!(changed);
            // Registered before the check, so a change in between is seen.
            changed.as_mut().enable();
            if done(self) {
                return;
            }
            changed.await;
        }
    }

    /// A pool of at most `max` in-flight call slots counted by this gauge.
    pub(crate) fn in_flight_slots(&self, max: usize) -> Slots {
        Slots {
            gauges: self.clone(),
            gauge: Gauge::InFlight,
            max,
        }
    }

    /// A pool of at most `max` subscriber slots counted by this gauge.
    pub(crate) fn subscriber_slots(&self, max: usize) -> Slots {
        Slots {
            gauges: self.clone(),
            gauge: Gauge::Subscribers,
            max,
        }
    }

    fn counter(&self, gauge: Gauge) -> &AtomicUsize {
        match gauge {
            Gauge::InFlight => &self.inner.in_flight,
            Gauge::Subscribers => &self.inner.subscribers,
        }
    }
}

/// A bounded pool of slots, counted by one of the [`Gauges`].
#[derive(Debug, Clone)]
pub struct Slots {
    gauges: Gauges,
    gauge: Gauge,
    max: usize,
}

impl Slots {
    /// Takes a slot, or returns `None` at once when all are taken: the
    /// caller refuses the work instead of waiting for a slot.
    pub fn try_take(&self) -> Option<Slot> {
        self.gauges
            .counter(self.gauge)
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            })
            .ok()?;
        self.gauges.inner.changed.notify_waiters();
        Some(Slot {
            gauges: self.gauges.clone(),
            gauge: self.gauge,
        })
    }
}

/// One taken slot; given back when dropped.
#[derive(Debug)]
pub struct Slot {
    gauges: Gauges,
    gauge: Gauge,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.gauges
            .counter(self.gauge)
            .fetch_sub(1, Ordering::AcqRel);
        self.gauges.inner.changed.notify_waiters();
    }
}

/// The tower layer that puts a [`CallGuard`] around every call.
#[derive(Debug, Clone)]
pub struct CallGuardLayer {
    slots: Slots,
    shutdown: CancellationToken,
}

impl CallGuardLayer {
    /// `shutdown` is cancelled when the server starts shutting down.
    pub fn new(slots: Slots, shutdown: CancellationToken) -> Self {
        CallGuardLayer { slots, shutdown }
    }
}

impl<S> tower_layer::Layer<S> for CallGuardLayer {
    type Service = CallGuard<S>;

    fn layer(&self, inner: S) -> CallGuard<S> {
        CallGuard {
            inner,
            slots: self.slots.clone(),
            shutdown: self.shutdown.clone(),
        }
    }
}

/// See the module documentation.
#[derive(Debug, Clone)]
pub struct CallGuard<S> {
    inner: S,
    slots: Slots,
    shutdown: CancellationToken,
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
        // UserService calls take a slot and end their streams themselves at
        // shutdown; the other services' streams are ended here.
        let (slot, shutdown) = if request.uri().path().starts_with(LIMITED_PREFIX) {
            match self.slots.try_take() {
                Some(slot) => (Some(slot), None),
                None => {
                    let refused =
                        Status::resource_exhausted("too many calls in flight; retry with backoff");
                    return Box::pin(std::future::ready(Ok(GuardedBody::status(refused))));
                }
            }
        } else {
            (None, Some(self.shutdown.clone()))
        };
        // Taken now, synchronously: tonic's own timer for the same header is
        // started after this returns, so this deadline is never the later
        // one, and the call ends with DEADLINE_EXCEEDED rather than tonic's
        // CANCELLED.
        let deadline = grpc_timeout(request.headers()).map(|timeout| Instant::now() + timeout);
        let call = self.inner.call(request);
        Box::pin(async move {
            let response = match deadline {
                None => call.await?,
                Some(deadline) => match tokio::time::timeout_at(deadline, call).await {
                    Ok(response) => response?,
                    Err(_) => return Ok(GuardedBody::status(deadline_exceeded())),
                },
            };
            Ok(response.map(|body| GuardedBody {
                inner: body,
                deadline: deadline.map(|deadline| Box::pin(tokio::time::sleep_until(deadline))),
                shutdown: shutdown.map(|token| Box::pin(token.cancelled_owned())),
                slot,
                ended: false,
            }))
        })
    }
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

/// A response body that ends the call with `DEADLINE_EXCEEDED` once its
/// deadline passes, or with `UNAVAILABLE` once the server shuts down and the
/// stream has nothing more ready to send, and holds the call's in-flight slot
/// until it is finished or dropped.
pub struct GuardedBody<B> {
    inner: B,
    deadline: Option<Pin<Box<Sleep>>>,
    shutdown: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
    slot: Option<Slot>,
    ended: bool,
}

impl<B: Default> GuardedBody<B> {
    /// A trailers-only response carrying `status`.
    fn status(status: Status) -> http::Response<Self> {
        status.into_http::<B>().map(|body| GuardedBody {
            inner: body,
            deadline: None,
            shutdown: None,
            slot: None,
            ended: false,
        })
    }
}

impl<B> Body for GuardedBody<B>
where
    B: Body<Error = Status> + Unpin,
{
    type Data = B::Data;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Status>>> {
        let this = &mut *self;
        if this.ended {
            return Poll::Ready(None);
        }
        if let Some(deadline) = &mut this.deadline
            && deadline.as_mut().poll(cx).is_ready()
        {
            // The body is cut between frames, and each data frame holds
            // whole gRPC messages, so the client sees complete messages and
            // then this status.
            this.finish();
            return Poll::Ready(Some(end_with(deadline_exceeded())));
        }
        let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) else {
            // What the stream had ready (a health `Watch`'s last status, say)
            // has gone out before it is cut.
            if let Some(shutdown) = &mut this.shutdown
                && shutdown.as_mut().poll(cx).is_ready()
            {
                this.finish();
                return Poll::Ready(Some(end_with(Status::unavailable(
                    "server is shutting down",
                ))));
            }
            return Poll::Pending;
        };
        match &frame {
            Some(Ok(frame)) if frame.is_data() => {}
            // Trailers, an error or the end: the call is over.
            _ => this.finish(),
        }
        Poll::Ready(frame)
    }

    /// A body at its end is at its end whatever the deadline: a reply
    /// without a body (every error status) must be sent as one HEADERS
    /// frame with END_STREAM, gRPC's Trailers-Only form. Reporting "not at
    /// the end" because a deadline is armed made the server send the
    /// headers, then an empty DATA frame to end the stream, and grpc-go and
    /// grpcio clients, which read the status only from that form or from
    /// trailers, lost it (INTERNAL or UNKNOWN instead of the real code).
    fn is_end_stream(&self) -> bool {
        self.ended || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        // The deadline may end the body with trailers the inner body does
        // not know about.
        match self.deadline {
            Some(_) if !self.inner.is_end_stream() => SizeHint::default(),
            _ => self.inner.size_hint(),
        }
    }
}

impl<B> GuardedBody<B> {
    fn finish(&mut self) {
        self.ended = true;
        self.deadline = None;
        self.shutdown = None;
        self.slot = None;
    }
}

/// The trailers that end a call with `status`.
fn end_with<D>(status: Status) -> Result<Frame<D>, Status> {
    let mut trailers = http::HeaderMap::new();
    status.add_header(&mut trailers)?;
    Ok(Frame::trailers(trailers))
}

/// The largest timeout the header can express is 99,999,999 hours; anything
/// longer than this is treated as no deadline.
const MAX_TIMEOUT: Duration = Duration::from_secs(100 * 365 * 24 * 60 * 60);

/// Parses the `grpc-timeout` header: 1 to 8 digits and a unit (H, M, S, m,
/// u, n). A malformed header is ignored, as tonic does.
pub fn grpc_timeout(headers: &http::HeaderMap) -> Option<Duration> {
    let value = headers.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    let timeout = match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    };
    (timeout <= MAX_TIMEOUT).then_some(timeout)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(timeout: &str) -> http::HeaderMap {
        let mut headers = http::HeaderMap::new();
        headers.insert("grpc-timeout", timeout.parse().unwrap());
        headers
    }

    #[test]
    fn grpc_timeout_units() {
        assert_eq!(
            grpc_timeout(&headers("2H")),
            Some(Duration::from_secs(7200))
        );
        assert_eq!(grpc_timeout(&headers("3M")), Some(Duration::from_secs(180)));
        assert_eq!(grpc_timeout(&headers("5S")), Some(Duration::from_secs(5)));
        assert_eq!(
            grpc_timeout(&headers("250m")),
            Some(Duration::from_millis(250))
        );
        assert_eq!(grpc_timeout(&headers("7u")), Some(Duration::from_micros(7)));
        assert_eq!(grpc_timeout(&headers("9n")), Some(Duration::from_nanos(9)));
        assert_eq!(
            grpc_timeout(&headers("99999999S")),
            Some(Duration::from_secs(99_999_999))
        );
    }

    #[test]
    fn malformed_grpc_timeout_is_ignored() {
        for bad in ["", "S", "10", "10x", "123456789S", "-1S", "1.5S", "1 S"] {
            assert_eq!(grpc_timeout(&headers(bad)), None, "{bad:?}");
        }
        assert_eq!(grpc_timeout(&http::HeaderMap::new()), None);
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

    #[test]
    fn slots_refuse_past_the_cap_and_come_back_on_drop() {
        let gauges = Gauges::default();
        let slots = gauges.in_flight_slots(2);
        let a = slots.try_take().unwrap();
        let b = slots.try_take().unwrap();
        assert!(slots.try_take().is_none());
        assert_eq!(gauges.in_flight_calls(), 2);
        drop(a);
        assert_eq!(gauges.in_flight_calls(), 1);
        let _c = slots.try_take().unwrap();
        drop(b);
        assert_eq!(gauges.in_flight_calls(), 1);
        assert_eq!(gauges.subscribers(), 0);
    }

    #[tokio::test]
    async fn wait_until_wakes_on_release() {
        let gauges = Gauges::default();
        let slot = gauges.subscriber_slots(1).try_take().unwrap();
        let waiter = tokio::spawn({
            let gauges = gauges.clone();
            async move { gauges.wait_until(|g| g.subscribers() == 0).await }
        });
        tokio::task::yield_now().await;
        drop(slot);
        tokio::time::timeout(Duration::from_secs(10), waiter)
            .await
            .expect("woken by the release")
            .unwrap();
    }

    /// A response body that never ends, like an idle SyncUsers stream.
    #[derive(Default)]
    struct Endless;

    impl Body for Endless {
        type Data = bytes::Bytes;
        type Error = Status;

        fn poll_frame(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<bytes::Bytes>, Status>>> {
            Poll::Pending
        }
    }

    /// A service whose handler returns an endless stream at once, or (with
    /// `stuck`) never returns at all.
    #[derive(Clone)]
    struct Handler {
        stuck: bool,
    }

    impl Service<http::Request<()>> for Handler {
        type Response = http::Response<Endless>;
        type Error = std::convert::Infallible;
        type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: http::Request<()>) -> Self::Future {
            let stuck = self.stuck;
            Box::pin(async move {
                if stuck {
                    std::future::pending::<()>().await;
                }
                Ok(http::Response::new(Endless))
            })
        }
    }

    fn guard(stuck: bool, max_in_flight: usize) -> (CallGuard<Handler>, Gauges) {
        let gauges = Gauges::default();
        let layer = CallGuardLayer::new(
            gauges.in_flight_slots(max_in_flight),
            CancellationToken::new(),
        );
        let guard = tower_layer::Layer::layer(&layer, Handler { stuck });
        (guard, gauges)
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
    async fn without_a_deadline_a_stream_stays_open() {
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
}
