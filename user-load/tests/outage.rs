//! A target that dies mid-run: the generator backs off and keeps loading
//! the live ones, reports when it went down and came back, keeps its
//! connection failures out of the latency, and `--verify` checks what was
//! written through it on a live target sharing its store, or says it could
//! not. The connection probe is a health Check, which adds nothing to the
//! figures of the service under test.

mod common;

use std::future::Future;

use common::*;
use serde_json::Value;
use test_support::postgres::{TestSchema, skip_without_database};
use tonic::{Request, Response, Status, Streaming};
use tonic_health::ServingStatus;
use user_service::proto::{
    self,
    user_service_server::{UserService, UserServiceServer},
};

/// OK AddUser calls a server has handled, from its metrics.
async fn added(server: &Server) -> f64 {
    let page = server.metrics().await;
    metric(
        &page,
        "grpc_server_handled_total",
        &[("grpc_method", "AddUser"), ("grpc_code", "OK")],
    )
}

/// Waits for `server` to have handled at least `calls` OK AddUser calls,
/// checking again on each Change of its feed.
async fn wait_for_added(server: &Server, calls: f64) {
    let mut feed = server.watch().await;
    while added(server).await < calls {
        feed.change().await;
    }
}

/// The report's figures for the target `addr`.
fn target<'a>(report: &'a Value, addr: &str) -> &'a Value {
    report["targets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["addr"] == addr)
        .unwrap_or_else(|| panic!("no target {addr} in {report}"))
}

#[tokio::test]
async fn a_dead_target_is_backed_off_reported_and_loaded_again_once_back() {
    let (live, dying) = (Server::start(&[]), Server::start(&[]));
    let dying_addr = dying.addr.clone();
    let dir = tempfile::TempDir::new().unwrap();
    let page = dir.path().join("outage.html");
    // Four workers over two targets: two send to the one that dies.
    let child = spawn_load(&[
        "add",
        "--addr",
        &format!("{},{}", live.addr, dying.addr),
        "--concurrency",
        "4",
        "--duration",
        "120s",
        "--json",
        "--html",
        &page.display().to_string(),
    ]);
    dying.watch().await.change().await;
    dying.kill();
    // The live target goes on being loaded while the other is down.
    let mut feed = live.watch().await;
    feed.change().await;
    // Back on the same address: the generator reconnects and loads it.
    let back = Server::start_on(&dying_addr, &[]);
    back.watch().await.change().await;
    interrupt(&child);
    let run = finish_async(child).await;
    assert_eq!(run.code, EXIT_INTERRUPTED, "{run:?}");
    let report = run.json();

    let dead = target(&report, &dying_addr);
    let outages = dead["outages"].as_array().unwrap();
    assert_eq!(outages.len(), 1, "{dead}");
    assert!(outages[0]["up_at_s"].as_f64() > outages[0]["down_at_s"].as_f64());
    assert!(!outages[0]["cause"].as_str().unwrap().is_empty());
    assert!(
        target(&report, &live.addr)["outages"]
            .as_array()
            .unwrap()
            .is_empty()
    );
    // Each of its two workers failed once at most, then waited for it:
    // no flood of calls at a refused port.
    let failures = report["connection_failures"].as_u64().unwrap();
    assert!((1..=2).contains(&failures), "{report}");
    assert_eq!(dead["connection_failures"].as_u64(), Some(failures));
    // Only calls that reached a server are timed, and have a status.
    assert_eq!(report["latency"]["count"], report["calls"]);
    let codes: u64 = report["codes"]
        .as_object()
        .unwrap()
        .values()
        .map(|n| n.as_u64().unwrap())
        .sum();
    assert_eq!(Some(codes), report["calls"].as_u64());
    let failures = report["failures"].to_string();
    assert!(failures.contains("got no answer"), "{failures}");
    assert!(
        failures.contains(&format!("{dying_addr} down at ")),
        "{failures}"
    );
    assert!(failures.contains("back at"), "{failures}");

    // The page says it too.
    let (dom, console) = render(&page, dir.path(), &["--dump-dom"]);
    assert!(console.is_empty(), "console: {console:?}");
    let targets = section(&dom, "<table id=\"targets\">", "</table>");
    assert!(
        targets.contains(&format!("{dying_addr} down at ")) && targets.contains("back at"),
        "{targets}"
    );
}

/// Streams aborted to the target `addr`, whatever their code.
fn aborted(report: &Value, addr: &str) -> u64 {
    target(report, addr)["streams_aborted"]
        .as_object()
        .unwrap()
        .values()
        .map(|n| n.as_u64().unwrap())
        .sum()
}

/// Runs `bulk` over `live` and `dying` with two streams to each, each
/// stream long enough to be sending when `end` ends `dying` (with short
/// ones, the end can fall between two streams, and then no row is left
/// without an answer), until `live` has stored more; returns the report.
async fn bulk_while_one_of_two_ends<F: Future<Output = ()>>(
    live: &Server,
    dying: Server,
    end: impl FnOnce(Server) -> F,
) -> Value {
    let child = spawn_load(&[
        "bulk",
        "--addr",
        &format!("{},{}", live.addr, dying.addr),
        "--concurrency",
        "4",
        "--per-stream",
        "1000000",
        "--duration",
        "120s",
        "--json",
    ]);
    dying.watch().await.change().await;
    end(dying).await;
    live.watch().await.change().await;
    interrupt(&child);
    let run = finish_async(child).await;
    assert_eq!(run.code, EXIT_INTERRUPTED, "{run:?}");
    run.json()
}

/// The failed units' kinds add up to the failed units: rows that got no
/// answer are counted apart, with their cause among the errors.
fn assert_kinds_explain_failures(report: &Value) {
    let kinds: u64 = report["failure_kinds"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["count"].as_u64().unwrap())
        .sum();
    let other = report["other_failures"].as_u64().unwrap();
    assert_eq!(
        Some(kinds + other),
        report["failed_calls"].as_u64(),
        "{report}"
    );
}

#[tokio::test]
async fn bulk_streams_wait_for_a_dead_target_instead_of_failing_again() {
    let (live, dying) = (Server::start(&[]), Server::start(&[]));
    let dying_addr = dying.addr.clone();
    let report = bulk_while_one_of_two_ends(&live, dying, |dying| async { dying.kill() }).await;
    // Each of its two streams failed once at most: no stream is opened to
    // a refused port again and again.
    assert!((1..=2).contains(&aborted(&report, &dying_addr)), "{report}");
    assert_eq!(aborted(&report, &live.addr), 0, "{report}");
    // Their rows got no answer: unconfirmed, apart from the rows' codes.
    let unconfirmed = report["rows_unconfirmed"].as_u64().unwrap();
    assert!(unconfirmed >= 1, "{report}");
    assert_eq!(report["connection_failures"].as_u64(), Some(unconfirmed));
    assert_eq!(
        target(&report, &dying_addr)["outages"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert_eq!(report["calls"], report["rows_added"]);
    assert_kinds_explain_failures(&report);
}

#[tokio::test]
async fn bulk_streams_ended_by_a_replica_shutting_down_are_not_reopened_to_it() {
    // A server that is shutting down ends its streams UNAVAILABLE itself:
    // a status from the server, not a failed connection. The generator
    // asks the target's health before another stream, and finds it down.
    let (live, stopping) = (Server::start(&[]), Server::start(&[]));
    let stopping_addr = stopping.addr.clone();
    let report =
        bulk_while_one_of_two_ends(&live, stopping, |stopping| async { stopping.stop().await })
            .await;
    assert!(
        (1..=2).contains(&aborted(&report, &stopping_addr)),
        "{report}"
    );
    assert_eq!(aborted(&report, &live.addr), 0, "{report}");
    let outages = target(&report, &stopping_addr)["outages"].clone();
    assert_eq!(outages.as_array().unwrap().len(), 1, "{report}");
    assert!(outages[0]["up_at_s"].is_null(), "{report}");
    // The rows of its streams got no reply.
    assert!(report["rows_unconfirmed"].as_u64() >= Some(1), "{report}");
    assert_kinds_explain_failures(&report);
}

/// A server being drained: it ends every call UNAVAILABLE itself, and
/// answers health Checks NOT_SERVING.
struct Draining;

fn draining() -> Status {
    Status::unavailable("draining")
}

type Nothing<T> = futures::stream::Empty<Result<T, Status>>;

#[tonic::async_trait]
impl UserService for Draining {
    async fn add_user(&self, _: Request<proto::User>) -> Result<Response<proto::Response>, Status> {
        Err(draining())
    }

    async fn get_user(
        &self,
        _: Request<proto::GetUserRequest>,
    ) -> Result<Response<proto::User>, Status> {
        Err(draining())
    }

    type ListUsersStream = Nothing<proto::User>;

    async fn list_users(
        &self,
        _: Request<proto::ListUsersRequest>,
    ) -> Result<Response<Self::ListUsersStream>, Status> {
        Err(draining())
    }

    async fn bulk_add_users(
        &self,
        _: Request<Streaming<proto::User>>,
    ) -> Result<Response<proto::BulkAddUsersResponse>, Status> {
        Err(draining())
    }

    type SyncUsersStream = Nothing<proto::SyncResponse>;

    async fn sync_users(
        &self,
        _: Request<Streaming<proto::SyncRequest>>,
    ) -> Result<Response<Self::SyncUsersStream>, Status> {
        Err(draining())
    }
}

/// Serves [`Draining`] on a free port of this process; its address.
async fn start_draining() -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", ServingStatus::NotServing)
        .await;
    let incoming = tonic::transport::server::TcpIncoming::from(listener);
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(health)
            .add_service(UserServiceServer::new(Draining))
            .serve_with_incoming(incoming),
    );
    addr
}

#[tokio::test]
async fn a_target_that_ends_its_streams_and_is_not_serving_is_left_alone() {
    // Its streams fail with a status from the server, not a failed
    // connection: its health says it cannot take load, and it is down
    // until it says SERVING, which it never does.
    let live = Server::start(&[]);
    let draining = start_draining().await;
    let run = finish_async(spawn_load(&[
        "bulk",
        "--addr",
        &format!("{},{draining}", live.addr),
        "--concurrency",
        "4",
        "--duration",
        "2s",
        "--json",
    ]))
    .await;
    assert_eq!(run.code, EXIT_FAILED, "{run:?}");
    let report = run.json();
    assert!((1..=2).contains(&aborted(&report, &draining)), "{report}");
    let outages = target(&report, &draining)["outages"].clone();
    assert_eq!(outages.as_array().unwrap().len(), 1, "{report}");
    assert!(outages[0]["up_at_s"].is_null(), "{report}");
    let cause = outages[0]["cause"].as_str().unwrap();
    assert_eq!(
        cause, "UNAVAILABLE: draining; then its health Check did not answer SERVING",
        "{report}"
    );
    assert_eq!(aborted(&report, &live.addr), 0, "{report}");
    assert!(
        target(&report, &live.addr)["ok_calls"].as_u64() > Some(0),
        "{report}"
    );
}

#[tokio::test]
async fn a_run_whose_every_target_is_down_ends_by_itself() {
    let server = Server::start(&[]);
    let child = spawn_load(&[
        "add",
        "--addr",
        &server.addr,
        "--duration",
        "120s",
        "--timeout",
        "1s",
        "--json",
    ]);
    server.watch().await.change().await;
    server.kill();
    let run = finish_async(child).await;
    assert_eq!(run.code, EXIT_FAILED, "{run:?}");
    let report = run.json();
    assert!(
        report["connection_failures"].as_u64() >= Some(1),
        "{report}"
    );
    assert!(report["duration_s"].as_f64() < Some(120.0), "{report}");
}

/// Loads two targets with `add --verify` until the second has stored a
/// few users, kills it, and returns the report of the run, interrupted
/// once the first has stored more.
async fn verify_after_one_of_two_dies(first: &Server, second: Server) -> Value {
    let child = spawn_load(&[
        "add",
        "--addr",
        &format!("{},{}", first.addr, second.addr),
        "--concurrency",
        "4",
        "--duration",
        "120s",
        "--verify",
        "--json",
    ]);
    // Two workers call the second target: past three calls handled, at
    // least one reply has reached the generator.
    wait_for_added(&second, 3.0).await;
    second.kill();
    first.watch().await.change().await;
    interrupt(&child);
    let run = finish_async(child).await;
    assert_eq!(run.code, EXIT_INTERRUPTED, "{run:?}");
    run.json()
}

#[tokio::test]
async fn verify_checks_a_dead_replicas_users_through_a_live_one() {
    if skip_without_database() {
        return;
    }
    let schema = TestSchema::new().await;
    let store = ["--store", schema.url.as_str()];
    let (live, dying) = (Server::with_metrics(&store), Server::with_metrics(&store));
    let dying_addr = dying.addr.clone();
    let report = verify_after_one_of_two_dies(&live, dying).await;
    let verify = &report["verify"];
    assert_eq!(verify["ok"], true, "{report}");
    assert_eq!(verify["unchecked"], 0);
    assert_eq!(verify["expected"], report["ok_calls"]);
    assert_eq!(verify["found"], report["ok_calls"]);
    let detail = verify["detail"].as_str().unwrap();
    assert!(
        detail.contains(&format!(
            "checked through {} ({dying_addr} is down)",
            live.addr
        )),
        "{detail}"
    );
}

#[tokio::test]
async fn verify_says_which_users_it_could_not_check() {
    // Two memory servers: the dead one's users died with it.
    let (live, dying) = (Server::start(&[]), Server::with_metrics(&[]));
    let dying_addr = dying.addr.clone();
    let report = verify_after_one_of_two_dies(&live, dying).await;
    let verify = &report["verify"];
    let dead_ok = target(&report, &dying_addr)["ok_calls"].clone();
    assert!(dead_ok.as_u64() >= Some(1), "{report}");
    assert_eq!(verify["ok"], false, "{report}");
    assert_eq!(verify["missing"], 0);
    assert_eq!(verify["unchecked"], dead_ok);
    assert_eq!(verify["found"], target(&report, &live.addr)["ok_calls"]);
    let detail = verify["detail"].as_str().unwrap();
    assert!(
        detail.contains(&format!(
            "{dying_addr}: {dead_ok} users could not be checked, e.g. [\"ld"
        )),
        "{detail}"
    );
    assert!(
        report["failures"]
            .to_string()
            .contains("--verify could not check every user"),
        "{report}"
    );
}

#[tokio::test]
async fn the_connection_probe_is_a_health_check() {
    let server = Server::with_metrics(&[]);
    let run = load(&[
        "add",
        "--addr",
        &server.addr,
        "--total",
        "10",
        "--connections",
        "2",
    ]);
    assert_eq!(run.code, 0, "{run:?}");
    let page = server.metrics().await;
    let handled = |method: &str| {
        metric(
            &page,
            "grpc_server_handled_total",
            &[("grpc_method", method)],
        )
    };
    assert_eq!(handled("GetUser"), 0.0, "{page}");
    assert_eq!(handled("Check"), 2.0, "{page}");
    assert_eq!(handled("AddUser"), 10.0, "{page}");
}
