//! Hardening: limits, deadlines, clean-up after clients that vanish,
//! authentication, TLS and hostile input, each against a real server on an
//! ephemeral port. Where the generated client cannot misbehave enough, the
//! tests speak HTTP/2 themselves (`raw`).

#[path = "../contract/common/mod.rs"]
mod common;

mod binary;
mod cleanup;
mod connections;
mod deadlines;
mod limits;
mod malformed;
mod raw;
mod security;
mod wire;
