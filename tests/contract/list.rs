//! ListUsers.

use std::{
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
};

use tokio::sync::Notify;
use tonic::Code;
use user_service::{
    Config, MemoryStore, Store,
    proto::{self, ListUsersRequest},
    store::{ListFilter, Page, StoreError},
};

use test_support::{
    Backend, Client, Delegate, FEED_CAPACITY, Hooks, TestServer, list_all, postgres_store,
    sqlite_store, user, user_with_id, within,
};

test_support::for_each_backend!(
    lists_in_ascending_id_order,
    filters_resumes_and_limits,
    lists_every_user_of_a_large_store_once,
    rejects_a_malformed_after_id,
);

async fn add(client: &mut Client, id: &str, verified: bool) {
    let u = proto::User {
        verified,
        ..user_with_id(id)
    };
    client.add_user(u).await.unwrap();
}

async fn ids(client: &mut Client, request: ListUsersRequest) -> Vec<String> {
    let mut stream = client.list_users(request).await.unwrap().into_inner();
    let mut ids = Vec::new();
    while let Some(u) = within("a user", stream.message()).await.unwrap() {
        ids.push(u.id);
    }
    ids
}

async fn lists_in_ascending_id_order(backend: Backend) {
    let server = backend.start().await;
    let mut client = server.client().await;
    for id in ["c", "a", "B", "b", "a-1", "_"] {
        add(&mut client, id, false).await;
    }
    let listed = ids(&mut client, ListUsersRequest::default()).await;
    // Byte-wise: '-' < digits < uppercase < '_' < lowercase.
    assert_eq!(listed, ["B", "_", "a", "a-1", "b", "c"]);
}

async fn filters_resumes_and_limits(backend: Backend) {
    let server = backend.start().await;
    let mut client = server.client().await;
    for i in 0..10 {
        add(&mut client, &format!("u{i}"), i % 3 == 0).await;
    }
    let verified = ids(
        &mut client,
        ListUsersRequest {
            verified: Some(true),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(verified, ["u0", "u3", "u6", "u9"]);

    let unverified = ids(
        &mut client,
        ListUsersRequest {
            verified: Some(false),
            after_id: "u4".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(unverified, ["u5", "u7", "u8"]);

    let limited = ids(
        &mut client,
        ListUsersRequest {
            after_id: "u2".into(),
            limit: 3,
            ..Default::default()
        },
    )
    .await;
    assert_eq!(limited, ["u3", "u4", "u5"]);

    // `after_id` need not be a stored id: listing resumes strictly after it.
    let after_missing = ids(
        &mut client,
        ListUsersRequest {
            after_id: "u45".into(),
            ..Default::default()
        },
    )
    .await;
    assert_eq!(after_missing, ["u5", "u6", "u7", "u8", "u9"]);

    let past_the_end = ids(
        &mut client,
        ListUsersRequest {
            after_id: "z".into(),
            ..Default::default()
        },
    )
    .await;
    assert!(past_the_end.is_empty());
}

async fn lists_every_user_of_a_large_store_once(backend: Backend) {
    let server = backend.start().await;
    let mut client = server.client().await;
    // Several pages' worth, through BulkAddUsers.
    let rows: Vec<proto::User> = (0..3000).map(|i| user(&format!("user {i}"))).collect();
    let report = client
        .bulk_add_users(tokio_stream::iter(rows))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(report.added, 3000);
    let listed = list_all(&mut client).await;
    assert_eq!(listed.len(), 3000);
    assert!(
        listed.windows(2).all(|w| w[0].id < w[1].id),
        "strictly ascending"
    );
    // Server-assigned ids follow creation order, so the listing does too.
    assert!(
        listed
            .iter()
            .enumerate()
            .all(|(i, u)| u.first_name == format!("user {i}"))
    );
}

async fn rejects_a_malformed_after_id(backend: Backend) {
    let server = backend.start().await;
    let mut client = server.client().await;
    let status = client
        .list_users(ListUsersRequest {
            after_id: "not an id".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("after_id"),
        "{}",
        status.message()
    );
}

/// Hooks that count a store's listing pages and its live handles, to see
/// what a listing does after its client goes away.
struct Tracked {
    probe: Arc<Probe>,
}

#[derive(Default)]
struct Probe {
    pages: AtomicUsize,
    handles: AtomicUsize,
    dropped: Notify,
}

impl Tracked {
    fn new<S: Store>(inner: S) -> Delegate<S, Tracked> {
        let probe = Arc::new(Probe::default());
        probe.handles.store(1, Ordering::SeqCst);
        Delegate::new(inner, Tracked { probe })
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.probe.handles.fetch_sub(1, Ordering::SeqCst);
        self.probe.dropped.notify_waiters();
    }
}

impl<S: Store> Hooks<S> for Tracked {
    fn list_page(
        &self,
        store: &S,
        filter: ListFilter,
        after: Option<&str>,
        max: usize,
    ) -> impl Future<Output = Result<Page, StoreError>> + Send {
        self.probe.pages.fetch_add(1, Ordering::SeqCst);
        store.list_page(filter, after, max)
    }
}

// Cloning is how the service hands the store to a listing: count it.
impl Clone for Tracked {
    fn clone(&self) -> Self {
        self.probe.handles.fetch_add(1, Ordering::SeqCst);
        Tracked {
            probe: self.probe.clone(),
        }
    }
}

#[tokio::test]
async fn a_cancelled_listing_stops_its_work() {
    cancelled_listing_stops_its_work(MemoryStore::new(FEED_CAPACITY)).await;
}

#[tokio::test]
async fn a_cancelled_sqlite_listing_stops_its_work() {
    let (store, _dir) = sqlite_store(FEED_CAPACITY);
    cancelled_listing_stops_its_work(store).await;
}

#[tokio::test]
async fn a_cancelled_postgres_listing_stops_its_work() {
    if test_support::postgres::skip_without_database() {
        return;
    }
    let (store, _schema) = postgres_store(FEED_CAPACITY).await;
    cancelled_listing_stops_its_work(store).await;
}

async fn cancelled_listing_stops_its_work<S: Store>(inner: S) {
    let store = Tracked::new(inner);
    let probe = store.hooks.probe.clone();
    let server = TestServer::start_with(store.clone(), Config::default()).await;
    let mut client = server.client().await;
    let rows: Vec<proto::User> = (0..20_000).map(|i| user(&format!("u{i}"))).collect();
    client
        .bulk_add_users(tokio_stream::iter(rows))
        .await
        .unwrap();
    let handles_before = probe.handles.load(Ordering::SeqCst);

    // A client whose HTTP/2 receive window holds ~1000 users, not 20,000:
    // flow control is what tells the server to wait.
    let mut reader = server.small_window_client().await;
    let mut stream = reader
        .list_users(ListUsersRequest::default())
        .await
        .unwrap()
        .into_inner();
    within("the first user", stream.message())
        .await
        .unwrap()
        .unwrap();
    // Cancel: dropping the response stream resets the HTTP/2 stream.
    drop(stream);

    // The server drops the listing, and with it its store handle.
    within("the listing to be dropped", async {
        loop {
            let dropped = probe.dropped.notified();
            if probe.handles.load(Ordering::SeqCst) <= handles_before {
                break;
            }
            dropped.await;
        }
    })
    .await;
    let pages = probe.pages.load(Ordering::SeqCst);
    assert!(
        pages <= 20,
        "the listing read {pages} pages of 256 for a client that read one user"
    );
    // And the server goes on serving.
    assert_eq!(list_all(&mut client).await.len(), 20_000);
}
