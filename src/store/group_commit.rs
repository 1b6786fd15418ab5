//! Group commit: many callers' writes, one writer, one commit per batch.
//!
//! A durable backend pays a fixed cost per commit (an fsync, a round trip to
//! a database server). When every write call commits on its own, that cost
//! caps the rate at one commit per call; with group commit the writes that
//! arrive together, from every concurrent call, share one. The pattern has
//! four parts, and all but the commit itself are here, apart from any
//! backend:
//!
//! 1. **The queue.** Callers build their ops ([`PreparedOp`]) on their own
//!    thread and send them as one [`Command`] through a bounded channel
//!    ([`Writes`], [`WRITE_QUEUE`]): a full queue makes callers wait
//!    (backpressure) instead of growing. Each awaits one reply: one result
//!    per op, in order, whatever the command.
//! 2. **Batching.** The writer takes the first command waiting, then every
//!    other one that has already arrived, up to [`MAX_BATCH_OPS`] ops
//!    ([`GroupCommit::start`]). When a small batch (under
//!    [`SMALL_BATCH_OPS`]) has fewer ops than the previous one held, the
//!    others are usually a moment away (their callers are still handling the
//!    last replies), so the writer waits for them a little: at most the last
//!    commit's duration over [`COMMIT_DELAY_DIVISOR`], never more than
//!    [`MAX_COMMIT_DELAY`] ([`Batch::wait_until`]). A slow commit then
//!    carries more writes, a lone sequential writer never waits, and a large
//!    batch (a bulk import) has nothing to gain from waiting.
//! 3. **The commit**, the backend's own: it applies [`Batch::ops`] in order
//!    in one transaction, each op checking before it writes so that one that
//!    fails writes nothing and uses no seq, and returns one result per op,
//!    or one error for the whole batch when the transaction did not commit.
//! 4. **Publish, then reply** ([`GroupCommit::finish`]): only once the commit
//!    has returned are the changes published to the feed, in commit order,
//!    and then each caller answered. A reply means the write is committed;
//!    a failed transaction publishes nothing and fails every op in it.
//!
//! The writer's loop is the backend's, since how it waits differs: the
//! SQLite writer is an OS thread that parks (see its `Inbox`), where a tokio
//! task would await the receiver (`recv`, `try_recv`, `timeout_at`). Either
//! way the loop reads:
//!
//! ```ignore
//! while let Some(first) = receive().await {
//!     let mut batch = group.start(first, || try_receive());
//!     while let Some(deadline) = batch.wait_until() {
//!         let Some(command) = receive_until(deadline).await else { break };
//!         batch.add(command, || try_receive());
//!     }
//!     let started = Instant::now();
//!     let outcome = commit(batch.ops()).await;
//!     group.finish(batch, started.elapsed(), outcome);
//! }
//! ```

use std::time::{Duration, Instant};

use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;

pub use super::write_stats::WriteStats;
use super::{ChangeFeed, Ops, PreparedOp, Results, StoreError};
use crate::telemetry::trace;
use crate::user::Change;

/// Commands waiting for the writer. Callers wait for room (backpressure)
/// rather than queue without bound; 1024 covers every call the server admits
/// on a connection (`MAX_CONCURRENT_STREAMS`) with one command in flight each.
pub const WRITE_QUEUE: usize = 1024;

/// Most ops (users created, upserts, deletes) committed in one transaction.
/// Bounds the latency a write waits behind others and the memory a batch
/// holds, while staying large enough that bulk imports commit thousands of
/// rows per commit. (One command is never split, so a batch can pass it by
/// the size of its last command.)
pub const MAX_BATCH_OPS: usize = 8192;

/// Only a batch of fewer ops than this waits for more: a commit's fixed
/// cost is already shared out thinly in a larger one.
pub const SMALL_BATCH_OPS: usize = 256;

/// The writer waits for more writes at most the last commit's duration
/// divided by this: a commit that takes long (a slow fsync) is worth a short
/// wait that lets it carry more writes; a fast one is not held back.
pub const COMMIT_DELAY_DIVISOR: u32 = 2;

/// And never longer than this, whatever a commit cost, so that a write's
/// latency stays bounded.
pub const MAX_COMMIT_DELAY: Duration = Duration::from_millis(2);

/// What a backend's commit of a whole batch returns: one result per op of
/// the batch, in order.
pub type BatchResults = Vec<Result<Change, StoreError>>;

/// Ops for the writer, applied in order, and where their results go.
#[derive(Debug)]
pub struct Command {
    ops: Ops,
    reply: oneshot::Sender<Reply>,
}

/// What the writer answers a command: its results (one per op, in order),
/// and how many ops the commit carried (for traces).
#[derive(Debug)]
struct Reply {
    results: Results,
    batch_ops: usize,
}

/// The callers' end of the queue to a writer; cheap to clone.
#[derive(Debug, Clone)]
pub struct Writes {
    sender: mpsc::Sender<Command>,
}

/// A new queue: the callers' end, and the writer's.
pub fn queue() -> (Writes, mpsc::Receiver<Command>) {
    let (sender, receiver) = mpsc::channel(WRITE_QUEUE);
    (Writes { sender }, receiver)
}

impl Writes {
    /// Commands waiting for the writer (sent, not yet taken).
    pub fn queued(&self) -> usize {
        self.sender.max_capacity() - self.sender.capacity()
    }

    /// Sends `ops` to the writer as one command and waits for their results,
    /// one per op. If the writer has stopped, or stops before it answers,
    /// every op fails with [`StoreError::Internal`].
    pub async fn submit(&self, ops: Ops) -> Results {
        let count = ops.len();
        let span = trace::store_span("store.commit", count);
        let (reply, replied) = oneshot::channel();
        let submitted = async {
            if self.sender.send(Command { ops, reply }).await.is_err() {
                return failed(writer_stopped(), count);
            }
            match replied.await {
                Ok(reply) => {
                    if let Some(span) = &span {
                        span.record("batch.ops", reply.batch_ops as i64);
                    }
                    reply.results
                }
                Err(_) => failed(write_dropped(), count),
            }
        };
        match &span {
            Some(span) => submitted.instrument(span.clone()).await,
            None => submitted.await,
        }
    }
}

/// `count` results, each `err`.
fn failed(err: StoreError, count: usize) -> Results {
    std::iter::repeat_n(Err(err), count).collect()
}

/// A write sent after the writer stopped (the store was closed, or the
/// writer died, which it logged).
fn writer_stopped() -> StoreError {
    StoreError::Internal("the store's writer has stopped".into())
}

/// A write the writer took but never answered: it died in the middle.
fn write_dropped() -> StoreError {
    StoreError::Internal("the store's writer stopped before answering".into())
}

impl Command {
    #[cfg(test)]
    pub(crate) fn for_test(ops: Vec<PreparedOp>) -> (Command, ReplyForTest) {
        let (reply, replied) = oneshot::channel();
        let ops = Ops::from_vec(ops);
        (Command { ops, reply }, ReplyForTest(replied))
    }
}

/// The results a [`Command::for_test`] gets.
#[cfg(test)]
pub(crate) struct ReplyForTest(oneshot::Receiver<Reply>);

#[cfg(test)]
impl ReplyForTest {
    pub(crate) fn try_recv(&mut self) -> Result<BatchResults, oneshot::error::TryRecvError> {
        self.0.try_recv().map(|reply| reply.results.into_vec())
    }
}

/// The writer's side of group commit: the feed it publishes to, and what the
/// batching policy remembers from one batch to the next.
#[derive(Debug)]
pub struct GroupCommit {
    /// `None` for a backend whose feed is fed elsewhere: PostgreSQL's tailer
    /// publishes what every replica commits, read back from the database.
    feed: Option<ChangeFeed>,
    stats: WriteStats,
    /// Ops in the previous batch: how many writers were active a moment ago,
    /// and so how many to wait for.
    expected: usize,
    last_commit: Duration,
}

/// The commands of one commit, gathered by [`GroupCommit::start`].
#[derive(Debug)]
pub struct Batch {
    commands: Vec<Command>,
    ops: usize,
    /// Wait for more commands until the batch holds this many ops...
    target: usize,
    /// ...at most this long after the first wait began.
    delay: Duration,
    deadline: Option<Instant>,
}

impl GroupCommit {
    /// A writer that publishes to `feed` (if any) and records its commits
    /// in `stats`.
    pub fn new(feed: Option<ChangeFeed>, stats: WriteStats) -> Self {
        GroupCommit {
            feed,
            stats,
            expected: 0,
            last_commit: Duration::ZERO,
        }
    }

    /// A batch of `first` and every command `waiting` yields without
    /// waiting (`None`: no more right now), up to [`MAX_BATCH_OPS`] ops.
    pub fn start(&self, first: Command, waiting: impl FnMut() -> Option<Command>) -> Batch {
        let mut batch = Batch {
            commands: Vec::new(),
            ops: 0,
            target: self.expected.min(SMALL_BATCH_OPS),
            delay: (self.last_commit / COMMIT_DELAY_DIVISOR).min(MAX_COMMIT_DELAY),
            deadline: None,
        };
        batch.add(first, waiting);
        batch
    }

    /// After the backend's commit of `batch`, which took `took`: publishes
    /// the changes in commit order, then answers each caller with its ops'
    /// results. `outcome` holds one result per op of the batch, or the error
    /// that every op gets when the transaction did not commit.
    ///
    /// # Panics
    /// If `outcome` does not hold one result per op: a bug in the backend.
    pub fn finish(
        &mut self,
        batch: Batch,
        took: Duration,
        outcome: Result<BatchResults, StoreError>,
    ) {
        self.expected = batch.ops;
        self.last_commit = took;
        let results = match outcome {
            Ok(results) => results,
            Err(err) => {
                self.stats.failed(took);
                for command in batch.commands {
                    // A send fails only when the caller has gone away (its
                    // call was cancelled).
                    let _ = command.reply.send(Reply {
                        results: failed(err.clone(), command.ops.len()),
                        batch_ops: batch.ops,
                    });
                }
                return;
            }
        };
        assert_eq!(results.len(), batch.ops, "one result per op");
        self.stats.committed(batch.ops, took, &results);
        // Committed: now, and only now, the feed and then the callers.
        if let Some(feed) = &self.feed {
            for change in results.iter().flatten() {
                feed.publish(change.clone());
            }
        }
        let mut results = results.into_iter();
        for command in batch.commands {
            // Inline for a command of one op: no allocation for its reply.
            let own = results.by_ref().take(command.ops.len()).collect();
            // As above: the write stays committed all the same.
            let _ = command.reply.send(Reply {
                results: own,
                batch_ops: batch.ops,
            });
        }
    }
}

impl Batch {
    /// Adds `command`, then every command `waiting` yields, up to
    /// [`MAX_BATCH_OPS`] ops.
    pub fn add(&mut self, command: Command, mut waiting: impl FnMut() -> Option<Command>) {
        self.push(command);
        while self.ops < MAX_BATCH_OPS {
            match waiting() {
                Some(command) => self.push(command),
                None => break,
            }
        }
    }

    fn push(&mut self, command: Command) {
        self.ops += command.ops.len();
        self.commands.push(command);
    }

    /// Until when to wait for another command before committing, or `None`
    /// to commit now (see the policy in the module doc). The deadline is set
    /// by the first call that waits and stays for the batch.
    pub fn wait_until(&mut self) -> Option<Instant> {
        if self.ops >= self.target {
            return None;
        }
        Some(
            *self
                .deadline
                .get_or_insert_with(|| Instant::now() + self.delay),
        )
    }

    /// Every op of the batch, in the order the commit must apply them.
    pub fn ops(&self) -> impl Iterator<Item = &PreparedOp> {
        self.commands.iter().flat_map(|command| &command.ops)
    }

    /// How many ops the batch holds.
    pub fn len(&self) -> usize {
        self.ops
    }

    pub fn is_empty(&self) -> bool {
        self.ops == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        store::tests::named,
        user::{ChangeKind, User},
    };

    fn delete(id: &str) -> PreparedOp {
        PreparedOp::Delete {
            id: id.into(),
            expected_version: None,
        }
    }

    fn change(seq: u64, id: &str) -> Change {
        Change {
            seq,
            kind: ChangeKind::Created,
            user: User::new(id, &named(id, "N"), 1),
        }
    }

    #[test]
    fn a_batch_takes_what_is_waiting_up_to_the_cap() {
        let group = GroupCommit::new(Some(ChangeFeed::new(16)), WriteStats::default());
        let mut waiting = (0..3).map(|_| Command::for_test(vec![delete("x")]).0);
        let (first, _) = Command::for_test(vec![delete("a"), delete("b")]);
        let batch = group.start(first, || waiting.next());
        assert_eq!(batch.len(), 5);
        let ids: Vec<_> = batch
            .ops()
            .map(|op| match op {
                PreparedOp::Delete { id, .. } => id.as_str(),
                _ => unreachable!(),
            })
            .collect();
        assert_eq!(ids, ["a", "b", "x", "x", "x"]);

        // A command is never split; the cap stops taking more after it.
        let mut waiting = (0..3).map(|_| Command::for_test(vec![delete("x")]).0);
        let (huge, _) = Command::for_test(vec![delete("y"); MAX_BATCH_OPS]);
        let batch = group.start(huge, || waiting.next());
        assert_eq!(batch.len(), MAX_BATCH_OPS);
        assert_eq!(waiting.count(), 3);
    }

    #[test]
    fn a_small_batch_waits_a_fraction_of_the_last_commit() {
        let mut group = GroupCommit::new(Some(ChangeFeed::new(16)), WriteStats::default());
        // Nothing known yet: no wait.
        let (first, _) = Command::for_test(vec![delete("a")]);
        let mut batch = group.start(first, || None);
        assert_eq!(batch.wait_until(), None);
        // After a batch of 3 that took 1 ms: wait up to 0.5 ms for 3 ops.
        let commands: Vec<_> = (0..3)
            .map(|_| Command::for_test(vec![delete("a")]).0)
            .collect();
        let mut commands = commands.into_iter();
        let first = commands.next().unwrap();
        let batch = group.start(first, || commands.next());
        group.finish(
            batch,
            Duration::from_millis(1),
            Ok(vec![Ok(change(1, "a")); 3]),
        );
        let (first, _) = Command::for_test(vec![delete("a")]);
        let before = Instant::now();
        let mut batch = group.start(first, || None);
        let deadline = batch.wait_until().expect("fewer ops than last time");
        assert!(deadline >= before + Duration::from_micros(500));
        assert!(deadline <= Instant::now() + Duration::from_micros(500));
        assert_eq!(batch.wait_until(), Some(deadline), "one deadline a batch");
        batch.add(Command::for_test(vec![delete("b"), delete("c")]).0, || None);
        assert_eq!(batch.wait_until(), None, "as many ops as last time");
        // A slow commit waits at most MAX_COMMIT_DELAY.
        group.finish(
            batch,
            Duration::from_secs(1),
            Ok(vec![Ok(change(2, "a")); 3]),
        );
        let mut batch = group.start(Command::for_test(vec![delete("a")]).0, || None);
        assert!(batch.wait_until().unwrap() <= Instant::now() + MAX_COMMIT_DELAY);
        // After a large batch, a small one waits for SMALL_BATCH_OPS at most.
        let (large, _) = Command::for_test(vec![delete("x"); SMALL_BATCH_OPS]);
        let batch = group.start(large, || None);
        group.finish(
            batch,
            Duration::from_millis(1),
            Ok(vec![Ok(change(3, "a")); SMALL_BATCH_OPS]),
        );
        let mut batch = group.start(
            Command::for_test(vec![delete("x"); SMALL_BATCH_OPS]).0,
            || None,
        );
        assert_eq!(batch.wait_until(), None);
    }

    #[test]
    fn finish_publishes_in_order_then_answers_each_command() {
        let feed = ChangeFeed::new(16);
        let mut published = feed.subscribe();
        let mut group = GroupCommit::new(Some(feed), WriteStats::default());
        let (one, mut one_replied) = Command::for_test(vec![delete("a")]);
        let (two, mut two_replied) = Command::for_test(vec![delete("b"), delete("c")]);
        let mut waiting = Some(two);
        let batch = group.start(one, || waiting.take());
        let failed = Err(StoreError::NotFound("b".into()));
        group.finish(
            batch,
            Duration::ZERO,
            Ok(vec![Ok(change(1, "a")), failed.clone(), Ok(change(2, "c"))]),
        );
        assert_eq!(one_replied.try_recv().unwrap(), [Ok(change(1, "a"))]);
        assert_eq!(
            two_replied.try_recv().unwrap(),
            [failed, Ok(change(2, "c"))]
        );
        assert_eq!(published.try_recv().unwrap().seq, 1);
        assert_eq!(published.try_recv().unwrap().seq, 2);
        assert!(published.try_recv().is_err());

        // A batch that did not commit: every op fails, nothing is published.
        let (one, mut one_replied) = Command::for_test(vec![delete("a"), delete("b")]);
        let batch = group.start(one, || None);
        let err = StoreError::Full("disk".into());
        group.finish(batch, Duration::ZERO, Err(err.clone()));
        assert_eq!(
            one_replied.try_recv().unwrap(),
            [Err(err.clone()), Err(err)]
        );
        assert!(published.try_recv().is_err());
    }

    #[tokio::test]
    async fn submit_fails_every_op_once_the_writer_is_gone() {
        let (writes, receiver) = queue();
        drop(receiver);
        let results = writes
            .submit(smallvec::smallvec![delete("a"), delete("b")])
            .await;
        assert_eq!(
            results.as_slice(),
            [Err(writer_stopped()), Err(writer_stopped())]
        );

        // Taken, then dropped unanswered.
        let (writes, mut receiver) = queue();
        let taken = tokio::spawn(async move { drop(receiver.recv().await) });
        let results = writes.submit(smallvec::smallvec![delete("a")]).await;
        assert_eq!(results.as_slice(), [Err(write_dropped())]);
        taken.await.unwrap();
    }
}
