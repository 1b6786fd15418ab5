//! Past one machine: generators started together with `--start-at`, whose
//! `--json` reports `user-load merge` adds up exactly: the counts are the
//! server's own, and the percentiles those of the histograms added up.

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::{Engine, engine::general_purpose::STANDARD};
use common::*;
use hdrhistogram::{Histogram, serialization::Deserializer};
use serde_json::Value;
use tempfile::TempDir;

/// A histogram of a report, decoded from HdrHistogram's serialized form.
fn histogram(report: &Value, name: &str) -> Histogram<u64> {
    let text = report["histograms"][name]
        .as_str()
        .unwrap_or_else(|| panic!("no {name} histogram in {report}"));
    let bytes = STANDARD.decode(text).unwrap();
    Deserializer::new()
        .deserialize(&mut bytes.as_slice())
        .unwrap()
}

#[tokio::test]
async fn two_generators_started_together_merge_into_the_servers_own_counts() {
    let server = Server::with_metrics(&[]);
    let dir = TempDir::new().unwrap();
    // Far enough ahead for both to start and connect first, on a busy
    // machine too.
    let start = SystemTime::now() + Duration::from_secs(5);
    let start_us = start.duration_since(UNIX_EPOCH).unwrap().as_micros() as u64;
    let start_at = format!("{:.6}", start_us as f64 / 1e6);
    let common = [
        "add",
        "--addr",
        &server.addr,
        "--start-at",
        &start_at,
        "--json",
    ];
    // One closed loop, one open loop.
    let closed = spawn_load(&[&common[..], &["--total", "300", "--concurrency", "4"]].concat());
    let open = spawn_load(
        &[
            &common[..],
            &["--rps", "300", "--duration", "1s", "--concurrency", "4"],
        ]
        .concat(),
    );
    let (closed, open) = (finish_async(closed).await, finish_async(open).await);
    assert_eq!((closed.code, open.code), (0, 0), "{closed:?} {open:?}");
    let (a, b) = (closed.json(), open.json());
    for run in [&a, &b] {
        assert!(run["start_unix_us"].as_u64() >= Some(start_us), "{run}");
    }
    let files = [dir.path().join("a.json"), dir.path().join("b.json")];
    std::fs::write(&files[0], &closed.stdout).unwrap();
    std::fs::write(&files[1], &open.stdout).unwrap();
    let files: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();

    let run = load(&["merge", &files[0], &files[1], "--json"]);
    assert_eq!(run.code, 0, "{run:?}");
    let merged = run.json();

    // The counts are the server's own.
    let page = server.metrics().await;
    let added = metric(
        &page,
        "grpc_server_handled_total",
        &[("grpc_method", "AddUser"), ("grpc_code", "OK")],
    );
    assert_eq!(merged["calls"].as_f64(), Some(added), "{page}");
    assert_eq!(merged["ok_calls"].as_f64(), Some(added));
    assert_eq!(
        merged["calls"].as_u64(),
        Some(a["calls"].as_u64().unwrap() + b["calls"].as_u64().unwrap())
    );
    assert_eq!(merged["generators"], 2);
    assert_eq!(merged["concurrency"], 8);
    let first = a["start_unix_us"].as_u64().min(b["start_unix_us"].as_u64());
    assert_eq!(merged["start_unix_us"].as_u64(), first);
    // Neither warmed up: the merged run measures from its first start.
    assert_eq!(merged["warmup_s"].as_f64(), Some(0.0));

    // The percentiles are those of the two histograms added up.
    let mut sum = histogram(&a, "latency");
    sum.add(histogram(&b, "latency")).unwrap();
    assert_eq!(histogram(&merged, "latency"), sum);
    let latency = &merged["latency"];
    assert_eq!(latency["count"].as_u64(), Some(sum.len()));
    for (field, quantile) in [
        ("p50_ms", 0.5),
        ("p90_ms", 0.9),
        ("p99_ms", 0.99),
        ("p999_ms", 0.999),
    ] {
        let expected = sum.value_at_quantile(quantile) as f64 / 1000.0;
        assert_eq!(latency[field].as_f64(), Some(expected), "{field}");
    }
    assert_eq!(latency["max_ms"].as_f64(), Some(sum.max() as f64 / 1000.0));
    // Lateness comes from the open loop alone.
    assert_eq!(histogram(&merged, "lateness"), histogram(&b, "lateness"));

    // The series add up to the totals, slot by slot on the wall clock.
    let step_ms = (merged["series_step_s"].as_f64().unwrap() * 1000.0).round() as u64;
    let series = merged["series"].as_array().unwrap();
    let ok: u64 = series.iter().map(|p| p["ok"].as_u64().unwrap()).sum();
    assert_eq!(merged["ok_calls"].as_u64(), Some(ok));
    assert!(
        series
            .iter()
            .all(|p| p["start_unix_ms"].as_u64().unwrap() % step_ms == 0)
    );

    // As text, and as a page.
    let text = load(&["merge", &files[0], &files[1]]);
    assert_eq!(text.code, 0, "{text:?}");
    assert!(text.stdout.contains("(2 generators merged)"), "{text:?}");
    let page = dir.path().join("merged.html");
    let html = load(&[
        "merge",
        &files[0],
        &files[1],
        "--html",
        &page.display().to_string(),
    ]);
    assert_eq!(html.code, 0, "{html:?}");
    let (dom, console) = render(&page, dir.path(), &["--dump-dom"]);
    assert!(console.is_empty(), "console: {console:?}");
    let parameters = section(&dom, "<table id=\"parameters\">", "</table>");
    assert!(
        parameters.contains("<th>generators (reports merged)</th><td>2</td>"),
        "{parameters}"
    );
}

#[test]
fn merge_refuses_what_does_not_add_up() {
    let server = Server::start(&[]);
    let dir = TempDir::new().unwrap();
    let add = load(&["add", "--addr", &server.addr, "--total", "10", "--json"]);
    let bulk = load(&["bulk", "--addr", &server.addr, "--total", "10", "--json"]);
    let (add_file, bulk_file, other) = (
        dir.path().join("add.json"),
        dir.path().join("bulk.json"),
        dir.path().join("other.json"),
    );
    std::fs::write(&add_file, add.stdout).unwrap();
    std::fs::write(&bulk_file, bulk.stdout).unwrap();
    std::fs::write(&other, "{\"mode\": \"add\"}").unwrap();
    let path = |p: &std::path::Path| p.display().to_string();
    let run = load(&["merge", &path(&add_file), &path(&bulk_file)]);
    assert_failed(&run, EXIT_USAGE, &["only runs of one mode merge"]);
    let run = load(&["merge", &path(&add_file), &path(&other)]);
    assert_failed(
        &run,
        EXIT_USAGE,
        &["other.json: not a user-load --json report"],
    );
    let run = load(&["merge", &path(&dir.path().join("missing.json"))]);
    assert_failed(&run, EXIT_USAGE, &["missing.json"]);
}

#[test]
fn lateness_is_reported_apart_and_warned_about_when_it_distorts() {
    let server = Server::start(&[]);
    let run = load(&[
        "add",
        "--addr",
        &server.addr,
        "--rps",
        "200",
        "--total",
        "100",
        "--json",
    ]);
    assert_eq!(run.code, 0, "{run:?}");
    let report = run.json();
    assert_eq!(report["lateness"]["count"], 100, "{report}");
    assert!(report["pacer_cpu_s"].as_f64().is_some(), "{report}");
    // A closed loop starts every call when it is due: no lateness.
    let run = load(&["add", "--addr", &server.addr, "--total", "100", "--json"]);
    assert_eq!(run.json()["lateness"], Value::Null);

    // One worker cannot start 100,000 calls a second: they start later
    // and later, and the report says the latency is the generator's.
    let run = load(&[
        "add",
        "--addr",
        &server.addr,
        "--rps",
        "100000",
        "--total",
        "2000",
        "--concurrency",
        "1",
    ]);
    assert_eq!(run.code, 0, "{run:?}");
    assert!(
        run.stdout
            .contains("WARNING      calls started late: lateness p50"),
        "{run:?}"
    );
}
