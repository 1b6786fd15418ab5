//! SyncUsers.

use tokio::sync::mpsc;
use tonic::{Code, Streaming};
use user_service::proto::{
    self, Ack, Change, SyncRequest, SyncResponse, change::Kind, sync_request::Op,
    sync_response::Event,
};

use user_service::{
    Config, MemoryStore, Store,
    store::{ChangeFeed, Subscription},
};

use test_support::{
    Backend, Client, Delegate, FEED_CAPACITY, Hooks, TestServer, request_stream, user,
    user_with_id, within,
};

test_support::for_each_backend!(
    acks_report_each_outcome_and_changes_follow_commits,
    requests_apply_in_the_order_sent,
    each_ack_comes_before_its_change,
    streams_see_every_change_from_every_call_with_gapless_seq,
    the_response_starts_before_the_first_request,
    closing_with_no_requests_ends_with_ok,
    a_lagging_subscriber_is_aborted_not_skipped,
    pipelined_ops_keep_their_order_beside_another_writer,
);

/// One SyncUsers call: `tx` sends requests (drop it to close our side),
/// `rx` reads Acks and Changes.
struct Sync {
    tx: mpsc::Sender<SyncRequest>,
    rx: Streaming<SyncResponse>,
    _client: Client,
}

impl Sync {
    /// Opens a call on a connection of its own.
    async fn open(server: &TestServer) -> Sync {
        let mut client = server.client().await;
        let (tx, requests) = request_stream();
        let rx = client.sync_users(requests).await.unwrap().into_inner();
        Sync {
            tx,
            rx,
            _client: client,
        }
    }

    async fn send(&self, request_id: u64, op: Option<Op>, expected_version: u64) {
        let request = SyncRequest {
            request_id,
            op,
            expected_version,
        };
        self.tx.send(request).await.unwrap();
    }

    async fn next(&mut self) -> Event {
        within("a SyncUsers event", self.rx.message())
            .await
            .unwrap()
            .expect("the stream is open")
            .event
            .expect("an event")
    }

    async fn next_change(&mut self) -> Change {
        loop {
            if let Event::Change(change) = self.next().await {
                return change;
            }
        }
    }

    /// Closes our side and reads the rest of the call, which must end with OK.
    async fn finish(mut self) -> (Vec<Ack>, Vec<Change>) {
        drop(self.tx);
        let (mut acks, mut changes) = (Vec::new(), Vec::new());
        while let Some(response) = within("the call to end", self.rx.message()).await.unwrap() {
            match response.event.unwrap() {
                Event::Ack(ack) => acks.push(ack),
                Event::Change(change) => changes.push(change),
            }
        }
        (acks, changes)
    }
}

fn upsert(u: proto::User) -> Option<Op> {
    Some(Op::Upsert(u))
}

fn delete(id: &str) -> Option<Op> {
    Some(Op::DeleteId(id.into()))
}

async fn acks_report_each_outcome_and_changes_follow_commits(backend: Backend) {
    let server = backend.start().await;
    let sync = Sync::open(&server).await;
    let ok = Code::Ok as i32;
    // (request, expected code, expected seq)
    sync.send(1, upsert(user("New")), 0).await; // create, new id
    sync.send(2, upsert(user_with_id("a")), 0).await; // create "a"
    sync.send(3, upsert(user_with_id("a")), 1).await; // update "a" to version 2
    sync.send(4, upsert(user_with_id("a")), 1).await; // stale version
    sync.send(5, None, 0).await; // no op
    sync.send(6, upsert(user_with_id("")), 0).await; // fine: creates a new id
    sync.send(
        7,
        upsert(proto::User {
            first_name: " ".into(),
            ..user_with_id("a")
        }),
        0,
    )
    .await;
    sync.send(8, delete("nope"), 0).await;
    sync.send(9, delete("a"), 5).await;
    sync.send(10, delete("a"), 2).await;
    sync.send(11, upsert(user_with_id("a")), 0).await; // back, at version 1
    sync.send(12, delete(""), 0).await;
    sync.send(13, upsert(user_with_id("b")), 7).await; // expected version of a missing user
    let (acks, changes) = sync.finish().await;

    let outcome: Vec<(u64, i32, u64)> =
        acks.iter().map(|a| (a.request_id, a.code, a.seq)).collect();
    let (invalid, not_found, precondition) = (
        Code::InvalidArgument as i32,
        Code::NotFound as i32,
        Code::FailedPrecondition as i32,
    );
    assert_eq!(
        outcome,
        [
            (1, ok, 1),
            (2, ok, 2),
            (3, ok, 3),
            (4, precondition, 0),
            (5, invalid, 0),
            (6, ok, 4),
            (7, invalid, 0),
            (8, not_found, 0),
            (9, precondition, 0),
            (10, ok, 5),
            (11, ok, 6),
            (12, invalid, 0),
            (13, precondition, 0),
        ]
    );
    let versions: Vec<u64> = acks
        .iter()
        .filter(|a| a.code == ok)
        .map(|a| a.user.as_ref().unwrap().version)
        .collect();
    assert_eq!(versions, [1, 1, 2, 1, 2, 1]);
    assert!(acks[4].message.contains("op"), "{}", acks[4].message);
    assert!(
        acks[6].message.contains("first_name"),
        "{}",
        acks[6].message
    );
    assert!(
        acks[11].message.contains("delete_id"),
        "{}",
        acks[11].message
    );
    assert!(
        acks.iter()
            .filter(|a| a.code != ok)
            .all(|a| a.user.is_none())
    );

    // Every committed op, and only those, as a Change with the Ack's seq and user.
    let kinds: Vec<(u64, Kind)> = changes.iter().map(|c| (c.seq, c.kind())).collect();
    assert_eq!(
        kinds,
        [
            (1, Kind::Created),
            (2, Kind::Created),
            (3, Kind::Updated),
            (4, Kind::Created),
            (5, Kind::Deleted),
            (6, Kind::Created),
        ]
    );
    for ack in acks.iter().filter(|a| a.code == ok) {
        let change = changes.iter().find(|c| c.seq == ack.seq).unwrap();
        assert_eq!(change.user, ack.user);
    }
    // A deleted user's Change carries the user as it was.
    assert_eq!(changes[4].user.as_ref().unwrap().id, "a");
    assert_eq!(changes[4].user.as_ref().unwrap().version, 2);
}

async fn requests_apply_in_the_order_sent(backend: Backend) {
    let server = backend.start().await;
    let sync = Sync::open(&server).await;
    // Each request expects the version the previous one produced: any
    // reordering would fail one with FAILED_PRECONDITION.
    for i in 0..300u64 {
        let u = proto::User {
            first_name: format!("v{}", i + 1),
            ..user_with_id("counter")
        };
        sync.send(i, upsert(u), i).await;
    }
    let (acks, changes) = sync.finish().await;
    assert_eq!(acks.len(), 300);
    for (i, ack) in acks.iter().enumerate() {
        assert_eq!(ack.request_id, i as u64);
        assert_eq!(ack.code, 0, "request {i}: {}", ack.message);
        assert_eq!(ack.user.as_ref().unwrap().version, i as u64 + 1);
    }
    assert_eq!(changes.len(), 300);
}

async fn each_ack_comes_before_its_change(backend: Backend) {
    let server = backend.start().await;
    let mut sync = Sync::open(&server).await;
    for i in 0..50u64 {
        sync.send(i, upsert(user_with_id(&format!("u{i}"))), 0)
            .await;
    }
    // Pipelined requests, yet for every op: its Ack, then its Change.
    for i in 0..50u64 {
        let Event::Ack(ack) = sync.next().await else {
            panic!("op {i}: an Ack expected first");
        };
        assert_eq!((ack.request_id, ack.code, ack.seq), (i, 0, i + 1));
        let Event::Change(change) = sync.next().await else {
            panic!("op {i}: its Change expected after its Ack");
        };
        assert_eq!(change.seq, ack.seq);
    }
}

async fn streams_see_every_change_from_every_call_with_gapless_seq(backend: Backend) {
    let server = backend.start().await;
    let mut client = server.client().await;
    let mut a = Sync::open(&server).await;
    let mut b = Sync::open(&server).await;

    a.send(1, upsert(user_with_id("from-a")), 0).await;
    let first = a.next_change().await;
    b.send(1, upsert(user_with_id("from-b")), 0).await;
    let second = a.next_change().await;
    // Both committed: the unary and bulk writes below come after them.
    client.add_user(user_with_id("from-add")).await.unwrap();
    let rows = vec![
        user_with_id("bulk-1"),
        user_with_id("bulk-2"),
        user_with_id("bulk-3"),
    ];
    client
        .bulk_add_users(tokio_stream::iter(rows))
        .await
        .unwrap();

    let mut seen_by_a = vec![first, second];
    let mut seen_by_b = Vec::new();
    while seen_by_a.len() < 6 {
        seen_by_a.push(a.next_change().await);
    }
    while seen_by_b.len() < 6 {
        seen_by_b.push(b.next_change().await);
    }
    // Both streams see the same changes, in the same order, seq 1 to 6.
    assert_eq!(seen_by_a, seen_by_b);
    let seen: Vec<(u64, &str)> = seen_by_a
        .iter()
        .map(|c| (c.seq, c.user.as_ref().unwrap().id.as_str()))
        .collect();
    assert_eq!(
        seen,
        [
            (1, "from-a"),
            (2, "from-b"),
            (3, "from-add"),
            (4, "bulk-1"),
            (5, "bulk-2"),
            (6, "bulk-3"),
        ]
    );
}

async fn the_response_starts_before_the_first_request(backend: Backend) {
    let server = backend.start().await;
    let mut client = server.client().await;
    // `open` returns once the response headers arrive: the server must not
    // wait for a request first. From then on, the subscription is live.
    let mut listener = Sync::open(&server).await;
    let added = client
        .add_user(user("Ada"))
        .await
        .unwrap()
        .into_inner()
        .user;
    let change = listener.next_change().await;
    assert_eq!(change.seq, 1);
    assert_eq!(change.kind(), Kind::Created);
    assert_eq!(change.user, added);
}

async fn closing_with_no_requests_ends_with_ok(backend: Backend) {
    let server = backend.start().await;
    let sync = Sync::open(&server).await;
    let (acks, changes) = sync.finish().await;
    assert!(acks.is_empty() && changes.is_empty());
}

async fn a_lagging_subscriber_is_aborted_not_skipped(backend: Backend) {
    let server: TestServer = backend.start_with_feed(16).await;
    let mut client = server.client().await;
    let mut slow = Sync::open(&server).await;
    // Commit far more changes than the feed holds, without reading.
    let rows: Vec<proto::User> = (0..5000).map(|i| user(&format!("u{i}"))).collect();
    let report = client
        .bulk_add_users(tokio_stream::iter(rows))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(report.added, 5000);

    let mut expected_seq = 1;
    let status = loop {
        match within("the stream to end", slow.rx.message()).await {
            Ok(Some(response)) => {
                let Some(Event::Change(change)) = response.event else {
                    panic!("only changes expected")
                };
                // What arrives is gapless: nothing is skipped silently.
                assert_eq!(change.seq, expected_seq);
                expected_seq += 1;
            }
            Ok(None) => panic!("the stream ended with OK after {expected_seq} changes"),
            Err(status) => break status,
        }
    };
    assert_eq!(status.code(), Code::Aborted);
    assert!(status.message().contains("behind"), "{}", status.message());
    assert!(expected_seq <= 5000);
    // The server goes on.
    assert!(client.add_user(user("next")).await.is_ok());
}

async fn pipelined_ops_keep_their_order_beside_another_writer(backend: Backend) {
    let server = backend.start().await;
    let a = Sync::open(&server).await;
    let b = Sync::open(&server).await;
    // Several batches' worth of requests, all sent before any is answered,
    // while another stream writes: every 5th request is invalid, every 7th
    // updates "shared" expecting a version it does not have.
    const OPS: u64 = 600;
    let mut expected_codes = Vec::new();
    for i in 0..OPS {
        let (op, version, code) = if i % 5 == 0 {
            (upsert(user("")), 0, Code::InvalidArgument)
        } else if i % 7 == 0 {
            (
                upsert(user_with_id("shared")),
                999,
                Code::FailedPrecondition,
            )
        } else {
            (upsert(user_with_id(&format!("a-{i}"))), 0, Code::Ok)
        };
        a.send(i, op, version).await;
        expected_codes.push(code as i32);
        if i % 3 == 0 {
            b.send(i, upsert(user_with_id(&format!("b-{i}"))), 0).await;
        }
    }
    let (b_acks, _) = b.finish().await;
    assert!(b_acks.iter().all(|ack| ack.code == 0));

    // Read A's responses in order, as the client sees them.
    let mut a = a;
    drop(a.tx);
    let mut events = Vec::new();
    while let Some(response) = within("the call to end", a.rx.message()).await.unwrap() {
        events.push(response.event.unwrap());
    }
    let codes: Vec<i32> = events
        .iter()
        .filter_map(|e| match e {
            Event::Ack(ack) => Some(ack.code),
            Event::Change(_) => None,
        })
        .collect();
    assert_eq!(
        codes, expected_codes,
        "one Ack per request, in request order"
    );
    let mut request = 0;
    let mut last_seq = 0;
    let mut owed: Option<u64> = None;
    for event in &events {
        match event {
            Event::Ack(ack) => {
                assert_eq!(ack.request_id, request);
                request += 1;
                assert_eq!(owed, None, "an op's Change comes before the next Ack");
                owed = (ack.code == 0).then_some(ack.seq);
            }
            Event::Change(change) => {
                assert_eq!(
                    change.seq,
                    last_seq + 1,
                    "changes come gapless, in seq order"
                );
                last_seq = change.seq;
                if owed == Some(change.seq) {
                    owed = None;
                } else {
                    // Another stream's change, or one of ours whose Ack is
                    // not out yet: it must be another stream's.
                    let id = &change.user.as_ref().unwrap().id;
                    assert!(
                        id.starts_with("b-"),
                        "change {} ({id}) before its Ack",
                        change.seq
                    );
                }
            }
        }
    }
    assert_eq!(owed, None);
}

/// A store whose changes reach the feed late: a forwarder republishes each
/// change of the inner store a moment after it committed, the way a
/// PostgreSQL replica's tailer reads it back from the changelog (after the
/// write has been answered, if the tailer is slow).
#[derive(Clone)]
struct LateFeed {
    feed: ChangeFeed,
}

impl LateFeed {
    fn new() -> Delegate<MemoryStore, LateFeed> {
        let inner = MemoryStore::new(FEED_CAPACITY);
        let feed = ChangeFeed::new(FEED_CAPACITY);
        let mut committed = inner.subscribe();
        let late = feed.clone();
        tokio::spawn(async move {
            while let Ok(change) = committed.recv().await {
                // Long enough for the writer's Ack to go out first.
                tokio::time::sleep(std::time::Duration::from_millis(2)).await;
                late.publish(change);
            }
        });
        Delegate::new(inner, LateFeed { feed })
    }
}

impl Hooks<MemoryStore> for LateFeed {
    fn subscribe(&self, _: &MemoryStore) -> Subscription {
        self.feed.subscribe()
    }
}

/// Changes that reach the feed after their writes were answered still go
/// out after their Acks, each before the next Ack, and a stream closed by
/// its client ends only once its own last Change is out.
#[tokio::test]
async fn late_changes_still_follow_their_acks() {
    let server = TestServer::start_with(LateFeed::new(), Config::default()).await;
    let sync = Sync::open(&server).await;
    for i in 0..40u64 {
        sync.send(i, upsert(user_with_id(&format!("u{i}"))), 0)
            .await;
    }
    let mut events = Vec::new();
    let mut sync = sync;
    drop(sync.tx);
    while let Some(response) = within("the call to end", sync.rx.message()).await.unwrap() {
        events.push(response.event.unwrap());
    }
    let mut owed = None;
    let mut acks = 0;
    for event in &events {
        match event {
            Event::Ack(ack) => {
                assert_eq!(owed, None, "an op's Change comes before the next Ack");
                assert_eq!(ack.code, 0);
                owed = Some(ack.seq);
                acks += 1;
            }
            Event::Change(change) => {
                assert_eq!(owed, Some(change.seq), "a Change after its own Ack");
                owed = None;
            }
        }
    }
    assert_eq!((acks, owed), (40, None), "every Ack and every Change");
}
