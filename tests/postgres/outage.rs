//! The database going away under load and coming back: restarted with
//! `pg_ctl restart`, and, separately, every server connection terminated
//! (`pg_terminate_backend`). Calls fail fast with UNAVAILABLE and never
//! INTERNAL, no acknowledged write is lost, health turns NOT_SERVING then
//! SERVING, and the change feed resumes without a gap.
//!
//! Each test restarts or cuts off a cluster of its own (see
//! `test_support::postgres::Cluster`), never a shared one.

use std::{
    collections::HashSet,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::task::JoinHandle;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use user_service::proto::GetUserRequest;

use test_support::{
    postgres::{Cluster, connect},
    user_named,
};

use crate::replica::{Replica, Sync, assert_gapless, code_of, wait_for_health};

/// The longest a call may take while the database is away: it must fail
/// fast, well within a client's usual deadline (the server's own
/// connection timeout is 5 s; a refused connection fails at once).
const CALL_BOUND: Duration = Duration::from_secs(5);

/// How long after the database is back the replicas must serve again: the
/// longest reconnection backoff (2 s) with room for a loaded machine.
const RECOVERY_BOUND: Duration = Duration::from_secs(15);

/// AddUser calls in a loop on each replica until stopped, each outcome and
/// how long it took recorded.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    workers: Vec<JoinHandle<Vec<(String, Code, Duration)>>>,
}

impl Load {
    async fn start(replicas: &[&Replica], workers_each: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicUsize::new(0));
        let mut workers = Vec::new();
        for (r, replica) in replicas.iter().enumerate() {
            for w in 0..workers_each {
                let mut client = replica.client().await;
                let (stop, ok) = (stop.clone(), ok.clone());
                workers.push(tokio::spawn(async move {
                    let mut outcomes = Vec::new();
                    for i in 0u64.. {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        let id = format!("w{r}-{w}-{i:06}");
                        let started = Instant::now();
                        let call = client.add_user(user_named(&id, "L"));
                        let code = match tokio::time::timeout(CALL_BOUND * 3, call).await {
                            Ok(result) => code_of(&result),
                            Err(_) => Code::DeadlineExceeded,
                        };
                        if code == Code::Ok {
                            ok.fetch_add(1, Ordering::Relaxed);
                        } else {
                            // Not a busy loop while the database is away.
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        outcomes.push((id, code, started.elapsed()));
                    }
                    outcomes
                }));
            }
        }
        Load { stop, ok, workers }
    }

    /// Waits (bounded) until `more` further calls have succeeded.
    async fn until_more_succeed(&self, more: usize) {
        let target = self.ok.load(Ordering::Relaxed) + more;
        let started = Instant::now();
        while self.ok.load(Ordering::Relaxed) < target {
            assert!(
                started.elapsed() < RECOVERY_BOUND,
                "the load made no progress"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops the load; checks every outcome; returns the acknowledged ids.
    async fn finish(self) -> Vec<String> {
        self.stop.store(true, Ordering::Relaxed);
        let mut acked = Vec::new();
        let (mut unavailable, mut slowest) = (0, Duration::ZERO);
        for worker in self.workers {
            for (id, code, took) in worker.await.unwrap() {
                assert!(took < CALL_BOUND, "{id} took {took:?} ({code:?})");
                match code {
                    Code::Ok => acked.push(id),
                    Code::Unavailable => {
                        unavailable += 1;
                        slowest = slowest.max(took);
                    }
                    other => panic!("{id}: {other:?}, only OK or UNAVAILABLE allowed"),
                }
            }
        }
        println!(
            "acknowledged {}, unavailable {unavailable} (slowest {slowest:?})",
            acked.len()
        );
        acked
    }
}

/// Ends the load, then checks that every write it had acknowledged is stored
/// (read through `replica`) and in every listener's feed, with no gap.
async fn assert_nothing_lost(load: Load, replica: &Replica, url: &str, listeners: &mut [Sync]) {
    let acked = load.finish().await;
    assert_stored(replica, &acked).await;
    let last = last_seq(url).await;
    for listener in listeners {
        assert_feed_complete(listener, last, &acked).await;
    }
}

/// Reads `listener`'s changes through the store's last seq; checks they
/// are gapless from 1 and hold every acknowledged id.
async fn assert_feed_complete(listener: &mut Sync, last_seq: u64, acked: &[String]) {
    let changes = listener.changes_through(last_seq).await;
    assert_gapless(&changes, 1);
    let ids: HashSet<&str> = changes
        .iter()
        .map(|c| c.user.as_ref().unwrap().id.as_str())
        .collect();
    for id in acked {
        assert!(ids.contains(id.as_str()), "{id} missing from the feed");
    }
}

/// Every acknowledged id, read back.
async fn assert_stored(replica: &Replica, acked: &[String]) {
    let mut client = replica.client().await;
    for id in acked {
        let user = client
            .get_user(GetUserRequest { id: id.clone() })
            .await
            .unwrap_or_else(|status| panic!("{id}: {status:?}"));
        assert_eq!(&user.into_inner().id, id);
    }
}

async fn last_seq(url: &str) -> u64 {
    let row = connect(url)
        .await
        .query_one("SELECT seq FROM user_change_seq", &[])
        .await
        .unwrap();
    row.get::<_, i64>(0) as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_database_restart_under_load_loses_nothing_and_the_feed_resumes() {
    if test_support::postgres::skip_without_server_programs() {
        return;
    }
    let cluster = tokio::task::spawn_blocking(Cluster::start).await.unwrap();
    let url = cluster.url();
    let a = Replica::start(&url, &[]).await;
    let b = Replica::start(&url, &[]).await;
    let mut listeners = [Sync::open(&a).await, Sync::open(&b).await];
    let load = Load::start(&[&a, &b], 4).await;
    load.until_more_succeed(100).await;

    let mut health = a.health().await;
    wait_for_health(&mut health, ServingStatus::Serving, RECOVERY_BOUND).await;
    let cluster = Arc::new(cluster);
    let restart = tokio::task::spawn_blocking({
        let cluster = cluster.clone();
        move || cluster.restart()
    });
    wait_for_health(&mut health, ServingStatus::NotServing, RECOVERY_BOUND).await;
    restart.await.unwrap();
    let back = wait_for_health(&mut health, ServingStatus::Serving, RECOVERY_BOUND).await;
    println!("serving again {back:?} after NOT_SERVING");
    load.until_more_succeed(100).await;
    assert_nothing_lost(load, &b, &url, &mut listeners).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn terminated_connections_under_load_lose_nothing_and_the_feed_resumes() {
    if test_support::postgres::skip_without_server_programs() {
        return;
    }
    let cluster = tokio::task::spawn_blocking(Cluster::start).await.unwrap();
    let admin = connect(&cluster.url()).await;
    admin.batch_execute("CREATE DATABASE users").await.unwrap();
    let url = format!("postgres://postgres@127.0.0.1:{}/users", cluster.port);
    let a = Replica::start(&url, &[]).await;
    let b = Replica::start(&url, &[]).await;
    let mut listeners = [Sync::open(&a).await, Sync::open(&b).await];
    let load = Load::start(&[&a, &b], 4).await;
    load.until_more_succeed(100).await;

    // Every server connection ended, again and again: the replicas
    // reconnect at once, and the load goes on.
    let terminate = "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                     WHERE datname = 'users' AND application_name = 'user-service'";
    for _ in 0..3 {
        let ended: i64 = admin.query_one(terminate, &[]).await.unwrap().get(0);
        // Some of the writers, tailers and pooled readers of two replicas
        // (those not back yet from the round before are not counted).
        assert!(ended >= 1, "{ended} connections ended");
        load.until_more_succeed(50).await;
    }

    // Ended, and kept out for a while: health turns NOT_SERVING, calls
    // fail fast, and SERVING comes back once connections are allowed. (A
    // new health stream: the one above has seen the flips of the rounds
    // before.)
    let mut health = a.health().await;
    wait_for_health(&mut health, ServingStatus::Serving, RECOVERY_BOUND).await;
    admin
        .batch_execute("ALTER DATABASE users ALLOW_CONNECTIONS false")
        .await
        .unwrap();
    // Until none is left: a connection that a replica was still opening
    // when the first went out (back from the rounds above) is not ended by
    // it, and would serve the calls below.
    let started = Instant::now();
    while admin
        .query_one(terminate, &[])
        .await
        .unwrap()
        .get::<_, i64>(0)
        > 0
    {
        assert!(
            started.elapsed() < RECOVERY_BOUND,
            "connections outlive the database"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    wait_for_health(&mut health, ServingStatus::NotServing, RECOVERY_BOUND).await;
    let mut client = a.client().await;
    let started = Instant::now();
    let refused = client.add_user(user_named("while-away", "W")).await;
    assert_eq!(code_of(&refused), Code::Unavailable);
    assert!(started.elapsed() < CALL_BOUND, "{:?}", started.elapsed());
    let read = client
        .get_user(GetUserRequest {
            id: "while-away".into(),
        })
        .await;
    assert_eq!(code_of(&read), Code::Unavailable);
    admin
        .batch_execute("ALTER DATABASE users ALLOW_CONNECTIONS true")
        .await
        .unwrap();
    let back = wait_for_health(&mut health, ServingStatus::Serving, RECOVERY_BOUND).await;
    println!("serving again {back:?} after connections were allowed");
    load.until_more_succeed(100).await;
    assert_nothing_lost(load, &b, &url, &mut listeners).await;
}
