//! What the client examples share: how they connect, and how they end when
//! something goes wrong.
//!
//! **Exit status**, the same for every example: 0 when it did what it was
//! asked; 1 when it could not (the server was unreachable, a call failed
//! with a status, its input could not be read or sent); 2 for a bad command
//! line (clap's rule).
//!
//! A failure is printed on stderr as one line (a call's status as its code
//! and message), never as a panic or a backtrace, whatever `RUST_BACKTRACE`
//! says: an error status such as `NOT_FOUND` is one of a call's normal
//! outcomes, not a crash. That is why `main` returns an [`ExitCode`] and not
//! a `Result`: Rust prints an error returned from `main` with `{:?}`, and an
//! `anyhow::Error` captures a backtrace when `RUST_BACKTRACE` is set.

// Each example uses the part it needs.
#![allow(dead_code)]

use std::{error::Error, process::ExitCode};

use tonic::{Status, transport::Channel};
use user_service::proto::user_service_client::UserServiceClient;

/// Connects to the server at `addr` (`HOST:PORT`). On failure, says why
/// and returns `None`: the caller exits with [`ExitCode::FAILURE`].
pub async fn connect(addr: &str) -> Option<UserServiceClient<Channel>> {
    match UserServiceClient::connect(format!("http://{addr}")).await {
        Ok(client) => Some(client),
        Err(err) => {
            eprintln!(
                "cannot connect to {addr}: {} (is the server running? \
                 `cargo run --release` starts one on 127.0.0.1:8080)",
                chain(&err)
            );
            None
        }
    }
}

/// Prints that `call` failed with `status`, as its code and message (the
/// code by the name grpcurl prints too, e.g. `NotFound`), and returns the
/// exit status for it.
pub fn failed(call: &str, status: &Status) -> ExitCode {
    eprintln!("{call} failed: {:?}: {}", status.code(), status.message());
    ExitCode::FAILURE
}

/// An error and every error that caused it, on one line: tonic's
/// "transport error" says little until its causes follow. A cause that
/// repeats the line before it is said once.
pub fn chain(err: &dyn Error) -> String {
    let mut text = err.to_string();
    let mut last = text.clone();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if cause_text != last {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        last = cause_text;
        source = cause.source();
    }
    text
}
