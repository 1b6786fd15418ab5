//! The targets while the run goes: a target whose connection fails is
//! marked down, and its workers stop sending to it (the others go on, and
//! take the units it would have had), while it is probed again with
//! backoff, as gRPC clients reconnect; when every connection to it answers
//! a health Check with SERVING, it is up again and its workers resume. A
//! stream that fails in any other way has its target checked at once (see
//! [`Targets::stream_failed`]). Each outage is kept for the report.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::{
    budget::Budget,
    connect::{CONNECT_TIMEOUT, Serving, Transport, check_health},
    stats::{describe, is_transport_failure},
};

/// gRPC's connection backoff (grpc/doc/connection-backoff.md): the first
/// retry after a second, each next one 1.6 times later, give or take 20%.
const INITIAL_BACKOFF: Duration = Duration::from_secs(1);
const BACKOFF_MULTIPLIER: f64 = 1.6;
const BACKOFF_JITTER: f64 = 0.2;

/// gRPC waits up to 120 s between attempts; a load run lasts minutes at
/// most, and a target that comes back should be back in its figures soon.
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// An outage of one target, as reported: seconds since the start of the
/// run (warm-up included).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Outage {
    pub down_at_s: f64,
    /// `None`: still down at the end of the run.
    pub up_at_s: Option<f64>,
    /// The failure that showed it down.
    pub cause: String,
}

struct State {
    /// Every connection to the target: all must answer for it to be up.
    transports: Vec<Transport>,
    /// Read on every call; `changes` wakes the workers waiting for it.
    up: AtomicBool,
    changes: watch::Sender<bool>,
    outages: Mutex<Vec<(Instant, Option<Instant>, String)>>,
}

/// Every target of the run, by its index in `--addr`.
pub struct Targets {
    states: Vec<State>,
    budget: Arc<Budget>,
    /// How long workers wait for their target before asking whether any
    /// is up at all.
    patience: Duration,
}

impl Targets {
    /// `count` targets, each with its connections, all up.
    pub fn new(
        count: usize,
        transports: Vec<(usize, Transport)>,
        budget: Arc<Budget>,
        patience: Duration,
    ) -> Arc<Targets> {
        let states = (0..count)
            .map(|index| State {
                transports: transports
                    .iter()
                    .filter(|(target, _)| *target == index)
                    .map(|(_, t)| t.clone())
                    .collect(),
                up: AtomicBool::new(true),
                changes: watch::Sender::new(true),
                outages: Mutex::new(Vec::new()),
            })
            .collect();
        Arc::new(Targets {
            states,
            budget,
            patience,
        })
    }

    pub fn is_up(&self, target: usize) -> bool {
        self.states[target].up.load(Ordering::Relaxed)
    }

    /// Waits until `target` is up. `false` when the run is over first, or
    /// when every target has been down for `patience`: then nothing can be
    /// sent, and the run ends.
    pub async fn wait_up(&self, target: usize) -> bool {
        if self.is_up(target) {
            return true;
        }
        let mut changes = self.states[target].changes.subscribe();
        loop {
            tokio::select! {
                up = changes.wait_for(|up| *up) => return up.is_ok(),
                () = self.budget.done() => return false,
                () = tokio::time::sleep(self.patience) => {
                    if !(0..self.states.len()).any(|t| self.is_up(t)) {
                        self.budget.end();
                        return false;
                    }
                }
            }
        }
    }

    /// A unit sent to `target` failed with `status`: when its connection
    /// failed, the target is marked down, and probed until it is back.
    pub fn failed(self: &Arc<Self>, target: usize, status: &tonic::Status) {
        if is_transport_failure(status) {
            self.mark_down(target, describe(status));
        }
    }

    /// A stream sent to `target` ended with `status`. A stream that fails
    /// is out of the ordinary (bulk's rows fail in its reply, not by
    /// failing the stream), and the status alone does not always tell a
    /// target that cannot take load from one that refused a stream: a
    /// server that is shutting down answers its streams UNAVAILABLE itself.
    /// So unless the connection failed, the target is asked with a health
    /// Check before another stream is opened, and marked down if it is not
    /// serving: whatever a stream's failure looks like, a target that is
    /// gone gets at most one failed stream per worker, then backoff.
    pub async fn stream_failed(self: &Arc<Self>, target: usize, status: &tonic::Status) {
        if is_transport_failure(status) {
            self.mark_down(target, describe(status));
            return;
        }
        // Once the run is over, no stream is opened again.
        if !self.is_up(target) || self.budget.is_done() {
            return;
        }
        if let Some(why) = self.unfit(target).await {
            self.mark_down(target, format!("{}; then {why}", describe(status)));
        }
    }

    /// Marks `target` down for `cause`, and starts probing it, unless it
    /// is down already.
    fn mark_down(self: &Arc<Self>, target: usize, cause: String) {
        let state = &self.states[target];
        if !state.up.swap(false, Ordering::Relaxed) {
            return;
        }
        state.changes.send_replace(false);
        if let Ok(mut outages) = state.outages.lock() {
            outages.push((Instant::now(), None, cause));
        }
        tokio::spawn(self.clone().reconnect(target));
    }

    /// Why `target` cannot take load, from one health Check on each of
    /// its connections; `None` when every one answers SERVING. A server without the health service answers
    /// UNIMPLEMENTED, which proves the connection and is taken as serving.
    async fn unfit(&self, target: usize) -> Option<String> {
        for transport in &self.states[target].transports {
            match check_health(transport.clone(), CONNECT_TIMEOUT).await {
                Ok(Serving::Yes) => {}
                Ok(Serving::No) => {
                    return Some("its health Check did not answer SERVING".to_owned());
                }
                Err(Some(status)) if !is_transport_failure(&status) => {}
                Err(Some(status)) => {
                    return Some(format!("its health Check: {}", describe(&status)));
                }
                Err(None) => {
                    return Some(format!(
                        "its health Check got no answer within {CONNECT_TIMEOUT:?}"
                    ));
                }
            }
        }
        None
    }

    /// Probes `target` with backoff until every connection to it answers
    /// SERVING, or the run is over.
    async fn reconnect(self: Arc<Self>, target: usize) {
        let state = &self.states[target];
        let mut backoff = INITIAL_BACKOFF;
        loop {
            let jitter = 1.0 + BACKOFF_JITTER * (2.0 * fastrand::f64() - 1.0);
            tokio::select! {
                () = tokio::time::sleep(backoff.mul_f64(jitter)) => {}
                () = self.budget.done() => return,
            }
            backoff = backoff.mul_f64(BACKOFF_MULTIPLIER).min(MAX_BACKOFF);
            if self.unfit(target).await.is_none() {
                if let Ok(mut outages) = state.outages.lock()
                    && let Some(last) = outages.last_mut()
                {
                    last.1 = Some(Instant::now());
                }
                state.up.store(true, Ordering::Relaxed);
                state.changes.send_replace(true);
                return;
            }
        }
    }

    /// The outages of `target`, in seconds since `start`.
    pub fn outages(&self, target: usize, start: Instant) -> Vec<Outage> {
        let since = |at: Instant| at.saturating_duration_since(start).as_secs_f64();
        let Ok(outages) = self.states[target].outages.lock() else {
            return Vec::new();
        };
        outages
            .iter()
            .map(|(down, up, cause)| Outage {
                down_at_s: since(*down),
                up_at_s: up.map(since),
                cause: cause.clone(),
            })
            .collect()
    }
}
