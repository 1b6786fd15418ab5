//! What operators see of the server: Prometheus metrics and OpenTelemetry
//! traces.
//!
//! - [`calls`]: what is recorded of each call (grpc-go's per-call metrics,
//!   an [`access`] log line, a span), by a tower layer, counting messages
//!   with `messages`.
//! - [`collect`]: the service's own figures and the process's, read at
//!   each scrape.
//! - [`Metrics`]: the registry, and the `GET /metrics` endpoint that serves
//!   it in the Prometheus text format.
//! - [`trace`]: spans exported over OTLP, or written to stderr
//!   ([`spans`]).
//!
//! All are off by default (`--metrics-addr`, `--access-log`,
//! `--otlp-endpoint`, `--trace-stderr`): then no call is recorded and no
//! span made.

pub mod access;
pub mod calls;
pub mod collect;
mod messages;
pub mod spans;
pub mod trace;

use std::{convert::Infallible, net::SocketAddr, sync::Arc, time::Duration};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode, body::Incoming};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::{encoding::prometheus_text, registry::Registry};
use tokio::net::TcpListener;

pub use calls::{ObserveCallsLayer, RpcMetrics};
pub use collect::{ProcessCollector, ServiceCollector, StoreMetrics};

/// How long a scraper has to send its request once connected.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The registry the endpoint serves, and the per-call metrics the server
/// records into it.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    pub rpc: Arc<RpcMetrics>,
}

impl Metrics {
    /// Every metric: per call, the service's (`service`), the process's.
    pub fn new(service: ServiceCollector) -> Self {
        let mut registry = Registry::default();
        let rpc = RpcMetrics::new(&mut registry);
        registry.register_collector(Box::new(service));
        registry.register_collector(Box::new(ProcessCollector));
        Metrics {
            registry: Arc::new(registry),
            rpc,
        }
    }

    /// The text exposition of every metric, as `GET /metrics` returns it.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail; the encoders only pass on
        // the writer's errors.
        let _ = prometheus_text::encode(&mut text, &self.registry);
        text
    }

    /// Serves `GET /metrics` on `listener`, until the future is dropped
    /// (which closes its connections too).
    pub async fn serve(self, listener: TcpListener) {
        let mut connections = tokio::task::JoinSet::new();
        loop {
            let (tcp, _) = tokio::select! {
                Some(_) = connections.join_next(), if !connections.is_empty() => continue,
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(err) => {
                        tracing::debug!(%err, "metrics endpoint: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            let metrics = self.clone();
            connections.spawn(async move {
                let service = hyper::service::service_fn(move |request| {
                    let metrics = metrics.clone();
                    async move { Ok::<_, Infallible>(metrics.respond(&request)) }
                });
                let served = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(REQUEST_TIMEOUT)
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
                if let Err(err) = served {
                    tracing::debug!(%err, "metrics endpoint: connection failed");
                }
            });
        }
    }

    fn respond(&self, request: &Request<Incoming>) -> Response<Full<Bytes>> {
        let (status, content_type, body) = match (request.method(), request.uri().path()) {
            (&Method::GET, "/metrics") => (
                StatusCode::OK,
                prometheus_text::CONTENT_TYPE,
                Bytes::from(self.encode()),
            ),
            (_, "/metrics") => (
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain",
                Bytes::from_static(b"GET only\n"),
            ),
            _ => (
                StatusCode::NOT_FOUND,
                "text/plain",
                Bytes::from_static(b"metrics are at /metrics\n"),
            ),
        };
        let mut response = Response::new(Full::new(body));
        *response.status_mut() = status;
        response.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static(content_type),
        );
        response
    }
}

/// Binds the metrics endpoint's address (before the server starts, so that
/// a bad address stops it).
pub async fn bind(addr: &str) -> std::io::Result<(TcpListener, SocketAddr)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    Ok((listener, local))
}
