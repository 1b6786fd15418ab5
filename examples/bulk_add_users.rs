//! Client streaming: BulkAddUsers. The client sends any number of `User`
//! messages, then closes its side; only then does the server answer, once:
//! rows added, rows failed, and why (by 0-based row index). Bad rows (invalid,
//! or a duplicate id) are reported; they do not stop the import.
//!
//!     cargo run --release --example bulk_add_users -- --count 1000
//!     cargo run --release --example bulk_add_users -- users.jsonl
//!
//! A JSON Lines file holds one user per line, in proto3 JSON as grpcurl
//! reads and prints it: each field by its proto name or its JSON name
//! (`first_name` or `firstName`), e.g.
//! `{"id": "ada", "firstName": "Ada", "last_name": "Lovelace", "verified": true}`.
//! A line that is not a user (not JSON, an unknown field, a wrong type) is
//! reported with its file and line number and not sent; the lines after it
//! are. Blank lines are skipped.
//!
//! Exits 0 when the call succeeded and every line was sent, even if the
//! server refused some rows: which and why is its answer, printed. Exits 1
//! when a line could not be sent, or with the status printed when the call
//! failed (the rule of every example, in `common/mod.rs`).

mod common;

use std::{
    fs::File,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::ExitCode,
};

use clap::Parser;
use futures::{StreamExt, stream};
use prost_reflect::{DescriptorPool, DynamicMessage, MessageDescriptor};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use user_service::proto;

#[derive(Parser)]
struct Args {
    /// The server's address, as given to its own `--addr`.
    #[arg(long, env = "USER_SERVICE_ADDR", default_value = "127.0.0.1:8080")]
    addr: String,
    /// How many users to generate when no file is given.
    #[arg(long, default_value_t = 5)]
    count: u64,
    /// A JSON Lines file of users, read as the upload proceeds.
    file: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    // Opened first: a wrong path fails before anything is sent.
    let file = match &args.file {
        None => None,
        Some(path) => match File::open(path) {
            Ok(file) => Some((path.clone(), file)),
            Err(err) => {
                eprintln!("cannot open {}: {err}", path.display());
                return ExitCode::FAILURE;
            }
        },
    };
    let Some(mut client) = common::connect(&args.addr).await else {
        return ExitCode::FAILURE;
    };

    // The request is a stream that tonic pulls from as fast as HTTP/2 flow
    // control lets it send: a slow server slows the client down, and
    // nothing piles up in memory on either side.
    let (users, reader) = match file {
        None => {
            let users = stream::iter((1..=args.count).map(|i| proto::User {
                first_name: format!("User {i}"),
                last_name: "Generated".into(),
                verified: i % 2 == 0,
                ..Default::default()
            }));
            (users.boxed(), None)
        }
        Some((path, file)) => {
            // The file is read one line at a time, on a thread of its own
            // that hands users over through a bounded channel: it runs at
            // most 64 users ahead of the upload. (A plain thread, not
            // `spawn_blocking`: if the call fails, the example exits without
            // waiting for it.)
            let (tx, rx) = mpsc::channel(64);
            let reader = std::thread::spawn(move || send_lines(&path, file, tx));
            (ReceiverStream::new(rx).boxed(), Some(reader))
        }
    };

    // The one reply comes after the stream ends. A call-level error (the
    // server shutting down) arrives as `Err(Status)` instead; rows the server
    // had received are stored all the same, as when the client is interrupted.
    let summary = match client.bulk_add_users(users).await {
        Ok(response) => response.into_inner(),
        Err(status) => return common::failed("BulkAddUsers", &status),
    };
    // The reply came after the stream ended, so the reader has finished.
    let skipped = match reader {
        Some(reader) => reader.join().expect("the file reader does not panic"),
        None => Skipped::default(),
    };
    // The summary says what was not sent: "added 2, failed 0" alone would
    // read as a complete import.
    let mut line = format!("added {}, failed {}", summary.added, summary.failed);
    if !skipped.all_sent() {
        line += &format!(", not sent {}", skipped.bad);
    }
    if let Some(number) = skipped.stopped_at {
        line += &format!(", nor anything from line {number} on");
    }
    println!("{line}");
    for error in summary.errors {
        // Where the row came from: its line in the file, or its index.
        let row = match &args.file {
            Some(path) => format!("{}:{}", path.display(), skipped.line_of(error.index)),
            None => format!("row {}", error.index),
        };
        println!("{row}: code {}: {}", error.code, error.message);
    }
    if skipped.all_sent() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// What reading a file left out.
#[derive(Default)]
struct Skipped {
    /// The lines not sent as rows (blank or bad), in ascending order.
    lines: Vec<u64>,
    /// How many of them were bad.
    bad: u64,
    /// The line where reading stopped before the end of the file.
    stopped_at: Option<u64>,
}

impl Skipped {
    /// Every line that holds a user was sent.
    fn all_sent(&self) -> bool {
        self.bad == 0 && self.stopped_at.is_none()
    }

    /// The line (1-based) of the file that the row at `index` (0-based, in
    /// the stream) came from: every skipped line at or before it moves it
    /// one further.
    fn line_of(&self, index: u64) -> u64 {
        let mut line = index + 1;
        for &skipped in &self.lines {
            if skipped > line {
                break;
            }
            line += 1;
        }
        line
    }
}

/// Sends each line of `file` as a user, until the end of the file or of
/// the call; reports the lines that are not users on stderr.
fn send_lines(path: &Path, file: File, tx: mpsc::Sender<proto::User>) -> Skipped {
    // A line is read as proto3 JSON reads a `User` (what grpcurl and every
    // protobuf library accept: field names in both styles, a uint64 as a
    // number or a string, an unknown field refused), from the descriptor
    // the server's reflection serves.
    let pool = DescriptorPool::decode(proto::FILE_DESCRIPTOR_SET).expect("the compiled-in proto");
    let user_type = pool
        .get_message_by_name("grpcUser.User")
        .expect("the proto defines grpcUser.User");
    let mut skipped = Skipped::default();
    // Lines as bytes: a line that is not UTF-8 is a bad line, not the end.
    for (number, line) in (1..).zip(BufReader::new(file).split(b'\n')) {
        let line = match line {
            Ok(line) => line,
            Err(err) => {
                eprintln!("{}:{number}: cannot read: {err}", path.display());
                skipped.stopped_at = Some(number);
                break;
            }
        };
        if line.trim_ascii().is_empty() {
            skipped.lines.push(number);
            continue;
        }
        let user = match parse_user(&user_type, &line) {
            Ok(user) => user,
            Err(err) => {
                eprintln!("{}:{number}: not sent: {err}", path.display());
                skipped.lines.push(number);
                skipped.bad += 1;
                continue;
            }
        };
        if tx.blocking_send(user).is_err() {
            break; // the call is over
        }
    }
    skipped // Returning drops `tx`, which ends the stream: the client's side closes.
}

/// One line of the file as a `User`.
fn parse_user(user_type: &MessageDescriptor, line: &[u8]) -> Result<proto::User, String> {
    let mut json = serde_json::Deserializer::from_slice(line);
    let user = DynamicMessage::deserialize(user_type.clone(), &mut json)
        .and_then(|user| json.end().map(|()| user))
        .map_err(|err| {
            // serde_json ends its message with where in its input it
            // stopped: always line 1 here, of this one line.
            let text = err.to_string();
            let at = format!(" at line {} column {}", err.line(), err.column());
            match text.strip_suffix(&at) {
                Some(text) => format!("{text} (column {})", err.column()),
                None => text,
            }
        })?;
    user.transcode_to().map_err(|err| err.to_string())
}
