//! The access log (`--access-log`): one line per call as it ends, in the
//! log's format (`--log-format`, text or JSON), from what `calls` observes
//! of every call anyway: its method, the client's address, its status, how
//! long it took and how many messages went each way.
//!
//! A line is a `tracing` event with the target [`TARGET`] and the message
//! `call`, whose fields are:
//!
//! | field | what |
//! | --- | --- |
//! | `method` | `grpcUser.UserService/AddUser`: the request's path, less its `/` (a path the server does not serve too, answered `UNIMPLEMENTED`) |
//! | `peer` | the client's address and port |
//! | `grpc_code` | the status the client got, as grpc-go names it (`OK`, `NotFound`, `Canceled` for a call that ended without one) |
//! | `duration_ms` | from the request's head to the call's end, in milliseconds (to the microsecond) |
//! | `messages_in`, `messages_out` | gRPC messages received and sent |

use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tonic::Code;

/// The `tracing` target of access log lines.
pub const TARGET: &str = "user_service::access";

/// What the access log keeps of one call until its end.
#[derive(Debug)]
pub(super) struct Entry {
    method: String,
    peer: Option<SocketAddr>,
    pub(super) received: Arc<AtomicU64>,
    pub(super) sent: Arc<AtomicU64>,
}

impl Entry {
    /// A call to `path` from `peer`.
    pub(super) fn new(path: &str, peer: Option<SocketAddr>) -> Self {
        Entry {
            method: path.strip_prefix('/').unwrap_or(path).to_owned(),
            peer,
            received: Arc::default(),
            sent: Arc::default(),
        }
    }

    /// Writes the call's line: it ended with `code` (named `code_name`)
    /// after `elapsed`.
    pub(super) fn log(&self, code_name: &str, elapsed: Duration) {
        // Whole microseconds, shown as milliseconds: `0.421`, not a float's
        // seventeen digits.
        let duration_ms = elapsed.as_micros() as f64 / 1000.0;
        tracing::info!(
            target: TARGET,
            method = %self.method,
            peer = self.peer.map(tracing::field::display),
            grpc_code = %code_name,
            duration_ms,
            messages_in = self.received.load(Ordering::Relaxed),
            messages_out = self.sent.load(Ordering::Relaxed),
            "call"
        );
    }
}

/// grpc-go's name of `code` (`codes.Code.String()`), as the metrics' and
/// the access log's `grpc_code` say it.
pub fn code_name(code: Code) -> &'static str {
    CODE_NAMES.get(code as usize).copied().unwrap_or("Unknown")
}

/// grpc-go's names of the status codes, by code.
pub(super) const CODE_NAMES: [&str; 17] = [
    "OK",
    "Canceled",
    "Unknown",
    "InvalidArgument",
    "DeadlineExceeded",
    "NotFound",
    "AlreadyExists",
    "PermissionDenied",
    "ResourceExhausted",
    "FailedPrecondition",
    "Aborted",
    "OutOfRange",
    "Unimplemented",
    "Internal",
    "Unavailable",
    "DataLoss",
    "Unauthenticated",
];
