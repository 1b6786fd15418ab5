//! Bidirectional streaming: SyncUsers. Both sides stream at once and
//! independently: the client sends upserts and deletes; the server answers
//! each with exactly one `Ack`, and also pushes a `Change` for every change
//! committed to the store by anyone (this stream, other streams, AddUser,
//! BulkAddUsers) while the call is open.
//!
//! Run it in two terminals, the second within a few seconds of the first;
//! each prints the other's changes:
//!
//!     cargo run --release --example sync_users -- --name alice
//!     cargo run --release --example sync_users -- --name bob
//!
//! It sends five requests, one per `--interval` seconds, listens `--listen`
//! seconds more, then closes its side and exits when the server ends the call.
//! Interrupting it (Ctrl-C) cancels the call instead: the stream is reset and
//! the server drops this client's subscription. Exits 0 when the server ends
//! the call with OK (a refused op is an Ack, not a failure); 1 with the
//! status printed when the call fails (the rule of every example, in
//! `common/mod.rs`).

mod common;

use std::{process::ExitCode, time::Duration};

use clap::Parser;
use tokio_stream::wrappers::ReceiverStream;
use user_service::proto::{self, sync_request::Op, sync_response::Event};

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
async fn main() -> ExitCode {
    let args = Args::parse();
    let Some(mut client) = common::connect(&args.addr).await else {
        return ExitCode::FAILURE;
    };

    let name = args
        .name
        .unwrap_or_else(|| format!("p{}", std::process::id()));
    let user = |n: u32, first_name: &str| proto::User {
        id: format!("{name}-{n}"),
        first_name: first_name.into(),
        last_name: name.clone(),
        ..Default::default()
    };
    // Each op with its `expected_version` (0: apply whatever the version).
    let ops = [
        (Op::Upsert(user(1, "Ann")), 0),  // creates {name}-1 at version 1
        (Op::Upsert(user(2, "Bob")), 0),  // creates {name}-2
        (Op::Upsert(user(1, "Anna")), 1), // applies: {name}-1 is at 1, now 2
        (Op::Upsert(user(1, "Ace")), 1),  // refused (code 9): it is at 2 now
        (Op::DeleteId(format!("{name}-2")), 0),
    ];

    // The sending task: requests go out one by one; dropping `tx` at the end
    // closes the client's side. The server then sends the Acks it still owes
    // and ends the call with OK.
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let (interval, listen) = (args.interval, args.listen);
    tokio::spawn(async move {
        for (request_id, (op, expected_version)) in (1..).zip(ops) {
            let request = proto::SyncRequest {
                request_id,
                op: Some(op),
                expected_version,
            };
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
    let mut events = match client.sync_users(ReceiverStream::new(rx)).await {
        Ok(response) => response.into_inner(),
        Err(status) => return common::failed("SyncUsers", &status),
    };
    loop {
        let event = match events.message().await {
            Ok(Some(response)) => response.event,
            Ok(None) => break, // the server ended the call with OK
            Err(status) => return common::failed("SyncUsers", &status),
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
    ExitCode::SUCCESS
}
