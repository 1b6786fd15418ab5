//! The security flags of the `user-service` binary, end to end: TLS files
//! named on the command line, the token file, and what the log says.

use std::process::Command;

use test_support::{Pki, ServerProcess, request_stream, run_to_exit, user, within};
use tonic::{
    Code, Request,
    transport::{Channel, Endpoint},
};
use user_service::proto::user_service_client::UserServiceClient;

const BINARY: &str = env!("CARGO_BIN_EXE_user-service");

/// The binary with `args`, logging everything (`trace`), over a memory
/// store: these tests are about the transport and security flags, and
/// keep no file behind.
fn start(args: &[&str]) -> ServerProcess {
    let mut command = Command::new(BINARY);
    command
        .args(["--store", "memory"])
        .args(args)
        .env("RUST_LOG", "trace");
    ServerProcess::spawn(command)
}

/// The same under `prlimit`, with at most `files` descriptors (soft and
/// hard limit: the server cannot raise it).
fn start_with_open_files(files: u32, args: &[&str]) -> ServerProcess {
    let mut command = Command::new("prlimit");
    command
        .arg(format!("--nofile={files}:{files}"))
        .arg("--")
        .arg(BINARY)
        .args(["--store", "memory"])
        .args(args);
    ServerProcess::spawn(command)
}

/// A fresh directory for the files a test hands the binary, removed when
/// dropped.
fn scratch() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

#[tokio::test]
async fn the_binary_serves_mutual_tls_from_its_flags() {
    let pki = Pki::new();
    let dir = scratch();
    let dir = dir.path();
    let (cert, key, ca) = (
        dir.join("cert.pem"),
        dir.join("key.pem"),
        dir.join("ca.pem"),
    );
    std::fs::write(&cert, &pki.server_cert_pem).unwrap();
    std::fs::write(&key, &pki.server_key_pem).unwrap();
    std::fs::write(&ca, &pki.ca_pem).unwrap();
    let server = start(&[
        "--addr",
        "127.0.0.1:0",
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
        "--tls-client-ca",
        ca.to_str().unwrap(),
    ]);

    let connect = |identity: bool| {
        let mut tls = pki.client_tls();
        if identity {
            tls = tls.identity(pki.client_identity());
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
    let (status, log) = within("the server to stop", server.stop()).await;
    assert!(status.success(), "exit 0 on SIGTERM: {log}");
    assert!(log.contains("tls=true"), "{log}");
    assert!(!log.contains("PRIVATE KEY"), "{log}");
}

#[tokio::test]
async fn the_binary_checks_its_token_never_logs_it_and_warns_when_exposed() {
    const TOKEN: &str = "t0ken-that-must-not-appear-in-logs";
    let dir = scratch();
    let dir = dir.path();
    let token_file = dir.join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    // All interfaces (the calls below still go to loopback): the server
    // must warn that it has no TLS.
    let server = start(&[
        "--addr",
        "0.0.0.0:0",
        "--auth-token-file",
        token_file.to_str().unwrap(),
    ]);

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
    let (status, log) = within("the server to stop", server.stop()).await;
    assert!(status.success(), "exit 0 on SIGTERM: {log}");
    assert!(log.contains("without TLS"), "{log}");
    assert!(!log.contains("without an auth token"), "{log}");
    assert!(!log.contains(TOKEN), "the token was logged: {log}");
}

/// Runs the binary with `args` (and a memory store) until it exits,
/// bounded; returns its exit code and its log.
fn exit_of(args: &[&str]) -> (Option<i32>, String) {
    let mut command = Command::new(BINARY);
    command.args(args).args(["--store", "memory"]);
    let (status, log) = run_to_exit(command);
    (status.code(), log)
}

#[test]
fn startup_failures_say_what_failed_and_exit_with_their_code() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = taken.local_addr().unwrap().to_string();
    let (code, log) = exit_of(&["--addr", &taken]);
    assert_eq!(code, Some(69), "{log}");
    assert!(log.contains(&format!("cannot listen on {taken}")), "{log}");

    let dir = scratch();
    let dir = dir.path();
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
    // Sentences, not Rust debug structures.
    assert!(!log.contains("Os {"), "{log}");
}

#[tokio::test]
async fn a_host_name_address_and_the_address_file() {
    // The address file (which `start` waits for) names the address bound.
    let server = start(&["--addr", "localhost:0"]);
    assert!(server.addr.ip().is_loopback(), "{}", server.addr);
    server.client().await.add_user(user("Named")).await.unwrap();
    let (status, log) = within("the server to stop", server.stop()).await;
    assert!(status.success(), "{log}");
}

/// A SIGTERM sent the moment the address file appears, as a supervisor or
/// a test that only waits for readiness sends it, is a graceful shutdown:
/// the handler is in place before the server says it is up. (It was once
/// installed a little later, and most such signals ended the process on
/// the spot.)
#[test]
fn a_sigterm_as_soon_as_the_server_is_up_is_a_graceful_shutdown() {
    for _ in 0..10 {
        let (status, log) = start(&[]).terminate();
        assert!(status.success(), "exit 0 on SIGTERM: {status:?} {log}");
        assert!(log.contains("received SIGTERM"), "{log}");
    }
}

/// With its descriptors exhausted, the server neither spins nor stops: it
/// backs off (using almost no CPU), logs at a bounded rate, and accepts
/// again as soon as descriptors are free; calls already in flight go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_descriptors_exhausted_the_server_idles_then_accepts_again() {
    const FILES: u32 = 64;
    let server = start_with_open_files(FILES, &[]);
    let url = format!("http://{}", server.addr);
    let mut client = UserServiceClient::new(
        Endpoint::from_shared(url.clone())
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );
    // A call in flight all along: an import whose stream stays open.
    let (rows, stream) = request_stream();
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
    // The server says when it runs out...
    server.log_line("cannot accept connections").await;
    // ...and from then on, a measurement window, not a wait for an event:
    // the accept loop would spin through it without the back-off.
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
    let (status, log) = within("the server to stop", server.stop()).await;
    assert!(status.success(), "exit 0 on SIGTERM: {log}");
    assert!(log.contains("open files"), "{log}");
}
