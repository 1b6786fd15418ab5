//! The `user-service` binary: parses flags, sets up logging and signals, and
//! hands everything else to the library.

use std::{net::SocketAddr, time::Duration};

use clap::Parser;
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;
use user_service::{Config, MemoryStore, server};

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
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();

    let listener = TcpListener::bind(args.addr).await?;
    tracing::info!(addr = %listener.local_addr()?, store = "memory", "user-service listening");

    let config = Config {
        shutdown_grace: Duration::from_secs(args.shutdown_grace),
    };
    let store = MemoryStore::new(args.feed_capacity.max(1));
    server::run(listener, store, config, shutdown_signal()).await?;
    Ok(())
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
