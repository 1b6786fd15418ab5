//! A load run from start to report: connect, import what the mode reads
//! (untimed), start the clock, run the mode's workers, gather what they
//! measured, verify, report.

use std::{
    sync::{Arc, atomic::Ordering},
    time::Instant,
};

use sample_users::UserPool;
use user_service::proto;

use crate::{
    bulk,
    cli::{Mode, Plan},
    connect::{self, SetupError},
    list, progress,
    record::{Clock, Timeline},
    report::{Report, RunInfo},
    source::{DataErrors, POOL_SIZE, Source},
    stats, sync, unary,
    verify::{self, VerifyReport},
    workers::{Ctx, Totals},
};

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
    let mut ctx = Ctx::new(plan.clone(), connections, source, run_id.clone());

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
    ctx.disconnect();

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
