//! The gauges that count what the server holds open (calls in flight, SyncUsers
//! subscribers), the bounded pools of slots they count (past a cap, work is
//! refused at once, never queued), and the counts of work refused (and of
//! calls whose handler panicked).

use std::sync::{
    Arc,
    atomic::{AtomicU64, AtomicUsize, Ordering},
};

use tokio::sync::Notify;

/// Live counts of what the server holds open, shared with whoever wants to
/// watch them (tests, and anything exporting metrics). Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Gauges {
    inner: Arc<GaugesInner>,
}

#[derive(Debug, Default)]
struct GaugesInner {
    in_flight: AtomicUsize,
    subscribers: AtomicUsize,
    /// Woken whenever a count changes.
    changed: Notify,
    refused_in_flight: AtomicU64,
    refused_subscribers: AtomicU64,
    refused_auth: AtomicU64,
    lagged: AtomicU64,
    panicked_calls: AtomicU64,
}

/// A limit that refuses work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// `--max-in-flight-calls`.
    InFlight,
    /// `--max-subscribers`.
    Subscribers,
    /// The bearer token (`--auth-token-file`).
    Auth,
}

impl Limit {
    pub const ALL: [Limit; 3] = [Limit::InFlight, Limit::Subscribers, Limit::Auth];

    /// Its name, as a metric label.
    pub fn name(self) -> &'static str {
        match self {
            Limit::InFlight => "in_flight",
            Limit::Subscribers => "subscribers",
            Limit::Auth => "auth",
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Gauge {
    InFlight,
    Subscribers,
}

impl Gauges {
    /// UserService calls whose response is not finished yet (streams
    /// included).
    pub fn in_flight_calls(&self) -> usize {
        self.inner.in_flight.load(Ordering::Acquire)
    }

    /// Open SyncUsers streams.
    pub fn subscribers(&self) -> usize {
        self.inner.subscribers.load(Ordering::Acquire)
    }

    /// Calls refused by `limit` since the start.
    pub fn refused(&self, limit: Limit) -> u64 {
        self.refusals(limit).load(Ordering::Relaxed)
    }

    /// Counts a call refused by `limit`.
    pub fn count_refused(&self, limit: Limit) {
        self.refusals(limit).fetch_add(1, Ordering::Relaxed);
    }

    /// SyncUsers streams ended for falling too far behind the change feed.
    pub fn lagged(&self) -> u64 {
        self.inner.lagged.load(Ordering::Relaxed)
    }

    /// Calls whose handler (or response stream) panicked, and that ended
    /// with `INTERNAL` instead.
    pub fn panicked_calls(&self) -> u64 {
        self.inner.panicked_calls.load(Ordering::Relaxed)
    }

    /// Counts a call whose handler panicked.
    pub fn count_panicked_call(&self) {
        self.inner.panicked_calls.fetch_add(1, Ordering::Relaxed);
    }

    fn refusals(&self, limit: Limit) -> &AtomicU64 {
        match limit {
            Limit::InFlight => &self.inner.refused_in_flight,
            Limit::Subscribers => &self.inner.refused_subscribers,
            Limit::Auth => &self.inner.refused_auth,
        }
    }

    /// Waits until `done(self)` holds, re-checking whenever a count changes.
    pub async fn wait_until(&self, done: impl Fn(&Gauges) -> bool) {
        loop {
            let changed = self.inner.changed.notified();
            let mut changed = std::pin::pin!(changed);
            // Registered before the check, so a change in between is seen.
            changed.as_mut().enable();
            if done(self) {
                return;
            }
            changed.await;
        }
    }

    /// A pool of at most `max` in-flight call slots counted by this gauge.
    pub fn in_flight_slots(&self, max: usize) -> Slots {
        Slots {
            gauges: self.clone(),
            gauge: Gauge::InFlight,
            max,
        }
    }

    /// A pool of at most `max` subscriber slots counted by this gauge.
    pub fn subscriber_slots(&self, max: usize) -> Slots {
        Slots {
            gauges: self.clone(),
            gauge: Gauge::Subscribers,
            max,
        }
    }

    fn counter(&self, gauge: Gauge) -> &AtomicUsize {
        match gauge {
            Gauge::InFlight => &self.inner.in_flight,
            Gauge::Subscribers => &self.inner.subscribers,
        }
    }
}

/// A bounded pool of slots, counted by one of the [`Gauges`].
#[derive(Debug, Clone)]
pub struct Slots {
    gauges: Gauges,
    gauge: Gauge,
    max: usize,
}

impl Slots {
    /// Takes a slot, or returns `None` at once when all are taken (and
    /// counts the refusal): the caller refuses the work instead of waiting
    /// for a slot.
    pub fn try_take(&self) -> Option<Slot> {
        let taken = self.gauges.counter(self.gauge).fetch_update(
            Ordering::AcqRel,
            Ordering::Acquire,
            |n| (n < self.max).then_some(n + 1),
        );
        if taken.is_err() {
            self.gauges.count_refused(match self.gauge {
                Gauge::InFlight => Limit::InFlight,
                Gauge::Subscribers => Limit::Subscribers,
            });
            return None;
        }
        self.gauges.inner.changed.notify_waiters();
        Some(Slot {
            gauges: self.gauges.clone(),
            gauge: self.gauge,
        })
    }
}

/// One taken slot; given back when dropped.
#[derive(Debug)]
pub struct Slot {
    gauges: Gauges,
    gauge: Gauge,
}

impl Slot {
    /// Counts the subscriber holding this slot as ended for lagging.
    pub fn count_lagged(&self) {
        self.gauges.inner.lagged.fetch_add(1, Ordering::Relaxed);
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.gauges
            .counter(self.gauge)
            .fetch_sub(1, Ordering::AcqRel);
        self.gauges.inner.changed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn slots_refuse_past_the_cap_and_come_back_on_drop() {
        let gauges = Gauges::default();
        let slots = gauges.in_flight_slots(2);
        let a = slots.try_take().unwrap();
        let b = slots.try_take().unwrap();
        assert!(slots.try_take().is_none());
        assert_eq!(gauges.in_flight_calls(), 2);
        drop(a);
        assert_eq!(gauges.in_flight_calls(), 1);
        let _c = slots.try_take().unwrap();
        drop(b);
        assert_eq!(gauges.in_flight_calls(), 1);
        assert_eq!(gauges.subscribers(), 0);
    }

    #[tokio::test]
    async fn wait_until_wakes_on_release() {
        let gauges = Gauges::default();
        let slot = gauges.subscriber_slots(1).try_take().unwrap();
        let waiter = tokio::spawn({
            let gauges = gauges.clone();
            async move { gauges.wait_until(|g| g.subscribers() == 0).await }
        });
        tokio::task::yield_now().await;
        drop(slot);
        tokio::time::timeout(Duration::from_secs(10), waiter)
            .await
            .expect("woken by the release")
            .unwrap();
    }
}
