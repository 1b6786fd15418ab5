//! Unary call: GetUser. The client sends one id, the server answers with the
//! one `User` or with an error status: `NOT_FOUND` for an unknown id,
//! `INVALID_ARGUMENT` for an empty or malformed one.
//!
//!     cargo run --example get_user -- ada

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
    /// The id of the user to read.
    id: String,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let mut client = UserServiceClient::connect(format!("http://{}", args.addr)).await?;

    // A deadline bounds the whole call; past it the client gives up with
    // `DEADLINE_EXCEEDED` and the server is told (the stream is reset).
    let mut request = tonic::Request::new(proto::GetUserRequest { id: args.id });
    request.set_timeout(std::time::Duration::from_secs(5));

    match client.get_user(request).await {
        Ok(response) => {
            let user = response.into_inner();
            println!(
                "{} v{}: {} {}, {}{}",
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
            eprintln!("GetUser failed: {:?}: {}", status.code(), status.message());
            std::process::exit(1);
        }
    }
}
