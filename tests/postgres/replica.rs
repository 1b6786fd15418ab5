//! One replica: the `user-service` binary as a child process on a
//! PostgreSQL store (a [`ServerProcess`]), and the clients the tests talk to
//! it with.

use std::{
    process::{Command, ExitStatus},
    time::{Duration, Instant},
};

use tokio::sync::mpsc;
use tonic::{Code, Streaming, transport::Channel};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use user_service::proto::{
    self, Ack, Change, SyncRequest, SyncResponse, sync_request::Op, sync_response::Event,
};

use test_support::{Client, ServerProcess, request_stream, run_to_exit, within};

/// A running replica, killed when dropped.
pub struct Replica {
    server: ServerProcess,
}

impl Replica {
    /// Starts the binary on `url` with `args` and waits (bounded) for the
    /// address it writes once listening.
    pub async fn start(url: &str, args: &[&str]) -> Replica {
        Self::start_with_env(url, args, &[]).await
    }

    /// The same, with these environment variables set.
    pub async fn start_with_env(
        url: &str,
        args: &[&str],
        env: &[(&str, &std::path::Path)],
    ) -> Replica {
        let mut command = command(url, args);
        command.envs(env.iter().copied());
        // The wait for the address blocks: off the test's runtime.
        let server = tokio::task::spawn_blocking(move || ServerProcess::spawn(command))
            .await
            .unwrap();
        Replica { server }
    }

    /// Runs the binary on `url` until it exits by itself (bounded); its
    /// status and log.
    pub async fn run_to_exit(url: &str) -> (ExitStatus, String) {
        Self::run_to_exit_with_env(url, &[]).await
    }

    /// The same, with these environment variables set.
    pub async fn run_to_exit_with_env(
        url: &str,
        env: &[(&str, &std::path::Path)],
    ) -> (ExitStatus, String) {
        let mut command = command(url, &[]);
        command.envs(env.iter().copied());
        tokio::task::spawn_blocking(move || run_to_exit(command))
            .await
            .unwrap()
    }

    pub async fn channel(&self) -> Channel {
        self.server.channel().await
    }

    pub async fn client(&self) -> Client {
        self.server.client().await
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        self.server.log()
    }

    /// The server's health (`""`, the whole server), as a stream of changes.
    pub async fn health(&self) -> Streaming<tonic_health::pb::HealthCheckResponse> {
        HealthClient::new(self.channel().await)
            .watch(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
    }

    /// SIGKILL: no shutdown, nothing flushed or closed.
    pub fn kill(self) {
        self.server.kill();
    }

    /// SIGSTOP: the process stops where it is, connections open.
    pub fn pause(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// SIGCONT after [`Replica::pause`].
    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    fn signal(&self, signal: libc::c_int) {
        let pid = libc::pid_t::try_from(self.server.pid()).unwrap();
        // SAFETY: a signal to our own child, not yet waited for.
        assert_eq!(unsafe { libc::kill(pid, signal) }, 0);
    }
}

/// The binary on `url`, with debug logs of the store.
fn command(url: &str, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_user-service"));
    command
        .args(["--addr", "127.0.0.1:0", "--store", url])
        .args(args)
        .env("RUST_LOG", "info,user_service=debug")
        .env("NO_COLOR", "1");
    command
}

/// Waits (bounded) until the health stream reports `status`; returns how
/// long that took.
pub async fn wait_for_health(
    health: &mut Streaming<tonic_health::pb::HealthCheckResponse>,
    status: ServingStatus,
    patience: Duration,
) -> Duration {
    let started = Instant::now();
    tokio::time::timeout(patience, async {
        loop {
            let reply = health.message().await.unwrap().expect("health stream open");
            if reply.status == status as i32 {
                return started.elapsed();
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("health did not turn {status:?} within {patience:?}"))
}

/// One SyncUsers call: `tx` sends requests (drop it to close our side),
/// `rx` reads Acks and Changes.
pub struct Sync {
    pub tx: Option<mpsc::Sender<SyncRequest>>,
    rx: Streaming<SyncResponse>,
    _client: Client,
}

impl Sync {
    pub async fn open(replica: &Replica) -> Sync {
        let mut client = replica.client().await;
        let (tx, requests) = request_stream();
        let rx = client.sync_users(requests).await.unwrap().into_inner();
        Sync {
            tx: Some(tx),
            rx,
            _client: client,
        }
    }

    /// Sends an upsert of `user` expecting `expected_version` (0: none).
    pub async fn upsert(&self, request_id: u64, user: proto::User, expected_version: u64) {
        let request = SyncRequest {
            request_id,
            op: Some(Op::Upsert(user)),
            expected_version,
        };
        self.tx.as_ref().unwrap().send(request).await.unwrap();
    }

    /// The next event, or the status that ended the call.
    pub async fn next(&mut self) -> Result<Event, tonic::Status> {
        let message = within("a SyncUsers event", self.rx.message()).await?;
        Ok(message.expect("the call is open").event.expect("an event"))
    }

    /// The next Change (Acks skipped).
    pub async fn next_change(&mut self) -> Change {
        loop {
            if let Event::Change(change) = self.next().await.unwrap() {
                return change;
            }
        }
    }

    /// The next Ack, with every Change before it.
    pub async fn next_ack(&mut self) -> (Ack, Vec<Change>) {
        let mut changes = Vec::new();
        loop {
            match self.next().await.unwrap() {
                Event::Ack(ack) => return (ack, changes),
                Event::Change(change) => changes.push(change),
            }
        }
    }

    /// Reads Changes until one with `seq` at least `last`; all of them.
    pub async fn changes_through(&mut self, last: u64) -> Vec<Change> {
        let mut changes = Vec::new();
        while changes.last().is_none_or(|c: &Change| c.seq < last) {
            changes.push(self.next_change().await);
        }
        changes
    }

    /// The status the call ended with, reading past any events.
    pub async fn ended(&mut self) -> tonic::Status {
        loop {
            match self.next().await {
                Ok(_) => continue,
                Err(status) => return status,
            }
        }
    }
}

/// Asserts that `changes` are numbered `first, first + 1, ...` with no gap.
pub fn assert_gapless(changes: &[Change], first: u64) {
    for (i, change) in changes.iter().enumerate() {
        assert_eq!(change.seq, first + i as u64, "gap or reorder at {i}");
    }
}

/// The code of a failed call, for the tests that allow only some.
pub fn code_of(result: &Result<impl Sized, tonic::Status>) -> Code {
    match result {
        Ok(_) => Code::Ok,
        Err(status) => status.code(),
    }
}
