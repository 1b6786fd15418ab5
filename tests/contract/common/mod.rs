//! A real server on an ephemeral port, and helpers for talking to it.
#![allow(dead_code)] // each test binary uses its own subset

pub mod postgres;

use std::{net::SocketAddr, time::Duration};

use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use user_service::{
    Config, MemoryStore, SqliteStore, Store,
    gauges::Gauges,
    proto::{self, user_service_client::UserServiceClient},
    server::ServeError,
    store::{
        postgres::{PostgresOptions, PostgresStore},
        sqlite::{Durability, SqliteOptions},
    },
    transport::ConnectionStats,
};

/// Change-feed capacity of test servers unless a test asks for another.
pub const FEED_CAPACITY: usize = 4096;

/// Bounds every wait in the tests, so a broken server fails a test instead of
/// hanging it.
pub const PATIENCE: Duration = Duration::from_secs(10);

pub type Client = UserServiceClient<Channel>;

/// A store backend the contract tests run against.
#[derive(Debug, Clone, Copy)]
pub enum Backend {
    Memory,
    /// A fresh database file in a temporary directory, durable commits.
    Sqlite,
    /// A fresh schema of its own in the test PostgreSQL database (see
    /// [`postgres`]).
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
                server._data = Some(Box::new(dir));
                server
            }
            Backend::Postgres => {
                let (store, schema) = postgres_store(feed_capacity).await;
                let mut server = TestServer::start_with(store, config).await;
                server._data = Some(Box::new(schema));
                server
            }
        }
    }
}

/// Runs each named `async fn(Backend)` test against every backend.
#[macro_export]
macro_rules! for_each_backend {
    ($($test:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test]
                async fn $test() {
                    super::$test($crate::common::Backend::Memory).await
                }
            )*
        }
        mod sqlite {
            $(
                #[tokio::test]
                async fn $test() {
                    super::$test($crate::common::Backend::Sqlite).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $test() {
                    super::$test($crate::common::Backend::Postgres).await
                }
            )*
        }
    };
}

/// A server running in this process on `127.0.0.1:0`.
pub struct TestServer {
    pub addr: SocketAddr,
    /// What the server holds open (from its `Config`).
    pub gauges: Gauges,
    /// What happened to its connections (from its `Config`).
    pub connections: ConnectionStats,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), ServeError>>>,
    /// The store's files or schema, deleted when the server is dropped.
    _data: Option<Box<dyn std::any::Any + Send>>,
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
pub async fn postgres_store(feed_capacity: usize) -> (PostgresStore, postgres::TestSchema) {
    let schema = postgres::TestSchema::new().await;
    let store = PostgresStore::open(&schema.url, PostgresOptions::new(feed_capacity))
        .await
        .expect("open the PostgreSQL store");
    (store, schema)
}

impl TestServer {
    /// Starts a server over a fresh in-memory store.
    pub async fn start() -> TestServer {
        Self::start_with(MemoryStore::new(FEED_CAPACITY), Config::default()).await
    }

    /// Starts a server over `store`. The listener is bound before the server
    /// task is spawned, so clients can connect at once.
    pub async fn start_with<S: Store>(store: S, config: Config) -> TestServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let (tx, rx) = oneshot::channel::<()>();
        let gauges = config.gauges.clone();
        let connections = config.connections.clone();
        let task = tokio::spawn(user_service::run(listener, store, config, async {
            let _ = rx.await;
        }));
        TestServer {
            addr,
            gauges,
            connections,
            shutdown: Some(tx),
            task: Some(task),
            _data: None,
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
        let channel = tonic::transport::Endpoint::from_shared(self.url())
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

/// A valid user with no id.
pub fn user(first_name: &str) -> proto::User {
    proto::User {
        first_name: first_name.into(),
        last_name: "Doe".into(),
        address: "1 Long Street, Springfield".into(),
        verified: false,
        id: String::new(),
        version: 0,
    }
}

/// A valid user with a client-chosen id.
pub fn user_with_id(id: &str) -> proto::User {
    proto::User {
        id: id.into(),
        ..user("Ann")
    }
}

/// A request stream the test feeds by hand, for the client-streaming and
/// bidirectional calls. Dropping the sender closes the client's side.
pub fn request_stream<T>() -> (tokio::sync::mpsc::Sender<T>, ReceiverStream<T>) {
    let (tx, rx) = tokio::sync::mpsc::channel(1024);
    (tx, ReceiverStream::new(rx))
}

/// Awaits `future`, failing the test if it takes longer than [`PATIENCE`].
pub async fn within<F: std::future::Future>(what: &str, future: F) -> F::Output {
    tokio::time::timeout(PATIENCE, future)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// Every user, through ListUsers.
pub async fn list_all(client: &mut Client) -> Vec<proto::User> {
    let mut stream = client
        .list_users(proto::ListUsersRequest::default())
        .await
        .expect("list_users")
        .into_inner();
    let mut users = Vec::new();
    while let Some(user) = within("a listed user", stream.message())
        .await
        .expect("stream")
    {
        users.push(user);
    }
    users
}
