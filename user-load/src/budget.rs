//! What bounds a run: the budget of work units and the timers that end it
//! (`--duration`, Ctrl-C); `pacer.rs` hands out the units of open-loop runs.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use tokio_util::sync::CancellationToken;

use crate::pacer::Tickets;

/// Exit status of a run ended by Ctrl-C (128 + SIGINT, as shells report it).
pub const EXIT_INTERRUPTED: u8 = 130;

/// Claims units of work until the total is reached, the time is up or
/// Ctrl-C is pressed, whichever comes first.
pub struct Budget {
    total: Option<u64>,
    next: AtomicU64,
    /// Cancelled when no more work may start.
    done: CancellationToken,
    /// Set when Ctrl-C ended the run.
    interrupted: AtomicBool,
}

impl Budget {
    pub fn new(total: Option<u64>) -> Arc<Budget> {
        Arc::new(Budget {
            total,
            next: AtomicU64::new(0),
            done: CancellationToken::new(),
            interrupted: AtomicBool::new(false),
        })
    }

    /// The index of the next unit of work, or `None` when the run is over.
    pub fn claim(&self) -> Option<u64> {
        if self.done.is_cancelled() {
            return None;
        }
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        match self.total {
            Some(total) if n >= total => {
                self.done.cancel();
                None
            }
            _ => Some(n),
        }
    }

    /// Completes when no more work may start.
    pub async fn done(&self) {
        self.done.cancelled().await
    }

    pub fn is_done(&self) -> bool {
        self.done.is_cancelled()
    }

    /// No more work may start.
    pub fn end(&self) {
        self.done.cancel();
    }

    pub fn interrupted(&self) -> bool {
        self.interrupted.load(Ordering::Relaxed)
    }

    /// Ends the run after `length` (from now), or at Ctrl-C. A second
    /// Ctrl-C, while the calls in flight finish, exits at once.
    pub fn start_timers(self: &Arc<Self>, length: Option<Duration>) {
        if let Some(length) = length {
            let budget = self.clone();
            tokio::spawn(async move {
                tokio::select! {
                    () = tokio::time::sleep(length) => budget.end(),
                    () = budget.done() => {}
                }
            });
        }
        let budget = self.clone();
        tokio::spawn(async move {
            tokio::select! {
                result = tokio::signal::ctrl_c() => if result.is_ok() {
                    budget.interrupted.store(true, Ordering::Relaxed);
                    budget.end();
                    if tokio::signal::ctrl_c().await.is_ok() {
                        eprintln!("user-load: interrupted twice, exiting without a report");
                        std::process::exit(i32::from(EXIT_INTERRUPTED));
                    }
                },
                () = budget.done() => {}
            }
        });
    }
}

/// A unit of work and when it was due.
pub type Ticket = (u64, Instant);

/// A worker's next unit of work: from the pacer's `tickets` when the run
/// is paced (open loop), else claimed from `budget`, due now (closed loop).
/// `None`: the run is over.
pub async fn next_ticket(tickets: Option<&Tickets>, budget: &Budget) -> Option<Ticket> {
    match tickets {
        Some(tickets) => tickets.next().await,
        None => budget.claim().map(|n| (n, Instant::now())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_hands_out_its_total_then_ends() {
        let budget = Budget::new(Some(3));
        assert_eq!(
            (0..5).map(|_| budget.claim()).collect::<Vec<_>>(),
            [Some(0), Some(1), Some(2), None, None]
        );
        assert!(budget.is_done());
    }
}
