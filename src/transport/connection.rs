//! One HTTP/2 connection: the handshake, its calls (in the connection's
//! task when they finish at once, in a task of their own when they wait),
//! keepalive pings, going away when idle, old or shut down.

use std::{
    any::Any,
    future::{Future, poll_fn},
    net::SocketAddr,
    panic::AssertUnwindSafe,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use futures::FutureExt as _;
use h2::{RecvStream, server::SendResponse};
use http::uri::PathAndQuery;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    task::{JoinError, JoinSet},
    time::{Instant, Sleep},
};
use tokio_util::sync::CancellationToken;

use crate::batched_io::CallTasks;

use super::{
    CallService, ConnectInfo, ConnectionStats, ResponseBody, TransportConfig,
    keepalive::{CountReads, Keepalive, deadline_after},
    panic_message, stream,
};

/// The HTTP/2 preface (24 bytes) and the header of the client's first frame
/// (9 bytes), which h2 accepts only if it is SETTINGS: a client that has
/// sent this much has finished its side of the handshake.
const PREFACE_AND_SETTINGS: u64 = 24 + 9;

/// How long a connection closed abruptly (past its age grace, or for an
/// unanswered ping) may take to send its GOAWAY before the socket is
/// dropped anyway.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// Most calls accepted in one go before they are started: bounds how long
/// the connection reads before its first call of a burst runs. h2 holds at
/// most `max_concurrent_streams` open anyway; a grpc-go client with 64
/// callers sends about 13 requests per read (0.074 `recvfrom` per GetUser
/// call, BENCHMARKS.md).
const MAX_ACCEPTED_AT_ONCE: usize = 256;

/// A call h2 has accepted: its request, and where its reply goes.
type Accepted = (http::Request<RecvStream>, SendResponse<Bytes>);

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
    /// Told whether calls run in tasks of their own, for the flush delay
    /// of the connection's `BatchedWrites` (if it has one).
    pub call_tasks: CallTasks,
}

impl<S> Connection<'_, S> {
    /// Serves the calls of the connection `io` until the client closes it,
    /// it fails, or it is told to go away (server shutdown, idle, age) and
    /// its calls have finished.
    ///
    /// Calls are started once h2 has read everything the socket holds, so
    /// that a unary request's DATA frame, which arrives with its HEADERS, is
    /// in: each call is polled once in this task, and one that finishes
    /// there (a unary call on the memory store) costs no task, no wake-up
    /// of another thread and no contention with it on h2's lock, and its
    /// reply goes out with the others of the same read, in one write. A
    /// call that has to wait continues in a task of its own, owned by this
    /// connection. When the connection ends, calls still running are let
    /// go to finish on their own (their streams are broken: they end
    /// soon); when the future is dropped, they are cancelled.
    pub async fn serve<IO, B>(self, io: IO) -> Result<(), h2::Error>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
        S: CallService<B>,
        B: ResponseBody,
    {
        let Connection {
            mut service,
            config,
            stats,
            handshake_deadline,
            stop,
            connect_info,
            call_tasks,
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
        let mut keepalive = Keepalive::new(&config.http2, conn.ping_pong(), received.clone());
        let mut calls = JoinSet::new();
        let mut accepted = Vec::new();
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
                end = poll_fn(|cx| poll_accept_all(&mut conn, &mut accepted, cx)) => {
                    poll_fn(|cx| {
                        for (request, respond) in accepted.drain(..) {
                            start(request, respond, &mut service, &connect_info, stats, &mut calls, cx);
                        }
                        Poll::Ready(())
                    })
                    .await;
                    call_tasks.set(!calls.is_empty());
                    if calls.is_empty()
                        && let Some(idle) = config.max_connection_idle
                    {
                        idle_timer.as_mut().reset(deadline_after(idle));
                    }
                    // Closed: by the client, or once told to go away and
                    // every call is done.
                    if let Some(end) = end {
                        break end;
                    }
                }
                Some(ended) = calls.join_next(), if !calls.is_empty() => {
                    report_call_panic(ended, client, stats);
                    call_tasks.set(!calls.is_empty());
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
                () = keepalive.expired(), if !forced => {
                    tracing::debug!(
                        client.address = %client.ip(),
                        client.port = client.port(),
                        "keepalive ping unanswered; closing the connection"
                    );
                    // As hyper does: GOAWAY, every stream ended, and the
                    // socket closed once that is out (or after a moment: a
                    // peer that is gone may never take it).
                    conn.abrupt_shutdown(h2::Reason::NO_ERROR);
                    closing = true;
                    forced = true;
                    grace_timer = Some(Box::pin(tokio::time::sleep(CLOSE_TIMEOUT)));
                }
            }
        };
        // Calls still running find their stream broken and end as their
        // handlers decide (an import commits the rows it received): they
        // are let go, not cancelled, to a task that only reports a panic
        // among them. (Dropping the connection's future instead, at the end
        // of the shutdown grace, cancels them.)
        if !calls.is_empty() {
            let stats = stats.clone();
            tokio::spawn(async move {
                while let Some(ended) = calls.join_next().await {
                    report_call_panic(ended, client, &stats);
                }
            });
        }
        ended
    }
}

/// How a call's task ends: `None`, or the panic it caught, with the path
/// of the call's method.
type CallPanic = Option<(Option<PathAndQuery>, Box<dyn Any + Send>)>;

/// Accepts into `accepted` every call h2 has, reading until the socket has
/// nothing more (or [`MAX_ACCEPTED_AT_ONCE`]). Pending while there is none.
/// `Some`: the connection is over (closed, or failed), after the calls
/// accepted so far.
fn poll_accept_all<IO>(
    conn: &mut h2::server::Connection<IO, Bytes>,
    accepted: &mut Vec<Accepted>,
    cx: &mut Context<'_>,
) -> Poll<Option<Result<(), h2::Error>>>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    while accepted.len() < MAX_ACCEPTED_AT_ONCE {
        match conn.poll_accept(cx) {
            Poll::Ready(Some(Ok(call))) => accepted.push(call),
            Poll::Ready(Some(Err(err))) => return Poll::Ready(Some(Err(err))),
            Poll::Ready(None) => return Poll::Ready(Some(Ok(()))),
            Poll::Pending if accepted.is_empty() => return Poll::Pending,
            Poll::Pending => break,
        }
    }
    Poll::Ready(None)
}

/// Starts a call: polls it once here, in the connection's task (`cx`), and
/// if it is not done, hands it to a task of its own in `calls`. Its waker
/// is then the new task's from its next poll on, which comes at once.
fn start<S, B>(
    mut request: http::Request<RecvStream>,
    respond: SendResponse<Bytes>,
    // `&mut`, not `&`: the connection's future stays `Send` without `S:
    // Sync`.
    service: &mut S,
    connect_info: &ConnectInfo,
    stats: &ConnectionStats,
    calls: &mut JoinSet<CallPanic>,
    cx: &mut Context<'_>,
) where
    S: CallService<B>,
    B: ResponseBody,
{
    connect_info.add_to(request.extensions_mut());
    // For the log line of a panic in the call.
    let path = request.uri().path_and_query().cloned();
    let call = AssertUnwindSafe(stream::serve(request, respond, service.clone())).catch_unwind();
    let mut call = Box::pin(async move { call.await.err().map(|panic| (path, panic)) });
    match call.as_mut().poll(cx) {
        Poll::Ready(None) => {}
        Poll::Ready(panicked) => {
            report_call_panic(Ok(panicked), connect_info.client(), stats);
        }
        Poll::Pending => {
            calls.spawn(call);
        }
    }
}

/// Logs and counts a call task that panicked. Its stream was reset when
/// the task unwound; the connection and its other calls go on. (A service
/// that catches its handlers' panics, as the call guard does, answers
/// them with a status instead: this is for the transport's own code.)
fn report_call_panic(
    ended: Result<CallPanic, JoinError>,
    client: SocketAddr,
    stats: &ConnectionStats,
) {
    let Ok(Some((path, panic))) = ended else {
        return;
    };
    stats.count_panicked_call();
    tracing::error!(
        client.address = %client.ip(),
        client.port = client.port(),
        method = path.as_ref().map_or("", PathAndQuery::path),
        panic = panic_message(&*panic),
        "a call's task panicked; its stream is reset, the connection goes on"
    );
}

/// `duration` give or take a tenth, at random: connections opened
/// together (by a fleet of clients restarted together, say) do not all
/// reach their maximum age at once and reconnect in a storm.
fn jittered(duration: Duration) -> Duration {
    duration.mul_f64(fastrand::f64().mul_add(0.2, 0.9))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::time::Instant;

    use super::super::{
        RequestBody, TransportConfig, client_addr,
        testing::{self, ACK, GOAWAY, PING, RawPeer, ServiceFn, TestBody, call},
    };
    use super::*;

    const INTERVAL: Duration = Duration::from_secs(10);
    const TIMEOUT: Duration = Duration::from_secs(5);

    fn with_keepalive() -> TransportConfig {
        let mut config = TransportConfig::default();
        config.http2.keepalive_interval = Some(INTERVAL);
        config.http2.keepalive_timeout = TIMEOUT;
        config
    }

    /// A service for connections that make no call.
    fn no_calls() -> impl CallService<TestBody> {
        ServiceFn(|_| async { unreachable!("no call is made") })
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_connection_is_pinged_then_sent_goaway_when_it_does_not_answer() {
        let mut served = testing::serve(no_calls(), with_keepalive());
        let mut peer = RawPeer::handshake(served.io.take().unwrap()).await;
        let silent_since = Instant::now();
        let ping = peer.next().await.unwrap();
        assert_eq!((ping.kind, ping.flags), (PING, 0));
        let pinged_at = Instant::now();
        let silence = pinged_at - silent_since;
        assert!(
            INTERVAL <= silence && silence <= 2 * INTERVAL,
            "{silence:?}"
        );

        // Not answered: GOAWAY (no error, as hyper sends), then the end.
        let goaway = peer.next().await.unwrap();
        assert_eq!((goaway.kind, goaway.error_code()), (GOAWAY, 0));
        assert_eq!(pinged_at.elapsed(), TIMEOUT);
        assert_eq!(peer.read().await, None);
        served.task.await.unwrap().unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_keeps_sending_is_pinged_only_once_it_goes_quiet() {
        let mut served = testing::serve(no_calls(), with_keepalive());
        let mut peer = RawPeer::handshake(served.io.take().unwrap()).await;
        // Five intervals with a frame every half interval (pings of the
        // client's own): the server answers each, and pings none.
        for i in 0..10 {
            tokio::time::sleep(INTERVAL / 2).await;
            peer.send(PING, 0, 0, &[i; 8]).await;
            let pong = peer.next().await.unwrap();
            assert_eq!(
                (pong.kind, pong.flags, pong.payload),
                (PING, ACK, vec![i; 8])
            );
        }
        let quiet_since = Instant::now();
        let ping = peer.next().await.unwrap();
        assert_eq!((ping.kind, ping.flags), (PING, 0));
        let quiet = quiet_since.elapsed();
        assert!(INTERVAL <= quiet && quiet <= 2 * INTERVAL, "{quiet:?}");
        // Answered: the connection stays, and is pinged again once quiet.
        peer.send(PING, ACK, 0, &ping.payload).await;
        let answered_at = Instant::now();
        let again = peer.next().await.unwrap();
        assert_eq!((again.kind, again.flags), (PING, 0));
        assert!(answered_at.elapsed() >= INTERVAL);
        assert_eq!(served.written.count(GOAWAY), 0);
    }

    #[tokio::test]
    async fn a_call_task_that_panics_is_counted_and_the_connection_goes_on() {
        let service = ServiceFn(|request: http::Request<RequestBody>| async move {
            if request.uri().path() == "/panics" {
                panic!("the service panics");
            }
            testing::head(Some("0"), testing::empty())
        });
        let mut served = testing::serve(service, TransportConfig::default());
        let (client, connection) = h2::client::handshake(served.io.take().unwrap())
            .await
            .unwrap();
        tokio::spawn(connection);
        let mut client = client.ready().await.unwrap();
        // Unwinding dropped the stream's handle: h2 reset it (a service
        // that does not catch its panics gives no status).
        let reset = call(&mut client, "/panics").await.unwrap_err();
        assert_eq!(reset.reason(), Some(h2::Reason::CANCEL));
        // Counted (and logged), and the connection goes on.
        testing::until(|| served.stats.panicked_calls() > 0).await;
        let response = call(&mut client, "/works").await.unwrap();
        assert_eq!(response.headers()["grpc-status"], "0");
        assert_eq!(served.stats.panicked_calls(), 1);
    }

    #[tokio::test]
    async fn a_call_done_at_once_runs_in_the_connections_task_one_that_waits_in_its_own() {
        let (seen, mut tasks) = tokio::sync::mpsc::unbounded_channel();
        let service = ServiceFn(move |request: http::Request<RequestBody>| {
            let seen = seen.clone();
            async move {
                if request.uri().path() == "/waits" {
                    tokio::task::yield_now().await;
                }
                seen.send(tokio::task::id()).unwrap();
                testing::head(Some("0"), testing::empty())
            }
        });
        let mut served = testing::serve(service, TransportConfig::default());
        let connection_task = served.task.id();
        let mut client = testing::h2_client(served.io.take().unwrap()).await;
        call(&mut client, "/now").await.unwrap();
        assert_eq!(tasks.recv().await, Some(connection_task));
        call(&mut client, "/waits").await.unwrap();
        let waited_in = tasks.recv().await.unwrap();
        assert_ne!(waited_in, connection_task);
    }

    #[tokio::test]
    async fn each_call_carries_its_connections_info() {
        let (seen, mut clients) = tokio::sync::mpsc::unbounded_channel();
        let service = ServiceFn(move |request: http::Request<RequestBody>| {
            let _ = seen.send(client_addr(request.extensions()));
            async { testing::head(Some("0"), testing::empty()) }
        });
        let mut served = testing::serve(service, TransportConfig::default());
        let mut client = testing::h2_client(served.io.take().unwrap()).await;
        for path in ["/first", "/second"] {
            call(&mut client, path).await.unwrap();
            assert_eq!(clients.recv().await, Some(Some(testing::client())));
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_sends_only_the_preface_is_closed_at_the_handshake_deadline() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

        let config = TransportConfig {
            handshake_timeout: Duration::from_secs(5),
            ..TransportConfig::default()
        };
        let mut served = testing::serve(no_calls(), config);
        let mut io = served.io.take().unwrap();
        io.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .unwrap();
        let started = Instant::now();
        // The server's SETTINGS, then nothing: the connection is closed.
        let mut sent = Vec::new();
        io.read_to_end(&mut sent).await.unwrap();
        assert_eq!(started.elapsed(), Duration::from_secs(5));
        assert_eq!(served.stats.handshake_timeouts(), 1);
        served.task.await.unwrap().unwrap();
    }
}
