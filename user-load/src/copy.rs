//! `user-load copy`: every user of one server copied into another, ids kept,
//! with a report of what was read, added and refused. The way to move from
//! a SQLite store to PostgreSQL (or back): a server on each, then
//! `user-load copy --from OLD --to NEW`.
//!
//! The users are read with ListUsers, in id order, and written with
//! BulkAddUsers, a batch per call, with their ids: the copy keeps every id,
//! name, address and `verified`. Versions start again at 1, as for any user
//! created (the API has no way to set one), and so does the new store's
//! change feed. A user the destination refuses (an id it already holds, a
//! row that breaks its rules) is reported with its id and the reason; the
//! others are copied.
//!
//! A copy can be resumed: the report gives the last id read, and `--after-id`
//! starts the listing after it. Run it while nothing writes to the source:
//! ListUsers lists every user stored when it started, but one added or
//! changed behind the listing's position is not copied again.

use std::{process::ExitCode, time::Duration};

use clap::Args;
use tokio_stream::StreamExt;
use user_service::proto::{ListUsersRequest, User};

use crate::{
    cli::{ConnectArgs, HostPort},
    connect::{self, Client, client_on},
};

/// Users per BulkAddUsers call. The server reports the first 100 failures
/// of a call (its index, code and message): with at most 100 rows a call,
/// every refused user's reason is known. A call of 100 users is a few tens
/// of kB, committed in one transaction.
const BATCH: usize = 100;

/// Refused users listed in the report, each with its reason; past this the
/// report counts them only, so that a copy into the wrong store does not
/// print millions of lines.
const MAX_REASONS: usize = 1000;

/// How long one call (a batch's BulkAddUsers, the connection) may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// Exit status when some users were not copied, or a server could not be
/// reached or failed (as the load modes' "could not do its work").
const EXIT_FAILED: u8 = 1;

/// Exit status of flags that do not go together (as clap's own errors).
const EXIT_USAGE: u8 = 2;

#[derive(Debug, Clone, Args)]
pub struct CopyArgs {
    /// The server to read every user from, HOST:PORT.
    #[arg(long, value_name = "HOST:PORT", value_parser = crate::cli::parse_host_port)]
    pub from: HostPort,
    /// The server to add them to, HOST:PORT. The options below (TLS, the
    /// token, metadata) apply to both servers.
    #[arg(long, value_name = "HOST:PORT", value_parser = crate::cli::parse_host_port)]
    pub to: HostPort,
    /// Start after this id (the report's last id read): resumes a copy.
    #[arg(long, value_name = "ID")]
    pub after_id: Option<String>,

    /// TLS, the token and metadata: the same for both servers, as for two
    /// servers of one deployment.
    #[command(flatten)]
    pub conn: ConnectArgs,
}

/// What a copy did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Copied {
    pub read: u64,
    pub added: u64,
    pub failed: u64,
    /// `(id, reason)` of the first [`MAX_REASONS`] users refused.
    pub reasons: Vec<(String, String)>,
    /// The last id read from the source, where `--after-id` resumes.
    pub last_id: Option<String>,
    /// Why the copy stopped before the end of the listing, if it did.
    pub stopped: Option<String>,
}

impl Copied {
    /// The report, for people.
    pub fn render(&self, args: &CopyArgs) -> String {
        let mut text = format!(
            "copy {} -> {}\nread {}, added {}, failed {}\n",
            args.from, args.to, self.read, self.added, self.failed
        );
        for (id, reason) in &self.reasons {
            text.push_str(&format!("failed {id:?}: {reason}\n"));
        }
        if self.failed > self.reasons.len() as u64 {
            let more = self.failed - self.reasons.len() as u64;
            text.push_str(&format!("... and {more} more refused\n"));
        }
        if let Some(why) = &self.stopped {
            text.push_str(&format!("stopped: {why}\n"));
        }
        match &self.last_id {
            Some(id) => text.push_str(&format!(
                "last id read: {id:?} (--after-id {id} goes on after it)\n"
            )),
            None => text.push_str("no user read\n"),
        }
        text
    }

    fn refuse(&mut self, id: &str, reason: String) {
        self.failed += 1;
        if self.reasons.len() < MAX_REASONS {
            self.reasons.push((id.to_owned(), reason));
        }
    }
}

/// Runs `user-load copy`: the report on stdout, the exit status.
pub fn main(runtime: &tokio::runtime::Runtime, args: &CopyArgs) -> ExitCode {
    if let Err(message) = args.conn.check() {
        eprintln!("user-load copy: {message}");
        return ExitCode::from(EXIT_USAGE);
    }
    let copied = runtime.block_on(copy(args));
    print!("{}", copied.render(args));
    if copied.failed == 0 && copied.stopped.is_none() {
        return ExitCode::SUCCESS;
    }
    // The reason on stderr too, for a report sent to a file.
    match &copied.stopped {
        Some(why) => eprintln!("user-load: copy stopped: {why}"),
        None => eprintln!("user-load: copy: {} users not copied", copied.failed),
    }
    ExitCode::from(EXIT_FAILED)
}

/// A client of the server at `addr`, its connection checked with a health
/// Check, as the load modes connect.
async fn connect(addr: &HostPort, conn: &ConnectArgs) -> Result<Client, String> {
    let mut connections = connect::connect_to(std::slice::from_ref(addr), conn, 1, CALL_TIMEOUT)
        .await
        .map_err(|err| err.to_string())?;
    Ok(client_on(connections.remove(0).transport))
}

/// Copies every user of `args.from` after `args.after_id` into `args.to`.
pub async fn copy(args: &CopyArgs) -> Copied {
    let mut copied = Copied {
        last_id: args.after_id.clone(),
        ..Copied::default()
    };
    let (mut from, mut to) = match (
        connect(&args.from, &args.conn).await,
        connect(&args.to, &args.conn).await,
    ) {
        (Ok(from), Ok(to)) => (from, to),
        (Err(err), _) | (_, Err(err)) => {
            copied.stopped = Some(err);
            return copied;
        }
    };
    let request = ListUsersRequest {
        after_id: args.after_id.clone().unwrap_or_default(),
        ..ListUsersRequest::default()
    };
    let mut listing = match from.list_users(request).await {
        Ok(listing) => listing.into_inner(),
        Err(status) => {
            copied.stopped = Some(format!("ListUsers on {}: {status}", args.from));
            return copied;
        }
    };
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        let next = listing.next().await;
        let ended = match next {
            Some(Ok(user)) => {
                copied.read += 1;
                batch.push(user);
                false
            }
            Some(Err(status)) => {
                copied.stopped = Some(format!(
                    "ListUsers on {}: {:?}: {}",
                    args.from,
                    status.code(),
                    status.message()
                ));
                true
            }
            None => true,
        };
        let full = batch.len() == BATCH || (ended && !batch.is_empty());
        if full
            && let Err(why) = add(&mut to, &args.to, std::mem::take(&mut batch), &mut copied).await
        {
            copied.stopped = Some(why);
            return copied;
        }
        if ended {
            return copied;
        }
    }
}

/// Adds `batch` to `to` in one BulkAddUsers call and counts what it did;
/// only a call that failed as a whole is an error (the copy stops there,
/// and `last_id` stays before the batch).
async fn add(
    to: &mut Client,
    addr: &HostPort,
    batch: Vec<User>,
    copied: &mut Copied,
) -> Result<(), String> {
    let ids: Vec<String> = batch.iter().map(|user| user.id.clone()).collect();
    let mut request = tonic::Request::new(tokio_stream::iter(batch));
    request.set_timeout(CALL_TIMEOUT);
    let reply = to
        .bulk_add_users(request)
        .await
        .map_err(|status| {
            format!(
                "BulkAddUsers on {addr}: {:?}: {}",
                status.code(),
                status.message()
            )
        })?
        .into_inner();
    copied.added += reply.added;
    let mut reported = 0;
    for error in &reply.errors {
        let id = usize::try_from(error.index)
            .ok()
            .and_then(|index| ids.get(index))
            .map_or("(unknown)", String::as_str);
        let code = tonic::Code::from_i32(error.code);
        copied.refuse(id, format!("{code:?}: {}", error.message));
        reported += 1;
    }
    // More failures than the reply lists (never with a batch of at most
    // 100): counted, without their ids.
    copied.failed += reply.failed.saturating_sub(reported);
    if let Some(last) = ids.last() {
        copied.last_id = Some(last.clone());
    }
    Ok(())
}
