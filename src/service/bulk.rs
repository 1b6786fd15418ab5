//! BulkAddUsers, client streaming: a stream of users in, one summary out.

use futures::{FutureExt, StreamExt};
use tokio_util::sync::CancellationToken;
use tonic::{Status, Streaming};

use crate::{error::Error, proto, store::Store, user::NewUser, validate};

/// Most rows committed in one store call. Rows that have already arrived are
/// committed together (one lock hold, or one transaction), which is what
/// makes bulk import fast; the cap bounds what one call holds in memory.
const MAX_BATCH: usize = 1024;

/// Failures listed in the reply; the rest are only counted.
const MAX_REPORTED_ERRORS: usize = 100;

/// Imports every row of `rows`, each validated and stored on its own.
///
/// Rows are read as they arrive and never more than `MAX_BATCH` are held, so
/// a client streaming millions of users is throttled by HTTP/2 flow control
/// rather than buffered. If the stream breaks (the client aborts) or the
/// server shuts down, the rows already received are still committed, and
/// stay stored, before the call ends with an error.
pub async fn import<S: Store>(
    store: &S,
    mut rows: Streaming<proto::User>,
    shutdown: &CancellationToken,
) -> Result<proto::BulkAddUsersResponse, Status> {
    let mut import = Import::default();
    loop {
        // Wait for the next row...
        let mut next = tokio::select! {
            biased;
            () = shutdown.cancelled() => Some(Err(Status::unavailable("server is shutting down"))),
            next = rows.next() => next,
        };
        // ...then take the rows that have already arrived, without waiting.
        let end = loop {
            match next {
                Some(Ok(row)) => import.push(row),
                Some(Err(status)) => break Some(Err(status)),
                None => break Some(Ok(())),
            }
            if import.batch.len() == MAX_BATCH {
                break None;
            }
            match rows.next().now_or_never() {
                Some(item) => next = item,
                None => break None,
            }
        };
        import.commit(store).await;
        if let Some(end) = end {
            return end.map(|()| import.report);
        }
    }
}

/// The state of one import: the reply so far and the rows waiting to commit.
#[derive(Default)]
struct Import {
    report: proto::BulkAddUsersResponse,
    /// Rows received so far, valid or not: the next row's stream index.
    received: u64,
    batch: Vec<NewUser>,
    /// The stream index of each row in `batch`.
    batch_index: Vec<u64>,
    /// Rows of this batch that failed validation, reported with the batch so
    /// that errors are listed in stream order.
    batch_invalid: Vec<(u64, Error)>,
}

impl Import {
    fn push(&mut self, row: proto::User) {
        let index = self.received;
        self.received += 1;
        let user = NewUser::from(row);
        match validate::new_user(&user) {
            Ok(()) => {
                self.batch.push(user);
                self.batch_index.push(index);
            }
            Err(invalid) => self.batch_invalid.push((index, invalid.into())),
        }
    }

    async fn commit<S: Store>(&mut self, store: &S) {
        let mut failures = std::mem::take(&mut self.batch_invalid);
        if !self.batch.is_empty() {
            // `drain` keeps the buffers' capacity for the next batch.
            let results = store.create_many(self.batch.drain(..).collect()).await;
            for (index, result) in self.batch_index.drain(..).zip(results) {
                match result {
                    Ok(_) => self.report.added += 1,
                    Err(err) => failures.push((index, err.into())),
                }
            }
        }
        failures.sort_unstable_by_key(|(index, _)| *index);
        for (index, err) in failures.drain(..) {
            self.fail(index, err);
        }
        self.batch_invalid = failures;
    }

    fn fail(&mut self, index: u64, err: Error) {
        self.report.failed += 1;
        if self.report.errors.len() < MAX_REPORTED_ERRORS {
            self.report.errors.push(proto::BulkError {
                index,
                code: err.code() as i32,
                message: err.client_message(),
            });
        }
    }
}
