//! The open-loop pacer: a thread of its own that hands out each call's
//! ticket so that the call starts at the instant it is due.
//!
//! Latency counts from when a call was due, so a pacer that wakes late adds
//! its lateness to every figure. tokio's timer has a granularity of a
//! millisecond: a call due at `t` would start anywhere up to a millisecond
//! (and more) after it, which at low rates is most of what a fast server's
//! latency shows. So the pacer is a plain thread that sleeps (nanosleep,
//! with its timer slack cut from the default 50 µs to 1 ns) until shortly
//! before the due instant, then spins to it.
//!
//! Waking a worker that sleeps (a tokio thread parked since its last call)
//! takes tens of microseconds on its own. So the pacer hands each ticket
//! over that much early, and the worker that takes it yields (letting its
//! other tasks run) until the due instant. Both margins adapt: how early
//! the pacer wakes, to how late its sleeps end; how early it hands over, to
//! how long hand-overs take; so that spinning costs as little CPU as it can
//! (the report gives what the pacer thread used; BENCHMARKS.md what the
//! whole costs).
//!
//! Each worker then records how late its call really started (the
//! lateness, reported apart from the latency): what is left of the errors
//! above, or the wait for a worker to be free.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use crate::{
    budget::{Budget, Ticket},
    cli::Schedule,
};

/// The least time the pacer spins before a due instant: what is left after
/// a sleep that ended on time, for the ticket to be handed over exactly.
const MIN_SPIN: Duration = Duration::from_micros(20);

/// The most: nanosleep overshoots by up to about 150 µs from deep idle on
/// a virtual machine; one that overshoots by more is the machine being
/// overloaded, which spinning longer would only make worse.
const MAX_SPIN: Duration = Duration::from_micros(250);

/// The longest single sleep, so that the end of a run (its duration,
/// Ctrl-C, the total reached) is noticed within this even at 1 call/s.
const MAX_SLEEP: Duration = Duration::from_millis(50);

/// The most a ticket is handed over early: a worker yields at most this
/// long before its call. Hand-overs slower than this are a machine out of
/// CPU, which an earlier hand-over would not help.
const MAX_LEAD: Duration = Duration::from_micros(200);

/// The due times of a schedule, from the start of the run.
pub struct DueTimes {
    schedule: Schedule,
    at: Duration,
}

impl DueTimes {
    pub fn new(schedule: Schedule) -> DueTimes {
        DueTimes {
            schedule,
            at: Duration::ZERO,
        }
    }
}

impl Iterator for DueTimes {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let due = self.at;
        // Rates are at least 1/s (checked by the command line).
        self.at += Duration::from_secs_f64(1.0 / self.schedule.rate_at(due).max(1.0));
        Some(due)
    }
}

/// A ticket on its way to a worker.
struct Handed {
    n: u64,
    due: Instant,
    /// When the pacer sent it.
    sent: Instant,
}

/// What the pacer and the workers share: how long hand-overs take, and the
/// pacer thread's CPU time.
#[derive(Default)]
pub struct Shared {
    /// A little more than recent hand-overs took, in nanoseconds.
    lead_ns: AtomicU64,
    /// The pacer thread's CPU time so far, in nanoseconds.
    pub cpu_ns: AtomicU64,
}

/// The workers' end of the pacer: clone one into every worker.
#[derive(Clone)]
pub struct Tickets {
    handed: async_channel::Receiver<Handed>,
    shared: Arc<Shared>,
}

impl Tickets {
    /// The next ticket, returned at its due instant (at once if that is
    /// past); `None` when the run is over.
    pub async fn next(&self) -> Option<Ticket> {
        let handed = self.handed.recv().await.ok()?;
        let took = handed.sent.elapsed();
        let lead = &self.shared.lead_ns;
        lead.store(
            learn(
                Duration::from_nanos(lead.load(Ordering::Relaxed)),
                took,
                MAX_LEAD,
            )
            .as_nanos() as u64,
            Ordering::Relaxed,
        );
        while Instant::now() < handed.due {
            tokio::task::yield_now().await;
        }
        Some((handed.n, handed.due))
    }
}

/// Starts the pacer thread: tickets at the rate `schedule` gives for each
/// moment since `start`, whatever the latency. The queue is `depth` deep;
/// when it is full (every worker busy) the pacer waits and the tickets
/// fall behind their due times: that lateness counts as latency, so a slow
/// server cannot hide its queueing, and is reported as lateness too.
pub fn pace(
    schedule: Schedule,
    budget: Arc<Budget>,
    depth: usize,
    start: Instant,
    shared: Arc<Shared>,
) -> Tickets {
    let (tx, rx) = async_channel::bounded::<Handed>(depth);
    let tickets = Tickets {
        handed: rx,
        shared: shared.clone(),
    };
    let run = move || {
        let mut sleeper = Sleeper::new();
        for due in DueTimes::new(schedule).map(|at| start + at) {
            let lead = Duration::from_nanos(shared.lead_ns.load(Ordering::Relaxed));
            let handover = due.checked_sub(lead).unwrap_or(due);
            let on_time = sleeper.sleep_until(handover, &budget);
            shared.cpu_ns.store(thread_cpu_ns(), Ordering::Relaxed);
            if !on_time {
                break;
            }
            let Some(n) = budget.claim() else { break };
            let handed = Handed {
                n,
                due,
                sent: Instant::now(),
            };
            // An error means every worker has stopped.
            if tx.send_blocking(handed).is_err() {
                break;
            }
        }
        shared.cpu_ns.store(thread_cpu_ns(), Ordering::Relaxed);
    };
    if let Err(err) = std::thread::Builder::new()
        .name("user-load-pacer".into())
        .spawn(run)
    {
        // No pacer, no tickets: the workers find the queue closed, and the
        // report says that no call was made.
        eprintln!("user-load: cannot start the pacer thread: {err}");
    }
    tickets
}

/// An estimate that covers nearly every `observed` value: raised at once to
/// a larger one (plus [`MIN_SPIN`]), lowered by a sixteenth of the way
/// towards smaller ones (so a rare outlier is forgotten within a few dozen
/// calls), within `max`.
fn learn(estimate: Duration, observed: Duration, max: Duration) -> Duration {
    let wanted = observed + MIN_SPIN;
    if wanted > estimate {
        wanted
    } else {
        (estimate * 15 + wanted) / 16
    }
    .min(max)
}

/// The CPU time of the calling thread, in nanoseconds.
fn thread_cpu_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec, which `now` is.
    let result = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
    if result != 0 {
        return 0;
    }
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

/// Sleeps to an instant with a few microseconds' precision.
struct Sleeper {
    /// How early to wake before a due instant: a little more than recent
    /// sleeps overshot.
    spin: Duration,
}

impl Sleeper {
    fn new() -> Sleeper {
        cut_timer_slack();
        Sleeper { spin: MAX_SPIN / 4 }
    }

    /// Returns at `due` (at once if it is past), or `false` as soon as the
    /// run is over.
    fn sleep_until(&mut self, due: Instant, budget: &Budget) -> bool {
        let mut slept = false;
        loop {
            if budget.is_done() {
                return false;
            }
            let now = Instant::now();
            let wake = due.checked_sub(self.spin).unwrap_or(due);
            if now >= wake {
                if !slept {
                    // No time to sleep: the spin may be longer than the
                    // calls are apart; let it shrink as if on time.
                    self.learn(Duration::ZERO);
                }
                break;
            }
            slept = true;
            let nap = (wake - now).min(MAX_SLEEP);
            std::thread::sleep(nap);
            if nap < MAX_SLEEP {
                self.learn(Instant::now().saturating_duration_since(now + nap));
            }
        }
        while Instant::now() < due {
            std::hint::spin_loop();
        }
        true
    }

    /// Adapts the spin to a sleep that overshot by `late`.
    fn learn(&mut self, late: Duration) {
        self.spin = learn(self.spin, late, MAX_SPIN);
    }
}

/// The kernel lets a sleeping thread wake up to its timer slack late (50 µs
/// by default), to batch wake-ups; the pacer wants its wake-ups on time.
fn cut_timer_slack() {
    #[cfg(target_os = "linux")]
    // SAFETY: PR_SET_TIMERSLACK takes one integer and changes only the
    // calling thread's timer slack.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn due_times_follow_the_schedule() {
        let schedule = Schedule::Step {
            from: 10,
            to: 20,
            step: 10,
            every: Duration::from_secs(1),
        };
        let due: Vec<Duration> = DueTimes::new(schedule).take(30).collect();
        // 10 calls in the first second, then 20 a second.
        assert_eq!(due[1], Duration::from_millis(100));
        assert!(due[9] < Duration::from_secs(1), "{due:?}");
        assert!(due[10] >= Duration::from_secs(1), "{due:?}");
        assert!(due[29] < Duration::from_secs(2), "{due:?}");
    }

    #[test]
    fn the_spin_covers_overshoots_and_stays_bounded() {
        let mut sleeper = Sleeper { spin: MIN_SPIN };
        sleeper.learn(Duration::from_micros(60));
        assert_eq!(sleeper.spin, Duration::from_micros(80));
        // On-time sleeps bring it down, never below the least.
        sleeper.learn(Duration::ZERO);
        assert_eq!(sleeper.spin, Duration::from_nanos(76_250));
        for _ in 0..1000 {
            sleeper.learn(Duration::ZERO);
        }
        assert_eq!(sleeper.spin, MIN_SPIN);
        sleeper.learn(Duration::from_secs(1));
        assert_eq!(sleeper.spin, MAX_SPIN);
    }

    #[tokio::test]
    async fn the_pacer_hands_out_the_total_then_closes() {
        let budget = Budget::new(Some(5));
        let start = Instant::now();
        let tickets = pace(Schedule::Const(1000), budget, 10, start, Arc::default());
        let mut got = Vec::new();
        while let Some((n, due)) = tickets.next().await {
            // Never before its due instant.
            assert!(Instant::now() >= due);
            got.push((n, due - start));
        }
        let expected: Vec<(u64, Duration)> =
            (0..5).map(|n| (n, Duration::from_millis(n))).collect();
        assert_eq!(got, expected);
    }
}
