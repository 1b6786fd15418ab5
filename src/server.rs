//! Serving: the server's settings ([`Config`]), the services on the port,
//! and shutdown.

use std::{future::Future, net::SocketAddr, pin::pin, time::Duration};

use tokio::{net::TcpListener, sync::watch};
use tokio_util::sync::CancellationToken;
use tonic::{
    codec::CompressionEncoding,
    service::{Routes, interceptor::InterceptedService},
};
use tonic_health::{ServingStatus, server::HealthReporter};

pub use crate::transport::TlsConfig;
use crate::{
    auth::{AuthToken, Authenticate},
    call_guard::CallGuardLayer,
    flags,
    gauges::Gauges,
    playground::{Playground, PlaygroundConfig},
    proto::{self, user_service_server::UserServiceServer},
    reflection,
    service::UserService,
    store::{Store, StoreHealth},
    telemetry::{Metrics, ObserveCallsLayer, ServiceCollector},
    transport::{self, ConnectionStats, TlsError, TransportConfig},
};

/// Largest gRPC message accepted or sent. tonic bounds decoding at 4 MiB but
/// leaves encoding unbounded; both are set. A user is well under 1 KiB and
/// the largest reply (a BulkAddUsers report, at most 100 errors) a few KiB.
pub const MAX_MESSAGE_SIZE: usize = 4 * 1024 * 1024;

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

/// How the server runs. Each setting is a flag of the `user-service`
/// binary, declared here or in the groups nested below with its
/// environment variable and its default (the constants above, and the
/// transport's); `Config::default()` is every default. Tests and examples
/// change the fields they need:
///
/// ```
/// let mut config = user_service::Config::default();
/// config.limits.max_subscribers = 1;
/// ```
#[derive(Debug, Clone, clap::Args)]
pub struct Config {
    /// Seconds shutdown waits for in-flight calls.
    #[arg(
        long,
        env = "USER_SERVICE_SHUTDOWN_GRACE",
        default_value = flags::seconds(DEFAULT_SHUTDOWN_GRACE),
        value_parser = flags::seconds_parser()
    )]
    pub shutdown_grace: Duration,
    /// Log one line per call as it ends: method, client address, status,
    /// duration, messages in and out (off by default).
    #[arg(long, env = "USER_SERVICE_ACCESS_LOG")]
    pub access_log: bool,
    // What one call, and all calls together, may take.
    #[command(flatten)]
    pub limits: Limits,
    // Connections and HTTP/2.
    #[command(flatten)]
    pub transport: TransportConfig,
    // The playground page on the same port.
    #[command(flatten)]
    pub playground: PlaygroundConfig,
    /// When set, UserService and reflection calls must carry this bearer
    /// token.
    #[arg(skip)]
    pub auth_token: Option<AuthToken>,
    /// When set, the server speaks TLS only.
    #[arg(skip)]
    pub tls: Option<TlsConfig>,
    /// Where the server reports what it holds open.
    #[arg(skip)]
    pub gauges: Gauges,
    /// Where the server counts its connections.
    #[arg(skip)]
    pub connections: ConnectionStats,
}

impl Default for Config {
    fn default() -> Self {
        flags::defaults()
    }
}

/// What calls may take: the size of one message, and how many calls and
/// SyncUsers streams are open at once. Every field is a flag.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct Limits {
    /// Largest gRPC message received or sent, in bytes.
    #[arg(long, env = "USER_SERVICE_MAX_MESSAGE_SIZE", default_value_t = MAX_MESSAGE_SIZE)]
    pub max_message_size: usize,

    /// UserService calls in flight at once; more are refused with
    /// RESOURCE_EXHAUSTED.
    #[arg(long, env = "USER_SERVICE_MAX_IN_FLIGHT_CALLS", default_value_t = MAX_IN_FLIGHT_CALLS)]
    pub max_in_flight_calls: usize,

    /// SyncUsers streams open at once; more are refused with
    /// RESOURCE_EXHAUSTED.
    #[arg(long, env = "USER_SERVICE_MAX_SUBSCRIBERS", default_value_t = MAX_SUBSCRIBERS)]
    pub max_subscribers: usize,
}

impl Default for Limits {
    fn default() -> Self {
        flags::defaults()
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
    #[error("TLS: {0}")]
    Tls(#[from] TlsError),
}

/// Where the server listens: the gRPC port and, optionally, the metrics
/// endpoint (`GET /metrics`). A plain `TcpListener` is the gRPC port alone.
#[derive(Debug)]
pub struct Listeners {
    pub grpc: TcpListener,
    pub metrics: Option<TcpListener>,
}

impl From<TcpListener> for Listeners {
    fn from(grpc: TcpListener) -> Self {
        Listeners {
            grpc,
            metrics: None,
        }
    }
}

/// Serves `grpcUser.UserService` over `store`, plus health and reflection, on
/// `listeners` until `shutdown` completes, within the limits of `config`.
/// With a metrics listener, every call is recorded and the metrics are
/// served there.
///
/// On shutdown the server stops accepting connections, marks itself not
/// serving, ends open streams with `UNAVAILABLE`, and waits up to
/// `config.shutdown_grace` for in-flight calls to finish.
pub async fn run<S: Store>(
    listeners: impl Into<Listeners>,
    store: S,
    config: Config,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    let Listeners {
        grpc: listener,
        metrics: metrics_listener,
    } = listeners.into();
    let stop = CancellationToken::new();
    if let Ok(addr) = listener.local_addr() {
        for warning in exposure_warnings(addr, &config) {
            tracing::warn!(%addr, "{warning}");
        }
        if config.playground.enabled {
            let scheme = if config.tls.is_some() {
                "https"
            } else {
                "http"
            };
            tracing::info!(%addr, "playground at {scheme}://{addr}/");
        }
    }

    let metrics = metrics_listener.map(|listener| {
        let metrics = Metrics::new(ServiceCollector {
            gauges: config.gauges.clone(),
            connections: config.connections.clone(),
            store: Box::new(store.clone()),
        });
        // Served through the shutdown, until `run` returns.
        let endpoint = tokio::spawn(metrics.clone().serve(listener));
        (metrics, endpoint)
    });

    let store_health = store.health();
    let service = UserService::new(
        store,
        stop.clone(),
        config
            .gauges
            .subscriber_slots(config.limits.max_subscribers),
    );
    let users = UserServiceServer::new(service)
        .max_decoding_message_size(config.limits.max_message_size)
        .max_encoding_message_size(config.limits.max_message_size)
        .accept_compressed(CompressionEncoding::Gzip)
        .accept_compressed(CompressionEncoding::Zstd)
        .send_compressed(CompressionEncoding::Gzip)
        .send_compressed(CompressionEncoding::Zstd);
    // Health stays open, for probes; reflection needs the token like the
    // service it describes.
    let auth = Authenticate::new(config.auth_token.clone(), config.gauges.clone());
    let users = InterceptedService::new(users, auth.clone());

    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_serving::<UserServiceServer<UserService<S>>>()
        .await;
    let store_health = tokio::spawn(forward_store_health(store_health, health.clone()));

    let reflection = reflection::Reflection::new();
    let reflection_v1 = InterceptedService::new(reflection.v1(), auth.clone());
    let reflection_v1alpha = InterceptedService::new(reflection.v1alpha(), auth);

    let playground = config
        .playground
        .enabled
        .then(|| Playground::new(config.auth_token.is_some(), config.limits.max_message_size));
    let tls = match (&config.tls, &playground) {
        (None, _) => None,
        (Some(tls), None) => Some(tls.acceptor()?),
        (Some(tls), Some(_)) => Some(tls.acceptor_with_playground()?),
    };
    let routes = Routes::new(users)
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .prepare();
    let service = tower_layer::Layer::layer(
        &CallGuardLayer::new(
            &config.gauges,
            config.limits.max_in_flight_calls,
            stop.clone(),
        ),
        routes,
    );
    let service = tower_layer::Layer::layer(
        &ObserveCallsLayer::new(
            metrics.as_ref().map(|(metrics, _)| metrics.rpc.clone()),
            config.access_log,
        ),
        service,
    );
    let mut serve = pin!(transport::serve(
        listener,
        tls,
        service,
        playground,
        config.transport.clone(),
        config.connections.clone(),
        stop.clone()
    ));

    tokio::select! {
        () = &mut serve => return Ok(()),
        () = shutdown => {}
    }
    shutting_down::<S>(serve, &config, &health, stop, store_health).await;
    // Scraped until the end, so that the last figures can be seen.
    if let Some((_, endpoint)) = metrics {
        endpoint.abort();
    }
    Ok(())
}

/// The graceful shutdown of `run`: health turns `NOT_SERVING`, connections
/// and streams are told to end, and `serve` has the grace period to finish.
/// Nothing in it can fail; calls still open after the grace are dropped
/// with `serve` when `run` returns.
async fn shutting_down<S: Store>(
    serve: std::pin::Pin<&mut impl Future<Output = ()>>,
    config: &Config,
    health: &HealthReporter,
    stop: CancellationToken,
    store_health: tokio::task::JoinHandle<()>,
) {
    tracing::info!(grace = ?config.shutdown_grace, "shutting down");
    // Stopped first, so that it cannot mark the service serving again.
    store_health.abort();
    let _ = store_health.await;
    // Both the service and the server as a whole ("", what probes ask by
    // default) report NOT_SERVING before any stream is ended.
    health
        .set_not_serving::<UserServiceServer<UserService<S>>>()
        .await;
    health
        .set_service_status("", ServingStatus::NotServing)
        .await;
    stop.cancel();
    if tokio::time::timeout(config.shutdown_grace, serve)
        .await
        .is_err()
    {
        tracing::warn!("grace period over, closing the calls still open");
    }
    tracing::info!("stopped");
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
