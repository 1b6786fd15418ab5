//! The transport's settings, each with its flag and its default: how
//! connections are accepted and kept ([`TransportConfig`]), and how each
//! HTTP/2 connection is run ([`Http2Config`]).

use std::time::Duration;

use crate::flags;

use super::{CONNECTION_WINDOW, DATA_FRAME_BUDGET, MAX_SEND_BUFFER, STREAM_WINDOW};

/// Concurrent HTTP/2 streams (calls) per connection. tonic advertises no
/// limit by default; this is far above what a load generator needs and far
/// below what would exhaust memory.
pub const MAX_CONCURRENT_STREAMS: u32 = 1024;

/// Streams a peer may make the server reset before the connection is closed:
/// h2's protection against reset floods, which tonic 0.14.3+ switches off
/// unless set. 1024 is h2's own default.
pub const MAX_LOCAL_ERROR_RESET_STREAMS: usize = 1024;

/// Largest request header block. Metadata here is a few hundred bytes.
pub const MAX_HEADER_LIST_SIZE: u32 = 16 * 1024;

/// HTTP/2 pings on idle connections find peers that vanished without closing
/// (a half-open connection would otherwise hold its streams forever).
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections open at once; past it new connections are closed as soon as
/// they are accepted. Each costs a descriptor and about 30 KB when idle (up
/// to a flow-control window and its frame budget when a client fills it):
/// far more than a fleet of clients and load balancers needs, and far
/// fewer than the descriptors the server raises its limit to.
pub const MAX_CONNECTIONS: usize = 10_000;

/// How long a new connection has to finish its handshake (TLS, the HTTP/2
/// preface and the client's SETTINGS). A real client does it in a round
/// trip or two; a socket that connects and says nothing would otherwise
/// hold a descriptor and memory for good.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// A connection with no call for this long is sent GOAWAY (gRPC's
/// MAX_CONNECTION_IDLE). Clients reconnect on their next call without an
/// error; a connection carrying a call, a SyncUsers stream say, is never
/// idle.
pub const MAX_CONNECTION_IDLE: Duration = Duration::from_secs(15 * 60);

/// A connection this old (give or take 10%) is sent GOAWAY (gRPC's
/// MAX_CONNECTION_AGE), so that clients spread over replicas added since
/// they connected. Its calls in flight go on (see
/// [`MAX_CONNECTION_AGE_GRACE`]): a long SyncUsers stream is not cut, only
/// the client's next calls move.
pub const MAX_CONNECTION_AGE: Duration = Duration::from_secs(30 * 60);

/// How long the calls of a connection sent GOAWAY for its age may go on:
/// unlimited by default, so that no stream is ended because of the age of
/// its connection. Set it to bound how long an old connection can live.
pub const MAX_CONNECTION_AGE_GRACE: Option<Duration> = None;

// The durations that 0 turns off are spelled `std::option::Option` below:
// clap takes a plain `Option` for a flag that may be left out, where these
// always have a value, 0 meaning `None`.

/// How connections are accepted, and how long they are kept. Every field
/// is a flag; `TransportConfig::default()` is their defaults.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct TransportConfig {
    /// Connections open at once; more are closed as soon as they are
    /// accepted.
    #[arg(long, env = "USER_SERVICE_MAX_CONNECTIONS", default_value_t = MAX_CONNECTIONS)]
    pub max_connections: usize,

    /// Seconds a new connection has to finish its handshake (TLS, the
    /// HTTP/2 preface and the client's SETTINGS) before it is closed.
    #[arg(
        long,
        env = "USER_SERVICE_HANDSHAKE_TIMEOUT",
        default_value = flags::seconds(HANDSHAKE_TIMEOUT),
        value_parser = flags::seconds_parser()
    )]
    pub handshake_timeout: Duration,

    /// Seconds without a call after which a connection is sent GOAWAY; 0:
    /// never.
    #[arg(
        long,
        env = "USER_SERVICE_MAX_CONNECTION_IDLE",
        default_value = flags::seconds(MAX_CONNECTION_IDLE),
        value_parser = flags::seconds_or_never_parser()
    )]
    pub max_connection_idle: std::option::Option<Duration>,

    /// Seconds (give or take 10%) after which a connection is sent GOAWAY,
    /// so that clients reconnect, perhaps to another replica; its calls go
    /// on. 0: never.
    #[arg(
        long,
        env = "USER_SERVICE_MAX_CONNECTION_AGE",
        default_value = flags::seconds(MAX_CONNECTION_AGE),
        value_parser = flags::seconds_or_never_parser()
    )]
    pub max_connection_age: std::option::Option<Duration>,

    /// Seconds the calls of a connection past its age may go on before it
    /// is closed; unset: until they end.
    #[arg(
        long,
        env = "USER_SERVICE_MAX_CONNECTION_AGE_GRACE",
        value_parser = flags::seconds_parser()
    )]
    pub max_connection_age_grace: Option<Duration>,

    #[command(flatten)]
    pub http2: Http2Config,
}

impl Default for TransportConfig {
    fn default() -> Self {
        flags::defaults()
    }
}

/// How each HTTP/2 connection is run. Every field is a flag;
/// `Http2Config::default()` is their defaults.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct Http2Config {
    /// Concurrent streams (calls) per HTTP/2 connection.
    #[arg(long, env = "USER_SERVICE_MAX_CONCURRENT_STREAMS", default_value_t = MAX_CONCURRENT_STREAMS)]
    pub max_concurrent_streams: u32,

    /// Streams a client may make the server reset before it is disconnected.
    #[arg(
        long = "max-reset-streams",
        value_name = "MAX_RESET_STREAMS",
        env = "USER_SERVICE_MAX_RESET_STREAMS",
        default_value_t = MAX_LOCAL_ERROR_RESET_STREAMS
    )]
    pub max_local_error_reset_streams: usize,

    /// Largest request header block, in bytes.
    #[arg(long, env = "USER_SERVICE_MAX_HEADER_LIST_SIZE", default_value_t = MAX_HEADER_LIST_SIZE)]
    pub max_header_list_size: u32,

    /// Seconds between keepalive pings on each connection; 0 turns pings
    /// off.
    #[arg(
        long,
        env = "USER_SERVICE_KEEPALIVE_INTERVAL",
        default_value = flags::seconds(KEEPALIVE_INTERVAL),
        value_parser = flags::seconds_or_never_parser()
    )]
    pub keepalive_interval: std::option::Option<Duration>,

    /// Seconds a keepalive ping may go unanswered before the connection is
    /// closed.
    #[arg(
        long,
        env = "USER_SERVICE_KEEPALIVE_TIMEOUT",
        default_value = flags::seconds(KEEPALIVE_TIMEOUT),
        value_parser = flags::seconds_parser()
    )]
    pub keepalive_timeout: Duration,
}

impl Default for Http2Config {
    fn default() -> Self {
        flags::defaults()
    }
}

impl Http2Config {
    /// h2's settings for a connection: these, and the windows and budgets
    /// that are constants.
    pub(super) fn builder(&self) -> h2::server::Builder {
        let mut builder = h2::server::Builder::new();
        builder
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .data_frame_budget(DATA_FRAME_BUDGET)
            .max_send_buffer_size(MAX_SEND_BUFFER)
            .max_concurrent_streams(self.max_concurrent_streams)
            .max_local_error_reset_streams(Some(self.max_local_error_reset_streams))
            .max_header_list_size(self.max_header_list_size);
        builder
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_are_the_constants() {
        let defaults = TransportConfig::default();
        assert_eq!(defaults.max_connections, MAX_CONNECTIONS);
        assert_eq!(defaults.handshake_timeout, HANDSHAKE_TIMEOUT);
        assert_eq!(defaults.max_connection_idle, Some(MAX_CONNECTION_IDLE));
        assert_eq!(defaults.max_connection_age, Some(MAX_CONNECTION_AGE));
        assert_eq!(defaults.max_connection_age_grace, MAX_CONNECTION_AGE_GRACE);
        let http2 = defaults.http2;
        assert_eq!(http2.max_concurrent_streams, MAX_CONCURRENT_STREAMS);
        assert_eq!(
            http2.max_local_error_reset_streams,
            MAX_LOCAL_ERROR_RESET_STREAMS
        );
        assert_eq!(http2.max_header_list_size, MAX_HEADER_LIST_SIZE);
        assert_eq!(http2.keepalive_interval, Some(KEEPALIVE_INTERVAL));
        assert_eq!(http2.keepalive_timeout, KEEPALIVE_TIMEOUT);
    }
}
