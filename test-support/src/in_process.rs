//! A real server in the test's own process, on `127.0.0.1:0`.

use std::net::SocketAddr;

use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tonic::transport::{Channel, Endpoint};
use user_service::{
    Config, MemoryStore, SqliteStore, Store,
    gauges::Gauges,
    proto::user_service_client::UserServiceClient,
    server::{Listeners, ServeError},
    store::{
        postgres::{PostgresOptions, PostgresStore},
        sqlite::{Durability, SqliteOptions},
    },
    transport::ConnectionStats,
};

use crate::{Client, PATIENCE, postgres::TestSchema};

/// Change-feed capacity of test servers unless a test asks for another.
pub const FEED_CAPACITY: usize = 4096;

/// A store backend the contract tests run against.
#[derive(Debug, Clone, Copy)]
pub enum Backend {
    Memory,
    /// A fresh database file in a temporary directory, durable commits.
    Sqlite,
    /// A fresh schema of its own in the test PostgreSQL database (see
    /// [`crate::postgres`]).
    Postgres,
}

impl Backend {
    /// Starts a server over a fresh, empty store of this kind.
    pub async fn start(self) -> TestServer {
        self.start_with_feed(FEED_CAPACITY).await
    }

    /// The same, with a given change-feed capacity.
    pub async fn start_with_feed(self, feed_capacity: usize) -> TestServer {
        self.start_with_config(feed_capacity, Config::default())
            .await
    }

    /// The same, with a given change-feed capacity and server config.
    pub async fn start_with_config(self, feed_capacity: usize, config: Config) -> TestServer {
        match self {
            Backend::Memory => {
                TestServer::start_with(MemoryStore::new(feed_capacity), config).await
            }
            Backend::Sqlite => {
                let (store, dir) = sqlite_store(feed_capacity);
                let mut server = TestServer::start_with(store, config).await;
                server.data = Some(Box::new(dir));
                server
            }
            Backend::Postgres => {
                let (store, schema) = postgres_store(feed_capacity).await;
                let mut server = TestServer::start_with(store, config).await;
                server.data = Some(Box::new(schema));
                server
            }
        }
    }
}

/// A SQLite store in a new temporary directory (deleted when the returned
/// directory is dropped).
pub fn sqlite_store(feed_capacity: usize) -> (SqliteStore, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let options = SqliteOptions {
        durability: Durability::Full,
        feed_capacity,
    };
    let store = SqliteStore::open(dir.path().join("users.db"), options).expect("open store");
    (store, dir)
}

/// A PostgreSQL store in a new, empty schema of the test database (dropped
/// when the returned schema is dropped).
pub async fn postgres_store(feed_capacity: usize) -> (PostgresStore, TestSchema) {
    let schema = TestSchema::new().await;
    let store = PostgresStore::open(&schema.url, PostgresOptions::new(feed_capacity))
        .await
        .expect("open the PostgreSQL store");
    (store, schema)
}

/// A server running in this process on `127.0.0.1:0`.
pub struct TestServer {
    pub addr: SocketAddr,
    /// Where its metrics are served, when it was started with them.
    pub metrics_addr: Option<SocketAddr>,
    /// What the server holds open (from its `Config`).
    pub gauges: Gauges,
    /// What happened to its connections (from its `Config`).
    pub connections: ConnectionStats,
    /// The grace period it was started with, as its shutdown will use it.
    pub shutdown_grace: std::time::Duration,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), ServeError>>>,
    /// The store's files or schema, deleted when the server is dropped.
    data: Option<Box<dyn std::any::Any + Send>>,
}

impl TestServer {
    /// Starts a server over a fresh in-memory store.
    pub async fn start() -> TestServer {
        Self::start_with(MemoryStore::new(FEED_CAPACITY), Config::default()).await
    }

    /// Starts a server over `store`. The listener is bound before the server
    /// task is spawned, so clients can connect at once.
    pub async fn start_with<S: Store>(store: S, config: Config) -> TestServer {
        Self::start_listening(store, config, false).await
    }

    /// The same, serving its metrics too (at `metrics_addr`).
    pub async fn start_with_metrics<S: Store>(store: S, config: Config) -> TestServer {
        Self::start_listening(store, config, true).await
    }

    async fn start_listening<S: Store>(store: S, config: Config, metrics: bool) -> TestServer {
        let grpc = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = grpc.local_addr().expect("local addr");
        let metrics = match metrics {
            true => Some(TcpListener::bind("127.0.0.1:0").await.expect("bind")),
            false => None,
        };
        let metrics_addr = metrics
            .as_ref()
            .map(|l| l.local_addr().expect("local addr"));
        let (tx, rx) = oneshot::channel::<()>();
        let gauges = config.gauges.clone();
        let connections = config.connections.clone();
        let shutdown_grace = config.shutdown_grace;
        let listeners = Listeners { grpc, metrics };
        let task = tokio::spawn(user_service::run(listeners, store, config, async {
            let _ = rx.await;
        }));
        TestServer {
            addr,
            metrics_addr,
            gauges,
            connections,
            shutdown_grace,
            shutdown: Some(tx),
            task: Some(task),
            data: None,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(self.url())
            .expect("url")
            .connect()
            .await
            .expect("connect")
    }

    /// A client on a new connection.
    pub async fn client(&self) -> Client {
        UserServiceClient::new(self.channel().await)
    }

    /// A client on a new connection whose HTTP/2 receive windows hold only
    /// 64 KiB (about 1000 users): a stream it does not read stalls the
    /// server quickly, through flow control.
    pub async fn small_window_client(&self) -> Client {
        let channel = Endpoint::from_shared(self.url())
            .expect("url")
            .initial_stream_window_size(64 * 1024)
            .initial_connection_window_size(64 * 1024)
            .connect()
            .await
            .expect("connect");
        UserServiceClient::new(channel)
    }

    /// Starts shutting down, without waiting.
    pub fn begin_shutdown(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }

    /// Shuts down and returns what `run` returned.
    pub async fn stop(mut self) -> Result<(), ServeError> {
        self.begin_shutdown();
        let task = self.task.take().expect("not stopped yet");
        tokio::time::timeout(PATIENCE * 2, task)
            .await
            .expect("server stopped within its grace period")
            .expect("server task did not panic")
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}
