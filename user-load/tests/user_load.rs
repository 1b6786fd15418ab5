//! The `user-load` binary against real `user-service` binaries: a run that
//! could not do its work exits non-zero and says why, thresholds decide the
//! exit status, Ctrl-C is not a success, and the `--html` report renders in
//! a real browser (headless Chromium) without a console error.
//!
//! Each server listens on 127.0.0.1:0 and writes the address it got to a
//! file (`--addr-file`); every wait is bounded.

mod common;

use std::{net::TcpListener, path::Path};

use common::*;
use tempfile::TempDir;
use test_support::Pki;

#[test]
fn a_refused_connection_fails_naming_the_address() {
    // A port nothing listens on any more.
    let addr = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let run = load(&["add", "--addr", &addr, "--total", "10"]);
    assert_failed(
        &run,
        EXIT_FAILED,
        &[
            &format!("0 calls reached the server at {addr}"),
            "cannot connect",
            "refused",
        ],
    );
    assert!(run.stdout.is_empty(), "no report for a run that never ran");
}

#[test]
fn plaintext_to_a_tls_server_fails_saying_it_speaks_tls() {
    let pki = Pki::new().files();
    let server = Server::start(&[
        "--tls-cert",
        &pki.path("server.pem"),
        "--tls-key",
        &pki.path("server.key"),
    ]);
    let run = load(&["add", "--addr", &server.addr, "--total", "10"]);
    assert_failed(
        &run,
        EXIT_FAILED,
        &["0 calls reached the server", "TLS", "--cacert"],
    );

    // The same server with its CA: the run works.
    let run = load(&[
        "add",
        "--addr",
        &server.addr,
        "--total",
        "10",
        "--cacert",
        &pki.path("ca.pem"),
    ]);
    assert_eq!(run.code, 0, "{run:?}");
}

#[test]
fn tls_to_a_plaintext_server_fails_in_the_handshake() {
    let server = Server::start(&[]);
    let run = load(&["add", "--addr", &server.addr, "--total", "10", "--skipTLS"]);
    assert_failed(
        &run,
        EXIT_FAILED,
        &["0 calls reached the server", "TLS handshake failed"],
    );
}

#[test]
fn mutual_tls_without_a_client_certificate_fails_asking_for_one() {
    let pki = Pki::new().files();
    let server = Server::start(&[
        "--tls-cert",
        &pki.path("server.pem"),
        "--tls-key",
        &pki.path("server.key"),
        "--tls-client-ca",
        &pki.path("ca.pem"),
    ]);
    let ca = pki.path("ca.pem");
    let run = load(&["add", "--addr", &server.addr, "-n", "10", "--cacert", &ca]);
    assert_failed(
        &run,
        EXIT_FAILED,
        &["0 calls reached the server", "--cert and --key"],
    );

    let (cert, key) = (pki.path("client.pem"), pki.path("client.key"));
    let run = load(&[
        "add",
        "--addr",
        &server.addr,
        "-n",
        "10",
        "--cacert",
        &ca,
        "--cert",
        &cert,
        "--key",
        &key,
    ]);
    assert_eq!(run.code, 0, "{run:?}");
}

#[test]
fn a_wrong_token_fails_naming_the_token_file() {
    let pki = Pki::new().files();
    let server = Server::start(&["--auth-token-file", &pki.path("token")]);
    let wrong = pki.path("wrong-token");
    let run = load(&[
        "add",
        "--addr",
        &server.addr,
        "-n",
        "10",
        "--auth-token-file",
        &wrong,
    ]);
    assert_failed(&run, EXIT_FAILED, &["UNAUTHENTICATED", &wrong]);

    let run = load(&["add", "--addr", &server.addr, "-n", "10"]);
    assert_failed(&run, EXIT_FAILED, &["UNAUTHENTICATED", "--auth-token-file"]);

    let run = load(&[
        "add",
        "--addr",
        &server.addr,
        "-n",
        "10",
        "-H",
        "authorization: Bearer right-token",
    ]);
    assert_eq!(run.code, 0, "{run:?}");
}

#[test]
fn an_aborted_sync_stream_fails_the_run_and_is_counted() {
    // A feed this short cannot hold what 64 upserts in flight produce: the
    // server ends the streams that fall behind with ABORTED.
    let server = Server::start(&["--feed-capacity", "8"]);
    let run = load(&["sync", "--addr", &server.addr, "-n", "3000", "--json"]);
    assert_eq!(run.code, EXIT_FAILED, "{run:?}");
    let report = run.json();
    assert!(
        report["streams_aborted"]["ABORTED"].as_u64() >= Some(1),
        "{report}"
    );
    assert!(
        report["calls"].as_u64() < Some(3000),
        "not every upsert was acknowledged: {report}"
    );
    let failures = report["failures"].to_string();
    assert!(failures.contains("aborted (ABORTED"), "{failures}");

    // The text report counts them in its status line.
    let run = load(&["sync", "--addr", &server.addr, "-n", "3000"]);
    assert_eq!(run.code, EXIT_FAILED, "{run:?}");
    let status = run
        .stdout
        .lines()
        .find(|l| l.trim_start().starts_with("status"))
        .unwrap_or_default();
    assert!(status.contains("streams aborted: ABORTED"), "{run:?}");
    assert!(run.stderr.contains("aborted"), "{run:?}");
}

#[test]
fn every_call_failing_fails_the_run_without_a_throughput() {
    let server = Server::start(&[]);
    let dir = TempDir::new().unwrap();
    let data = dir.path().join("invalid.jsonl");
    std::fs::write(&data, "{\"first_name\": \" \"}\n".repeat(20)).unwrap();
    let data = data.display().to_string();
    let run = load(&["add", "--addr", &server.addr, "--data", &data]);
    assert_eq!(run.code, EXIT_FAILED, "{run:?}");
    assert!(
        run.stdout.contains("throughput   none: 0 calls succeeded"),
        "{run:?}"
    );
    assert!(run.stdout.contains("not throughput"), "{run:?}");
    assert!(run.stdout.contains("20× INVALID_ARGUMENT"), "{run:?}");
    assert!(
        run.stderr.contains("every one of the 20 calls failed"),
        "{run:?}"
    );
}

#[test]
fn thresholds_met_exit_0_and_missed_exit_99() {
    let server = Server::start(&[]);
    let addr = &server.addr;
    let met = load(&[
        "add",
        "--addr",
        addr,
        "-n",
        "200",
        "--fail-if",
        "errors>0",
        "--fail-if",
        "p99>60s",
    ]);
    assert_eq!(met.code, 0, "{met:?}");
    assert!(
        met.stdout.contains("fail-if      errors>0: 0.000, ok"),
        "{met:?}"
    );

    // No call takes less than a microsecond, and none is that fast.
    for condition in ["p99>1us", "rate<1000000000"] {
        let missed = load(&["add", "--addr", addr, "-n", "200", "--fail-if", condition]);
        assert_eq!(missed.code, EXIT_THRESHOLD, "{condition}: {missed:?}");
        assert!(
            missed.stderr.contains(&format!("--fail-if {condition}")),
            "{missed:?}"
        );
    }
}

#[test]
fn flags_of_other_modes_and_nonsense_values_are_usage_errors() {
    for (args, says) in [
        (&["bulk", "--rps", "10"][..], "unexpected argument '--rps'"),
        (
            &["sync", "--concurrency", "4"],
            "unexpected argument '--concurrency'",
        ),
        (&["add", "--concurrency", "0"], "--concurrency"),
        (&["bulk", "--total", "0"], "--total"),
        (&["add", "--start-at", "1"], "is in the past"),
        (&["add", "--start-at", "noon"], "neither RFC 3339"),
    ] {
        let run = load(args);
        assert_failed(&run, EXIT_USAGE, &[says]);
    }
    let help = load(&["--help"]);
    assert_eq!(help.code, 0);
    assert!(help.stdout.contains("load generator"), "{help:?}");
    let version = load(&["-V"]);
    assert!(version.stdout.starts_with("user-load "), "{version:?}");
}

#[tokio::test]
async fn ctrl_c_ends_the_run_with_130_and_a_report() {
    let server = Server::start(&[]);
    // A watcher on the feed: its first Change means the run has started.
    let mut feed = server.watch().await;
    let child = spawn_load(&["add", "--addr", &server.addr, "--duration", "60s", "--json"]);
    feed.change().await;
    interrupt(&child);
    let run = finish_async(child).await;
    assert_eq!(run.code, EXIT_INTERRUPTED, "{run:?}");
    let report = run.json();
    assert_eq!(report["interrupted"], true, "{report}");
    assert!(report["ok_calls"].as_u64() > Some(0), "{report}");
    assert!(run.stderr.contains("interrupted by Ctrl-C"), "{run:?}");
}

/// Width and height of a PNG, from its header.
fn png_size(path: &Path) -> (u32, u32) {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "not a PNG");
    let be = |at: usize| u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap());
    (be(16), be(20))
}

#[test]
fn the_html_report_renders_with_its_totals_and_no_console_error() {
    let dir = TempDir::new().unwrap();
    // The way console errors are caught, shown to work on a page that
    // makes one and tries to fetch something.
    let control = dir.path().join("control.html");
    std::fs::write(
        &control,
        "<!DOCTYPE html><meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'\">\
         <img src=\"fetched.png\"><script>console.error('control')</script>",
    )
    .unwrap();
    let (_, console) = render(&control, dir.path(), &["--dump-dom"]);
    assert!(
        !console.is_empty(),
        "the console of a failing page was not seen"
    );

    let server = Server::start(&[]);
    let page = dir.path().join("report.html");
    let page_arg = page.display().to_string();
    let run = load(&[
        "sync",
        "--addr",
        &server.addr,
        "--duration",
        "2s",
        "--rps",
        "2000",
        "--warmup",
        "500ms",
        "--watchers",
        "2",
        "--fail-if",
        "errors>1%",
        "--html",
        &page_arg,
        "--json",
    ]);
    assert_eq!(run.code, 0, "{run:?}");
    let report = run.json();
    let html = std::fs::read_to_string(&page).unwrap();
    for fetch in ["src=", "href=", "url(", "<script", "<link"] {
        assert!(!html.contains(fetch), "the page would fetch: {fetch}");
    }

    let (dom, console) = render(&page, dir.path(), &["--dump-dom"]);
    assert!(console.is_empty(), "console: {console:?}");
    let totals = dom
        .split("<table id=\"totals\">")
        .nth(1)
        .and_then(|t| t.split("</table>").next())
        .expect("a totals table");
    for (name, field) in [
        ("Acks", "calls"),
        ("OK Acks", "ok_calls"),
        ("users", "users"),
    ] {
        let cell = format!("<th>{name}</th><td>{}</td>", report[field]);
        assert!(totals.contains(&cell), "{cell} not in {totals}");
    }
    for chart in [
        "latency distribution",
        "throughput per second",
        "delivery distribution",
    ] {
        assert!(dom.contains(chart), "no {chart} chart");
    }
    // Open loop: how late the upserts started, apart from the latency.
    let lateness = section(&dom, "<h2>Lateness</h2>", "</table>");
    let count = format!("<td class=\"n\">{}</td>", report["lateness"]["count"]);
    assert!(lateness.contains(&count), "{count} not in {lateness}");

    let screenshot = dir.path().join("report.png");
    let (_, console) = render(
        &page,
        dir.path(),
        &[
            "--window-size=1100,2400",
            &format!("--screenshot={}", screenshot.display()),
        ],
    );
    assert!(console.is_empty(), "console: {console:?}");
    assert_eq!(png_size(&screenshot), (1100, 2400));
    // Kept where asked, to look at (docs/ has one made this way).
    if let Some(keep) = std::env::var_os("USER_LOAD_SCREENSHOT") {
        std::fs::copy(&screenshot, keep).unwrap();
    }
}

#[test]
fn copy_speaks_tls_and_sends_the_token_to_both_servers() {
    let pki = Pki::new().files();
    let (ca, token) = (pki.path("ca.pem"), pki.path("token"));
    let secured = [
        "--tls-cert",
        &pki.path("server.pem"),
        "--tls-key",
        &pki.path("server.key"),
        "--auth-token-file",
        &token,
    ];
    let (from, to) = (Server::start(&secured), Server::start(&secured));
    let run = load(&[
        "add",
        "--addr",
        &from.addr,
        "-n",
        "50",
        "--cacert",
        &ca,
        "--auth-token-file",
        &token,
    ]);
    assert_eq!(run.code, 0, "{run:?}");
    let copy = |extra: &[&str]| {
        let mut args = vec!["copy", "--from", &from.addr, "--to", &to.addr];
        args.extend(extra);
        load(&args)
    };

    // Plaintext to a TLS server: stopped before anything is read.
    let run = copy(&[]);
    assert_failed(&run, EXIT_FAILED, &["copy stopped", "TLS", "--cacert"]);
    assert!(run.stdout.contains("read 0, added 0, failed 0"), "{run:?}");
    // Flags that contradict each other are refused as a usage error.
    let run = copy(&["--cacert", &ca, "--skipTLS"]);
    assert_failed(&run, EXIT_USAGE, &["--skipTLS"]);

    let run = copy(&["--cacert", &ca, "--auth-token-file", &token]);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(
        run.stdout.contains("read 50, added 50, failed 0"),
        "{run:?}"
    );
    // Every id is there now: copied again, each is refused as existing.
    let run = copy(&["--cacert", &ca, "--auth-token-file", &token]);
    assert_failed(&run, EXIT_FAILED, &["50 users not copied"]);
    assert!(
        run.stdout.contains("read 50, added 0, failed 50"),
        "{run:?}"
    );
    assert!(run.stdout.contains("AlreadyExists"), "{run:?}");
}
