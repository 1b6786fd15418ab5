//! Bearer-token authentication, TLS and mutual TLS, with certificates made
//! at test time.

use rcgen::ExtendedKeyUsagePurpose;
use tonic::{
    Code, Request, Status,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
use tonic_reflection::pb::v1::{
    ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
    server_reflection_request::MessageRequest,
};
use user_service::{
    Config, MemoryStore,
    auth::AuthToken,
    proto::{
        GetUserRequest, ListUsersRequest, SyncRequest, user_service_client::UserServiceClient,
    },
    server::TlsConfig,
};

use test_support::{FEED_CAPACITY, Pki, TestServer, ca, leaf, user, within};

const TOKEN: &str = "correct-horse-battery-staple";

fn bearer<T>(message: T, token: Option<&str>) -> Request<T> {
    let mut request = Request::new(message);
    if let Some(token) = token {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    request
}

/// Calls every UserService method with `token`; returns each outcome's code.
async fn call_every_method(server: &TestServer, token: Option<&str>) -> Vec<(&'static str, Code)> {
    let mut client = server.client().await;
    let code = |result: Result<(), Status>| result.map_or_else(|s| s.code(), |()| Code::Ok);
    let add = client.add_user(bearer(user("Ann"), token)).await;
    let id = add
        .as_ref()
        .map(|r| r.get_ref().user.clone().unwrap().id)
        .unwrap_or_else(|_| "missing".into());
    let add = code(add.map(drop));
    let get = code(
        client
            .get_user(bearer(GetUserRequest { id }, token))
            .await
            .map(drop),
    );
    let list = match client
        .list_users(bearer(ListUsersRequest::default(), token))
        .await
    {
        Ok(response) => {
            let mut stream = response.into_inner();
            code(
                within("a listing", async {
                    while stream.message().await?.is_some() {}
                    Ok(())
                })
                .await,
            )
        }
        Err(status) => status.code(),
    };
    let bulk = code(
        client
            .bulk_add_users(bearer(tokio_stream::iter([user("Bob")]), token))
            .await
            .map(drop),
    );
    let sync = code(
        client
            .sync_users(bearer(tokio_stream::iter(Vec::<SyncRequest>::new()), token))
            .await
            .map(drop),
    );
    vec![
        ("AddUser", add),
        ("GetUser", get),
        ("ListUsers", list),
        ("BulkAddUsers", bulk),
        ("SyncUsers", sync),
    ]
}

async fn start_with_token() -> TestServer {
    let config = Config {
        auth_token: Some(AuthToken::new(TOKEN).unwrap()),
        ..Config::default()
    };
    TestServer::start_with(MemoryStore::new(FEED_CAPACITY), config).await
}

#[tokio::test]
async fn calls_without_the_right_token_are_unauthenticated() {
    let server = start_with_token().await;
    for token in [
        None,
        Some("wrong"),
        Some("correct-horse-battery-stapl"),
        Some(""),
    ] {
        for (method, code) in call_every_method(&server, token).await {
            assert_eq!(code, Code::Unauthenticated, "{method} with {token:?}");
        }
    }
    for (method, code) in call_every_method(&server, Some(TOKEN)).await {
        assert_eq!(code, Code::Ok, "{method} with the token");
    }
}

#[tokio::test]
async fn health_stays_open_and_reflection_needs_the_token() {
    let server = start_with_token().await;
    HealthClient::new(server.channel().await)
        .check(HealthCheckRequest::default())
        .await
        .unwrap();

    let mut reflection = ServerReflectionClient::new(server.channel().await);
    let list = || {
        tokio_stream::iter([ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        }])
    };
    let status = reflection
        .server_reflection_info(bearer(list(), None))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    let mut replies = reflection
        .server_reflection_info(bearer(list(), Some(TOKEN)))
        .await
        .unwrap()
        .into_inner();
    assert!(replies.message().await.unwrap().is_some());
}

#[tokio::test]
async fn without_a_token_configured_calls_need_none() {
    let server = TestServer::start().await;
    for (method, code) in call_every_method(&server, None).await {
        assert_eq!(code, Code::Ok, "{method}");
    }
}

async fn start_tls(tls: TlsConfig) -> TestServer {
    let config = Config {
        tls: Some(tls),
        ..Config::default()
    };
    TestServer::start_with(MemoryStore::new(FEED_CAPACITY), config).await
}

/// Connects with `tls` and makes one AddUser call.
async fn add_over(server: &TestServer, tls: Option<ClientTlsConfig>) -> Result<(), Status> {
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{}", server.addr)).unwrap();
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls).unwrap();
    }
    let channel: Channel = match within("connect", endpoint.connect()).await {
        Ok(channel) => channel,
        Err(err) => return Err(Status::unavailable(err.to_string())),
    };
    let mut client = UserServiceClient::new(channel);
    within("a call", client.add_user(user("Tess")))
        .await
        .map(drop)
}

/// A connection refused during the TLS handshake: the client sees a
/// transport error, not a status from the server, which tonic reports as
/// UNKNOWN or UNAVAILABLE depending on when the connection broke.
fn assert_refused_by_transport(status: &Status, what: &str) {
    assert!(
        matches!(status.code(), Code::Unknown | Code::Unavailable),
        "{what}: {status:?}"
    );
    let text = format!("{status:?}").to_lowercase();
    assert!(
        [
            "transport",
            "connect",
            "certificate",
            "tls",
            "pipe",
            "reset",
            "closed"
        ]
        .iter()
        .any(|word| text.contains(word)),
        "{what}: {status:?}"
    );
}

#[tokio::test]
async fn tls_serves_clients_that_trust_the_server() {
    let pki = Pki::new();
    let server = start_tls(pki.server_tls(false)).await;
    add_over(&server, Some(pki.client_tls())).await.unwrap();
    // Plaintext is not spoken.
    let status = add_over(&server, None).await.unwrap_err();
    assert_refused_by_transport(&status, "plaintext");
    // Nor to a client that does not trust the certificate.
    let stranger = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca("another CA").pem()))
        .domain_name("localhost");
    let status = add_over(&server, Some(stranger)).await.unwrap_err();
    assert_refused_by_transport(&status, "untrusted server");
}

#[tokio::test]
async fn mutual_tls_refuses_clients_without_a_valid_certificate() {
    let pki = Pki::new();
    let server = start_tls(pki.server_tls(true)).await;
    add_over(
        &server,
        Some(pki.client_tls().identity(pki.client_identity())),
    )
    .await
    .unwrap();

    let status = add_over(&server, Some(pki.client_tls())).await.unwrap_err();
    assert_refused_by_transport(&status, "no certificate");

    let rogue = ca("rogue CA");
    let (cert, key) = leaf(&rogue, &["client"], ExtendedKeyUsagePurpose::ClientAuth);
    let status = add_over(
        &server,
        Some(pki.client_tls().identity(Identity::from_pem(cert, key))),
    )
    .await
    .unwrap_err();
    assert_refused_by_transport(&status, "foreign certificate");

    // The server is still serving.
    add_over(
        &server,
        Some(pki.client_tls().identity(pki.client_identity())),
    )
    .await
    .unwrap();
}
