//! A bounded soak: many clients mixing all five methods against one server
//! for `SOAK_SECS` seconds (default 30), every reply checked against a
//! model, then the invariants: exact counts, a gapless seq on every
//! SyncUsers watcher, nothing left open, flat memory.
//!
//! Ignored by a plain `cargo test`; `scripts/test.sh` runs it as a stage:
//! `SOAK_SECS=30 cargo test --test soak -- --ignored --nocapture`.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use test_support::{Client, TestServer, request_stream, rss_bytes, within};
use tonic::Code;
use user_service::proto::{
    self, BulkAddUsersResponse, GetUserRequest, ListUsersRequest, SyncRequest, sync_request::Op,
    sync_response::Event,
};

/// Clients issuing calls, each over its own connection and its own ids, so
/// that each can predict every reply.
const WORKERS: usize = 8;
/// Ids per worker: the store stays small, so memory must stay flat.
const IDS: usize = 64;
/// SyncUsers streams open for the whole run, checking the feed.
const WATCHERS: usize = 2;
/// The id of the last write, which tells watchers the run is over.
const FINAL_ID: &str = "zz-final";
/// Memory may grow this much between a third of the run and its end.
const MAX_RSS_GROWTH: u64 = 64 * 1024 * 1024;

fn soak_duration() -> Duration {
    let secs = std::env::var("SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    Duration::from_secs(secs)
}

/// What one worker knows: the version of each of its ids that exists.
struct Worker {
    index: usize,
    client: Client,
    model: BTreeMap<String, u64>,
    /// Seeded per worker: runs are reproducible.
    rng: fastrand::Rng,
    /// Changes this worker committed (each took one seq).
    commits: u64,
    calls: u64,
}

fn a_user(id: &str, first_name: &str) -> proto::User {
    proto::User {
        id: id.into(),
        ..test_support::user(first_name)
    }
}

impl Worker {
    fn id(&self, k: usize) -> String {
        format!("w{:02}-{k:03}", self.index)
    }

    fn random_id(&mut self) -> String {
        let k = self.rng.usize(..IDS);
        self.id(k)
    }

    async fn step(&mut self) {
        self.calls += 1;
        match self.rng.usize(..5) {
            0 => self.add().await,
            1 => self.get().await,
            2 => self.list().await,
            3 => self.bulk().await,
            _ => self.sync().await,
        }
    }

    async fn add(&mut self) {
        let id = self.random_id();
        let result = self.client.add_user(a_user(&id, "Add")).await;
        match self.model.contains_key(&id) {
            true => assert_eq!(result.unwrap_err().code(), Code::AlreadyExists, "{id}"),
            false => {
                let stored = result.unwrap().into_inner().user.unwrap();
                assert_eq!((stored.id.as_str(), stored.version), (id.as_str(), 1));
                self.model.insert(id, 1);
                self.commits += 1;
            }
        }
    }

    async fn get(&mut self) {
        let id = self.random_id();
        let result = self
            .client
            .get_user(GetUserRequest { id: id.clone() })
            .await;
        match self.model.get(&id) {
            Some(&version) => assert_eq!(result.unwrap().into_inner().version, version, "{id}"),
            None => assert_eq!(result.unwrap_err().code(), Code::NotFound, "{id}"),
        }
    }

    async fn list(&mut self) {
        // This worker's ids sort together, right after its prefix.
        let prefix = format!("w{:02}-", self.index);
        let request = ListUsersRequest {
            verified: None,
            after_id: prefix.clone(),
            limit: IDS as u32,
        };
        let mut stream = self.client.list_users(request).await.unwrap().into_inner();
        let mut listed = BTreeMap::new();
        while let Some(user) = stream.message().await.unwrap() {
            if user.id.starts_with(&prefix) {
                listed.insert(user.id, user.version);
            }
        }
        assert_eq!(listed, self.model, "worker {}", self.index);
    }

    async fn bulk(&mut self) {
        let ids: Vec<String> = (0..1 + self.rng.usize(..8))
            .map(|_| self.random_id())
            .collect();
        let rows: Vec<proto::User> = ids.iter().map(|id| a_user(id, "Bulk")).collect();
        let reply: BulkAddUsersResponse = self
            .client
            .bulk_add_users(tokio_stream::iter(rows))
            .await
            .unwrap()
            .into_inner();
        let mut added = 0;
        for id in &ids {
            if !self.model.contains_key(id) {
                self.model.insert(id.clone(), 1);
                added += 1;
            }
        }
        assert_eq!(
            (reply.added, reply.failed),
            (added, ids.len() as u64 - added)
        );
        self.commits += added;
    }

    /// One SyncUsers call with a few upserts and deletes, some with a wrong
    /// expected version; each Ack must match the model.
    async fn sync(&mut self) {
        let (tx, requests) = request_stream::<SyncRequest>();
        let mut stream = self.client.sync_users(requests).await.unwrap().into_inner();
        let mut expected = Vec::new();
        for request_id in 0..1 + self.rng.usize(..4) as u64 {
            let id = self.random_id();
            let current = self.model.get(&id).copied();
            let (op, expected_version, code) = match self.rng.usize(..3) {
                0 => (Op::Upsert(a_user(&id, "Sync")), 0, Code::Ok),
                1 => {
                    // A stale expected version fails and commits nothing.
                    let stale = current.unwrap_or(0) + 1;
                    (
                        Op::Upsert(a_user(&id, "Stale")),
                        stale,
                        Code::FailedPrecondition,
                    )
                }
                _ => (
                    Op::DeleteId(id.clone()),
                    0,
                    if current.is_some() {
                        Code::Ok
                    } else {
                        Code::NotFound
                    },
                ),
            };
            if code == Code::Ok {
                match op {
                    Op::Upsert(_) => {
                        self.model.insert(id, current.unwrap_or(0) + 1);
                    }
                    Op::DeleteId(_) => {
                        self.model.remove(&id);
                    }
                }
                self.commits += 1;
            }
            expected.push(code as i32);
            tx.send(SyncRequest {
                request_id,
                op: Some(op),
                expected_version,
            })
            .await
            .unwrap();
        }
        drop(tx);
        let mut acks = Vec::new();
        while let Some(response) = stream.message().await.unwrap() {
            if let Some(Event::Ack(ack)) = response.event {
                assert_eq!(ack.request_id, acks.len() as u64);
                acks.push(ack.code);
            }
        }
        assert_eq!(acks, expected, "worker {}", self.index);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a 30 s soak; scripts/test.sh runs it"]
async fn soak_all_methods_from_many_clients() {
    let duration = soak_duration();
    let server = TestServer::start_with(
        user_service::MemoryStore::new(1 << 16),
        user_service::Config::default(),
    )
    .await;

    // Watchers subscribe before any write (the call returns once the
    // response headers, sent after subscribing, are in). Each reads until
    // the final change, checking that seqs come without a gap.
    let mut watchers = Vec::new();
    for _ in 0..WATCHERS {
        let mut client = server.client().await;
        let (tx, requests) = request_stream::<SyncRequest>();
        let mut stream = client.sync_users(requests).await.unwrap().into_inner();
        watchers.push(tokio::spawn(async move {
            let _open = (client, tx);
            let mut seen = 0u64;
            loop {
                let response = within("a change", stream.message()).await.unwrap().unwrap();
                if let Some(Event::Change(change)) = response.event {
                    assert_eq!(change.seq, seen + 1, "a gap in the change feed");
                    seen = change.seq;
                    if change.user.is_some_and(|u| u.id == FINAL_ID) {
                        return seen;
                    }
                }
            }
        }));
    }

    let started = Instant::now();
    let mut workers = Vec::new();
    for index in 0..WORKERS {
        let client = server.client().await;
        workers.push(tokio::spawn(async move {
            let mut worker = Worker {
                index,
                client,
                model: BTreeMap::new(),
                rng: fastrand::Rng::with_seed(index as u64 + 1),
                commits: 0,
                calls: 0,
            };
            while started.elapsed() < duration {
                worker.step().await;
            }
            worker
        }));
    }

    // Memory once the store has reached its working size.
    let mid = tokio::spawn(async move {
        tokio::time::sleep(duration / 3).await;
        rss_bytes(std::process::id())
    });
    let mid_rss = mid.await.unwrap();

    let mut commits = 0;
    let mut calls = 0;
    let mut stored = 0;
    for worker in workers {
        let worker = worker.await.unwrap();
        commits += worker.commits;
        calls += worker.calls;
        stored += worker.model.len();
    }
    let end_rss = rss_bytes(std::process::id());

    // Exact counts: the store holds what the models say...
    let users = test_support::list_all(&mut server.client().await).await;
    assert_eq!(users.len(), stored);
    // ...and every watcher saw every commit, in order, without a gap, up to
    // a final marker write.
    let mut client = server.client().await;
    client.add_user(a_user(FINAL_ID, "Final")).await.unwrap();
    for watcher in watchers {
        assert_eq!(within("a watcher", watcher).await.unwrap(), commits + 1);
    }
    drop(client);

    // Nothing left open once the clients are gone.
    within(
        "calls and subscriptions to close",
        server
            .gauges
            .wait_until(|g| g.in_flight_calls() == 0 && g.subscribers() == 0),
    )
    .await;

    let secs = started.elapsed().as_secs_f64();
    println!(
        "soak: {calls} calls in {secs:.1} s ({:.0}/s) from {WORKERS} clients, \
         {commits} commits, {stored} users, {WATCHERS} watchers gapless; \
         RSS {:.1} MiB at 1/3, {:.1} MiB at end",
        calls as f64 / secs,
        mid_rss as f64 / (1 << 20) as f64,
        end_rss as f64 / (1 << 20) as f64,
    );
    assert!(
        end_rss.saturating_sub(mid_rss) < MAX_RSS_GROWTH,
        "memory grew from {mid_rss} to {end_rss} bytes"
    );
}
