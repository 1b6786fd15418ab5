//! The page over HTTP/1.1 on the gRPC port: its headers, the WebSocket's
//! origin check, gRPC beside it, the playground off, TLS, and the
//! connection limits that apply to HTTP/1.1 too.

use std::time::Duration;

use test_support::{PATIENCE, Pki, http_get, user, within};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpStream,
};
use tokio_tungstenite::tungstenite;
use user_service::Config;

use super::ws::{Page, connect, server};

/// The head of the reply to `request`, sent on a new connection, read to
/// the end (the requests close the connection).
async fn exchange(addr: std::net::SocketAddr, request: &str) -> String {
    within("the reply", async {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(request.as_bytes()).await.unwrap();
        let mut reply = Vec::new();
        let _ = tcp.read_to_end(&mut reply).await;
        String::from_utf8_lossy(&reply).into_owned()
    })
    .await
}

#[tokio::test]
async fn the_page_is_served_on_the_grpc_port_with_its_security_headers() {
    let server = server(Config::default()).await;
    let (status, body) = http_get(server.addr, "/").await;
    assert_eq!(status, 200);
    assert!(
        body.contains("<script type=\"module\" src=\"/app.js\">"),
        "{body}"
    );
    let reply = exchange(
        server.addr,
        &format!(
            "GET /app.js HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
            server.addr
        ),
    )
    .await
    .to_ascii_lowercase();
    assert!(reply.starts_with("http/1.1 200"), "{reply}");
    assert!(reply.contains("content-type: text/javascript"), "{reply}");
    assert!(reply.contains("x-content-type-options: nosniff"), "{reply}");
    assert!(
        reply.contains(
            "content-security-policy: default-src 'none'; script-src 'self'; style-src 'self'"
        ),
        "{reply}"
    );
    assert_eq!(http_get(server.addr, "/nothing").await.0, 404);

    // gRPC on the same port, on a connection of its own.
    let mut client = server.client().await;
    let added = client.add_user(user("Ada")).await.unwrap().into_inner();
    assert_eq!(added.code, 200);
}

#[tokio::test]
async fn a_websocket_from_another_origin_is_refused_and_the_pages_own_accepted() {
    let server = server(Config::default()).await;
    let addr = server.addr;
    for origin in [
        Some("http://evil.example".to_owned()),
        Some(format!("https://{addr}")),
        Some(format!("http://localhost:{}", addr.port() + 1)),
        None,
    ] {
        match connect(addr, origin.as_deref()).await {
            Err(tungstenite::Error::Http(response)) => {
                assert_eq!(response.status(), 403, "{origin:?}")
            }
            other => panic!("{origin:?}: expected 403, got {other:?}"),
        }
    }
    let page = Page::open(addr).await;
    assert_eq!(page.hello["auth"], false);
    let services = page.hello["catalogue"]["services"].as_array().unwrap();
    assert_eq!(services[0]["name"], "grpcUser.UserService");
    // The proto's comments come with the methods.
    let add_user = &services[0]["methods"][0];
    assert_eq!(add_user["name"], "AddUser");
    assert_eq!(add_user["pattern"], "unary");
    assert!(
        add_user["comment"]
            .as_str()
            .unwrap()
            .contains("stores one new user"),
        "{add_user}"
    );
}

#[tokio::test]
async fn with_the_playground_off_the_port_is_grpc_only() {
    let mut config = Config::default();
    config.playground.enabled = false;
    let server = server(config).await;
    // h2 reads the request as a bad preface and closes the connection.
    let reply = exchange(server.addr, "GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(!reply.starts_with("HTTP/1.1"), "{reply:?}");
    let mut client = server.client().await;
    assert_eq!(
        client
            .add_user(user("Ada"))
            .await
            .unwrap()
            .into_inner()
            .code,
        200
    );
}

#[tokio::test]
async fn an_http1_request_head_must_arrive_within_the_handshake_timeout() {
    let mut config = Config::default();
    config.transport.handshake_timeout = Duration::from_secs(1);
    let server = server(config).await;
    let started = std::time::Instant::now();
    // Half a request line, then nothing: closed at the deadline, unanswered.
    let reply = exchange(server.addr, "GET / HT").await;
    assert_eq!(reply, "");
    assert!(started.elapsed() < PATIENCE);
    assert_eq!(server.connections.handshake_timeouts(), 1);
    // Silent from the first byte: the same.
    let reply = exchange(server.addr, "").await;
    assert_eq!(reply, "");
    assert_eq!(server.connections.handshake_timeouts(), 2);
}

#[tokio::test]
async fn max_connections_counts_the_pages_connections_too() {
    let mut config = Config::default();
    config.transport.max_connections = 1;
    let server = server(config).await;
    let _page = Page::open(server.addr).await;
    // The WebSocket holds the one connection: the next is closed unanswered.
    let reply = exchange(server.addr, "GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(reply, "");
    assert_eq!(server.connections.refused(), 1);
}

#[tokio::test]
async fn under_tls_the_page_is_https_and_grpc_is_h2_on_the_same_port() {
    use std::sync::Arc;
    use tokio_rustls::{
        TlsConnector,
        rustls::{ClientConfig, RootCertStore, crypto::ring, pki_types::ServerName},
    };
    let pki = Pki::new();
    let config = Config {
        tls: Some(pki.server_tls(false)),
        ..Config::default()
    };
    let server = server(config).await;

    // A browser: ALPN h2 and http/1.1, as Chromium offers; the server
    // prefers h2, so the page is asked for with http/1.1 alone.
    let mut roots = RootCertStore::empty();
    for cert in
        <rustls_pki_types::CertificateDer as rustls_pki_types::pem::PemObject>::pem_slice_iter(
            pki.ca_pem.as_bytes(),
        )
    {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut tls = ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tcp = TcpStream::connect(server.addr).await.unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let mut stream = TlsConnector::from(Arc::new(tls))
        .connect(name, tcp)
        .await
        .unwrap();
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut reply = Vec::new();
    let _ = within("the page", stream.read_to_end(&mut reply)).await;
    let reply = String::from_utf8_lossy(&reply);
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");

    // gRPC: tonic's client negotiates h2.
    let channel = tonic::transport::Endpoint::from_shared(format!(
        "https://localhost:{}",
        server.addr.port()
    ))
    .unwrap()
    .tls_config(pki.client_tls())
    .unwrap()
    .connect()
    .await
    .unwrap();
    let mut client = user_service::proto::user_service_client::UserServiceClient::new(channel);
    assert_eq!(
        client
            .add_user(user("Ada"))
            .await
            .unwrap()
            .into_inner()
            .code,
        200
    );
}
