//! Keepalive pings, keyed to what the connection reads.
//!
//! A ping finds a peer that vanished without closing the connection (a
//! half-open connection would otherwise hold its calls forever). As grpc-go
//! and hyper do, a ping goes out only once the connection has read nothing
//! for a whole interval: a connection whose client keeps sending frames
//! shows it is there, and pinging it would only add frames. A ping not
//! answered in time ends the connection, after a GOAWAY (see
//! `Connection::serve`).
//!
//! [`CountReads`] counts what the connection reads, for the pings and for
//! the handshake deadline.

use std::{
    future::poll_fn,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use h2::{Ping, PingPong};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    time::{Instant, Sleep},
};

use super::Http2Config;

/// An I/O stream that counts the bytes read from it.
pub(super) struct CountReads<IO> {
    inner: IO,
    received: Received,
}

/// The count of a [`CountReads`], readable while h2 owns the stream.
#[derive(Clone, Default)]
pub(super) struct Received(Arc<AtomicU64>);

impl Received {
    pub(super) fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

impl<IO> CountReads<IO> {
    pub(super) fn new(inner: IO) -> (Self, Received) {
        let received = Received::default();
        (
            CountReads {
                inner,
                received: received.clone(),
            },
            received,
        )
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for CountReads<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.inner).poll_read(cx, buf);
        let read = (buf.filled().len() - before) as u64;
        if read > 0 {
            self.received.0.fetch_add(read, Ordering::Relaxed);
        }
        result
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for CountReads<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The pings of one connection: once it has read nothing for `interval`,
/// a ping; when that ping is not answered within `timeout`, the
/// connection is given up.
///
/// Reads are checked when the timer fires rather than on every read, so
/// a ping goes out after one to two intervals without a frame: no work on
/// the path of each read beyond the count [`CountReads`] keeps anyway.
pub(super) struct Keepalive {
    /// `None` when pings are off (or h2 gave no handle).
    ping_pong: Option<PingPong>,
    timeout: Duration,
    interval: Duration,
    timer: Timer,
    awaiting_pong: bool,
}

/// When to look for reads and maybe ping or, while a ping is out, when to
/// give up; and how much the connection had read when it was set.
struct Timer {
    sleep: Pin<Box<Sleep>>,
    received: Received,
    received_then: u64,
}

impl Timer {
    /// Sets the timer `duration` from now, and notes what has been read
    /// so far.
    fn set(&mut self, duration: Duration) {
        self.received_then = self.received.get();
        self.sleep.as_mut().reset(deadline_after(duration));
    }

    /// Whether the connection has read anything since the timer was set.
    fn read_since(&self) -> bool {
        self.received.get() != self.received_then
    }
}

impl Keepalive {
    pub(super) fn new(
        config: &Http2Config,
        ping_pong: Option<PingPong>,
        received: Received,
    ) -> Self {
        let interval = config.keepalive_interval.unwrap_or(Duration::MAX);
        Keepalive {
            ping_pong: ping_pong.filter(|_| config.keepalive_interval.is_some()),
            timeout: config.keepalive_timeout,
            interval,
            timer: Timer {
                sleep: Box::pin(tokio::time::sleep_until(deadline_after(interval))),
                received_then: received.get(),
                received,
            },
            awaiting_pong: false,
        }
    }

    /// Completes when a ping has gone unanswered for too long; meanwhile
    /// sends the pings. Never completes again after that.
    pub(super) async fn expired(&mut self) {
        poll_fn(|cx| self.poll_expired(cx)).await
    }

    fn poll_expired(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let Some(ping_pong) = &mut self.ping_pong else {
            return Poll::Pending;
        };
        loop {
            if self.awaiting_pong {
                match ping_pong.poll_pong(cx) {
                    Poll::Ready(Ok(_)) => {
                        self.awaiting_pong = false;
                        self.timer.set(self.interval);
                    }
                    // The connection is closing; its own end will come.
                    Poll::Ready(Err(_)) => {
                        self.ping_pong = None;
                        return Poll::Pending;
                    }
                    Poll::Pending => {
                        if self.timer.sleep.as_mut().poll(cx).is_pending() {
                            return Poll::Pending;
                        }
                        self.ping_pong = None;
                        return Poll::Ready(());
                    }
                }
            }
            if self.timer.sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            // The connection read something in the interval: the peer is
            // there. Look again an interval from now.
            if self.timer.read_since() {
                self.timer.set(self.interval);
                continue;
            }
            if ping_pong.send_ping(Ping::opaque()).is_err() {
                self.ping_pong = None;
                return Poll::Pending;
            }
            self.awaiting_pong = true;
            self.timer.set(self.timeout);
        }
    }
}

/// `now + duration`, saturating far in the future.
pub(super) fn deadline_after(duration: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(duration)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 24 * 3600))
}
