//! In-memory HTTP/2 connections into the server's own connection handling,
//! for the playground's bridge: each is served by [`Connection::serve`]
//! with the port's service (call guard, auth, metrics, traces), its
//! settings, its counts and its shutdown, and its calls carry the info of
//! the browser's connection, as if the browser had made them itself.

use std::{fmt, panic::AssertUnwindSafe, sync::Arc};

use futures::FutureExt as _;
use tokio::{io::DuplexStream, time::Instant};
use tokio_util::sync::CancellationToken;

use crate::batched_io::CallTasks;

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
                    call_tasks: CallTasks::default(),
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

#[cfg(test)]
mod tests {
    use super::super::{
        RequestBody, client_addr,
        testing::{self, ServiceFn, call},
    };
    use super::*;

    #[tokio::test]
    async fn calls_on_a_loopback_connection_carry_the_browsers_address() {
        let (seen, mut clients) = tokio::sync::mpsc::unbounded_channel();
        let service = ServiceFn(move |request: http::Request<RequestBody>| {
            let _ = seen.send(client_addr(request.extensions()));
            async { testing::head(Some("0"), testing::empty()) }
        });
        let stats = ConnectionStats::default();
        let loopback = Loopback::new(
            service,
            TransportConfig::default(),
            stats.clone(),
            CancellationToken::new(),
            ConnectInfo::of(testing::client()),
        );
        // Two connections, as a page that reconnects makes.
        for _ in 0..2 {
            let mut client = testing::h2_client(loopback.connect()).await;
            let response = call(&mut client, "/grpcUser.UserService/GetUser")
                .await
                .unwrap();
            assert_eq!(response.headers()["grpc-status"], "0");
            assert_eq!(clients.recv().await, Some(Some(testing::client())));
        }
        // The browser's TCP connection is the one counted open.
        assert_eq!(stats.open(), 0);
    }
}
