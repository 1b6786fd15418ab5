//! Serving: the transport settings, the services on the port, and shutdown.

use std::{future::Future, net::SocketAddr, time::Duration};

use futures::TryStreamExt;
use tokio::{net::TcpListener, sync::watch};
use tokio_util::sync::CancellationToken;
use tonic::{
    codec::CompressionEncoding,
    service::interceptor::InterceptedService,
    transport::{Certificate, Identity, Server, ServerTlsConfig, server::TcpIncoming},
};
use tonic_health::{ServingStatus, server::HealthReporter};

use crate::{
    auth::{AuthToken, Authenticate},
    batched_io::BatchedWrites,
    limits::{CallGuardLayer, Gauges},
    proto::{self, user_service_server::UserServiceServer},
    service::UserService,
    store::{Store, StoreHealth},
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

/// Calls in flight across all connections (UserService calls; a stream
/// counts until it ends). A call holds at most a page of users or a batch of
/// rows (a few hundred KiB at worst), so this bounds that memory at around a
/// GiB; past it calls are refused with RESOURCE_EXHAUSTED, not queued.
pub const MAX_IN_FLIGHT_CALLS: usize = 4096;

/// Open SyncUsers streams. Each is polled for every committed change, so the
/// cost of a write grows with them; past this, new streams are refused with
/// RESOURCE_EXHAUSTED.
pub const MAX_SUBSCRIBERS: usize = 1024;

/// How long shutdown waits for calls to finish before giving up on them.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// How the server runs. `Config::default()` uses the constants above.
#[derive(Debug, Clone)]
pub struct Config {
    /// How long shutdown waits for in-flight calls.
    pub shutdown_grace: Duration,
    /// Largest message decoded or encoded, in bytes.
    pub max_message_size: usize,
    /// Concurrent streams per HTTP/2 connection.
    pub max_concurrent_streams: u32,
    /// Streams a peer may make the server reset before it is disconnected.
    pub max_local_error_reset_streams: usize,
    /// Largest request header block, in bytes.
    pub max_header_list_size: u32,
    /// Idle time before a keepalive ping; `None` turns pings off.
    pub keepalive_interval: Option<Duration>,
    /// How long a ping may go unanswered before the connection is closed.
    pub keepalive_timeout: Duration,
    /// UserService calls in flight at once.
    pub max_in_flight_calls: usize,
    /// Open SyncUsers streams at once.
    pub max_subscribers: usize,
    /// When set, UserService and reflection calls must carry this bearer
    /// token.
    pub auth_token: Option<AuthToken>,
    /// When set, the server speaks TLS only.
    pub tls: Option<TlsConfig>,
    /// Where the server reports what it holds open.
    pub gauges: Gauges,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            max_message_size: MAX_MESSAGE_SIZE,
            max_concurrent_streams: MAX_CONCURRENT_STREAMS,
            max_local_error_reset_streams: MAX_LOCAL_ERROR_RESET_STREAMS,
            max_header_list_size: MAX_HEADER_LIST_SIZE,
            keepalive_interval: Some(KEEPALIVE_INTERVAL),
            keepalive_timeout: KEEPALIVE_TIMEOUT,
            max_in_flight_calls: MAX_IN_FLIGHT_CALLS,
            max_subscribers: MAX_SUBSCRIBERS,
            auth_token: None,
            tls: None,
            gauges: Gauges::default(),
        }
    }
}

/// The server's TLS identity (PEM), and optionally the CA that client
/// certificates must chain to (mutual TLS: clients without one are refused).
#[derive(Clone)]
pub struct TlsConfig {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    pub client_ca_pem: Option<Vec<u8>>,
}

impl std::fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The private key stays out of logs.
        f.debug_struct("TlsConfig")
            .field("mutual", &self.client_ca_pem.is_some())
            .finish_non_exhaustive()
    }
}

impl TlsConfig {
    fn server_config(&self) -> ServerTlsConfig {
        let tls =
            ServerTlsConfig::new().identity(Identity::from_pem(&self.cert_pem, &self.key_pem));
        match &self.client_ca_pem {
            Some(ca) => tls.client_ca_root(Certificate::from_pem(ca)),
            None => tls,
        }
    }
}

/// What is unsafe about serving `config` on `addr`: beyond loopback, traffic
/// without TLS can be read and a server without a token called by anyone.
pub fn exposure_warnings(addr: SocketAddr, config: &Config) -> Vec<&'static str> {
    let mut warnings = Vec::new();
    if addr.ip().is_loopback() {
        return warnings;
    }
    if config.tls.is_none() {
        warnings.push("serving beyond loopback without TLS: traffic can be read and altered");
    }
    if config.auth_token.is_none() {
        warnings.push("serving beyond loopback without an auth token: anyone can call");
    }
    warnings
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
/// `listener` until `shutdown` completes, within the limits of `config`.
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
    if let Ok(addr) = listener.local_addr() {
        for warning in exposure_warnings(addr, &config) {
            tracing::warn!(%addr, "{warning}");
        }
    }

    let store_health = store.health();
    let service = UserService::new(store, stop.clone())
        .with_subscriber_slots(config.gauges.subscriber_slots(config.max_subscribers));
    let users = UserServiceServer::new(service)
        .max_decoding_message_size(config.max_message_size)
        .max_encoding_message_size(config.max_message_size)
        .accept_compressed(CompressionEncoding::Gzip)
        .accept_compressed(CompressionEncoding::Zstd)
        .send_compressed(CompressionEncoding::Gzip)
        .send_compressed(CompressionEncoding::Zstd);
    // Health stays open, for probes; reflection needs the token like the
    // service it describes.
    let auth = Authenticate::new(config.auth_token.clone());
    let users = InterceptedService::new(users, auth.clone());

    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<UserServiceServer<UserService<S>>>()
        .await;
    let store_health = tokio::spawn(forward_store_health(store_health, health.clone()));

    // grpcurl 1.8 only speaks v1alpha; newer clients use v1. The health
    // service's descriptors are registered too, so grpcurl can call it.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = InterceptedService::new(reflection().build_v1()?, auth.clone());
    let reflection_v1alpha = InterceptedService::new(reflection().build_v1alpha()?, auth);

    let mut builder = Server::builder();
    if let Some(tls) = &config.tls {
        builder = builder.tls_config(tls.server_config())?;
    }
    let incoming = TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .map_ok(BatchedWrites::new);
    let serve = builder
        .max_concurrent_streams(config.max_concurrent_streams)
        .http2_max_local_error_reset_streams(Some(config.max_local_error_reset_streams))
        .http2_max_header_list_size(config.max_header_list_size)
        .http2_keepalive_interval(config.keepalive_interval)
        .http2_keepalive_timeout(Some(config.keepalive_timeout))
        .layer(CallGuardLayer::new(
            config.gauges.in_flight_slots(config.max_in_flight_calls),
            stop.clone(),
        ))
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
    // Stopped first, so that it cannot mark the service serving again.
    store_health.abort();
    let _ = store_health.await;
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

/// Keeps the health of `grpcUser.UserService` and of the whole server ("")
/// in step with the store's: a store that cannot take writes (its writer died, its
/// database is out of reach) makes the server `NOT_SERVING`, for probes and
/// load balancers to see, and `SERVING` again once it can. Ends when the
/// store stops reporting (a store that cannot fail never does).
async fn forward_store_health(mut store: watch::Receiver<StoreHealth>, reporter: HealthReporter) {
    loop {
        let status = match *store.borrow_and_update() {
            StoreHealth::Serving => ServingStatus::Serving,
            StoreHealth::NotServing => ServingStatus::NotServing,
        };
        for service in [proto::user_service_server::SERVICE_NAME, ""] {
            reporter.set_service_status(service, status).await;
        }
        if store.changed().await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warns_when_exposed_without_tls_or_a_token() {
        let loopback: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        let v6_loopback: SocketAddr = "[::1]:8080".parse().unwrap();
        let any: SocketAddr = "0.0.0.0:8080".parse().unwrap();
        let plain = Config::default();
        assert!(exposure_warnings(loopback, &plain).is_empty());
        assert!(exposure_warnings(v6_loopback, &plain).is_empty());
        assert_eq!(exposure_warnings(any, &plain).len(), 2);

        let tls = TlsConfig {
            cert_pem: Vec::new(),
            key_pem: b"secret key".to_vec(),
            client_ca_pem: None,
        };
        assert!(!format!("{tls:?}").contains("secret"));
        let with_tls = Config {
            tls: Some(tls),
            ..Config::default()
        };
        let warnings = exposure_warnings(any, &with_tls);
        assert_eq!(warnings.len(), 1);
        assert!(warnings[0].contains("token"));

        let with_both = Config {
            auth_token: Some(AuthToken::new("t").unwrap()),
            ..with_tls
        };
        assert!(exposure_warnings(any, &with_both).is_empty());
    }
}
