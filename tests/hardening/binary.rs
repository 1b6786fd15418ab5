//! The security flags of the `user-service` binary, end to end: TLS files
//! named on the command line, the token file, and what the log says.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex, mpsc},
};

use tonic::{
    Code, Request,
    transport::{Channel, Endpoint},
};
use user_service::proto::user_service_client::UserServiceClient;

use crate::{
    common::{PATIENCE, user, within},
    security::Pki,
};

/// The server binary, running until dropped; its log is collected.
struct Binary {
    child: Child,
    addr: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
    readers: Vec<std::thread::JoinHandle<()>>,
}

impl Binary {
    fn start(args: &[&str]) -> Binary {
        Self::start_command(Command::new(env!("CARGO_BIN_EXE_user-service")), args)
    }

    /// Starts the binary under `prlimit`, with at most `files` descriptors
    /// (soft and hard limit: the server cannot raise it).
    fn start_with_open_files(files: u32, args: &[&str]) -> Binary {
        let mut command = Command::new("prlimit");
        command
            .arg(format!("--nofile={files}:{files}"))
            .arg("--")
            .arg(env!("CARGO_BIN_EXE_user-service"));
        Self::start_command(command, args)
    }

    fn start_command(mut command: Command, args: &[&str]) -> Binary {
        let mut child = command
            .args(args)
            // These tests are about the transport flags; keep no file behind.
            .args(["--store", "memory"])
            .env("RUST_LOG", "trace")
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the binary");
        let log = Arc::new(Mutex::new(Vec::new()));
        let (port_tx, port_rx) = mpsc::channel();
        let mut readers = Vec::new();
        for output in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let (log, port_tx) = (log.clone(), port_tx.clone());
            readers.push(std::thread::spawn(move || {
                for line in BufReader::new(output).lines().map_while(Result::ok) {
                    if line.contains("listening")
                        && let Some(port) = line
                            .split_whitespace()
                            .find_map(|word| word.strip_prefix("addr="))
                            .and_then(|addr| addr.rsplit(':').next())
                            .and_then(|port| port.parse::<u16>().ok())
                    {
                        let _ = port_tx.send(port);
                    }
                    log.lock().unwrap().push(line);
                }
            }));
        }
        let port = port_rx
            .recv_timeout(PATIENCE)
            .unwrap_or_else(|_| panic!("no address in the log: {:?}", log.lock().unwrap()));
        Binary {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            log,
            readers,
        }
    }

    /// Stops the server with SIGTERM; returns its log. Waits off the async
    /// runtime, which must go on driving the clients' connections.
    async fn stop(self) -> String {
        tokio::task::spawn_blocking(move || self.stop_blocking())
            .await
            .unwrap()
    }

    /// The server's CPU time so far (user + system), from /proc.
    fn cpu_seconds(&self) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap();
        // The fields after the command name, which is in parentheses.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .unwrap()
            .1
            .split_whitespace()
            .collect();
        let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
        // SAFETY: sysconf only reads a system setting.
        ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    fn stop_blocking(mut self) -> String {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        assert!(self.child.wait().unwrap().success(), "exit 0 on SIGTERM");
        // The readers finish at the end of the output.
        for reader in self.readers.drain(..) {
            reader.join().unwrap();
        }
        self.log.lock().unwrap().join("\n")
    }
}

impl Drop for Binary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A fresh directory for the files a test hands the binary.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("user-service-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test]
async fn the_binary_serves_mutual_tls_from_its_flags() {
    let pki = Pki::new();
    let dir = scratch("tls");
    let (cert, key, ca) = (
        dir.join("cert.pem"),
        dir.join("key.pem"),
        dir.join("ca.pem"),
    );
    std::fs::write(&cert, &pki.server_cert_pem).unwrap();
    std::fs::write(&key, &pki.server_key_pem).unwrap();
    std::fs::write(&ca, &pki.ca_pem).unwrap();
    let server = Binary::start(&[
        "--addr",
        "127.0.0.1:0",
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
        "--tls-client-ca",
        ca.to_str().unwrap(),
    ]);
    std::fs::remove_dir_all(&dir).unwrap();

    let connect = |identity: bool| {
        let mut tls = pki.client_tls();
        if identity {
            tls = tls.identity(pki.client.clone());
        }
        let endpoint = Endpoint::from_shared(format!("https://{}", server.addr))
            .unwrap()
            .tls_config(tls)
            .unwrap();
        async move { endpoint.connect().await }
    };
    let channel: Channel = within("connect", connect(true)).await.unwrap();
    UserServiceClient::new(channel)
        .add_user(user("Tls"))
        .await
        .unwrap();
    // Without a client certificate: refused in the handshake.
    let refused = match within("connect", connect(false)).await {
        Err(_) => true,
        Ok(channel) => UserServiceClient::new(channel)
            .add_user(user("NoCert"))
            .await
            .is_err(),
    };
    assert!(refused);
    let log = within("the server to stop", server.stop()).await;
    assert!(log.contains("tls=true"), "{log}");
    assert!(!log.contains("PRIVATE KEY"), "{log}");
}

#[tokio::test]
async fn the_binary_checks_its_token_never_logs_it_and_warns_when_exposed() {
    const TOKEN: &str = "t0ken-that-must-not-appear-in-logs";
    let dir = scratch("token");
    let token_file = dir.join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    // All interfaces (the calls below still go to loopback): the server
    // must warn that it has no TLS.
    let server = Binary::start(&[
        "--addr",
        "0.0.0.0:0",
        "--auth-token-file",
        token_file.to_str().unwrap(),
    ]);
    std::fs::remove_dir_all(&dir).unwrap();

    let channel = Endpoint::from_shared(format!("http://{}", server.addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = UserServiceClient::new(channel);
    let status = client.add_user(user("NoToken")).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    let mut request = Request::new(user("Token"));
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {TOKEN}").parse().unwrap());
    client.add_user(request).await.unwrap();
    let mut wrong = Request::new(user("Wrong"));
    wrong
        .metadata_mut()
        .insert("authorization", "Bearer nope".parse().unwrap());
    assert_eq!(
        client.add_user(wrong).await.unwrap_err().code(),
        Code::Unauthenticated
    );

    drop(client);
    let log = within("the server to stop", server.stop()).await;
    assert!(log.contains("without TLS"), "{log}");
    assert!(!log.contains("without an auth token"), "{log}");
    assert!(!log.contains(TOKEN), "the token was logged: {log}");
}

/// Runs the binary with `args` until it exits (bounded); returns its exit
/// code and its log.
fn exit_of(args: &[&str]) -> (Option<i32>, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_user-service"))
        .args(args)
        .args(["--store", "memory"])
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the binary");
    let mut log = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut log).unwrap();
    let (done_tx, done_rx) = mpsc::channel();
    let waiter = std::thread::spawn(move || {
        let status = child.wait().unwrap();
        let _ = done_tx.send(());
        status
    });
    done_rx.recv_timeout(PATIENCE).expect("the binary to exit");
    (waiter.join().unwrap().code(), log)
}

#[test]
fn startup_failures_say_what_failed_and_exit_with_their_code() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = taken.local_addr().unwrap().to_string();
    let (code, log) = exit_of(&["--addr", &taken]);
    assert_eq!(code, Some(69), "{log}");
    assert!(log.contains(&format!("cannot listen on {taken}")), "{log}");

    let dir = scratch("startup");
    let empty = dir.join("empty-token");
    std::fs::write(&empty, "\n").unwrap();
    let missing = dir.join("missing.pem");
    let (empty, missing) = (empty.to_str().unwrap(), missing.to_str().unwrap());
    let (code, log) = exit_of(&["--addr", "127.0.0.1:0", "--auth-token-file", empty]);
    assert_eq!(code, Some(78), "{log}");
    assert!(
        log.contains(&format!("{empty}: the token is empty")),
        "{log}"
    );

    let (code, log) = exit_of(&["--tls-cert", missing, "--tls-key", missing]);
    assert_eq!(code, Some(78), "{log}");
    assert!(log.contains(&format!("cannot read {missing}")), "{log}");

    let not_pem = dir.join("not.pem");
    std::fs::write(&not_pem, "not a certificate").unwrap();
    let not_pem = not_pem.to_str().unwrap();
    let (code, log) = exit_of(&[
        "--addr",
        "127.0.0.1:0",
        "--tls-cert",
        not_pem,
        "--tls-key",
        not_pem,
    ]);
    assert_eq!(code, Some(78), "{log}");
    assert!(
        log.contains("TLS: the certificate file holds no PEM certificate"),
        "{log}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
    // Sentences, not Rust debug structures.
    assert!(!log.contains("Os {"), "{log}");
}

#[tokio::test]
async fn a_host_name_address_and_the_address_file() {
    let dir = scratch("addr-file");
    let addr_file = dir.join("addr");
    let mut child = Command::new(env!("CARGO_BIN_EXE_user-service"))
        .args(["--store", "memory", "--addr", "localhost:0", "--addr-file"])
        .arg(&addr_file)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let addr: SocketAddr = within("the address file", async {
        loop {
            // Written whole or not at all.
            if let Ok(text) = std::fs::read_to_string(&addr_file) {
                assert!(text.ends_with('\n'), "{text:?}");
                break text.trim().parse().unwrap();
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    })
    .await;
    assert!(addr.ip().is_loopback(), "{addr}");
    let channel = Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    UserServiceClient::new(channel)
        .add_user(user("Named"))
        .await
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    std::fs::remove_dir_all(&dir).unwrap();
}

/// With its descriptors exhausted, the server neither spins nor stops: it
/// backs off (using almost no CPU), logs at a bounded rate, and accepts
/// again as soon as descriptors are free; calls already in flight go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_descriptors_exhausted_the_server_idles_then_accepts_again() {
    const FILES: u32 = 64;
    let server = Binary::start_with_open_files(FILES, &["--addr", "127.0.0.1:0"]);
    let url = format!("http://{}", server.addr);
    let mut client = UserServiceClient::new(
        Endpoint::from_shared(url.clone())
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );
    // A call in flight all along: an import whose stream stays open.
    let (rows, stream) = crate::common::request_stream();
    let import = tokio::spawn({
        let mut client = client.clone();
        async move { client.bulk_add_users(stream).await }
    });
    rows.send(user("Before")).await.unwrap();

    // More connections than the server has descriptors: the kernel queues
    // those it cannot accept.
    let mut held = Vec::new();
    for _ in 0..2 * FILES {
        held.push(tokio::net::TcpStream::connect(server.addr).await.unwrap());
    }
    // A measurement window, not a wait for an event: the accept loop would
    // spin through it without the back-off.
    let before = server.cpu_seconds();
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let cpu = server.cpu_seconds() - before;
    assert!(
        cpu < 0.5,
        "the server used {cpu:.2} s of CPU in 2 s while out of descriptors"
    );
    let log = server.log();
    let warnings = log.matches("cannot accept connections").count();
    assert!(
        (1..=2).contains(&warnings),
        "{warnings} accept warnings in 2 s:\n{log}"
    );

    // Descriptors come back: new clients are served at once.
    drop(held);
    let mut fresh = UserServiceClient::new(
        within(
            "a new connection",
            Endpoint::from_shared(url).unwrap().connect(),
        )
        .await
        .unwrap(),
    );
    within("a call on it", fresh.add_user(user("After")))
        .await
        .unwrap();
    // The call in flight all along succeeds.
    rows.send(user("Still")).await.unwrap();
    drop(rows);
    let report = within("the import", import)
        .await
        .unwrap()
        .unwrap()
        .into_inner();
    assert_eq!((report.added, report.failed), (2, 0));
    client.add_user(user("Same connection")).await.unwrap();
    let log = within("the server to stop", server.stop()).await;
    assert!(log.contains("open files"), "{log}");
}
