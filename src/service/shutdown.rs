//! Ending response streams when the server shuts down.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use futures::{FutureExt, Stream, StreamExt};
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::Status;

/// Wraps a response stream so that it ends with `UNAVAILABLE` when the server
/// starts shutting down.
///
/// tonic's graceful shutdown waits for every open call to finish; a stream
/// that never ends on its own (an idle SyncUsers, a slow ListUsers) would hold
/// the server up forever. Ending with an error status rather than a plain end
/// tells the client that the listing or feed was cut short, not complete.
pub struct EndOnShutdown<St> {
    inner: St,
    shutdown: Pin<Box<WaitForCancellationFutureOwned>>,
    done: bool,
}

impl<St> EndOnShutdown<St> {
    pub fn new(inner: St, shutdown: &CancellationToken) -> Self {
        EndOnShutdown {
            inner,
            shutdown: Box::pin(shutdown.clone().cancelled_owned()),
            done: false,
        }
    }
}

impl<St, T> Stream for EndOnShutdown<St>
where
    St: Stream<Item = Result<T, Status>> + Unpin,
{
    type Item = Result<T, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        if this.shutdown.poll_unpin(cx).is_ready() {
            this.done = true;
            return Poll::Ready(Some(Err(Status::unavailable("server is shutting down"))));
        }
        let item = this.inner.poll_next_unpin(cx);
        // A gRPC response stream ends at its first error.
        if matches!(item, Poll::Ready(None | Some(Err(_)))) {
            this.done = true;
        }
        item
    }
}
