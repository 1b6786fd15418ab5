//! One HTTP/1.1 connection of the playground: the page's files, and the
//! WebSocket handshake, which hands the connection over to a session.
//!
//! hyper parses the requests. The connection's limits are the transport's:
//! its first request head must be in by the handshake deadline, and it is
//! closed once it has had no request for the connection idle limit. A
//! WebSocket goes on in this same task (still counted as an open
//! connection), once hyper has sent the `101` and let go of the stream.

use std::{
    convert::Infallible,
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::{body::Incoming, upgrade::OnUpgrade};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::time::Instant;

use super::{Playground, assets, session};
use crate::transport::Http1Connection;

/// Largest request head (request line and headers), as for HTTP/2's
/// header list: a browser's are a few hundred bytes.
const MAX_REQUEST_HEAD: usize = 16 * 1024;

/// What every response carries. The page's scripts and styles come from
/// its own files only (no inline script or style, nothing from another
/// site), it may open WebSockets to its own origin only, and no other site
/// may frame it.
const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; img-src 'self'; connect-src 'self'; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

/// The WebSocket endpoint's path.
pub const WEBSOCKET_PATH: &str = "/ws";

/// A WebSocket the page asked for: hyper's handle on the connection once
/// the `101` is out.
type Upgrade = OnUpgrade;

/// Serves the HTTP/1.1 connection `conn` (see the module documentation).
pub(super) async fn serve(playground: Playground, conn: Http1Connection) {
    let Http1Connection {
        io,
        client,
        local_addr,
        tls,
        loopback,
        handshake_deadline,
        max_idle,
        stop,
        stats,
    } = conn;
    let upgrade: Arc<Mutex<Option<Upgrade>>> = Arc::default();
    // When the last request arrived; none yet while `None`.
    let last_request: Arc<Mutex<Option<Instant>>> = Arc::default();
    let origin = Origin {
        scheme: if tls { "https" } else { "http" },
        loopback: local_addr.is_some_and(|addr| addr.ip().is_loopback()),
    };
    let service = {
        let (upgrade, last_request) = (upgrade.clone(), last_request.clone());
        hyper::service::service_fn(move |request| {
            *last_request.lock().expect("never held across a panic") = Some(Instant::now());
            let response = respond(request, &origin, &upgrade);
            async move { Ok::<_, Infallible>(response) }
        })
    };
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        // The deadlines below are the transport's.
        .header_read_timeout(None)
        .max_buf_size(MAX_REQUEST_HEAD);
    let connection = builder
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    tokio::pin!(connection);
    let first_request = tokio::time::sleep_until(handshake_deadline);
    let idle_limit = max_idle.unwrap_or(Duration::MAX);
    let idle = tokio::time::sleep_until(deadline_after(idle_limit));
    tokio::pin!(first_request, idle);
    let mut closing = false;
    loop {
        let requested = *last_request.lock().expect("never held across a panic");
        tokio::select! {
            served = &mut connection => {
                if let Err(err) = served {
                    tracing::debug!(
                        %err,
                        client.address = %client.ip(),
                        client.port = client.port(),
                        "playground connection ended with an error"
                    );
                }
                break;
            }
            () = &mut first_request, if requested.is_none() => {
                stats.count_handshake_timeout();
                tracing::debug!(
                    client.address = %client.ip(),
                    client.port = client.port(),
                    "no complete HTTP/1.1 request in time; closing the connection"
                );
                return;
            }
            () = &mut idle => {
                let since = requested.map_or(Instant::now(), |at| at);
                if since.elapsed() < idle_limit {
                    idle.as_mut().reset(since + idle_limit);
                    continue;
                }
                stats.count_idle_closed();
                tracing::debug!(
                    client.address = %client.ip(),
                    client.port = client.port(),
                    "playground connection idle; closing"
                );
                return;
            }
            () = stop.cancelled(), if !closing => {
                closing = true;
                connection.as_mut().graceful_shutdown();
            }
        }
    }
    let Some(upgrade) = upgrade.lock().expect("never held across a panic").take() else {
        return;
    };
    match upgrade.await {
        Ok(upgraded) => {
            let session = session::Session {
                playground,
                loopback,
                client,
                tls,
                max_idle,
                stop,
            };
            session.run(TokioIo::new(upgraded)).await;
        }
        Err(err) => tracing::debug!(%err, "WebSocket upgrade failed"),
    }
}

/// `duration` from now, or far in the future when it is too long to add.
fn deadline_after(duration: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(duration)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 24 * 3600))
}

/// What a WebSocket's `Origin` is checked against.
#[derive(Debug, Clone, Copy)]
struct Origin {
    /// The page's scheme on this connection.
    scheme: &'static str,
    /// Whether the connection came to a loopback address: then the page's
    /// host must be a loopback name, which a site that points its own name
    /// at 127.0.0.1 (DNS rebinding) does not have.
    loopback: bool,
}

/// The response to one request: a file of the page, the WebSocket
/// handshake, or an error.
fn respond(
    mut request: Request<Incoming>,
    origin: &Origin,
    upgrade: &Mutex<Option<Upgrade>>,
) -> Response<Full<Bytes>> {
    let path = request.uri().path();
    let mut response = if path == WEBSOCKET_PATH {
        match websocket_handshake(&request, origin) {
            Ok(response) => {
                *upgrade.lock().expect("never held across a panic") =
                    Some(hyper::upgrade::on(&mut request));
                response
            }
            Err((status, reason)) => {
                let mut response = refused(status, reason);
                if status == StatusCode::UPGRADE_REQUIRED {
                    response.headers_mut().insert(
                        header::SEC_WEBSOCKET_VERSION,
                        HeaderValue::from_static("13"),
                    );
                }
                response
            }
        }
    } else if let Some(asset) = assets::find(path) {
        match *request.method() {
            Method::GET | Method::HEAD => {
                let mut response = Response::new(Full::new(Bytes::from_static(asset.body)));
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static(asset.content_type),
                );
                response
            }
            _ => {
                let mut response = plain(StatusCode::METHOD_NOT_ALLOWED, "GET only\n");
                response
                    .headers_mut()
                    .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
                response
            }
        }
    } else {
        plain(
            StatusCode::NOT_FOUND,
            "not found: the playground is at /, and gRPC (HTTP/2) on this same port\n",
        )
    };
    let headers = response.headers_mut();
    headers.insert(
        "content-security-policy",
        HeaderValue::from_static(CONTENT_SECURITY_POLICY),
    );
    headers.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    headers.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

fn plain(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

fn refused(status: StatusCode, reason: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(reason + "\n")));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

/// The `101 Switching Protocols` for a valid WebSocket handshake from the
/// page's own origin, or the status and reason it is refused with: 403 for a missing or foreign
/// `Origin` (another site's page cannot drive the playground), 400 for a
/// request that is not a WebSocket handshake.
fn websocket_handshake(
    request: &Request<Incoming>,
    origin: &Origin,
) -> Result<Response<Full<Bytes>>, (StatusCode, String)> {
    let headers = request.headers();
    let text = |name: header::HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
    let has_token = |name: header::HeaderName, token: &str| {
        headers.get_all(name).iter().any(|value| {
            value.to_str().is_ok_and(|value| {
                value
                    .split(',')
                    .any(|part| part.trim().eq_ignore_ascii_case(token))
            })
        })
    };
    if request.method() != Method::GET
        || !has_token(header::UPGRADE, "websocket")
        || !has_token(header::CONNECTION, "upgrade")
    {
        return Err((
            StatusCode::BAD_REQUEST,
            "expected a WebSocket handshake (GET with Upgrade: websocket)".into(),
        ));
    }
    if text(header::SEC_WEBSOCKET_VERSION) != Some("13") {
        return Err((
            StatusCode::UPGRADE_REQUIRED,
            "WebSocket version 13 only".into(),
        ));
    }
    let Some(key) = text(header::SEC_WEBSOCKET_KEY) else {
        return Err((StatusCode::BAD_REQUEST, "no Sec-WebSocket-Key".into()));
    };
    check_origin(text(header::HOST), text(header::ORIGIN), origin)
        .map_err(|reason| (StatusCode::FORBIDDEN, reason))?;
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    headers.insert(
        header::SEC_WEBSOCKET_ACCEPT,
        HeaderValue::from_str(&accept).expect("base64 is a valid header value"),
    );
    Ok(response)
}

/// Whether `origin_header` is the page's own origin: its scheme on this
/// connection, and the host (and port) the browser asked for. Browsers
/// always send `Origin` on a WebSocket handshake; its absence means a
/// client that is not a page, which the playground is not for.
fn check_origin(
    host: Option<&str>,
    origin_header: Option<&str>,
    origin: &Origin,
) -> Result<(), String> {
    let Some(host) = host else {
        return Err("no Host header".into());
    };
    let Some(given) = origin_header else {
        return Err("no Origin header: the playground's WebSocket is for its own page".into());
    };
    let expected = format!("{}://{host}", origin.scheme);
    if !given.eq_ignore_ascii_case(&expected) {
        return Err(format!(
            "cross-origin WebSocket refused: origin {given} is not this page's ({expected})"
        ));
    }
    if origin.loopback && !is_loopback_host(host) {
        return Err(format!(
            "host {host} is not a loopback name, on a loopback address (DNS rebinding?)"
        ));
    }
    Ok(())
}

/// Whether `host` (`name:port`) names this machine: `localhost` or a
/// loopback IP address.
fn is_loopback_host(host: &str) -> bool {
    let name = match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    };
    let name = name.trim_start_matches('[').trim_end_matches(']');
    name.eq_ignore_ascii_case("localhost")
        || name.to_ascii_lowercase().ends_with(".localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    const PLAIN: Origin = Origin {
        scheme: "http",
        loopback: true,
    };

    #[test]
    fn only_the_pages_own_origin_may_open_a_websocket() {
        let host = Some("127.0.0.1:8080");
        assert_eq!(
            check_origin(host, Some("http://127.0.0.1:8080"), &PLAIN),
            Ok(())
        );
        assert_eq!(
            check_origin(host, Some("HTTP://127.0.0.1:8080"), &PLAIN),
            Ok(())
        );
        for foreign in [
            "http://evil.example",
            "http://127.0.0.1:8081",
            "https://127.0.0.1:8080",
            "null",
        ] {
            let refused = check_origin(host, Some(foreign), &PLAIN).unwrap_err();
            assert!(refused.contains("cross-origin"), "{refused}");
        }
        assert!(
            check_origin(host, None, &PLAIN)
                .unwrap_err()
                .contains("no Origin")
        );
        assert!(check_origin(None, Some("http://127.0.0.1:8080"), &PLAIN).is_err());
        let tls = Origin {
            scheme: "https",
            loopback: true,
        };
        assert_eq!(
            check_origin(host, Some("https://127.0.0.1:8080"), &tls),
            Ok(())
        );
    }

    #[test]
    fn a_foreign_name_pointed_at_loopback_is_refused() {
        let rebound = Some("evil.example:8080");
        let refused = check_origin(rebound, Some("http://evil.example:8080"), &PLAIN).unwrap_err();
        assert!(refused.contains("DNS rebinding"), "{refused}");
        for host in [
            "localhost:8080",
            "[::1]:8080",
            "127.0.0.2:80",
            "app.localhost:1",
        ] {
            assert!(is_loopback_host(host), "{host}");
        }
        // Beyond loopback, any host the browser used is the page's own.
        let public = Origin {
            scheme: "http",
            loopback: false,
        };
        assert_eq!(
            check_origin(rebound, Some("http://evil.example:8080"), &public),
            Ok(())
        );
    }
}
