//! HTTP/2 below the generated client: a frame-by-frame writer for what no
//! well-behaved client does, and calls through the `h2` crate with any path,
//! content type and body.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
};

use bytes::Bytes;
use tokio::{
    io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt},
    net::{
        TcpListener, TcpStream,
        tcp::{OwnedReadHalf, OwnedWriteHalf},
    },
    sync::Notify,
};

use crate::within;

pub const DATA: u8 = 0x0;
pub const HEADERS: u8 = 0x1;
pub const RST_STREAM: u8 = 0x3;
pub const SETTINGS: u8 = 0x4;
pub const PING: u8 = 0x6;
pub const GOAWAY: u8 = 0x7;
pub const WINDOW_UPDATE: u8 = 0x8;
pub const CONTINUATION: u8 = 0x9;

pub const END_STREAM: u8 = 0x1;
pub const ACK: u8 = 0x1;
pub const END_HEADERS: u8 = 0x4;

pub const FRAME_SIZE_ERROR: u32 = 0x6;
pub const REFUSED_STREAM: u32 = 0x7;
pub const CANCEL: u32 = 0x8;
pub const ENHANCE_YOUR_CALM: u32 = 0xb;

/// One frame read from the server.
#[derive(Debug)]
pub struct Frame {
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
    pub payload: Vec<u8>,
}

impl Frame {
    /// The error code of a RST_STREAM or GOAWAY frame.
    pub fn error_code(&self) -> u32 {
        let at = match self.kind {
            RST_STREAM => 0,
            GOAWAY => 4,
            other => panic!("frame type {other} carries no error code"),
        };
        u32::from_be_bytes(self.payload[at..at + 4].try_into().unwrap())
    }
}

/// An HTTP/2 connection driven one frame at a time.
pub struct RawConn {
    tcp: TcpStream,
}

impl RawConn {
    /// Connects, exchanges the preface and settings, and acknowledges the
    /// server's settings, so that its limits are in force from here on.
    pub async fn connect(addr: SocketAddr) -> RawConn {
        let tcp = TcpStream::connect(addr).await.expect("connect");
        let mut conn = RawConn { tcp };
        conn.tcp
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .unwrap();
        conn.send(SETTINGS, 0, 0, &[]).await.unwrap();
        let settings = conn
            .next_where(|f| f.kind == SETTINGS && f.flags & ACK == 0)
            .await
            .expect("server settings");
        assert_eq!(settings.stream, 0);
        conn.send(SETTINGS, ACK, 0, &[]).await.unwrap();
        conn
    }

    pub async fn send(
        &mut self,
        kind: u8,
        flags: u8,
        stream: u32,
        payload: &[u8],
    ) -> std::io::Result<()> {
        write_frame(&mut self.tcp, kind, flags, stream, payload).await
    }

    /// Opens `stream` with a gRPC request for `path`, leaving it open.
    pub async fn open(&mut self, stream: u32, path: &str) -> std::io::Result<()> {
        let headers = request_headers(path, "application/grpc");
        self.send(HEADERS, END_HEADERS, stream, &headers).await
    }

    /// The next frame, or `None` when the server has closed the connection.
    pub async fn read(&mut self) -> Option<Frame> {
        read_frame(&mut self.tcp).await
    }

    /// Ends the connection from this side, as a client process that exits
    /// does (TCP FIN), without an HTTP/2 word: streams still open are left
    /// open.
    pub async fn close_write(&mut self) -> std::io::Result<()> {
        self.tcp.shutdown().await
    }

    /// Halves that read and write independently (from two tasks).
    pub fn split(self) -> (RawReader, RawWriter) {
        let (read, write) = self.tcp.into_split();
        (RawReader { tcp: read }, RawWriter { tcp: write })
    }

    /// Reads until a frame matching `wanted` (returned), or the end of the
    /// connection (`None`).
    pub async fn next_where(&mut self, wanted: impl Fn(&Frame) -> bool) -> Option<Frame> {
        within("a frame from the server", async {
            while let Some(frame) = self.read().await {
                if wanted(&frame) {
                    return Some(frame);
                }
            }
            None
        })
        .await
    }
}

/// The reading half of a [`RawConn`].
pub struct RawReader {
    tcp: OwnedReadHalf,
}

impl RawReader {
    /// The next frame, or `None` when the server has closed the connection.
    pub async fn read(&mut self) -> Option<Frame> {
        read_frame(&mut self.tcp).await
    }
}

/// The writing half of a [`RawConn`].
pub struct RawWriter {
    tcp: OwnedWriteHalf,
}

impl RawWriter {
    pub async fn send(
        &mut self,
        kind: u8,
        flags: u8,
        stream: u32,
        payload: &[u8],
    ) -> std::io::Result<()> {
        write_frame(&mut self.tcp, kind, flags, stream, payload).await
    }
}

async fn write_frame(
    tcp: &mut (impl AsyncWrite + Unpin),
    kind: u8,
    flags: u8,
    stream: u32,
    payload: &[u8],
) -> std::io::Result<()> {
    let len = payload.len() as u32;
    let mut frame = Vec::with_capacity(9 + payload.len());
    frame.extend_from_slice(&len.to_be_bytes()[1..]);
    frame.push(kind);
    frame.push(flags);
    frame.extend_from_slice(&stream.to_be_bytes());
    frame.extend_from_slice(payload);
    tcp.write_all(&frame).await
}

async fn read_frame(tcp: &mut (impl AsyncRead + Unpin)) -> Option<Frame> {
    let mut head = [0u8; 9];
    if tcp.read_exact(&mut head).await.is_err() {
        return None;
    }
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let mut payload = vec![0; len];
    if tcp.read_exact(&mut payload).await.is_err() {
        return None;
    }
    Some(Frame {
        kind: head[3],
        flags: head[4],
        stream: u32::from_be_bytes(head[5..9].try_into().unwrap()) & 0x7fff_ffff,
        payload,
    })
}

/// A request header block, HPACK-encoded as literals without indexing or
/// Huffman coding (simple, and valid for any decoder).
pub fn request_headers(path: &str, content_type: &str) -> Vec<u8> {
    let mut block = Vec::new();
    for (name, value) in [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", "localhost"),
        ("content-type", content_type),
        ("te", "trailers"),
    ] {
        push_literal(&mut block, name.as_bytes(), value.as_bytes());
    }
    block
}

/// Appends one header as "literal without indexing, new name".
pub fn push_literal(block: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    block.push(0x00);
    push_string(block, name);
    push_string(block, value);
}

fn push_string(block: &mut Vec<u8>, text: &[u8]) {
    // An HPACK integer with a 7-bit prefix (the top bit, Huffman, is 0).
    let mut len = text.len();
    if len < 127 {
        block.push(len as u8);
    } else {
        block.push(127);
        len -= 127;
        while len >= 128 {
            block.push((len % 128) as u8 | 0x80);
            len /= 128;
        }
        block.push(len as u8);
    }
    block.extend_from_slice(text);
}

/// A gRPC length-prefixed message (uncompressed).
pub fn grpc_frame(message: &[u8]) -> Vec<u8> {
    let mut frame = vec![0];
    frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
    frame.extend_from_slice(message);
    frame
}

/// What a call made through [`h2_call`] ended with.
#[derive(Debug)]
pub struct Outcome {
    pub http_status: http::StatusCode,
    /// `grpc-status`, from the response headers (trailers-only) or trailers.
    pub grpc_status: Option<i32>,
}

/// Makes one call with the `h2` crate on a fresh connection: `path`, a
/// `content_type` and a raw request `body`, all chosen by the caller.
pub async fn h2_call(addr: SocketAddr, path: &str, content_type: &str, body: Vec<u8>) -> Outcome {
    within("a raw call", async {
        let (response, mut send) = h2_open(addr, path, &[("content-type", content_type)]).await;
        send.send_data(Bytes::from(body), true).unwrap();
        outcome(response).await
    })
    .await
}

/// Opens a call with the `h2` crate on a fresh connection, with `headers`
/// (`te: trailers` is added); the caller sends the body.
pub async fn h2_open(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> (h2::client::ResponseFuture, h2::SendStream<Bytes>) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    let mut client = client.ready().await.unwrap();
    let mut request = http::Request::post(format!("http://{addr}{path}")).header("te", "trailers");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    client
        .send_request(request.body(()).unwrap(), false)
        .unwrap()
}

/// Reads a response to its end: the HTTP status and the gRPC status.
pub async fn outcome(response: h2::client::ResponseFuture) -> Outcome {
    let response = response.await.unwrap();
    let http_status = response.status();
    let grpc_status = |headers: &http::HeaderMap| {
        headers
            .get("grpc-status")
            .map(|v| v.to_str().unwrap().parse::<i32>().unwrap())
    };
    if let Some(status) = grpc_status(response.headers()) {
        return Outcome {
            http_status,
            grpc_status: Some(status),
        };
    }
    let mut body = response.into_body();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.unwrap();
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    let trailers = body.trailers().await.unwrap();
    Outcome {
        http_status,
        grpc_status: trailers.as_ref().and_then(grpc_status),
    }
}

/// One frame the server sent: type, flags, stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sent {
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
}

/// A TCP proxy to the server that records the frames the server sends on
/// the connections made through it, and counts the connections.
pub struct Recorder {
    pub addr: SocketAddr,
    frames: Arc<Mutex<Vec<Sent>>>,
    connections: Arc<AtomicUsize>,
    /// Woken for every frame recorded.
    recorded: Arc<Notify>,
}

impl Recorder {
    pub async fn start(server: SocketAddr) -> Recorder {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let frames = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let notify = Arc::new(Notify::new());
        let (recorded, counted, woken) = (frames.clone(), connections.clone(), notify.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::AcqRel);
                let server = TcpStream::connect(server).await.unwrap();
                let (mut client_read, mut client_write) = client.into_split();
                let (mut server_read, mut server_write) = server.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
                    let _ = server_write.shutdown().await;
                });
                let (recorded, woken) = (recorded.clone(), woken.clone());
                tokio::spawn(async move {
                    // The server's side starts with a frame (its SETTINGS).
                    let mut head = [0u8; 9];
                    while server_read.read_exact(&mut head).await.is_ok() {
                        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
                        let mut payload = vec![0; len];
                        if server_read.read_exact(&mut payload).await.is_err() {
                            break;
                        }
                        recorded.lock().unwrap().push(Sent {
                            kind: head[3],
                            flags: head[4],
                            stream: u32::from_be_bytes(head[5..9].try_into().unwrap())
                                & 0x7fff_ffff,
                        });
                        woken.notify_waiters();
                        if client_write.write_all(&head).await.is_err()
                            || client_write.write_all(&payload).await.is_err()
                        {
                            break;
                        }
                    }
                });
            }
        });
        Recorder {
            addr,
            frames,
            connections,
            recorded: notify,
        }
    }

    /// Connections made through the proxy so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Acquire)
    }

    /// Waits until the server has sent `count` frames of `kind` in all.
    pub async fn wait_for(&self, kind: u8, count: usize) {
        within("frames from the server", async {
            loop {
                let recorded = self.recorded.notified();
                let mut recorded = std::pin::pin!(recorded);
                // Registered before the check, so a frame in between is seen.
                recorded.as_mut().enable();
                if self.count(kind) >= count {
                    return;
                }
                recorded.await;
            }
        })
        .await
    }

    /// The frames sent on `stream` (of every connection through the proxy)
    /// that belong to the response: HEADERS, DATA and RST_STREAM.
    pub fn response_frames(&self, stream: u32) -> Vec<Sent> {
        self.frames
            .lock()
            .unwrap()
            .iter()
            .filter(|f| f.stream == stream && matches!(f.kind, DATA | HEADERS | RST_STREAM))
            .copied()
            .collect()
    }

    pub fn count(&self, kind: u8) -> usize {
        self.frames
            .lock()
            .unwrap()
            .iter()
            .filter(|f| f.kind == kind)
            .count()
    }
}
