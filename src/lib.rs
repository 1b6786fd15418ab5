//! user-service: a gRPC user service that shows all four call patterns over
//! one shared store.
//!
//! # Layout
//!
//! A request travels down this list and its reply back up:
//!
//! - `main.rs` (the `user-service` binary): flags, logging, signals; calls
//!   [`server::run`].
//! - [`server`]: the services on the port (UserService, health,
//!   [`reflection`]), their limits, and graceful shutdown; [`Config`], every
//!   setting of the server, each a flag ([`flags`] reads them).
//! - [`transport`]: connections and HTTP/2, on the `h2` crate: one task per
//!   connection and per call, keepalive, TLS; where each connection's
//!   protocol is chosen (gRPC, or HTTP/1.1 for the playground).
//! - [`playground`]: the page on the same port where a learner makes real
//!   calls of every pattern, and its WebSocket bridge into the server's
//!   own connection handling.
//! - [`batched_io`]: fewer, larger socket writes under load.
//! - [`telemetry`]: what is recorded of each call (metrics, an access log
//!   line, a trace span), the service's figures read at each scrape, the
//!   `/metrics` endpoint, the OTLP exporter and spans on stderr.
//! - [`call_guard`]: around every call, the in-flight cap, deadlines over
//!   whole streams and the end of streams at shutdown.
//! - [`gauges`]: the counts of what is open (calls in flight, SyncUsers
//!   subscribers) and the capped pools of slots they count.
//! - [`auth`]: the optional bearer token.
//! - [`service`]: one handler per RPC (decode, validate, one store call,
//!   convert), a module per streaming pattern.
//! - [`validate`]: the input rules, apart from gRPC.
//! - [`error`]: the one place where errors become gRPC statuses.
//! - [`store`]: where `--store` points ([`store::location`]), the
//!   [`store::Store`] trait and its health signal, the
//!   writes built once on it ([`store::StoreExt`]), the in-memory, SQLite
//!   and PostgreSQL backends (the last shared by replicas of the server,
//!   with one change feed across them), what backends share (listing pages
//!   in [`store::page`], decoding what they read back in
//!   [`store::stored`], group commit for a durable backend's writer in
//!   [`store::group_commit`], its figures in [`store::write_stats`]) and the
//!   change feed that SyncUsers streams subscribe to.
//! - [`user`]: the domain types (users and changes).
//! - [`proto`]: the generated wire types and conversions.
//!
//! [`allocator`] tunes mimalloc for the binaries; [`any_certificate`] is
//! the TLS verifier of the clients here that must take any certificate. The
//! load generator, `user-load`, is a crate of its own in this workspace
//! (`user-load/`), a client of this library.

pub mod allocator;
pub mod any_certificate;
pub mod auth;
pub mod batched_io;
pub mod call_guard;
pub mod error;
pub mod flags;
pub mod gauges;
pub mod playground;
pub mod proto;
pub mod reflection;
pub mod server;
pub mod service;
pub mod store;
pub mod telemetry;
pub mod transport;
pub mod user;
pub mod validate;

pub use server::{Config, run};
pub use store::{MemoryStore, PostgresStore, SqliteStore, Store};
