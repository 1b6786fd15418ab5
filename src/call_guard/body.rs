//! The response body of a guarded call: it ends the call at its deadline,
//! at shutdown or when its stream panics, and holds the call's in-flight
//! slot until the call is over.

use std::{
    panic::AssertUnwindSafe,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::Status;

use super::panic::Caught;
use crate::gauges::Slot;

/// A response body that ends its call with `DEADLINE_EXCEEDED` at the
/// deadline, or with `UNAVAILABLE` when the server shuts down, and holds the
/// call's in-flight slot until it is finished or dropped.
///
/// **At the deadline the call is cut now**, between two frames: the client
/// has stopped waiting, and nothing more is worth sending. Each data frame
/// holds whole gRPC messages, so the client sees complete messages and then
/// the status.
///
/// **At shutdown the call sends what is ready, then ends**: one more data
/// frame, if the stream has one ready when next polled (tonic packs every
/// message its stream has ready, up to 32 KiB, into one frame), and then
/// the call's own end if that is ready too (a unary reply: its message and
/// its OK status), or else `UNAVAILABLE`. So a unary call that was running
/// completes normally, a health `Watch` delivers the `NOT_SERVING` set just
/// before, and a SyncUsers stream the Acks of ops already committed, while
/// a stream that always has more (a listing) is still ended promptly and
/// starts no new work. This is the one rule for every service on the port:
/// UserService's streams, health's and reflection's alike (tonic's
/// graceful shutdown would otherwise wait for every open stream, and a
/// health `Watch` never ends on its own).
///
/// **Only a call that waits registers a timer and a shutdown waiter**: the
/// deadline and the shutdown are first checked by reading the clock and a
/// flag, and the timer and the waiter (an allocation and a lock each, to
/// register and to drop) are set up the first time the inner body is not
/// ready. A unary reply, ready at every poll, never sets them up.
pub struct GuardedBody<B> {
    inner: B,
    deadline: Option<Deadline>,
    shutdown: Shutdown,
    slot: Option<Slot>,
    /// How a panic of `inner` is reported (`None`: never polled).
    caught: Option<Caught>,
    ended: bool,
}

/// When the call is cut, and the timer that wakes it then, once it waits.
struct Deadline {
    at: Instant,
    timer: Option<Pin<Box<Sleep>>>,
}

/// The server's shutdown, and the waiter that wakes the call at it, once
/// the call waits.
struct Watch {
    token: Arc<CancellationToken>,
    waiter: Option<Pin<Box<WaitForCancellationFutureOwned>>>,
}

/// Where a call stands with respect to the server's shutdown.
enum Shutdown {
    /// Not shutting down yet (or never: a refusal, which ends at once).
    Armed(Option<Watch>),
    /// Shutting down: one more data frame may go out if it is ready.
    LastFrame,
    /// The last frame has gone out; the call ends at the next poll, as it
    /// ends on its own if that is ready, or with `UNAVAILABLE`.
    Ending,
}

impl<B: Default> GuardedBody<B> {
    /// A trailers-only response carrying `status`.
    pub(super) fn status(status: Status) -> http::Response<Self> {
        status.into_http::<B>().map(|body| GuardedBody {
            inner: body,
            deadline: None,
            shutdown: Shutdown::Armed(None),
            slot: None,
            caught: None,
            ended: false,
        })
    }
}

impl<B> GuardedBody<B> {
    pub(super) fn new(
        inner: B,
        deadline: Option<Instant>,
        shutdown: Arc<CancellationToken>,
        slot: Option<Slot>,
        caught: Option<Caught>,
    ) -> Self {
        GuardedBody {
            inner,
            deadline: deadline.map(|at| Deadline { at, timer: None }),
            shutdown: Shutdown::Armed(Some(Watch {
                token: shutdown,
                waiter: None,
            })),
            slot,
            caught,
            ended: false,
        }
    }

    fn finish(&mut self) {
        self.ended = true;
        self.deadline = None;
        self.shutdown = Shutdown::Armed(None);
        self.slot = None;
    }

    /// Ends the call with `status` now, as trailers.
    fn end_with<D>(&mut self, status: Status) -> Poll<Option<Result<Frame<D>, Status>>> {
        self.finish();
        let mut trailers = http::HeaderMap::new();
        Poll::Ready(Some(
            status
                .add_header(&mut trailers)
                .map(|()| Frame::trailers(trailers)),
        ))
    }
}

impl<B> GuardedBody<B> {
    /// The inner body waits: the deadline and the shutdown must now wake
    /// the call, and end it if either has come meanwhile.
    fn poll_wait<D>(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<D>, Status>>> {
        if let Some(deadline) = &mut self.deadline {
            let at = deadline.at;
            let timer = deadline
                .timer
                .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(at)));
            if timer.as_mut().poll(cx).is_ready() {
                return self.end_with(super::deadline_exceeded());
            }
        }
        if let Shutdown::Armed(Some(watch)) = &mut self.shutdown {
            let token = &watch.token;
            let waiter = watch
                .waiter
                .get_or_insert_with(|| Box::pin(CancellationToken::clone(token).cancelled_owned()));
            if waiter.as_mut().poll(cx).is_ready() {
                // As when the shutdown is seen before the inner body is
                // polled and it has nothing ready.
                return self.end_with(shutting_down());
            }
        }
        Poll::Pending
    }
}

fn shutting_down() -> Status {
    Status::unavailable("server is shutting down")
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
        if let Some(deadline) = &this.deadline
            && Instant::now() >= deadline.at
        {
            return this.end_with(super::deadline_exceeded());
        }
        if let Shutdown::Armed(Some(watch)) = &this.shutdown
            && watch.token.is_cancelled()
        {
            this.shutdown = Shutdown::LastFrame;
        }
        let polled = std::panic::catch_unwind(AssertUnwindSafe(|| {
            Pin::new(&mut this.inner).poll_frame(cx)
        }));
        let polled = match polled {
            Ok(polled) => polled,
            // The stream is not polled again: the call ends here.
            Err(panic) => {
                let status = match &this.caught {
                    Some(caught) => caught.report(&*panic),
                    None => super::panic::internal(),
                };
                return this.end_with(status);
            }
        };
        let frame = match polled {
            Poll::Ready(Some(Ok(frame)))
                if frame.is_data() && matches!(this.shutdown, Shutdown::Ending) =>
            {
                return this.end_with(shutting_down());
            }
            Poll::Ready(frame) => frame,
            Poll::Pending if !matches!(this.shutdown, Shutdown::Armed(_)) => {
                return this.end_with(shutting_down());
            }
            Poll::Pending => return this.poll_wait(cx),
        };
        match &frame {
            Some(Ok(frame)) if frame.is_data() => {
                if matches!(this.shutdown, Shutdown::LastFrame) {
                    this.shutdown = Shutdown::Ending;
                }
            }
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
        // The deadline or shutdown may end the body with trailers the inner
        // body does not know about.
        if self.inner.is_end_stream() {
            self.inner.size_hint()
        } else {
            SizeHint::default()
        }
    }
}
