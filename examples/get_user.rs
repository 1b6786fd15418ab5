//! Unary call: GetUser. The client sends one id; the server answers with the
//! one `User`, or fails the call with a status: `NOT_FOUND` for an unknown
//! id, `INVALID_ARGUMENT` for an empty or malformed one.
//!
//!     cargo run --example get_user -- ada

use std::time::Duration;

use anyhow::bail;
use clap::Parser;
use user_service::proto::{self, user_service_client::UserServiceClient};

#[derive(Parser)]
struct Args {
    /// The server's address, as given to its own `--addr`.
    #[arg(long, env = "USER_SERVICE_ADDR", default_value = "127.0.0.1:8080")]
    addr: String,
    /// The id of the user to read.
    id: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut client = UserServiceClient::connect(format!("http://{}", args.addr)).await?;

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
            Ok(())
        }
        Err(status) => bail!("GetUser: {:?}: {}", status.code(), status.message()),
    }
}
