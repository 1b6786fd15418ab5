//! Server streaming: ListUsers. The client sends one request; the server
//! answers with any number of `User` messages, one at a time, then ends the
//! call with a status: OK once the listing is complete, an error otherwise.
//!
//!     cargo run --release --example list_users -- --verified true --limit 10
//!
//! Users come in ascending id order; `--after-id` resumes after a given id.
//! Exits 0 once the listing is complete; 1 with the status printed when the
//! call fails, before the first user or after some (the rule of every
//! example, in `common/mod.rs`).

mod common;

use std::process::ExitCode;

use clap::Parser;
use user_service::proto;

#[derive(Parser)]
struct Args {
    /// The server's address, as given to its own `--addr`.
    #[arg(long, env = "USER_SERVICE_ADDR", default_value = "127.0.0.1:8080")]
    addr: String,
    /// Only verified (true) or unverified (false) users; all when absent.
    #[arg(long)]
    verified: Option<bool>,
    /// Start strictly after this id.
    #[arg(long, default_value = "")]
    after_id: String,
    /// At most this many users (0: all).
    #[arg(long, default_value_t = 0)]
    limit: u32,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let Some(mut client) = common::connect(&args.addr).await else {
        return ExitCode::FAILURE;
    };

    let request = proto::ListUsersRequest {
        verified: args.verified,
        after_id: args.after_id,
        limit: args.limit,
    };
    // A request the server rejects outright (a malformed `after_id`) fails
    // here, before any user is sent.
    let mut users = match client.list_users(request).await {
        Ok(response) => response.into_inner(),
        Err(status) => return common::failed("ListUsers", &status),
    };

    // Each `message()` waits for the next user. The server reads the store
    // only as fast as this loop consumes, so a slow reader slows it down
    // rather than filling its memory. `Ok(None)` is the server's OK: the
    // listing is complete. An `Err` after some users (the server shutting
    // down) means it was cut short. Dropping `users` before the end would
    // cancel the call, and the server would stop its work at once.
    let mut count = 0;
    loop {
        match users.message().await {
            Ok(Some(user)) => {
                count += 1;
                println!("{user:?}");
            }
            Ok(None) => break,
            Err(status) => {
                return common::failed(&format!("ListUsers, after {count} users,"), &status);
            }
        }
    }
    println!("listed {count} users");
    ExitCode::SUCCESS
}
