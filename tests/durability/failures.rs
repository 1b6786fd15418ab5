//! Writes that fail for want of room.

use std::{io, os::unix::process::CommandExt};

use rlimit::Resource;
use test_support::{ServerProcess, list_all, user};
use tonic::Code;
use user_service::proto;

use crate::{PROBE_ID, next_seq, next_seq_after, server_command, start};

/// How large the server may grow a file in the test below: room for the
/// log of a few dozen small commits (16 KiB pages).
const FILE_SIZE_LIMIT: u64 = 1 << 20;

/// Sets `resource`'s soft limit for process `pid` (0: this one), keeping the
/// hard limit. Only system calls (rlimit's `prlimit` wraps the libc call,
/// with the types of every libc): safe between fork and exec.
fn set_soft_limit(pid: libc::pid_t, resource: Resource, soft: u64) -> io::Result<()> {
    let (mut current, mut hard) = (0, 0);
    rlimit::prlimit(pid, resource, None, Some((&mut current, &mut hard)))?;
    rlimit::prlimit(pid, resource, Some((soft.min(hard), hard)), None)
}

/// A commit whose log write fails (here because the server's files may not
/// grow past a limit, as on a full disk) is rolled back: its callers get
/// `INTERNAL`, nothing acknowledged is lost, reads go on, and once there is
/// room again writes succeed without a restart, with the next seq.
#[tokio::test]
async fn a_failed_log_write_rolls_back_and_writes_resume_when_room_is_made() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("users.db");
    let mut command = server_command(&db);
    // SAFETY: the closure only makes system calls, as is required between
    // fork and exec.
    unsafe {
        command.pre_exec(|| {
            set_soft_limit(0, Resource::FSIZE, FILE_SIZE_LIMIT)?;
            // A write past the limit then fails with EFBIG, rather than
            // killing the process with SIGXFSZ.
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            Ok(())
        });
    }
    let server = ServerProcess::spawn(command);
    let mut client = server.client().await;

    let mut acked = Vec::new();
    let failure = loop {
        match client.add_user(user("Ann")).await {
            Ok(reply) => acked.push(reply.into_inner().user.unwrap()),
            Err(status) => break status,
        }
        assert!(acked.len() < 10_000, "no write failed under the limit");
    };
    assert_eq!(failure.code(), Code::Internal, "{failure:?}");
    assert_eq!(failure.message(), "internal storage error");
    assert!(!acked.is_empty(), "the first writes fit under the limit");
    // A failed write is not a stuck server: the next one is tried (and
    // fails the same way while the limit stands), reads go on.
    let again = client.add_user(user("Bob")).await.unwrap_err();
    assert_eq!(again.code(), Code::Internal, "{again:?}");
    let last = acked.last().unwrap().clone();
    let read = client
        .get_user(proto::GetUserRequest {
            id: last.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(read, last);
    assert_eq!(
        list_all(&mut client).await,
        acked,
        "failed writes left nothing"
    );

    // Room again: writes succeed, and the failed ones used no seq.
    let pid = libc::pid_t::try_from(server.pid()).unwrap();
    set_soft_limit(pid, Resource::FSIZE, rlimit::INFINITY).unwrap();
    let seq = next_seq(&mut client).await;
    assert_eq!(seq, acked.len() as u64 + 1);
    let added = client
        .add_user(user("Cy"))
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    acked.push(added);
    server.kill();

    // Everything acknowledged survives a restart.
    let server = start(&db);
    let mut client = server.client().await;
    let mut stored = list_all(&mut client).await;
    stored.retain(|user| user.id != PROBE_ID);
    assert_eq!(stored, acked);
    assert_eq!(next_seq_after(&mut client, 1).await, seq + 2);
}
