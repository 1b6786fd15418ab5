//! One HTTP/2 connection: the handshake, a task per call, keepalive pings,
//! going away when idle, old or shut down.

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

use bytes::Bytes;
use h2::{Ping, PingPong};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    task::JoinSet,
    time::{Instant, Sleep},
};
use tokio_util::sync::CancellationToken;

use super::{
    CallService, ConnectInfo, ConnectionStats, Http2Config, ResponseBody, TransportConfig, stream,
};

/// The HTTP/2 preface (24 bytes) and the header of the client's first frame
/// (9 bytes), which h2 accepts only if it is SETTINGS: a client that has
/// sent this much has finished its side of the handshake.
const PREFACE_AND_SETTINGS: u64 = 24 + 9;

/// How long a connection closed abruptly (past its age grace) may take to
/// send its GOAWAY before the socket is dropped anyway.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// One connection to serve, and what it needs.
pub struct Connection<'a, S> {
    pub service: S,
    pub config: &'a TransportConfig,
    pub stats: &'a ConnectionStats,
    /// When the handshake (TLS, the preface, the client's SETTINGS) must
    /// be done by, or the connection is closed.
    pub handshake_deadline: Instant,
    /// Cancelled when the server shuts down.
    pub stop: CancellationToken,
    /// Given to every call, in its request's extensions.
    pub connect_info: ConnectInfo,
}

impl<S> Connection<'_, S> {
    /// Serves the calls of the connection `io` until the client closes it,
    /// it fails, or it is told to go away (server shutdown, idle, age) and
    /// its calls have finished.
    ///
    /// Each call runs in its own task, owned by this connection. When the
    /// connection ends, calls still running are let go to finish on their
    /// own (their streams are broken: they end soon); when the future is
    /// dropped, they are cancelled.
    pub async fn serve<IO, B>(self, io: IO) -> Result<(), h2::Error>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
        S: CallService<B>,
        B: ResponseBody,
    {
        let Connection {
            service,
            config,
            stats,
            handshake_deadline,
            stop,
            connect_info,
        } = self;
        let client = connect_info.client();
        let (io, received) = CountReads::new(io);
        let handshake = config.http2.builder().handshake(io);
        let Ok(conn) = tokio::time::timeout_at(handshake_deadline, handshake).await else {
            stats.count_handshake_timeout();
            tracing::debug!(
                client.address = %client.ip(),
                client.port = client.port(),
                "no HTTP/2 preface in time; closing the connection"
            );
            return Ok(());
        };
        let mut conn: h2::server::Connection<_, Bytes> = conn?;
        let mut keepalive = Keepalive::new(&config.http2, conn.ping_pong());
        let mut calls = JoinSet::new();
        // Until the client's SETTINGS are in, the handshake deadline holds.
        let mut greeted = false;
        let handshake_timer = tokio::time::sleep_until(handshake_deadline);
        // Reset whenever the last call ends.
        let idle_timer = tokio::time::sleep_until(deadline_after(
            config.max_connection_idle.unwrap_or(Duration::MAX),
        ));
        let age_timer = tokio::time::sleep_until(deadline_after(
            config.max_connection_age.map_or(Duration::MAX, jittered),
        ));
        tokio::pin!(handshake_timer, idle_timer, age_timer);
        // Set once the connection has been told to go away.
        let mut closing = false;
        // Armed when the connection, sent GOAWAY for its age, must close
        // whatever its calls are doing; then again, once it has been closed
        // abruptly, to bound the wait for that GOAWAY to go out.
        let mut grace_timer: Option<Pin<Box<Sleep>>> = None;
        let mut forced = false;
        let ended = loop {
            tokio::select! {
                // Accepting also drives the connection: every frame in and out.
                accepted = conn.accept() => match accepted {
                    Some(Ok((mut request, respond))) => {
                        connect_info.add_to(request.extensions_mut());
                        calls.spawn(stream::serve(request, respond, service.clone()));
                    }
                    Some(Err(err)) => break Err(err),
                    // Closed: by the client, or once told to go away and
                    // every call is done.
                    None => break Ok(()),
                },
                Some(_) = calls.join_next(), if !calls.is_empty() => {
                    if calls.is_empty()
                        && let Some(idle) = config.max_connection_idle
                    {
                        idle_timer.as_mut().reset(deadline_after(idle));
                    }
                }
                () = &mut handshake_timer, if !greeted => {
                    if received.get() < PREFACE_AND_SETTINGS {
                        stats.count_handshake_timeout();
                        tracing::debug!(
                            client.address = %client.ip(),
                            client.port = client.port(),
                            "no SETTINGS from the client in time; closing the connection"
                        );
                        break Ok(());
                    }
                    greeted = true;
                }
                () = stop.cancelled(), if !closing => {
                    closing = true;
                    conn.graceful_shutdown();
                }
                () = &mut idle_timer, if !closing && calls.is_empty() => {
                    stats.count_idle_closed();
                    tracing::debug!(
                        client.address = %client.ip(),
                        client.port = client.port(),
                        "connection idle; sending GOAWAY"
                    );
                    closing = true;
                    conn.graceful_shutdown();
                }
                () = &mut age_timer, if !closing => {
                    stats.count_aged_out();
                    tracing::debug!(
                        client.address = %client.ip(),
                        client.port = client.port(),
                        "connection at its maximum age; sending GOAWAY"
                    );
                    closing = true;
                    conn.graceful_shutdown();
                    grace_timer = config
                        .max_connection_age_grace
                        .map(|grace| Box::pin(tokio::time::sleep(grace)));
                }
                () = async { grace_timer.as_mut().expect("enabled only when set").await },
                    if grace_timer.is_some() =>
                {
                    if forced {
                        break Ok(());
                    }
                    tracing::debug!(
                        client.address = %client.ip(),
                        client.port = client.port(),
                        calls = calls.len(),
                        "age grace over; closing the connection"
                    );
                    // GOAWAY, and every stream still open is ended.
                    conn.abrupt_shutdown(h2::Reason::NO_ERROR);
                    forced = true;
                    grace_timer = Some(Box::pin(tokio::time::sleep(CLOSE_TIMEOUT)));
                }
                () = keepalive.expired() => {
                    tracing::debug!(
                        client.address = %client.ip(),
                        client.port = client.port(),
                        "keepalive ping unanswered; closing the connection"
                    );
                    break Ok(());
                }
            }
        };
        // Calls still running find their stream broken and end as their
        // handlers decide (an import commits the rows it received): they
        // are let go, not cancelled. (Dropping the connection's future
        // instead, at the end of the shutdown grace, cancels them.)
        calls.detach_all();
        ended
    }
}

/// `duration` give or take a tenth, at random: connections opened
/// together (by a fleet of clients restarted together, say) do not all
/// reach their maximum age at once and reconnect in a storm.
fn jittered(duration: Duration) -> Duration {
    duration.mul_f64(fastrand::f64().mul_add(0.2, 0.9))
}

/// An I/O stream that counts the bytes read from it.
struct CountReads<IO> {
    inner: IO,
    received: Received,
}

/// The count of a [`CountReads`], readable while h2 owns the stream.
#[derive(Clone, Default)]
struct Received(Arc<AtomicU64>);

impl Received {
    fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

impl<IO> CountReads<IO> {
    fn new(inner: IO) -> (Self, Received) {
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

/// HTTP/2 pings on a connection, to find a peer that vanished without
/// closing it (a half-open connection would otherwise hold its calls
/// forever): a ping every `interval`, and the connection is given up when
/// one goes unanswered for `timeout`.
struct Keepalive {
    /// `None` when pings are off (or h2 gave no handle).
    ping_pong: Option<PingPong>,
    timeout: Duration,
    interval: Duration,
    /// When to send the next ping or, while one is out, when to give up.
    timer: Pin<Box<Sleep>>,
    awaiting_pong: bool,
}

impl Keepalive {
    fn new(config: &Http2Config, ping_pong: Option<PingPong>) -> Self {
        let interval = config.keepalive_interval.unwrap_or(Duration::MAX);
        Keepalive {
            ping_pong: ping_pong.filter(|_| config.keepalive_interval.is_some()),
            timeout: config.keepalive_timeout,
            interval,
            timer: Box::pin(tokio::time::sleep_until(deadline_after(interval))),
            awaiting_pong: false,
        }
    }

    /// Completes when a ping has gone unanswered for too long; meanwhile
    /// sends the pings.
    async fn expired(&mut self) {
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
                        self.timer.as_mut().reset(deadline_after(self.interval));
                    }
                    // The connection is closing; its own end will come.
                    Poll::Ready(Err(_)) => {
                        self.ping_pong = None;
                        return Poll::Pending;
                    }
                    Poll::Pending => {
                        return match self.timer.as_mut().poll(cx) {
                            Poll::Ready(()) => Poll::Ready(()),
                            Poll::Pending => Poll::Pending,
                        };
                    }
                }
            }
            if self.timer.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            if ping_pong.send_ping(Ping::opaque()).is_err() {
                self.ping_pong = None;
                return Poll::Pending;
            }
            self.awaiting_pong = true;
            self.timer.as_mut().reset(deadline_after(self.timeout));
        }
    }
}

/// `now + duration`, saturating far in the future.
fn deadline_after(duration: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(duration)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 24 * 3600))
}
