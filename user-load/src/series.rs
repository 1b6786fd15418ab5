//! The run over time: counts and latencies in slots of wall-clock time,
//! shared by every worker ([`Timeline`]), and the series the report shows
//! ([`Point`]).
//!
//! Slots start on multiples of their length since the Unix epoch, so that
//! the series of runs on several machines line up slot for slot when
//! merged. They start 10 ms long, and grow (each length a multiple of the
//! last) when a run outgrows [`MAX_SLOTS`]; the report then picks the
//! shortest length that gives at most [`MAX_POINTS`] points, so that a
//! 1-second run is drawn in 50 ms steps and a 10-minute run in 10 s steps.
//! A slot the run covers only in part (its first and last) is weighted by
//! the time it covers.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::{hdr, stats::micros};

/// The slot lengths, in milliseconds: each divides the next, so that
/// slots of one length add up exactly into slots of a longer one.
const STEPS_MS: [u64; 11] = [
    10, 50, 100, 500, 1_000, 5_000, 10_000, 60_000, 300_000, 600_000, 3_600_000,
];

/// Slots kept while a run goes; past this they are merged into longer ones.
/// With a histogram of a few KB each, this bounds the timeline to a few MB.
const MAX_SLOTS: usize = 1000;

/// Points of the report's series at most: enough for a chart to show the
/// shape of a run, few enough that each point has samples.
const MAX_POINTS: u64 = 100;

/// The per-slot histograms only feed p50 and p99 over time: two significant
/// figures (1%), sized to the values recorded.
const SLOT_SIGFIGS: u8 = 2;

pub fn slot_histogram() -> Histogram<u32> {
    Histogram::new(SLOT_SIGFIGS).expect("constant significant figures are valid")
}

/// When the run started (in both clocks) and how much of it is warm-up.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    pub start: Instant,
    /// The same moment, in microseconds since the Unix epoch.
    pub start_unix_us: u64,
    pub warmup: Duration,
}

impl Clock {
    /// A clock starting now.
    pub fn now(warmup: Duration) -> Clock {
        let start_unix_us = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        Clock {
            start: Instant::now(),
            start_unix_us,
            warmup,
        }
    }

    /// `at`, in milliseconds since the Unix epoch.
    pub fn unix_ms(&self, at: Instant) -> u64 {
        (self.start_unix_us + at.saturating_duration_since(self.start).as_micros() as u64) / 1000
    }

    /// Whether what happens `at` counts in the totals.
    pub fn measuring(&self, at: Instant) -> bool {
        at.saturating_duration_since(self.start) >= self.warmup
    }
}

/// What happened in one slot.
#[derive(Debug, Clone, Default)]
pub struct Slot {
    /// Units OK and failed (or got no answer) that ended in this slot.
    pub ok: u64,
    pub failed: u64,
    /// Users carried: rows sent (bulk), listed (list), stored (add), read
    /// (get), acknowledged (sync).
    pub users: u64,
    pub latency: Option<Histogram<u32>>,
    pub propagation: Option<Histogram<u32>>,
}

fn add_histogram(into: &mut Option<Histogram<u32>>, from: &Option<Histogram<u32>>) {
    if let Some(from) = from {
        // Auto-resizing histograms of the same precision always add up.
        let _ = into.get_or_insert_with(slot_histogram).add(from);
    }
}

impl Slot {
    pub fn add(&mut self, other: &Slot) {
        self.ok += other.ok;
        self.failed += other.failed;
        self.users += other.users;
        add_histogram(&mut self.latency, &other.latency);
        add_histogram(&mut self.propagation, &other.propagation);
    }

    pub fn record_latency(&mut self, latency: Duration) {
        record(&mut self.latency, latency);
    }

    pub fn record_propagation(&mut self, latency: Duration) {
        record(&mut self.propagation, latency);
    }
}

/// Records `latency` into the histogram in `slot`, which grows to hold it
/// (`saturating_record` would clamp it to the histogram's current range).
fn record(slot: &mut Option<Histogram<u32>>, latency: Duration) {
    let h = slot.get_or_insert_with(slot_histogram);
    if h.record(micros(latency)).is_err() {
        h.saturating_record(micros(latency));
    }
}

/// Slots by their start (milliseconds since the Unix epoch), all `step_ms`
/// long.
#[derive(Debug, Clone)]
pub struct Slots {
    pub step_ms: u64,
    pub map: BTreeMap<u64, Slot>,
}

impl Slots {
    pub fn new(step_ms: u64) -> Slots {
        Slots {
            step_ms,
            map: BTreeMap::new(),
        }
    }

    /// Adds a slot starting at `start_ms` (of this length or a shorter one
    /// that divides it).
    pub fn add(&mut self, start_ms: u64, slot: &Slot) {
        let key = start_ms / self.step_ms * self.step_ms;
        self.map.entry(key).or_default().add(slot);
    }

    /// The same slots, `step_ms` long (a multiple of the current length).
    pub fn regroup(&self, step_ms: u64) -> Slots {
        let mut longer = Slots::new(step_ms.max(self.step_ms));
        for (start, slot) in &self.map {
            longer.add(*start, slot);
        }
        longer
    }
}

/// The shortest slot length, at least `least_ms`, that splits `length_ms`
/// into at most `points`.
fn step_for(least_ms: u64, length_ms: u64, points: u64) -> u64 {
    STEPS_MS
        .iter()
        .copied()
        .find(|&step| step >= least_ms && length_ms.div_ceil(step) <= points)
        .unwrap_or(STEPS_MS[STEPS_MS.len() - 1])
}

/// The run slot by slot, shared by every worker. Each worker hands over a
/// slot once it is over (a lock per worker per slot), and bulk streams
/// every few hundred rows.
#[derive(Debug)]
pub struct Timeline {
    clock: Clock,
    slots: Mutex<Slots>,
}

impl Timeline {
    pub fn new(clock: Clock) -> Arc<Timeline> {
        Arc::new(Timeline {
            clock,
            slots: Mutex::new(Slots::new(STEPS_MS[0])),
        })
    }

    pub fn clock(&self) -> Clock {
        self.clock
    }

    /// The current slot length.
    pub fn step_ms(&self) -> u64 {
        self.slots.lock().map_or(STEPS_MS[0], |s| s.step_ms)
    }

    /// Adds a worker's slot, starting at `start_ms`.
    pub fn add(&self, start_ms: u64, slot: &Slot) {
        let Ok(mut slots) = self.slots.lock() else {
            return;
        };
        slots.add(start_ms, slot);
        if slots.map.len() > MAX_SLOTS {
            let longer = STEPS_MS
                .iter()
                .copied()
                .find(|&step| step > slots.step_ms)
                .unwrap_or(slots.step_ms);
            *slots = slots.regroup(longer);
        }
    }

    /// Users carried now, for the streams that count them in bulk.
    pub fn add_users(&self, users: u64) {
        let slot = Slot {
            users,
            ..Slot::default()
        };
        self.add(self.clock.unix_ms(Instant::now()), &slot);
    }

    /// A latency that ended `at` (bulk's batches, timed in the stream).
    pub fn add_latency_at(&self, at: Instant, latency: Duration) {
        let mut slot = Slot::default();
        slot.record_latency(latency);
        self.add(self.clock.unix_ms(at), &slot);
    }

    /// Every slot so far.
    pub fn slots(&self) -> Slots {
        self.slots
            .lock()
            .map_or_else(|_| Slots::new(STEPS_MS[0]), |s| s.clone())
    }

    /// The run, which lasted `elapsed`, on the wall clock.
    pub fn span(&self, elapsed: Duration) -> Span {
        Span {
            start_unix_us: self.clock.start_unix_us,
            warmup_us: self.clock.warmup.as_micros() as u64,
            end_unix_us: self.clock.start_unix_us + elapsed.as_micros() as u64,
        }
    }

    /// The series of the run, which lasted `elapsed`.
    #[cfg(test)]
    pub fn points(&self, elapsed: Duration) -> (f64, Vec<Point>) {
        self.span(elapsed).points(&self.slots())
    }
}

/// The stretch of wall-clock time a run (or runs merged) covered.
#[derive(Debug, Clone, Copy)]
pub struct Span {
    pub start_unix_us: u64,
    /// From the start, the warm-up.
    pub warmup_us: u64,
    pub end_unix_us: u64,
}

impl Span {
    /// The report's series: `slots` regrouped into at most [`MAX_POINTS`],
    /// every slot of the span present, and the slot length in seconds.
    pub fn points(&self, slots: &Slots) -> (f64, Vec<Point>) {
        let (start_ms, end_ms) = (self.start_unix_us / 1000, self.end_unix_us.div_ceil(1000));
        let step = step_for(slots.step_ms, end_ms.saturating_sub(start_ms), MAX_POINTS);
        let slots = slots.regroup(step);
        let first = start_ms / step * step;
        let last = slots
            .map
            .keys()
            .next_back()
            .copied()
            .unwrap_or(first)
            .max(end_ms.saturating_sub(1) / step * step);
        let empty = Slot::default();
        let points = (first..=last)
            .step_by(step as usize)
            .map(|slot_ms| {
                let slot = slots.map.get(&slot_ms).unwrap_or(&empty);
                // The part of the slot the run covered, in microseconds.
                let from = (slot_ms * 1000).max(self.start_unix_us);
                let to = ((slot_ms + step) * 1000).min(self.end_unix_us).max(from);
                let ms = |h: &Option<Histogram<u32>>, q: f64| {
                    h.as_ref()
                        .filter(|h| !h.is_empty())
                        .map(|h| h.value_at_quantile(q) as f64 / 1e3)
                };
                Point {
                    start_unix_ms: slot_ms,
                    t_s: (from - self.start_unix_us) as f64 / 1e6,
                    span_s: (to - from) as f64 / 1e6,
                    warmup: (from + to) / 2 < self.start_unix_us + self.warmup_us,
                    ok: slot.ok,
                    failed: slot.failed,
                    users: slot.users,
                    p50_ms: ms(&slot.latency, 0.5),
                    p99_ms: ms(&slot.latency, 0.99),
                    propagation_p99_ms: ms(&slot.propagation, 0.99),
                    latency_histogram: slot.latency.clone(),
                    propagation_histogram: slot.propagation.clone(),
                }
            })
            .collect();
        (step as f64 / 1e3, points)
    }
}

/// One slot of the run, as reported.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Point {
    /// When the slot starts, in milliseconds since the Unix epoch: the
    /// slots of runs on several machines line up on these.
    pub start_unix_ms: u64,
    /// Where the run's part of the slot starts, in seconds since the start
    /// of the run (warm-up included), and how long it is: less than the
    /// slot for the first and the last.
    #[serde(default, skip_deserializing)]
    pub t_s: f64,
    #[serde(default, skip_deserializing)]
    pub span_s: f64,
    #[serde(default, skip_deserializing)]
    pub warmup: bool,
    /// Units (calls, Acks, scans, rows) that ended OK, and that failed or
    /// got no answer, in this slot.
    pub ok: u64,
    pub failed: u64,
    /// Users carried in this slot: rows sent (bulk), users listed (list),
    /// stored (add), read (get), acknowledged (sync).
    pub users: u64,
    #[serde(default, skip_deserializing)]
    pub p50_ms: Option<f64>,
    #[serde(default, skip_deserializing)]
    pub p99_ms: Option<f64>,
    /// sync: p99 of Change delivery to the watchers.
    #[serde(default, skip_deserializing)]
    pub propagation_p99_ms: Option<f64>,
    /// The latencies that ended in this slot, and the deliveries (sync),
    /// in HdrHistogram's serialized form.
    #[serde(with = "hdr::optional", default)]
    pub latency_histogram: Option<Histogram<u32>>,
    #[serde(with = "hdr::optional", default)]
    pub propagation_histogram: Option<Histogram<u32>>,
}

impl Point {
    /// The slot this point was made of.
    pub fn slot(&self) -> Slot {
        Slot {
            ok: self.ok,
            failed: self.failed,
            users: self.users,
            latency: self.latency_histogram.clone(),
            propagation: self.propagation_histogram.clone(),
        }
    }

    /// `count` per second over the part of the slot the run covered; none
    /// for a slot covered less than half, whose rate would be mostly noise.
    pub fn rate(&self, count: u64, step_s: f64) -> Option<f64> {
        (self.span_s >= step_s / 2.0).then(|| count as f64 / self.span_s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_runs_get_short_steps_and_long_runs_long_ones() {
        assert_eq!(step_for(10, 1_200, MAX_POINTS), 50);
        assert_eq!(step_for(10, 10_000, MAX_POINTS), 100);
        assert_eq!(step_for(10, 60_000, MAX_POINTS), 1_000);
        assert_eq!(step_for(10, 600_000, MAX_POINTS), 10_000);
        assert_eq!(step_for(500, 1_200, MAX_POINTS), 500);
        for pair in STEPS_MS.windows(2) {
            assert_eq!(pair[1] % pair[0], 0, "{pair:?}");
        }
    }

    #[test]
    fn slot_latencies_keep_their_values() {
        let mut slots = Slots::new(10);
        let mut slot = Slot::default();
        for ms in [1, 2, 3, 250, 60_000] {
            slot.record_latency(Duration::from_millis(ms));
        }
        slots.add(1_000_000, &slot);
        let span = Span {
            start_unix_us: 1_000_000_000,
            warmup_us: 0,
            end_unix_us: 1_000_010_000,
        };
        let (_, points) = span.points(&slots);
        let p50 = points[0].p50_ms.unwrap();
        let p99 = points[0].p99_ms.unwrap();
        assert!((p50 - 3.0).abs() < 0.03, "{p50}");
        assert!((p99 - 60_000.0).abs() < 600.0, "{p99}");
    }

    #[test]
    fn partial_slots_are_weighted_by_the_time_the_run_covered() {
        let mut slots = Slots::new(10);
        // A run from 1000.030 s to 1001.230 s since the epoch, 100 OK
        // units every 10 ms.
        for ms in (1_000_030..1_001_230).step_by(10) {
            slots.add(
                ms,
                &Slot {
                    ok: 100,
                    ..Slot::default()
                },
            );
        }
        let span = Span {
            start_unix_us: 1_000_030_000,
            warmup_us: 0,
            end_unix_us: 1_001_230_000,
        };
        let (step_s, points) = span.points(&slots);
        assert_eq!(step_s, 0.05);
        assert_eq!(points.len(), 25);
        assert_eq!((points[0].t_s, points[0].span_s), (0.0, 0.02));
        assert_eq!(points[0].ok, 200);
        // Every covered part runs at the same rate; the last slot, covered
        // for 30 ms, is no spike.
        for p in &points {
            if let Some(rate) = p.rate(p.ok, step_s) {
                assert!((rate - 10_000.0).abs() < 1e-6, "{p:?}");
            }
        }
        let total: u64 = points.iter().map(|p| p.ok).sum();
        assert_eq!(total, 120 * 100);
    }
}
