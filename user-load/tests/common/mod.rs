//! What the `user-load` tests share: real `user-service` binaries (and
//! the sink) on `127.0.0.1:0`, the `user-load` binary run to its end with
//! every wait bounded, and headless Chromium for the HTML report.

// Each test file uses its own part of this.
#![allow(dead_code)]

use std::{
    io::Read,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use tempfile::TempDir;
use test_support::{ServerProcess, http_get};
use tokio_stream::wrappers::ReceiverStream;
use user_service::proto::{
    SyncResponse, sync_response::Event, user_service_client::UserServiceClient,
};

/// Bounds every wait: a broken binary fails a test instead of hanging it.
pub const PATIENCE: Duration = Duration::from_secs(60);

/// Exit statuses `user-load --help` documents.
pub const EXIT_FAILED: i32 = 1;
pub const EXIT_USAGE: i32 = 2;
pub const EXIT_THRESHOLD: i32 = 99;
pub const EXIT_INTERRUPTED: i32 = 130;

/// A running user-service (a memory store unless `args` name another),
/// killed when dropped; its address as user-load's `--addr` takes it.
pub struct Server {
    process: ServerProcess,
    pub addr: String,
    /// Where its metrics are served, when started with them.
    pub metrics: Option<SocketAddr>,
}

impl Server {
    pub fn start(args: &[&str]) -> Server {
        let mut command = Command::new(service_binary());
        if !args.contains(&"--store") {
            command.args(["--store", "memory"]);
        }
        command.args(args);
        let process = ServerProcess::spawn(command);
        let addr = process.addr.to_string();
        Server {
            process,
            addr,
            metrics: None,
        }
    }

    /// Started again on `addr`, as a restarted replica is.
    pub fn start_on(addr: &str, args: &[&str]) -> Server {
        let mut all = vec!["--addr", addr];
        all.extend(args);
        Server::start(&all)
    }

    /// Serving its metrics too, on a port of its own.
    pub fn with_metrics(args: &[&str]) -> Server {
        let mut all = vec!["--metrics-addr", "127.0.0.1:0"];
        all.extend(args);
        let mut server = Server::start(&all);
        // The metrics listener is bound, and logged, before the gRPC one;
        // the log is read on a thread of its own, which may lag behind.
        let started = std::time::Instant::now();
        loop {
            let log = server.process.log();
            if let Some(at) = log
                .split("metrics at http://")
                .nth(1)
                .and_then(|rest| rest.split('/').next())
            {
                server.metrics = Some(at.parse().unwrap());
                return server;
            }
            assert!(
                started.elapsed() < PATIENCE,
                "no metrics address in the log:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Its `/metrics` page.
    pub async fn metrics(&self) -> String {
        let (status, body) =
            http_get(self.metrics.expect("started with metrics"), "/metrics").await;
        assert_eq!(status, 200);
        body
    }

    /// SIGKILL.
    pub fn kill(self) {
        self.process.kill();
    }

    /// SIGTERM, as a replica is stopped in a rolling restart, and waits
    /// for it to exit.
    pub async fn stop(self) {
        let (status, log) = self.process.stop().await;
        assert!(status.success(), "{status}: {log}");
    }

    /// A SyncUsers stream that only watches the feed.
    pub async fn watch(&self) -> Watcher {
        let mut client = UserServiceClient::connect(format!("http://{}", self.addr))
            .await
            .unwrap();
        let (requests, rx) = tokio::sync::mpsc::channel(1);
        let changes = client
            .sync_users(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        Watcher {
            _requests: requests,
            changes,
        }
    }
}

/// A watcher of a server's feed.
pub struct Watcher {
    _requests: tokio::sync::mpsc::Sender<user_service::proto::SyncRequest>,
    changes: tonic::Streaming<SyncResponse>,
}

impl Watcher {
    /// Waits (bounded) for the next Change: something was stored. A
    /// watcher that a fast import leaves behind (a busy machine runs the
    /// test's task late) is ended `ABORTED` by the feed instead, which says
    /// the same: changes were stored, faster than it read them.
    pub async fn change(&mut self) {
        let next = tokio::time::timeout(PATIENCE, self.changes.message()).await;
        let stored = match &next {
            Ok(Ok(Some(message))) => matches!(message.event, Some(Event::Change(_))),
            Ok(Err(status)) => {
                status.code() == tonic::Code::Aborted
                    && status.message().contains("fell too far behind")
            }
            _ => false,
        };
        assert!(stored, "{next:?}");
    }
}

/// The value of the metric line `name{labels}` in a `/metrics` page (0
/// when absent).
pub fn metric(page: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    page.lines()
        .filter(|line| {
            line.starts_with(&format!("{name}{{")) || line.starts_with(&format!("{name} "))
        })
        .filter(|line| {
            labels
                .iter()
                .all(|(key, value)| line.contains(&format!("{key}=\"{value}\"")))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The `user-service` binary, where Cargo builds it: beside this test's own
/// directory (`target/debug/deps`). It belongs to another package of the
/// workspace, whose binaries Cargo neither names to this test
/// (`CARGO_BIN_EXE_*`) nor builds for it: `cargo test --workspace` (as
/// scripts/test.sh runs it) builds both, and `cargo test -p user-load`
/// needs `cargo build -p user-service` first.
pub fn service_binary() -> PathBuf {
    let test = std::env::current_exe().expect("this test's path");
    let binary = test
        .parent()
        .and_then(Path::parent)
        .expect("the test is in target/PROFILE/deps")
        .join("user-service");
    assert!(
        binary.exists(),
        "no {}: run `cargo test --workspace`, or `cargo build -p user-service` first",
        binary.display()
    );
    binary
}

/// What a finished `user-load` run left.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|err| panic!("not a JSON report ({err}): {self:?}"))
    }
}

/// Waits (bounded) for `child` to exit and collects its output.
pub fn finish(mut child: Child) -> Run {
    let (mut out, mut err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let (mut stdout, mut stderr) = (String::new(), String::new());
        let _ = out.read_to_string(&mut stdout);
        let _ = err.read_to_string(&mut stderr);
        let _ = tx.send((stdout, stderr));
    });
    let Ok((stdout, stderr)) = rx.recv_timeout(PATIENCE) else {
        let _ = child.kill();
        panic!("user-load did not finish within {PATIENCE:?}");
    };
    let status = child.wait().expect("wait for user-load");
    Run {
        code: status.code().unwrap_or(-1),
        stdout,
        stderr,
    }
}

/// [`finish`], off an async test's runtime.
pub async fn finish_async(child: Child) -> Run {
    tokio::task::spawn_blocking(move || finish(child))
        .await
        .unwrap()
}

pub fn spawn_load(args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_user-load"))
        .args(args)
        .env_remove("USER_SERVICE_ADDR")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn user-load")
}

pub fn load(args: &[&str]) -> Run {
    finish(spawn_load(args))
}

/// SIGINT, as Ctrl-C sends it.
pub fn interrupt(child: &Child) {
    // SAFETY: kill(2) with the pid of a child this test spawned and has
    // not yet waited for.
    let sent = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    assert_eq!(sent, 0);
}

pub fn assert_failed(run: &Run, code: i32, says: &[&str]) {
    assert_eq!(run.code, code, "{run:?}");
    for words in says {
        assert!(
            run.stderr.contains(words),
            "stderr does not say {words:?}: {run:?}"
        );
    }
}

/// The part of `page` from `start` to the next `end`.
pub fn section<'a>(page: &'a str, start: &str, end: &str) -> &'a str {
    page.split(start)
        .nth(1)
        .and_then(|rest| rest.split(end).next())
        .unwrap_or_else(|| panic!("no {start} in the page"))
}

/// Headless Chromium, as Debian packages it.
pub fn chromium() -> PathBuf {
    let found = std::env::var_os("CHROMIUM").map(PathBuf::from).or_else(|| {
        std::env::var_os("PATH").and_then(|path| {
            std::env::split_paths(&path)
                .map(|dir| dir.join("chromium"))
                .find(|p| p.is_file())
        })
    });
    found.expect(
        "this test renders the HTML report in Chromium: install Debian's chromium \
         (apt-get install chromium; .ci/run does) or set CHROMIUM",
    )
}

/// Renders `page` in headless Chromium: its DOM once loaded, and what its
/// console logged.
pub fn render(page: &Path, dir: &Path, extra: &[&str]) -> (String, Vec<String>) {
    let profile = TempDir::new_in(dir).unwrap();
    let output = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--hide-scrollbars",
            "--enable-logging=stderr",
            "--v=0",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(extra)
        .arg(format!("file://{}", page.display()))
        .stdin(Stdio::null())
        .output()
        .expect("run chromium");
    assert!(output.status.success(), "chromium: {output:?}");
    // Chromium logs each console message as an INFO:CONSOLE line.
    let console = String::from_utf8_lossy(&output.stderr)
        .lines()
        .filter(|l| l.contains(":CONSOLE"))
        .map(str::to_owned)
        .collect();
    (
        String::from_utf8_lossy(&output.stdout).into_owned(),
        console,
    )
}
