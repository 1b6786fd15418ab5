//! Client streaming: BulkAddUsers. The client sends any number of `User`
//! messages, then closes its side; only then does the server answer, once:
//! rows added, rows failed, and why (by 0-based row index). Bad rows (invalid,
//! or a duplicate id) are reported; they do not stop the import.
//!
//!     cargo run --example bulk_add_users -- --count 1000
//!     cargo run --example bulk_add_users -- users.jsonl
//!
//! A JSON Lines file holds one user per line, e.g.
//! `{"id": "ada", "first_name": "Ada", "last_name": "Lovelace", "verified": true}`.

use std::{fs::File, io::BufReader};

use anyhow::bail;
use clap::Parser;
use futures::{StreamExt, stream};
use tokio_stream::wrappers::ReceiverStream;
use user_service::proto::{self, user_service_client::UserServiceClient};

#[derive(Parser)]
struct Args {
    /// The server's address, as given to its own `--addr`.
    #[arg(long, env = "USER_SERVICE_ADDR", default_value = "127.0.0.1:8080")]
    addr: String,
    /// How many users to generate when no file is given.
    #[arg(long, default_value_t = 5)]
    count: u64,
    /// A JSON Lines file of users, read as the upload proceeds.
    file: Option<std::path::PathBuf>,
}

/// One line of the file; absent fields are empty.
#[derive(Default, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
struct Row {
    id: String,
    first_name: String,
    last_name: String,
    address: String,
    verified: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut client = UserServiceClient::connect(format!("http://{}", args.addr)).await?;

    // The request is a stream that tonic pulls from as fast as HTTP/2 flow
    // control lets it send: a slow server slows the client down, and
    // nothing piles up in memory on either side.
    let users = match args.file {
        None => stream::iter((1..=args.count).map(|i| proto::User {
            first_name: format!("User {i}"),
            last_name: "Generated".into(),
            verified: i % 2 == 0,
            ..Default::default()
        }))
        .boxed(),
        Some(path) => {
            // serde_json parses one user at a time as it reads the file, on
            // a blocking thread that hands users over through a bounded
            // channel: it runs at most 64 users ahead of the upload.
            let file = BufReader::new(File::open(&path)?);
            let rows = serde_json::Deserializer::from_reader(file).into_iter::<Row>();
            let (tx, rx) = tokio::sync::mpsc::channel(64);
            tokio::task::spawn_blocking(move || {
                for row in rows {
                    let row = match row {
                        Ok(row) => row,
                        Err(err) => {
                            eprintln!("{}: {err}; the rest is not sent", path.display());
                            break;
                        }
                    };
                    let user = proto::User {
                        id: row.id,
                        first_name: row.first_name,
                        last_name: row.last_name,
                        address: row.address,
                        verified: row.verified,
                        version: 0,
                    };
                    if tx.blocking_send(user).is_err() {
                        break; // the call is over
                    }
                } // Dropping `tx` ends the stream: the client's side closes.
            });
            ReceiverStream::new(rx).boxed()
        }
    };

    // The one reply comes after the stream ends. A call-level error (the
    // server shutting down) arrives as `Err(Status)` instead; rows the server
    // had received are stored all the same, as when the client is interrupted.
    match client.bulk_add_users(users).await {
        Ok(response) => {
            let summary = response.into_inner();
            println!("added {}, failed {}", summary.added, summary.failed);
            for error in summary.errors {
                println!(
                    "row {}: code {}: {}",
                    error.index, error.code, error.message
                );
            }
            Ok(())
        }
        Err(status) => bail!("BulkAddUsers: {:?}: {}", status.code(), status.message()),
    }
}
