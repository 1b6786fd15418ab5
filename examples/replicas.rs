//! Client-side load balancing over replicas: one tonic `Channel` over
//! several servers that share one PostgreSQL database, each call sent to
//! one of them.
//!
//!     cargo run --release --example replicas -- --addr 127.0.0.1:8081,127.0.0.1:8082,127.0.0.1:8083
//!
//! gRPC runs many calls over one long-lived HTTP/2 connection, so a load
//! balancer that spreads connections (layer 4) sends every call of a client
//! to the one replica it happened to connect to. Balancing per call needs a
//! layer-7 proxy that speaks HTTP/2 (Envoy, nginx's `grpc_pass`, a service
//! mesh), or the client itself, as here: `Channel::balance_list` keeps a
//! connection to every replica and picks one for each call (two at random,
//! the less loaded of them). A replica that goes away is skipped until it
//! is back. Any replica can answer any call: writes through one are seen by
//! reads through another, and every SyncUsers stream, wherever it is open,
//! sees every change in one order.
//!
//! Exits 0 once every user is added and read back; 1 with the status
//! printed when a call fails (the rule of every example, in
//! `common/mod.rs`).

mod common;

use std::process::ExitCode;

use clap::Parser;
use tonic::transport::{Channel, Endpoint};
use user_service::proto::{self, GetUserRequest, user_service_client::UserServiceClient};

#[derive(Parser)]
struct Args {
    /// The replicas, `HOST:PORT` separated by commas.
    #[arg(long, env = "USER_SERVICE_ADDR", default_value = "127.0.0.1:8080")]
    addr: String,
    /// How many users to add, then read back.
    #[arg(long, default_value_t = 10)]
    count: usize,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let mut endpoints = Vec::new();
    for addr in args.addr.split(',') {
        match Endpoint::from_shared(format!("http://{addr}")) {
            Ok(endpoint) => endpoints.push(endpoint),
            Err(err) => {
                eprintln!("not an address: {addr:?}: {}", common::chain(&err));
                return ExitCode::FAILURE;
            }
        }
    }
    let replicas = endpoints.len();
    // One channel over all of them; connections are made in the background,
    // and a call waits until one is ready.
    let channel = Channel::balance_list(endpoints.into_iter());
    let mut client = UserServiceClient::new(channel);

    let mut ids = Vec::new();
    for i in 0..args.count {
        let user = proto::User {
            first_name: format!("User {i}"),
            ..proto::User::default()
        };
        match client.add_user(user).await {
            Ok(reply) => ids.push(reply.into_inner().user.unwrap_or_default().id),
            Err(status) => return common::failed("AddUser", &status),
        }
    }
    // Read back, through whichever replica each call goes to.
    for id in &ids {
        if let Err(status) = client.get_user(GetUserRequest { id: id.clone() }).await {
            return common::failed("GetUser", &status);
        }
    }
    println!(
        "added and read back {} users through {replicas} replicas",
        ids.len()
    );
    ExitCode::SUCCESS
}
