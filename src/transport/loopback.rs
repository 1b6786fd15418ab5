//! In-memory HTTP/2 connections into the server's own connection handling,
//! for the playground's bridge: each is served by [`Connection::serve`]
//! with the port's service (call guard, auth, metrics, traces), its
//! settings, its counts and its shutdown, and its calls carry the info of
//! the browser's connection, as if the browser had made them itself.

use std::{fmt, panic::AssertUnwindSafe, sync::Arc};

use futures::FutureExt as _;
use tokio::{io::DuplexStream, time::Instant};
use tokio_util::sync::CancellationToken;

use super::{
    CallService, ConnectInfo, ConnectionStats, ResponseBody, TransportConfig,
    connection::Connection, panic_message,
};

/// Bytes the in-memory pipe holds in each direction: about one socket
/// buffer. HTTP/2 flow control bounds what is in flight above it.
const PIPE_CAPACITY: usize = 64 * 1024;

/// Opens in-memory connections served as the browser's own. Cheap to clone.
#[derive(Clone)]
pub struct Loopback {
    open: Arc<dyn Fn() -> DuplexStream + Send + Sync>,
}

impl fmt::Debug for Loopback {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Loopback").finish_non_exhaustive()
    }
}

impl Loopback {
    /// Connections served with `service` and `config`, counted in `stats`
    /// (as calls and panics; the browser's TCP connection is the one
    /// counted open), ended with the server by `stop`, each call carrying
    /// `connect_info`.
    pub(super) fn new<S, B>(
        service: S,
        config: TransportConfig,
        stats: ConnectionStats,
        stop: CancellationToken,
        connect_info: ConnectInfo,
    ) -> Self
    where
        S: CallService<B> + Sync,
        B: ResponseBody,
    {
        let config = Arc::new(config);
        let open = move || {
            let (client_end, server_end) = tokio::io::duplex(PIPE_CAPACITY);
            let (service, config, stats, stop, connect_info) = (
                service.clone(),
                config.clone(),
                stats.clone(),
                stop.clone(),
                connect_info.clone(),
            );
            tokio::spawn(async move {
                let client = connect_info.client();
                let connection = Connection {
                    service,
                    config: &config,
                    stats: &stats,
                    handshake_deadline: Instant::now() + config.handshake_timeout,
                    stop,
                    connect_info,
                };
                match AssertUnwindSafe(connection.serve(server_end))
                    .catch_unwind()
                    .await
                {
                    Ok(Ok(())) => {}
                    Ok(Err(err)) => {
                        tracing::debug!(%err, "playground connection ended with an error")
                    }
                    Err(panic) => {
                        stats.count_panicked_connection();
                        tracing::error!(
                            client.address = %client.ip(),
                            client.port = client.port(),
                            panic = panic_message(&*panic),
                            "a playground connection's task panicked; it is closed, the server goes on"
                        );
                    }
                }
            });
            client_end
        };
        Loopback {
            open: Arc::new(open),
        }
    }

    /// A new connection: the client's end of the pipe, ready for an HTTP/2
    /// handshake.
    pub fn connect(&self) -> DuplexStream {
        (self.open)()
    }
}
