//! The report as text: one figure a line, each latency with what it
//! measures, the verdict last.

use std::fmt::Write as _;

use super::{Report, TargetReport, codes};
use crate::{
    cli::Mode,
    stats::{Latency, NOT_LISTED},
};

/// `name  p50 .. max (mean, n)` and, indented below, what it measures.
fn latency_line(out: &mut String, name: &str, l: &Latency, measures: &str) {
    let _ = writeln!(
        out,
        "  {name:<12} p50 {:.3} ms  p90 {:.3}  p95 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}  \
         (mean {:.3}, n={})\n               {measures}",
        l.p50_ms, l.p90_ms, l.p95_ms, l.p99_ms, l.p999_ms, l.max_ms, l.mean_ms, l.count
    );
}

/// When a target was down, in words.
pub fn outages(t: &TargetReport) -> String {
    if t.outages.is_empty() {
        return format!("{}: {} without an outage", t.addr, t.connection_failures);
    }
    let spans: Vec<String> = t
        .outages
        .iter()
        .map(|o| match o.up_at_s {
            Some(up) => format!("down at {:.3} s, back at {up:.3} s", o.down_at_s),
            None => format!("down at {:.3} s until the end", o.down_at_s),
        })
        .collect();
    format!(
        "{} {} ({})",
        t.addr,
        spans.join(", "),
        t.outages.first().map(|o| o.cause.as_str()).unwrap_or("")
    )
}

impl Report {
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
        let generators = if self.generators > 1 {
            format!(" ({} generators merged)", self.generators)
        } else {
            String::new()
        };
        format!(
            "{} against {}{generators}: {what}, over {connections}{}",
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
        let _ = writeln!(
            out,
            "  duration     {:.3} s{warmup}, from {}",
            self.duration_s, self.started_at
        );
        let failed = if self.calls > 0 {
            format!(
                ", {} failed ({:.2}%)",
                self.failed_calls,
                100.0 * self.failed_calls as f64 / self.calls as f64
            )
        } else {
            String::new()
        };
        let no_answer = if self.connection_failures > 0 {
            format!(
                "; {} more got no answer (connection failed)",
                self.connection_failures
            )
        } else {
            String::new()
        };
        let _ = writeln!(
            out,
            "  {:<12} {}: {} OK{failed}{no_answer}",
            m.calls, self.calls, self.ok_calls
        );
        let _ = writeln!(out, "  throughput   {}", self.throughput_line());
        if self.mode == Mode::Bulk {
            let unconfirmed = if self.rows_unconfirmed > 0 {
                format!(
                    ", {} of them on streams that ended without a reply",
                    self.rows_unconfirmed
                )
            } else {
                String::new()
            };
            let _ = writeln!(
                out,
                "  sent         {} rows ({:.1} MB/s){unconfirmed}",
                self.users, self.mb_per_s
            );
        } else {
            let _ = writeln!(
                out,
                "  users        {} ({:.0}/s, {:.1} MB/s)",
                self.users, self.users_per_s, self.mb_per_s
            );
        }
        if let Some(l) = &self.latency {
            let name = if self.mode == Mode::Bulk {
                "batches"
            } else {
                "latency"
            };
            latency_line(&mut out, name, l, m.latency);
            if self.mode == Mode::Bulk {
                let rate = |ms: f64| 1000.0 * 1000.0 / ms.max(1e-9);
                let _ = writeln!(
                    out,
                    "  rows/s       p50 {:.0}  p10 {:.0}  p1 {:.0}  (per batch: the slowest \
                     batches are the lowest rates)",
                    rate(l.p50_ms),
                    rate(l.p90_ms),
                    rate(l.p99_ms)
                );
            }
        } else if self.mode == Mode::Bulk {
            let _ = writeln!(
                out,
                "  batches      none complete: no stream sent 1000 rows (see the streams below)"
            );
        }
        if let (Some(l), Some(measures)) = (&self.lateness, m.lateness) {
            latency_line(&mut out, "lateness", l, measures);
        }
        if let Some(warning) = &self.lateness_warning {
            let _ = writeln!(out, "  WARNING      {warning}");
        }
        for (name, latency, measures) in [
            ("delivery", &self.propagation, m.propagation),
            ("reply wait", &self.reply_wait, m.reply_wait),
            ("first user", &self.first_user, m.first_user),
        ] {
            if let (Some(l), Some(measures)) = (latency, measures) {
                latency_line(&mut out, name, l, measures);
            }
        }
        if let Some(streams) = &self.streams {
            let _ = writeln!(
                out,
                "  streams      {}: {}",
                streams.count,
                codes(&streams.codes)
            );
            if let (Some(l), Some(measures)) = (&streams.latency, m.streams) {
                latency_line(&mut out, "", l, measures);
            }
        }
        let mut status = codes(&self.codes);
        if status.is_empty() {
            status.push_str("none");
        }
        if self.codes.contains_key(NOT_LISTED) {
            let _ = write!(
                status,
                " ({NOT_LISTED}: failed rows a reply did not list; it lists 100 a stream)"
            );
        }
        if !self.streams_aborted.is_empty() {
            let _ = write!(
                status,
                "; streams aborted: {}",
                codes(&self.streams_aborted)
            );
        }
        let _ = writeln!(out, "  status       {status}");
        if self.targets.len() > 1 || self.targets.iter().any(|t| !t.outages.is_empty()) {
            for t in &self.targets {
                let p99 = t
                    .latency
                    .as_ref()
                    .map(|l| format!(", p50 {:.3} ms, p99 {:.3} ms", l.p50_ms, l.p99_ms))
                    .unwrap_or_default();
                let _ = writeln!(
                    out,
                    "  target       {}: {} {}, {} OK ({:.1}/s), {} failed, {} no answer{p99}",
                    t.addr,
                    t.calls,
                    m.calls,
                    t.ok_calls,
                    t.ok_calls_per_s,
                    t.failed_calls,
                    t.connection_failures
                );
                if !t.streams_aborted.is_empty() {
                    let total: u64 = t.streams_aborted.values().sum();
                    let _ = writeln!(
                        out,
                        "               {total} stream(s) aborted ({})",
                        codes(&t.streams_aborted)
                    );
                }
                if !t.outages.is_empty() {
                    let _ = writeln!(out, "               {}", outages(t));
                }
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
        let pacer = self
            .pacer_cpu_s
            .map(|s| format!(", of which the pacer thread {s:.2} s"))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "  generator    {:.2} s CPU ({:.2} cores){pacer}",
            self.generator_cpu_s, self.generator_cores
        );
        if let Some(v) = &self.verify {
            let _ = writeln!(out, "  verify       {}: {}", v.outcome(), v.detail);
        }
        for verdict in &self.thresholds {
            let _ = writeln!(out, "  fail-if      {verdict}");
        }
        let _ = writeln!(out, "  result       {}", self.result());
        out
    }

    /// The throughput, or why there is none: a rate of failed units is
    /// never shown as one.
    pub fn throughput_line(&self) -> String {
        let m = &self.measures;
        if self.calls == 0 && self.connection_failures > 0 {
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
