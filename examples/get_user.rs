//! Unary call: GetUser. The client sends one id; the server answers with the
//! one `User`, or fails the call with a status: `NOT_FOUND` for an unknown
//! id, `INVALID_ARGUMENT` for an empty or malformed one.
//!
//!     cargo run --release --example get_user -- ada
//!
//! Exits 0 with the user printed; 1 with the status printed when the call
//! fails, e.g. `GetUser failed: NotFound: user "nobody" not found` (the rule
//! of every example, in `common/mod.rs`).

mod common;

use std::{process::ExitCode, time::Duration};

use clap::Parser;
use user_service::proto;

#[derive(Parser)]
struct Args {
    /// The server's address, as given to its own `--addr`.
    #[arg(long, env = "USER_SERVICE_ADDR", default_value = "127.0.0.1:8080")]
    addr: String,
    /// The id of the user to read.
    id: String,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let Some(mut client) = common::connect(&args.addr).await else {
        return ExitCode::FAILURE;
    };

    // A deadline travels with the request, in the `grpc-timeout` header:
    // past it the server gives up on the call and answers
    // `DEADLINE_EXCEEDED`. The tonic client does not enforce it itself; a
    // client cancels a call by dropping its future, e.g. with
    // `tokio::time::timeout`.
    let mut request = tonic::Request::new(proto::GetUserRequest { id: args.id });
    request.set_timeout(Duration::from_secs(5));

    match client.get_user(request).await {
        Ok(response) => {
            println!("{:?}", response.into_inner());
            ExitCode::SUCCESS
        }
        // An error status is an answer too: print it, and exit 1.
        Err(status) => common::failed("GetUser", &status),
    }
}
