//! The change feed: fan-out of committed changes to every SyncUsers stream.
//!
//! Built on `tokio::sync::broadcast`: one ring buffer of `capacity` changes
//! shared by all subscribers. Publishing never waits, so a store can publish
//! inside its commit critical section, which is what keeps the feed in commit
//! order. Each subscriber reads at its own pace; one that falls more than
//! `capacity` changes behind is told it lagged (and the service ends its
//! stream with `ABORTED`) instead of slowing the writers or growing a buffer:
//! a change is never skipped silently.

use tokio::sync::broadcast;

use crate::user::Change;

/// The publishing side, owned by a store.
#[derive(Debug, Clone)]
pub struct ChangeFeed {
    sender: broadcast::Sender<Change>,
}

/// One subscriber's view of the feed: every change published after it was
/// created, in order.
pub type Subscription = broadcast::Receiver<Change>;

impl ChangeFeed {
    /// `capacity` is how far (in changes) a subscriber may fall behind before
    /// it is cut off.
    pub fn new(capacity: usize) -> Self {
        let (sender, _) = broadcast::channel(capacity);
        ChangeFeed { sender }
    }

    /// Publishes a committed change. Never blocks; with no subscriber the
    /// change is simply dropped.
    pub fn publish(&self, change: Change) {
        // An error only means there is no subscriber right now.
        let _ = self.sender.send(change);
    }

    pub fn subscribe(&self) -> Subscription {
        self.sender.subscribe()
    }
}
