//! The report of a run: its figures (as text or `--json`), what each one
//! measures, and the verdict: whether the run did its work, which
//! `--fail-if` conditions held, and so the exit status.
//!
//! A report is made from a [`Measured`]: a run's parameters and what it
//! measured, histograms whole. `user-load merge` reads that back from the
//! `--json` of several runs, adds them up, and makes one report of the sum
//! the same way (`merge.rs`). `text.rs` renders it for people.

mod text;

pub use text::outages;

use std::collections::BTreeMap;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::{
    budget::EXIT_INTERRUPTED,
    cli::Mode,
    connect::token_hint,
    hdr,
    series::{Point, Slots, Span},
    stats::{Bucket, ErrorKind, Latency, Stats, buckets, code_name},
    targets::Outage,
    threshold::{Figures, Metric, Threshold, Verdict},
    verify::VerifyReport,
};

/// Exit status of a run that could not do its work.
pub const EXIT_FAILED: u8 = 1;

/// Exit status of a run in which a `--fail-if` condition held (k6 uses the
/// same for its thresholds).
pub const EXIT_THRESHOLD: u8 = 99;

/// The lateness the report warns about, as a share of the latency it is
/// part of: past a tenth, the latency figures describe the generator as
/// much as the server (a tenth is also about the run-to-run spread of a
/// p50 on a quiet machine, so less would not change a conclusion).
const LATENESS_SHARE: f64 = 0.10;

/// Lateness under this is never warned about: the cost of waking an idle
/// thread on a virtual machine, which no generator avoids (see
/// BENCHMARKS.md).
const LATENESS_FLOOR_MS: f64 = 0.05;

/// Calls a p99 must rest on to be judged: under 1000, the p99 is one of
/// the ten slowest calls, as much chance as measure.
const LATENESS_P99_SAMPLES: u64 = 1000;

/// What a run was, and what it measured: all a report is made from.
#[derive(Debug, Clone)]
pub struct Measured {
    pub mode: Mode,
    pub command: String,
    /// Targets, in `--addr` order, with what each measured.
    pub targets: Vec<TargetMeasured>,
    pub concurrency: usize,
    pub connections: usize,
    pub watchers: usize,
    pub schedule: Option<String>,
    /// The whole run (warm-up included), on the wall clock.
    pub span: Span,
    pub interrupted: bool,
    /// The generator's CPU time, and its pacer thread's (open loop).
    pub cpu_s: f64,
    pub pacer_cpu_s: Option<f64>,
    /// Generators whose runs this is (more than one once merged).
    pub generators: u32,
    pub stats: Stats,
    pub slots: Slots,
    pub verify: Option<VerifyReport>,
    /// `--auth-token-file`, for the advice when a server refuses calls.
    pub token_file: Option<String>,
}

/// What one target measured.
#[derive(Debug, Clone)]
pub struct TargetMeasured {
    pub addr: String,
    pub connections: usize,
    pub stats: Stats,
    pub outages: Vec<Outage>,
}

/// The figures of one target.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TargetReport {
    pub addr: String,
    pub connections: usize,
    pub calls: u64,
    pub ok_calls: u64,
    pub failed_calls: u64,
    /// Units that got no answer: the connection to this target failed.
    #[serde(default)]
    pub connection_failures: u64,
    #[serde(default, skip_deserializing)]
    pub ok_calls_per_s: f64,
    pub users: u64,
    #[serde(default, skip_deserializing)]
    pub latency: Option<Latency>,
    #[serde(default, skip_deserializing)]
    pub propagation: Option<Latency>,
    /// bulk and list: streams to this target that ended without their
    /// reply, by code.
    #[serde(default)]
    pub streams_aborted: BTreeMap<String, u64>,
    /// When the target went down and came back.
    #[serde(default)]
    pub outages: Vec<Outage>,
    #[serde(with = "hdr::optional", default)]
    pub latency_histogram: Option<Histogram<u64>>,
}

/// bulk: the streams, apart from the rows they carried.
#[derive(Debug, Clone, Serialize)]
pub struct StreamsReport {
    pub count: u64,
    pub ok: u64,
    pub codes: BTreeMap<String, u64>,
    /// Each stream from opening it to its reply.
    pub latency: Option<Latency>,
}

/// Every histogram of the run, whole: what `merge` adds up.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Histograms {
    #[serde(with = "hdr::required")]
    pub latency: Histogram<u64>,
    #[serde(with = "hdr::optional", default)]
    pub lateness: Option<Histogram<u64>>,
    #[serde(with = "hdr::optional", default)]
    pub propagation: Option<Histogram<u64>>,
    #[serde(with = "hdr::optional", default)]
    pub reply_wait: Option<Histogram<u64>>,
    #[serde(with = "hdr::optional", default)]
    pub first_user: Option<Histogram<u64>>,
    #[serde(with = "hdr::optional", default)]
    pub streams: Option<Histogram<u64>>,
}

/// What each figure of the report measures, in words.
#[derive(Debug, Clone, Serialize)]
pub struct Measures {
    /// The unit of work: calls, scans, rows or Acks.
    pub calls: &'static str,
    pub latency: &'static str,
    pub lateness: Option<&'static str>,
    pub propagation: Option<&'static str>,
    pub reply_wait: Option<&'static str>,
    pub first_user: Option<&'static str>,
    pub streams: Option<&'static str>,
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
            (Mode::Bulk, _) => {
                "per batch of 1000 rows of a stream, from handing its first row to gRPC to \
                 handing the next batch's: once the server's flow-control window is full, \
                 rows go out as fast as it takes them, so this is the time it takes to import \
                 a batch (1000 rows divided by it: rows per second)"
            }
        };
        Measures {
            calls: match mode {
                Mode::Add | Mode::Get => "calls",
                Mode::List => "scans",
                Mode::Bulk => "rows",
                Mode::Sync => "Acks",
            },
            latency,
            lateness: open_loop.then_some(
                "per call, how late it started after it was due: the generator's own delay \
                 (its timer, waking a worker, or no worker free), part of the latency above",
            ),
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
            streams: (mode == Mode::Bulk)
                .then_some("per stream, from opening it to its reply (all its rows)"),
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
    /// Workers, streams, scanners, or upserts in flight (sync); added up
    /// over the generators of a merged report.
    pub concurrency: usize,
    pub connections: usize,
    /// Whether the run was cut short by Ctrl-C.
    pub interrupted: bool,
    /// The measured part of the run (warm-up excluded).
    pub duration_s: f64,
    /// Units of work (`measures.calls`: calls, scans, rows or Acks) that
    /// got an answer, whatever their status.
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
    /// `calls` by status code (bulk: rows failed unlisted under
    /// `NOT_LISTED`).
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
    /// Units that got no answer: their connection failed. Counted apart
    /// from `calls`, and never timed.
    pub connection_failures: u64,
    /// Streams ended by an error status after they had started, by code.
    pub streams_aborted: BTreeMap<String, u64>,
    /// sync: upserts sent that never got an Ack.
    pub unanswered: u64,
    /// bulk: rows sent on streams that ended without a reply.
    pub rows_unconfirmed: u64,
    pub error_kinds: Vec<ErrorKind>,
    pub other_errors: u64,
    /// Why units failed: the kinds of `error_kinds` that are a failed
    /// unit's status and message (bulk: a failed row's), counted in units.
    pub failure_kinds: Vec<ErrorKind>,
    pub other_failures: u64,
    pub reply_wait: Option<Latency>,
    pub first_user: Option<Latency>,
    /// Open loop: how late calls started after they were due.
    pub lateness: Option<Latency>,
    /// Why the lateness distorts the latency figures, when it does.
    pub lateness_warning: Option<String>,
    /// Open loop: the CPU time of the pacer thread (part of
    /// `generator_cpu_s`), which spins to start calls on time.
    pub pacer_cpu_s: Option<f64>,
    /// bulk: the streams that carried the rows.
    pub streams: Option<StreamsReport>,
    pub measures: Measures,
    /// When the run started (warm-up included): RFC 3339, and in
    /// microseconds since the Unix epoch.
    pub started_at: String,
    pub start_unix_us: u64,
    /// Generators whose runs this report adds up.
    pub generators: u32,
    /// The length of each slot of the series, in seconds.
    pub series_step_s: f64,
    /// Slot by slot, warm-up included.
    pub series: Vec<Point>,
    pub thresholds: Vec<Verdict>,
    /// Why the run failed, one sentence each; empty when it did its work.
    pub failures: Vec<String>,
    pub exit_code: u8,
    /// The distributions behind `latency` and `propagation`, for the charts.
    pub latency_buckets: Vec<Bucket>,
    pub propagation_buckets: Vec<Bucket>,
    /// Every histogram, whole, in HdrHistogram's serialized form.
    pub histograms: Histograms,
    /// `--auth-token-file`, as given.
    pub token_file: Option<String>,
}

fn per_s(n: u64, secs: f64) -> f64 {
    n as f64 / secs.max(1e-9)
}

impl Report {
    pub fn new(m: Measured, fail_if: &[Threshold]) -> Report {
        let span = m.span;
        let measured_us = (span.end_unix_us - span.start_unix_us).saturating_sub(span.warmup_us);
        let secs = measured_us as f64 / 1e6;
        let elapsed_s = (span.end_unix_us - span.start_unix_us) as f64 / 1e6;
        let stats = m.stats;
        let targets = m
            .targets
            .iter()
            .map(|t| TargetReport {
                addr: t.addr.clone(),
                connections: t.connections,
                calls: t.stats.calls,
                ok_calls: t.stats.ok,
                failed_calls: t.stats.failed_calls(),
                connection_failures: t.stats.no_answer,
                ok_calls_per_s: per_s(t.stats.ok, secs),
                users: t.stats.users,
                latency: Latency::of(&t.stats.latency),
                propagation: Latency::of_some(&t.stats.propagation),
                streams_aborted: t.stats.aborted.clone(),
                outages: t.outages.clone(),
                latency_histogram: Some(t.stats.latency.clone()),
            })
            .collect();
        let throughput = per_s(
            match m.mode {
                Mode::Add | Mode::Get | Mode::Sync | Mode::Bulk => stats.ok,
                Mode::List => stats.users,
            },
            secs,
        );
        let (series_step_s, series) = span.points(&m.slots);
        let latency = Latency::of(&stats.latency);
        let lateness = Latency::of_some(&stats.lateness);
        let streams = (m.mode == Mode::Bulk).then(|| StreamsReport {
            count: stats.stream_codes.values().sum(),
            ok: stats
                .stream_codes
                .get(&code_name(tonic::Code::Ok))
                .copied()
                .unwrap_or(0),
            codes: stats.stream_codes.clone(),
            latency: Latency::of_some(&stats.streams),
        });
        let mut report = Report {
            mode: m.mode,
            addr: m
                .targets
                .iter()
                .map(|t| t.addr.as_str())
                .collect::<Vec<_>>()
                .join(","),
            concurrency: m.concurrency,
            connections: m.connections,
            interrupted: m.interrupted,
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
            lateness_warning: lateness_warning(lateness.as_ref(), latency.as_ref()),
            latency,
            propagation: Latency::of_some(&stats.propagation),
            generator_cpu_s: m.cpu_s,
            generator_cores: m.cpu_s / elapsed_s.max(1e-9),
            pacer_cpu_s: m.pacer_cpu_s,
            verify: m.verify,
            command: m.command,
            targets,
            warmup_s: span.warmup_us as f64 / 1e6,
            schedule: m.schedule.clone(),
            watchers: m.watchers,
            ok_calls: stats.ok,
            failed_calls: stats.failed_calls(),
            throughput,
            connection_failures: stats.no_answer,
            streams_aborted: stats.aborted.clone(),
            unanswered: stats.unanswered,
            rows_unconfirmed: stats.rows_unconfirmed,
            error_kinds: stats.errors.kinds.clone(),
            other_errors: stats.errors.others,
            failure_kinds: stats.failures.kinds.clone(),
            other_failures: stats.failures.others,
            reply_wait: Latency::of_some(&stats.reply_wait),
            first_user: Latency::of_some(&stats.first_user),
            lateness,
            streams,
            measures: Measures::of(m.mode, m.schedule.is_some()),
            started_at: rfc3339(span.start_unix_us),
            start_unix_us: span.start_unix_us,
            generators: m.generators,
            series_step_s,
            series,
            thresholds: Vec::new(),
            failures: Vec::new(),
            exit_code: 0,
            latency_buckets: buckets(&Some(stats.latency.clone())),
            propagation_buckets: buckets(&stats.propagation),
            histograms: Histograms {
                latency: stats.latency,
                lateness: stats.lateness,
                propagation: stats.propagation,
                reply_wait: stats.reply_wait,
                first_user: stats.first_user,
                streams: stats.streams,
            },
            token_file: m.token_file,
        };
        // Failed units fail the run, unless a condition over them says how
        // many may fail.
        let tolerated = fail_if
            .iter()
            .any(|t| matches!(t.metric, Metric::Errors | Metric::ErrorShare));
        report.failures = report.failures(tolerated);
        let figures = Figures {
            calls: report.calls + report.connection_failures + report.unanswered,
            failed: report.failed_calls + report.connection_failures + report.unanswered,
            latency: report.latency.as_ref(),
            rate: report.throughput,
        };
        report.thresholds = fail_if.iter().map(|t| t.check(&figures)).collect();
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

    /// Why the run could not do its work, one sentence each. Failed units
    /// are among the reasons unless `tolerated` by a `--fail-if` condition.
    fn failures(&self, tolerated: bool) -> Vec<String> {
        let mut failures = Vec::new();
        let units = self.measures.calls;
        if self.interrupted {
            failures.push("interrupted by Ctrl-C: the figures cover what was done".to_owned());
        }
        if self.connection_failures > 0 {
            let down: Vec<String> = self
                .targets
                .iter()
                .filter(|t| t.connection_failures > 0)
                .map(outages)
                .collect();
            failures.push(format!(
                "{} {units} got no answer from the server: the connection failed ({})",
                self.connection_failures,
                down.join("; ")
            ));
        }
        let all = self.calls + self.connection_failures;
        if all == 0 && self.streams_aborted.is_empty() {
            failures.push(format!("no {units} were made"));
        } else if self.calls > 0 && self.ok_calls == 0 {
            failures.push(format!(
                "every one of the {} {units} failed ({})",
                self.calls,
                self.top_failures()
            ));
        } else if self.failed_calls > 0 && !tolerated {
            failures.push(format!(
                "{} of {} {units} failed ({}): give --fail-if 'errors>N%' to accept some",
                self.failed_calls,
                self.calls,
                self.top_failures()
            ));
        }
        let refused: u64 = [tonic::Code::Unauthenticated, tonic::Code::PermissionDenied]
            .into_iter()
            .filter_map(|code| self.codes.get(&code_name(code)))
            .sum();
        if refused > 0 {
            failures.push(format!(
                "the server refused {refused} {units} (UNAUTHENTICATED or PERMISSION_DENIED): {}",
                token_hint(self.token_file.as_deref().map(std::path::Path::new))
            ));
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
        if let Some(verify) = &self.verify {
            match verify.outcome() {
                "ok" => {}
                "incomplete" => failures.push(format!(
                    "--verify could not check every user: {}",
                    verify.detail
                )),
                _ => failures.push(format!("--verify found a problem: {}", verify.detail)),
            }
        }
        failures
    }

    /// Why units failed: the three most frequent kinds, with their counts.
    fn top_failures(&self) -> String {
        let mut kinds: Vec<&ErrorKind> = self.failure_kinds.iter().collect();
        kinds.sort_by_key(|k| std::cmp::Reverse(k.count));
        let mut text: Vec<String> = kinds
            .iter()
            .take(3)
            .map(|k| format!("{}× {}", k.count, k.message))
            .collect();
        let rest: u64 = kinds.iter().skip(3).map(|k| k.count).sum::<u64>() + self.other_failures;
        if rest > 0 {
            text.push(format!("{rest} of other kinds"));
        }
        text.join("; ")
    }
}

/// The warning the lateness calls for: when it is a noticeable part of the
/// latency it is included in (see [`LATENESS_SHARE`]).
fn lateness_warning(lateness: Option<&Latency>, latency: Option<&Latency>) -> Option<String> {
    let (late, latency) = (lateness?, latency?);
    let mut judged = vec![("p50", late.p50_ms, latency.p50_ms)];
    if late.count >= LATENESS_P99_SAMPLES {
        judged.push(("p99", late.p99_ms, latency.p99_ms));
    }
    let (name, late_ms, of_ms) = judged
        .into_iter()
        .find(|(_, late, of)| *late > LATENESS_FLOOR_MS && *late > LATENESS_SHARE * of)?;
    Some(format!(
        "calls started late: lateness {name} {late_ms:.3} ms is {:.0}% of the latency {name} \
         ({of_ms:.3} ms), which includes it: that figure describes the generator too. Give \
         it more workers (--concurrency) or fewer calls a second, or a machine of its own or \
         less busy",
        100.0 * late_ms / of_ms.max(1e-9)
    ))
}

/// `micros` since the epoch as RFC 3339, in UTC, to the microsecond.
pub fn rfc3339(micros: u64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(micros) * 1000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

/// `OK 5, NOT_FOUND 2`.
pub fn codes(codes: &BTreeMap<String, u64>) -> String {
    codes
        .iter()
        .map(|(c, n)| format!("{c} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn latency(p50_ms: f64, p99_ms: f64) -> Latency {
        Latency {
            count: 5000,
            mean_ms: p50_ms,
            p50_ms,
            p90_ms: p99_ms,
            p95_ms: p99_ms,
            p99_ms,
            p999_ms: p99_ms,
            max_ms: p99_ms,
        }
    }

    #[test]
    fn lateness_is_warned_about_once_it_distorts_the_latency() {
        let of = latency(0.2, 0.5);
        assert_eq!(
            lateness_warning(Some(&latency(0.015, 0.045)), Some(&of)),
            None
        );
        // Large in proportion, but below what waking a thread costs.
        assert_eq!(
            lateness_warning(Some(&latency(0.03, 0.04)), Some(&latency(0.1, 0.2))),
            None
        );
        let warning = lateness_warning(Some(&latency(0.1, 0.3)), Some(&of)).unwrap();
        assert!(
            warning.starts_with("calls started late: lateness p50 0.100 ms is 50%"),
            "{warning}"
        );
        let late = latency(0.01, 0.2);
        let warning = lateness_warning(Some(&late), Some(&of)).unwrap();
        assert!(
            warning.contains("lateness p99 0.200 ms is 40%"),
            "{warning}"
        );
        // A p99 of a few hundred calls is too few to judge.
        let few = Latency { count: 500, ..late };
        assert_eq!(lateness_warning(Some(&few), Some(&of)), None);
        assert_eq!(lateness_warning(None, Some(&of)), None);
    }

    #[test]
    fn start_times_read_as_rfc_3339() {
        assert_eq!(
            rfc3339(1_700_000_000_123_456),
            "2023-11-14T22:13:20.123456Z"
        );
    }
}
