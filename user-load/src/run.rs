//! A load run from start to report: connect, import what the mode reads
//! (untimed), wait for `--start-at`, start the clock, run the mode's
//! workers, gather what they measured, verify, report.

use std::{
    sync::{Arc, atomic::Ordering},
    time::SystemTime,
};

use sample_users::UserPool;
use user_service::proto;

use crate::{
    bulk,
    cli::{Mode, Plan},
    connect::{self, SetupError},
    list, progress,
    report::{Measured, Report, TargetMeasured},
    series::{Clock, Timeline},
    source::{DataErrors, POOL_SIZE, Source},
    stats, sync, unary,
    verify::{self, VerifyReport, Written},
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
    if let Some(at) = plan.target.start_at {
        wait_until(at).await?;
    }

    let clock = Clock::now(plan.warmup);
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
                let written = std::mem::take(&mut totals.written)
                    .into_iter()
                    .enumerate()
                    .map(|(target, stored)| Written {
                        addr: plan.target.addr[target].to_string(),
                        client: ctx.client_of_target(target),
                        stored,
                    })
                    .collect();
                verify::stored(written, ctx.id_prefix.as_deref()).await
            }
        })
    } else {
        None
    };
    ctx.disconnect();

    let targets = plan
        .target
        .addr
        .iter()
        .zip(totals.by_target)
        .enumerate()
        .map(|(i, (addr, stats))| TargetMeasured {
            addr: addr.to_string(),
            connections: (0..plan.connections)
                .filter(|c| c % plan.target.addr.len() == i)
                .count(),
            stats,
            outages: ctx.targets.outages(i, clock.start),
        })
        .collect();
    let measured = Measured {
        mode: plan.mode,
        command: plan.command_line.clone(),
        targets,
        concurrency: plan.concurrency,
        connections: plan.connections,
        watchers: plan.watchers,
        schedule: plan.schedule.map(|s| s.describe()),
        span: ctx.timeline.span(elapsed),
        interrupted: ctx.budget.interrupted(),
        cpu_s: cpu.as_secs_f64(),
        pacer_cpu_s: plan
            .schedule
            .map(|_| ctx.pacer.cpu_ns.load(Ordering::Relaxed) as f64 / 1e9),
        generators: 1,
        stats: totals.all.stats,
        slots: ctx.timeline.slots(),
        verify,
        token_file: plan
            .target
            .conn
            .auth_token_file
            .as_ref()
            .map(|p| p.display().to_string()),
    };
    Ok(Report::new(measured, &plan.output.fail_if))
}

/// Waits until `at` on the wall clock, so that generators on several
/// machines start together; a time already past is refused, as starting
/// late would misalign them.
async fn wait_until(at: SystemTime) -> Result<(), SetupError> {
    match at.duration_since(SystemTime::now()) {
        Ok(wait) => {
            tokio::time::sleep(wait).await;
            Ok(())
        }
        Err(past) => Err(SetupError::Input(format!(
            "--start-at: that time passed {:.3} s ago, before connecting and any --prefill \
             were done: give a later one",
            past.duration().as_secs_f64(),
        ))),
    }
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
