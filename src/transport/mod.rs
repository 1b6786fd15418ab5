//! HTTP/2 serving, on the `h2` crate directly.
//!
//! tonic's own server runs on hyper, which hides settings this server needs
//! to choose (h2's budget for small DATA frames, above all) and resets a
//! stream whenever a reply ends before the request does. So the server
//! accepts connections and drives HTTP/2 itself, and hands each call to the
//! tonic services as a plain `tower` service:
//!
//! - `listener`: the accept loop, TLS, and connection tasks until shutdown;
//!   where each connection's protocol is chosen: HTTP/2 for gRPC, or
//!   HTTP/1.1 for the playground (`crate::playground`), by ALPN or, in
//!   plaintext, by the first bytes (`sniff`).
//! - `loopback`: in-memory HTTP/2 connections served like the others, for
//!   the playground's calls.
//! - `connect_info`: the connection's addresses and client certificates,
//!   in every request's extensions as tonic's server puts them.
//! - `connection`: one HTTP/2 connection: settings, its calls (in its own
//!   task when they finish at once, each in a task of its own otherwise),
//!   going away when idle, old or shut down.
//! - `keepalive`: pings once the connection has read nothing for an
//!   interval, and the count of what it reads.
//! - `stream`: one call: the request body under flow control, the reply,
//!   and the rest of the request read after the reply.
//! - `tls`: rustls settings from PEM files.
//! - `config`: the settings above, each with its flag and default.

mod config;
mod connect_info;
mod connection;
mod keepalive;
mod listener;
mod loopback;
mod sniff;
mod stats;
mod stream;
#[cfg(test)]
mod testing;
mod tls;

use std::{any::Any, convert::Infallible, net::SocketAddr, time::Duration};

use bytes::Bytes;
use http_body::Body;
use tokio::{
    io::{AsyncRead, AsyncWrite},
    time::Instant,
};
use tokio_util::sync::CancellationToken;
use tower_service::Service;

pub use config::{
    HANDSHAKE_TIMEOUT, Http2Config, KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT, MAX_CONCURRENT_STREAMS,
    MAX_CONNECTION_AGE, MAX_CONNECTION_AGE_GRACE, MAX_CONNECTION_IDLE, MAX_CONNECTIONS,
    MAX_HEADER_LIST_SIZE, MAX_LOCAL_ERROR_RESET_STREAMS, TransportConfig,
};
pub use connect_info::{ConnectInfo, client_addr};
pub use listener::serve;
pub use loopback::Loopback;
pub use sniff::HTTP2_PREFACE;
pub use stats::ConnectionStats;
pub use stream::{BoxError, RequestBody};
pub use tls::{TlsConfig, TlsError};

/// What the transport serves: a service that takes each call's request and
/// answers with a response whose body is `B`. It never fails: a failed call
/// is a gRPC status in its response. Every such service is one.
pub trait CallService<B>:
    Service<
        http::Request<RequestBody>,
        Response = http::Response<B>,
        Error = Infallible,
        Future: Send,
    > + Clone
    + Send
    + 'static
{
}

impl<S, B> CallService<B> for S where
    S: Service<
            http::Request<RequestBody>,
            Response = http::Response<B>,
            Error = Infallible,
            Future: Send,
        > + Clone
        + Send
        + 'static
{
}

/// A response body the transport can send: bytes, and errors it can log.
pub trait ResponseBody: Body<Data = Bytes, Error: Into<BoxError> + Send> + Send + 'static {}

impl<B> ResponseBody for B where B: Body<Data = Bytes, Error: Into<BoxError> + Send> + Send + 'static
{}

/// A connection's byte stream, whatever is under it (TCP, TLS).
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin {}

impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// A connection that speaks HTTP/1.1, handed to the playground with what
/// serving it takes. Its handshake deadline holds until its first request
/// head is in; `max_idle` (the connection idle limit) applies to it as to
/// HTTP/2 connections.
pub struct Http1Connection {
    /// The stream, from its first byte (what was read to tell the
    /// protocol is replayed).
    pub io: Box<dyn Io>,
    pub client: SocketAddr,
    pub local_addr: Option<SocketAddr>,
    pub tls: bool,
    /// In-memory connections into this server, whose calls carry this
    /// connection's info.
    pub loopback: Loopback,
    pub handshake_deadline: Instant,
    pub max_idle: Option<Duration>,
    /// Cancelled when the server shuts down.
    pub stop: CancellationToken,
    pub stats: ConnectionStats,
}

/// The message of a caught panic, for its log line.
pub fn panic_message(panic: &(dyn Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(a panic without a message)")
}

/// Bytes a client may send on one call before the handler reads them: the
/// stream's initial flow-control window (hyper's default, which this server
/// used before it drove HTTP/2 itself). A connection's throughput is at
/// most a window per round trip: 1 MiB over a 20 ms path is 50 MiB/s.
pub const STREAM_WINDOW: u32 = 1024 * 1024;

/// Bytes a client may send on all the calls of a connection before their
/// handlers read them. What a connection's requests can hold in memory is
/// bounded by this window plus [`DATA_FRAME_BUDGET`].
pub const CONNECTION_WINDOW: u32 = 1024 * 1024;

/// The smallest DATA frame a real gRPC client sends at full speed: one
/// message of a few bytes (a 5-byte gRPC prefix and a 5-byte SyncUsers
/// delete of a 1-character id), one frame per message, as grpc-go writes
/// them.
pub const SMALLEST_MESSAGE_FRAME: usize = 10;

/// h2's budget for the framing overhead of DATA frames it holds for
/// handlers that have not read them yet: each frame under 256 bytes costs
/// `256 - len` (the memory of one buffered frame, whatever its payload),
/// and the connection is closed with `ENHANCE_YOUR_CALM` when the budget
/// runs out.
///
/// h2 defaults to half the connection window, which a grpc-go client cuts
/// through as soon as a handler pauses: a window of ~70-byte users costs
/// 2.7 times the window. This budget covers a full connection window of
/// [`SMALLEST_MESSAGE_FRAME`]-byte frames, so no client sending real
/// messages is ever cut off, while a flood of 1-byte frames is still cut
/// off after about 100,000 of them (~100 KB of payload). A connection's
/// buffered requests thus hold at most the window plus this budget (about
/// 26 MiB), and usually far less: handlers read as the data arrives.
pub const DATA_FRAME_BUDGET: usize =
    CONNECTION_WINDOW as usize / SMALLEST_MESSAGE_FRAME * (256 - SMALLEST_MESSAGE_FRAME);

/// Response bytes h2 may buffer per stream beyond what the client's window
/// lets out (hyper's default).
pub const MAX_SEND_BUFFER: usize = 400 * 1024;
