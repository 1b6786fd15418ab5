//! What bounds a run: the budget of work units, the timers that end it
//! (`--duration`, Ctrl-C), and the pacer that starts calls on a schedule in
//! open-loop runs.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use tokio_util::sync::CancellationToken;

use crate::cli::Schedule;

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
pub async fn next_ticket(
    tickets: Option<&async_channel::Receiver<Ticket>>,
    budget: &Budget,
) -> Option<Ticket> {
    match tickets {
        Some(tickets) => tickets.recv().await.ok(),
        None => budget.claim().map(|n| (n, Instant::now())),
    }
}

/// Open loop: hands out tickets at the rate `schedule` gives for each
/// moment since `start`, whatever the latency. The queue is `depth` deep;
/// when it is full (every worker busy) the pacer waits and the tickets' due
/// times fall behind: that lateness counts as latency, so a slow server
/// cannot hide its queueing.
pub fn pace(
    schedule: Schedule,
    budget: Arc<Budget>,
    depth: usize,
    start: Instant,
) -> async_channel::Receiver<Ticket> {
    let (tx, rx) = async_channel::bounded::<Ticket>(depth);
    tokio::spawn(async move {
        let start = tokio::time::Instant::from_std(start);
        let mut at = Duration::ZERO;
        loop {
            let due = start + at;
            tokio::select! {
                () = tokio::time::sleep_until(due) => {}
                () = budget.done() => break,
            }
            let Some(n) = budget.claim() else { break };
            if tx.send((n, due.into_std())).await.is_err() {
                break;
            }
            // Rates are at least 1/s (checked by the command line).
            at += Duration::from_secs_f64(1.0 / schedule.rate_at(at).max(1.0));
        }
    });
    rx
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

    #[tokio::test(start_paused = true)]
    async fn the_pacer_follows_the_schedule() {
        let budget = Budget::new(None);
        let start = tokio::time::Instant::now().into_std();
        let schedule = Schedule::Step {
            from: 10,
            to: 20,
            step: 10,
            every: Duration::from_secs(1),
        };
        let tickets = pace(schedule, budget.clone(), 1000, start);
        let mut due = Vec::new();
        while due.len() < 30 {
            let (_, at) = tickets.recv().await.unwrap();
            due.push(at.duration_since(start));
        }
        budget.end();
        // 10 calls in the first second, then 20 a second.
        assert!(due[9] < Duration::from_secs(1), "{due:?}");
        assert!(due[10] >= Duration::from_secs(1), "{due:?}");
        assert!(due[29] < Duration::from_secs(2), "{due:?}");
    }
}
