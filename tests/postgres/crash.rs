//! A replica killed (`SIGKILL`) in the middle of a bulk import and of
//! SyncUsers writes: every write it acknowledged is stored, nothing is half
//! applied, and the other replica's streams go on with no gap.

use std::{
    collections::HashSet,
    sync::{Arc, Mutex},
};

use tonic::Code;
use user_service::proto::{GetUserRequest, sync_response::Event};

use test_support::{postgres::TestSchema, request_stream, user_named, within};

use crate::{
    packed::changelog,
    replica::{Replica, Sync, assert_gapless},
};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_replica_loses_no_acknowledged_write_and_the_others_go_on() {
    if test_support::postgres::skip_without_database() {
        return;
    }
    let schema = TestSchema::new().await;
    let doomed = Replica::start(&schema.url, &[]).await;
    let survivor = Replica::start(&schema.url, &[]).await;
    let mut listener = Sync::open(&survivor).await;

    // A bulk import on the doomed replica that never finishes: rows go in
    // as fast as it takes them until the process dies.
    let mut bulk_client = doomed.client().await;
    let (rows, requests) = request_stream();
    let import = tokio::spawn(async move { bulk_client.bulk_add_users(requests).await });
    let feeder = tokio::spawn(async move {
        for i in 0u64.. {
            if rows
                .send(user_named(&format!("b{i:07}"), "B"))
                .await
                .is_err()
            {
                break;
            }
        }
    });

    // SyncUsers writes on the doomed replica, each Ack recorded.
    let acked = Arc::new(Mutex::new(Vec::new()));
    let mut writer = Sync::open(&doomed).await;
    let writes = tokio::spawn({
        let acked = acked.clone();
        async move {
            for i in 0u64.. {
                writer
                    .upsert(i, user_named(&format!("s{i:05}"), "S"), 0)
                    .await;
                let ack = loop {
                    match writer.next().await {
                        Ok(Event::Ack(ack)) => break ack,
                        Ok(Event::Change(_)) => {}
                        Err(_) => return,
                    }
                };
                assert_eq!(ack.code, Code::Ok as i32, "{}", ack.message);
                acked.lock().unwrap().push((ack.seq, ack.user.unwrap().id));
            }
        }
    });

    // Enough of both committed, then the kill.
    within("writes through the doomed replica", async {
        while acked.lock().unwrap().len() < 30 {
            listener.next_change().await;
        }
    })
    .await;
    doomed.kill();
    let _ = within("the writer to notice", writes).await;
    feeder.abort();
    let import = within("the import to fail", import).await.unwrap();
    // No status came from the server: the client reports its own transport
    // error (which code it picks depends on where the broken pipe is seen).
    let status = import.unwrap_err();
    assert!(
        std::error::Error::source(&status).is_some_and(|s| s.is::<tonic::transport::Error>()),
        "{status:?}"
    );

    // Every acknowledged write is stored.
    let acked = acked.lock().unwrap().clone();
    let mut client = survivor.client().await;
    for (_, id) in &acked {
        let user = client
            .get_user(GetUserRequest { id: id.clone() })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(&user.id, id);
    }

    // Nothing half applied: every stored user has its change in the
    // changelog and every change its user, with the counter at the last.
    let db = schema.client().await;
    let row = db
        .query_one(
            "SELECT (SELECT count(*) FROM users), (SELECT seq FROM user_change_seq)",
            &[],
        )
        .await
        .unwrap();
    let (users, counter): (i64, i64) = (row.get(0), row.get(1));
    let stored: HashSet<String> = db
        .query("SELECT id FROM users WHERE version = 1", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    let log = changelog(&db).await;
    let changes = log.len() as i64;
    let matched = log
        .iter()
        .filter(|(_, c)| c.kind == 1 && c.version == 1 && stored.contains(&c.id))
        .count() as i64;
    let max_seq = log.last().map_or(0, |(seq, _)| *seq);
    assert!(
        log.iter().map(|(seq, _)| *seq).eq(1..=changes),
        "seqs 1..=n"
    );
    assert_eq!(users, changes, "one change per user (creates only)");
    assert_eq!(matched, users, "each user with its own change");
    assert_eq!((max_seq, counter), (changes, changes), "seqs 1..=n, no gap");

    // The survivor's stream goes on, with no gap, through new writes.
    client.add_user(user_named("after", "A")).await.unwrap();
    let last = counter as u64 + 1;
    let mut changes = listener.changes_through(last).await;
    let mut fresh = Sync::open(&survivor).await;
    fresh.upsert(1, user_named("later", "L"), 0).await;
    let (ack, _) = fresh.next_ack().await;
    assert_eq!(ack.seq, last + 1);
    changes.push(listener.next_change().await);
    let first = changes[0].seq;
    assert_gapless(&changes, first);
    let ids: HashSet<String> = changes
        .iter()
        .map(|c| c.user.as_ref().unwrap().id.clone())
        .collect();
    for (seq, id) in &acked {
        if *seq >= first {
            assert!(ids.contains(id), "{id} missing from the stream");
        }
    }
}
