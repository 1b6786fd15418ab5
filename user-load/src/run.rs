//! A load run from start to report: connect, import what the mode reads
//! (untimed), start the clock, run the mode's workers, gather what they
//! measured, verify, report.

use std::{
    sync::{Arc, atomic::Ordering},
    time::Instant,
};

use sample_users::UserPool;
use tokio::task::JoinSet;
use user_service::proto;

use crate::{
    budget::{self, Budget, Ticket},
    bulk,
    cli::{Mode, Plan},
    connect::{self, Client, Connection, SetupError, Transport, client_on},
    list, progress,
    record::{Clock, Live, Recorder, Timeline},
    report::{Report, RunInfo},
    source::{DataErrors, POOL_SIZE, Source},
    stats::{self, Stats},
    sync, unary,
    verify::{self, VerifyReport},
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
    fn client_of_target(&self, target: usize) -> Client {
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
    fn new(targets: usize) -> Totals {
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

/// Runs the load `plan` describes and reports.
pub async fn run(plan: Plan) -> Result<Report, SetupError> {
    let plan = Arc::new(plan);
    let connections = connect::connect(&plan.target, plan.connections, plan.timeout).await?;
    let data_errors = Arc::new(DataErrors::default());
    let source = match &plan.data {
        Some(path) => Source::file(path, data_errors.clone())
            .map_err(|err| SetupError::Input(format!("--data {}: {err}", path.display())))?,
        None => Source::pool(plan.seed),
    };
    // Ids of this run sort together and apart from other runs'.
    let run_id = format!("ld{:08x}", fastrand::u32(..));
    let mut ctx = Ctx {
        connections,
        budget: Budget::new(plan.total),
        source,
        id_prefix: plan.verify.then(|| run_id.clone()),
        run_id: run_id.clone(),
        live: Arc::default(),
        // Replaced when the clock starts, after the untimed import.
        timeline: Timeline::new(Clock {
            start: Instant::now(),
            warmup: plan.warmup,
        }),
        plan: plan.clone(),
    };

    let get_ids = if plan.prefill > 0 {
        import_users(&ctx, &format!("{run_id}-p"), plan.prefill, plan.seed).await?
    } else {
        Vec::new()
    };

    let clock = Clock {
        start: Instant::now(),
        warmup: plan.warmup,
    };
    ctx.timeline = Timeline::new(clock);
    ctx.budget.start_timers(plan.run_length());
    let unit = match plan.mode {
        Mode::Bulk => "users",
        Mode::Add | Mode::Get => "calls",
        Mode::List => "scans",
        Mode::Sync => "Acks",
    };
    let bar = progress::show(&plan, unit, ctx.live.clone(), ctx.budget.clone());

    let cpu_start = stats::process_cpu();
    let mut totals = Totals::new(plan.target.addr.len());
    match plan.mode {
        Mode::Bulk => bulk::run(&ctx, &mut totals).await,
        Mode::Add => unary::run(&ctx, unary::Kind::Add, &mut totals).await,
        Mode::Get => unary::run(&ctx, unary::Kind::Get(Arc::new(get_ids)), &mut totals).await,
        Mode::List => list::run(&ctx, &mut totals).await,
        Mode::Sync => sync::run(&ctx, &mut totals).await,
    }
    let elapsed = clock.start.elapsed();
    let cpu = stats::process_cpu().saturating_sub(cpu_start);
    ctx.budget.end();
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }

    let outcome = &mut totals.all;
    let bad_lines = data_errors.bad_lines.load(Ordering::Relaxed);
    if bad_lines > 0 {
        let first = data_errors.first.lock().ok().and_then(|f| f.clone());
        outcome.stats.error(format!(
            "{bad_lines} unreadable data line(s) skipped, the first: {}",
            first.unwrap_or_default()
        ));
    }

    let verify = if plan.verify {
        Some(match plan.mode {
            Mode::List => VerifyReport::order(outcome.order_violations, outcome.stats.users),
            Mode::Get => VerifyReport::reads(&outcome.stats),
            Mode::Add | Mode::Bulk | Mode::Sync => {
                // Each target is asked for the users written through it.
                let mut reports = Vec::new();
                for (target, written) in std::mem::take(&mut totals.written).into_iter().enumerate()
                {
                    let mut client = ctx.client_of_target(target);
                    let report = verify::stored(
                        &mut client,
                        ctx.id_prefix.as_deref(),
                        written.ids,
                        written.unlisted_failures,
                    )
                    .await;
                    reports.push((plan.target.addr[target].to_string(), report));
                }
                VerifyReport::combine(reports)
            }
        })
    } else {
        None
    };
    ctx.connections.clear();

    let info = RunInfo {
        interrupted: ctx.budget.interrupted(),
        elapsed,
        cpu,
        series: ctx.timeline.points(elapsed),
    };
    Ok(Report::new(&plan, info, totals, verify))
}

/// gRPC's ALREADY_EXISTS, as a BulkAddUsers row error carries it.
const ALREADY_EXISTS: i32 = 6;

/// Imports `count` users with ids `{prefix}{n}` through BulkAddUsers into
/// every target and returns their ids. Targets may share one store
/// (replicas): a target that already has the users, as the listed row
/// errors show, has them.
async fn import_users(
    ctx: &Ctx,
    prefix: &str,
    count: u64,
    seed: u64,
) -> Result<Vec<String>, SetupError> {
    let pool = UserPool::new(POOL_SIZE, seed);
    let ids: Vec<String> = (0..count).map(|n| format!("{prefix}{n:010}")).collect();
    let rows: Vec<proto::User> = ids
        .iter()
        .enumerate()
        .map(|(n, id)| proto::User {
            id: id.clone(),
            ..pool.get(n as u64).clone()
        })
        .collect();
    for (target, addr) in ctx.plan.target.addr.iter().enumerate() {
        let reply = ctx
            .client_of_target(target)
            .bulk_add_users(futures::stream::iter(rows.clone()))
            .await
            .map_err(|status| {
                SetupError::Unreachable(format!(
                    "importing the {count} users of --prefill into {addr} failed: {}",
                    stats::describe(&status)
                ))
            })?
            .into_inner();
        let present = reply.added + reply.failed == count
            && reply.errors.iter().all(|e| e.code == ALREADY_EXISTS);
        if !present {
            return Err(SetupError::Unreachable(format!(
                "--prefill: {} of {count} users added to {addr}, {} failed{}",
                reply.added,
                reply.failed,
                reply
                    .errors
                    .first()
                    .map(|e| format!(" (the first: {})", e.message))
                    .unwrap_or_default()
            )));
        }
    }
    Ok(ids)
}
