//! Connection setup: the HTTP/2 connections to every target, TLS, the
//! metadata sent with every call, and a health Check on each connection
//! that proves the server answers before any load is sent.
//!
//! TLS is done here (rustls) rather than by tonic, for two reasons: tonic
//! cannot skip certificate verification (`--skipTLS`), and a failed
//! handshake can then be reported with its address and cause. tonic sees a
//! plain `http://` connection, so requests carry `:scheme http` even over
//! TLS; servers do not act on it.

use std::{
    error::Error,
    future::Future,
    io,
    path::Path,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU8, Ordering},
    },
    task::{Context, Poll, ready},
    time::Duration,
};

use hyper_util::rt::TokioIo;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
};
use tokio_rustls::{
    TlsConnector,
    client::TlsStream,
    rustls::{self, ClientConfig, RootCertStore},
};
use tokio_util::either::Either;
use tonic::{
    Status,
    codegen::http::Uri,
    metadata::{Ascii, MetadataKey, MetadataValue},
    service::{Interceptor, interceptor::InterceptedService},
    transport::{Channel, Endpoint},
};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use user_service::{
    any_certificate::AnyCertificate, auth::AuthToken, batched_io::BatchedWrites,
    proto::user_service_client::UserServiceClient, server::MAX_MESSAGE_SIZE,
};

use crate::{
    cli::{ConnectArgs, HostPort, TargetArgs},
    stats::{describe, is_transport_failure},
};

pub type Client = UserServiceClient<Transport>;

/// One HTTP/2 connection, adding the metadata (and token) to every call.
pub type Transport = InterceptedService<Channel, Headers>;

/// HTTP/2 receive windows of the generator's connections. h2's defaults
/// (64 KiB per stream) would make a ListUsers scan wait for window updates
/// every few hundred users on loopback.
const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;

/// How long to wait for a TCP connection and its TLS handshake.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a run could not start.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// An input named on the command line is unusable (exit status 2).
    #[error("{0}")]
    Input(String),
    /// No call reached a server, or a server refused them all (exit status
    /// 1).
    #[error("{0}")]
    Unreachable(String),
}

/// Metadata added to every call.
#[derive(Debug, Clone, Default)]
pub struct Headers(Arc<Vec<(MetadataKey<Ascii>, MetadataValue<Ascii>)>>);

impl Interceptor for Headers {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        for (key, value) in self.0.iter() {
            request.metadata_mut().insert(key.clone(), value.clone());
        }
        Ok(request)
    }
}

/// A connection and the index of the target it goes to.
#[derive(Clone)]
pub struct Connection {
    pub transport: Transport,
    pub target: usize,
}

/// A UserService client on `transport`, with the generator's message
/// limits.
pub fn client_on(transport: Transport) -> Client {
    UserServiceClient::new(transport)
        .max_decoding_message_size(MAX_MESSAGE_SIZE)
        .max_encoding_message_size(MAX_MESSAGE_SIZE)
}

/// Opens `count` connections spread round-robin over the targets, and
/// checks each with one call.
pub async fn connect(
    target: &TargetArgs,
    count: usize,
    timeout: Duration,
) -> Result<Vec<Connection>, SetupError> {
    connect_to(&target.addr, &target.conn, count, timeout).await
}

/// Opens `count` connections spread round-robin over `addrs`, connected
/// as `conn` says, and checks each with one call.
pub async fn connect_to(
    addrs: &[HostPort],
    conn: &ConnectArgs,
    count: usize,
    timeout: Duration,
) -> Result<Vec<Connection>, SetupError> {
    let tls = tls_config(conn)?;
    let headers = headers(conn)?;
    let mut connections = Vec::with_capacity(count);
    for i in 0..count {
        let index = i % addrs.len();
        let addr = &addrs[index];
        let connector = Connector::new(addr, tls.as_ref(), conn.cname.as_deref())?;
        let heard = connector.heard.clone();
        let endpoint = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|err| SetupError::Input(format!("--addr {addr}: {err}")))?
            .connect_timeout(CONNECT_TIMEOUT)
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW);
        // Each `connect` opens its own connection.
        let channel = endpoint
            .connect_with_connector(connector)
            .await
            .map_err(|err| SetupError::Unreachable(connect_failure(addr, &err)))?;
        let transport = InterceptedService::new(channel, headers.clone());
        probe(addr, conn, transport.clone(), timeout, &heard).await?;
        connections.push(Connection {
            transport,
            target: index,
        });
    }
    Ok(connections)
}

/// One health Check (`grpc.health.v1.Health`, which every gRPC server
/// may serve and this one serves without a token) on a fresh connection:
/// plaintext spoken to a TLS server or a client certificate missing show
/// here, before any load is sent, and the probe adds nothing to the
/// figures of the service under test. A server without the health service
/// answers UNIMPLEMENTED, which proves the connection just as well.
async fn probe(
    addr: &HostPort,
    target: &ConnectArgs,
    transport: Transport,
    timeout: Duration,
    heard: &AtomicU8,
) -> Result<(), SetupError> {
    let status = match check_health(transport, timeout).await {
        Ok(_) => return Ok(()),
        Err(Some(status)) => status,
        Err(None) => {
            return Err(SetupError::Unreachable(format!(
                "0 calls reached the server at {addr}: no answer within --timeout ({timeout:?})"
            )));
        }
    };
    if is_transport_failure(&status) {
        let mut message = format!(
            "0 calls reached the server at {addr}: the connection failed before an answer \
             ({})",
            describe(&status)
        );
        let tls = target.cacert.is_some() || target.skip_tls;
        let hint = match (tls, heard.load(Ordering::Relaxed)) {
            (false, HEARD_TLS) => Some(
                "The server answered in TLS and user-load spoke plaintext: give the CA that \
                 signed its certificate with --cacert, or --skipTLS for a test certificate",
            ),
            (false, HEARD_NOTHING) => Some(
                "The server closed the connection without a word, as a TLS server does to \
                 plaintext: if it speaks TLS, give --cacert FILE, or --skipTLS",
            ),
            _ => tls_hint(&message).or((tls && target.cert.is_none()).then_some(
                "The server ended the connection after the TLS handshake: if it requires a \
                 client certificate (mutual TLS), give one with --cert and --key",
            )),
        };
        if let Some(hint) = hint {
            message.push_str(". ");
            message.push_str(hint);
        }
        return Err(SetupError::Unreachable(message));
    }
    if is_refusal(status.code()) {
        return Err(SetupError::Unreachable(format!(
            "the server at {addr} refused the calls ({}): {}",
            describe(&status),
            token_hint(target.auth_token_file.as_deref())
        )));
    }
    // Any other answer came from the server: the connection works.
    Ok(())
}

/// What a health Check that was answered said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Serving {
    Yes,
    /// NOT_SERVING, or any status but SERVING: a server that is shutting
    /// down, or whose store is unusable, says so.
    No,
}

/// One health Check of the whole server on `transport`, within `timeout`:
/// what it answered, else its status (`None`: no answer in time).
pub async fn check_health(
    transport: Transport,
    timeout: Duration,
) -> Result<Serving, Option<tonic::Status>> {
    let mut request = tonic::Request::new(HealthCheckRequest {
        service: String::new(),
    });
    request.set_timeout(timeout);
    match tokio::time::timeout(timeout, HealthClient::new(transport).check(request)).await {
        Ok(Ok(reply)) if reply.get_ref().status() == ServingStatus::Serving => Ok(Serving::Yes),
        Ok(Ok(_)) => Ok(Serving::No),
        Ok(Err(status)) => Err(Some(status)),
        Err(_) => Err(None),
    }
}

/// Whether a server answering `code` refuses the caller rather than the
/// call: its token is wrong or missing.
pub fn is_refusal(code: tonic::Code) -> bool {
    matches!(
        code,
        tonic::Code::Unauthenticated | tonic::Code::PermissionDenied
    )
}

/// What to do when a server refuses the caller, given `--auth-token-file`.
pub fn token_hint(token_file: Option<&Path>) -> String {
    match token_file {
        Some(path) => format!("the token in {} is not the one it expects", path.display()),
        None => "give the token it expects with --auth-token-file FILE".to_owned(),
    }
}

/// What to do about a TLS failure, from rustls's name for it.
fn tls_hint(message: &str) -> Option<&'static str> {
    let hints = [
        (
            "CertificateRequired",
            "The server requires a client certificate: give it with --cert and --key",
        ),
        (
            "UnknownIssuer",
            "The server's certificate is not signed by the CA given with --cacert",
        ),
        (
            "NotValidForName",
            "The server's certificate does not carry this host name: give the name it \
             carries with --cname",
        ),
        (
            "UnsupportedCertVersion",
            "A certificate is X.509 v1; rustls takes only v3 certificates (see the \
             recipe in docs/security.md)",
        ),
        (
            "InvalidContentType",
            "The server does not seem to speak TLS: leave out --cacert and --skipTLS",
        ),
        (
            "BadCertificate",
            "The server refused the client certificate: is it signed by the CA the \
             server trusts (--tls-client-ca)?",
        ),
    ];
    hints
        .iter()
        .find(|(cause, _)| message.contains(cause))
        .map(|(_, hint)| *hint)
}

/// A failed connection as a sentence: the cause our connector gave, or
/// tonic's error with its causes.
fn connect_failure(addr: &HostPort, err: &tonic::transport::Error) -> String {
    let mut source: Option<&(dyn Error + 'static)> = Some(err);
    let mut chain = String::new();
    while let Some(cause) = source {
        let ours = cause.downcast_ref::<ConnectFailure>().or_else(|| {
            cause
                .downcast_ref::<io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|inner| inner.downcast_ref::<ConnectFailure>())
        });
        if let Some(failure) = ours {
            let mut message = format!("0 calls reached the server at {addr}: {failure}");
            if let Some(hint) = tls_hint(&message) {
                message.push_str(". ");
                message.push_str(hint);
            }
            return message;
        }
        let text = cause.to_string();
        if !chain.contains(&text) {
            if !chain.is_empty() {
                chain.push_str(": ");
            }
            chain.push_str(&text);
        }
        source = cause.source();
    }
    format!("0 calls reached the server at {addr}: cannot connect ({chain})")
}

/// Why our connector could not open a connection.
#[derive(Debug, thiserror::Error)]
enum ConnectFailure {
    #[error("cannot connect: {0}")]
    Tcp(io::Error),
    #[error("the TLS handshake failed: {0}")]
    Tls(io::Error),
}

/// The `Headers` of `--header`, `--metadata` and `--auth-token-file`.
fn headers(target: &ConnectArgs) -> Result<Headers, SetupError> {
    let mut headers: Vec<_> = target
        .headers
        .iter()
        .chain(target.metadata.iter().flat_map(|m| &m.0))
        .map(|h| (h.key.clone(), h.value.clone()))
        .collect();
    if let Some(path) = &target.auth_token_file {
        let token = AuthToken::from_file(path)
            .map_err(|err| SetupError::Input(format!("--auth-token-file: {err}")))?;
        headers.push((
            MetadataKey::from_static("authorization"),
            token.header_value(),
        ));
    }
    Ok(Headers(Arc::new(headers)))
}

fn read_pem<T: PemObject>(what: &str, path: &Path) -> Result<Vec<T>, SetupError> {
    let input = |reason: String| SetupError::Input(format!("{what} {}: {reason}", path.display()));
    let bytes = std::fs::read(path).map_err(|err| input(err.to_string()))?;
    let items = T::pem_slice_iter(&bytes)
        .collect::<Result<Vec<T>, _>>()
        .map_err(|err| input(format!("not PEM ({err})")))?;
    if items.is_empty() {
        return Err(input(format!("no {what} in it")));
    }
    Ok(items)
}

/// The rustls configuration `--cacert`, `--skipTLS`, `--cert` and `--key`
/// ask for; `None` for plaintext.
fn tls_config(target: &ConnectArgs) -> Result<Option<Arc<ClientConfig>>, SetupError> {
    if target.cacert.is_none() && !target.skip_tls {
        return Ok(None);
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|err| SetupError::Input(format!("TLS: {err}")))?;
    let builder = match &target.cacert {
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for cert in read_pem::<CertificateDer>("certificate", path)? {
                roots.add(cert).map_err(|err| {
                    SetupError::Input(format!("--cacert {}: {err}", path.display()))
                })?;
            }
            builder.with_root_certificates(roots)
        }
        None => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider))),
    };
    let mut config = match (&target.cert, &target.key) {
        (Some(cert), Some(key)) => {
            let chain = read_pem::<CertificateDer>("certificate", cert)?;
            let key = read_pem::<PrivateKeyDer>("private key", key)?.remove(0);
            builder.with_client_auth_cert(chain, key).map_err(|err| {
                let mut message = format!("--cert and --key: {err}");
                if let Some(hint) = tls_hint(&message) {
                    message.push_str(". ");
                    message.push_str(hint);
                }
                SetupError::Input(message)
            })?
        }
        _ => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Some(Arc::new(config)))
}

/// The socket under a connection: TLS or plaintext, with writes held until
/// a flush that first lets the other ready tasks run, as the server's are
/// (`user_service::batched_io`), so that requests issued together by many
/// workers share writes.
type Io = TokioIo<BatchedWrites<Either<Sniff<TcpStream>, TlsStream<TcpStream>>>>;

/// Opens the connections of one target.
#[derive(Clone)]
struct Connector {
    addr: String,
    tls: Option<(TlsConnector, ServerName<'static>)>,
    /// What a plaintext connection first heard from the server.
    heard: Arc<AtomicU8>,
}

impl Connector {
    fn new(
        addr: &HostPort,
        tls: Option<&Arc<ClientConfig>>,
        cname: Option<&str>,
    ) -> Result<Connector, SetupError> {
        let tls = match tls {
            Some(config) => {
                let name = cname.unwrap_or(addr.host()).to_owned();
                let name = ServerName::try_from(name.clone()).map_err(|_| {
                    SetupError::Input(format!("{name:?} is not a name a certificate can carry"))
                })?;
                Some((TlsConnector::from(config.clone()), name))
            }
            None => None,
        };
        Ok(Connector {
            addr: addr.to_string(),
            tls,
            heard: Arc::new(AtomicU8::new(HEARD_NOTHING)),
        })
    }
}

impl tower_service::Service<Uri> for Connector {
    type Response = Io;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Io>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let failed = |failure: fn(io::Error) -> ConnectFailure| {
                move |err: io::Error| io::Error::new(err.kind(), failure(err))
            };
            // A host name is resolved here, each address tried in turn.
            let stream = TcpStream::connect(&this.addr)
                .await
                .map_err(failed(ConnectFailure::Tcp))?;
            stream.set_nodelay(true)?;
            let io = match this.tls {
                Some((connector, name)) => Either::Right(
                    connector
                        .connect(name, stream)
                        .await
                        .map_err(failed(ConnectFailure::Tls))?,
                ),
                None => Either::Left(Sniff {
                    inner: stream,
                    first: true,
                    heard: this.heard,
                }),
            };
            Ok(TokioIo::new(BatchedWrites::new(io)))
        })
    }
}

/// A plaintext stream that notes whether the server's first bytes are a
/// TLS record (an alert or a handshake), which is how a TLS server answers
/// an HTTP/2 preface: the one sure sign that plaintext met TLS.
struct Sniff<S> {
    inner: S,
    first: bool,
    heard: Arc<AtomicU8>,
}

/// What a plaintext connection first heard: nothing yet, a TLS record, or
/// anything else (HTTP/2, presumably).
const HEARD_NOTHING: u8 = 0;
const HEARD_TLS: u8 = 1;
const HEARD_OTHER: u8 = 2;

/// TLS record types a server sends first: alert (21) and handshake (22);
/// then the major version byte, 3.
const TLS_ALERT: u8 = 21;
const TLS_HANDSHAKE: u8 = 22;
const TLS_MAJOR_VERSION: u8 = 3;

impl<S: AsyncRead + Unpin> AsyncRead for Sniff<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        ready!(Pin::new(&mut self.inner).poll_read(cx, buf))?;
        let read = &buf.filled()[before..];
        if self.first && !read.is_empty() {
            let tls = matches!(read[0], TLS_ALERT | TLS_HANDSHAKE)
                && read.get(1).is_none_or(|&b| b == TLS_MAJOR_VERSION);
            self.heard
                .store(if tls { HEARD_TLS } else { HEARD_OTHER }, Ordering::Relaxed);
            self.first = false;
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Sniff<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
