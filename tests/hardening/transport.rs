//! What the transport gives a handler, and what becomes of a handler that
//! panics, through a test service served by `transport::serve` behind the
//! layers `run` puts around UserService: the connection's addresses and
//! client certificates, as tonic's own server gives them; a panic ends its
//! call with `INTERNAL`, is counted, and the server goes on.

use std::{
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex},
};

use rustls_pki_types::{CertificateDer, pem::PemObject};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Request, Response, Status, Streaming, service::Routes, transport::Endpoint};
use user_service::{
    MemoryStore,
    call_guard::CallGuardLayer,
    gauges::Gauges,
    proto::{
        self, BulkAddUsersResponse, GetUserRequest, ListUsersRequest, SyncRequest, SyncResponse,
        user_service_client::UserServiceClient,
        user_service_server::{UserService, UserServiceServer},
    },
    server::TlsConfig,
    telemetry::{Metrics, ObserveCallsLayer, ServiceCollector},
    transport::{self, ConnectionStats, TransportConfig},
};

use test_support::{Pki, connect_noting_peer, within};

/// What a GetUser handler read of its connection from the request.
#[derive(Debug, Clone, PartialEq)]
struct Seen {
    remote: Option<SocketAddr>,
    local: Option<SocketAddr>,
    peer_certs: Option<Vec<CertificateDer<'static>>>,
}

/// A UserService whose GetUser records what its request says of the
/// connection, or panics when asked for the id `panic`, and whose
/// ListUsers sends one user then panics. The other methods are not needed
/// here.
#[derive(Clone, Default)]
struct Probe {
    seen: Arc<Mutex<Vec<Seen>>>,
}

type Stream<T> = Pin<Box<dyn tokio_stream::Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl UserService for Probe {
    async fn add_user(&self, _: Request<proto::User>) -> Result<Response<proto::Response>, Status> {
        Err(Status::unimplemented("not probed"))
    }

    async fn get_user(
        &self,
        request: Request<GetUserRequest>,
    ) -> Result<Response<proto::User>, Status> {
        if request.get_ref().id == "panic" {
            panic!("GetUser panics, as asked");
        }
        self.seen.lock().unwrap().push(Seen {
            remote: request.remote_addr(),
            local: request.local_addr(),
            peer_certs: request.peer_certs().map(|certs| certs.to_vec()),
        });
        Ok(Response::new(proto::User {
            id: request.into_inner().id,
            ..proto::User::default()
        }))
    }

    type ListUsersStream = Stream<proto::User>;

    async fn list_users(
        &self,
        _: Request<ListUsersRequest>,
    ) -> Result<Response<Self::ListUsersStream>, Status> {
        // The first user goes out in a frame of its own: the stream is not
        // ready again until the task has yielded once.
        let users = futures::stream::unfold(false, |sent| async move {
            if sent {
                tokio::task::yield_now().await;
                panic!("ListUsers panics after its first user");
            }
            let first = proto::User {
                id: "first".into(),
                ..proto::User::default()
            };
            Some((Ok(first), true))
        });
        Ok(Response::new(Box::pin(users)))
    }

    async fn bulk_add_users(
        &self,
        _: Request<Streaming<proto::User>>,
    ) -> Result<Response<BulkAddUsersResponse>, Status> {
        Err(Status::unimplemented("not probed"))
    }

    type SyncUsersStream = Stream<SyncResponse>;

    async fn sync_users(
        &self,
        _: Request<Streaming<SyncRequest>>,
    ) -> Result<Response<Self::SyncUsersStream>, Status> {
        Err(Status::unimplemented("not probed"))
    }
}

/// `service` served on `127.0.0.1:0` by the transport, with TLS when
/// given, behind the call guard and the call metrics as `run` serves
/// UserService.
struct Served {
    addr: SocketAddr,
    gauges: Gauges,
    metrics: Metrics,
    stop: CancellationToken,
}

impl Drop for Served {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn serve(service: Probe, tls: Option<TlsConfig>) -> Served {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let gauges = Gauges::default();
    let connections = ConnectionStats::default();
    let metrics = Metrics::new(ServiceCollector {
        gauges: gauges.clone(),
        connections: connections.clone(),
        store: Box::new(MemoryStore::new(1)),
    });
    let stop = CancellationToken::new();
    let routes = Routes::new(UserServiceServer::new(service)).prepare();
    let guard = CallGuardLayer::new(&gauges, 16, stop.clone());
    let service = tower_layer::Layer::layer(&guard, routes);
    let observe = ObserveCallsLayer::new(Some(metrics.rpc.clone()), false);
    let served = Served {
        addr,
        gauges,
        metrics,
        stop: stop.clone(),
    };
    let service = tower_layer::Layer::layer(&observe, service);
    let tls = tls.map(|tls| tls.acceptor().unwrap());
    tokio::spawn(transport::serve(
        listener,
        tls,
        service,
        None,
        TransportConfig::default(),
        connections,
        stop,
    ));
    served
}

/// Makes one GetUser call over a new connection to `server`, with
/// `endpoint`'s settings; returns the client's address on that connection.
async fn get_user_over(endpoint: Endpoint, server: SocketAddr) -> SocketAddr {
    let (channel, peer) = connect_noting_peer(endpoint, server).await;
    let mut client = UserServiceClient::new(channel);
    let request = GetUserRequest { id: "ada".into() };
    let reply = within("GetUser", client.get_user(request)).await.unwrap();
    assert_eq!(reply.into_inner().id, "ada");
    peer
}

#[tokio::test]
async fn a_plaintext_call_knows_both_addresses_and_has_no_certificates() {
    let probe = Probe::default();
    let server = serve(probe.clone(), None).await;
    let endpoint = Endpoint::from_shared(format!("http://{}", server.addr)).unwrap();
    let client = get_user_over(endpoint, server.addr).await;
    let seen = probe.seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        [Seen {
            remote: Some(client),
            local: Some(server.addr),
            peer_certs: None,
        }]
    );
}

#[tokio::test]
async fn a_mutual_tls_call_knows_both_addresses_and_the_clients_certificate() {
    let pki = Pki::new();
    let probe = Probe::default();
    let server = serve(probe.clone(), Some(pki.server_tls(true))).await;
    let tls = pki.client_tls().identity(pki.client_identity());
    let endpoint = Endpoint::from_shared(format!("https://localhost:{}", server.addr.port()))
        .unwrap()
        .tls_config(tls)
        .unwrap();
    let client = get_user_over(endpoint, server.addr).await;
    let client_cert = CertificateDer::from_pem_slice(pki.client_cert_pem.as_bytes()).unwrap();
    let seen = probe.seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        [Seen {
            remote: Some(client),
            local: Some(server.addr),
            peer_certs: Some(vec![client_cert]),
        }]
    );
}

#[tokio::test]
async fn a_tls_call_without_a_client_certificate_has_none() {
    let pki = Pki::new();
    let probe = Probe::default();
    let server = serve(probe.clone(), Some(pki.server_tls(false))).await;
    let endpoint = Endpoint::from_shared(format!("https://localhost:{}", server.addr.port()))
        .unwrap()
        .tls_config(pki.client_tls())
        .unwrap();
    let client = get_user_over(endpoint, server.addr).await;
    let seen = probe.seen.lock().unwrap().clone();
    assert_eq!(
        seen,
        [Seen {
            remote: Some(client),
            local: Some(server.addr),
            peer_certs: None,
        }]
    );
}

#[tokio::test]
async fn a_handler_that_panics_ends_its_call_with_internal_and_the_server_goes_on() {
    let server = serve(Probe::default(), None).await;
    let endpoint = Endpoint::from_shared(format!("http://{}", server.addr)).unwrap();
    let mut client = UserServiceClient::new(within("connect", endpoint.connect()).await.unwrap());

    // A unary handler that panics: a status, not a reset stream.
    let request = GetUserRequest { id: "panic".into() };
    let status = within("GetUser", client.get_user(request))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Internal, "{status:?}");
    assert_eq!(status.message(), "internal server error");

    // A stream that panics after its first message: the message, then the
    // status.
    let request = ListUsersRequest::default();
    let mut users = within("ListUsers", client.list_users(request))
        .await
        .unwrap()
        .into_inner();
    let first = within("a user", users.message()).await.unwrap().unwrap();
    assert_eq!(first.id, "first");
    let status = within("the end", users.message()).await.unwrap_err();
    assert_eq!(status.code(), Code::Internal, "{status:?}");

    // The same connection, and the server, go on.
    let request = GetUserRequest { id: "ada".into() };
    let reply = within("GetUser", client.get_user(request)).await.unwrap();
    assert_eq!(reply.into_inner().id, "ada");

    // Both are counted, and both calls recorded as ended with INTERNAL.
    assert_eq!(server.gauges.panicked_calls(), 2);
    let metrics = server.metrics.encode();
    let has = |line: &str| metrics.lines().any(|l| l == line);
    assert!(
        has(r#"user_service_panics_total{site="handler"} 2"#),
        "{metrics}"
    );
    assert!(
        has(r#"user_service_panics_total{site="call"} 0"#),
        "{metrics}"
    );
    assert!(
        has(r#"user_service_panics_total{site="connection"} 0"#),
        "{metrics}"
    );
    for method in ["GetUser", "ListUsers"] {
        let handled = format!(
            r#"grpc_server_handled_total{{grpc_type="{}",grpc_service="grpcUser.UserService",grpc_method="{method}",grpc_code="Internal"}} 1"#,
            if method == "GetUser" {
                "unary"
            } else {
                "server_stream"
            },
        );
        assert!(has(&handled), "{handled} in {metrics}");
    }
}
