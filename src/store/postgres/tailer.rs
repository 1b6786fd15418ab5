//! The tailer: the one task of a replica that feeds its change feed, by
//! reading the changelog in seq order after the last seq it has published.
//!
//! Every replica's writes, this one's included, reach its subscribers this
//! way, so every subscriber everywhere sees one sequence. Seqs are handed
//! out in commit order (see `schema`), so when the tailer sees a change it
//! has already seen every one before it: the changelog read in seq order
//! has no holes but those pruning made. A row of the changelog is one
//! commit's changes (see `packed`); the tailer reads the rows after its
//! last seq with one range scan and publishes their changes one by one.
//!
//! What wakes it: this replica's writer after each commit, the database's
//! notification after another replica's (LISTEN, through the connection's
//! message stream), and, as the safety net, a poll every `poll_interval`.
//! Correctness never depends on a notification: a missed one costs latency,
//! not a change. After a lost connection it reconnects with backoff and
//! reads on from its last seq, so open streams go on without a gap.
//!
//! If the next seq it needs was pruned (the replica was cut off from the
//! database for longer than the changelog keeps changes), it publishes a gap:
//! every current subscriber ends with ABORTED, never skipping a change, and
//! the tailer goes on from the oldest change left.
//!
//! If it reads a change it cannot decode (a changelog row another program
//! wrote, see `packed`), it publishes what came before, then ends every
//! subscriber there (`DATA_LOSS`) rather than skip the change, and stops:
//! health turns `NOT_SERVING` and writes stop waiting for it. It reads the
//! same change again each time it is woken, ending whoever subscribed
//! since, until the row is repaired; then it goes on from there.

use std::{
    future::poll_fn,
    sync::{
        Arc,
        atomic::{AtomicI64, AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::{
    sync::{Notify, watch},
    task::JoinHandle,
};
use tokio_postgres::{AsyncMessage, Client, Statement};
use tokio_util::sync::CancellationToken;

use super::{
    Health, Part,
    connect::{Backoff, Connector, Driver, Report, STATEMENT_TIMEOUT},
    packed,
};
use crate::{store::ChangeFeed, user::ChangeKind};

/// Most changes read in one query, but for a single commit of more (up to
/// `MAX_BATCH_OPS`, 8,192): bounds the memory of a read while a replica
/// catches up, and is large enough that a bulk import is read back in few
/// queries.
pub const TAIL_BATCH: i64 = 4096;

/// The channel every replica's commits are announced on (with a payload
/// that names the schema, see `Announce`).
pub const CHANNEL: &str = "user_service_changes";

/// Where committed changes are announced: `pg_notify(channel, payload)`
/// with the payload `SCHEMA:SEQ` (the last seq of the commit), so that a
/// tailer of another schema on the same database, or one that has already
/// read that far, need not read.
#[derive(Debug, Clone)]
pub(super) struct Announce {
    /// `None`: no NOTIFY (an engine without it; tailers poll).
    pub channel: Option<String>,
    /// `SCHEMA:`.
    pub prefix: String,
}

/// Where the tailer is, as the store's writes wait for it (a write is
/// answered once this replica's feed has published it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Position {
    /// The seq of the last change published.
    pub published: u64,
    /// Whether the tailer is connected and reading; while it is not, writes
    /// are answered without waiting for it.
    pub reading: bool,
}

/// Users stored and the last seq, as the changelog tells them across
/// replicas, for the metrics endpoint.
#[derive(Debug, Default)]
pub(super) struct Contents {
    users: AtomicI64,
    last_seq: AtomicU64,
}

impl Contents {
    pub(super) fn new(users: u64, last_seq: u64) -> Self {
        Contents {
            users: AtomicI64::new(users as i64),
            last_seq: AtomicU64::new(last_seq),
        }
    }

    pub(super) fn users(&self) -> u64 {
        self.users.load(Ordering::Relaxed).max(0) as u64
    }

    pub(super) fn last_seq(&self) -> u64 {
        self.last_seq.load(Ordering::Relaxed)
    }
}

/// How the tailer is told about new changes.
#[derive(Debug, Clone)]
pub(super) struct Wakeups {
    /// LISTEN for the database's notifications; off for an engine without
    /// them.
    pub listen: bool,
    /// `SCHEMA:`, the start of the notifications meant for this store.
    pub prefix: String,
    /// The safety net: read at least this often.
    pub poll_interval: Duration,
}

/// What a tailer works with, as the store hands it over when it opens.
pub(super) struct Tailing {
    pub connector: Connector,
    /// Where it publishes the changes it reads.
    pub feed: ChangeFeed,
    /// How far it has published, for the writes that wait for it.
    pub position: watch::Sender<Position>,
    /// Woken by this replica's writer after each commit.
    pub wake: Arc<Notify>,
    pub wakeups: Wakeups,
    /// Where it says whether it is connected.
    pub health: Arc<Health>,
    /// Where it counts users and the last seq, for the metrics.
    pub contents: Arc<Contents>,
    /// The seq of the last change before those it is to publish.
    pub after: u64,
}

/// The running tailer, as the store holds it.
#[derive(Debug)]
pub(super) struct TailerTask {
    task: JoinHandle<()>,
    closing: CancellationToken,
}

impl TailerTask {
    /// Connects and starts reading after `tailing.after`. Connected before
    /// it returns, so that the store's first writes find it reading.
    pub(super) async fn start(tailing: Tailing) -> Result<TailerTask, tokio_postgres::Error> {
        let Tailing {
            connector,
            feed,
            position,
            wake,
            wakeups,
            health,
            contents,
            after,
        } = tailing;
        let closing = CancellationToken::new();
        let tailer = Tailer {
            connector,
            feed,
            position,
            wake,
            wakeups,
            health,
            contents,
            last: after,
            counted_from: after,
            stuck: None,
            closing: closing.clone(),
        };
        let connected = tailer.connect().await?;
        tailer.position.send_modify(|p| p.reading = true);
        Ok(TailerTask {
            task: tokio::spawn(tailer.run(connected)),
            closing,
        })
    }

    pub(super) async fn close(self) {
        self.closing.cancel();
        if let Err(err) = self.task.await {
            tracing::error!(error = %err, "the PostgreSQL tailer task failed");
        }
    }
}

struct Tailer {
    connector: Connector,
    feed: ChangeFeed,
    position: watch::Sender<Position>,
    wake: Arc<Notify>,
    wakeups: Wakeups,
    health: Arc<Health>,
    contents: Arc<Contents>,
    /// The seq of the last change published.
    last: u64,
    /// `contents.users` counts the users at this seq and the changes after
    /// it (a recount after a gap moves it).
    counted_from: u64,
    /// The seq of the next change, while it cannot be decoded.
    stuck: Option<u64>,
    closing: CancellationToken,
}

/// The tailer's connection, its driver task and its read statement.
type Connected = (Client, JoinHandle<()>, Statement);

/// Why reading stopped.
enum Stop {
    Closing,
    Lost(String),
}

impl Tailer {
    async fn run(mut self, connected: Connected) {
        let mut backoff = Backoff::default();
        let mut logged = false;
        let mut first = Some(connected);
        loop {
            let connected = match first.take() {
                Some(connected) => Ok(connected),
                None => tokio::select! {
                    () = self.closing.cancelled() => break,
                    connected = self.connect() => connected,
                },
            };
            let failed = match connected {
                Ok((client, driver, statement)) => {
                    backoff.reset();
                    logged = false;
                    self.set_reading(true);
                    let stop = self.read(&client, &statement, driver).await;
                    self.set_reading(false);
                    match stop {
                        Stop::Closing => break,
                        // A connection that worked is replaced at once.
                        Stop::Lost(reason) => {
                            tracing::warn!(
                                error = %reason,
                                last_seq = self.last,
                                "PostgreSQL tailer lost its connection; reconnecting"
                            );
                            continue;
                        }
                    }
                }
                Err(err) => err,
            };
            if !logged {
                tracing::warn!(
                    target = %self.connector,
                    error = %Report(&failed),
                    last_seq = self.last,
                    "PostgreSQL tailer cannot connect; retrying"
                );
                logged = true;
            }
            tokio::select! {
                () = self.closing.cancelled() => break,
                () = tokio::time::sleep(backoff.next_wait()) => {}
            }
        }
        self.health.set(Part::Tailer, false);
    }

    /// Tells health and the writes that wait for the feed whether the
    /// tailer is reading: while `connected` and not stuck.
    fn set_reading(&self, connected: bool) {
        let reading = connected && self.stuck.is_none();
        self.health.set(Part::Tailer, reading);
        self.position.send_modify(|p| p.reading = reading);
    }

    /// Connects, listens, prepares the read, and starts driving the
    /// connection: notifications for this store wake the tailer.
    async fn connect(&self) -> Result<(Client, JoinHandle<()>, Statement), tokio_postgres::Error> {
        let (client, driver) = self.connector.connect_raw().await?;
        let driver = tokio::spawn(drive(
            driver,
            self.wake.clone(),
            self.wakeups.prefix.clone(),
            self.position.subscribe(),
        ));
        if self.wakeups.listen {
            client.batch_execute(&format!("LISTEN {CHANNEL}")).await?;
        }
        // The batches that end after `$1`, up to `$1 + $2` or the first of
        // them if it ends later: one range scan of the primary key.
        let statement = client
            .prepare(
                "SELECT first_seq, last_seq, changes FROM user_change_batches
                 WHERE last_seq > $1 AND last_seq <= greatest($1 + $2,
                     (SELECT min(last_seq) FROM user_change_batches WHERE last_seq > $1))
                 ORDER BY last_seq",
            )
            .await?;
        Ok((client, driver, statement))
    }

    /// Reads and publishes until the connection is lost or the store
    /// closes. Reads at once (what committed while it was away), then
    /// whenever woken.
    async fn read(
        &mut self,
        client: &Client,
        statement: &Statement,
        mut driver: JoinHandle<()>,
    ) -> Stop {
        loop {
            let after = self.last as i64;
            let params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&after, &TAIL_BATCH];
            let read = tokio::select! {
                () = self.closing.cancelled() => return Stop::Closing,
                read = tokio::time::timeout(STATEMENT_TIMEOUT, client.query(statement, &params)) => read,
            };
            let rows = match read {
                Ok(Ok(rows)) => rows,
                Ok(Err(err)) => return Stop::Lost(Report(&err).to_string()),
                Err(_) => return Stop::Lost("changelog read timed out".into()),
            };
            // Read up to the bound: there may be more.
            let full = self.last as i64 >= after + TAIL_BATCH;
            if let Err(err) = self.publish(client, &rows).await {
                return Stop::Lost(Report(&err).to_string());
            }
            // Stuck, it reads again only when woken, as when idle.
            if full && self.stuck.is_none() {
                continue;
            }
            tokio::select! {
                () = self.closing.cancelled() => return Stop::Closing,
                () = self.wake.notified() => {}
                () = tokio::time::sleep(self.wakeups.poll_interval) => {}
                _ = &mut driver => return Stop::Lost("connection closed".into()),
            }
        }
    }

    /// Publishes the changes of the batches read, in seq order; a gap before
    /// a batch is published as such, and a change that cannot be decoded
    /// ends the subscribers there (see the module doc).
    async fn publish(
        &mut self,
        client: &Client,
        rows: &[tokio_postgres::Row],
    ) -> Result<(), tokio_postgres::Error> {
        let mut users = 0;
        for row in rows {
            let first = row.try_get::<_, i64>(0)? as u64;
            let last = row.try_get::<_, i64>(1)? as u64;
            let changes: &[u8] = row.try_get(2)?;
            if first > self.last + 1 {
                // The gap recounts the users: those counted so far first.
                self.contents.users.fetch_add(users, Ordering::Relaxed);
                users = 0;
                self.gap(client, first).await?;
            }
            let (feed, counted_from, mut published) = (&self.feed, self.counted_from, self.last);
            let unpacked = packed::unpack(changes, first, last, |change| {
                // A batch read again, after one of its changes could not
                // be decoded, goes on from the last change published.
                if change.seq <= published {
                    return;
                }
                if change.seq > counted_from {
                    users += match change.kind {
                        ChangeKind::Created => 1,
                        ChangeKind::Deleted => -1,
                        ChangeKind::Updated => 0,
                    };
                }
                published = change.seq;
                feed.publish(change);
            });
            self.last = published;
            if let Err(unreadable) = unpacked {
                self.unreadable(unreadable.seq, &unreadable.detail);
                break;
            }
        }
        self.contents.users.fetch_add(users, Ordering::Relaxed);
        self.contents.last_seq.store(self.last, Ordering::Relaxed);
        let last = self.last;
        self.position.send_modify(|p| p.published = last);
        if let Some(seq) = self.stuck.filter(|&seq| last >= seq) {
            tracing::info!(
                seq,
                "the changelog's change {seq} reads again; the change feed goes on"
            );
            self.stuck = None;
            self.set_reading(true);
        }
        Ok(())
    }

    /// Change `seq`, next in line, cannot be decoded (`detail` says why):
    /// every subscriber is ended when it gets there, nothing after it is
    /// published, and the tailer reports itself stuck (once) until it reads.
    fn unreadable(&mut self, seq: u64, detail: &str) {
        if self.stuck != Some(seq) {
            tracing::error!(
                seq,
                %detail,
                "a change in the changelog cannot be read; this replica's SyncUsers streams \
                 end there and its change feed stops until the row is repaired \
                 (see docs/scale-out.md)"
            );
            self.stuck = Some(seq);
            self.set_reading(true);
        }
        self.feed.publish_unreadable(seq);
    }

    /// The changes after `self.last` and before `next` are gone (pruned):
    /// every current subscriber is ended when it gets here, and the users
    /// are counted again.
    async fn gap(&mut self, client: &Client, next: u64) -> Result<(), tokio_postgres::Error> {
        tracing::warn!(
            first = self.last + 1,
            last = next - 1,
            "changes were pruned from the changelog before this replica read them; \
             ending its SyncUsers streams"
        );
        self.feed.publish_gap(self.last + 1, next - 1);
        let row = client
            .query_one(
                "SELECT (SELECT seq FROM user_change_seq), (SELECT count(*) FROM users)",
                &[],
            )
            .await?;
        let (seq, users): (i64, i64) = (row.try_get(0)?, row.try_get(1)?);
        self.contents.users.store(users, Ordering::Relaxed);
        self.counted_from = seq as u64;
        self.last = next - 1;
        Ok(())
    }
}

/// Drives the tailer's connection until it ends, waking the tailer for each
/// notification about this store past what it has published.
async fn drive(
    mut driver: Driver,
    wake: Arc<Notify>,
    prefix: String,
    position: watch::Receiver<Position>,
) {
    loop {
        match poll_fn(|cx| driver.poll_message(cx)).await {
            Some(Ok(AsyncMessage::Notification(note))) => {
                let seq = note
                    .payload()
                    .strip_prefix(&prefix)
                    .and_then(|seq| seq.parse::<u64>().ok());
                if seq.is_some_and(|seq| seq > position.borrow().published) {
                    wake.notify_one();
                }
            }
            Some(Ok(_)) => {}
            Some(Err(err)) => {
                tracing::debug!(error = %Report(&err), "PostgreSQL tailer connection ended");
                return;
            }
            None => return,
        }
    }
}
