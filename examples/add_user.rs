//! Unary call: AddUser. The client sends one `User`, the server answers with
//! one `Response` or one error status; either way the call is then over.
//!
//!     cargo run --example add_user -- --first-name Ada --last-name Lovelace --verified
//!
//! An empty `--id` lets the server assign a UUIDv7; a chosen id that is
//! already stored is refused with `ALREADY_EXISTS`.

use clap::Parser;
use user_service::proto::{self, user_service_client::UserServiceClient};

#[derive(Parser)]
struct Args {
    /// Server address, `host:port` or a URL.
    #[arg(
        long,
        env = "USER_SERVICE_ADDR",
        default_value = "http://127.0.0.1:8080"
    )]
    addr: String,
    #[arg(long, default_value = "John")]
    first_name: String,
    #[arg(long, default_value = "Doe")]
    last_name: String,
    #[arg(long, default_value = "Somewhere")]
    address: String,
    #[arg(long)]
    verified: bool,
    /// Leave empty for a server-assigned id.
    #[arg(long, default_value = "")]
    id: String,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let mut client = UserServiceClient::connect(format!("http://{}", args.addr)).await?;

    let user = proto::User {
        first_name: args.first_name,
        last_name: args.last_name,
        address: args.address,
        verified: args.verified,
        id: args.id,
        version: 0, // the server sets it and ignores ours
    };

    // One request, one awaited answer. A rejected call arrives here as a
    // `Status` (its code and message), not as a `Response`.
    match client.add_user(user).await {
        Ok(response) => {
            let reply = response.into_inner();
            let user = reply.user.unwrap_or_default();
            println!("{} {}", reply.code, reply.message);
            println!(
                "added {} v{}: {} {}, {}{}",
                user.id,
                user.version,
                user.first_name,
                user.last_name,
                user.address,
                if user.verified { ", verified" } else { "" }
            );
            Ok(())
        }
        Err(status) => {
            eprintln!("AddUser failed: {:?}: {}", status.code(), status.message());
            std::process::exit(1);
        }
    }
}
