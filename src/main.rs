//! The `user-service` binary: parses flags, sets up logging and signals, and
//! hands everything else to the library.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, ValueEnum};
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;
use user_service::{
    Config, MemoryStore, server,
    store::sqlite::{Durability, SqliteOptions, SqliteStore},
};

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

#[tokio::main]
async fn main() -> Result<ExitCode, Box<dyn std::error::Error>> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();

    let config = Config {
        shutdown_grace: Duration::from_secs(args.shutdown_grace),
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
            server::run(listener, store, config, shutdown_signal()).await?;
        }
    }
    Ok(ExitCode::SUCCESS)
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
