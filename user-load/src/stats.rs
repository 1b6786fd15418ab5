//! What a run measures: the totals of a worker, merged into the run's
//! ([`Stats`]), the errors grouped by kind, and the summaries the report
//! shows (latency percentiles and distributions).

use std::{collections::BTreeMap, error::Error, time::Duration};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Latencies are recorded in microseconds, from 1 µs to an hour, to three
/// significant figures (0.1%).
pub const LATENCY_MAX_US: u64 = 3_600_000_000;
const LATENCY_SIGFIGS: u8 = 3;

/// Distinct kinds of error message kept for the report; the rest are only
/// counted.
const MAX_ERROR_KINDS: usize = 10;

pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_MAX_US, LATENCY_SIGFIGS)
        .expect("constant histogram bounds are valid")
}

pub fn micros(d: Duration) -> u64 {
    (d.as_micros() as u64).clamp(1, LATENCY_MAX_US)
}

/// Adds `other` into the histogram in `slot`, creating it when needed.
pub fn merge_into(slot: &mut Option<Histogram<u64>>, other: Option<Histogram<u64>>) {
    if let Some(other) = other {
        // Same bounds on both sides, so adding cannot fail.
        let _ = slot.get_or_insert_with(histogram).add(&other);
    }
}

/// `OK`, `ALREADY_EXISTS`, ...: the names gRPC status codes go by.
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

/// Whether `status` was made on this side because the connection failed,
/// rather than sent by the server: tonic keeps the transport error as the
/// source of such a status, and none for one read from the server's reply.
pub fn is_transport_failure(status: &tonic::Status) -> bool {
    status.source().is_some()
}

/// A status as a sentence: its code, its message, and for a transport
/// failure the causes (a failed TLS handshake is only "transport error" on
/// its own).
pub fn describe(status: &tonic::Status) -> String {
    let mut text = format!("{}: {}", code_name(status.code()), status.message());
    let mut source = status.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// Error messages grouped by their shape: messages that differ only in
/// numbers (ids, counts, line numbers) are one kind, counted.
#[derive(Debug, Clone, Default)]
pub struct Errors {
    pub kinds: Vec<ErrorKind>,
    /// Errors of kinds past the first [`MAX_ERROR_KINDS`].
    pub others: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorKind {
    /// The first message of this kind.
    pub message: String,
    pub count: u64,
    #[serde(skip)]
    shape: String,
}

/// `message` with every run of digits replaced by `#`.
fn shape(message: &str) -> String {
    let mut shape = String::with_capacity(message.len());
    for c in message.chars() {
        if c.is_ascii_digit() {
            if !shape.ends_with('#') {
                shape.push('#');
            }
        } else {
            shape.push(c);
        }
    }
    shape
}

impl Errors {
    pub fn add(&mut self, message: String, count: u64) {
        let shape = shape(&message);
        if let Some(kind) = self.kinds.iter_mut().find(|k| k.shape == shape) {
            kind.count += count;
        } else if self.kinds.len() < MAX_ERROR_KINDS {
            self.kinds.push(ErrorKind {
                message,
                count,
                shape,
            });
        } else {
            self.others += count;
        }
    }

    pub fn merge(&mut self, other: Errors) {
        for kind in other.kinds {
            self.add(kind.message, kind.count);
        }
        self.others += other.others;
    }

    pub fn is_empty(&self) -> bool {
        self.kinds.is_empty()
    }
}

/// One worker's measured totals (or, merged, the run's).
///
/// Each mode has a unit of work, which these count: a call (add, get), a
/// scan (list), a row (bulk), an upsert and its Ack (sync). A unit either
/// got an answer (`calls`, by status code in `codes`, `ok` of them OK) or
/// none, its connection having failed (`no_answer`): those are counted
/// apart, and never timed, so that failing fast cannot make a run look
/// fast.
#[derive(Debug, Clone)]
pub struct Stats {
    /// The mode's main latency, of answered units only: per call (add,
    /// get), per scan (list), per Ack (sync), per batch of rows (bulk).
    pub latency: Histogram<u64>,
    /// Open loop: how late each call (upsert) started after it was due.
    pub lateness: Option<Histogram<u64>>,
    /// sync: from sending an upsert to a watcher receiving its Change.
    pub propagation: Option<Histogram<u64>>,
    /// bulk: from a stream's end of input to its reply.
    pub reply_wait: Option<Histogram<u64>>,
    /// list: from a scan's request to its first user.
    pub first_user: Option<Histogram<u64>>,
    /// bulk: each stream, from opening it to its reply.
    pub streams: Option<Histogram<u64>>,
    /// bulk: streams by the status that ended them.
    pub stream_codes: BTreeMap<String, u64>,
    /// Units that got an answer, by status code name. For bulk, rows the
    /// server reported failed without listing them (a reply lists the
    /// first 100 of each stream) are under [`NOT_LISTED`].
    pub codes: BTreeMap<String, u64>,
    /// Every error; `failures` only those of failed units, by status and
    /// message: why the units failed.
    pub errors: Errors,
    pub failures: Errors,
    /// Units that got an answer, and how many of them were OK.
    pub calls: u64,
    pub ok: u64,
    /// Units that got no answer: their connection failed.
    pub no_answer: u64,
    /// Streams ended by an error status after they had started, by code.
    pub aborted: BTreeMap<String, u64>,
    /// Users carried: rows sent (bulk), users stored (add), read (get,
    /// list), acknowledged (sync).
    pub users: u64,
    /// bulk: rows the server reported added and failed, and rows sent on
    /// streams that ended without a reply (their fate unknown).
    pub rows_added: u64,
    pub rows_failed: u64,
    pub rows_unconfirmed: u64,
    /// sync: upserts sent that never got their Ack.
    pub unanswered: u64,
    /// Encoded bytes of the users carried.
    pub bytes: u64,
}

/// The code under which bulk counts rows that failed unlisted.
pub const NOT_LISTED: &str = "NOT_LISTED";

impl Default for Stats {
    fn default() -> Self {
        Stats {
            latency: histogram(),
            lateness: None,
            propagation: None,
            reply_wait: None,
            first_user: None,
            streams: None,
            stream_codes: BTreeMap::new(),
            codes: BTreeMap::new(),
            errors: Errors::default(),
            failures: Errors::default(),
            calls: 0,
            ok: 0,
            no_answer: 0,
            aborted: BTreeMap::new(),
            users: 0,
            rows_added: 0,
            rows_failed: 0,
            rows_unconfirmed: 0,
            unanswered: 0,
            bytes: 0,
        }
    }
}

impl Stats {
    /// Units answered with an error status.
    pub fn failed_calls(&self) -> u64 {
        self.calls - self.ok
    }

    /// One error that is not a failed unit.
    pub fn error(&mut self, message: impl Into<String>) {
        self.error_count(message.into(), 1);
    }

    /// `count` of one kind of error that is not a failed unit.
    pub fn error_count(&mut self, message: String, count: u64) {
        self.errors.add(message, count);
    }

    /// `count` units that failed for `message` (a status and its message).
    pub fn failed(&mut self, message: String, count: u64) {
        self.failures.add(message.clone(), count);
        self.errors.add(message, count);
    }

    pub fn merge(&mut self, other: Stats) {
        let _ = self.latency.add(&other.latency);
        merge_into(&mut self.lateness, other.lateness);
        merge_into(&mut self.propagation, other.propagation);
        merge_into(&mut self.reply_wait, other.reply_wait);
        merge_into(&mut self.first_user, other.first_user);
        merge_into(&mut self.streams, other.streams);
        for (map, other) in [
            (&mut self.codes, other.codes),
            (&mut self.aborted, other.aborted),
            (&mut self.stream_codes, other.stream_codes),
        ] {
            for (code, n) in other {
                *map.entry(code).or_default() += n;
            }
        }
        self.errors.merge(other.errors);
        self.failures.merge(other.failures);
        self.calls += other.calls;
        self.ok += other.ok;
        self.no_answer += other.no_answer;
        self.users += other.users;
        self.rows_added += other.rows_added;
        self.rows_failed += other.rows_failed;
        self.rows_unconfirmed += other.rows_unconfirmed;
        self.unanswered += other.unanswered;
        self.bytes += other.bytes;
    }
}

/// Latency percentiles, in milliseconds.
#[derive(Debug, Clone, Serialize, Deserialize)]
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
    pub fn of(h: &Histogram<u64>) -> Option<Latency> {
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

    pub fn of_some(h: &Option<Histogram<u64>>) -> Option<Latency> {
        h.as_ref().and_then(Latency::of)
    }
}

/// Bins of a latency histogram drawn in the HTML report.
const BUCKETS: usize = 48;

/// One bin of a latency distribution, in milliseconds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Bucket {
    pub from_ms: f64,
    pub to_ms: f64,
    pub count: u64,
}

/// The distribution in `h`, in bins of equal width on a log scale from its
/// least to its largest value.
pub fn buckets(h: &Option<Histogram<u64>>) -> Vec<Bucket> {
    let Some(h) = h.as_ref().filter(|h| !h.is_empty()) else {
        return Vec::new();
    };
    let low = (h.min().max(1) as f64 / 1e3) * 0.95;
    let high = (h.max() as f64 / 1e3) * 1.05;
    let ratio = (high / low).powf(1.0 / BUCKETS as f64);
    let mut buckets: Vec<Bucket> = (0..BUCKETS)
        .map(|i| Bucket {
            from_ms: low * ratio.powi(i as i32),
            to_ms: low * ratio.powi(i as i32 + 1),
            count: 0,
        })
        .collect();
    for value in h.iter_recorded() {
        let ms = h.median_equivalent(value.value_iterated_to()) as f64 / 1e3;
        let i = ((ms / low).ln() / ratio.ln())
            .floor()
            .clamp(0.0, (BUCKETS - 1) as f64) as usize;
        buckets[i].count += value.count_at_value();
    }
    buckets
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
    fn messages_that_differ_only_in_numbers_are_one_kind() {
        let mut errors = Errors::default();
        errors.add("user \"u-0001\" already exists".into(), 1);
        errors.add("user \"u-0002\" already exists".into(), 1);
        errors.add("data line 7: expected value at column 1".into(), 1);
        errors.add("user \"u-0003\" already exists".into(), 3);
        assert_eq!(errors.kinds.len(), 2);
        assert_eq!(errors.kinds[0].message, "user \"u-0001\" already exists");
        assert_eq!(errors.kinds[0].count, 5);
        for n in 0..20 {
            errors.add(format!("kind {} {n}", "x".repeat(n)), 1);
        }
        assert_eq!(errors.kinds.len(), MAX_ERROR_KINDS);
        assert_eq!(errors.others, 12);
    }
}
