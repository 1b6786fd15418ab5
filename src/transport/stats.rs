//! Counts of what happened to connections, for whoever exports them (the
//! metrics endpoint) and for tests.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

/// Live and cumulative connection counts. Cheap to clone; clones share the
/// counts.
#[derive(Debug, Clone, Default)]
pub struct ConnectionStats {
    inner: Arc<Counts>,
}

#[derive(Debug, Default)]
struct Counts {
    open: AtomicU64,
    accepted: AtomicU64,
    refused: AtomicU64,
    handshake_timeouts: AtomicU64,
    idle_closed: AtomicU64,
    aged_out: AtomicU64,
    accept_errors: AtomicU64,
    panicked_calls: AtomicU64,
    panicked_connections: AtomicU64,
}

impl ConnectionStats {
    /// Connections open now (accepted and not yet closed).
    pub fn open(&self) -> u64 {
        self.inner.open.load(Ordering::Relaxed)
    }

    /// Connections accepted and served (not refused) since the start.
    pub fn accepted(&self) -> u64 {
        self.inner.accepted.load(Ordering::Relaxed)
    }

    /// Connections closed at once because `max_connections` were open.
    pub fn refused(&self) -> u64 {
        self.inner.refused.load(Ordering::Relaxed)
    }

    /// Connections closed because their handshake did not finish in time.
    pub fn handshake_timeouts(&self) -> u64 {
        self.inner.handshake_timeouts.load(Ordering::Relaxed)
    }

    /// Connections sent GOAWAY after having no call for
    /// `max_connection_idle`.
    pub fn idle_closed(&self) -> u64 {
        self.inner.idle_closed.load(Ordering::Relaxed)
    }

    /// Connections sent GOAWAY at `max_connection_age`.
    pub fn aged_out(&self) -> u64 {
        self.inner.aged_out.load(Ordering::Relaxed)
    }

    /// Failed accepts that were not about one connection (descriptors
    /// exhausted, for instance).
    pub fn accept_errors(&self) -> u64 {
        self.inner.accept_errors.load(Ordering::Relaxed)
    }

    /// Call tasks that panicked (in the transport's own code, or in a
    /// service that does not catch its handlers' panics): each stream was
    /// reset, and the connection went on.
    pub fn panicked_calls(&self) -> u64 {
        self.inner.panicked_calls.load(Ordering::Relaxed)
    }

    /// Connection tasks that panicked: each connection was closed, and the
    /// server went on.
    pub fn panicked_connections(&self) -> u64 {
        self.inner.panicked_connections.load(Ordering::Relaxed)
    }

    /// Counts a connection as open until the returned guard is dropped.
    pub(super) fn opened(&self) -> OpenConnection {
        self.inner.accepted.fetch_add(1, Ordering::Relaxed);
        self.inner.open.fetch_add(1, Ordering::Relaxed);
        OpenConnection {
            stats: self.clone(),
        }
    }

    pub(super) fn count_refused(&self) {
        self.inner.refused.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_handshake_timeout(&self) {
        self.inner
            .handshake_timeouts
            .fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn count_idle_closed(&self) {
        self.inner.idle_closed.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn count_aged_out(&self) {
        self.inner.aged_out.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn count_accept_error(&self) {
        self.inner.accept_errors.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn count_panicked_call(&self) {
        self.inner.panicked_calls.fetch_add(1, Ordering::Relaxed);
    }

    pub(super) fn count_panicked_connection(&self) {
        self.inner
            .panicked_connections
            .fetch_add(1, Ordering::Relaxed);
    }
}

/// One open connection, counted until dropped.
#[derive(Debug)]
pub(super) struct OpenConnection {
    stats: ConnectionStats,
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.stats.inner.open.fetch_sub(1, Ordering::Relaxed);
    }
}
