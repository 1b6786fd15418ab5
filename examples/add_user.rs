//! Unary call: AddUser. The client sends one `User`; the server answers with
//! one `Response`, or fails the call with a status. Either way the call is
//! then over: one message each way.
//!
//!     cargo run --release --example add_user -- --first-name Ada --last-name Lovelace --verified
//!
//! Without `--id` the server assigns a UUIDv7; an id that is already stored
//! is refused with `ALREADY_EXISTS`. Exits 0 once the user is added, 1 with
//! the status printed when the call fails (the rule of every example, in
//! `common/mod.rs`).

mod common;

use std::process::ExitCode;

use clap::Parser;
use user_service::proto;

#[derive(Parser)]
struct Args {
    /// The server's address, as given to its own `--addr`.
    #[arg(long, env = "USER_SERVICE_ADDR", default_value = "127.0.0.1:8080")]
    addr: String,
    #[arg(long, default_value = "John")]
    first_name: String,
    #[arg(long, default_value = "Doe")]
    last_name: String,
    #[arg(long, default_value = "Somewhere")]
    address: String,
    #[arg(long)]
    verified: bool,
    /// The user's id; empty: assigned by the server.
    #[arg(long, default_value = "")]
    id: String,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let Some(mut client) = common::connect(&args.addr).await else {
        return ExitCode::FAILURE;
    };

    let user = proto::User {
        first_name: args.first_name,
        last_name: args.last_name,
        address: args.address,
        verified: args.verified,
        id: args.id,
        version: 0, // set by the server; ignored when sent
    };

    // One request, one awaited answer. A rejected call (invalid user, id
    // taken) arrives as `Err(Status)`: a code and a message, no `Response`.
    match client.add_user(user).await {
        Ok(response) => {
            let reply = response.into_inner();
            println!("{} {}", reply.code, reply.message);
            println!("{:?}", reply.user.unwrap_or_default());
            ExitCode::SUCCESS
        }
        Err(status) => common::failed("AddUser", &status),
    }
}
