//! What the transport's unit tests share: a connection served over an
//! in-memory pipe as the listener would serve it, every frame the server
//! writes on it, a peer that speaks HTTP/2 frame by frame, and services
//! made of closures.

use std::{
    convert::Infallible,
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty, StreamBody, combinators::BoxBody};
use tokio::{
    io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _, DuplexStream, ReadBuf},
    task::JoinHandle,
    time::Instant,
};
use tokio_util::sync::CancellationToken;
use tower_service::Service;

use crate::batched_io::CallTasks;

use super::{
    CallService, ConnectInfo, ConnectionStats, RequestBody, TransportConfig, connection::Connection,
};

pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const PING: u8 = 0x6;
pub const GOAWAY: u8 = 0x7;
pub const WINDOW_UPDATE: u8 = 0x8;

pub const ACK: u8 = 0x1;
pub const END_STREAM: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;

/// The address the test connections come from (TEST-NET-1).
pub fn client() -> SocketAddr {
    "192.0.2.1:50000".parse().unwrap()
}

/// A response body as the tests' services build them.
pub type TestBody = BoxBody<Bytes, Infallible>;

/// A body without data or trailers: a Trailers-Only reply's.
pub fn empty() -> TestBody {
    Empty::new().boxed()
}

/// A body of `frames`, each ready at once.
pub fn frames(frames: Vec<http_body::Frame<Bytes>>) -> TestBody {
    StreamBody::new(futures::stream::iter(frames.into_iter().map(Ok))).boxed()
}

/// A gRPC reply's head: HTTP 200, `application/grpc`, and `grpc_status`
/// when it has one (a Trailers-Only reply).
pub fn head(grpc_status: Option<&str>, body: TestBody) -> http::Response<TestBody> {
    let mut response = http::Response::new(body);
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    if let Some(status) = grpc_status {
        response
            .headers_mut()
            .insert("grpc-status", status.parse().unwrap());
    }
    response
}

/// A service that answers each call with what `F` makes of its request.
#[derive(Clone)]
pub struct ServiceFn<F>(pub F);

impl<F, Fut> Service<http::Request<RequestBody>> for ServiceFn<F>
where
    F: FnMut(http::Request<RequestBody>) -> Fut,
    Fut: Future<Output = http::Response<TestBody>> + Send + 'static,
{
    type Response = http::Response<TestBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<RequestBody>) -> Self::Future {
        let response = (self.0)(request);
        Box::pin(async move { Ok(response.await) })
    }
}

/// One frame, as the server wrote it or the peer reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
    pub payload: Vec<u8>,
}

impl Frame {
    /// The error code of a RST_STREAM or GOAWAY frame.
    pub fn error_code(&self) -> u32 {
        let at = if self.kind == GOAWAY { 4 } else { 0 };
        u32::from_be_bytes(self.payload[at..at + 4].try_into().unwrap())
    }
}

/// Every frame the server has written, in order.
#[derive(Clone, Default)]
pub struct Written(Arc<Mutex<Vec<Frame>>>);

impl Written {
    /// The kinds and flags of the frames written on `stream`.
    pub fn on(&self, stream: u32) -> Vec<(u8, u8)> {
        let frames = self.0.lock().unwrap();
        let on = frames.iter().filter(|f| f.stream == stream);
        on.map(|f| (f.kind, f.flags)).collect()
    }

    /// The error codes of the RST_STREAM frames written on `stream`.
    pub fn resets(&self, stream: u32) -> Vec<u32> {
        let frames = self.0.lock().unwrap();
        let on = frames.iter().filter(|f| f.stream == stream);
        on.filter(|f| f.kind == RST_STREAM)
            .map(Frame::error_code)
            .collect()
    }

    /// How many frames of `kind` were written.
    pub fn count(&self, kind: u8) -> usize {
        self.0
            .lock()
            .unwrap()
            .iter()
            .filter(|f| f.kind == kind)
            .count()
    }
}

/// The server's end of the pipe: what it writes is parsed into frames.
struct Recorded {
    io: DuplexStream,
    unparsed: Vec<u8>,
    written: Written,
}

impl AsyncRead for Recorded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Recorded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = &mut *self;
        let written = std::task::ready!(Pin::new(&mut this.io).poll_write(cx, buf))?;
        this.unparsed.extend_from_slice(&buf[..written]);
        while let Some(frame) = parse(&mut this.unparsed) {
            this.written.0.lock().unwrap().push(frame);
        }
        Poll::Ready(Ok(written))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Takes one whole frame off the front of `bytes`, if there is one.
fn parse(bytes: &mut Vec<u8>) -> Option<Frame> {
    if bytes.len() < 9 {
        return None;
    }
    let len = u32::from_be_bytes([0, bytes[0], bytes[1], bytes[2]]) as usize;
    if bytes.len() < 9 + len {
        return None;
    }
    let frame = Frame {
        kind: bytes[3],
        flags: bytes[4],
        stream: u32::from_be_bytes(bytes[5..9].try_into().unwrap()) & 0x7fff_ffff,
        payload: bytes[9..9 + len].to_vec(),
    };
    bytes.drain(..9 + len);
    Some(frame)
}

/// A connection served by [`Connection::serve`] over an in-memory pipe.
pub struct Served {
    /// The client's end of the pipe.
    pub io: Option<DuplexStream>,
    pub written: Written,
    pub stats: ConnectionStats,
    pub task: JoinHandle<Result<(), h2::Error>>,
}

/// Serves one connection from [`client`] with `service` and `config`.
pub fn serve<S, B>(service: S, config: TransportConfig) -> Served
where
    S: CallService<B>,
    B: super::ResponseBody,
{
    let (client_end, server_end) = tokio::io::duplex(1 << 20);
    let written = Written::default();
    let io = Recorded {
        io: server_end,
        unparsed: Vec::new(),
        written: written.clone(),
    };
    let stats = ConnectionStats::default();
    let stop = CancellationToken::new();
    let task = tokio::spawn({
        let stats = stats.clone();
        async move {
            let connection = Connection {
                service,
                config: &config,
                stats: &stats,
                handshake_deadline: Instant::now() + config.handshake_timeout,
                stop,
                connect_info: ConnectInfo::of(client()),
                call_tasks: CallTasks::default(),
            };
            connection.serve(io).await
        }
    });
    Served {
        io: Some(client_end),
        written,
        stats,
        task,
    }
}

/// A client that speaks HTTP/2 frame by frame.
pub struct RawPeer {
    io: DuplexStream,
}

impl RawPeer {
    /// Sends the preface and empty SETTINGS, and acknowledges the server's.
    pub async fn handshake(io: DuplexStream) -> RawPeer {
        let mut peer = RawPeer { io };
        peer.io
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .unwrap();
        peer.send(SETTINGS, 0, 0, &[]).await;
        let settings = peer.read().await.expect("the server's SETTINGS");
        assert_eq!((settings.kind, settings.flags), (SETTINGS, 0));
        peer.send(SETTINGS, ACK, 0, &[]).await;
        peer
    }

    pub async fn send(&mut self, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
        let mut frame = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        frame.extend_from_slice(&[kind, flags]);
        frame.extend_from_slice(&stream.to_be_bytes());
        frame.extend_from_slice(payload);
        self.io.write_all(&frame).await.unwrap();
    }

    /// The next frame from the server other than the SETTINGS and
    /// WINDOW_UPDATE frames a connection exchanges on its own.
    pub async fn next(&mut self) -> Option<Frame> {
        loop {
            let frame = self.read().await?;
            if !matches!(frame.kind, SETTINGS | WINDOW_UPDATE) {
                return Some(frame);
            }
        }
    }

    /// The next frame from the server; `None` once it has closed the
    /// connection.
    pub async fn read(&mut self) -> Option<Frame> {
        let mut header = [0; 9];
        self.io.read_exact(&mut header).await.ok()?;
        let len = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
        let mut payload = vec![0; len];
        self.io.read_exact(&mut payload).await.ok()?;
        Some(Frame {
            kind: header[3],
            flags: header[4],
            stream: u32::from_be_bytes(header[5..9].try_into().unwrap()) & 0x7fff_ffff,
            payload,
        })
    }
}

/// A call on `client`: POST `path`, no body.
pub async fn call(
    client: &mut h2::client::SendRequest<Bytes>,
    path: &str,
) -> Result<http::Response<h2::RecvStream>, h2::Error> {
    let request = http::Request::post(path).body(()).unwrap();
    let (response, _) = client.send_request(request, true)?;
    response.await
}

/// Waits until `done` holds, letting the other tasks run in between (the
/// tests run on one thread): for counts that move in a task of the
/// server's after the client has seen the outcome. Fails the test after
/// 30 s.
pub async fn until(done: impl Fn() -> bool) {
    let waited = tokio::time::timeout(std::time::Duration::from_secs(30), async {
        while !done() {
            tokio::task::yield_now().await;
        }
    });
    waited.await.expect("the condition to hold");
}

/// An `h2` client on `io`, its connection driven by a task of its own.
pub async fn h2_client(io: DuplexStream) -> h2::client::SendRequest<Bytes> {
    let (client, connection) = h2::client::handshake(io).await.unwrap();
    tokio::spawn(connection);
    client.ready().await.unwrap()
}
