//! What user-service's integration tests share, so that each test file holds
//! tests only:
//!
//! - [`TestServer`]: a server in the test's own process on `127.0.0.1:0`,
//!   over any store; [`Backend`] and [`for_each_backend!`] run one test body
//!   once per store backend.
//! - [`Delegate`]: a store that forwards every call to another except those
//!   a test's [`Hooks`] change; [`StuckReads`] is one whose reads never end.
//! - [`ServerProcess`]: the server binary as a child process, its address
//!   read from the file it writes once listening (`--addr-file`).
//! - [`raw`]: HTTP/2 below the generated client, frame by frame, for what no
//!   well-behaved client does, and a recording proxy.
//! - [`postgres`]: a real PostgreSQL: a schema of its own per test in the
//!   test database, or a throwaway cluster for tests that restart it; and
//!   whether the PostgreSQL tests run at all where none answers.
//! - [`connect_noting_peer`]: a connection whose client address is known,
//!   for checking what the server says its peer is.
//! - [`Pki`]: a CA and certificates made at test time.
//! - [`within`]: every wait bounded, so that a broken server fails a test
//!   instead of hanging it.

mod calls;
mod delegate;
mod dial;
mod in_process;
mod pki;
pub mod postgres;
mod process;
pub mod raw;

use std::{future::Future, time::Duration};

pub use calls::{
    Client, assert_damaged, list_after, list_all, request_stream, user, user_named, user_with_id,
};
pub use delegate::{Delegate, Hooks, StuckReads};
pub use dial::connect_noting_peer;
pub use in_process::{Backend, FEED_CAPACITY, TestServer, postgres_store, sqlite_store};
pub use pki::{Pki, PkiFiles, ca, leaf};
pub use process::{ServerProcess, cpu_seconds, rss_bytes, run_to_exit};

/// Bounds every wait in the tests.
pub const PATIENCE: Duration = Duration::from_secs(30);

/// Awaits `future`, failing the test if it takes longer than [`PATIENCE`].
pub async fn within<F: Future>(what: &str, future: F) -> F::Output {
    tokio::time::timeout(PATIENCE, future)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

/// Runs each named `async fn(Backend)` test against every store backend
/// (on PostgreSQL, unless [`postgres::skip_without_database`] skips it).
#[macro_export]
macro_rules! for_each_backend {
    ($($test:ident),* $(,)?) => {
        mod memory {
            $(
                #[tokio::test]
                async fn $test() {
                    super::$test($crate::Backend::Memory).await
                }
            )*
        }
        mod sqlite {
            $(
                #[tokio::test]
                async fn $test() {
                    super::$test($crate::Backend::Sqlite).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $test() {
                    if $crate::postgres::skip_without_database() {
                        return;
                    }
                    super::$test($crate::Backend::Postgres).await
                }
            )*
        }
    };
}

/// A plain HTTP/1.1 GET of `path` on `addr` (the metrics endpoint, a
/// Prometheus API): the status code and the body.
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    within("an HTTP reply", async {
        let mut tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        tcp.write_all(request.as_bytes()).await.expect("write");
        let mut reply = Vec::new();
        tcp.read_to_end(&mut reply).await.expect("read");
        let reply = String::from_utf8(reply).expect("UTF-8");
        let (head, body) = reply.split_once("\r\n\r\n").expect("a head and a body");
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .expect("a status code");
        let body = if head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked")
        {
            dechunk(body)
        } else {
            body.to_owned()
        };
        (status, body)
    })
    .await
}

/// The body of a chunked HTTP/1.1 reply.
fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let size = usize::from_str_radix(size.trim(), 16).expect("a chunk size");
        if size == 0 {
            break;
        }
        out.push_str(&rest[..size]);
        body = &rest[size + 2..];
    }
    out
}
