//! The SQLite store through the real `user-service` binary, as a child
//! process: refused files at startup (`startup`), a restart on the same
//! file and a `SIGTERM` that leaves the file complete on its own
//! (`restart`), writes that fail for want of room (`failures`), rows
//! written with the sqlite3 shell (`shell`), and a `SIGKILL` in the middle
//! of a write load (`crash`).

mod crash;
mod failures;
mod restart;
mod shell;
mod startup;

use std::{
    path::Path,
    process::{Command, ExitStatus},
};

use test_support::{Client, PATIENCE, ServerProcess, user_named};
use tonic::transport::Channel;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use user_service::proto::{self, SyncRequest, sync_request::Op, sync_response::Event};

/// The server binary on the SQLite file `db`, durable commits.
fn server_command(db: &Path) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_user-service"));
    command
        .arg("--store")
        .arg(format!("sqlite:{}", db.display()));
    command
}

/// The server binary on `db`, listening.
fn start(db: &Path) -> ServerProcess {
    ServerProcess::spawn(server_command(db))
}

/// The server binary on `db`, which must refuse it: returns its exit
/// status and log.
fn run_to_exit(db: &Path) -> (ExitStatus, String) {
    test_support::run_to_exit(server_command(db))
}

/// Waits (bounded) until the health of `service` is `status`.
async fn wait_for_health(channel: Channel, service: &str, status: ServingStatus) {
    let mut health = HealthClient::new(channel);
    let mut watch = health
        .watch(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .unwrap()
        .into_inner();
    tokio::time::timeout(PATIENCE, async {
        while let Some(reply) = watch.message().await.unwrap() {
            if reply.status == status as i32 {
                return;
            }
        }
        panic!("the health stream ended");
    })
    .await
    .unwrap_or_else(|_| panic!("{service:?} never became {status:?}"));
}

/// The id [`next_seq`] upserts.
const PROBE_ID: &str = "probe-after-restart";

/// Sends one upsert on a new id and returns its Ack's seq.
async fn next_seq(client: &mut Client) -> u64 {
    next_seq_after(client, 0).await
}

/// Upserts the probe user, expecting it at `version`, and returns the Ack's
/// seq.
async fn next_seq_after(client: &mut Client, version: u64) -> u64 {
    let request = upsert(1, user_named(PROBE_ID, "Probe"), version);
    let mut sync = client
        .sync_users(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    while let Some(response) = sync.message().await.unwrap() {
        if let Some(Event::Ack(ack)) = response.event {
            assert_eq!(ack.code, 0, "{}", ack.message);
            return ack.seq;
        }
    }
    panic!("no Ack")
}

fn upsert(request_id: u64, user: proto::User, expected_version: u64) -> SyncRequest {
    SyncRequest {
        request_id,
        op: Some(Op::Upsert(user)),
        expected_version,
    }
}
