//! The writer thread's end of the write queue: a thread that parks.
//!
//! The writer is a plain OS thread that parks while it waits, woken by the
//! channel through [`Unpark`]. Its timed waits (the group-commit wait for
//! more writes) are a fraction of a commit, often a few hundred
//! microseconds: `park_timeout` keeps them that short, where a tokio timer
//! would round each up to its next millisecond tick.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll, Wake, Waker},
    thread,
    time::Instant,
};

use tokio::sync::mpsc;

use crate::store::group_commit::Command;

/// The writer thread's end of the write queue.
pub(super) struct Inbox {
    receiver: mpsc::Receiver<Command>,
    /// Unparks the thread that made the inbox.
    waker: Waker,
    /// Set (and the thread unparked) to close the queue: the commands
    /// already in it are still received, then the inbox reports the end.
    closing: Arc<AtomicBool>,
}

/// Wakes a parked thread.
struct Unpark(thread::Thread);

impl Wake for Unpark {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.0.unpark();
    }
}

impl Inbox {
    /// Made on the thread that will receive. To close it, set `closing` and
    /// unpark that thread.
    pub(super) fn new(receiver: mpsc::Receiver<Command>, closing: Arc<AtomicBool>) -> Self {
        Inbox {
            receiver,
            waker: Waker::from(Arc::new(Unpark(thread::current()))),
            closing,
        }
    }

    /// The next command, waiting as long as it takes; `None` once every
    /// sender has gone or the inbox is closed and empty.
    pub(super) fn recv(&mut self) -> Option<Command> {
        self.wait(None)
    }

    /// The next command, waiting until `deadline` at most; `None` at the
    /// deadline, or as [`Inbox::recv`].
    pub(super) fn recv_until(&mut self, deadline: Instant) -> Option<Command> {
        self.wait(Some(deadline))
    }

    fn wait(&mut self, deadline: Option<Instant>) -> Option<Command> {
        let mut cx = Context::from_waker(&self.waker);
        loop {
            if let Poll::Ready(command) = self.receiver.poll_recv(&mut cx) {
                return command;
            }
            if self.closing.load(Ordering::Acquire) {
                // Refuses new commands; those already queued are still
                // received, then `None`. Polled again at once.
                self.receiver.close();
                continue;
            }
            // A wake-up can come early or be spurious: poll again, and
            // check the deadline, either way.
            match deadline {
                None => thread::park(),
                Some(deadline) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return None;
                    }
                    thread::park_timeout(left);
                }
            }
        }
    }

    /// A command that has already arrived, without waiting.
    pub(super) fn try_recv(&mut self) -> Option<Command> {
        self.receiver.try_recv().ok()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::store::PreparedOp;

    fn delete_command() -> Command {
        let op = PreparedOp::Delete {
            id: "x".into(),
            expected_version: None,
        };
        Command::for_test(vec![op]).0
    }

    fn inbox(receiver: mpsc::Receiver<Command>) -> (Inbox, Arc<AtomicBool>) {
        let closing = Arc::new(AtomicBool::new(false));
        (Inbox::new(receiver, closing.clone()), closing)
    }

    #[test]
    fn the_inbox_wakes_for_a_command_sent_from_another_thread() {
        let (sender, receiver) = mpsc::channel(4);
        let (mut inbox, _) = inbox(receiver);
        let sending = thread::spawn(move || {
            // Long enough that the inbox is most likely parked by then; the
            // command arrives whenever it is sent, either way.
            thread::sleep(Duration::from_millis(50));
            sender.blocking_send(delete_command()).unwrap();
        });
        let received = inbox.recv_until(Instant::now() + Duration::from_secs(30));
        assert!(received.is_some());
        sending.join().unwrap();
        // Every sender gone: the inbox says so instead of waiting.
        assert!(inbox.recv().is_none());
    }

    #[test]
    fn a_timed_wait_ends_at_its_deadline_not_before() {
        let (sender, receiver) = mpsc::channel(4);
        let (mut inbox, _) = inbox(receiver);
        let wait = Duration::from_micros(300);
        let started = Instant::now();
        assert!(inbox.recv_until(started + wait).is_none());
        assert!(started.elapsed() >= wait);
        assert!(inbox.try_recv().is_none());
        // A command already there is taken without waiting at all.
        sender.try_send(delete_command()).unwrap();
        assert!(inbox.recv_until(Instant::now()).is_some());
    }

    #[test]
    fn closing_wakes_the_inbox_which_hands_over_what_is_queued_then_ends() {
        let (sender, receiver) = mpsc::channel(4);
        let (mut inbox, closing) = inbox(receiver);
        sender.try_send(delete_command()).unwrap();
        assert!(inbox.recv().is_some());
        let me = thread::current();
        let closer = thread::spawn(move || {
            sender.blocking_send(delete_command()).unwrap();
            closing.store(true, Ordering::Release);
            me.unpark();
            // Still a sender, but the queue refuses it now.
            sender
        });
        // The command sent before closing, then the end (the closer may not
        // have closed yet: the inbox waits for it), with a sender alive.
        assert!(inbox.recv().is_some());
        assert!(inbox.recv().is_none());
        let sender = closer.join().unwrap();
        assert!(sender.try_send(delete_command()).is_err());
    }
}
