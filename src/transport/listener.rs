//! The accept loop: a task per connection, until shutdown.

use std::{io, net::SocketAddr, panic::AssertUnwindSafe, time::Duration};

use futures::FutureExt as _;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::{TcpListener, TcpStream},
    task::JoinSet,
    time::Instant,
};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use super::{
    CallService, ConnectInfo, ConnectionStats, Http1Connection, Io, Loopback, ResponseBody,
    TransportConfig, connection, panic_message,
    sniff::{Protocol, sniff},
    stats::OpenConnection,
};
use crate::{
    batched_io::{BatchedWrites, CallTasks},
    playground::Playground,
};

/// First pause after an accept error that is not about one connection
/// (descriptors exhausted, out of memory): retrying at once would spin.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(5);

/// Longest pause between accept attempts while the errors go on. A
/// connection that closes meanwhile frees a descriptor and ends the pause
/// at once.
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// At most one log line per this long about refused connections, and one
/// about accept errors: a flood must not turn into a flood of logs.
const LOG_INTERVAL: Duration = Duration::from_secs(5);

/// Serves connections from `listener` until `stop` is cancelled, then
/// stops accepting and waits for every connection to finish its calls
/// (each is told to go away, and its calls end as their handlers decide).
/// Dropping the future instead closes every connection at once.
///
/// Past `config.max_connections` open connections, a new connection is
/// closed as soon as it is accepted: the cheapest answer during a flood,
/// which is when the limit is reached, and one every gRPC client retries
/// (it sees the connection closed, `UNAVAILABLE`).
///
/// With `playground`, connections that are not HTTP/2 are handed to it
/// (by ALPN under TLS, by their first bytes in plaintext); without it
/// every connection is HTTP/2.
pub async fn serve<S, B>(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    service: S,
    playground: Option<Playground>,
    config: TransportConfig,
    stats: ConnectionStats,
    stop: CancellationToken,
) where
    S: CallService<B> + Sync,
    B: ResponseBody,
{
    let mut connections = JoinSet::new();
    let mut errors = AcceptErrors::default();
    let mut refusals = LogLimiter::default();
    loop {
        let accepted = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = listener.accept() => accepted,
        };
        let (tcp, client) = match accepted {
            Ok(accepted) => {
                errors.recovered();
                accepted
            }
            Err(err) => {
                let pause = errors.failed(&err, &stats);
                if pause.is_zero() {
                    continue;
                }
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(pause) => {}
                    // A connection that ends frees its descriptor.
                    Some(_) = connections.join_next(), if !connections.is_empty() => {}
                }
                continue;
            }
        };
        if stats.open() >= config.max_connections as u64 {
            stats.count_refused();
            if let Some(unlogged) = refusals.allow() {
                tracing::warn!(
                    max_connections = config.max_connections,
                    refused_since_last_log = unlogged + 1,
                    "connection limit reached; closing new connections"
                );
            }
            drop(tcp);
            continue;
        }
        let accepted = Accepted {
            open: stats.opened(),
            tcp,
            client,
            tls: tls.clone(),
            service: service.clone(),
            playground: playground.clone(),
            config: config.clone(),
            stats: stats.clone(),
            stop: stop.clone(),
        };
        connections.spawn(accepted.serve());
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
}

/// An accepted connection, and what serving it takes.
struct Accepted<S> {
    /// Counts the connection as open until it is dropped.
    open: OpenConnection,
    tcp: TcpStream,
    client: SocketAddr,
    tls: Option<TlsAcceptor>,
    service: S,
    playground: Option<Playground>,
    config: TransportConfig,
    stats: ConnectionStats,
    stop: CancellationToken,
}

impl<S> Accepted<S> {
    /// Serves the connection (see [`Accepted::run`]); a panic in it is
    /// logged and counted, and closes this connection only.
    async fn serve<B>(self)
    where
        S: CallService<B> + Sync,
        B: ResponseBody,
    {
        let (client, stats) = (self.client, self.stats.clone());
        if let Err(panic) = AssertUnwindSafe(self.run()).catch_unwind().await {
            stats.count_panicked_connection();
            tracing::error!(
                client.address = %client.ip(),
                client.port = client.port(),
                panic = panic_message(&*panic),
                "a connection's task panicked; the connection is closed, the server goes on"
            );
        }
    }

    /// Serves the connection: its TLS handshake when the server speaks TLS,
    /// then its protocol until the connection ends. This is where a
    /// connection's protocol is settled. Without the playground it is
    /// HTTP/2, always. With it, under TLS, ALPN says (`h2` or `http/1.1`);
    /// in plaintext, or under TLS without ALPN, the first bytes do (the
    /// HTTP/2 preface, or anything else for HTTP/1.1), read within the
    /// handshake timeout.
    async fn run<B>(self)
    where
        S: CallService<B> + Sync,
        B: ResponseBody,
    {
        let Accepted {
            open: _open,
            tcp,
            client,
            tls,
            service,
            playground,
            config,
            stats,
            stop,
        } = self;
        // Replies are small and latency matters more than packet count;
        // BatchedWrites already coalesces what is ready together.
        let _ = tcp.set_nodelay(true);
        let io = BatchedWrites::new(tcp);
        let handshake_deadline = Instant::now() + config.handshake_timeout;
        let serving = Serving {
            call_tasks: io.call_tasks(),
            service,
            playground,
            config: &config,
            stats: &stats,
            handshake_deadline,
            stop,
        };
        match tls {
            None => {
                let connect_info = ConnectInfo::plain(client, &io);
                serving.serve(io, None, connect_info).await;
            }
            Some(tls) => match tokio::time::timeout_at(handshake_deadline, tls.accept(io)).await {
                Ok(Ok(io)) => {
                    let connect_info = ConnectInfo::tls(client, &io);
                    let protocol = match io.get_ref().1.alpn_protocol() {
                        Some(b"h2") => Some(Protocol::Http2),
                        Some(b"http/1.1") => Some(Protocol::Http1),
                        _ => None,
                    };
                    serving.serve(io, protocol, connect_info).await;
                }
                Ok(Err(err)) => {
                    tracing::debug!(
                        %err,
                        client.address = %client.ip(),
                        client.port = client.port(),
                        "TLS handshake failed"
                    );
                }
                Err(_) => {
                    stats.count_handshake_timeout();
                    tracing::debug!(
                        client.address = %client.ip(),
                        client.port = client.port(),
                        "TLS handshake not done in time; closing"
                    );
                }
            },
        }
    }
}

/// What serving an accepted connection takes, once TLS is done.
struct Serving<'a, S> {
    /// The flag of the connection's `BatchedWrites`.
    call_tasks: CallTasks,
    service: S,
    playground: Option<Playground>,
    config: &'a TransportConfig,
    stats: &'a ConnectionStats,
    handshake_deadline: Instant,
    stop: CancellationToken,
}

impl<S> Serving<'_, S> {
    /// Serves `io` as `protocol`, or, when ALPN did not settle it, as its
    /// first bytes show (only with the playground on: without it, a
    /// connection is HTTP/2 and nothing is read ahead of h2).
    async fn serve<IO, B>(self, io: IO, protocol: Option<Protocol>, connect_info: ConnectInfo)
    where
        IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
        S: CallService<B> + Sync,
        B: ResponseBody,
    {
        let client = connect_info.client();
        let result = match (self.playground.clone(), protocol) {
            (None, _) | (Some(_), Some(Protocol::Http2)) => self.http2(io, connect_info).await,
            (Some(playground), Some(Protocol::Http1)) => {
                self.http1(playground, Box::new(io), connect_info).await;
                Ok(())
            }
            (Some(playground), None) => {
                match tokio::time::timeout_at(self.handshake_deadline, sniff(io)).await {
                    Ok(Ok((Protocol::Http2, io))) => self.http2(io, connect_info).await,
                    Ok(Ok((Protocol::Http1, io))) => {
                        self.http1(playground, Box::new(io), connect_info).await;
                        Ok(())
                    }
                    Ok(Err(err)) => {
                        tracing::debug!(
                            %err,
                            client.address = %client.ip(),
                            client.port = client.port(),
                            "connection closed before its first request"
                        );
                        Ok(())
                    }
                    Err(_) => {
                        self.stats.count_handshake_timeout();
                        tracing::debug!(
                            client.address = %client.ip(),
                            client.port = client.port(),
                            "no request in time; closing the connection"
                        );
                        Ok(())
                    }
                }
            }
        };
        if let Err(err) = result {
            tracing::debug!(
                %err,
                client.address = %client.ip(),
                client.port = client.port(),
                "connection ended with an error"
            );
        }
    }

    async fn http2<IO, B>(self, io: IO, connect_info: ConnectInfo) -> Result<(), h2::Error>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
        S: CallService<B>,
        B: ResponseBody,
    {
        let connection = connection::Connection {
            service: self.service,
            config: self.config,
            stats: self.stats,
            handshake_deadline: self.handshake_deadline,
            stop: self.stop,
            connect_info,
            call_tasks: self.call_tasks,
        };
        connection.serve(io).await
    }

    async fn http1<B>(self, playground: Playground, io: Box<dyn Io>, connect_info: ConnectInfo)
    where
        S: CallService<B> + Sync,
        B: ResponseBody,
    {
        let connection = Http1Connection {
            io,
            client: connect_info.client(),
            tls: connect_info.is_tls(),
            local_addr: connect_info.local_addr(),
            loopback: Loopback::new(
                self.service,
                self.config.clone(),
                self.stats.clone(),
                self.stop.clone(),
                connect_info,
            ),
            handshake_deadline: self.handshake_deadline,
            max_idle: self.config.max_connection_idle,
            stop: self.stop,
            stats: self.stats.clone(),
        };
        playground.serve_connection(connection).await;
    }
}

/// Accept errors: which ones to pause after, and a log line for them at a
/// bounded rate.
#[derive(Debug, Default)]
struct AcceptErrors {
    /// The pause after the last error, while errors go on.
    backoff: Option<Duration>,
    log: LogLimiter,
}

impl AcceptErrors {
    fn recovered(&mut self) {
        self.backoff = None;
    }

    /// Records `err`; returns how long to wait before accepting again.
    fn failed(&mut self, err: &io::Error, stats: &ConnectionStats) -> Duration {
        // These concern one connection that went away before it was
        // accepted: the next one can be accepted at once.
        if matches!(
            err.kind(),
            io::ErrorKind::ConnectionAborted
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::Interrupted
        ) {
            return Duration::ZERO;
        }
        stats.count_accept_error();
        let pause = self.backoff.map_or(ACCEPT_BACKOFF_MIN, |last| {
            (last * 2).min(ACCEPT_BACKOFF_MAX)
        });
        self.backoff = Some(pause);
        if let Some(unlogged) = self.log.allow() {
            tracing::warn!(
                %err,
                similar_errors_since_last_log = unlogged + 1,
                retry_in = ?pause,
                "cannot accept connections"
            );
        }
        pause
    }
}

/// Lets one log line through per [`LOG_INTERVAL`], counting the others.
#[derive(Debug, Default)]
struct LogLimiter {
    logged_at: Option<Instant>,
    unlogged: u64,
}

impl LogLimiter {
    /// `Some(events not logged since the last line)` when this one may be
    /// logged.
    fn allow(&mut self) -> Option<u64> {
        let now = Instant::now();
        if self
            .logged_at
            .is_some_and(|at| now.duration_since(at) < LOG_INTERVAL)
        {
            self.unlogged += 1;
            return None;
        }
        self.logged_at = Some(now);
        Some(std::mem::take(&mut self.unlogged))
    }
}

#[cfg(test)]
mod tests {
    use std::{
        convert::Infallible,
        sync::{
            Arc,
            atomic::{AtomicUsize, Ordering},
        },
        task::{Context, Poll},
    };

    use tower_service::Service;

    use super::super::{
        RequestBody,
        testing::{self, TestBody, call},
    };
    use super::*;

    /// A service whose second clone panics: the listener clones it for a
    /// connection, and the connection's task for each call.
    #[derive(Default)]
    struct SecondClonePanics {
        clones: Arc<AtomicUsize>,
    }

    impl Clone for SecondClonePanics {
        fn clone(&self) -> Self {
            if self.clones.fetch_add(1, Ordering::SeqCst) == 1 {
                panic!("the connection's task panics");
            }
            SecondClonePanics {
                clones: self.clones.clone(),
            }
        }
    }

    impl Service<http::Request<RequestBody>> for SecondClonePanics {
        type Response = http::Response<TestBody>;
        type Error = Infallible;
        type Future = std::future::Ready<Result<Self::Response, Infallible>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: http::Request<RequestBody>) -> Self::Future {
            std::future::ready(Ok(testing::head(Some("0"), testing::empty())))
        }
    }

    async fn h2_client(addr: SocketAddr) -> h2::client::SendRequest<bytes::Bytes> {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let (client, connection) = h2::client::handshake(tcp).await.unwrap();
        tokio::spawn(connection);
        client.ready().await.unwrap()
    }

    #[tokio::test]
    async fn a_connection_whose_task_panics_is_counted_and_closed_and_the_next_is_served() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stats = ConnectionStats::default();
        let stop = CancellationToken::new();
        tokio::spawn(serve(
            listener,
            None,
            SecondClonePanics::default(),
            None,
            TransportConfig::default(),
            stats.clone(),
            stop.clone(),
        ));
        let mut first = h2_client(addr).await;
        assert!(call(&mut first, "/first").await.is_err());
        testing::until(|| stats.panicked_connections() == 1).await;
        let mut second = h2_client(addr).await;
        let response = call(&mut second, "/second").await.unwrap();
        assert_eq!(response.headers()["grpc-status"], "0");
        assert_eq!(stats.panicked_connections(), 1);
        assert_eq!(stats.accepted(), 2);
        stop.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn one_line_per_interval_with_the_count_of_the_others() {
        let mut log = LogLimiter::default();
        assert_eq!(log.allow(), Some(0));
        assert_eq!(log.allow(), None);
        assert_eq!(log.allow(), None);
        tokio::time::advance(LOG_INTERVAL).await;
        assert_eq!(log.allow(), Some(2));
        assert_eq!(log.allow(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn accept_errors_back_off_and_recover() {
        let stats = ConnectionStats::default();
        let mut errors = AcceptErrors::default();
        let emfile = io::Error::from_raw_os_error(24);
        let pauses: Vec<_> = (0..10).map(|_| errors.failed(&emfile, &stats)).collect();
        assert_eq!(pauses[0], ACCEPT_BACKOFF_MIN);
        assert_eq!(pauses[1], ACCEPT_BACKOFF_MIN * 2);
        assert_eq!(pauses[9], ACCEPT_BACKOFF_MAX);
        assert_eq!(stats.accept_errors(), 10);
        // One connection's trouble is no reason to wait.
        let aborted = io::Error::from(io::ErrorKind::ConnectionAborted);
        assert_eq!(errors.failed(&aborted, &stats), Duration::ZERO);
        errors.recovered();
        assert_eq!(errors.failed(&emfile, &stats), ACCEPT_BACKOFF_MIN);
    }
}
