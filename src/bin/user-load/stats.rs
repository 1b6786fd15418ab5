//! What a run measures, and the report it prints.
//!
//! Each worker keeps its own [`Stats`] (no shared counters on the hot path)
//! and the run merges them at the end.

use std::{collections::BTreeMap, fmt::Write as _, time::Duration};

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::{Mode, verify::VerifyReport};

/// Latencies are recorded in microseconds, from 1 µs to an hour, to three
/// significant figures: ~0.1% precision in a few tens of KB per histogram.
const LATENCY_MAX_US: u64 = 3_600_000_000;
const LATENCY_SIGFIGS: u8 = 3;

/// Distinct error messages kept for the report; the rest are only counted.
const MAX_DISTINCT_ERRORS: usize = 10;

/// One worker's measurements.
#[derive(Debug, Clone)]
pub struct Stats {
    pub latency: Histogram<u64>,
    /// sync: from sending an upsert to a watcher receiving its Change.
    pub propagation: Histogram<u64>,
    /// Calls (or Acks) by status code name.
    pub codes: BTreeMap<String, u64>,
    pub errors: Vec<String>,
    pub calls: u64,
    /// Users carried: rows sent (bulk), users stored (add), read (get,
    /// list), acknowledged (sync).
    pub users: u64,
    /// bulk: rows the server reported added and failed.
    pub rows_added: u64,
    pub rows_failed: u64,
    /// Encoded bytes of the users carried.
    pub bytes: u64,
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_MAX_US, LATENCY_SIGFIGS)
        .expect("constant histogram bounds are valid")
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            latency: histogram(),
            propagation: histogram(),
            codes: BTreeMap::new(),
            errors: Vec::new(),
            calls: 0,
            users: 0,
            rows_added: 0,
            rows_failed: 0,
            bytes: 0,
        }
    }
}

fn micros(d: Duration) -> u64 {
    (d.as_micros() as u64).clamp(1, LATENCY_MAX_US)
}

impl Stats {
    /// A finished call: its latency and status.
    pub fn call(&mut self, latency: Duration, code: tonic::Code) {
        self.calls += 1;
        self.latency.saturating_record(micros(latency));
        self.code(code);
    }

    pub fn code(&mut self, code: tonic::Code) {
        *self.codes.entry(code_name(code)).or_default() += 1;
    }

    pub fn propagated(&mut self, latency: Duration) {
        self.propagation.saturating_record(micros(latency));
    }

    /// Keeps the first few distinct error messages.
    pub fn error(&mut self, message: impl Into<String>) {
        let message = message.into();
        if self.errors.len() < MAX_DISTINCT_ERRORS && !self.errors.contains(&message) {
            self.errors.push(message);
        }
    }

    /// A failed call: counted under its code, its message kept.
    pub fn failed(&mut self, latency: Duration, status: &tonic::Status) {
        self.call(latency, status.code());
        self.error(format!("{:?}: {}", status.code(), status.message()));
    }

    pub fn merge(&mut self, other: Stats) {
        // Same bounds on both sides, so adding cannot fail.
        let _ = self.latency.add(&other.latency);
        let _ = self.propagation.add(&other.propagation);
        for (code, n) in other.codes {
            *self.codes.entry(code).or_default() += n;
        }
        for error in other.errors {
            self.error(error);
        }
        self.calls += other.calls;
        self.users += other.users;
        self.rows_added += other.rows_added;
        self.rows_failed += other.rows_failed;
        self.bytes += other.bytes;
    }
}

/// `OK`, `ALREADY_EXISTS`, ...: the names grpc status codes go by.
pub fn code_name(code: tonic::Code) -> String {
    let mut name = String::new();
    for (i, c) in format!("{code:?}").chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            name.push('_');
        }
        name.push(c.to_ascii_uppercase());
    }
    match name.as_str() {
        "O_K" => "OK".to_owned(),
        _ => name,
    }
}

/// Latency percentiles, in milliseconds.
#[derive(Debug, Clone, Serialize)]
pub struct Latency {
    pub count: u64,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

impl Latency {
    fn of(h: &Histogram<u64>) -> Option<Latency> {
        let ms = |us: u64| us as f64 / 1000.0;
        (!h.is_empty()).then(|| Latency {
            count: h.len(),
            mean_ms: h.mean() / 1000.0,
            p50_ms: ms(h.value_at_quantile(0.50)),
            p90_ms: ms(h.value_at_quantile(0.90)),
            p95_ms: ms(h.value_at_quantile(0.95)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            p999_ms: ms(h.value_at_quantile(0.999)),
            max_ms: ms(h.max()),
        })
    }
}

/// The whole run, as printed.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub mode: Mode,
    pub addr: String,
    pub concurrency: usize,
    pub connections: usize,
    /// Whether the run was cut short by Ctrl-C.
    pub interrupted: bool,
    pub duration_s: f64,
    pub calls: u64,
    pub calls_per_s: f64,
    pub users: u64,
    pub users_per_s: f64,
    pub mb_per_s: f64,
    pub bytes: u64,
    /// bulk: rows the server reported added and failed.
    pub rows_added: u64,
    pub rows_failed: u64,
    pub codes: BTreeMap<String, u64>,
    pub errors: Vec<String>,
    /// Per call (bulk: per stream; list: per scan; sync: per Ack).
    pub latency: Option<Latency>,
    /// sync: from sending an upsert to a watcher receiving its Change.
    pub propagation: Option<Latency>,
    /// CPU time the generator used, and that as a share of one core.
    pub generator_cpu_s: f64,
    pub generator_cores: f64,
    pub verify: Option<VerifyReport>,
}

pub struct RunInfo {
    pub mode: Mode,
    pub addr: String,
    pub concurrency: usize,
    pub connections: usize,
    pub interrupted: bool,
    pub elapsed: Duration,
    pub cpu: Duration,
}

impl Report {
    pub fn new(info: RunInfo, stats: Stats, verify: Option<VerifyReport>) -> Report {
        let secs = info.elapsed.as_secs_f64().max(1e-9);
        Report {
            mode: info.mode,
            addr: info.addr,
            concurrency: info.concurrency,
            connections: info.connections,
            interrupted: info.interrupted,
            duration_s: info.elapsed.as_secs_f64(),
            calls: stats.calls,
            calls_per_s: stats.calls as f64 / secs,
            users: stats.users,
            users_per_s: stats.users as f64 / secs,
            mb_per_s: stats.bytes as f64 / secs / 1e6,
            bytes: stats.bytes,
            rows_added: stats.rows_added,
            rows_failed: stats.rows_failed,
            codes: stats.codes,
            errors: stats.errors,
            latency: Latency::of(&stats.latency),
            propagation: Latency::of(&stats.propagation),
            generator_cpu_s: info.cpu.as_secs_f64(),
            generator_cores: info.cpu.as_secs_f64() / secs,
            verify,
        }
    }

    /// The human-readable report.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let mode = format!("{:?}", self.mode).to_lowercase();
        let _ = writeln!(
            out,
            "{mode} against {}: {} workers over {} connection(s){}",
            self.addr,
            self.concurrency,
            self.connections,
            if self.interrupted {
                " (interrupted)"
            } else {
                ""
            }
        );
        let _ = writeln!(out, "  duration    {:.3} s", self.duration_s);
        let _ = writeln!(
            out,
            "  calls       {} ({:.1}/s)",
            self.calls, self.calls_per_s
        );
        let _ = writeln!(
            out,
            "  users       {} ({:.0}/s, {:.1} MB/s)",
            self.users, self.users_per_s, self.mb_per_s
        );
        if self.mode == Mode::Bulk {
            let _ = writeln!(
                out,
                "  rows        {} added, {} failed",
                self.rows_added, self.rows_failed
            );
        }
        for (name, latency) in [
            ("latency", &self.latency),
            ("propagation", &self.propagation),
        ] {
            if let Some(l) = latency {
                let _ = writeln!(
                    out,
                    "  {name:<11} p50 {:.3} ms  p90 {:.3}  p95 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}  (mean {:.3}, n={})",
                    l.p50_ms, l.p90_ms, l.p95_ms, l.p99_ms, l.p999_ms, l.max_ms, l.mean_ms, l.count
                );
            }
        }
        let codes: Vec<String> = self.codes.iter().map(|(c, n)| format!("{c} {n}")).collect();
        let _ = writeln!(out, "  status      {}", codes.join(", "));
        for error in &self.errors {
            let _ = writeln!(out, "  error       {error}");
        }
        let _ = writeln!(
            out,
            "  generator   {:.2} s CPU ({:.2} cores)",
            self.generator_cpu_s, self.generator_cores
        );
        if let Some(v) = &self.verify {
            let _ = writeln!(
                out,
                "  verify      {}: {}",
                if v.ok { "ok" } else { "FAILED" },
                v.detail
            );
        }
        out
    }
}

/// CPU time (user + system) this process has used so far.
pub fn process_cpu() -> Duration {
    // Fields 14 and 15 of /proc/self/stat, in clock ticks; the process name
    // (field 2) may hold spaces, so count from the closing parenthesis.
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return Duration::ZERO;
    };
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
        return Duration::ZERO;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i)?.parse::<u64>().ok())
        .sum();
    // Linux reports these in USER_HZ, which is 100 on every platform it runs on.
    const USER_HZ: u64 = 100;
    Duration::from_millis(ticks * 1000 / USER_HZ)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_names_follow_grpc() {
        assert_eq!(code_name(tonic::Code::Ok), "OK");
        assert_eq!(code_name(tonic::Code::AlreadyExists), "ALREADY_EXISTS");
        assert_eq!(code_name(tonic::Code::Unavailable), "UNAVAILABLE");
    }

    #[test]
    fn merging_adds_up_and_keeps_errors_distinct() {
        let mut a = Stats::default();
        a.call(Duration::from_millis(1), tonic::Code::Ok);
        a.error("x");
        let mut b = Stats::default();
        b.call(Duration::from_millis(3), tonic::Code::NotFound);
        b.error("x");
        b.error("y");
        a.merge(b);
        assert_eq!(a.calls, 2);
        assert_eq!(a.latency.len(), 2);
        assert_eq!(a.codes["OK"], 1);
        assert_eq!(a.codes["NOT_FOUND"], 1);
        assert_eq!(a.errors, ["x", "y"]);
    }
}
