//! Rows are bulk's unit of work, and upserts sync's: failed ones fail the
//! run unless a `--fail-if errors` condition says how many may fail, the
//! report says how many failed and why, and the HTML report shows them.
//! Short bulk runs are reported per batch of rows, in steps shorter than
//! a second.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use tempfile::TempDir;

/// 100 users without ids (the server gives them theirs, so the file can be
/// sent again), every tenth with an empty first name: 10 invalid.
fn users(dir: &Path) -> PathBuf {
    let path = dir.join("users.jsonl");
    let lines: String = (0..100)
        .map(|i| {
            let first = if i % 10 == 3 {
                String::new()
            } else {
                format!("Name{i}")
            };
            format!(
                "{{\"first_name\": \"{first}\", \"last_name\": \"Doe\", \"address\": \"{i} Main \
                 Street\", \"verified\": true}}\n"
            )
        })
        .collect();
    std::fs::write(&path, lines).unwrap();
    path
}

#[test]
fn failed_rows_fail_a_bulk_run_and_the_report_says_why() {
    let server = Server::start(&[]);
    let dir = TempDir::new().unwrap();
    let data = users(dir.path()).display().to_string();
    let run = load(&["bulk", "--addr", &server.addr, "--data", &data, "--json"]);
    assert_failed(
        &run,
        EXIT_FAILED,
        &["10 of 100 rows failed (10× INVALID_ARGUMENT: first_name"],
    );
    let report = run.json();
    assert_eq!(report["calls"], 100, "{report}");
    assert_eq!(report["ok_calls"], 90);
    assert_eq!(report["rows_failed"], 10);
    assert_eq!(
        report["codes"],
        serde_json::json!({"OK": 90, "INVALID_ARGUMENT": 10})
    );
    assert_eq!(report["failure_kinds"][0]["count"], 10);
    assert_eq!(report["measures"]["calls"], "rows");

    // The text report's last line says it too.
    let run = load(&["bulk", "--addr", &server.addr, "--data", &data]);
    assert_eq!(run.code, EXIT_FAILED, "{run:?}");
    let last = run.stdout.lines().last().unwrap();
    assert!(
        last.starts_with("  result       FAILED: 10 of 100 rows failed (10× INVALID_ARGUMENT: "),
        "{last}"
    );
}

#[test]
fn fail_if_errors_says_how_many_rows_may_fail() {
    let server = Server::start(&[]);
    let dir = TempDir::new().unwrap();
    let data = users(dir.path()).display().to_string();
    let bulk = |condition: &str| {
        load(&[
            "bulk",
            "--addr",
            &server.addr,
            "--data",
            &data,
            "--fail-if",
            condition,
        ])
    };
    // 10% failed: within a 10% allowance, past a 5% one and a count of 9.
    let run = bulk("errors>10%");
    assert_eq!(run.code, 0, "{run:?}");
    assert!(
        run.stdout.contains("fail-if      errors>10%: 10.000, ok"),
        "{run:?}"
    );
    for condition in ["errors>5%", "errors>9", "errors>0"] {
        let run = bulk(condition);
        assert_failed(&run, EXIT_THRESHOLD, &[&format!("--fail-if {condition}")]);
    }
}

#[test]
fn failed_upserts_fail_a_sync_run() {
    let server = Server::start(&[]);
    let dir = TempDir::new().unwrap();
    let data = users(dir.path()).display().to_string();
    let run = load(&[
        "sync",
        "--addr",
        &server.addr,
        "--data",
        &data,
        "--watchers",
        "0",
        "--json",
    ]);
    assert_failed(
        &run,
        EXIT_FAILED,
        &["10 of 100 Acks failed (10× INVALID_ARGUMENT: "],
    );
    let report = run.json();
    assert_eq!(
        (report["calls"].as_u64(), report["ok_calls"].as_u64()),
        (Some(100), Some(90))
    );
}

#[test]
fn the_html_report_shows_the_failed_rows() {
    let server = Server::start(&[]);
    let dir = TempDir::new().unwrap();
    let data = users(dir.path()).display().to_string();
    let page = dir.path().join("bulk.html");
    let run = load(&[
        "bulk",
        "--addr",
        &server.addr,
        "--data",
        &data,
        "--html",
        &page.display().to_string(),
    ]);
    assert_eq!(run.code, EXIT_FAILED, "{run:?}");
    let (dom, console) = render(&page, dir.path(), &["--dump-dom"]);
    assert!(console.is_empty(), "console: {console:?}");
    let totals = section(&dom, "<table id=\"totals\">", "</table>");
    for cell in [
        "<th>rows</th><td>100</td>",
        "<th>OK rows</th><td>90</td>",
        "<th>failed rows</th><td>10</td>",
        "<th>rows failed</th><td>10</td>",
    ] {
        assert!(totals.contains(cell), "{cell} not in {totals}");
    }
    let codes = section(&dom, "<table id=\"codes\">", "</table>");
    assert!(
        codes.contains("<td>INVALID_ARGUMENT</td><td class=\"n\">10</td>"),
        "{codes}"
    );
    let errors = section(&dom, "<table id=\"errors\">", "</table>");
    assert!(
        errors.contains("<td class=\"n\">10</td><td>INVALID_ARGUMENT: first_name"),
        "{errors}"
    );
    let result = section(&dom, "<p id=\"result\"", "</p>");
    assert!(result.contains("10 of 100 rows failed"), "{result}");
}

#[test]
fn a_short_bulk_run_is_measured_per_batch_in_steps_under_a_second() {
    let server = Server::start(&[]);
    // One stream of 20,000 rows: 19 whole batches of 1000 between its 20
    // batch starts, the last batch being cut short by the end.
    let run = load(&[
        "bulk",
        "--addr",
        &server.addr,
        "--total",
        "20000",
        "--concurrency",
        "1",
        "--json",
    ]);
    assert_eq!(run.code, 0, "{run:?}");
    let report = run.json();
    assert_eq!(report["latency"]["count"], 19, "{report}");
    assert_eq!(report["streams"]["count"], 1);
    assert_eq!(report["streams"]["latency"]["count"], 1);
    let step = report["series_step_s"].as_f64().unwrap();
    assert!(step < 1.0, "{step}");
    let series = report["series"].as_array().unwrap();
    let sent: u64 = series.iter().map(|p| p["users"].as_u64().unwrap()).sum();
    assert_eq!(sent, 20000);
    // Each step keeps its batches' times: the step of the slowest batch
    // has it as its p99 (to the 1% of a step's histogram).
    let max = report["latency"]["max_ms"].as_f64().unwrap();
    let p99s: Vec<f64> = series.iter().filter_map(|p| p["p99_ms"].as_f64()).collect();
    assert!(p99s.iter().all(|&p99| p99 <= max * 1.01), "{p99s:?} {max}");
    assert!(p99s.iter().any(|&p99| p99 >= max * 0.99), "{p99s:?} {max}");
    // Every step starts on a multiple of its length on the wall clock.
    let step_ms = (step * 1000.0).round() as u64;
    assert!(
        series
            .iter()
            .all(|p| p["start_unix_ms"].as_u64().unwrap() % step_ms == 0)
    );
}
