//! A handler that panics, or whose response stream panics: the call ends
//! with `INTERNAL`, as under a catch-panic layer on tonic's server, rather
//! than with its stream reset (which clients report as `CANCELLED`, as if
//! they had given up). The panic is logged with the call's client and
//! method, and counted; the connection and the server go on.

use std::{any::Any, net::SocketAddr};

use http::uri::PathAndQuery;
use tonic::Status;

use crate::{
    gauges::Gauges,
    transport::{client_addr, panic_message},
};

/// What a panic in a call is reported with: who called what, and where
/// it is counted.
#[derive(Debug)]
pub(super) struct Caught {
    client: Option<SocketAddr>,
    path: Option<PathAndQuery>,
    gauges: Gauges,
}

impl Caught {
    pub(super) fn of<B>(request: &http::Request<B>, gauges: &Gauges) -> Self {
        Caught {
            client: client_addr(request.extensions()),
            path: request.uri().path_and_query().cloned(),
            gauges: gauges.clone(),
        }
    }

    /// Logs and counts `panic`; returns the status the call ends with.
    pub(super) fn report(&self, panic: &(dyn Any + Send)) -> Status {
        self.gauges.count_panicked_call();
        tracing::error!(
            client.address = self
                .client
                .map(|client| tracing::field::display(client.ip())),
            client.port = self.client.map(|client| client.port()),
            method = self.path.as_ref().map_or("", PathAndQuery::path),
            panic = panic_message(panic),
            "a call's handler panicked; the call ends with INTERNAL"
        );
        internal()
    }
}

/// What the client of a call whose handler panicked sees: nothing of the
/// panic itself, which is for the log.
pub(super) fn internal() -> Status {
    Status::internal("internal server error")
}
