//! The accept loop: a task per connection, until shutdown.

use std::{convert::Infallible, io, time::Duration};

use bytes::Bytes;
use http_body::Body;
use tokio::{net::TcpListener, task::JoinSet, time::Instant};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tower_service::Service;

use super::{
    Http2Settings, connection,
    stream::{BoxError, RequestBody},
};
use crate::batched_io::BatchedWrites;

/// How long a new connection has to complete its handshake (TLS, then the
/// HTTP/2 preface): a socket that connects and says nothing holds a task
/// and a descriptor, so it is closed.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// First pause after an accept error that is not about one connection
/// (descriptors exhausted, out of memory): retrying at once would spin.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(5);

/// Longest pause between accept attempts while the errors go on.
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Serves connections from `listener` until `stop` is cancelled, then
/// stops accepting and waits for every connection to finish its calls
/// (each is told to go away, and its calls end as their handlers decide).
/// Dropping the future instead closes every connection at once.
pub async fn serve<S, B>(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    service: S,
    settings: Http2Settings,
    stop: CancellationToken,
) where
    S: Service<http::Request<RequestBody>, Response = http::Response<B>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError> + Send,
{
    let mut connections = JoinSet::new();
    let mut errors = AcceptErrors::default();
    loop {
        let accepted = tokio::select! {
            biased;
            () = stop.cancelled() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            accepted = listener.accept() => accepted,
        };
        let tcp = match accepted {
            Ok((tcp, _)) => {
                errors.recovered();
                tcp
            }
            Err(err) => {
                let pause = errors.failed(&err);
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(pause) => continue,
                }
            }
        };
        // Replies are small and latency matters more than packet count;
        // BatchedWrites already coalesces what is ready together.
        let _ = tcp.set_nodelay(true);
        let io = BatchedWrites::new(tcp);
        let service = service.clone();
        let settings = settings.clone();
        let stop = stop.clone();
        let tls = tls.clone();
        connections.spawn(async move {
            let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
            let result = match tls {
                None => connection::serve(io, service, &settings, deadline, stop).await,
                Some(tls) => {
                    let Ok(Ok(io)) = tokio::time::timeout_at(deadline, tls.accept(io)).await else {
                        tracing::debug!("TLS handshake failed or timed out");
                        return;
                    };
                    connection::serve(io, service, &settings, deadline, stop).await
                }
            };
            if let Err(err) = result {
                tracing::debug!(%err, "connection ended with an error");
            }
        });
    }
    drop(listener);
    while connections.join_next().await.is_some() {}
}

/// Accept errors: which ones to pause after, and a log line for them at a
/// bounded rate.
#[derive(Debug, Default)]
struct AcceptErrors {
    /// The pause after the last error, while errors go on.
    backoff: Option<Duration>,
    /// When the last error was logged, and how many were not since.
    logged_at: Option<Instant>,
    unlogged: u64,
}

/// At most one log line about accept errors per this long.
const ACCEPT_ERROR_LOG_INTERVAL: Duration = Duration::from_secs(5);

impl AcceptErrors {
    fn recovered(&mut self) {
        self.backoff = None;
    }

    /// Records `err`; returns how long to wait before accepting again.
    fn failed(&mut self, err: &io::Error) -> Duration {
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
        let pause = self.backoff.map_or(ACCEPT_BACKOFF_MIN, |last| {
            (last * 2).min(ACCEPT_BACKOFF_MAX)
        });
        self.backoff = Some(pause);
        let now = Instant::now();
        if self
            .logged_at
            .is_none_or(|at| now.duration_since(at) >= ACCEPT_ERROR_LOG_INTERVAL)
        {
            tracing::warn!(
                %err,
                similar_errors_not_logged = self.unlogged,
                retry_in = ?pause,
                "cannot accept connections"
            );
            self.logged_at = Some(now);
            self.unlogged = 0;
        } else {
            self.unlogged += 1;
        }
        pause
    }
}
