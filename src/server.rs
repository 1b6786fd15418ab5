//! Serving: the transport settings, the services on the port, and shutdown.

use std::{future::Future, time::Duration};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::{
    codec::CompressionEncoding,
    transport::{Server, server::TcpIncoming},
};

use crate::{
    proto::{self, user_service_server::UserServiceServer},
    service::UserService,
    store::Store,
};

/// Largest gRPC message accepted or sent. tonic bounds decoding at 4 MiB but
/// leaves encoding unbounded; both are set. A user is well under 1 KiB and
/// the largest reply (a BulkAddUsers report, at most 100 errors) a few KiB.
pub const MAX_MESSAGE_SIZE: usize = 4 * 1024 * 1024;

/// Concurrent HTTP/2 streams (calls) per connection. tonic advertises no
/// limit by default; this is far above what a load generator needs and far
/// below what would exhaust memory.
pub const MAX_CONCURRENT_STREAMS: u32 = 1024;

/// Streams a peer may make the server reset before the connection is closed:
/// h2's protection against reset floods, which tonic 0.14.3+ switches off
/// unless set. 1024 is h2's own default.
pub const MAX_LOCAL_ERROR_RESET_STREAMS: usize = 1024;

/// Largest request header block. Metadata here is a few hundred bytes.
pub const MAX_HEADER_LIST_SIZE: u32 = 16 * 1024;

/// HTTP/2 pings on idle connections find peers that vanished without closing
/// (a half-open connection would otherwise hold its streams forever).
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long shutdown waits for calls to finish before giving up on them.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// How the server runs.
#[derive(Debug, Clone)]
pub struct Config {
    /// How long shutdown waits for in-flight calls.
    pub shutdown_grace: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
        }
    }
}

/// Why the server stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Serves `grpcUser.UserService` over `store`, plus health and reflection, on
/// `listener` until `shutdown` completes.
///
/// On shutdown the server stops accepting connections, marks itself not
/// serving, ends open streams with `UNAVAILABLE`, and waits up to
/// `config.shutdown_grace` for in-flight calls to finish.
pub async fn run<S: Store>(
    listener: TcpListener,
    store: S,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let stop = CancellationToken::new();

    let users = UserServiceServer::new(UserService::new(store, stop.clone()))
        .max_decoding_message_size(MAX_MESSAGE_SIZE)
        .max_encoding_message_size(MAX_MESSAGE_SIZE)
        .accept_compressed(CompressionEncoding::Gzip)
        .accept_compressed(CompressionEncoding::Zstd)
        .send_compressed(CompressionEncoding::Gzip)
        .send_compressed(CompressionEncoding::Zstd);

    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<UserServiceServer<UserService<S>>>()
        .await;

    // grpcurl 1.8 only speaks v1alpha; newer clients use v1. The health
    // service is described too, so grpcurl can call it without a proto file.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;

    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let serve = Server::builder()
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .http2_max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESET_STREAMS))
        .http2_max_header_list_size(MAX_HEADER_LIST_SIZE)
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
        .add_service(users)
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .serve_with_incoming_shutdown(incoming, stop.clone().cancelled_owned());
    let mut serve = std::pin::pin!(serve);

    tokio::select! {
        result = &mut serve => return result.map_err(ServeError::from),
        () = shutdown => {}
    }

    tracing::info!(grace = ?config.shutdown_grace, "shutting down");
    health
        .set_not_serving::<UserServiceServer<UserService<S>>>()
        .await;
    stop.cancel();
    match tokio::time::timeout(config.shutdown_grace, serve).await {
        Ok(result) => result?,
        Err(_) => tracing::warn!("grace period over, closing the calls still open"),
    }
    tracing::info!("stopped");
    Ok(())
}
