//! A connection whose client end is known: what a test needs to check that
//! the server names the right peer (`Request::remote_addr()`, the access
//! log, a span's `client.address`).

use std::{
    future::Future,
    net::SocketAddr,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
};

use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tonic::transport::{Channel, Endpoint};

use crate::within;

/// Connects `endpoint` (its settings: TLS, timeouts) over one TCP
/// connection to `server`, and returns the channel with the address of the
/// client's end of that connection.
pub async fn connect_noting_peer(endpoint: Endpoint, server: SocketAddr) -> (Channel, SocketAddr) {
    let dial = Dial {
        server,
        local: Arc::default(),
    };
    let channel = within("connect", endpoint.connect_with_connector(dial.clone()))
        .await
        .expect("connect");
    let peer = dial.local.lock().unwrap().expect("dialled");
    (channel, peer)
}

/// Dials `server` and remembers the client's end of the connection.
#[derive(Clone)]
struct Dial {
    server: SocketAddr,
    local: Arc<Mutex<Option<SocketAddr>>>,
}

impl tower_service::Service<http::Uri> for Dial {
    type Response = TokioIo<TcpStream>;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: http::Uri) -> Self::Future {
        let (server, local) = (self.server, self.local.clone());
        Box::pin(async move {
            let tcp = TcpStream::connect(server).await?;
            *local.lock().unwrap() = Some(tcp.local_addr()?);
            Ok(TokioIo::new(tcp))
        })
    }
}
