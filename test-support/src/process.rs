//! The server binary as a child process.

use std::{
    io::{BufRead, BufReader, Read},
    net::SocketAddr,
    path::Path,
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, mpsc},
    thread::JoinHandle,
    time::Duration,
};

use tokio::sync::watch;
use tonic::transport::Channel;
use user_service::proto::user_service_client::UserServiceClient;

use crate::{Client, PATIENCE};

/// The server binary, running until stopped or dropped (then killed). Its
/// address comes from the file it writes once listening (`--addr-file`);
/// its log (stderr) is collected, line by line, by a thread of its own.
pub struct ServerProcess {
    child: Child,
    pub addr: SocketAddr,
    /// The lines collected so far; [`ServerProcess::log_line`] waits on it.
    log: Arc<watch::Sender<Vec<String>>>,
    reader: Option<JoinHandle<()>>,
    _scratch: tempfile::TempDir,
}

impl ServerProcess {
    /// Starts `binary` (the test's `env!("CARGO_BIN_EXE_user-service")`)
    /// with `args`, on `127.0.0.1:0` unless `args` name an `--addr`.
    pub fn start(binary: &str, args: &[&str]) -> ServerProcess {
        let mut command = Command::new(binary);
        command.args(args);
        Self::spawn(command)
    }

    /// Starts `command`: the binary, perhaps behind a wrapper such as
    /// `prlimit`, with its arguments last. `--addr-file` (and `--addr
    /// 127.0.0.1:0`, unless given) are added to them.
    pub fn spawn(mut command: Command) -> ServerProcess {
        let scratch = tempfile::tempdir().expect("temp dir");
        let addr_file = scratch.path().join("addr");
        let has_addr = command.get_args().any(|arg| arg == "--addr");
        if !has_addr {
            command.args(["--addr", "127.0.0.1:0"]);
        }
        command.arg("--addr-file").arg(&addr_file);
        if command.get_envs().all(|(key, _)| key != "RUST_LOG") {
            command.env("RUST_LOG", "info");
        }
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn the server");
        let log = Arc::new(watch::Sender::new(Vec::new()));
        let stderr = child.stderr.take().expect("piped stderr");
        // Reads the log to its end, so that the child never blocks on a full
        // pipe.
        let reader = std::thread::spawn({
            let log = log.clone();
            move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    log.send_modify(|lines| lines.push(line));
                }
            }
        });
        let mut server = ServerProcess {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            log,
            reader: Some(reader),
            _scratch: scratch,
        };
        server.addr = server.wait_for_addr(&addr_file);
        server
    }

    /// Waits (bounded) for the address file, which is written whole once
    /// the server listens.
    fn wait_for_addr(&mut self, addr_file: &Path) -> SocketAddr {
        let started = std::time::Instant::now();
        loop {
            if let Ok(text) = std::fs::read_to_string(addr_file) {
                return text.trim().parse().expect("an address in the file");
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "the server exited ({status}) before listening:\n{}",
                    self.log()
                );
            }
            if started.elapsed() > PATIENCE {
                panic!("the server did not start listening:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(self.url())
            .unwrap()
            .connect()
            .await
            .expect("connect")
    }

    /// A client on a new connection.
    pub async fn client(&self) -> Client {
        UserServiceClient::new(self.channel().await)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its log so far: what the reading thread has collected, which may
    /// lag behind what the server has written. To wait for a line, use
    /// [`ServerProcess::log_line`].
    pub fn log(&self) -> String {
        self.log.borrow().join("\n")
    }

    /// Waits (bounded) until a line of its log contains `text`; returns
    /// that line.
    pub async fn log_line(&self, text: &str) -> String {
        let mut log = self.log.subscribe();
        let found = tokio::time::timeout(
            PATIENCE,
            log.wait_for(|lines| lines.iter().any(|line| line.contains(text))),
        )
        .await;
        match found {
            Ok(Ok(lines)) => lines
                .iter()
                .find(|line| line.contains(text))
                .expect("the line waited for")
                .clone(),
            _ => panic!("no log line with {text:?}:\n{}", self.log()),
        }
    }

    /// Its CPU time so far (user and system), from `/proc`.
    pub fn cpu_seconds(&self) -> f64 {
        cpu_seconds(self.pid())
    }

    /// SIGKILL: no shutdown, no flush, no checkpoint.
    pub fn kill(mut self) {
        self.child.kill().expect("kill");
        self.child.wait().expect("wait");
    }

    /// SIGTERM, as a service manager stops a server, then waits (bounded)
    /// for it to exit; returns its exit status and its whole log. Blocks:
    /// from async code, use [`ServerProcess::stop`].
    pub fn terminate(mut self) -> (ExitStatus, String) {
        let pid = libc::pid_t::try_from(self.pid()).unwrap();
        // SAFETY: sends a signal to our own child, not yet waited for.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        let status = wait_bounded(&mut self.child, "the server to exit after SIGTERM");
        if let Some(reader) = self.reader.take() {
            // Ends at the end of the output, which the exit closed.
            reader.join().unwrap();
        }
        (status, self.log())
    }

    /// [`ServerProcess::terminate`], off the async runtime, which must go
    /// on driving the test's own connections meanwhile.
    pub async fn stop(self) -> (ExitStatus, String) {
        tokio::task::spawn_blocking(move || self.terminate())
            .await
            .unwrap()
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits for `child` to exit, at most [`PATIENCE`]; kills it and fails the
/// test past that.
fn wait_bounded(child: &mut Child, what: &str) -> ExitStatus {
    let (tx, rx) = mpsc::channel();
    std::thread::scope(|scope| {
        let pid = child.id();
        scope.spawn(move || {
            let _ = tx.send(child.wait());
        });
        match rx.recv_timeout(PATIENCE) {
            Ok(status) => status.expect("wait"),
            Err(_) => {
                // SAFETY: our own child; the waiting thread then returns.
                unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
                panic!("timed out waiting for {what}");
            }
        }
    })
}

/// Runs `command` (the server binary, expected to exit by itself: a
/// refused start) to its end, bounded; returns its exit status and log.
pub fn run_to_exit(mut command: Command) -> (ExitStatus, String) {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut stderr = child.stderr.take().expect("piped stderr");
    let reader = std::thread::spawn(move || {
        let mut log = String::new();
        let _ = stderr.read_to_string(&mut log);
        log
    });
    let status = wait_bounded(&mut child, "the process to exit by itself");
    (status, reader.join().unwrap())
}

/// The CPU time (user and system) of process `pid` so far, from `/proc`.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/PID/stat");
    // The fields after the command name, which is in parentheses.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .expect("a command name")
        .1
        .split_whitespace()
        .collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    // SAFETY: sysconf only reads a system setting.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// The resident memory of process `pid` (this one: `std::process::id()`),
/// in bytes, from `/proc`.
pub fn rss_bytes(pid: u32) -> u64 {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).expect("/proc/PID/statm");
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .expect("resident pages")
        .parse()
        .unwrap();
    // SAFETY: sysconf only reads a system setting.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as u64;
    pages * page
}
