//! The targets while the run goes: a target whose connection fails is
//! marked down, and its workers stop sending to it (the others go on, and
//! take the units it would have had), while it is probed again with
//! backoff, as gRPC clients reconnect; when every connection to it answers
//! a health Check, it is up again and its workers resume. Each outage is
//! kept for the report.

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
    connect::{CONNECT_TIMEOUT, Transport, check_health},
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
        if !is_transport_failure(status) {
            return;
        }
        let state = &self.states[target];
        if !state.up.swap(false, Ordering::Relaxed) {
            return;
        }
        state.changes.send_replace(false);
        if let Ok(mut outages) = state.outages.lock() {
            outages.push((Instant::now(), None, describe(status)));
        }
        tokio::spawn(self.clone().reconnect(target));
    }

    /// Probes `target` with backoff until every connection to it answers,
    /// or the run is over.
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
            let mut answered = true;
            for transport in &state.transports {
                answered = match check_health(transport.clone(), CONNECT_TIMEOUT).await {
                    Ok(()) => true,
                    // Any status from the server proves the connection.
                    Err(Some(status)) => !is_transport_failure(&status),
                    Err(None) => false,
                };
                if !answered {
                    break;
                }
            }
            if answered {
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
