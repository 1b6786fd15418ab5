//! user-service: a gRPC user service that shows all four call patterns over
//! one shared store.
//!
//! # Layout
//!
//! A request travels down this list and its reply back up:
//!
//! - `main.rs` (the `user-service` binary): flags, logging, signals; calls
//!   [`server::run`].
//! - [`server`]: transport limits, the services on the port (UserService,
//!   health, reflection) and graceful shutdown.
//! - [`batched_io`]: fewer, larger socket writes under load.
//! - [`limits`]: the in-flight and subscriber caps, call deadlines over
//!   whole streams, and the gauges counting what is open.
//! - [`auth`]: the optional bearer token.
//! - [`service`]: one handler per RPC (decode, validate, one store call,
//!   convert), a module per streaming pattern.
//! - [`validate`]: the input rules, apart from gRPC.
//! - [`error`]: the one place where errors become gRPC statuses.
//! - [`store`]: the [`store::Store`] trait and its health signal, the
//!   in-memory and SQLite backends, what backends share (listing pages in
//!   [`store::page`], group commit for a durable backend's writer in
//!   [`store::group_commit`]) and the change feed that SyncUsers streams
//!   subscribe to.
//! - [`user`]: the domain types (users and changes).
//! - [`proto`]: the generated wire types and conversions.
//!
//! [`allocator`] tunes mimalloc for the binaries. [`sample`] makes realistic
//! users for the `user-load` load generator and the benchmarks.

pub mod allocator;
pub mod auth;
pub mod batched_io;
pub mod error;
pub mod limits;
pub mod proto;
pub mod sample;
pub mod server;
pub mod service;
pub mod store;
pub mod user;
pub mod validate;

pub use server::{Config, run};
pub use store::{MemoryStore, SqliteStore, Store};
