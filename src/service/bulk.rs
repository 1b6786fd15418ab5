//! BulkAddUsers, client streaming: a stream of users in, one summary out.

use futures::{FutureExt, StreamExt, future::Either, stream::FuturesOrdered};
use tokio_util::sync::CancellationToken;
use tonic::{Status, Streaming};

use crate::{
    error::Error,
    proto,
    store::{Store, StoreError, StoreExt},
    user::{Change, NewUser},
    validate,
};

/// Most rows, valid or not, in one batch. The rows of a batch are committed
/// together (one lock hold, or one transaction), which is what makes bulk
/// import fast; the cap bounds what a batch holds in memory.
const MAX_BATCH: usize = 1024;

/// Failures listed in the reply; the rest are only counted.
const MAX_REPORTED_ERRORS: usize = 100;

/// Batches of one call committing at once. A second batch handed to the
/// store while the first commits joins the store's next commit (group
/// commit) instead of waiting for the first to be answered: PostgreSQL's
/// writer, busy 98% of a 4-stream import, then commits batches of about
/// 2,000 rows where they could be 8,192, paying its fixed cost per commit
/// (the WAL flush, the round trips, the read back) four times as often.
/// Bounds what a call holds, with the batch filling.
const MAX_IN_FLIGHT: usize = 2;

/// Imports every row of `rows`, each validated and stored on its own.
///
/// Rows are committed in batches, and read while earlier batches commit: a
/// batch starts committing as soon as none is, with every row that arrived
/// in the meantime, or as soon as it is full while fewer than
/// [`MAX_IN_FLIGHT`] are. Batches are recorded in stream order. At most
/// that many batches committing and one filling are held (each of at most
/// `MAX_BATCH` rows), so a client streaming millions of users is throttled
/// by HTTP/2 flow control rather than buffered. Rows received are committed
/// however the call ends: when the client cancels or its connection
/// closes, the stream just ends early (and the reply goes nowhere); when
/// the server shuts down, the call ends with `UNAVAILABLE` after the
/// commits.
pub async fn import<S: Store>(
    store: &S,
    mut rows: Streaming<proto::User>,
    shutdown: &CancellationToken,
) -> Result<proto::BulkAddUsersResponse, Status> {
    let mut import = Import::default();
    // The batches being committed, oldest first: each its rows' positions
    // and, once done, its results.
    let mut committing = FuturesOrdered::new();
    // How the stream ended, once it has.
    let mut end = None;
    loop {
        // Here a batch is committing, or the stream has not ended and the
        // filling batch has room: some branch is always enabled.
        tokio::select! {
            biased;
            Some((mut positions, results)) = committing.next(), if !committing.is_empty() => {
                import.record(&mut positions, results);
                import.spare.push(positions);
            }
            () = shutdown.cancelled(), if end.is_none() => {
                end = Some(Err(Status::unavailable("server is shutting down")));
            }
            next = rows.next(), if end.is_none() && !import.is_full() => {
                end = import.read(next, &mut rows);
            }
        }
        let ready = import.is_full() || end.is_some();
        if import.has_rows() && (committing.is_empty() || ready && committing.len() < MAX_IN_FLIGHT)
        {
            let mut positions = import.spare.pop().unwrap_or_default();
            let users = import.start(&mut positions);
            // A batch of invalid rows only stores nothing, and is recorded
            // in its turn all the same.
            let commit = if users.is_empty() {
                Either::Left(std::future::ready(Vec::new()))
            } else {
                Either::Right(store.create_many(users))
            };
            committing.push_back(commit.map(move |results| (positions, results)));
        }
        if committing.is_empty()
            && let Some(end) = end.take()
        {
            return end.map(|()| import.report);
        }
    }
}

/// The state of one import: the reply so far and the batch being filled.
#[derive(Default)]
struct Import {
    report: proto::BulkAddUsersResponse,
    /// Rows received so far, valid or not: the next row's stream index.
    received: u64,
    /// The valid rows of the batch.
    batch: Vec<NewUser>,
    positions: Positions,
    /// Positions of recorded batches, their buffers kept for reuse.
    spare: Vec<Positions>,
}

/// Where a batch's rows were in the stream, and its rows that failed
/// validation, so that its failures are reported in stream order.
#[derive(Default)]
struct Positions {
    /// The stream index of each valid row.
    valid: Vec<u64>,
    invalid: Vec<(u64, Error)>,
}

impl Import {
    fn is_full(&self) -> bool {
        self.batch.len() + self.positions.invalid.len() >= MAX_BATCH
    }

    fn has_rows(&self) -> bool {
        !self.batch.is_empty() || !self.positions.invalid.is_empty()
    }

    /// Adds `next`, then every row that has already arrived, until the batch
    /// is full; returns how the stream ended if it has.
    fn read(
        &mut self,
        mut next: Option<Result<proto::User, Status>>,
        rows: &mut Streaming<proto::User>,
    ) -> Option<Result<(), Status>> {
        loop {
            match next {
                Some(Ok(row)) => self.push(row),
                Some(Err(status)) => return Some(Err(status)),
                None => return Some(Ok(())),
            }
            if self.is_full() {
                return None;
            }
            next = rows.next().now_or_never()?;
        }
    }

    fn push(&mut self, row: proto::User) {
        let index = self.received;
        self.received += 1;
        let user = NewUser::from(row);
        match validate::new_user(&user) {
            Ok(()) => {
                self.batch.push(user);
                self.positions.valid.push(index);
            }
            Err(invalid) => self.positions.invalid.push((index, invalid.into())),
        }
    }

    /// Hands over the filled batch: its users to commit, its positions to
    /// `in_flight` (empty: a new or recorded batch's).
    fn start(&mut self, in_flight: &mut Positions) -> Vec<NewUser> {
        std::mem::swap(&mut self.positions, in_flight);
        // `drain` keeps the buffer's capacity for the next batch.
        self.batch.drain(..).collect()
    }

    /// Counts a committed batch and reports its failures, in stream order.
    /// Leaves `batch` empty, its buffers kept for reuse.
    fn record(&mut self, batch: &mut Positions, results: Vec<Result<Change, StoreError>>) {
        let mut failures = std::mem::take(&mut batch.invalid);
        for (index, result) in batch.valid.drain(..).zip(results) {
            match result {
                Ok(_) => self.report.added += 1,
                Err(err) => failures.push((index, err.into())),
            }
        }
        failures.sort_unstable_by_key(|(index, _)| *index);
        for (index, err) in failures.drain(..) {
            self.fail(index, err);
        }
        batch.invalid = failures;
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
