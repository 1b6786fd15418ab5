//! Hardening: limits, deadlines, clean-up after clients that vanish,
//! authentication, TLS and hostile input, each against a real server on an
//! ephemeral port. Where the generated client cannot misbehave enough, the
//! tests speak HTTP/2 themselves (`raw`).

mod binary;
mod cleanup;
mod connections;
mod deadlines;
mod limits;
mod malformed;
mod security;
mod transport;
mod wire;
