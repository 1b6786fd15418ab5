//! The SQLite store through the real `user-service` binary, as a child
//! process: refused files at startup, a `SIGKILL` in the middle of a write
//! load followed by a restart on the same file, writes that fail for want of
//! room, a `SIGTERM` that leaves the file complete on its own, and a writer
//! that dies.

use std::{
    collections::HashMap,
    io,
    os::unix::process::CommandExt,
    path::Path,
    process::{Command, ExitStatus},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use parking_lot::Mutex;
use rlimit::Resource;
use test_support::{Client, PATIENCE, ServerProcess, list_all};
use tokio::sync::{Notify, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, transport::Channel};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use user_service::{
    proto::{
        self, SyncRequest, sync_request::Op, sync_response::Event,
        user_service_client::UserServiceClient, user_service_server::SERVICE_NAME,
    },
    store::sqlite::{APPLICATION_ID, SCHEMA_VERSION},
};

/// The exit code for a refused store file (see `src/main.rs`).
const EXIT_STORE_REFUSED: i32 = 65;

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

fn assert_refused(db: &Path, why: &str) {
    let before = std::fs::read(db).unwrap();
    let (status, log) = run_to_exit(db);
    assert_eq!(status.code(), Some(EXIT_STORE_REFUSED), "{log}");
    assert!(log.contains(why), "the log should say {why:?}:\n{log}");
    assert!(log.contains("left untouched"), "{log}");
    assert!(!log.contains("listening"), "{log}");
    assert_eq!(std::fs::read(db).unwrap(), before, "the file changed");
}

#[test]
fn refuses_a_corrupted_foreign_or_newer_file_at_startup() {
    let dir = tempfile::tempdir().unwrap();

    let garbage = dir.path().join("garbage.db");
    std::fs::write(&garbage, "id,first_name\n1,Ann\n".repeat(100)).unwrap();
    assert_refused(&garbage, "not a SQLite database");

    let foreign = dir.path().join("foreign.db");
    let conn = rusqlite::Connection::open(&foreign).unwrap();
    conn.execute_batch("CREATE TABLE notes (body TEXT); INSERT INTO notes VALUES ('hi');")
        .unwrap();
    drop(conn);
    assert_refused(&foreign, "not a user-service store");

    // A store written by a newer build: same application id, higher version.
    let newer = dir.path().join("newer.db");
    let conn = rusqlite::Connection::open(&newer).unwrap();
    conn.execute_batch(&format!(
        "PRAGMA application_id = {};
         CREATE TABLE schema_version (version INTEGER NOT NULL);
         INSERT INTO schema_version VALUES ({});",
        APPLICATION_ID,
        SCHEMA_VERSION + 1
    ))
    .unwrap();
    drop(conn);
    assert_refused(&newer, "is newer than this build supports");
}

#[tokio::test]
async fn a_restart_keeps_what_was_written() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("users.db");
    let server = start(&db);
    // The log names the store and its durability.
    let log = server.log();
    let listening = log
        .lines()
        .find(|line| line.contains("user-service listening"))
        .unwrap_or_else(|| panic!("no listening line: {log}"));
    assert!(
        listening.contains(&format!("store=sqlite:{}", db.display()))
            && listening.contains("durability=full"),
        "{listening}"
    );
    let mut client = server.client().await;
    let added = client
        .add_user(user("", "Ann"))
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    let (tx, requests) = mpsc::channel(16);
    let mut sync = client
        .sync_users(ReceiverStream::new(requests))
        .await
        .unwrap()
        .into_inner();
    for (request_id, expected_version) in [(1, 0), (2, 1)] {
        tx.send(upsert(request_id, user("b", "Bob"), expected_version))
            .await
            .unwrap();
    }
    drop(tx);
    let mut last_seq = 0;
    while let Some(response) = sync.message().await.unwrap() {
        if let Some(Event::Ack(ack)) = response.event {
            assert_eq!(ack.code, 0, "{}", ack.message);
            last_seq = ack.seq;
        }
    }
    assert_eq!(last_seq, 3);
    server.kill();

    let server = start(&db);
    let mut client = server.client().await;
    let ann = client
        .get_user(proto::GetUserRequest {
            id: added.id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ann, added);
    let bob = client
        .get_user(proto::GetUserRequest { id: "b".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(bob.version, 2);
    assert_eq!(next_seq(&mut client).await, 4);
}

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
        match client.add_user(user("", "Ann")).await {
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
    let again = client.add_user(user("", "Bob")).await.unwrap_err();
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
        .add_user(user("", "Cy"))
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

/// A clean shutdown closes the store: the write-ahead log is checkpointed
/// into the file and removed, so that a copy of the file alone, as a backup
/// made after the server stopped would be, holds every user.
#[tokio::test]
async fn sigterm_leaves_every_user_in_the_database_file_alone() {
    /// Enough for a log of several MiB, which takes a while to checkpoint.
    const USERS: u64 = 50_000;
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("users.db");
    let wal = dir.path().join("users.db-wal");
    let server = start(&db);
    let mut client = server.client().await;
    let rows = (0..USERS).map(|i| user("", &format!("bulk {i}")));
    let report = client
        .bulk_add_users(tokio_stream::iter(rows))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(report.added, USERS);
    client.add_user(user("", "Ann")).await.unwrap();
    assert!(
        wal.exists(),
        "the log holds the writes while the server runs"
    );
    drop(client);

    // On a blocking thread: this runtime goes on serving the client's side
    // of the connection, which closes when the server says it is stopping.
    let (status, log) = server.stop().await;
    assert!(status.success(), "{status:?}: {log}");
    assert!(!wal.exists(), "the log was checkpointed and removed");
    assert!(!dir.path().join("users.db-shm").exists());
    let backup = tempfile::tempdir().unwrap();
    let copy = backup.path().join("users.db");
    std::fs::copy(&db, &copy).unwrap();
    let conn = rusqlite::Connection::open(&copy).unwrap();
    let users: i64 = conn
        .query_row("SELECT count(*) FROM users", [], |row| row.get(0))
        .unwrap();
    assert_eq!(users, USERS as i64 + 1);
    let seq: i64 = conn
        .query_row("SELECT seq FROM change_seq", [], |row| row.get(0))
        .unwrap();
    assert_eq!(seq, USERS as i64 + 1);
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

/// A writer thread that dies (here it panics on a row written by another
/// program, with fields longer than a user can hold) makes the server say
/// so: health turns NOT_SERVING, and every write fails with INTERNAL at once
/// instead of hanging, while reads go on.
#[tokio::test]
async fn a_writer_that_dies_turns_health_to_not_serving() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("users.db");
    let server = start(&db);
    let channel = server.channel().await;
    let mut client = UserServiceClient::new(channel.clone());
    let ann = client
        .add_user(user("a", "Ann"))
        .await
        .unwrap()
        .into_inner()
        .user
        .unwrap();
    wait_for_health(channel.clone(), SERVICE_NAME, ServingStatus::Serving).await;
    rusqlite::Connection::open(&db)
        .unwrap()
        .execute(
            "INSERT INTO users VALUES ('huge', ?1, '', '', 0, 1)",
            ["x".repeat(70_000)],
        )
        .unwrap();

    // Deleting the row makes the writer read it, and die.
    let delete = SyncRequest {
        request_id: 1,
        op: Some(Op::DeleteId("huge".into())),
        expected_version: 0,
    };
    let mut sync = client
        .sync_users(tokio_stream::iter([delete]))
        .await
        .unwrap()
        .into_inner();
    let ack = loop {
        match sync.message().await.unwrap().and_then(|r| r.event) {
            Some(Event::Ack(ack)) => break ack,
            Some(_) => {}
            None => panic!("no Ack"),
        }
    };
    assert_eq!(ack.code, Code::Internal as i32, "{ack:?}");
    assert_eq!(ack.message, "internal storage error");

    wait_for_health(channel.clone(), SERVICE_NAME, ServingStatus::NotServing).await;
    wait_for_health(channel, "", ServingStatus::NotServing).await;
    let failed = client.add_user(user("", "Bob")).await.unwrap_err();
    assert_eq!(failed.code(), Code::Internal, "{failed:?}");
    assert_eq!(failed.message(), "internal storage error");
    let read = client
        .get_user(proto::GetUserRequest { id: "a".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(read, ann);
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
    let request = upsert(1, user(PROBE_ID, "Probe"), version);
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

fn user(id: &str, first_name: &str) -> proto::User {
    proto::User {
        id: id.into(),
        first_name: first_name.into(),
        last_name: "Doe".into(),
        address: "1 Long Street".into(),
        verified: false,
        version: 0,
    }
}

fn upsert(request_id: u64, user: proto::User, expected_version: u64) -> SyncRequest {
    SyncRequest {
        request_id,
        op: Some(Op::Upsert(user)),
        expected_version,
    }
}

/// Rows per BulkAddUsers call in the crash test.
const BULK_ROWS: usize = 1000;
/// Ids each SyncUsers stream keeps upserting.
const SYNC_IDS: u64 = 16;

/// What the client saw acknowledged before the kill, and a signal for each
/// new acknowledgement.
#[derive(Default)]
struct Progress {
    acked: Mutex<Acked>,
    changed: Notify,
}

#[derive(Default)]
struct Acked {
    /// Bulk calls that returned their report: every row is stored.
    bulk_calls: Vec<Vec<String>>,
    /// The highest acknowledged version per SyncUsers id.
    versions: HashMap<String, u64>,
    /// The highest seq in any Ack.
    max_seq: u64,
    /// OK Acks seen.
    sync_acks: u64,
}

fn bulk_id(importer: usize, call: usize, row: usize) -> String {
    format!("b{importer}-{call}-{row}")
}

/// Bulk imports: calls of `BULK_ROWS` rows, one after the other.
async fn import_until_killed(mut client: Client, importer: usize, progress: Arc<Progress>) {
    for call in 0.. {
        let ids: Vec<String> = (0..BULK_ROWS)
            .map(|row| bulk_id(importer, call, row))
            .collect();
        let rows: Vec<proto::User> = ids
            .iter()
            .map(|id| user(id, &format!("bulk {id}")))
            .collect();
        match client.bulk_add_users(tokio_stream::iter(rows)).await {
            Ok(report) => {
                let report = report.into_inner();
                assert_eq!(report.failed, 0, "{:?}", report.errors.first());
                progress.acked.lock().bulk_calls.push(ids);
                progress.changed.notify_waiters();
            }
            Err(_) => return, // the server is gone
        }
    }
}

/// Upserts on one SyncUsers stream, pipelined: request n on an id expects
/// version n and writes `"{id} v{n + 1}"`, so a stored user's name says which
/// upsert wrote it.
async fn sync_until_killed(
    mut client: Client,
    stream: u64,
    progress: Arc<Progress>,
    stop: Arc<AtomicBool>,
) {
    let (tx, requests) = mpsc::channel::<SyncRequest>(256);
    let Ok(response) = client.sync_users(ReceiverStream::new(requests)).await else {
        return;
    };
    let mut responses = response.into_inner();
    let sender = tokio::spawn(async move {
        let mut sent = vec![0u64; SYNC_IDS as usize];
        let mut request_id = 0;
        while !stop.load(Ordering::Relaxed) {
            let k = (request_id % SYNC_IDS) as usize;
            let id = format!("s{stream}-{k}");
            let n = sent[k];
            let name = format!("{id} v{}", n + 1);
            if tx
                .send(upsert(request_id, user(&id, &name), n))
                .await
                .is_err()
            {
                return;
            }
            sent[k] += 1;
            request_id += 1;
        }
    });
    while let Ok(Some(response)) = responses.message().await {
        if let Some(Event::Ack(ack)) = response.event {
            assert_eq!(ack.code, 0, "{}", ack.message);
            let user = ack.user.expect("an OK Ack carries the user");
            {
                let mut acked = progress.acked.lock();
                acked.max_seq = acked.max_seq.max(ack.seq);
                acked.sync_acks += 1;
                let version = acked.versions.entry(user.id).or_default();
                *version = (*version).max(user.version);
            }
            progress.changed.notify_waiters();
        }
    }
    sender.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_load_loses_no_acknowledged_write() {
    /// When to kill: enough acknowledged writes of both kinds.
    const KILL_AFTER_SYNC_ACKS: u64 = 400;
    const KILL_AFTER_BULK_CALLS: usize = 3;
    const IMPORTERS: usize = 2;
    const SYNC_STREAMS: u64 = 4;

    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("users.db");
    let server = start(&db);
    let progress = Arc::new(Progress::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut load = Vec::new();
    for importer in 0..IMPORTERS {
        let client = server.client().await;
        load.push(tokio::spawn(import_until_killed(
            client,
            importer,
            progress.clone(),
        )));
    }
    for stream in 0..SYNC_STREAMS {
        let client = server.client().await;
        load.push(tokio::spawn(sync_until_killed(
            client,
            stream,
            progress.clone(),
            stop.clone(),
        )));
    }

    // Wait (bounded) for enough acknowledged writes, then kill mid-load.
    tokio::time::timeout(PATIENCE, async {
        loop {
            let changed = progress.changed.notified();
            {
                let acked = progress.acked.lock();
                if acked.sync_acks >= KILL_AFTER_SYNC_ACKS
                    && acked.bulk_calls.len() >= KILL_AFTER_BULK_CALLS
                {
                    break;
                }
            }
            changed.await;
        }
    })
    .await
    .expect("the load made progress");
    server.kill();
    stop.store(true, Ordering::Relaxed);
    for task in load {
        tokio::time::timeout(PATIENCE, task)
            .await
            .expect("the load stopped after the kill")
            .expect("no load task panicked");
    }
    let acked = std::mem::take(&mut *progress.acked.lock());

    // Restart on the same file.
    let server = start(&db);
    let mut client = server.client().await;
    let mut listing = client
        .list_users(proto::ListUsersRequest::default())
        .await
        .unwrap()
        .into_inner();
    let mut stored = HashMap::new();
    while let Some(user) = listing.message().await.unwrap() {
        stored.insert(user.id.clone(), user);
    }

    // Every acknowledged write is there.
    for ids in &acked.bulk_calls {
        for id in ids {
            assert!(stored.contains_key(id), "acknowledged bulk row {id} lost");
        }
    }
    for (id, version) in &acked.versions {
        let user = stored
            .get(id)
            .unwrap_or_else(|| panic!("acknowledged {id} lost"));
        assert!(
            user.version >= *version,
            "{id}: version {} stored, {version} acknowledged",
            user.version
        );
    }
    // Nothing half-exists: every stored user is exactly what one write sent,
    // and its version matches the write that produced it.
    let mut committed_changes = 0;
    for (id, user) in &stored {
        if id.starts_with('b') {
            assert_eq!(user.first_name, format!("bulk {id}"));
            assert_eq!(user.version, 1);
        } else {
            assert_eq!(
                user.first_name,
                format!("{id} v{}", user.version),
                "{user:?}"
            );
        }
        assert_eq!(
            (user.last_name.as_str(), user.address.as_str()),
            ("Doe", "1 Long Street")
        );
        // One change per bulk row, one per upsert (no deletes here).
        committed_changes += user.version;
    }
    assert!(acked.max_seq <= committed_changes);
    // The next change follows the last committed one: no gap, no reuse.
    assert_eq!(next_seq(&mut client).await, committed_changes + 1);
    eprintln!(
        "killed after {} bulk calls and {} sync acks; {} users and {committed_changes} changes \
         committed",
        acked.bulk_calls.len(),
        acked.sync_acks,
        stored.len(),
    );
}
