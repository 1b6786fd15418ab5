//! Recording while the run goes: each worker records into its own
//! [`Recorder`] (no shared counters on the hot path), which keeps the
//! worker's totals ([`Stats`]) and hands each finished slot of time to the
//! shared [`Timeline`]; the run merges the totals at the end.
//!
//! Warm-up is left out of the totals, never out of the timeline: the
//! series shows the whole run, with the warm-up marked.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use hdrhistogram::Histogram;

use crate::{
    series::{Slot, Timeline},
    stats::{NOT_LISTED, Stats, code_name, describe, histogram, is_transport_failure, micros},
};

/// Counters the progress display reads while the run goes.
#[derive(Debug, Default)]
pub struct Live {
    /// Units finished: users (bulk), calls, scans, Acks.
    pub done: AtomicU64,
    /// Failed units and aborted streams.
    pub errors: AtomicU64,
}

impl Live {
    pub fn done(&self, n: u64) {
        self.done.fetch_add(n, Ordering::Relaxed);
    }
}

/// A failed row, as a BulkAddUsers reply lists it.
pub struct RowError<'a> {
    pub code: tonic::Code,
    pub message: &'a str,
}

/// A worker's recorder: its measured totals, and its current slot.
pub struct Recorder {
    pub stats: Stats,
    timeline: Arc<Timeline>,
    live: Arc<Live>,
    /// The current slot: its start (ms since the epoch), its length, what
    /// happened in it.
    slot_ms: u64,
    step_ms: u64,
    slot: Slot,
}

impl Recorder {
    pub fn new(timeline: Arc<Timeline>, live: Arc<Live>) -> Recorder {
        Recorder {
            stats: Stats::default(),
            timeline,
            live,
            slot_ms: 0,
            step_ms: 0,
            slot: Slot::default(),
        }
    }

    /// The current slot, handing the last one over when it is past, and
    /// whether the run is past its warm-up.
    fn now(&mut self) -> (bool, &mut Slot) {
        let now = Instant::now();
        let clock = self.timeline.clock();
        let ms = clock.unix_ms(now);
        if !(self.slot_ms..self.slot_ms + self.step_ms).contains(&ms) {
            self.hand_over();
            self.step_ms = self.timeline.step_ms();
            self.slot_ms = ms / self.step_ms * self.step_ms;
        }
        (clock.measuring(now), &mut self.slot)
    }

    fn hand_over(&mut self) {
        if self.step_ms > 0 {
            self.timeline.add(self.slot_ms, &self.slot);
        }
        self.slot = Slot::default();
    }

    /// A unit (call, Ack, scan) answered with `code` after `latency`.
    pub fn call(&mut self, latency: Duration, code: tonic::Code) {
        let ok = code == tonic::Code::Ok;
        if !ok {
            self.live.errors.fetch_add(1, Ordering::Relaxed);
        }
        let (measuring, slot) = self.now();
        if ok {
            slot.ok += 1;
        } else {
            slot.failed += 1;
        }
        slot.record_latency(latency);
        if measuring {
            let stats = &mut self.stats;
            stats.calls += 1;
            stats.ok += u64::from(ok);
            stats.latency.saturating_record(micros(latency));
            *stats.codes.entry(code_name(code)).or_default() += 1;
        }
    }

    /// A call that failed with `status`: answered under its code, its
    /// message kept; or, when its connection failed, a unit with no
    /// answer, never timed.
    pub fn failed(&mut self, latency: Duration, status: &tonic::Status) {
        if is_transport_failure(status) {
            self.no_answer(1, status);
            return;
        }
        self.call(latency, status.code());
        if self.measuring() {
            self.stats.failed(describe(status), 1);
        }
    }

    /// `units` that got no answer: their connection failed with `status`.
    pub fn no_answer(&mut self, units: u64, status: &tonic::Status) {
        self.live.errors.fetch_add(units, Ordering::Relaxed);
        let (measuring, slot) = self.now();
        slot.failed += units;
        // Their cause goes with the errors, not with the failed units'
        // kinds: those explain `failed_calls`, which these are not part of.
        // A stream that failed before it carried a row has no unit to
        // count; its target's outage gives the cause.
        if measuring && units > 0 {
            self.stats.no_answer += units;
            self.stats.error_count(describe(status), units);
        }
    }

    /// A streaming call that failed with `status` once started: a failed
    /// unit (or one with no answer) and an aborted stream.
    pub fn stream_failed(&mut self, latency: Duration, status: &tonic::Status) {
        self.failed(latency, status);
        self.count_aborted(status);
    }

    fn count_aborted(&mut self, status: &tonic::Status) {
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
                .failed(format!("DEADLINE_EXCEEDED: {what} within --timeout"), 1);
        }
    }

    /// A stream ended by `status` after it had started; always counted, as
    /// it says the run did not do its work.
    pub fn aborted(&mut self, what: &str, status: &tonic::Status) {
        self.live.errors.fetch_add(1, Ordering::Relaxed);
        self.count_aborted(status);
        self.stats.error(format!("{what}: {}", describe(status)));
    }

    /// bulk: a stream's reply: `added` rows, `failed` of them failed, the
    /// first of those listed in `errors`.
    pub fn rows(&mut self, added: u64, failed: u64, errors: &[RowError<'_>]) {
        self.live.errors.fetch_add(failed, Ordering::Relaxed);
        let (measuring, slot) = self.now();
        slot.ok += added;
        slot.failed += failed;
        if !measuring {
            return;
        }
        let stats = &mut self.stats;
        stats.calls += added + failed;
        stats.ok += added;
        stats.rows_added += added;
        stats.rows_failed += failed;
        if added > 0 {
            *stats.codes.entry(code_name(tonic::Code::Ok)).or_default() += added;
        }
        for error in errors {
            *stats.codes.entry(code_name(error.code)).or_default() += 1;
            stats.failed(format!("{}: {}", code_name(error.code), error.message), 1);
        }
        let unlisted = failed.saturating_sub(errors.len() as u64);
        if unlisted > 0 {
            *stats.codes.entry(NOT_LISTED.to_owned()).or_default() += unlisted;
            stats.failed(
                "rows failed without being listed (a reply lists the first 100 failures of \
                 its stream)"
                    .into(),
                unlisted,
            );
        }
    }

    /// bulk: `rows` sent on a stream that ended with `status` instead of a
    /// reply: failed with its code, or with no answer when the connection
    /// failed; whether the server stored them is not known.
    pub fn rows_lost(&mut self, rows: u64, status: &tonic::Status) {
        if self.measuring() {
            self.stats.rows_unconfirmed += rows;
        }
        if is_transport_failure(status) {
            self.no_answer(rows, status);
            return;
        }
        self.live.errors.fetch_add(rows, Ordering::Relaxed);
        let (measuring, slot) = self.now();
        slot.failed += rows;
        if measuring {
            let stats = &mut self.stats;
            stats.calls += rows;
            *stats.codes.entry(code_name(status.code())).or_default() += rows;
            stats.failed(
                format!("rows of a stream that failed: {}", describe(status)),
                rows,
            );
        }
    }

    /// bulk: a stream that ended with `code` after `latency`.
    pub fn stream(&mut self, latency: Duration, code: tonic::Code) {
        if self.measuring() {
            self.record(|s| &mut s.streams, latency);
            *self.stats.stream_codes.entry(code_name(code)).or_default() += 1;
        }
        if code != tonic::Code::Ok {
            self.count_aborted(&tonic::Status::new(code, ""));
        }
    }

    /// bulk: a batch of rows that took `took` to go out (the timeline has
    /// it already, from the stream).
    pub fn batch(&mut self, took: Duration) {
        if self.measuring() {
            self.stats.latency.saturating_record(micros(took));
        }
    }

    /// Open loop: a call that started `late` after it was due.
    pub fn late(&mut self, late: Duration) {
        if self.measuring() {
            self.record(|s| &mut s.lateness, late);
        }
    }

    /// Users carried by a call that just finished.
    pub fn users(&mut self, users: u64, bytes: u64) {
        let (measuring, slot) = self.now();
        slot.users += users;
        if measuring {
            self.stats.users += users;
            self.stats.bytes += bytes;
        }
    }

    /// sync: a Change reached a watcher `latency` after its upsert was sent.
    pub fn propagated(&mut self, latency: Duration) {
        let (measuring, slot) = self.now();
        slot.record_propagation(latency);
        if measuring {
            self.record(|s| &mut s.propagation, latency);
        }
    }

    /// Records `latency` into one of the secondary histograms.
    pub fn secondary(
        &mut self,
        pick: fn(&mut Stats) -> &mut Option<Histogram<u64>>,
        latency: Duration,
    ) {
        if self.measuring() {
            self.record(pick, latency);
        }
    }

    fn record(&mut self, pick: fn(&mut Stats) -> &mut Option<Histogram<u64>>, latency: Duration) {
        pick(&mut self.stats)
            .get_or_insert_with(histogram)
            .saturating_record(micros(latency));
    }

    /// A unit answered with an error, for `message` (sync's Acks).
    pub fn unit_failed(&mut self, message: String) {
        if self.measuring() {
            self.stats.failed(message, 1);
        }
    }

    /// An error that is not a unit's status (a reply that does not add up,
    /// an unreadable line...).
    pub fn error(&mut self, message: impl Into<String>) {
        self.stats.error(message);
    }

    pub fn measuring(&self) -> bool {
        self.timeline.clock().measuring(Instant::now())
    }

    /// The worker's totals, its last slot handed over.
    pub fn finish(mut self) -> Stats {
        self.hand_over();
        self.stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::series::Clock;

    fn recorder(warmup: Duration) -> Recorder {
        Recorder::new(Timeline::new(Clock::now(warmup)), Arc::default())
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
        assert_eq!(a.no_answer, 0);
    }

    #[test]
    fn a_failed_connection_is_counted_apart_and_never_timed() {
        let mut r = recorder(Duration::ZERO);
        r.call(Duration::from_millis(1), tonic::Code::Ok);
        let refused = tonic::Status::from_error(Box::new(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "connection refused",
        )));
        r.failed(Duration::from_micros(20), &refused);
        r.rows_lost(500, &refused);
        let stats = r.finish();
        assert_eq!((stats.calls, stats.no_answer), (1, 501));
        assert_eq!(stats.latency.len(), 1);
        assert_eq!(stats.codes.len(), 1);
        assert_eq!(stats.rows_unconfirmed, 500);
    }

    #[test]
    fn rows_are_units_and_unlisted_failures_are_counted() {
        let mut r = recorder(Duration::ZERO);
        let errors = [RowError {
            code: tonic::Code::ResourceExhausted,
            message: "database or disk is full",
        }];
        r.rows(30, 170, &errors);
        let stats = r.finish();
        assert_eq!(
            (stats.calls, stats.ok, stats.failed_calls()),
            (200, 30, 170)
        );
        assert_eq!(stats.codes["OK"], 30);
        assert_eq!(stats.codes["RESOURCE_EXHAUSTED"], 1);
        assert_eq!(stats.codes[NOT_LISTED], 169);
        assert_eq!(stats.errors.kinds.len(), 2);
    }

    #[test]
    fn warm_up_counts_in_the_timeline_only() {
        let mut r = recorder(Duration::from_secs(3600));
        r.call(Duration::from_millis(1), tonic::Code::Ok);
        r.users(1, 10);
        let timeline = r.timeline.clone();
        let stats = r.finish();
        assert_eq!((stats.calls, stats.users), (0, 0));
        let (_, points) = timeline.points(Duration::from_millis(5));
        let ok: u64 = points.iter().map(|p| p.ok).sum();
        let users: u64 = points.iter().map(|p| p.users).sum();
        assert_eq!((ok, users), (1, 1));
        assert!(points.iter().all(|p| p.warmup));
    }
}
