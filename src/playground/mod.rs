//! The playground: a page, served on the gRPC port itself, where a learner
//! makes real calls of all four patterns and watches them happen.
//!
//! # How it is served
//!
//! - **Same port, per connection.** The transport tells the protocols apart
//!   (`Accepted::run` in `transport/listener.rs`): under TLS by ALPN (`h2`
//!   is gRPC, `http/1.1` is the playground, over HTTPS); in plaintext by
//!   the first bytes, read within the handshake timeout (the HTTP/2
//!   preface is gRPC and is replayed to h2; anything else is HTTP/1.1).
//!   Every connection counts against `--max-connections`; an HTTP/1.1
//!   connection must send its first request head by the handshake
//!   deadline, and is closed after the connection idle limit without a
//!   request. With `--playground false` no byte is read ahead of h2 and
//!   the port is gRPC only, as before.
//! - **The page** (`assets/`): plain HTML, CSS and JavaScript modules,
//!   compiled into the binary, served by hyper's HTTP/1.1 server
//!   (`http.rs`) with a Content-Security-Policy that allows only the
//!   page's own files (no inline script or style) and `nosniff`.
//! - **One WebSocket per tab** (`/ws`), accepted only from the page's own
//!   origin: the `Origin` header must be the scheme, host and port the
//!   request came to (403 otherwise, and when it is missing), so that a page
//!   on another site cannot drive the playground on a learner's machine;
//!   on a loopback address the host must also be a loopback name
//!   (`localhost`, `127.0.0.1`, `[::1]`), which a site that points its own
//!   name at 127.0.0.1 does not have.
//! - **Real calls only** (`session.rs`, `call.rs`): each WebSocket has an
//!   in-memory HTTP/2 connection into this server's own connection
//!   handling ([`crate::transport::Loopback`]), served like any other:
//!   the call guard and its limits, the token, metrics, traces and logs
//!   apply, and each call carries the browser's address as its client.
//!   The bridge calls only this server's services (UserService, health,
//!   reflection v1) and names no host: it is not a proxy.
//! - **JSON and protobuf** (`schema.rs`) with prost-reflect, over the
//!   descriptor sets reflection serves; the page's method list, types and
//!   comments come from them. A request message is checked against its
//!   type before anything is sent, and a mistake is named by field.
//! - **Described as reflection is** (`describe.rs`). Without a token the
//!   `hello` carries the catalogue. With `--auth-token-file` it carries
//!   none, since reflection, which serves the same, needs the token: the
//!   page asks for the token and sends `describe`, and the bridge makes a
//!   real reflection call (`list_services`) with the page's metadata; the
//!   catalogue goes to the page only when that call succeeds. Until then
//!   a request that does not fit its type is refused without naming its
//!   fields. Health and the calls themselves are as for any client:
//!   health is open, every other call needs the token.
//! - **Bounded everywhere.** Between each call's response stream and the
//!   WebSocket there is a bounded queue ([`EVENT_QUEUE`]); when it is full
//!   the call stops reading its HTTP/2 stream, whose flow control then
//!   holds the handler back: a tab that reads slowly makes the server
//!   wait, never buffer. The limits below are each a constant.
//!
//! # The WebSocket protocol
//!
//! Text messages, each one JSON object with a `type`. From the page:
//!
//! - `{"type": "start", "id": 1, "method": "grpcUser.UserService/AddUser",
//!   "metadata": {"x-demo": "1"}, "timeout_ms": 5000, "message": {...}}`
//!   starts a call; `id` is the page's name for it (a number, unique among
//!   its open calls). `metadata` and `timeout_ms` (sent as `grpc-timeout`)
//!   are optional. For unary and server-streaming methods `message` is the
//!   one request and the bridge half-closes after it; for client-streaming
//!   and bidirectional methods it is optional (a first message).
//! - `{"type": "send", "id": 1, "message": {...}}` sends one more request
//!   message (streaming requests only).
//! - `{"type": "end", "id": 1}` half-closes the request stream.
//! - `{"type": "cancel", "id": 1}` cancels the call (`RST_STREAM(CANCEL)`);
//!   it ends with `CANCELLED`.
//! - `{"type": "describe", "id": 2, "metadata": {"authorization": "Bearer
//!   TOKEN"}}` asks for the catalogue through a reflection call
//!   (`grpc.reflection.v1.ServerReflection/ServerReflectionInfo`,
//!   `list_services`) that carries `metadata`; `id` as for a call. One at
//!   a time: the next command is read once it has its answer.
//!
//! To the page: `{"type": "hello", "auth", "tls", "limits", "catalogue"?}`
//! first: whether calls need the token, whether the page came over TLS,
//! the limits, and, when no token is needed, `catalogue` (the services,
//! their methods and messages, with the proto's comments). A describe gets
//! `{"type": "catalogue", "id", "catalogue"}` (the services reflection
//! listed) when its reflection call succeeds, then that call's `status`
//! (below): `UNAUTHENTICATED` and no catalogue without the right token.
//! Then for each call, in order, with `t_ms` (milliseconds since the call
//! started) and `size` (bytes on the wire: a gRPC message with its 5-byte
//! prefix; a header block as HTTP/2 counts its size, name and value plus
//! 32 a field):
//!
//! - `{"type": "sent", "id", "part": "headers" | "message" | "end", ...}`:
//!   the request's headers (`metadata`), each message (`message`, as
//!   sent), the half-close;
//! - `{"type": "received", "id", "part": "headers" | "message" |
//!   "trailers", ...}`: the response's headers, each message, trailers;
//! - `{"type": "status", "id", "code": 5, "code_name": "NOT_FOUND",
//!   "message", "details": [...]}`: the end of the call, with the error
//!   details decoded (`google.rpc.BadRequest`, with its `@type`); a call
//!   ended by the page's cancel or by its deadline on the bridge's side
//!   has `"local": true`;
//! - `{"type": "error", "id"?, "error", "field"?}`: a command that could
//!   not be carried out (bad JSON, unknown method, a request message that
//!   does not fit its type: `field` names the field, once the page may
//!   see the types), and nothing was sent. The WebSocket and its other calls go on. Frames that break
//!   the WebSocket protocol itself (or exceed its limits) close that
//!   WebSocket with a close code and reason (1002, 1007, 1009); the
//!   server and its other connections go on.
//!
//! `docs/playground.md` has the same, with examples.

mod assets;
mod call;
mod describe;
mod http;
mod schema;
mod session;

use std::{fmt, sync::Arc, time::Duration};

use serde_json::Value;

use crate::transport::Http1Connection;

pub use http::WEBSOCKET_PATH;
pub use schema::{Invalid, Schema};

/// Calls open at once on one WebSocket. A page keeps two open for itself
/// (the health watch and the live feed) and the learner rarely more than
/// a few; each holds an HTTP/2 stream and a queue, so a script on the
/// WebSocket cannot open thousands. Past it, a start gets an error.
pub const MAX_CALLS_PER_WEBSOCKET: usize = 16;

/// Largest WebSocket message (and frame) from the page: one command with
/// one request message in JSON. A user is well under 1 KiB; 64 KiB leaves
/// room for metadata and long strings, and bounds what one connection
/// makes the server hold. Past it the WebSocket is closed with 1009.
pub const MAX_WEBSOCKET_MESSAGE: usize = 64 * 1024;

/// Largest WebSocket frame from the page: browsers send a message as one
/// frame, so the message limit.
pub const MAX_WEBSOCKET_FRAME: usize = MAX_WEBSOCKET_MESSAGE;

/// A WebSocket with no call open that has had nothing from its page for
/// this long is closed (1001, "idle"): a tab left open holds a connection
/// and a task. The page reconnects when the learner comes back. The
/// connection idle limit (`--max-connection-idle`) applies when shorter.
pub const WEBSOCKET_IDLE: Duration = Duration::from_secs(5 * 60);

/// Events (headers, messages, statuses) queued for one WebSocket, all its
/// calls together. When the tab reads slowly this fills, and each call
/// stops reading its response stream (HTTP/2 flow control then holds the
/// handler): at most this many events, a few KiB each, wait per tab.
pub const EVENT_QUEUE: usize = 64;

/// Request messages from the page waiting, per call, for the server to
/// take them (HTTP/2 flow control). A learner clicks Send a few times; a
/// script that sends faster than the handler reads gets an error instead
/// of the server buffering.
pub const SEND_QUEUE: usize = 16;

/// Longest one write to the WebSocket may wait for the browser. A tab that
/// reads nothing for this long (a dead connection, a frozen tab) is
/// dropped, with its calls, as a gRPC client that answers no keepalive
/// ping is.
pub const WEBSOCKET_SEND_TIMEOUT: Duration = Duration::from_secs(60);

/// Metadata a call from the page may carry, names and values together:
/// well within the server's header list limit (16 KiB by default).
pub const MAX_METADATA_BYTES: usize = 8 * 1024;

/// How long after its deadline the bridge gives up on a call whose server
/// has not ended it: the server ends it with `DEADLINE_EXCEEDED` at the
/// deadline, and this lets its trailers arrive first.
pub const DEADLINE_GRACE: Duration = Duration::from_secs(1);

/// The deadline of a describe's reflection call, sent as `grpc-timeout`.
/// The server lists its services at once; this bounds how long a session,
/// which reads the page's next command once the answer is in, waits for a
/// server that is overloaded or shutting down.
pub const DESCRIBE_TIMEOUT: Duration = Duration::from_secs(10);

/// The playground's setting: whether it is served at all.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct PlaygroundConfig {
    /// Serve the playground (a page to try every call, and its WebSocket)
    /// to HTTP/1.1 clients on the gRPC port; `false`: gRPC only.
    #[arg(
        long = "playground",
        value_name = "BOOL",
        env = "USER_SERVICE_PLAYGROUND",
        default_value_t = true,
        action = clap::ArgAction::Set
    )]
    pub enabled: bool,
}

impl Default for PlaygroundConfig {
    fn default() -> Self {
        crate::flags::defaults()
    }
}

/// The playground of one server. Cheap to clone.
#[derive(Clone)]
pub struct Playground {
    shared: Arc<Shared>,
}

struct Shared {
    schema: Schema,
    /// The services as the page shows them, built once for the `hello`;
    /// `None` when calls need the token (a describe builds it).
    catalogue: Option<Value>,
    /// Whether calls need the bearer token (the page asks for it).
    auth: bool,
    /// The largest gRPC message the server sends; larger is refused.
    max_message_size: usize,
}

impl fmt::Debug for Playground {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Playground")
            .field("auth", &self.shared.auth)
            .finish_non_exhaustive()
    }
}

impl Playground {
    /// The playground of a server whose calls need a token when `auth`, and
    /// whose messages are at most `max_message_size` bytes.
    pub fn new(auth: bool, max_message_size: usize) -> Self {
        let schema = Schema::build();
        let catalogue = (!auth).then(|| schema.catalogue(|_| true));
        Playground {
            shared: Arc::new(Shared {
                schema,
                catalogue,
                auth,
                max_message_size,
            }),
        }
    }

    /// Serves one HTTP/1.1 connection: the page, and its WebSocket.
    pub async fn serve_connection(&self, connection: Http1Connection) {
        http::serve(self.clone(), connection).await;
    }

    fn schema(&self) -> &Schema {
        &self.shared.schema
    }
}
