//! bulk: concurrent BulkAddUsers streams, each sending rows as fast as the
//! server takes them (HTTP/2 flow control paces it).
//!
//! Rows are the unit of work: each ends added, failed (as the stream's
//! reply says), or unconfirmed when its stream ends without a reply.
//!
//! A stream has one reply, at its end, so no row has a latency of its own.
//! What is measured: each batch of [`BATCH_ROWS`] rows of a stream, from
//! handing its first row to gRPC to handing the first of the next (HTTP/2
//! flow control lets rows out only as fast as the server takes them, once
//! its window is full: this is the time the server takes to import a
//! batch); rows sent per slot of time; each stream from open to reply, and
//! its reply wait, from its end of input to its reply: the time the server
//! needs to commit the last rows it received.

use std::{
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use futures::Stream;
use prost::Message;
use tokio::task::JoinSet;
use user_service::proto;

use crate::{
    budget::Budget,
    connect::Client,
    record::{Live, Recorder, RowError},
    series::Timeline,
    source::Source,
    targets::Targets,
    workers::{Ctx, Outcome, Stored, Totals},
};

/// Rows between updates of the shared progress counter and timeline, so
/// that streams do not contend on them for every row.
const REPORT_EVERY: u64 = 256;

/// Rows of a batch, the sample bulk's latency is taken on: as many as the
/// server commits together at most (1024), rounded for rates that read
/// well. A 1-second run at 150,000 rows/s gives 150 of them.
pub const BATCH_ROWS: u64 = 1000;

pub async fn run(ctx: &Ctx, totals: &mut Totals) {
    let mut workers = JoinSet::new();
    for i in 0..ctx.plan.concurrency {
        let worker = Worker {
            client: ctx.client(i),
            budget: ctx.budget.clone(),
            source: ctx.source.clone(),
            per_stream: ctx.plan.per_stream,
            live: ctx.live.clone(),
            timeline: ctx.timeline.clone(),
            id_prefix: ctx.id_prefix.clone(),
            timeout: ctx.plan.timeout,
            recorder: ctx.recorder(),
            target: ctx.target(i),
            targets: ctx.targets.clone(),
        };
        let target = ctx.target(i);
        workers.spawn(async move { (target, worker.run().await) });
    }
    totals.gather(workers).await;
}

struct Worker {
    client: Client,
    budget: Arc<Budget>,
    source: Source,
    per_stream: Option<u64>,
    live: Arc<Live>,
    timeline: Arc<Timeline>,
    id_prefix: Option<String>,
    timeout: Duration,
    recorder: Recorder,
    target: usize,
    targets: Arc<Targets>,
}

impl Worker {
    /// Opens streams one after another until the budget is spent, while
    /// its target is up. A stream is opened only once its first row is at
    /// hand: no empty streams.
    async fn run(mut self) -> Outcome {
        let mut outcome = Outcome::default();
        while self.targets.wait_up(self.target).await {
            let Some(n) = self.budget.claim() else { break };
            let Some(first) = self.source.next(n).await else {
                break;
            };
            let sent = Arc::new(Sent::default());
            let rows = Rows {
                budget: self.budget.clone(),
                source: self.source.clone(),
                left: self.per_stream.unwrap_or(u64::MAX),
                first: Some((n, first)),
                pending: None,
                id_prefix: self.id_prefix.clone(),
                sent: sent.clone(),
                unreported: 0,
                live: self.live.clone(),
                timeline: self.timeline.clone(),
                bytes: 0,
                batch_start: None,
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
                () = deadline => Err(tonic::Status::deadline_exceeded(
                    "no BulkAddUsers reply within --timeout",
                )),
            };
            let latency = start.elapsed();
            let rows_sent = sent.rows.load(Ordering::Relaxed);
            let recorder = &mut self.recorder;
            if let Ok(mut batches) = sent.batches.lock() {
                for took in batches.drain(..) {
                    recorder.batch(took);
                }
            }
            if recorder.measuring() {
                recorder.stats.users += rows_sent;
                recorder.stats.bytes += sent.bytes.load(Ordering::Relaxed);
            }
            match result {
                Ok(reply) => {
                    let reply = reply.into_inner();
                    recorder.stream(latency, tonic::Code::Ok);
                    if let Some(ended) = sent.ended() {
                        recorder.secondary(|s| &mut s.reply_wait, ended.elapsed());
                    }
                    let errors: Vec<RowError<'_>> = reply
                        .errors
                        .iter()
                        .map(|e| RowError {
                            code: tonic::Code::from_i32(e.code),
                            message: &e.message,
                        })
                        .collect();
                    recorder.rows(reply.added, reply.failed, &errors);
                    if reply.added + reply.failed != rows_sent {
                        recorder.error(format!(
                            "a stream sent {rows_sent} rows, its reply counts {}",
                            reply.added + reply.failed
                        ));
                    }
                    if self.id_prefix.is_some() {
                        outcome.stored.push(stored(&sent, &reply));
                    }
                }
                Err(status) => {
                    recorder.stream(latency, status.code());
                    recorder.rows_lost(rows_sent, &status);
                    self.targets.stream_failed(self.target, &status).await;
                }
            }
        }
        outcome.stats = self.recorder.finish();
        outcome
    }
}

/// The rows of a stream its reply does not list as failed: every one
/// stored when the reply lists every failure, else `added` of them.
fn stored(sent: &Sent, reply: &proto::BulkAddUsersResponse) -> Stored {
    let Ok(ids) = sent.ids.lock() else {
        return Stored::default();
    };
    let mut failed: Vec<u64> = reply.errors.iter().map(|e| e.index).collect();
    failed.sort_unstable();
    let ids = ids
        .iter()
        .enumerate()
        .filter(|(index, _)| failed.binary_search(&(*index as u64)).is_err())
        .map(|(_, id)| id.clone())
        .collect();
    Stored {
        ids,
        added: reply.added,
    }
}

/// What one stream sent.
#[derive(Default)]
struct Sent {
    rows: AtomicU64,
    bytes: AtomicU64,
    /// When the stream ended its input.
    ended: Mutex<Option<Instant>>,
    /// How long each full batch of rows took to go out.
    batches: Mutex<Vec<Duration>>,
    /// Row ids in stream order (only with `--verify`).
    ids: Mutex<Vec<String>>,
}

impl Sent {
    fn ended(&self) -> Option<Instant> {
        self.ended.lock().ok().and_then(|ended| *ended)
    }
}

/// The rows of one stream, made as tonic asks for them.
struct Rows {
    budget: Arc<Budget>,
    source: Source,
    /// Rows this stream may still send (`--per-stream`).
    left: u64,
    /// The first row, claimed before the stream was opened.
    first: Option<(u64, proto::User)>,
    /// A unit claimed while the data file had nothing ready.
    pending: Option<u64>,
    id_prefix: Option<String>,
    sent: Arc<Sent>,
    /// Rows not yet added to the progress counter and the timeline.
    unreported: u64,
    live: Arc<Live>,
    timeline: Arc<Timeline>,
    bytes: u64,
    /// When the current batch's first row was handed over.
    batch_start: Option<Instant>,
}

impl Rows {
    fn flush(&mut self) {
        self.live.done(self.unreported);
        self.timeline.add_users(self.unreported);
        self.unreported = 0;
        self.sent.bytes.store(self.bytes, Ordering::Relaxed);
    }

    fn end(&mut self) -> Poll<Option<proto::User>> {
        self.flush();
        if let Ok(mut ended) = self.sent.ended.lock() {
            ended.get_or_insert_with(Instant::now);
        }
        Poll::Ready(None)
    }

    /// The next row: the first one, or one claimed from the budget.
    fn poll_row(&mut self, cx: &mut Context<'_>) -> Poll<Option<(u64, proto::User)>> {
        if let Some(first) = self.first.take() {
            return Poll::Ready(Some(first));
        }
        let n = match self.pending.take() {
            Some(n) => n,
            None if self.left == 0 => return Poll::Ready(None),
            None => match self.budget.claim() {
                Some(n) => n,
                None => return Poll::Ready(None),
            },
        };
        match self.source.poll_next(n, cx) {
            Poll::Ready(user) => Poll::Ready(user.map(|user| (n, user))),
            Poll::Pending => {
                self.pending = Some(n);
                Poll::Pending
            }
        }
    }
}

impl Stream for Rows {
    type Item = proto::User;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<proto::User>> {
        let this = &mut *self;
        let (n, mut user) = match this.poll_row(cx) {
            Poll::Ready(Some(row)) => row,
            Poll::Ready(None) => return this.end(),
            Poll::Pending => return Poll::Pending,
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
        let index = this.sent.rows.fetch_add(1, Ordering::Relaxed);
        if index.is_multiple_of(BATCH_ROWS) {
            let now = Instant::now();
            if let Some(start) = this.batch_start.replace(now) {
                let took = now - start;
                this.timeline.add_latency_at(now, took);
                if let Ok(mut batches) = this.sent.batches.lock() {
                    batches.push(took);
                }
            }
        }
        this.unreported += 1;
        if this.unreported == REPORT_EVERY {
            this.flush();
        }
        Poll::Ready(Some(user))
    }
}
