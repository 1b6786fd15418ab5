//! SyncUsers, bidirectional streaming: requests in, Acks and Changes out, the
//! two directions running independently.

use std::{
    collections::VecDeque,
    pin::Pin,
    task::{Context, Poll, ready},
};

use futures::{FutureExt, Stream, StreamExt, future::BoxFuture};
use tonic::{Status, Streaming};

use crate::{
    error::Error,
    gauges::Slot,
    proto::{self, sync_request::Op, sync_response::Event},
    store::{Changes, FeedError, Store, StoreError, StoreExt, WriteOp},
    user::{Change, NewUser},
    validate::{self, ValidationError},
};

/// Most requests of one stream applied together. Requests are validated as
/// they are read, so a batch holds at most this many valid ops (each a few
/// hundred bytes) and error messages.
const MAX_SYNC_BATCH: usize = 256;

/// The response stream of one SyncUsers call.
///
/// tonic polls it; nothing is spawned. Each poll does one of two things, in
/// turn so that neither starves the other:
/// - **ops**: read the requests that have arrived (at least one, at most
///   `MAX_SYNC_BATCH`), apply them to the store in the order they were sent,
///   in one [`StoreExt::apply_many`] call so that they can share a commit, then
///   yield their Acks in the same order. The next requests are read only
///   once every Ack of the batch is out, so a client that does not read its
///   Acks stops being read (backpressure, no queue).
/// - **changes**: yield the next change from the store's feed. The
///   subscription was made when the call started, before the response
///   headers went out, so nothing committed after that is missed. A
///   subscriber that lags too far behind ends the call with `ABORTED`.
///
/// For one client's own ops the order is fixed: an op's Ack, then its
/// Change (with any earlier changes of other calls), then the next op's Ack.
/// Changes are held back while a batch is being applied, and a change that
/// comes after an Ack not yet sent waits for it.
///
/// When the client closes its side, the stream sends the Acks still owed and
/// the Changes up to its own last committed op, then ends with OK.
pub struct SyncSession<S> {
    store: S,
    /// `None` once the client has closed its side.
    requests: Option<Streaming<proto::SyncRequest>>,
    /// Set when the request stream broke: the call ends with it once the
    /// Acks of the requests read before are out.
    broken: Option<Status>,
    /// The batch being applied; it yields each op's Ack and committed seq.
    in_flight: Option<BoxFuture<'static, Acks>>,
    /// Acks of the applied batch not sent yet, in request order.
    acks: VecDeque<(proto::Ack, Option<u64>)>,
    changes: Changes,
    /// A change taken from the feed that must wait for an Ack before it.
    held: Option<Change>,
    /// The seq of the last change this stream committed (its last Ack
    /// sent) / delivered.
    own_seq: u64,
    delivered_seq: u64,
    changes_first: bool,
    done: bool,
    /// The subscriber slot this stream counts against, given back on drop.
    slot: Slot,
}

type Item = Result<proto::SyncResponse, Status>;

/// Each op's Ack, and the seq it committed.
type Acks = Vec<(proto::Ack, Option<u64>)>;

impl<S: Store> SyncSession<S> {
    /// Subscribes to the change feed at once: call this before returning the
    /// response, so that the subscription precedes the response headers.
    /// Holds `slot` for as long as the stream is open.
    pub fn new(store: S, requests: Streaming<proto::SyncRequest>, slot: Slot) -> Self {
        let changes = store.subscribe().into_stream();
        SyncSession {
            store,
            requests: Some(requests),
            broken: None,
            in_flight: None,
            acks: VecDeque::new(),
            changes,
            held: None,
            own_seq: 0,
            delivered_seq: 0,
            changes_first: false,
            done: false,
            slot,
        }
    }

    fn poll_op(&mut self, cx: &mut Context<'_>) -> Poll<Item> {
        loop {
            if let Some(batch) = &mut self.in_flight {
                let acks = ready!(batch.poll_unpin(cx));
                self.in_flight = None;
                self.acks.extend(acks);
            }
            // The previous op's own Change goes out before the next Ack, and
            // before the next request is read (the change side wakes us
            // when it has been delivered).
            if self.delivered_seq < self.own_seq {
                return Poll::Pending;
            }
            if let Some((ack, seq)) = self.acks.pop_front() {
                if let Some(seq) = seq {
                    self.own_seq = seq;
                }
                return Poll::Ready(Ok(event(Event::Ack(ack))));
            }
            if let Some(status) = self.broken.take() {
                self.done = true;
                return Poll::Ready(Err(status));
            }
            let Some(requests) = &mut self.requests else {
                return Poll::Pending;
            };
            // The first request is waited for; those that have arrived with
            // it join its batch.
            let mut batch = Batch::default();
            let mut next = ready!(requests.poll_next_unpin(cx));
            loop {
                match next {
                    Some(Ok(request)) => batch.push(request),
                    // The request stream broke (reset, bad message): the
                    // requests read before it are applied and answered,
                    // then the call ends.
                    Some(Err(status)) => {
                        self.broken = Some(status);
                        self.requests = None;
                        break;
                    }
                    None => {
                        self.requests = None;
                        break;
                    }
                }
                if batch.len() == MAX_SYNC_BATCH {
                    break;
                }
                match requests.poll_next_unpin(cx) {
                    Poll::Ready(item) => next = item,
                    Poll::Pending => break,
                }
            }
            if batch.len() > 0 {
                self.in_flight = Some(Box::pin(batch.apply(self.store.clone())));
            } else if self.broken.is_none() {
                return Poll::Pending;
            }
        }
    }

    fn poll_change(&mut self, cx: &mut Context<'_>) -> Poll<Item> {
        // While a batch is being applied its Changes may already be in the
        // feed; holding changes back until their Acks are out keeps the
        // order the same for every store: Ack, then its Change.
        if self.in_flight.is_some() {
            return Poll::Pending;
        }
        let change = match self.held.take() {
            Some(change) => change,
            None => match ready!(self.changes.poll_next_unpin(cx)) {
                Some(Ok(change)) => change,
                Some(Err(FeedError::Lagged(missed))) => {
                    self.done = true;
                    self.slot.count_lagged();
                    return Poll::Ready(Err(Status::aborted(format!(
                        "change feed subscriber fell too far behind ({missed} changes not \
                         delivered); read faster or resubscribe and resync with ListUsers"
                    ))));
                }
                // This server could not read some changes before they were
                // pruned from the database's changelog (it was cut off from
                // the database for long): never skipped, the stream ends.
                Some(Err(FeedError::Missed { first, last })) => {
                    self.done = true;
                    return Poll::Ready(Err(Status::aborted(format!(
                        "changes {first} to {last} were pruned before this server could \
                         deliver them; resubscribe and resync with ListUsers"
                    ))));
                }
                // This server read a change it cannot decode (a changelog
                // row another program wrote): never skipped, the stream
                // ends, and the server reports NOT_SERVING until it is
                // fixed.
                Some(Err(FeedError::Unreadable { seq })) => {
                    self.done = true;
                    return Poll::Ready(Err(Status::data_loss(format!(
                        "change {seq} is damaged in the store and cannot be delivered; \
                         this server's change feed stops there until it is repaired"
                    ))));
                }
                // The feed only closes when the store is gone.
                Some(Err(FeedError::Closed)) | None => {
                    self.done = true;
                    return Poll::Ready(Err(Status::unavailable("change feed closed")));
                }
            },
        };
        // Past our last Ack sent, while Acks are still owed, the change may
        // be one of our own ops: it waits for the Acks (the op side sends
        // them, and this side is polled again after each).
        if change.seq > self.own_seq && !self.acks.is_empty() {
            self.held = Some(change);
            return Poll::Pending;
        }
        self.delivered_seq = change.seq;
        Poll::Ready(Ok(event(Event::Change(proto::Change::from(&change)))))
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
        if this.requests.is_none()
            && this.broken.is_none()
            && this.in_flight.is_none()
            && this.acks.is_empty()
            && this.delivered_seq >= this.own_seq
        {
            this.done = true;
            return Poll::Ready(None);
        }
        Poll::Pending
    }
}

/// Requests read together, validated, waiting to be applied.
#[derive(Default)]
struct Batch {
    /// Each request's id, and its op or why it was refused.
    requests: Vec<(u64, Result<(), Error>)>,
    /// The valid ops, in request order.
    ops: Vec<WriteOp>,
}

impl Batch {
    fn len(&self) -> usize {
        self.requests.len()
    }

    fn push(&mut self, request: proto::SyncRequest) {
        let op = op(request.op, request.expected_version);
        let checked = op.map(|op| self.ops.push(op));
        self.requests.push((request.request_id, checked));
    }

    /// Applies the valid ops in one store call and builds every Ack, in
    /// request order. A failed op commits nothing.
    async fn apply<S: Store>(self, store: S) -> Acks {
        let mut results = store.apply_many(self.ops).await.into_iter();
        self.requests
            .into_iter()
            .map(|(request_id, checked)| {
                let result = checked.and_then(|()| {
                    results
                        .next()
                        .unwrap_or_else(|| Err(StoreError::Internal("no result for an op".into())))
                        .map_err(Error::from)
                });
                ack(request_id, result)
            })
            .collect()
    }
}

/// The store op a request asks for, validated.
fn op(op: Option<Op>, expected_version: u64) -> Result<WriteOp, Error> {
    let expected_version = (expected_version != 0).then_some(expected_version);
    match op {
        None => Err(ValidationError::new("op", "set either upsert or delete_id").into()),
        Some(Op::Upsert(user)) => {
            let user = NewUser::from(user);
            validate::new_user(&user)?;
            Ok(WriteOp::Upsert {
                user,
                expected_version,
            })
        }
        Some(Op::DeleteId(id)) => {
            validate::id("delete_id", &id)?;
            Ok(WriteOp::Delete {
                id,
                expected_version,
            })
        }
    }
}

/// A request's Ack, and the seq it committed.
fn ack(request_id: u64, result: Result<Change, Error>) -> (proto::Ack, Option<u64>) {
    match result {
        Ok(change) => {
            let ack = proto::Ack {
                request_id,
                code: tonic::Code::Ok as i32,
                message: String::new(),
                seq: change.seq,
                user: Some(proto::User::from(&change.user)),
            };
            (ack, Some(change.seq))
        }
        Err(err) => {
            let ack = proto::Ack {
                request_id,
                code: err.code() as i32,
                message: err.client_message(),
                seq: 0,
                user: None,
            };
            (ack, None)
        }
    }
}

fn event(event: Event) -> proto::SyncResponse {
    proto::SyncResponse { event: Some(event) }
}
