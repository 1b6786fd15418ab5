//! What the transport gives a handler, through a test service served by
//! `transport::serve` behind the layers `run` puts around UserService: the
//! connection's addresses and client certificates, as tonic's own server
//! gives them.

use std::{
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use hyper_util::rt::TokioIo;
use rustls_pki_types::{CertificateDer, pem::PemObject};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming, service::Routes, transport::Endpoint};
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

use test_support::{Pki, within};

/// What a GetUser handler read of its connection from the request.
#[derive(Debug, Clone, PartialEq)]
struct Seen {
    remote: Option<SocketAddr>,
    local: Option<SocketAddr>,
    peer_certs: Option<Vec<CertificateDer<'static>>>,
}

/// A UserService whose GetUser records what its request says of the
/// connection. The other methods are not needed here.
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
        Err(Status::unimplemented("not probed"))
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
    let guard = CallGuardLayer::new(gauges.in_flight_slots(16), stop.clone());
    let service = tower_layer::Layer::layer(&guard, routes);
    let observe = ObserveCallsLayer::new(Some(metrics.rpc.clone()));
    let service = tower_layer::Layer::layer(&observe, service);
    let tls = tls.map(|tls| tls.acceptor().unwrap());
    tokio::spawn(transport::serve(
        listener,
        tls,
        service,
        TransportConfig::default(),
        connections,
        stop.clone(),
    ));
    Served { addr, stop }
}

/// Dials a server and remembers the address of the client's end of the
/// connection: what the server must report as the remote address.
#[derive(Clone)]
struct Dial {
    server: SocketAddr,
    local: Arc<Mutex<Option<SocketAddr>>>,
}

impl tower_service::Service<http::Uri> for Dial {
    type Response = TokioIo<TcpStream>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Uri) -> Self::Future {
        let (server, local) = (self.server, self.local.clone());
        Box::pin(async move {
            let tcp = TcpStream::connect(server).await?;
            *local.lock().unwrap() = Some(tcp.local_addr()?);
            Ok(TokioIo::new(tcp))
        })
    }
}

/// Makes one GetUser call over a new connection to `server`, with
/// `endpoint`'s settings; returns the client's address on that connection.
async fn get_user_over(endpoint: Endpoint, server: SocketAddr) -> SocketAddr {
    let dial = Dial {
        server,
        local: Arc::default(),
    };
    let channel = within("connect", endpoint.connect_with_connector(dial.clone()))
        .await
        .unwrap();
    let mut client = UserServiceClient::new(channel);
    let request = GetUserRequest { id: "ada".into() };
    let reply = within("GetUser", client.get_user(request)).await.unwrap();
    assert_eq!(reply.into_inner().id, "ada");
    dial.local.lock().unwrap().expect("dialled")
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
