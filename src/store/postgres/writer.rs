//! The writer task: this replica's one write connection, and group commit
//! over it.
//!
//! Its loop is the one of [`group_commit`](crate::store::group_commit):
//! gather a batch, [`apply`] it in one transaction, then answer each caller.
//! It publishes nothing itself: the tailer reads every commit back from the
//! changelog, this replica's like the others', and it is woken right after
//! each commit so that this replica's own changes need not wait for the
//! database's notification.
//!
//! When the connection is lost the batch in flight fails with
//! [`StoreError::Unavailable`] (it may or may not have committed; only an
//! acknowledgement says it did), health turns to not serving, and the task
//! reconnects with backoff. Meanwhile every write fails at once with
//! `Unavailable` instead of waiting: a caller learns within a round trip
//! that the database is away, and retries later.

use std::{sync::Arc, time::Instant};

use tokio::{
    sync::{Notify, mpsc},
    task::JoinHandle,
};
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use super::{
    Health, Part,
    apply::{Statements, apply},
    connect::{Backoff, Connector, Report, STATEMENT_TIMEOUT, is_connection_loss, store_error},
    tailer::Announce,
};
use crate::store::{
    StoreError,
    group_commit::{Batch, BatchResults, Command, GroupCommit, WriteStats},
};

/// The running writer task, as the store holds it.
#[derive(Debug)]
pub(super) struct WriterTask {
    task: JoinHandle<()>,
    closing: CancellationToken,
}

impl WriterTask {
    /// Starts the writer on `session` (connected as the store opened).
    pub(super) fn spawn(
        session: Session,
        connector: Connector,
        receiver: mpsc::Receiver<Command>,
        stats: WriteStats,
        health: Arc<Health>,
        announce: Announce,
        tailer: Arc<Notify>,
    ) -> WriterTask {
        let closing = CancellationToken::new();
        let writer = Writer {
            connector,
            receiver,
            group: GroupCommit::new(None, stats),
            health,
            announce,
            tailer,
            closing: closing.clone(),
            closed: false,
        };
        WriterTask {
            task: tokio::spawn(writer.run(session)),
            closing,
        }
    }

    /// Has the writer commit what is queued, then stop; returns once it has.
    pub(super) async fn close(self) {
        self.closing.cancel();
        if let Err(err) = self.task.await {
            tracing::error!(error = %err, "the PostgreSQL writer task failed");
        }
    }
}

/// The writer's connection and its statements.
pub(super) struct Session {
    client: Client,
    statements: Statements,
}

impl Session {
    pub(super) async fn open(
        connector: &Connector,
        announce: &Announce,
    ) -> Result<Session, tokio_postgres::Error> {
        let client = connector.connect().await?;
        // Planning the statements anew for each batch (the one that stores
        // a batch of creates takes a millisecond to plan) would cost more
        // than running them: one generic plan each, made once.
        client
            .batch_execute("SET plan_cache_mode = force_generic_plan")
            .await?;
        let statements = Statements::prepare(&client, announce).await?;
        Ok(Session { client, statements })
    }
}

struct Writer {
    connector: Connector,
    receiver: mpsc::Receiver<Command>,
    group: GroupCommit,
    health: Arc<Health>,
    announce: Announce,
    /// Wakes this replica's tailer after each commit.
    tailer: Arc<Notify>,
    closing: CancellationToken,
    /// Whether the queue has been closed (the store is closing).
    closed: bool,
}

impl Writer {
    async fn run(mut self, session: Session) {
        let mut backoff = Backoff::default();
        let mut session = Some(session);
        loop {
            let mut connected = match session.take() {
                Some(session) => session,
                None => match self.connect(&mut backoff).await {
                    Some(session) => session,
                    None => break,
                },
            };
            tracing::info!(target = %self.connector, "PostgreSQL writer connected");
            self.health.set(Part::Writer, true);
            let lost = self.serve(&mut connected).await;
            self.health.set(Part::Writer, false);
            if !lost {
                break;
            }
        }
        self.health.set(Part::Writer, false);
        tracing::debug!("PostgreSQL writer stopped");
    }

    /// The next command; once the store is closing, only those already
    /// queued, then `None`.
    async fn recv(&mut self) -> Option<Command> {
        if !self.closed {
            tokio::select! {
                biased;
                () = self.closing.cancelled() => {
                    self.receiver.close();
                    self.closed = true;
                }
                command = self.receiver.recv() => return command,
            }
        }
        self.receiver.recv().await
    }

    /// Connects (again), failing every command that arrives meanwhile;
    /// `None` once the store is closing and the queue is empty.
    async fn connect(&mut self, backoff: &mut Backoff) -> Option<Session> {
        let mut logged = false;
        loop {
            let connector = self.connector.clone();
            let announce = self.announce.clone();
            let attempt = async move { Session::open(&connector, &announce).await };
            let mut attempt = std::pin::pin!(attempt);
            let failed = loop {
                tokio::select! {
                    result = &mut attempt => match result {
                        Ok(session) => {
                            backoff.reset();
                            return Some(session);
                        }
                        Err(err) => break err,
                    },
                    command = self.recv() => self.refuse(command?),
                }
            };
            if !logged {
                tracing::warn!(
                    target = %self.connector,
                    error = %Report(&failed),
                    "PostgreSQL writer cannot connect; writes fail with UNAVAILABLE until it can"
                );
                logged = true;
            }
            if self.closed {
                // Nothing to wait for: fail what is left and stop.
                while let Some(command) = self.receiver.recv().await {
                    self.refuse(command);
                }
                return None;
            }
            let retry = tokio::time::sleep(backoff.next_wait());
            let mut retry = std::pin::pin!(retry);
            loop {
                tokio::select! {
                    () = &mut retry => break,
                    command = self.recv() => self.refuse(command?),
                }
            }
        }
    }

    /// Fails `command` at once: the database is out of reach.
    fn refuse(&mut self, command: Command) {
        let batch = self.group.start(command, || None);
        self.group.finish(
            batch,
            std::time::Duration::ZERO,
            Err(StoreError::Unavailable(
                "the PostgreSQL writer is not connected".into(),
            )),
        );
    }

    /// Commits batches until the queue ends (`false`) or the connection is
    /// lost (`true`).
    async fn serve(&mut self, session: &mut Session) -> bool {
        while let Some(first) = self.recv().await {
            let receiver = &mut self.receiver;
            let mut batch = self.group.start(first, || receiver.try_recv().ok());
            while let Some(deadline) = batch.wait_until() {
                let next = tokio::time::timeout_at(deadline.into(), self.recv()).await;
                let Ok(Some(command)) = next else { break };
                let receiver = &mut self.receiver;
                batch.add(command, || receiver.try_recv().ok());
            }
            // A connection the server ended while the writer was idle (an
            // administrator's pg_terminate_backend, a failover) is replaced
            // before the batch is tried on it, rather than failing it.
            if session.client.is_closed() {
                match Session::open(&self.connector, &self.announce).await {
                    Ok(fresh) => *session = fresh,
                    Err(err) => {
                        tracing::warn!(error = %Report(&err), "PostgreSQL writer cannot reconnect");
                        self.group.finish(
                            batch,
                            std::time::Duration::ZERO,
                            Err(StoreError::Unavailable(format!(
                                "PostgreSQL writer cannot reconnect: {}",
                                Report(&err)
                            ))),
                        );
                        return true;
                    }
                }
            }
            let started = Instant::now();
            let (outcome, lost) = self.commit(session, &batch).await;
            self.group.finish(batch, started.elapsed(), outcome);
            self.tailer.notify_one();
            if lost {
                return true;
            }
        }
        false
    }

    /// Applies and commits `batch`: one result per op or the error every op
    /// gets, and whether the connection was lost. Logs a failure, once for
    /// the batch.
    async fn commit(
        &self,
        session: &mut Session,
        batch: &Batch,
    ) -> (Result<BatchResults, StoreError>, bool) {
        let applied = tokio::time::timeout(
            STATEMENT_TIMEOUT,
            apply(
                &mut session.client,
                &session.statements,
                &self.announce,
                batch,
            ),
        )
        .await;
        match applied {
            Ok(Ok(results)) => (Ok(results), false),
            Ok(Err(err)) if is_connection_loss(&err) => {
                tracing::warn!(
                    error = %Report(&err),
                    ops = batch.len(),
                    "PostgreSQL connection lost during a write; reconnecting"
                );
                (Err(store_error("PostgreSQL write", &err)), true)
            }
            Ok(Err(err)) => {
                tracing::error!(error = %Report(&err), ops = batch.len(), "PostgreSQL write failed; batch rolled back");
                (Err(store_error("PostgreSQL write", &err)), false)
            }
            Err(_) => {
                tracing::warn!(
                    ops = batch.len(),
                    timeout = ?STATEMENT_TIMEOUT,
                    "PostgreSQL write timed out; reconnecting"
                );
                (
                    Err(StoreError::Unavailable("PostgreSQL write timed out".into())),
                    true,
                )
            }
        }
    }
}
