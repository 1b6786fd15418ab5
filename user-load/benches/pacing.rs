//! How closely the open loop measures the server: `user-load add --rps R`
//! at 50, 500 and 5,000 calls/s, against the sink and against the server,
//! beside a closed loop of one worker on the same target; how late the
//! calls started; what the pacer costs; whether the server's own
//! histogram (`grpc_server_handling_seconds`) agrees with the generator's;
//! and what waking an idle thread costs on this machine, which no
//! generator avoids.
//!
//! `cargo build --release -p user-service` then
//! `cargo bench -p user-load --bench pacing` prints the tables that
//! BENCHMARKS.md records (run it alone on the machine: `bench/pacing.sh`).
//! Under `cargo test` it only measures a few wake-ups, so that it cannot
//! rot.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use base64::{Engine, engine::general_purpose::STANDARD};
use hdrhistogram::{Histogram, serialization::Deserializer};
use serde_json::Value;

/// The rates of the open loop, in calls per second.
const RATES: [u32; 3] = [50, 500, 5_000];

/// How long each open-loop run and each closed-loop run lasts.
const OPEN_RUN: &str = "10s";
const CLOSED_RUN: &str = "5s";

/// Workers of the open loop: far more than the calls in flight at 5,000/s.
const OPEN_WORKERS: &str = "8";

/// Idle gaps before each wake-up measured: none (back to back), and those
/// between calls at 5,000, 500 and 50 calls/s.
const GAPS: [Duration; 4] = [
    Duration::ZERO,
    Duration::from_micros(200),
    Duration::from_millis(2),
    Duration::from_millis(20),
];

/// The bounds of the server's histogram compared, in seconds (some of
/// `SECONDS_BUCKETS` in `telemetry/calls.rs`).
const BOUNDS_S: [f64; 4] = [0.0001, 0.00025, 0.0005, 0.001];

fn main() {
    let full = std::env::args().any(|arg| arg == "--bench");
    let samples = if full { 400 } else { 5 };
    if full {
        targets();
    }
    wake_ups(samples);
}

/// A child process, killed when dropped.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `command` with `--addr 127.0.0.1:0 --addr-file`, and waits for
/// the address it listens on.
fn start(mut command: Command, dir: &Path, name: &str) -> (Process, String) {
    let file = dir.join(format!("{name}.addr"));
    let child = command
        .args(["--addr", "127.0.0.1:0", "--addr-file"])
        .arg(&file)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|err| panic!("cannot start {name}: {err}"));
    let process = Process(child);
    let started = Instant::now();
    loop {
        if let Ok(addr) = std::fs::read_to_string(&file) {
            return (process, addr.trim().to_owned());
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{name} did not start"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The release `user-service`, beside this benchmark's directory.
fn service_binary() -> PathBuf {
    let bench = std::env::current_exe().expect("this benchmark's path");
    let binary = bench
        .parent()
        .and_then(Path::parent)
        .expect("the benchmark is in target/PROFILE/deps")
        .join("user-service");
    assert!(
        binary.exists(),
        "no {}: run `cargo build --release -p user-service` first",
        binary.display()
    );
    binary
}

/// One `user-load` run's `--json` report.
fn load(args: &[&str]) -> Value {
    let output = Command::new(env!("CARGO_BIN_EXE_user-load"))
        .args(args)
        .arg("--json")
        .stdin(Stdio::null())
        .output()
        .expect("run user-load");
    serde_json::from_slice(&output.stdout).unwrap_or_else(|err| {
        panic!(
            "no report ({err}): {}",
            String::from_utf8_lossy(&output.stderr)
        )
    })
}

/// A histogram of a report, decoded.
fn histogram(report: &Value, name: &str) -> Histogram<u64> {
    let text = report["histograms"][name].as_str().expect("a histogram");
    let bytes = STANDARD.decode(text).expect("base64");
    Deserializer::new()
        .deserialize(&mut bytes.as_slice())
        .expect("an HdrHistogram")
}

/// The server's `/metrics` page.
fn metrics(addr: SocketAddr) -> String {
    let mut tcp = TcpStream::connect(addr).expect("the metrics endpoint");
    write!(
        tcp,
        "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut page = String::new();
    tcp.read_to_string(&mut page).unwrap();
    page
}

/// AddUser's `grpc_server_handling_seconds` buckets (cumulative counts at
/// [`BOUNDS_S`]) and count, in `page`.
fn server_histogram(page: &str) -> (Vec<f64>, f64) {
    let value = |line: &str| {
        line.rsplit(' ')
            .next()
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let add_user = |line: &&str| line.contains("grpc_method=\"AddUser\"");
    let lines: Vec<&str> = page.lines().filter(add_user).collect();
    let buckets = BOUNDS_S
        .iter()
        .map(|bound| {
            lines
                .iter()
                .filter(|l| l.starts_with("grpc_server_handling_seconds_bucket"))
                .filter(|l| l.contains(&format!("le=\"{bound}\"")))
                .map(|l| value(l))
                .sum()
        })
        .collect();
    let count = lines
        .iter()
        .filter(|l| l.starts_with("grpc_server_handling_seconds_count"))
        .map(|l| value(l))
        .sum();
    (buckets, count)
}

/// The open and closed loops against the sink and the server.
fn targets() {
    let dir = tempfile::tempdir().unwrap();
    // A port free a moment ago: the server logs the one it binds only to
    // its log, which this benchmark does not read.
    let metrics_port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port");
    let mut server = Command::new(service_binary());
    server.args([
        "--store",
        "memory",
        "--metrics-addr",
        &metrics_port.to_string(),
    ]);
    let (_server, server_addr) = start(server, dir.path(), "server");
    let mut sink = Command::new(env!("CARGO_BIN_EXE_user-load"));
    sink.arg("sink");
    let (_sink, sink_addr) = start(sink, dir.path(), "sink");

    println!(
        "| target | rate | calls | open p50 | closed p50 | difference | lateness p50 / p99 / max | \
         pacer CPU | generator CPU |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    let mut agreement = Vec::new();
    for (name, addr) in [("sink", &sink_addr), ("server", &server_addr)] {
        let closed = load(&["add", "--addr", addr, "-c", "1", "--duration", CLOSED_RUN]);
        let closed_p50 = closed["latency"]["p50_ms"].as_f64().unwrap();
        for rate in RATES {
            let before = (name == "server").then(|| server_histogram(&metrics(metrics_port)));
            let open = load(&[
                "add",
                "--addr",
                addr,
                "-c",
                OPEN_WORKERS,
                "--rps",
                &rate.to_string(),
                "--duration",
                OPEN_RUN,
            ]);
            let p50 = open["latency"]["p50_ms"].as_f64().unwrap();
            let late = &open["lateness"];
            let elapsed = open["duration_s"].as_f64().unwrap();
            println!(
                "| {name} | {rate}/s | {} | {p50:.3} ms | {closed_p50:.3} ms | {:+.3} ms | \
                 {:.3} / {:.3} / {:.3} ms | {:.1}% of a core | {:.1}% |",
                open["calls"],
                p50 - closed_p50,
                late["p50_ms"].as_f64().unwrap(),
                late["p99_ms"].as_f64().unwrap(),
                late["max_ms"].as_f64().unwrap(),
                100.0 * open["pacer_cpu_s"].as_f64().unwrap() / elapsed,
                100.0 * open["generator_cores"].as_f64().unwrap(),
            );
            if let Some((before, before_count)) = before {
                let (after, after_count) = server_histogram(&metrics(metrics_port));
                let generator = histogram(&open, "latency");
                let shares: Vec<String> = BOUNDS_S
                    .iter()
                    .zip(after.iter().zip(&before))
                    .map(|(bound, (after, before))| {
                        let server = (after - before) / (after_count - before_count).max(1.0);
                        let within = generator.count_between(0, (bound * 1e6) as u64);
                        format!(
                            "{:.0}% / {:.0}%",
                            100.0 * server,
                            100.0 * within as f64 / generator.len().max(1) as f64
                        )
                    })
                    .collect();
                agreement.push(format!(
                    "| {rate}/s | {} | {} | {} |",
                    after_count - before_count,
                    open["calls"],
                    shares.join(" | ")
                ));
            }
        }
    }
    println!();
    println!(
        "Server's own histogram against the generator's, AddUser: calls counted, and the share \
         of calls at or under each bound (server / generator; the server's time is part of the \
         generator's, so its share is the larger)."
    );
    println!();
    println!(
        "| rate | server calls | generator calls | {} |",
        BOUNDS_S
            .iter()
            .map(|b| format!("≤ {} ms", b * 1e3))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    println!("| ---: | ---: | ---: |{}", " ---: |".repeat(BOUNDS_S.len()));
    for row in agreement {
        println!("{row}");
    }
    println!();
}

/// p50 and p99 of `samples`, in microseconds.
fn percentiles(mut samples: Vec<Duration>) -> (f64, f64) {
    samples.sort();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize].as_secs_f64() * 1e6;
    (at(0.5), at(0.99))
}

/// What waking an idle thread costs: a thread blocked on a channel woken
/// by another, and a round trip over loopback TCP to a thread blocked in
/// `read` (two wake-ups, as a call and its reply take), after each gap.
fn wake_ups(samples: usize) {
    println!("| idle gap | thread wake-up p50 / p99 | loopback TCP round trip p50 / p99 |");
    println!("| ---: | ---: | ---: |");
    for gap in GAPS {
        let wake = percentiles(thread_wake_ups(gap, samples));
        let round_trip = percentiles(round_trips(gap, samples));
        println!(
            "| {gap:?} | {:.1} / {:.1} µs | {:.1} / {:.1} µs |",
            wake.0, wake.1, round_trip.0, round_trip.1
        );
    }
}

/// From sending on a channel to the blocked receiver running, `samples`
/// times, `gap` apart.
fn thread_wake_ups(gap: Duration, samples: usize) -> Vec<Duration> {
    let (tx, rx) = mpsc::channel::<Instant>();
    let (back, results) = mpsc::channel::<Duration>();
    let receiver = std::thread::spawn(move || {
        while let Ok(sent) = rx.recv() {
            let _ = back.send(sent.elapsed());
        }
    });
    let mut took = Vec::with_capacity(samples);
    for _ in 0..samples {
        std::thread::sleep(gap);
        tx.send(Instant::now()).unwrap();
        took.push(results.recv().unwrap());
    }
    drop(tx);
    receiver.join().unwrap();
    took
}

/// One byte to an echoing thread and back over loopback TCP, `samples`
/// times, `gap` apart.
fn round_trips(gap: Duration, samples: usize) -> Vec<Duration> {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let echo = std::thread::spawn(move || {
        let (mut tcp, _) = listener.accept().unwrap();
        tcp.set_nodelay(true).unwrap();
        let mut byte = [0u8];
        while tcp.read_exact(&mut byte).is_ok() {
            if tcp.write_all(&byte).is_err() {
                break;
            }
        }
    });
    let mut tcp = TcpStream::connect(addr).unwrap();
    tcp.set_nodelay(true).unwrap();
    let mut took = Vec::with_capacity(samples);
    let mut byte = [0u8];
    for _ in 0..samples {
        std::thread::sleep(gap);
        let sent = Instant::now();
        tcp.write_all(&byte).unwrap();
        tcp.read_exact(&mut byte).unwrap();
        took.push(sent.elapsed());
    }
    drop(tcp);
    echo.join().unwrap();
    took
}
