//! sync: upserts on one SyncUsers stream, with up to `--in-flight` of them
//! awaiting their Ack, while `--watchers` other SyncUsers streams receive
//! the Changes.
//!
//! Latency is per Ack, from sending the upsert (from when it was due, at a
//! `--rps`). Propagation (feed delivery) is from sending the upsert to a
//! watcher receiving its Change; watchers recognise the run's changes by the
//! id (`{prefix}-{n}`), `n` being the request id.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use prost::Message;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use user_service::proto::{self, sync_request::Op, sync_response::Event};

use crate::{
    budget,
    connect::Client,
    record::Recorder,
    stats::{code_name, histogram, merge_into, micros},
    workers::{Ctx, Outcome, Stored, Totals},
};

/// Send times are kept in a ring indexed by request id. It must be larger
/// than the number of upserts a watcher can lag behind (the server cuts a
/// subscriber off at its feed capacity, 65536 by default) for every
/// propagation time to be measured against the right upsert.
const SEND_TIMES: usize = 1 << 20;

struct SendTimes {
    /// The run's start.
    start: Instant,
    /// Nanoseconds since `start` plus one; 0 when unknown.
    times: Vec<AtomicU64>,
}

impl SendTimes {
    fn new(start: Instant) -> Self {
        SendTimes {
            start,
            times: (0..SEND_TIMES).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// Upsert `n` was sent, or was due, at `at`.
    fn sent(&self, n: u64, at: Instant) {
        let nanos = at.saturating_duration_since(self.start).as_nanos() as u64 + 1;
        self.times[n as usize % SEND_TIMES].store(nanos, Ordering::Relaxed);
    }

    /// Time since upsert `n` was sent.
    fn since(&self, n: u64) -> Option<Duration> {
        match self.times[n as usize % SEND_TIMES].load(Ordering::Relaxed) {
            0 => None,
            sent => {
                let now = self.start.elapsed().as_nanos() as u64 + 1;
                Some(Duration::from_nanos(now.saturating_sub(sent)))
            }
        }
    }
}

pub async fn run(ctx: &Ctx, totals: &mut Totals) {
    let times = Arc::new(SendTimes::new(ctx.timeline.clock().start));
    let prefix = ctx.run_id.clone();
    // The writer announces the seq of its last committed upsert; watchers
    // stop once they have seen it.
    let (last_seq_tx, last_seq_rx) = watch::channel(None::<u64>);

    let mut watchers = Vec::new();
    for i in 0..ctx.plan.watchers {
        let (client, target) = (ctx.client(i + 1), ctx.target(i + 1));
        let mut recorder = ctx.recorder();
        match Watcher::open(client, &prefix).await {
            Ok(watcher) => watchers.push((
                target,
                tokio::spawn(watcher.run(
                    recorder,
                    times.clone(),
                    last_seq_rx.clone(),
                    ctx.plan.timeout,
                )),
            )),
            Err(status) => {
                recorder.aborted("opening a watcher stream", &status);
                totals.add(target, Outcome::of(recorder.finish()));
            }
        }
    }

    let (writer, last_seq) = write(ctx, ctx.client(0), &prefix, times.clone()).await;
    totals.add(ctx.target(0), writer);
    let _ = last_seq_tx.send(Some(last_seq));

    for (target, watcher) in watchers {
        match watcher.await {
            Ok(recorder) => totals.add(target, Outcome::of(recorder.finish())),
            Err(err) => totals.all.stats.error(format!("a watcher failed: {err}")),
        }
    }
}

/// Sends upserts with a bounded window and reads their Acks. Returns the
/// seq of the last committed upsert.
async fn write(
    ctx: &Ctx,
    mut client: Client,
    prefix: &str,
    times: Arc<SendTimes>,
) -> (Outcome, u64) {
    let mut recorder = ctx.recorder();
    let mut stored_ids = Vec::new();
    let window = ctx.plan.concurrency;
    let (tx, rx) = mpsc::channel::<proto::SyncRequest>(window);
    let responses = client.sync_users(ReceiverStream::new(rx)).await;
    let mut responses = match responses {
        Ok(responses) => responses.into_inner(),
        Err(status) => {
            recorder.aborted("opening the SyncUsers stream", &status);
            return (Outcome::of(recorder.finish()), 0);
        }
    };

    // Sending runs on its own task: a permit per upsert awaiting its Ack.
    // It times how late each upsert is sent (open loop) for the reader,
    // which owns the recorder.
    let lateness = Arc::new(Mutex::new(histogram()));
    let permits = Arc::new(Semaphore::new(window));
    let sent = Arc::new(AtomicU64::new(0));
    let sender = {
        let (budget, permits, times, sent) = (
            ctx.budget.clone(),
            permits.clone(),
            times.clone(),
            sent.clone(),
        );
        let tickets = ctx.tickets(window);
        let mut source = ctx.source.clone();
        let prefix = prefix.to_owned();
        let (lateness, clock) = (lateness.clone(), ctx.timeline.clock());
        tokio::spawn(async move {
            loop {
                let Some((n, due)) = budget::next_ticket(tickets.as_ref(), &budget).await else {
                    break;
                };
                let Ok(permit) = permits.acquire().await else {
                    break;
                };
                permit.forget();
                let Some(mut user) = source.next(n).await else {
                    break;
                };
                if user.id.is_empty() {
                    user.id = format!("{prefix}-{n:010}");
                }
                // Closed loop: timed from now, after the window let it go.
                let at = if tickets.is_some() {
                    if clock.measuring(Instant::now())
                        && let Ok(mut lateness) = lateness.lock()
                    {
                        lateness.saturating_record(micros(due.elapsed()));
                    }
                    due
                } else {
                    Instant::now()
                };
                times.sent(n, at);
                let request = proto::SyncRequest {
                    request_id: n,
                    op: Some(Op::Upsert(user)),
                    expected_version: 0,
                };
                // An error means the call has ended; the reader reports why.
                if tx.send(request).await.is_err() {
                    break;
                }
                sent.fetch_add(1, Ordering::Relaxed);
            }
            // Dropping `tx` closes our side: the server sends the Acks still
            // owed and ends the call.
        })
    };

    let mut last_seq = 0;
    let mut acked = 0u64;
    let deadline = async {
        ctx.budget.done().await;
        tokio::time::sleep(ctx.plan.timeout).await;
    };
    let mut deadline = std::pin::pin!(deadline);
    loop {
        let message = tokio::select! {
            message = responses.message() => message,
            () = &mut deadline => {
                recorder.aborted(
                    "the SyncUsers stream",
                    &tonic::Status::deadline_exceeded("Acks still owed after --timeout"),
                );
                break;
            }
        };
        match message {
            Ok(Some(proto::SyncResponse {
                event: Some(Event::Ack(ack)),
            })) => {
                permits.add_permits(1);
                acked += 1;
                let latency = times.since(ack.request_id).unwrap_or_default();
                let code = tonic::Code::from_i32(ack.code);
                recorder.call(latency, code);
                ctx.live.done(1);
                if code == tonic::Code::Ok {
                    last_seq = last_seq.max(ack.seq);
                    if let Some(user) = ack.user {
                        recorder.users(1, user.encoded_len() as u64);
                        if ctx.plan.verify {
                            stored_ids.push(user.id);
                        }
                    }
                } else {
                    recorder.unit_failed(format!("{}: {}", code_name(code), ack.message));
                }
            }
            // Our own Changes come back too; the watchers measure those.
            Ok(Some(_)) => {}
            Ok(None) => break,
            Err(status) => {
                recorder.aborted("the SyncUsers stream", &status);
                break;
            }
        }
    }
    sender.abort();
    let _ = sender.await;
    if ctx.plan.schedule.is_some()
        && let Ok(lateness) = lateness.lock()
    {
        merge_into(&mut recorder.stats.lateness, Some(lateness.clone()));
    }
    let unanswered = sent.load(Ordering::Relaxed).saturating_sub(acked);
    if unanswered > 0 {
        recorder.stats.unanswered += unanswered;
        recorder.error(format!("{unanswered} upserts sent got no Ack"));
    }
    let mut outcome = Outcome::of(recorder.finish());
    outcome.stored.push(Stored::each(stored_ids));
    (outcome, last_seq)
}

/// A SyncUsers stream that sends nothing and times the run's Changes.
struct Watcher {
    /// Held open until the watcher is done: dropping it closes our side.
    _requests: mpsc::Sender<proto::SyncRequest>,
    changes: tonic::Streaming<proto::SyncResponse>,
    prefix: String,
}

impl Watcher {
    /// Opens the stream. Once this returns, the server has subscribed it.
    async fn open(mut client: Client, prefix: &str) -> Result<Watcher, tonic::Status> {
        let (tx, rx) = mpsc::channel(1);
        let changes = client
            .sync_users(ReceiverStream::new(rx))
            .await?
            .into_inner();
        Ok(Watcher {
            _requests: tx,
            changes,
            prefix: format!("{prefix}-"),
        })
    }

    async fn run(
        mut self,
        mut recorder: Recorder,
        times: Arc<SendTimes>,
        mut last_seq: watch::Receiver<Option<u64>>,
        timeout: Duration,
    ) -> Recorder {
        let mut seen_seq = 0;
        let mut target = None;
        let mut give_up = None;
        loop {
            if target.is_some_and(|target| seen_seq >= target) {
                break;
            }
            let give_up_at = give_up.unwrap_or_else(|| tokio::time::Instant::now() + timeout);
            tokio::select! {
                message = self.changes.message() => match message {
                    Ok(Some(proto::SyncResponse { event: Some(Event::Change(change)) })) => {
                        seen_seq = change.seq;
                        let n = change
                            .user
                            .as_ref()
                            .and_then(|u| u.id.strip_prefix(&self.prefix))
                            .and_then(|n| n.parse::<u64>().ok());
                        if let Some(latency) = n.and_then(|n| times.since(n)) {
                            recorder.propagated(latency);
                        }
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(status) => {
                        recorder.aborted("a watcher stream", &status);
                        break;
                    }
                },
                changed = last_seq.changed(), if target.is_none() => {
                    if changed.is_err() {
                        break;
                    }
                    target = *last_seq.borrow();
                    give_up = Some(tokio::time::Instant::now() + timeout);
                }
                () = tokio::time::sleep_until(give_up_at), if give_up.is_some() => {
                    recorder.aborted(
                        "a watcher stream",
                        &tonic::Status::deadline_exceeded("not every Change arrived within --timeout"),
                    );
                    break;
                }
            }
        }
        recorder
    }
}
