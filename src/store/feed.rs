//! The change feed: fan-out of committed changes to every SyncUsers stream.
//!
//! Built on `tokio::sync::broadcast`: one ring buffer of `capacity` events
//! shared by all subscribers. Publishing never waits, so a store can publish
//! inside its commit critical section, which is what keeps the feed in commit
//! order. Each subscriber reads at its own pace; one that falls more than
//! `capacity` changes behind is told it lagged (and the service ends its
//! stream with `ABORTED`) instead of slowing the writers or growing a buffer:
//! a change is never skipped silently.
//!
//! A store whose feed is fed from elsewhere (PostgreSQL's tailer reads the
//! changes every replica commits back from the database) can find that
//! changes it should publish are gone (pruned from the changelog before it
//! read them). It then publishes a gap ([`ChangeFeed::publish_gap`]): every
//! subscriber reaches it in order, after the changes before it, and is
//! ended the way a lagging one is; a subscriber made after it never sees it.
//! Likewise for a change it read but cannot decode (a changelog row another
//! program wrote): [`ChangeFeed::publish_unreadable`] ends every subscriber
//! there, rather than skip it.

use std::{
    pin::Pin,
    task::{Context, Poll, ready},
};

use futures::Stream;
use tokio::sync::broadcast;
use tokio_stream::wrappers::{BroadcastStream, errors::BroadcastStreamRecvError};

use crate::user::Change;

/// What the ring carries: a change, or the news that some were lost.
#[derive(Debug, Clone)]
enum Event {
    Change(Change),
    /// Changes `first..=last` (by seq) could not be read and were not
    /// published.
    Gap {
        first: u64,
        last: u64,
    },
    /// Change `seq` was read but cannot be decoded; nothing after it is
    /// published until it can be.
    Unreadable {
        seq: u64,
    },
}

/// Why a subscription delivers no more changes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FeedError {
    /// The subscriber fell more than the feed's capacity behind; this many
    /// changes were dropped for it.
    #[error("fell {0} changes behind the change feed")]
    Lagged(u64),
    /// The store could not read changes `first..=last` before they were
    /// pruned, so no subscriber got them.
    #[error("changes {first} to {last} were pruned before this server read them")]
    Missed { first: u64, last: u64 },
    /// The store read change `seq` but cannot decode it (the store has
    /// logged why), so no subscriber gets it or anything after it.
    #[error("change {seq} cannot be read from the store")]
    Unreadable { seq: u64 },
    /// The feed is gone (the store was dropped).
    #[error("the change feed closed")]
    Closed,
}

/// The publishing side, owned by a store.
#[derive(Debug, Clone)]
pub struct ChangeFeed {
    sender: broadcast::Sender<Event>,
}

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
        let _ = self.sender.send(Event::Change(change));
    }

    /// Tells every current subscriber, after the changes already published,
    /// that changes `first..=last` will never come: each is ended with
    /// [`FeedError::Missed`] when it gets there.
    pub fn publish_gap(&self, first: u64, last: u64) {
        let _ = self.sender.send(Event::Gap { first, last });
    }

    /// Tells every current subscriber, after the changes already published,
    /// that change `seq` cannot be read: each is ended with
    /// [`FeedError::Unreadable`] when it gets there.
    pub fn publish_unreadable(&self, seq: u64) {
        let _ = self.sender.send(Event::Unreadable { seq });
    }

    /// Every change published from now on.
    pub fn subscribe(&self) -> Subscription {
        Subscription {
            receiver: self.sender.subscribe(),
        }
    }
}

/// One subscriber's view of the feed: every change published after it was
/// created, in order, until an error ends it.
#[derive(Debug)]
pub struct Subscription {
    receiver: broadcast::Receiver<Event>,
}

/// Why [`Subscription::try_recv`] returned no change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TryRecvError {
    #[error("no change waiting")]
    Empty,
    #[error(transparent)]
    Ended(#[from] FeedError),
}

impl Subscription {
    /// The next change, if one is waiting.
    pub fn try_recv(&mut self) -> Result<Change, TryRecvError> {
        match self.receiver.try_recv() {
            Ok(event) => Ok(event.into_change()?),
            Err(broadcast::error::TryRecvError::Empty) => Err(TryRecvError::Empty),
            Err(broadcast::error::TryRecvError::Lagged(missed)) => {
                Err(FeedError::Lagged(missed).into())
            }
            Err(broadcast::error::TryRecvError::Closed) => Err(FeedError::Closed.into()),
        }
    }

    /// The next change, waiting for it.
    pub async fn recv(&mut self) -> Result<Change, FeedError> {
        match self.receiver.recv().await {
            Ok(event) => event.into_change(),
            Err(broadcast::error::RecvError::Lagged(missed)) => Err(FeedError::Lagged(missed)),
            Err(broadcast::error::RecvError::Closed) => Err(FeedError::Closed),
        }
    }

    /// The subscription as a stream that tonic-side code can poll.
    pub fn into_stream(self) -> Changes {
        Changes {
            inner: BroadcastStream::new(self.receiver),
        }
    }
}

impl Event {
    fn into_change(self) -> Result<Change, FeedError> {
        match self {
            Event::Change(change) => Ok(change),
            Event::Gap { first, last } => Err(FeedError::Missed { first, last }),
            Event::Unreadable { seq } => Err(FeedError::Unreadable { seq }),
        }
    }
}

/// A [`Subscription`] as a stream: each change, or the error that ends it
/// (after which it should be dropped).
pub struct Changes {
    inner: BroadcastStream<Event>,
}

impl Stream for Changes {
    type Item = Result<Change, FeedError>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Poll::Ready(Some(
            match ready!(Pin::new(&mut self.inner).poll_next(cx)) {
                Some(Ok(event)) => event.into_change(),
                Some(Err(BroadcastStreamRecvError::Lagged(missed))) => {
                    Err(FeedError::Lagged(missed))
                }
                None => Err(FeedError::Closed),
            },
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{store::tests::named, user::ChangeKind};

    fn change(seq: u64) -> Change {
        Change {
            seq,
            kind: ChangeKind::Created,
            user: crate::user::User::new("a", &named("a", "A"), 1),
        }
    }

    #[test]
    fn a_gap_ends_subscribers_after_the_changes_before_it() {
        let feed = ChangeFeed::new(16);
        let mut before = feed.subscribe();
        feed.publish(change(1));
        feed.publish_gap(2, 5);
        let mut after = feed.subscribe();
        feed.publish(change(6));
        assert_eq!(before.try_recv().unwrap().seq, 1);
        assert_eq!(
            before.try_recv(),
            Err(FeedError::Missed { first: 2, last: 5 }.into())
        );
        // A subscriber made after the gap goes on.
        assert_eq!(after.try_recv().unwrap().seq, 6);
        assert_eq!(after.try_recv(), Err(TryRecvError::Empty));
    }

    #[test]
    fn an_unreadable_change_ends_subscribers_after_the_changes_before_it() {
        let feed = ChangeFeed::new(16);
        let mut before = feed.subscribe();
        feed.publish(change(1));
        feed.publish_unreadable(2);
        assert_eq!(before.try_recv().unwrap().seq, 1);
        assert_eq!(
            before.try_recv(),
            Err(FeedError::Unreadable { seq: 2 }.into())
        );
    }

    #[tokio::test]
    async fn the_stream_reports_a_lag_and_the_end_of_the_feed() {
        use futures::StreamExt;
        let feed = ChangeFeed::new(2);
        let mut lagging = feed.subscribe().into_stream();
        for seq in 1..=4 {
            feed.publish(change(seq));
        }
        assert_eq!(lagging.next().await, Some(Err(FeedError::Lagged(2))));
        let mut closed = feed.subscribe().into_stream();
        drop(feed);
        assert_eq!(closed.next().await, Some(Err(FeedError::Closed)));
    }
}
