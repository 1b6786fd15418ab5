//! A `SIGKILL` in the middle of a write load, and a restart on the same
//! file.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use parking_lot::Mutex;
use test_support::{Client, PATIENCE, user_named};
use tokio::sync::{Notify, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use user_service::proto::{self, SyncRequest, sync_response::Event};

use crate::{next_seq, start, upsert};

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
            .map(|id| user_named(id, &format!("bulk {id}")))
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
                .send(upsert(request_id, user_named(&id, &name), n))
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
            ("Doe", "1 Long Street, Springfield")
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
