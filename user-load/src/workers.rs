//! What every mode shares, apart from the run that starts the modes: the
//! [`Ctx`] its workers start from, the [`Outcome`] each worker hands back,
//! and the [`Totals`] those add up to, overall and per target. The modes
//! (`bulk.rs`, `unary.rs`, `list.rs`, `sync.rs`) and the report read these
//! types; `run.rs` depends on the modes and on the report, never the other
//! way round.

use std::{sync::Arc, time::Instant};

use tokio::task::JoinSet;

use crate::{
    budget::{self, Budget, Ticket},
    cli::Plan,
    connect::{Client, Connection, Transport, client_on},
    record::{Clock, Live, Recorder, Timeline},
    source::Source,
    stats::Stats,
};

/// Everything a mode needs.
pub struct Ctx {
    pub plan: Arc<Plan>,
    connections: Vec<Connection>,
    pub budget: Arc<Budget>,
    pub source: Source,
    /// Unique to this run: client-chosen ids start with it.
    pub run_id: String,
    /// `Some(run_id)` when `--verify` is on: write modes then choose ids.
    pub id_prefix: Option<String>,
    pub live: Arc<Live>,
    pub timeline: Arc<Timeline>,
}

impl Ctx {
    /// The context of the run `run_id` over `connections`, its timeline
    /// started now: the run replaces it when the clock starts, after the
    /// untimed import.
    pub fn new(
        plan: Arc<Plan>,
        connections: Vec<Connection>,
        source: Source,
        run_id: String,
    ) -> Ctx {
        Ctx {
            connections,
            budget: Budget::new(plan.total),
            source,
            id_prefix: plan.verify.then(|| run_id.clone()),
            run_id,
            live: Arc::default(),
            timeline: Timeline::new(Clock {
                start: Instant::now(),
                warmup: plan.warmup,
            }),
            plan,
        }
    }

    /// Closes every connection.
    pub fn disconnect(&mut self) {
        self.connections.clear();
    }

    /// Worker `i`'s connection: workers are spread evenly over the
    /// connections, and so over the targets.
    fn connection(&self, i: usize) -> &Connection {
        &self.connections[i % self.connections.len()]
    }

    /// Worker `i`'s client.
    pub fn client(&self, i: usize) -> Client {
        client_on(self.connection(i).transport.clone())
    }

    /// Worker `i`'s connection, for calls made without the generated client
    /// (see `list`).
    pub fn channel(&self, i: usize) -> Transport {
        self.connection(i).transport.clone()
    }

    /// The target (index into `--addr`) worker `i` sends to.
    pub fn target(&self, i: usize) -> usize {
        self.connection(i).target
    }

    /// A client on the first connection to `target`.
    pub fn client_of_target(&self, target: usize) -> Client {
        let connection = self
            .connections
            .iter()
            .find(|c| c.target == target)
            .unwrap_or(&self.connections[0]);
        client_on(connection.transport.clone())
    }

    /// A fresh recorder for one worker.
    pub fn recorder(&self) -> Recorder {
        Recorder::new(self.timeline.clone(), self.live.clone())
    }

    /// Open loop: tickets at the `--rps` schedule, queued at most `depth`
    /// deep; `None` for a closed loop.
    pub fn tickets(&self, depth: usize) -> Option<async_channel::Receiver<Ticket>> {
        self.plan.schedule.map(|schedule| {
            budget::pace(
                schedule,
                self.budget.clone(),
                depth,
                self.timeline.clock().start,
            )
        })
    }
}

/// What a worker hands back.
#[derive(Default)]
pub struct Outcome {
    pub stats: Stats,
    /// Ids the server reported stored (only with `--verify`).
    pub stored_ids: Vec<String>,
    /// Rows the server reported failed without saying which (a BulkAddUsers
    /// reply lists only the first 100 failures).
    pub unlisted_failures: u64,
    /// list with `--verify`: users out of strict id order.
    pub order_violations: u64,
}

impl Outcome {
    pub fn of(stats: Stats) -> Outcome {
        Outcome {
            stats,
            ..Outcome::default()
        }
    }

    fn merge(&mut self, other: Outcome) {
        self.stats.merge(other.stats);
        self.stored_ids.extend(other.stored_ids);
        self.unlisted_failures += other.unlisted_failures;
        self.order_violations += other.order_violations;
    }
}

/// The run's outcome, overall and per target.
pub struct Totals {
    pub all: Outcome,
    pub by_target: Vec<Stats>,
    /// What was reported stored through each target, for `--verify`.
    pub written: Vec<Written>,
}

/// The users a target reported stored.
#[derive(Default)]
pub struct Written {
    pub ids: Vec<String>,
    pub unlisted_failures: u64,
}

impl Totals {
    pub fn new(targets: usize) -> Totals {
        Totals {
            all: Outcome::default(),
            by_target: (0..targets).map(|_| Stats::default()).collect(),
            written: (0..targets).map(|_| Written::default()).collect(),
        }
    }

    pub fn add(&mut self, target: usize, mut outcome: Outcome) {
        self.by_target[target].merge(outcome.stats.clone());
        let written = &mut self.written[target];
        written.ids.append(&mut outcome.stored_ids);
        written.unlisted_failures += std::mem::take(&mut outcome.unlisted_failures);
        self.all.merge(outcome);
    }

    /// Waits for every worker (each returning its target and outcome) and
    /// adds up what they report; a worker that panicked is an error.
    pub async fn gather(&mut self, mut workers: JoinSet<(usize, Outcome)>) {
        while let Some(result) = workers.join_next().await {
            match result {
                Ok((target, outcome)) => self.add(target, outcome),
                Err(err) => self.all.stats.error(format!("a worker failed: {err}")),
            }
        }
    }
}
