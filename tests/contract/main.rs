//! The wire contract of `grpcUser.UserService`, tested the way users call it:
//! a real server on an ephemeral port, over TCP, through the generated client.
//!
//! Every test body takes a `Backend` and runs once per store backend.

mod bulk;
mod list;
mod server;
mod sync;
mod unary;
