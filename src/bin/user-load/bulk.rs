//! bulk: concurrent BulkAddUsers streams, each sending rows as fast as the
//! server takes them (HTTP/2 flow control paces it).

use std::{
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Instant,
};

use futures::Stream;
use prost::Message;
use tokio::task::JoinSet;
use user_service::proto;

use crate::run::{Budget, Ctx, Outcome, Source};

/// Rows between updates of the shared progress counter, so that streams do
/// not contend on it for every row.
const PROGRESS_EVERY: u64 = 256;

pub async fn run(ctx: &Ctx) -> Outcome {
    let mut workers = JoinSet::new();
    for i in 0..ctx.concurrency {
        let worker = Worker {
            client: ctx.client(i),
            budget: ctx.budget.clone(),
            source: ctx.source.clone(),
            per_stream: ctx.args.per_stream,
            progress: ctx.progress.clone(),
            id_prefix: ctx.id_prefix.clone(),
            timeout: ctx.timeout,
        };
        workers.spawn(worker.run());
    }
    Outcome::gather(workers).await
}

struct Worker {
    client: crate::run::Client,
    budget: Arc<Budget>,
    source: Source,
    per_stream: Option<u64>,
    progress: Arc<AtomicU64>,
    id_prefix: Option<String>,
    timeout: std::time::Duration,
}

impl Worker {
    /// Opens streams one after another until the budget is spent.
    async fn run(mut self) -> Outcome {
        let mut outcome = Outcome::default();
        while !self.budget.is_done() {
            let sent = Arc::new(Sent::default());
            let rows = Rows {
                budget: self.budget.clone(),
                source: self.source.clone(),
                left: self.per_stream.unwrap_or(u64::MAX),
                pending: None,
                id_prefix: self.id_prefix.clone(),
                sent: sent.clone(),
                unreported: 0,
                progress: self.progress.clone(),
                bytes: 0,
            };
            let start = Instant::now();
            let call = self.client.bulk_add_users(rows);
            // The reply must come within the timeout once no more rows may
            // be sent.
            let deadline = async {
                self.budget.done().await;
                tokio::time::sleep(self.timeout).await;
            };
            let result = tokio::select! {
                result = call => result,
                () = deadline => Err(tonic::Status::deadline_exceeded("no BulkAddUsers reply within --timeout")),
            };
            let latency = start.elapsed();
            let rows_sent = sent.rows.load(Ordering::Relaxed);
            let stats = &mut outcome.stats;
            match result {
                Ok(reply) => {
                    let reply = reply.into_inner();
                    stats.call(latency, tonic::Code::Ok);
                    stats.users += reply.added + reply.failed;
                    stats.bytes += sent.bytes.load(Ordering::Relaxed);
                    stats.rows_added += reply.added;
                    stats.rows_failed += reply.failed;
                    if reply.added + reply.failed != rows_sent {
                        stats.error(format!(
                            "stream sent {rows_sent} rows, reply counts {}",
                            reply.added + reply.failed
                        ));
                    }
                    for error in &reply.errors {
                        stats.error(format!("row code {}: {}", error.code, error.message));
                    }
                    if self.id_prefix.is_some() {
                        collect_stored(&mut outcome, &sent, &reply);
                    }
                }
                Err(status) => stats.failed(latency, &status),
            }
            if rows_sent == 0 {
                // Nothing left to send: the budget ran out or the data ended.
                break;
            }
        }
        outcome
    }
}

/// The ids of a stream's rows that its reply does not list as failed.
fn collect_stored(outcome: &mut Outcome, sent: &Sent, reply: &proto::BulkAddUsersResponse) {
    let Ok(ids) = sent.ids.lock() else { return };
    let mut failed: Vec<u64> = reply.errors.iter().map(|e| e.index).collect();
    failed.sort_unstable();
    outcome.unlisted_failures += reply.failed.saturating_sub(reply.errors.len() as u64);
    for (index, id) in ids.iter().enumerate() {
        if failed.binary_search(&(index as u64)).is_err() {
            outcome.stored_ids.push(id.clone());
        }
    }
}

/// What one stream sent.
#[derive(Default)]
struct Sent {
    rows: AtomicU64,
    bytes: AtomicU64,
    /// Row ids in stream order (only with `--verify`).
    ids: Mutex<Vec<String>>,
}

/// The rows of one stream, made as tonic asks for them.
struct Rows {
    budget: Arc<Budget>,
    source: Source,
    /// Rows this stream may still send (`--per-stream`).
    left: u64,
    /// A unit claimed while the data file had nothing ready.
    pending: Option<u64>,
    id_prefix: Option<String>,
    sent: Arc<Sent>,
    /// Rows not yet added to the progress counter.
    unreported: u64,
    progress: Arc<AtomicU64>,
    bytes: u64,
}

impl Rows {
    fn flush(&mut self) {
        self.progress.fetch_add(self.unreported, Ordering::Relaxed);
        self.unreported = 0;
        self.sent.bytes.store(self.bytes, Ordering::Relaxed);
    }
}

impl Stream for Rows {
    type Item = proto::User;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<proto::User>> {
        let this = &mut *self;
        let n = match this.pending.take() {
            Some(n) => Some(n),
            None if this.left == 0 => None,
            None => this.budget.claim(),
        };
        let Some(n) = n else {
            this.flush();
            return Poll::Ready(None);
        };
        let mut user = match this.source.poll_next(n, cx) {
            Poll::Ready(Some(user)) => user,
            Poll::Ready(None) => {
                this.flush();
                return Poll::Ready(None);
            }
            Poll::Pending => {
                this.pending = Some(n);
                return Poll::Pending;
            }
        };
        if let Some(prefix) = &this.id_prefix {
            if user.id.is_empty() {
                user.id = format!("{prefix}-{n:010}");
            }
            if let Ok(mut ids) = this.sent.ids.lock() {
                ids.push(user.id.clone());
            }
        }
        this.left -= 1;
        this.bytes += user.encoded_len() as u64;
        this.sent.rows.fetch_add(1, Ordering::Relaxed);
        this.unreported += 1;
        if this.unreported == PROGRESS_EVERY {
            this.flush();
        }
        Poll::Ready(Some(user))
    }
}
