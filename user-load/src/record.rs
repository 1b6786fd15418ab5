//! Recording while the run goes: each worker records into its own
//! [`Recorder`] (no shared counters on the hot path), which keeps the
//! worker's totals ([`Stats`]) and hands each finished second to the shared
//! [`Timeline`]; the run merges the totals at the end.
//!
//! Warm-up is left out of the totals, never out of the timeline: the
//! per-second series shows the whole run, with the warm-up marked.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::stats::{
    LATENCY_MAX_US, Stats, code_name, describe, histogram, is_transport_failure, micros,
};

/// The per-second histograms only feed p50 and p99 over time: two
/// significant figures (1%) keep each second's at about 13 KB.
const SECOND_SIGFIGS: u8 = 2;

fn second_histogram() -> Histogram<u32> {
    Histogram::new_with_bounds(1, LATENCY_MAX_US, SECOND_SIGFIGS)
        .expect("constant histogram bounds are valid")
}

/// When the run started and how much of it is warm-up.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    pub start: Instant,
    pub warmup: Duration,
}

impl Clock {
    fn second(&self, at: Instant) -> usize {
        at.saturating_duration_since(self.start).as_secs() as usize
    }

    /// Whether what happens `at` counts in the totals.
    pub fn measuring(&self, at: Instant) -> bool {
        at.saturating_duration_since(self.start) >= self.warmup
    }
}

/// One second of the run.
#[derive(Debug, Clone)]
struct Second {
    ok: u64,
    failed: u64,
    units: u64,
    latency: Histogram<u32>,
    propagation: Option<Histogram<u32>>,
}

impl Second {
    fn new() -> Second {
        Second {
            ok: 0,
            failed: 0,
            units: 0,
            latency: second_histogram(),
            propagation: None,
        }
    }

    fn add(&mut self, other: &Second) {
        self.ok += other.ok;
        self.failed += other.failed;
        self.units += other.units;
        let _ = self.latency.add(&other.latency);
        if let Some(p) = &other.propagation {
            let _ = self.propagation.get_or_insert_with(second_histogram).add(p);
        }
    }

    fn clear(&mut self) {
        self.ok = 0;
        self.failed = 0;
        self.units = 0;
        self.latency.reset();
        if let Some(p) = &mut self.propagation {
            p.reset();
        }
    }
}

/// The run second by second, shared by every worker. Each worker hands over
/// a second once it is over (a lock per worker per second), or every few
/// hundred rows for the streams' counts.
#[derive(Debug)]
pub struct Timeline {
    clock: Clock,
    seconds: Mutex<Vec<Second>>,
}

/// One second of the run, as reported.
#[derive(Debug, Clone, Serialize)]
pub struct Point {
    /// Seconds since the start of the run (warm-up included).
    pub t_s: usize,
    /// How much of this second the run covered (less than 1 for the last).
    pub span_s: f64,
    pub warmup: bool,
    /// Calls (Acks, scans, streams) finished OK and failed in this second.
    pub ok: u64,
    pub failed: u64,
    /// Users carried in this second: rows sent (bulk), users listed (list),
    /// stored (add), read (get), acknowledged (sync).
    pub users: u64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// sync: p99 of Change delivery to the watchers.
    pub propagation_p99_ms: Option<f64>,
}

impl Timeline {
    pub fn new(clock: Clock) -> Arc<Timeline> {
        Arc::new(Timeline {
            clock,
            seconds: Mutex::new(Vec::new()),
        })
    }

    pub fn clock(&self) -> Clock {
        self.clock
    }

    fn add(&self, index: usize, second: &Second) {
        let Ok(mut seconds) = self.seconds.lock() else {
            return;
        };
        while seconds.len() <= index {
            seconds.push(Second::new());
        }
        seconds[index].add(second);
    }

    /// Users carried now, for the streams that count them in bulk.
    pub fn add_users(&self, users: u64) {
        let index = self.clock.second(Instant::now());
        let Ok(mut seconds) = self.seconds.lock() else {
            return;
        };
        while seconds.len() <= index {
            seconds.push(Second::new());
        }
        seconds[index].units += users;
    }

    /// The series, up to `length` of run.
    pub fn points(&self, length: Duration) -> Vec<Point> {
        let Ok(seconds) = self.seconds.lock() else {
            return Vec::new();
        };
        let count = (length.as_secs_f64().ceil() as usize).max(seconds.len());
        let ms = |h: &Histogram<u32>, q: f64| {
            (!h.is_empty()).then(|| h.value_at_quantile(q) as f64 / 1e3)
        };
        (0..count)
            .map(|i| {
                let second = seconds.get(i);
                Point {
                    t_s: i,
                    span_s: (length.as_secs_f64() - i as f64).clamp(0.0, 1.0),
                    warmup: (i as f64) < self.clock.warmup.as_secs_f64(),
                    ok: second.map_or(0, |s| s.ok),
                    failed: second.map_or(0, |s| s.failed),
                    users: second.map_or(0, |s| s.units),
                    p50_ms: second.and_then(|s| ms(&s.latency, 0.5)),
                    p99_ms: second.and_then(|s| ms(&s.latency, 0.99)),
                    propagation_p99_ms: second
                        .and_then(|s| s.propagation.as_ref())
                        .and_then(|p| ms(p, 0.99)),
                }
            })
            .collect()
    }
}

/// Counters the progress display reads while the run goes.
#[derive(Debug, Default)]
pub struct Live {
    /// Units finished: users (bulk), calls, scans, Acks.
    pub done: AtomicU64,
    /// Failed calls and aborted streams.
    pub errors: AtomicU64,
}

impl Live {
    pub fn done(&self, n: u64) {
        self.done.fetch_add(n, Ordering::Relaxed);
    }
}

/// A worker's recorder: its measured totals, and its current second.
pub struct Recorder {
    pub stats: Stats,
    timeline: Arc<Timeline>,
    live: Arc<Live>,
    index: usize,
    second: Second,
}

impl Recorder {
    pub fn new(timeline: Arc<Timeline>, live: Arc<Live>) -> Recorder {
        Recorder {
            stats: Stats::default(),
            timeline,
            live,
            index: 0,
            second: Second::new(),
        }
    }

    /// The current second, handing the last one over when it is past.
    /// `None` during warm-up.
    fn now(&mut self) -> (bool, &mut Second) {
        let now = Instant::now();
        let clock = self.timeline.clock;
        let index = clock.second(now);
        if index != self.index {
            self.timeline.add(self.index, &self.second);
            self.second.clear();
            self.index = index;
        }
        (clock.measuring(now), &mut self.second)
    }

    /// A finished call, Ack, scan or stream: its latency and status code.
    pub fn call(&mut self, latency: Duration, code: tonic::Code) {
        let ok = code == tonic::Code::Ok;
        if !ok {
            self.live.errors.fetch_add(1, Ordering::Relaxed);
        }
        let (measuring, second) = self.now();
        if ok {
            second.ok += 1;
        } else {
            second.failed += 1;
        }
        second.latency.saturating_record(micros(latency));
        if measuring {
            let stats = &mut self.stats;
            stats.calls += 1;
            stats.ok += u64::from(ok);
            stats.latency.saturating_record(micros(latency));
            *stats.codes.entry(code_name(code)).or_default() += 1;
        }
    }

    /// A call that failed with `status`: counted under its code, its message
    /// kept.
    pub fn failed(&mut self, latency: Duration, status: &tonic::Status) {
        self.call(latency, status.code());
        if self.measuring() {
            if is_transport_failure(status) {
                self.stats.transport_failures += 1;
            }
            self.stats.error(describe(status));
        }
    }

    /// A streaming call that failed with `status` once started: a failed
    /// call and an aborted stream.
    pub fn stream_failed(&mut self, latency: Duration, status: &tonic::Status) {
        self.failed(latency, status);
        *self
            .stats
            .aborted
            .entry(code_name(status.code()))
            .or_default() += 1;
    }

    /// A call that got no reply within the generator's own deadline.
    pub fn timed_out(&mut self, latency: Duration, what: &str) {
        self.call(latency, tonic::Code::DeadlineExceeded);
        if self.measuring() {
            self.stats
                .error(format!("DEADLINE_EXCEEDED: {what} within --timeout"));
        }
    }

    /// A stream ended by `status` after it had started; always counted, as
    /// it says the run did not do its work.
    pub fn aborted(&mut self, what: &str, status: &tonic::Status) {
        self.live.errors.fetch_add(1, Ordering::Relaxed);
        *self
            .stats
            .aborted
            .entry(code_name(status.code()))
            .or_default() += 1;
        if is_transport_failure(status) {
            self.stats.transport_failures += 1;
        }
        self.stats.error(format!("{what}: {}", describe(status)));
    }

    /// Users carried by a call that just finished.
    pub fn users(&mut self, users: u64, bytes: u64) {
        let (measuring, second) = self.now();
        second.units += users;
        if measuring {
            self.stats.users += users;
            self.stats.bytes += bytes;
        }
    }

    /// sync: a Change reached a watcher `latency` after its upsert was sent.
    pub fn propagated(&mut self, latency: Duration) {
        let (measuring, second) = self.now();
        second
            .propagation
            .get_or_insert_with(second_histogram)
            .saturating_record(micros(latency));
        if measuring {
            self.stats
                .propagation
                .get_or_insert_with(histogram)
                .saturating_record(micros(latency));
        }
    }

    /// Records `latency` into one of the secondary histograms.
    pub fn secondary(
        &mut self,
        pick: fn(&mut Stats) -> &mut Option<Histogram<u64>>,
        latency: Duration,
    ) {
        if self.measuring() {
            pick(&mut self.stats)
                .get_or_insert_with(histogram)
                .saturating_record(micros(latency));
        }
    }

    /// An error that is not a call's status (a reply that does not add up,
    /// an unreadable line...).
    pub fn error(&mut self, message: impl Into<String>) {
        self.stats.error(message);
    }

    pub fn measuring(&self) -> bool {
        self.timeline.clock.measuring(Instant::now())
    }

    /// The worker's totals, its last second handed over.
    pub fn finish(self) -> Stats {
        self.timeline.add(self.index, &self.second);
        self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recorder(warmup: Duration) -> Recorder {
        let clock = Clock {
            start: Instant::now(),
            warmup,
        };
        Recorder::new(Timeline::new(clock), Arc::default())
    }

    #[test]
    fn merging_adds_up() {
        let mut a = recorder(Duration::ZERO);
        a.call(Duration::from_millis(1), tonic::Code::Ok);
        a.failed(
            Duration::from_millis(2),
            &tonic::Status::not_found("user \"a1\""),
        );
        let mut b = recorder(Duration::ZERO);
        b.call(Duration::from_millis(3), tonic::Code::Ok);
        b.failed(
            Duration::from_millis(2),
            &tonic::Status::not_found("user \"a2\""),
        );
        b.propagated(Duration::from_millis(1));
        let mut a = a.finish();
        a.merge(b.finish());
        assert_eq!((a.calls, a.ok, a.failed_calls()), (4, 2, 2));
        assert_eq!(a.latency.len(), 4);
        assert_eq!(a.codes["NOT_FOUND"], 2);
        assert_eq!(a.errors.kinds.len(), 1);
        assert_eq!(a.errors.kinds[0].count, 2);
        assert_eq!(a.propagation.map(|p| p.len()), Some(1));
        assert_eq!(a.transport_failures, 0);
    }

    #[test]
    fn warm_up_counts_in_the_timeline_only() {
        let mut r = recorder(Duration::from_secs(3600));
        r.call(Duration::from_millis(1), tonic::Code::Ok);
        r.users(1, 10);
        let timeline = r.timeline.clone();
        let stats = r.finish();
        assert_eq!((stats.calls, stats.users), (0, 0));
        let points = timeline.points(Duration::from_secs(1));
        assert_eq!((points[0].ok, points[0].users), (1, 1));
        assert!(points[0].warmup);
    }
}
