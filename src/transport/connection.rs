//! One HTTP/2 connection: the handshake, a task per call, keepalive pings
//! and graceful shutdown.

use std::{
    convert::Infallible,
    future::poll_fn,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use h2::{Ping, PingPong, server::Connection};
use http_body::Body;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    task::JoinSet,
    time::{Instant, Sleep},
};
use tokio_util::sync::CancellationToken;
use tower_service::Service;

use super::{
    Http2Settings,
    stream::{self, BoxError, RequestBody},
};

/// Serves the calls of one connection, once its HTTP/2 handshake is done
/// (by `handshake_deadline`, or it is closed), until the client closes it, it fails,
/// or `stop` is cancelled and its calls have finished (graceful shutdown:
/// GOAWAY, then the calls already started run to their end).
///
/// Each call runs in its own task, owned by this connection: when the
/// connection ends, calls still running are cancelled.
pub async fn serve<IO, S, B>(
    io: IO,
    service: S,
    settings: &Http2Settings,
    handshake_deadline: Instant,
    stop: CancellationToken,
) -> Result<(), h2::Error>
where
    IO: AsyncRead + AsyncWrite + Unpin,
    S: Service<http::Request<RequestBody>, Response = http::Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError> + Send,
{
    let handshake = settings.builder().handshake(io);
    let Ok(conn) = tokio::time::timeout_at(handshake_deadline, handshake).await else {
        tracing::debug!("no HTTP/2 preface in time; closing the connection");
        return Ok(());
    };
    let mut conn: Connection<IO, Bytes> = conn?;
    let mut keepalive = Keepalive::new(settings, conn.ping_pong());
    let mut calls = JoinSet::new();
    let mut closing = false;
    loop {
        tokio::select! {
            // Accepting also drives the connection: every frame in and out.
            accepted = conn.accept() => match accepted {
                Some(Ok((request, respond))) => {
                    calls.spawn(stream::serve(request, respond, service.clone()));
                }
                Some(Err(err)) => return Err(err),
                // Closed: by the client, or after a graceful shutdown once
                // every call is done.
                None => return Ok(()),
            },
            Some(_) = calls.join_next(), if !calls.is_empty() => {}
            () = stop.cancelled(), if !closing => {
                closing = true;
                conn.graceful_shutdown();
            }
            () = keepalive.expired() => {
                tracing::debug!("keepalive ping unanswered; closing the connection");
                return Ok(());
            }
        }
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
    fn new(settings: &Http2Settings, ping_pong: Option<PingPong>) -> Self {
        let interval = settings.keepalive_interval.unwrap_or(Duration::MAX);
        Keepalive {
            ping_pong: ping_pong.filter(|_| settings.keepalive_interval.is_some()),
            timeout: settings.keepalive_timeout,
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
