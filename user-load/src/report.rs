//! The report of a run: its figures (as text or `--json`), what each one
//! measures, and the verdict: whether the run did its work, which
//! `--fail-if` conditions held, and so the exit status.

use std::{collections::BTreeMap, fmt::Write as _, time::Duration};

use serde::Serialize;

use crate::{
    budget::EXIT_INTERRUPTED,
    cli::{Mode, Plan},
    record::Point,
    stats::{Bucket, ErrorKind, Latency, Stats, buckets},
    threshold::{Figures, Verdict},
    verify::VerifyReport,
    workers::Totals,
};

/// Exit status of a run that could not do its work.
pub const EXIT_FAILED: u8 = 1;

/// Exit status of a run in which a `--fail-if` condition held (k6 uses the
/// same for its thresholds).
pub const EXIT_THRESHOLD: u8 = 99;

/// The figures of one target, when there are several.
#[derive(Debug, Clone, Serialize)]
pub struct TargetReport {
    pub addr: String,
    pub connections: usize,
    pub calls: u64,
    pub ok_calls: u64,
    pub failed_calls: u64,
    pub ok_calls_per_s: f64,
    pub users: u64,
    pub latency: Option<Latency>,
    pub propagation: Option<Latency>,
}

/// What each latency of the report measures, in words.
#[derive(Debug, Clone, Serialize)]
pub struct Measures {
    pub calls: &'static str,
    pub latency: &'static str,
    pub propagation: Option<&'static str>,
    pub reply_wait: Option<&'static str>,
    pub first_user: Option<&'static str>,
    pub throughput: &'static str,
    pub series_users: &'static str,
}

impl Measures {
    fn of(mode: Mode, open_loop: bool) -> Measures {
        let latency = match (mode, open_loop) {
            (Mode::Add | Mode::Get, false) => "per call, from sending it to its reply",
            (Mode::Add | Mode::Get, true) => {
                "per call, from when it was due (at --rps) to its reply: queueing included"
            }
            (Mode::Sync, false) => "per Ack, from sending the upsert to its Ack",
            (Mode::Sync, true) => "per Ack, from when the upsert was due (at --rps) to its Ack",
            (Mode::List, _) => "per scan, from the request to its last user",
            (Mode::Bulk, _) => "per stream, from opening it to its reply (all its rows)",
        };
        Measures {
            calls: match mode {
                Mode::Add | Mode::Get => "calls",
                Mode::List => "scans",
                Mode::Bulk => "streams",
                Mode::Sync => "Acks",
            },
            latency,
            propagation: match (mode, open_loop) {
                (Mode::Sync, false) => {
                    Some("feed delivery, per Change at a watcher, from sending the upsert")
                }
                (Mode::Sync, true) => {
                    Some("feed delivery, per Change at a watcher, from when the upsert was due")
                }
                _ => None,
            },
            reply_wait: (mode == Mode::Bulk).then_some(
                "per stream, from handing its last row to gRPC to its reply: the rows still in \
                 flight, then their commit",
            ),
            first_user: (mode == Mode::List)
                .then_some("per scan, from the request to its first user"),
            throughput: match mode {
                Mode::Add | Mode::Get => "OK calls/s",
                Mode::List => "users listed/s",
                Mode::Bulk => "rows added/s",
                Mode::Sync => "OK Acks/s",
            },
            series_users: match mode {
                Mode::Bulk => "rows sent",
                Mode::List => "users received",
                Mode::Add => "users stored",
                Mode::Get => "users read",
                Mode::Sync => "users acknowledged",
            },
        }
    }
}

/// The whole run, as printed. The fields up to `verify` are those of the
/// first `--json` schema, kept; the others were added after.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub mode: Mode,
    /// The targets, comma-separated.
    pub addr: String,
    /// Workers, streams, scanners, or upserts in flight (sync).
    pub concurrency: usize,
    pub connections: usize,
    /// Whether the run was cut short by Ctrl-C.
    pub interrupted: bool,
    /// The measured part of the run (warm-up excluded).
    pub duration_s: f64,
    /// Calls, scans, streams (bulk) or Acks (sync), whatever their status.
    pub calls: u64,
    /// `calls` per second: a rate of completions, failed ones included;
    /// `throughput` is the rate of work done.
    pub calls_per_s: f64,
    pub users: u64,
    pub users_per_s: f64,
    pub mb_per_s: f64,
    pub bytes: u64,
    pub rows_added: u64,
    pub rows_failed: u64,
    pub codes: BTreeMap<String, u64>,
    /// The first message of each kind of error.
    pub errors: Vec<String>,
    pub latency: Option<Latency>,
    pub propagation: Option<Latency>,
    pub generator_cpu_s: f64,
    pub generator_cores: f64,
    pub verify: Option<VerifyReport>,

    pub command: String,
    pub targets: Vec<TargetReport>,
    pub warmup_s: f64,
    /// The `--rps` schedule; `None` for a closed loop.
    pub schedule: Option<String>,
    pub watchers: usize,
    pub ok_calls: u64,
    pub failed_calls: u64,
    /// The work done per second, in `measures.throughput`.
    pub throughput: f64,
    /// Calls that got no status from the server: the connection failed.
    pub transport_failures: u64,
    /// Streams ended by an error status after they had started, by code.
    pub streams_aborted: BTreeMap<String, u64>,
    /// sync: upserts sent that never got an Ack.
    pub unanswered: u64,
    pub error_kinds: Vec<ErrorKind>,
    pub other_errors: u64,
    pub reply_wait: Option<Latency>,
    pub first_user: Option<Latency>,
    pub measures: Measures,
    /// Second by second, warm-up included.
    pub series: Vec<Point>,
    pub thresholds: Vec<Verdict>,
    /// Why the run failed, one sentence each; empty when it did its work.
    pub failures: Vec<String>,
    pub exit_code: u8,
    /// The distributions behind `latency` and `propagation`, for the charts.
    pub latency_buckets: Vec<Bucket>,
    pub propagation_buckets: Vec<Bucket>,
}

/// How the run went, apart from the figures.
pub struct RunInfo {
    pub interrupted: bool,
    /// The whole run, warm-up included.
    pub elapsed: Duration,
    pub cpu: Duration,
    pub series: Vec<Point>,
}

fn per_s(n: u64, secs: f64) -> f64 {
    n as f64 / secs.max(1e-9)
}

impl Report {
    pub fn new(plan: &Plan, info: RunInfo, totals: Totals, verify: Option<VerifyReport>) -> Report {
        let measured = info.elapsed.saturating_sub(plan.warmup);
        let secs = measured.as_secs_f64();
        let stats: Stats = totals.all.stats;
        let targets = plan
            .target
            .addr
            .iter()
            .zip(totals.by_target)
            .enumerate()
            .map(|(i, (addr, s))| TargetReport {
                addr: addr.to_string(),
                connections: (0..plan.connections)
                    .filter(|c| c % plan.target.addr.len() == i)
                    .count(),
                calls: s.calls,
                ok_calls: s.ok,
                failed_calls: s.failed_calls(),
                ok_calls_per_s: per_s(s.ok, secs),
                users: s.users,
                latency: Latency::of(&s.latency),
                propagation: Latency::of_some(&s.propagation),
            })
            .collect();
        let throughput = per_s(
            match plan.mode {
                Mode::Add | Mode::Get | Mode::Sync => stats.ok,
                Mode::List => stats.users,
                Mode::Bulk => stats.rows_added,
            },
            secs,
        );
        let mut report = Report {
            mode: plan.mode,
            addr: plan
                .target
                .addr
                .iter()
                .map(|a| a.to_string())
                .collect::<Vec<_>>()
                .join(","),
            concurrency: plan.concurrency,
            connections: plan.connections,
            interrupted: info.interrupted,
            duration_s: secs,
            calls: stats.calls,
            calls_per_s: per_s(stats.calls, secs),
            users: stats.users,
            users_per_s: per_s(stats.users, secs),
            mb_per_s: stats.bytes as f64 / secs.max(1e-9) / 1e6,
            bytes: stats.bytes,
            rows_added: stats.rows_added,
            rows_failed: stats.rows_failed,
            codes: stats.codes.clone(),
            errors: stats
                .errors
                .kinds
                .iter()
                .map(|k| k.message.clone())
                .collect(),
            latency: Latency::of(&stats.latency),
            propagation: Latency::of_some(&stats.propagation),
            generator_cpu_s: info.cpu.as_secs_f64(),
            generator_cores: info.cpu.as_secs_f64() / info.elapsed.as_secs_f64().max(1e-9),
            verify,
            command: plan.command_line.clone(),
            targets,
            warmup_s: plan.warmup.as_secs_f64(),
            schedule: plan.schedule.map(|s| s.describe()),
            watchers: plan.watchers,
            ok_calls: stats.ok,
            failed_calls: stats.failed_calls(),
            throughput,
            transport_failures: stats.transport_failures,
            streams_aborted: stats.aborted.clone(),
            unanswered: stats.unanswered,
            error_kinds: stats.errors.kinds.clone(),
            other_errors: stats.errors.others,
            reply_wait: Latency::of_some(&stats.reply_wait),
            first_user: Latency::of_some(&stats.first_user),
            measures: Measures::of(plan.mode, plan.schedule.is_some()),
            series: info.series,
            thresholds: Vec::new(),
            failures: Vec::new(),
            exit_code: 0,
            latency_buckets: buckets(&Some(stats.latency.clone())),
            propagation_buckets: buckets(&stats.propagation),
        };
        report.failures = report.failures();
        let figures = Figures {
            calls: report.calls,
            failed: report.failed_calls,
            latency: report.latency.as_ref(),
            rate: report.throughput,
        };
        report.thresholds = plan
            .output
            .fail_if
            .iter()
            .map(|t| t.check(&figures))
            .collect();
        report.exit_code = if report.interrupted {
            EXIT_INTERRUPTED
        } else if !report.failures.is_empty() {
            EXIT_FAILED
        } else if report.thresholds.iter().any(|t| t.failed) {
            EXIT_THRESHOLD
        } else {
            0
        };
        report
    }

    /// Why the run could not do its work, one sentence each.
    fn failures(&self) -> Vec<String> {
        let mut failures = Vec::new();
        let calls = self.measures.calls;
        if self.interrupted {
            failures.push("interrupted by Ctrl-C: the figures cover what was done".to_owned());
        }
        if self.transport_failures > 0 {
            failures.push(format!(
                "{} {calls} got no answer from the server: the connection failed",
                self.transport_failures
            ));
        }
        if self.calls == 0 && self.streams_aborted.is_empty() {
            failures.push(format!("no {calls} were made"));
        } else if self.calls > 0 && self.ok_calls == 0 {
            failures.push(format!("every one of the {} {calls} failed", self.calls));
        }
        if self.mode == Mode::Bulk && self.rows_added == 0 && self.rows_failed > 0 {
            failures.push(format!("every one of the {} rows failed", self.rows_failed));
        }
        if !self.streams_aborted.is_empty() {
            let total: u64 = self.streams_aborted.values().sum();
            failures.push(format!(
                "{total} stream{} aborted ({})",
                if total == 1 { " was" } else { "s were" },
                codes(&self.streams_aborted)
            ));
        }
        if self.unanswered > 0 {
            failures.push(format!("{} upserts sent got no Ack", self.unanswered));
        }
        if let Some(verify) = &self.verify
            && !verify.ok
        {
            failures.push(format!("--verify found a problem: {}", verify.detail));
        }
        failures
    }

    /// The opening line: what ran, against what.
    fn heading(&self) -> String {
        let connections = format!(
            "{} connection{}",
            self.connections,
            if self.connections == 1 { "" } else { "s" }
        );
        let pacing = match &self.schedule {
            Some(schedule) => format!("open loop at {schedule}"),
            None => "closed loop".to_owned(),
        };
        let what = match self.mode {
            Mode::Add | Mode::Get => format!("{} workers, {pacing}", self.concurrency),
            Mode::List => format!("{} scanner(s), each scan after the last", self.concurrency),
            Mode::Bulk => format!("{} BulkAddUsers streams at a time", self.concurrency),
            Mode::Sync => format!(
                "one SyncUsers stream with up to {} upserts in flight ({}), {} watcher stream(s)",
                self.concurrency, pacing, self.watchers
            ),
        };
        format!(
            "{} against {}: {what}, over {connections}{}",
            self.mode.name(),
            self.addr,
            if self.interrupted {
                " (interrupted)"
            } else {
                ""
            }
        )
    }

    /// The human-readable report.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let m = &self.measures;
        let _ = writeln!(out, "{}", self.heading());
        let warmup = if self.warmup_s > 0.0 {
            format!(" measured, after {:.3} s of warm-up", self.warmup_s)
        } else {
            String::new()
        };
        let _ = writeln!(out, "  duration     {:.3} s{warmup}", self.duration_s);
        let failed = if self.calls > 0 {
            format!(
                ", {} failed ({:.2}%)",
                self.failed_calls,
                100.0 * self.failed_calls as f64 / self.calls as f64
            )
        } else {
            String::new()
        };
        let _ = writeln!(
            out,
            "  {:<12} {}: {} OK{failed}",
            m.calls, self.calls, self.ok_calls
        );
        let _ = writeln!(out, "  throughput   {}", self.throughput_line());
        if self.mode == Mode::Bulk {
            let _ = writeln!(
                out,
                "  rows         {} added, {} failed ({:.1} MB/s sent)",
                self.rows_added, self.rows_failed, self.mb_per_s
            );
        } else {
            let _ = writeln!(
                out,
                "  users        {} ({:.0}/s, {:.1} MB/s)",
                self.users, self.users_per_s, self.mb_per_s
            );
        }
        for (name, latency, measures) in [
            ("latency", &self.latency, Some(m.latency)),
            ("delivery", &self.propagation, m.propagation),
            ("reply wait", &self.reply_wait, m.reply_wait),
            ("first user", &self.first_user, m.first_user),
        ] {
            if let (Some(l), Some(measures)) = (latency, measures) {
                let _ = writeln!(
                    out,
                    "  {name:<12} p50 {:.3} ms  p90 {:.3}  p95 {:.3}  p99 {:.3}  p99.9 {:.3}  \
                     max {:.3}  (mean {:.3}, n={})\n               {measures}",
                    l.p50_ms, l.p90_ms, l.p95_ms, l.p99_ms, l.p999_ms, l.max_ms, l.mean_ms, l.count
                );
            }
        }
        let mut status = codes(&self.codes);
        if status.is_empty() {
            status.push_str("none");
        }
        if !self.streams_aborted.is_empty() {
            let _ = write!(
                status,
                "; streams aborted: {}",
                codes(&self.streams_aborted)
            );
        }
        let _ = writeln!(out, "  status       {status}");
        if self.targets.len() > 1 {
            for t in &self.targets {
                let p99 = t
                    .latency
                    .as_ref()
                    .map(|l| format!(", p50 {:.3} ms, p99 {:.3} ms", l.p50_ms, l.p99_ms))
                    .unwrap_or_default();
                let _ = writeln!(
                    out,
                    "  target       {}: {} {}, {} OK ({:.1}/s), {} failed{p99}",
                    t.addr, t.calls, m.calls, t.ok_calls, t.ok_calls_per_s, t.failed_calls
                );
            }
        }
        for kind in &self.error_kinds {
            let _ = writeln!(out, "  error        {}× {}", kind.count, kind.message);
        }
        if self.other_errors > 0 {
            let _ = writeln!(
                out,
                "  error        {} more of other kinds",
                self.other_errors
            );
        }
        let _ = writeln!(
            out,
            "  generator    {:.2} s CPU ({:.2} cores)",
            self.generator_cpu_s, self.generator_cores
        );
        if let Some(v) = &self.verify {
            let outcome = if v.ok { "ok" } else { "FAILED" };
            let _ = writeln!(out, "  verify       {outcome}: {}", v.detail);
        }
        for verdict in &self.thresholds {
            let _ = writeln!(out, "  fail-if      {verdict}");
        }
        let _ = writeln!(out, "  result       {}", self.result());
        out
    }

    /// The throughput, or why there is none: a rate of failed calls is
    /// never shown as one.
    pub fn throughput_line(&self) -> String {
        let m = &self.measures;
        if self.calls > 0 && self.transport_failures == self.calls {
            return format!(
                "none: 0 {} reached the server (the connection failed)",
                m.calls
            );
        }
        if self.ok_calls == 0 {
            let failed_rate = if self.calls > 0 {
                format!(
                    " (failed {} ended at {:.1}/s: not throughput)",
                    m.calls, self.calls_per_s
                )
            } else {
                String::new()
            };
            return format!("none: 0 {} succeeded{failed_rate}", m.calls);
        }
        let mut line = format!("{:.1} {}", self.throughput, m.throughput);
        if self.failed_calls > 0 {
            let _ = write!(
                line,
                " (failed {} ended at {:.1}/s besides)",
                m.calls,
                self.failed_calls as f64 / self.duration_s.max(1e-9)
            );
        }
        line
    }

    /// `ok`, or FAILED and why.
    pub fn result(&self) -> String {
        if !self.failures.is_empty() {
            return format!("FAILED: {}", self.failures.join("; "));
        }
        let held: Vec<&str> = self
            .thresholds
            .iter()
            .filter(|t| t.failed)
            .map(|t| t.condition.as_str())
            .collect();
        if held.is_empty() {
            "ok".to_owned()
        } else {
            format!("FAILED: --fail-if {}", held.join(", "))
        }
    }
}

/// `OK 5, NOT_FOUND 2`.
fn codes(codes: &BTreeMap<String, u64>) -> String {
    codes
        .iter()
        .map(|(c, n)| format!("{c} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}
