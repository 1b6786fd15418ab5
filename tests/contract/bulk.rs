//! BulkAddUsers.

use tonic::Code;
use user_service::proto;

use prost::Message;
use test_support::{
    Backend, list_all,
    raw::{self, RawConn},
    request_stream, user, user_with_id, within,
};

test_support::for_each_backend!(
    imports_every_valid_row_and_reports_the_rest,
    reports_at_most_100_errors_but_counts_all,
    an_empty_stream_adds_nothing,
    rows_stored_before_an_abort_stay_stored,
    rows_received_before_the_connection_breaks_are_committed,
    rows_received_before_a_reset_are_committed,
    a_long_import_reports_failures_in_stream_order_across_batches,
);

async fn imports_every_valid_row_and_reports_the_rest(backend: Backend) {
    let server = backend.start().await;
    let mut client = server.client().await;
    client.add_user(user_with_id("taken")).await.unwrap();

    let rows = vec![
        user("ok 0"),            // 0
        user(""),                // 1: invalid first_name
        user_with_id("dup"),     // 2
        user_with_id("dup"),     // 3: duplicate within the stream
        user_with_id("taken"),   // 4: duplicate against the store
        user_with_id("bad id!"), // 5: invalid id
        user("ok 6"),            // 6
    ];
    let report = client
        .bulk_add_users(tokio_stream::iter(rows))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(report.added, 3);
    assert_eq!(report.failed, 4);
    let errors: Vec<(u64, i32)> = report.errors.iter().map(|e| (e.index, e.code)).collect();
    assert_eq!(
        errors,
        [
            (1, Code::InvalidArgument as i32),
            (3, Code::AlreadyExists as i32),
            (4, Code::AlreadyExists as i32),
            (5, Code::InvalidArgument as i32),
        ]
    );
    assert!(report.errors[0].message.contains("first_name"));
    assert!(report.errors[1].message.contains("dup"));

    let mut names: Vec<String> = list_all(&mut client)
        .await
        .into_iter()
        .map(|u| u.first_name)
        .collect();
    names.sort();
    assert_eq!(names, ["Ann", "Ann", "ok 0", "ok 6"]); // "taken", "dup", two new
}

async fn reports_at_most_100_errors_but_counts_all(backend: Backend) {
    let server = backend.start().await;
    let mut client = server.client().await;
    let rows = (0..300).map(|i| if i % 2 == 0 { user("") } else { user("fine") });
    let report = client
        .bulk_add_users(tokio_stream::iter(rows))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((report.added, report.failed), (150, 150));
    assert_eq!(report.errors.len(), 100);
    let indexes: Vec<u64> = report.errors.iter().map(|e| e.index).collect();
    let expected: Vec<u64> = (0..100).map(|i| i * 2).collect();
    assert_eq!(indexes, expected);
}

async fn an_empty_stream_adds_nothing(backend: Backend) {
    let server = backend.start().await;
    let mut client = server.client().await;
    let report = client
        .bulk_add_users(tokio_stream::iter(Vec::<proto::User>::new()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(report, proto::BulkAddUsersResponse::default());
}

async fn rows_stored_before_an_abort_stay_stored(backend: Backend) {
    let server = backend.start().await;
    let mut client = server.client().await;
    let mut watcher = server.client().await;
    let (_sync_tx, sync_rx) = request_stream::<proto::SyncRequest>();
    let mut changes = watcher.sync_users(sync_rx).await.unwrap().into_inner();

    let (tx, rows) = request_stream();
    let call = tokio::spawn(async move { client.bulk_add_users(rows).await });
    for i in 0..50 {
        tx.send(user_with_id(&format!("row-{i:02}"))).await.unwrap();
    }
    // Wait until the server has committed all 50 (their Changes arrive)...
    for _ in 0..50 {
        within("a change", changes.message())
            .await
            .unwrap()
            .unwrap();
    }
    // ...then abort the call mid-stream.
    call.abort();
    let _ = call.await;

    let mut client = server.client().await;
    let stored = list_all(&mut client).await;
    assert_eq!(stored.len(), 50);
    assert_eq!(stored[0].id, "row-00");
    assert_eq!(stored[49].id, "row-49");
    // The server still takes imports.
    let report = client
        .bulk_add_users(tokio_stream::iter(vec![user("after")]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(report.added, 1);
}

/// A client that sends rows and then goes away (it closes its connection
/// without a word, as a process that exits does): the rows the server
/// received are still committed, as when the call breaks off, and not
/// dropped with the connection.
async fn rows_received_before_the_connection_breaks_are_committed(backend: Backend) {
    rows_received_before_a_break_are_committed(backend, |mut conn| async move {
        conn.close_write().await.unwrap();
        // The server closes its side in turn: read up to there, so that
        // every byte it sent is taken and the close is clean both ways.
        while conn.read().await.is_some() {}
        conn
    })
    .await;
}

/// A client that resets the stream (cancels the call) right after sending
/// rows: the rows that arrived before the reset are committed.
async fn rows_received_before_a_reset_are_committed(backend: Backend) {
    rows_received_before_a_break_are_committed(backend, |mut conn| async move {
        conn.send(raw::RST_STREAM, 0, 1, &raw::CANCEL.to_be_bytes())
            .await
            .unwrap();
        // Held until the rows are committed: only the stream ends.
        conn
    })
    .await;
}

/// Starts an import on a raw connection, waits until its first rows are
/// committed, sends more in one frame and then `breaks` the call: every
/// row must end up stored.
async fn rows_received_before_a_break_are_committed<B, F>(backend: Backend, breaks: B)
where
    B: FnOnce(RawConn) -> F,
    F: IntoFuture,
{
    const FIRST: usize = 10;
    // More than two batches of 1024: rows wait to be read when the call
    // breaks.
    const THEN: usize = 3000;
    let server = backend.start().await;
    let mut watcher = server.client().await;
    let (_sync_tx, sync_rx) = request_stream::<proto::SyncRequest>();
    let mut changes = watcher.sync_users(sync_rx).await.unwrap().into_inner();
    let rows = |range: std::ops::Range<usize>| {
        let mut body = Vec::new();
        for i in range {
            body.extend(raw::grpc_frame(
                &user_with_id(&format!("gone-{i:04}")).encode_to_vec(),
            ));
        }
        body
    };

    let mut conn = RawConn::connect(server.addr).await;
    conn.open(1, "/grpcUser.UserService/BulkAddUsers")
        .await
        .unwrap();
    // The import is under way: its first rows are committed...
    conn.send(raw::DATA, 0, 1, &rows(0..FIRST)).await.unwrap();
    for _ in 0..FIRST {
        within("a change", changes.message())
            .await
            .unwrap()
            .unwrap();
    }
    // ...when more arrive, more than one batch, and the call breaks with the
    // stream still open.
    for frame in rows(FIRST..FIRST + THEN).chunks(16 * 1024) {
        conn.send(raw::DATA, 0, 1, frame).await.unwrap();
    }
    let _kept = breaks(conn).await;

    for _ in 0..THEN {
        within("a change", changes.message())
            .await
            .unwrap()
            .unwrap();
    }
    let stored = list_all(&mut server.client().await).await;
    assert_eq!(stored.len(), FIRST + THEN);
}

async fn a_long_import_reports_failures_in_stream_order_across_batches(backend: Backend) {
    let server = backend.start().await;
    let mut client = server.client().await;
    // Many batches' worth of rows, sent as fast as the server takes them, so
    // that one batch is read while the one before it commits. Every 97th row
    // is invalid; every 1000th (from 999) repeats the id of a row 990 rows
    // before it, most likely in an earlier batch.
    const ROWS: usize = 6000;
    let mut expected = Vec::new();
    let rows: Vec<proto::User> = (0..ROWS)
        .map(|i| {
            if i % 97 == 0 {
                expected.push((i as u64, Code::InvalidArgument as i32));
                user("")
            } else if i % 1000 == 999 {
                expected.push((i as u64, Code::AlreadyExists as i32));
                user_with_id(&format!("row-{:05}", i - 990))
            } else {
                user_with_id(&format!("row-{i:05}"))
            }
        })
        .collect();
    assert!(expected.len() < 100, "every failure fits in the report");
    let report = client
        .bulk_add_users(tokio_stream::iter(rows))
        .await
        .unwrap()
        .into_inner();
    let errors: Vec<(u64, i32)> = report.errors.iter().map(|e| (e.index, e.code)).collect();
    assert_eq!(errors, expected);
    assert_eq!(report.failed, expected.len() as u64);
    assert_eq!(report.added, (ROWS - expected.len()) as u64);
    let stored = list_all(&mut client).await;
    assert_eq!(stored.len(), ROWS - expected.len());
}
