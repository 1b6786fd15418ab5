//! The PostgreSQL store: users in one database shared by any number of
//! identical, stateless replicas of the server, with one gapless change
//! feed across them.
//!
//! A call reads down these files:
//!
//! - here, [`PostgresStore`]: opening, closing, and each [`Store`] method
//!   handing its work to the writer or to the read pool;
//! - `connect`: the connection settings (URL, `PG*` variables), TLS (as
//!   libpq's `sslmode` says, in `tls`), the read pool, what counts as a lost connection, the reconnection backoff;
//! - `schema`: the tables, created and migrated by the program, and the
//!   refusal of a newer schema;
//! - `writer`: this replica's one write connection and group commit over
//!   it, reconnecting when the database comes back;
//! - `apply`: one batch in one transaction, its seqs taken from the counter
//!   row and its changes appended to the changelog as one row; `copy`: long
//!   runs of creates through binary `COPY`; `packed`: a commit's changes as
//!   the changelog holds them (protobuf);
//! - `tailer`: the task that reads the changelog in seq order, unpacks
//!   each commit's changes, and feeds this
//!   replica's change feed, every replica's writes this one's included, and
//!   how commits are announced to it;
//! - `prune`: keeping the changelog bounded;
//! - `read`: GetUser and listing pages on pooled connections;
//! - `rows`: decoding the users the database holds, for the writer and the
//!   reader.
//!
//! A write is answered once it has committed (as the database's
//! `synchronous_commit` has it) and this replica's tailer has published it,
//! so that a SyncUsers stream on this replica sees its own op's Change right
//! after its Ack, as with the other stores; another replica's subscribers see
//! it a moment later, in the same place in the same sequence.

mod apply;
mod connect;
mod copy;
mod packed;
mod prune;
mod read;
mod rows;
mod schema;
mod tailer;
mod tls;
mod writer;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use deadpool_postgres::Pool;
use parking_lot::Mutex;
use prometheus_client::encoding::DescriptorEncoder;
use tokio::{
    sync::{Notify, watch},
    task::JoinHandle,
};
use tokio_util::sync::CancellationToken;

pub use connect::{
    CONNECT_TIMEOUT, ConfigError, Connector, MAX_BACKOFF, MAX_READERS, MIN_BACKOFF,
    STATEMENT_TIMEOUT,
};
pub use prune::{DEFAULT_RETENTION, PRUNE_BATCH, Retention};
pub use schema::{OpenError, SCHEMA_VERSION, VERSION_TABLE};
pub use tailer::{CHANNEL, TAIL_BATCH};
pub use tls::SslMode;

use self::{
    tailer::{Announce, Contents, Position, TailerTask, Tailing, Wakeups},
    writer::WriterTask,
};
use super::{
    ChangeFeed, ListFilter, Ops, Page, Results, Store, StoreError, StoreHealth, Subscription,
    group_commit::{self, WriteStats, Writes},
    write_stats,
};
use crate::user::User;

/// How often the tailer reads the changelog when nothing woke it: the
/// safety net under notifications, and the feed's latency where there are
/// none (`notify: false`).
pub const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(200);

/// How long a write's answer waits for this replica's tailer to publish it.
/// The tailer reads within a round trip of the commit; this only bounds the
/// wait when the database goes away right after a commit (the write is
/// committed and is answered so; the feed catches up when it is back).
pub const FEED_WAIT: Duration = Duration::from_secs(2);

/// How to open a [`PostgresStore`].
#[derive(Debug, Clone)]
pub struct PostgresOptions {
    /// How far a change-feed subscriber may fall behind before it is cut off
    /// (see [`ChangeFeed`]).
    pub feed_capacity: usize,
    /// How much of the changelog to keep.
    pub retention: Retention,
    /// Whether commits notify the tailers (NOTIFY/LISTEN). Off for an engine
    /// without them: tailers then find changes by polling alone.
    pub notify: bool,
    /// How often tailers read the changelog when not woken.
    pub poll_interval: Duration,
}

impl PostgresOptions {
    pub fn new(feed_capacity: usize) -> Self {
        PostgresOptions {
            feed_capacity,
            retention: DEFAULT_RETENTION,
            notify: true,
            poll_interval: DEFAULT_POLL_INTERVAL,
        }
    }
}

/// Users in a PostgreSQL database shared by replicas.
///
/// A cheap handle: clones share the writer, the tailer, the pool and the
/// feed.
#[derive(Debug, Clone)]
pub struct PostgresStore {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    connector: Connector,
    pool: Pool,
    writes: Writes,
    /// The writer's commits, for the metrics endpoint.
    stats: WriteStats,
    /// Users and the last seq as the tailer reads them (every replica's
    /// changes).
    contents: Arc<Contents>,
    feed: ChangeFeed,
    position: watch::Receiver<Position>,
    health: watch::Receiver<StoreHealth>,
    health_parts: Arc<Health>,
    /// Taken by the first `close`.
    tasks: Mutex<Option<Tasks>>,
    schema: String,
}

#[derive(Debug)]
struct Tasks {
    writer: WriterTask,
    tailer: TailerTask,
    prune: JoinHandle<()>,
    stop_pruning: CancellationToken,
}

/// The parts of a replica that must be connected for it to serve.
#[derive(Debug, Clone, Copy)]
pub(super) enum Part {
    Writer,
    Tailer,
}

/// The store's health, from its parts: serving while the writer and the
/// tailer are both connected.
#[derive(Debug)]
pub(super) struct Health {
    sender: watch::Sender<StoreHealth>,
    writer: AtomicBool,
    tailer: AtomicBool,
}

impl Health {
    fn new() -> (Arc<Health>, watch::Receiver<StoreHealth>) {
        let (sender, receiver) = watch::channel(StoreHealth::Serving);
        let health = Health {
            sender,
            writer: AtomicBool::new(true),
            tailer: AtomicBool::new(true),
        };
        (Arc::new(health), receiver)
    }

    pub(super) fn set(&self, part: Part, up: bool) {
        match part {
            Part::Writer => self.writer.store(up, Ordering::SeqCst),
            Part::Tailer => self.tailer.store(up, Ordering::SeqCst),
        }
        let serving = self.writer.load(Ordering::SeqCst) && self.tailer.load(Ordering::SeqCst);
        let health = if serving {
            StoreHealth::Serving
        } else {
            StoreHealth::NotServing
        };
        self.sender.send_if_modified(|current| {
            let changed = *current != health;
            *current = health;
            changed
        });
    }
}

impl PostgresStore {
    /// Connects to the database at `url` (see [`Connector::from_url`]),
    /// creates or migrates the schema (or refuses it), and starts the
    /// writer, the tailer and pruning. Fails if the database cannot be
    /// reached now; once open, the store rides out the database going away.
    pub async fn open(url: &str, options: PostgresOptions) -> Result<PostgresStore, OpenError> {
        let connector = Connector::from_url(url)?;
        Self::open_with(connector, options).await
    }

    /// [`PostgresStore::open`] with the settings already made.
    pub async fn open_with(
        connector: Connector,
        options: PostgresOptions,
    ) -> Result<PostgresStore, OpenError> {
        let target = connector.to_string();
        let mut client = connector
            .connect()
            .await
            .map_err(|err| OpenError::postgres(&target, err))?;
        let opened = schema::migrate(&mut client, &target).await?;
        drop(client);
        tracing::info!(
            target = %target,
            schema = %opened.schema,
            version = SCHEMA_VERSION,
            seq = opened.seq,
            users = opened.users,
            notify = options.notify,
            "opened PostgreSQL store"
        );
        let feed = ChangeFeed::new(options.feed_capacity);
        let (writes, receiver) = group_commit::queue();
        let (health_parts, health) = Health::new();
        let stats = WriteStats::default();
        let contents = Arc::new(Contents::new(opened.users, opened.seq));
        let (position_sender, position) = watch::channel(Position {
            published: opened.seq,
            reading: false,
        });
        let wake = Arc::new(Notify::new());
        let prefix = format!("{}:", opened.schema);
        let announce = Announce {
            channel: options.notify.then(|| tailer::CHANNEL.to_owned()),
            prefix: prefix.clone(),
        };
        // Connected now, so that the first writes find the writer ready.
        let session = writer::Session::open(&connector, &announce)
            .await
            .map_err(|err| OpenError::postgres(&target, err))?;
        let tailer = TailerTask::start(Tailing {
            connector: connector.clone(),
            feed: feed.clone(),
            position: position_sender,
            wake: wake.clone(),
            wakeups: Wakeups {
                listen: options.notify,
                prefix,
                poll_interval: options.poll_interval,
            },
            health: health_parts.clone(),
            contents: contents.clone(),
            after: opened.seq,
        })
        .await
        .map_err(|err| OpenError::postgres(&target, err))?;
        let writer = WriterTask::spawn(
            session,
            connector.clone(),
            receiver,
            stats.clone(),
            health_parts.clone(),
            announce,
            wake,
        );
        let pool = connector.pool();
        let stop_pruning = CancellationToken::new();
        let prune = prune::spawn(pool.clone(), options.retention, stop_pruning.clone());
        Ok(PostgresStore {
            shared: Arc::new(Shared {
                connector,
                pool,
                writes,
                stats,
                contents,
                feed,
                position,
                health,
                health_parts,
                tasks: Mutex::new(Some(Tasks {
                    writer,
                    tailer,
                    prune,
                    stop_pruning,
                })),
                schema: opened.schema,
            }),
        })
    }

    /// The seq of the last change this replica's feed has published.
    pub fn last_seq(&self) -> u64 {
        self.shared.contents.last_seq()
    }

    /// The schema the store's tables are in.
    pub fn schema(&self) -> &str {
        &self.shared.schema
    }

    /// Where the store connects, without the password.
    pub fn target(&self) -> String {
        self.shared.connector.to_string()
    }
}

impl Store for PostgresStore {
    /// One command to the writer (the ops share its next commit), then a
    /// wait until this replica's feed has published what they committed
    /// (see [`FEED_WAIT`]).
    async fn write(&self, ops: Ops) -> Results {
        let results = self.shared.writes.submit(ops).await;
        if let Some(seq) = results.iter().flatten().map(|c| c.seq).max() {
            let mut position = self.shared.position.clone();
            let published = position.wait_for(|p| p.published >= seq || !p.reading);
            // A timeout or a closed tailer: the write is committed all the
            // same, and is answered so.
            let _ = tokio::time::timeout(FEED_WAIT, published).await;
        }
        results
    }

    async fn get(&self, id: &str) -> Result<User, StoreError> {
        read::get(&self.shared.pool, id).await
    }

    async fn list_page(
        &self,
        filter: ListFilter,
        after: Option<&str>,
        max: usize,
    ) -> Result<Page, StoreError> {
        read::list_page(&self.shared.pool, filter, after, max).await
    }

    fn subscribe(&self) -> Subscription {
        self.shared.feed.subscribe()
    }

    /// Not serving while the writer or the tailer is cut off from the
    /// database (they reconnect by themselves), and once the store is
    /// closed.
    fn health(&self) -> watch::Receiver<StoreHealth> {
        self.shared.health.clone()
    }

    /// `user_service_users` and `user_service_last_seq` are what this
    /// replica's tailer has read: every replica's changes, up to the last
    /// one it has published (the users counted when the store opened, plus
    /// the changes read since). The write figures are this replica's
    /// writer's own.
    fn encode_metrics(&self, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let contents = &self.shared.contents;
        write_stats::encode_contents(encoder, contents.users(), contents.last_seq())?;
        self.shared
            .stats
            .encode_commits(encoder, &self.shared.writes)
    }

    /// Has the writer commit the writes already queued, then stops the
    /// tailer and pruning and closes every connection. The first call
    /// closes; later calls return at once.
    async fn close(&self) {
        let Some(tasks) = self.shared.tasks.lock().take() else {
            return;
        };
        tasks.writer.close().await;
        tasks.tailer.close().await;
        tasks.stop_pruning.cancel();
        let _ = tasks.prune.await;
        self.shared.pool.close();
        self.shared.health_parts.set(Part::Writer, false);
    }
}
