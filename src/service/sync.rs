//! SyncUsers, bidirectional streaming: requests in, Acks and Changes out, the
//! two directions running independently.

use std::{
    pin::Pin,
    task::{Context, Poll, ready},
};

use futures::{FutureExt, Stream, StreamExt, future::BoxFuture};
use tokio_stream::wrappers::{BroadcastStream, errors::BroadcastStreamRecvError};
use tonic::{Status, Streaming};

use crate::{
    error::Error,
    limits::Slot,
    proto::{self, sync_request::Op, sync_response::Event},
    store::Store,
    user::{Change, NewUser},
    validate::{self, ValidationError},
};

/// The response stream of one SyncUsers call.
///
/// tonic polls it; nothing is spawned. Each poll does one of two things, in
/// turn so that neither starves the other:
/// - **ops**: read the next request, apply it to the store, yield its Ack.
///   Requests are applied one at a time, in the order they were sent, and
///   the next one is read only once the previous Ack is out, so a client that
///   does not read its Acks stops being read (backpressure, no queue).
/// - **changes**: yield the next change from the store's feed. The
///   subscription was made when the call started, before the response
///   headers went out, so nothing committed after that is missed. A
///   subscriber that lags too far behind ends the call with `ABORTED`.
///
/// For one client's own ops the order is fixed: an op's Ack, then its
/// Change (with any earlier changes of other calls), then the next request
/// is read. Changes are held back only while an op is being applied.
///
/// When the client closes its side, the stream sends the Acks still owed and
/// the Changes up to its own last committed op, then ends with OK.
pub struct SyncSession<S> {
    store: S,
    /// `None` once the client has closed its side.
    requests: Option<Streaming<proto::SyncRequest>>,
    /// The op being applied: its Ack, and the seq it committed.
    in_flight: Option<BoxFuture<'static, (proto::Ack, Option<u64>)>>,
    changes: BroadcastStream<Change>,
    /// The seq of the last change this stream committed / delivered.
    own_seq: u64,
    delivered_seq: u64,
    changes_first: bool,
    done: bool,
    /// The subscriber slot this stream counts against, given back on drop.
    _slot: Option<Slot>,
}

type Item = Result<proto::SyncResponse, Status>;

impl<S: Store> SyncSession<S> {
    /// Subscribes to the change feed at once: call this before returning the
    /// response, so that the subscription precedes the response headers.
    pub fn new(store: S, requests: Streaming<proto::SyncRequest>) -> Self {
        let changes = BroadcastStream::new(store.subscribe());
        SyncSession {
            store,
            requests: Some(requests),
            in_flight: None,
            changes,
            own_seq: 0,
            delivered_seq: 0,
            changes_first: false,
            done: false,
            _slot: None,
        }
    }

    /// Holds `slot` for as long as the stream is open.
    pub fn holding(mut self, slot: Option<Slot>) -> Self {
        self._slot = slot;
        self
    }

    fn poll_op(&mut self, cx: &mut Context<'_>) -> Poll<Item> {
        loop {
            if let Some(op) = &mut self.in_flight {
                let (ack, seq) = ready!(op.poll_unpin(cx));
                self.in_flight = None;
                if let Some(seq) = seq {
                    self.own_seq = seq;
                }
                return Poll::Ready(Ok(event(Event::Ack(ack))));
            }
            // The previous op's own Change goes out before the next request
            // is read (the change side wakes us when it has been delivered).
            if self.delivered_seq < self.own_seq {
                return Poll::Pending;
            }
            let Some(requests) = &mut self.requests else {
                return Poll::Pending;
            };
            match ready!(requests.poll_next_unpin(cx)) {
                Some(Ok(request)) => {
                    self.in_flight = Some(Box::pin(apply(self.store.clone(), request)));
                }
                // The request stream broke (reset, bad message): the call ends.
                Some(Err(status)) => {
                    self.done = true;
                    return Poll::Ready(Err(status));
                }
                None => {
                    self.requests = None;
                    return Poll::Pending;
                }
            }
        }
    }

    fn poll_change(&mut self, cx: &mut Context<'_>) -> Poll<Item> {
        // While an op is being applied its Change may already be in the
        // feed; holding changes back until its Ack is out keeps the order
        // the same for every store: Ack, then its Change.
        if self.in_flight.is_some() {
            return Poll::Pending;
        }
        match ready!(self.changes.poll_next_unpin(cx)) {
            Some(Ok(change)) => {
                self.delivered_seq = change.seq;
                Poll::Ready(Ok(event(Event::Change(proto::Change::from(&change)))))
            }
            Some(Err(BroadcastStreamRecvError::Lagged(missed))) => {
                self.done = true;
                Poll::Ready(Err(Status::aborted(format!(
                    "change feed subscriber fell too far behind ({missed} changes not delivered); \
                     read faster or resubscribe and resync with ListUsers"
                ))))
            }
            // The feed only closes when the store is gone.
            None => {
                self.done = true;
                Poll::Ready(Err(Status::unavailable("change feed closed")))
            }
        }
    }
}

impl<S: Store> Stream for SyncSession<S> {
    type Item = Item;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Item>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        for turn in [this.changes_first, !this.changes_first] {
            let polled = if turn {
                this.poll_change(cx)
            } else {
                this.poll_op(cx)
            };
            if let Poll::Ready(item) = polled {
                // The other side goes first next time.
                this.changes_first = !turn;
                return Poll::Ready(Some(item));
            }
        }
        // Both sides are pending. Once the client has closed its side and
        // every Ack is out, finish as soon as our own changes are delivered.
        if this.requests.is_none() && this.in_flight.is_none() && this.delivered_seq >= this.own_seq
        {
            this.done = true;
            return Poll::Ready(None);
        }
        Poll::Pending
    }
}

fn event(event: Event) -> proto::SyncResponse {
    proto::SyncResponse { event: Some(event) }
}

/// Applies one request and builds its Ack. A failed op commits nothing.
async fn apply<S: Store>(store: S, request: proto::SyncRequest) -> (proto::Ack, Option<u64>) {
    let expected = (request.expected_version != 0).then_some(request.expected_version);
    let result: Result<Change, Error> = match request.op {
        None => Err(ValidationError::new("op", "set either upsert or delete_id").into()),
        Some(Op::Upsert(user)) => {
            let user = NewUser::from(user);
            match validate::new_user(&user) {
                Ok(()) => store.upsert(user, expected).await.map_err(Error::from),
                Err(invalid) => Err(invalid.into()),
            }
        }
        Some(Op::DeleteId(id)) => match validate::id("delete_id", &id) {
            Ok(()) => store.delete(&id, expected).await.map_err(Error::from),
            Err(invalid) => Err(invalid.into()),
        },
    };
    match result {
        Ok(change) => {
            let ack = proto::Ack {
                request_id: request.request_id,
                code: tonic::Code::Ok as i32,
                message: String::new(),
                seq: change.seq,
                user: Some(proto::User::from(&change.user)),
            };
            (ack, Some(change.seq))
        }
        Err(err) => {
            let ack = proto::Ack {
                request_id: request.request_id,
                code: err.code() as i32,
                message: err.client_message(),
                seq: 0,
                user: None,
            };
            (ack, None)
        }
    }
}
