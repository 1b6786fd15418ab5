//! The command line checked into one [`Plan`]: the checks that involve
//! several flags, the defaults that depend on others, and the `--rps`
//! schedule.

use std::{path::PathBuf, time::Duration};

use clap::{CommandFactory, Parser, error::ErrorKind};

use super::{
    CallArgs, Cli, Command, DEFAULT_DURATION, GenArgs, MergeArgs, OutputArgs, PaceArgs,
    ScheduleKind, SinkArgs, TargetArgs,
};

/// The load modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Bulk,
    Add,
    Get,
    List,
    Sync,
}

impl Mode {
    pub fn name(self) -> &'static str {
        match self {
            Mode::Bulk => "bulk",
            Mode::Add => "add",
            Mode::Get => "get",
            Mode::List => "list",
            Mode::Sync => "sync",
        }
    }
}

/// An open-loop rate over time.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Schedule {
    Const(u32),
    /// Linear from `from` to `to` over `over`.
    Ramp {
        from: u32,
        to: u32,
        over: Duration,
    },
    /// `from`, then `step` more (or less, towards `to`) every `every`.
    Step {
        from: u32,
        to: u32,
        step: u32,
        every: Duration,
    },
}

impl Schedule {
    /// Calls per second due at `t` into the run.
    pub fn rate_at(&self, t: Duration) -> f64 {
        match *self {
            Schedule::Const(rate) => f64::from(rate),
            Schedule::Ramp { from, to, over } => {
                let done = (t.as_secs_f64() / over.as_secs_f64().max(1e-9)).min(1.0);
                f64::from(from) + (f64::from(to) - f64::from(from)) * done
            }
            Schedule::Step {
                from,
                to,
                step,
                every,
            } => {
                let steps = (t.as_secs_f64() / every.as_secs_f64()).floor();
                let change = f64::from(step) * steps;
                if to >= from {
                    (f64::from(from) + change).min(f64::from(to))
                } else {
                    (f64::from(from) - change).max(f64::from(to))
                }
            }
        }
    }

    pub fn describe(&self) -> String {
        match *self {
            Schedule::Const(rate) => format!("{rate}/s"),
            Schedule::Ramp { from, to, over } => {
                format!("ramp {from}/s to {to}/s over {:.0?}", over)
            }
            Schedule::Step {
                from,
                to,
                step,
                every,
            } => format!("{from}/s to {to}/s in steps of {step}/s every {every:.0?}"),
        }
    }
}

/// One load run, as every mode reads it.
#[derive(Debug, Clone)]
pub struct Plan {
    pub mode: Mode,
    pub target: TargetArgs,
    /// Connections: at least one per target.
    pub connections: usize,
    /// Workers (add, get), streams (bulk), scanners (list), or upserts in
    /// flight on the one stream (sync).
    pub concurrency: usize,
    pub total: Option<u64>,
    /// The measured part of the run; `None`: bounded by `total` or the data.
    pub duration: Option<Duration>,
    pub warmup: Duration,
    pub timeout: Duration,
    pub schedule: Option<Schedule>,
    pub data: Option<PathBuf>,
    pub seed: u64,
    pub verify: bool,
    pub per_stream: Option<u64>,
    pub prefill: u64,
    pub limit: u32,
    pub watchers: usize,
    pub output: OutputArgs,
    /// The command as given, for the reports.
    pub command_line: String,
}

impl Plan {
    /// Warm-up plus the measured duration, when time bounds the run.
    pub fn run_length(&self) -> Option<Duration> {
        self.duration.map(|d| d + self.warmup)
    }
}

/// What to do, once the command line is known to make sense.
pub enum Action {
    Load(Box<Plan>),
    Gen(GenArgs),
    Sink(SinkArgs),
    Merge(MergeArgs),
    Copy(crate::copy::CopyArgs),
}

/// A usage error, printed by clap as `error: ...` with exit status 2.
fn usage(message: impl std::fmt::Display) -> clap::Error {
    Cli::command().error(ErrorKind::ArgumentConflict, message)
}

impl Cli {
    /// Parses `args` (the program name first) and checks what clap cannot.
    pub fn action_from<I, T>(args: I) -> Result<Action, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let args: Vec<std::ffi::OsString> = args.into_iter().map(Into::into).collect();
        let command_line = args
            .iter()
            .skip(1)
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ");
        let cli = Cli::try_parse_from(args)?;
        let base = |mode, target: TargetArgs, output: OutputArgs, timeout| Plan {
            mode,
            connections: 0,
            target,
            concurrency: 1,
            total: None,
            duration: None,
            warmup: Duration::ZERO,
            timeout,
            schedule: None,
            data: None,
            seed: 1,
            verify: false,
            per_stream: None,
            prefill: 0,
            limit: 0,
            watchers: 0,
            output,
            command_line: format!("user-load {command_line}"),
        };
        let calls = |mode, target, output, calls: CallArgs| Plan {
            concurrency: calls.concurrency as usize,
            total: calls.total,
            duration: calls.duration,
            ..base(mode, target, output, calls.timeout)
        };
        let plan = match cli.command {
            Command::Gen(args) => return Ok(Action::Gen(args)),
            Command::Copy(args) => return Ok(Action::Copy(args)),
            Command::Sink(args) => return Ok(Action::Sink(args)),
            Command::Merge(args) => return Ok(Action::Merge(args)),
            Command::Bulk(a) => Plan {
                concurrency: a.concurrency as usize,
                total: a.total,
                duration: a.duration,
                per_stream: a.per_stream,
                data: a.users.data,
                seed: a.users.seed,
                verify: a.users.verify,
                ..base(Mode::Bulk, a.target, a.output, a.timeout)
            },
            Command::Add(a) => Plan {
                data: a.users.data,
                seed: a.users.seed,
                verify: a.users.verify,
                ..pace(calls(Mode::Add, a.target, a.output, a.calls), &a.pace)?
            },
            Command::Get(a) => Plan {
                prefill: a.prefill,
                seed: a.seed,
                verify: a.verify,
                ..pace(calls(Mode::Get, a.target, a.output, a.calls), &a.pace)?
            },
            Command::List(a) => Plan {
                concurrency: a.concurrency as usize,
                total: a.total,
                duration: a.duration,
                limit: a.limit.unwrap_or(0),
                prefill: a.prefill,
                seed: a.seed,
                verify: a.verify,
                ..base(Mode::List, a.target, a.output, a.timeout)
            },
            Command::Sync(a) => Plan {
                concurrency: a.in_flight as usize,
                watchers: a.watchers as usize,
                total: a.total,
                duration: a.duration,
                data: a.users.data,
                seed: a.users.seed,
                verify: a.users.verify,
                ..pace(base(Mode::Sync, a.target, a.output, a.timeout), &a.pace)?
            },
        };
        finish(plan).map(|plan| Action::Load(Box::new(plan)))
    }
}

/// Fills in the rate schedule and warm-up from `--rps` and its friends.
fn pace(mut plan: Plan, pace: &PaceArgs) -> Result<Plan, clap::Error> {
    plan.warmup = pace.warmup.unwrap_or_default();
    let Some(rps) = pace.rps else {
        return Ok(plan);
    };
    let kind = pace.schedule.unwrap_or(ScheduleKind::Const);
    let schedule = match (kind, pace.rps_end, pace.rps_step, pace.step_every) {
        (ScheduleKind::Const, None, None, None) => Schedule::Const(rps),
        (ScheduleKind::Const, ..) => {
            return Err(usage(
                "--rps-end, --rps-step and --step-every need --schedule ramp or step",
            ));
        }
        // The length is filled in by `finish`, once the duration is known.
        (ScheduleKind::Ramp, Some(to), None, None) => Schedule::Ramp {
            from: rps,
            to,
            over: Duration::ZERO,
        },
        (ScheduleKind::Ramp, None, _, _) => {
            return Err(usage("--schedule ramp needs --rps-end, the last rate"));
        }
        (ScheduleKind::Ramp, ..) => {
            return Err(usage(
                "--rps-step and --step-every are for --schedule step, not ramp",
            ));
        }
        (ScheduleKind::Step, Some(to), Some(step), Some(every)) => Schedule::Step {
            from: rps,
            to,
            step,
            every,
        },
        (ScheduleKind::Step, ..) => {
            return Err(usage(
                "--schedule step needs --rps-end, --rps-step and --step-every",
            ));
        }
    };
    plan.schedule = Some(schedule);
    Ok(plan)
}

/// The checks that involve several flags, and the defaults that depend on
/// them.
fn finish(mut plan: Plan) -> Result<Plan, clap::Error> {
    let target = &plan.target;
    target.conn.check().map_err(usage)?;
    let targets = target.addr.len();
    plan.connections = match target.connections {
        None => targets,
        Some(n) if (n as usize) < targets => {
            return Err(usage(format!(
                "--connections {n} is fewer than the {targets} addresses of --addr: \
                 each needs at least one"
            )));
        }
        Some(n) => n as usize,
    };
    if plan.duration.is_none() && plan.total.is_none() && plan.data.is_none() {
        plan.duration = Some(DEFAULT_DURATION);
    }
    if let Some(Schedule::Ramp { over, .. }) = &mut plan.schedule {
        match plan.duration.map(|d| d + plan.warmup) {
            Some(length) => *over = length,
            None => {
                return Err(usage(
                    "--schedule ramp spans the run's --duration: give one instead of --total or --data",
                ));
            }
        }
    }
    Ok(plan)
}
