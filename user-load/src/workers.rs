//! What every mode shares, apart from the run that starts the modes: the
//! [`Ctx`] its workers start from, the [`Outcome`] each worker hands back,
//! and the [`Totals`] those add up to, overall and per target. The modes
//! (`bulk.rs`, `unary.rs`, `list.rs`, `sync.rs`) and the report read these
//! types; `run.rs` depends on the modes and on the report, never the other
//! way round.

use std::sync::Arc;

use tokio::task::JoinSet;

use crate::{
    budget::Budget,
    cli::Plan,
    connect::{Client, Connection, Transport, client_on},
    pacer::{self, Tickets},
    record::{Live, Recorder},
    series::{Clock, Timeline},
    source::Source,
    stats::Stats,
    targets::Targets,
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
    /// Which targets are up, and their outages.
    pub targets: Arc<Targets>,
    /// Open loop: what the pacer shares with the workers.
    pub pacer: Arc<pacer::Shared>,
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
        let budget = Budget::new(plan.total);
        let targets = Targets::new(
            plan.target.addr.len(),
            connections
                .iter()
                .map(|c| (c.target, c.transport.clone()))
                .collect(),
            budget.clone(),
            plan.timeout,
        );
        Ctx {
            connections,
            budget,
            targets,
            pacer: Arc::default(),
            source,
            id_prefix: plan.verify.then(|| run_id.clone()),
            run_id,
            live: Arc::default(),
            timeline: Timeline::new(Clock::now(plan.warmup)),
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
    pub fn tickets(&self, depth: usize) -> Option<Tickets> {
        self.plan.schedule.map(|schedule| {
            pacer::pace(
                schedule,
                self.budget.clone(),
                depth,
                self.timeline.clock().start,
                self.pacer.clone(),
            )
        })
    }
}

/// What a worker hands back.
#[derive(Default)]
pub struct Outcome {
    pub stats: Stats,
    /// What the server reported stored (only with `--verify`).
    pub stored: Vec<Stored>,
    /// list with `--verify`: users out of strict id order.
    pub order_violations: u64,
}

/// Users the server reported stored: `added` of these `ids`. Every id is
/// stored when they are equal; a BulkAddUsers reply that failed more rows
/// than it lists (it lists the first 100) leaves some of its stream's ids
/// unknown, and only says how many of them were added.
#[derive(Debug, Default)]
pub struct Stored {
    pub ids: Vec<String>,
    pub added: u64,
}

impl Stored {
    /// Ids each reported stored.
    pub fn each(ids: Vec<String>) -> Stored {
        Stored {
            added: ids.len() as u64,
            ids,
        }
    }
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
        self.order_violations += other.order_violations;
    }
}

/// The run's outcome, overall and per target.
pub struct Totals {
    pub all: Outcome,
    pub by_target: Vec<Stats>,
    /// What was reported stored through each target, for `--verify`.
    pub written: Vec<Vec<Stored>>,
}

impl Totals {
    pub fn new(targets: usize) -> Totals {
        Totals {
            all: Outcome::default(),
            by_target: (0..targets).map(|_| Stats::default()).collect(),
            written: (0..targets).map(|_| Vec::new()).collect(),
        }
    }

    pub fn add(&mut self, target: usize, mut outcome: Outcome) {
        self.by_target[target].merge(outcome.stats.clone());
        self.written[target].append(&mut outcome.stored);
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
