//! What a call knows of its connection, given as tonic's own server gives
//! it: a [`TcpConnectInfo`] in every request's extensions and, on a TLS
//! connection, a [`TlsConnectInfo`] too. So `Request::remote_addr()`,
//! `local_addr()` and, under mutual TLS, `peer_certs()` work in handlers as
//! they do under tonic's server.

use std::net::SocketAddr;

use tokio_rustls::server::TlsStream;
use tonic::transport::server::{Connected, TcpConnectInfo, TlsConnectInfo};

/// A connection's addresses and, with TLS, the client's certificates.
/// Cheap to clone: every call on the connection gets a copy.
#[derive(Debug, Clone)]
pub struct ConnectInfo {
    client: SocketAddr,
    tcp: TcpConnectInfo,
    tls: Option<TlsConnectInfo<TcpConnectInfo>>,
}

impl ConnectInfo {
    /// The info of a plaintext connection from `client`.
    pub(super) fn plain(
        client: SocketAddr,
        io: &impl Connected<ConnectInfo = TcpConnectInfo>,
    ) -> Self {
        ConnectInfo {
            client,
            tcp: io.connect_info(),
            tls: None,
        }
    }

    /// The info of a TLS connection from `client`, once its handshake is
    /// done.
    pub(super) fn tls<IO: Connected<ConnectInfo = TcpConnectInfo>>(
        client: SocketAddr,
        io: &TlsStream<IO>,
    ) -> Self {
        let tls = io.connect_info();
        ConnectInfo {
            client,
            tcp: tls.get_ref().clone(),
            tls: Some(tls),
        }
    }

    /// The info of a connection from `client` that is not a socket (a
    /// test's in-memory pipe).
    #[cfg(test)]
    pub(super) fn of(client: SocketAddr) -> Self {
        ConnectInfo {
            client,
            tcp: TcpConnectInfo {
                local_addr: None,
                remote_addr: Some(client),
            },
            tls: None,
        }
    }

    /// The client's address, as `accept` gave it.
    pub fn client(&self) -> SocketAddr {
        self.client
    }

    /// The server's address of the connection.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.tcp.local_addr()
    }

    /// Whether the connection is TLS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Puts the info in a request's extensions, as tonic's server does:
    /// the TCP info always, the TLS info as well on a TLS connection.
    pub(super) fn add_to(&self, extensions: &mut http::Extensions) {
        extensions.insert(self.tcp.clone());
        if let Some(tls) = &self.tls {
            extensions.insert(tls.clone());
        }
    }
}

/// The client's address of a request the transport served, from its
/// extensions; `None` for a request that came another way.
pub fn client_addr(extensions: &http::Extensions) -> Option<SocketAddr> {
    extensions.get::<TcpConnectInfo>()?.remote_addr()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_carries_what_tonic_reads() {
        let remote: SocketAddr = "192.0.2.7:40000".parse().unwrap();
        let local: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        let info = ConnectInfo {
            client: remote,
            tcp: TcpConnectInfo {
                local_addr: Some(local),
                remote_addr: Some(remote),
            },
            tls: None,
        };
        let mut request = http::Request::new(());
        assert_eq!(client_addr(request.extensions()), None);
        info.add_to(request.extensions_mut());
        assert_eq!(client_addr(request.extensions()), Some(remote));
        let request = tonic::Request::from_http(request);
        assert_eq!(request.remote_addr(), Some(remote));
        assert_eq!(request.local_addr(), Some(local));
        assert!(request.peer_certs().is_none());
    }
}
