//! The `user-service` binary: parses flags, sets up logging and signals, and
//! hands everything else to the library.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use clap::{Parser, ValueEnum};
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;
use user_service::{
    Config, MemoryStore, Store,
    auth::AuthToken,
    server::{self, TlsConfig},
    store::sqlite::{Durability, SqliteOptions, SqliteStore},
};

/// mimalloc instead of the system allocator: every call allocates and frees
/// many small objects (decoded messages, stored users, encoded replies), and
/// glibc's malloc and free were a sixth of the server's CPU time in a bulk
/// import profile (see BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// How far a SyncUsers stream may fall behind the change feed, in changes,
/// before it is ended with ABORTED. At ~100 bytes a change this is a few MB
/// shared by all subscribers.
const DEFAULT_FEED_CAPACITY: usize = 65_536;

/// A gRPC user service: AddUser, GetUser, ListUsers, BulkAddUsers, SyncUsers.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Address to listen on.
    #[arg(long, env = "USER_SERVICE_ADDR", default_value = "127.0.0.1:8080")]
    addr: SocketAddr,

    /// How far a SyncUsers subscriber may lag, in changes, before its stream
    /// is ended with ABORTED.
    #[arg(long, env = "USER_SERVICE_FEED_CAPACITY", default_value_t = DEFAULT_FEED_CAPACITY)]
    feed_capacity: usize,

    /// Seconds shutdown waits for in-flight calls.
    #[arg(long, env = "USER_SERVICE_SHUTDOWN_GRACE", default_value_t = 10)]
    shutdown_grace: u64,

    /// Where users are kept: `sqlite:PATH` (a file, kept across restarts) or
    /// `memory` (lost on exit).
    #[arg(long, env = "USER_SERVICE_STORE", default_value = "sqlite:users.db", value_parser = parse_store)]
    store: StoreArg,

    /// SQLite only: `full` fsyncs every commit before acknowledging it
    /// (survives power loss); `normal` does not (survives a process crash).
    #[arg(long, env = "USER_SERVICE_SYNC", value_enum, default_value_t = SyncArg::Full)]
    sync: SyncArg,

    /// Largest gRPC message received or sent, in bytes.
    #[arg(long, env = "USER_SERVICE_MAX_MESSAGE_SIZE", default_value_t = server::MAX_MESSAGE_SIZE)]
    max_message_size: usize,

    /// Concurrent streams (calls) per HTTP/2 connection.
    #[arg(long, env = "USER_SERVICE_MAX_CONCURRENT_STREAMS", default_value_t = server::MAX_CONCURRENT_STREAMS)]
    max_concurrent_streams: u32,

    /// Streams a client may make the server reset before it is disconnected.
    #[arg(long, env = "USER_SERVICE_MAX_RESET_STREAMS", default_value_t = server::MAX_LOCAL_ERROR_RESET_STREAMS)]
    max_reset_streams: usize,

    /// Largest request header block, in bytes.
    #[arg(long, env = "USER_SERVICE_MAX_HEADER_LIST_SIZE", default_value_t = server::MAX_HEADER_LIST_SIZE)]
    max_header_list_size: u32,

    /// Seconds a connection may idle before a keepalive ping; 0 turns pings
    /// off.
    #[arg(long, env = "USER_SERVICE_KEEPALIVE_INTERVAL", default_value_t = server::KEEPALIVE_INTERVAL.as_secs())]
    keepalive_interval: u64,

    /// Seconds a keepalive ping may go unanswered before the connection is
    /// closed.
    #[arg(long, env = "USER_SERVICE_KEEPALIVE_TIMEOUT", default_value_t = server::KEEPALIVE_TIMEOUT.as_secs())]
    keepalive_timeout: u64,

    /// UserService calls in flight at once; more are refused with
    /// RESOURCE_EXHAUSTED.
    #[arg(long, env = "USER_SERVICE_MAX_IN_FLIGHT_CALLS", default_value_t = server::MAX_IN_FLIGHT_CALLS)]
    max_in_flight_calls: usize,

    /// SyncUsers streams open at once; more are refused with
    /// RESOURCE_EXHAUSTED.
    #[arg(long, env = "USER_SERVICE_MAX_SUBSCRIBERS", default_value_t = server::MAX_SUBSCRIBERS)]
    max_subscribers: usize,

    /// File holding a bearer token that UserService and reflection calls
    /// must present (`authorization: Bearer <token>`).
    #[arg(long, env = "USER_SERVICE_AUTH_TOKEN_FILE")]
    auth_token_file: Option<PathBuf>,

    /// Server certificate chain (PEM); serves TLS only. Needs --tls-key.
    #[arg(long, env = "USER_SERVICE_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,

    /// Server private key (PEM). Needs --tls-cert.
    #[arg(long, env = "USER_SERVICE_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,

    /// CA certificate (PEM) that client certificates must chain to: turns on
    /// mutual TLS, refusing clients without a valid certificate.
    #[arg(long, env = "USER_SERVICE_TLS_CLIENT_CA", requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
}

/// The `--store` flag.
#[derive(Debug, Clone)]
enum StoreArg {
    Memory,
    Sqlite(PathBuf),
}

fn parse_store(value: &str) -> Result<StoreArg, String> {
    match value.split_once(':') {
        _ if value == "memory" => Ok(StoreArg::Memory),
        Some(("sqlite", path)) if !path.is_empty() => Ok(StoreArg::Sqlite(path.into())),
        _ => Err("expected `memory` or `sqlite:PATH`".into()),
    }
}

/// The `--sync` flag.
#[derive(Debug, Clone, Copy, ValueEnum)]
enum SyncArg {
    Full,
    Normal,
}

/// Exit code when the store file is refused (not SQLite, another program's
/// database, corrupted, or a newer schema): sysexits' EX_DATAERR.
const EXIT_STORE_REFUSED: u8 = 65;

fn main() -> Result<ExitCode, Box<dyn std::error::Error>> {
    user_service::allocator::tune_mimalloc();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(serve(Args::parse()))
}

async fn serve(args: Args) -> Result<ExitCode, Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();

    // Key material and the token are read before binding: a server that
    // cannot start securely never starts listening.
    let auth_token = match &args.auth_token_file {
        Some(path) => Some(AuthToken::from_file(path)?),
        None => None,
    };
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(TlsConfig {
            cert_pem: read(cert)?,
            key_pem: read(key)?,
            client_ca_pem: args.tls_client_ca.as_deref().map(read).transpose()?,
        }),
        _ => None,
    };
    let config = Config {
        shutdown_grace: Duration::from_secs(args.shutdown_grace),
        max_message_size: args.max_message_size,
        max_concurrent_streams: args.max_concurrent_streams,
        max_local_error_reset_streams: args.max_reset_streams,
        max_header_list_size: args.max_header_list_size,
        keepalive_interval: (args.keepalive_interval > 0)
            .then(|| Duration::from_secs(args.keepalive_interval)),
        keepalive_timeout: Duration::from_secs(args.keepalive_timeout),
        max_in_flight_calls: args.max_in_flight_calls,
        max_subscribers: args.max_subscribers,
        auth_token,
        tls,
        ..Config::default()
    };
    let feed_capacity = args.feed_capacity.max(1);
    match args.store {
        StoreArg::Memory => {
            let listener = TcpListener::bind(args.addr).await?;
            tracing::info!(
                addr = %listener.local_addr()?,
                store = "memory",
                durability = "none (users are lost on exit)",
                "user-service listening"
            );
            let store = MemoryStore::new(feed_capacity);
            log_security(&config);
            server::run(listener, store, config, shutdown_signal()).await?;
        }
        StoreArg::Sqlite(path) => {
            let durability = match args.sync {
                SyncArg::Full => Durability::Full,
                SyncArg::Normal => Durability::Normal,
            };
            let options = SqliteOptions {
                durability,
                feed_capacity,
            };
            // Opened before binding: a refused file stops the server before
            // it accepts anything.
            let store = match SqliteStore::open(&path, options) {
                Ok(store) => store,
                Err(err) if err.is_refusal() => {
                    tracing::error!("cannot open the store: {err}");
                    return Ok(ExitCode::from(EXIT_STORE_REFUSED));
                }
                Err(err) => return Err(format!("cannot open the store: {err}").into()),
            };
            let listener = TcpListener::bind(args.addr).await?;
            tracing::info!(
                addr = %listener.local_addr()?,
                store = %format_args!("sqlite:{}", path.display()),
                %durability,
                "user-service listening"
            );
            log_security(&config);
            let served = server::run(listener, store.clone(), config, shutdown_signal()).await;
            // Closing checkpoints the write-ahead log into the file and
            // removes it: the file alone then holds every user.
            store.close().await;
            served?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Logs which protections are on (never the token itself).
fn log_security(config: &Config) {
    tracing::info!(
        tls = config.tls.is_some(),
        mutual_tls = config
            .tls
            .as_ref()
            .is_some_and(|t| t.client_ca_pem.is_some()),
        auth_token = config.auth_token.is_some(),
        "security"
    );
}

/// Reads a file named by a flag, saying which one failed.
fn read(path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|err| format!("cannot read {}: {err}", path.display()))
}

/// Completes on Ctrl-C (SIGINT) or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(err) = tokio::signal::ctrl_c().await {
            tracing::error!(%err, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(err) => {
                tracing::error!(%err, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("received Ctrl-C"),
        () = terminate => tracing::info!("received SIGTERM"),
    }
}
