//! Bidirectional streaming: SyncUsers. Both sides stream at once and
//! independently: the client sends upserts and deletes; the server answers
//! each with exactly one `Ack`, and also pushes a `Change` for every change
//! committed to the store by anyone (this stream, other streams, AddUser,
//! BulkAddUsers) while the call is open.
//!
//! Run it in two terminals at once; each prints the other's changes:
//!
//!     cargo run --example sync_users -- --name alice
//!     cargo run --example sync_users -- --name bob
//!
//! It sends five requests, one per `--interval` seconds, listens `--listen`
//! seconds more, then closes its side and exits when the server ends the call.

use std::time::Duration;

use clap::Parser;
use tokio_stream::wrappers::ReceiverStream;
use user_service::proto::{
    self, sync_request::Op, sync_response::Event, user_service_client::UserServiceClient,
};

#[derive(Parser)]
struct Args {
    /// The server's address, as given to its own `--addr`.
    #[arg(long, env = "USER_SERVICE_ADDR", default_value = "127.0.0.1:8080")]
    addr: String,
    /// Prefix of the ids this client writes (default: from the process id).
    #[arg(long)]
    name: Option<String>,
    /// Seconds between two requests.
    #[arg(long, default_value_t = 1.0)]
    interval: f64,
    /// Seconds to keep listening for changes after the last request.
    #[arg(long, default_value_t = 5.0)]
    listen: f64,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let mut client = UserServiceClient::connect(format!("http://{}", args.addr)).await?;

    let name = args
        .name
        .unwrap_or_else(|| format!("p{}", std::process::id()));
    let upsert = |request_id, n, first_name: &str, expected_version| proto::SyncRequest {
        request_id,
        op: Some(Op::Upsert(proto::User {
            id: format!("{name}-{n}"),
            first_name: first_name.into(),
            last_name: name.clone(),
            ..Default::default()
        })),
        expected_version,
    };
    let delete = |request_id, n| proto::SyncRequest {
        request_id,
        op: Some(Op::DeleteId(format!("{name}-{n}"))),
        expected_version: 0,
    };
    let requests = vec![
        upsert(1, 1, "Ann", 0),   // creates {name}-1, version 1
        upsert(2, 2, "Bob", 0),   // creates {name}-2
        upsert(3, 1, "Anna", 1),  // applies: {name}-1 is at version 1, becomes 2
        upsert(4, 1, "Annie", 1), // rejected with code 9: it is at version 2 now
        delete(5, 2),             // deletes {name}-2
    ];

    // The sending task: requests go out one by one; dropping `tx` at the end
    // closes the client's side. The server then sends the Acks it still owes
    // and ends the call with OK.
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let (interval, listen) = (args.interval, args.listen);
    tokio::spawn(async move {
        for request in requests {
            if tx.send(request).await.is_err() {
                return; // the call is over
            }
            tokio::time::sleep(Duration::from_secs_f64(interval)).await;
        }
        tokio::time::sleep(Duration::from_secs_f64(listen)).await;
    });

    // The receiving side (this task): Acks and Changes as they arrive. The
    // server answers at once, before any request, so the feed is live from
    // here. A failed op is an Ack with a non-zero code, not the end of the
    // call; the call itself fails only as a whole (a `Status`: `ABORTED` for a
    // reader too far behind the feed, `UNAVAILABLE` when the server stops).
    let mut events = client
        .sync_users(ReceiverStream::new(rx))
        .await?
        .into_inner();
    loop {
        let event = match events.message().await {
            Ok(Some(response)) => response.event,
            Ok(None) => break,
            Err(status) => {
                eprintln!("call failed: {:?}: {}", status.code(), status.message());
                std::process::exit(1);
            }
        };
        match event {
            Some(Event::Ack(ack)) => match ack.user {
                Some(user) => println!(
                    "ack #{} OK seq={} {} v{}",
                    ack.request_id, ack.seq, user.id, user.version
                ),
                None => println!(
                    "ack #{} {:?}: {}",
                    ack.request_id,
                    tonic::Code::from(ack.code),
                    ack.message
                ),
            },
            Some(Event::Change(change)) => {
                let kind = change.kind().as_str_name();
                let user = change.user.unwrap_or_default();
                println!(
                    "change seq={} {kind} {} v{} {}",
                    change.seq, user.id, user.version, user.first_name
                );
            }
            None => {}
        }
    }
    println!("call ended: OK");
    Ok(())
}
