//! What user-service's integration tests share, so that each test file holds
//! tests only:
//!
//! - [`TestServer`]: a server in the test's own process on `127.0.0.1:0`,
//!   over any store; [`Backend`] and [`for_each_backend!`] run one test body
//!   once per store backend. [`StuckReads`] is a store whose reads never end.
//! - [`ServerProcess`]: the server binary as a child process, its address
//!   read from the file it writes once listening (`--addr-file`).
//! - [`raw`]: HTTP/2 below the generated client, frame by frame, for what no
//!   well-behaved client does, and a recording proxy.
//! - [`Pki`]: a CA and certificates made at test time.
//! - [`within`]: every wait bounded, so that a broken server fails a test
//!   instead of hanging it.

mod calls;
mod in_process;
mod pki;
mod process;
pub mod raw;

use std::{future::Future, time::Duration};

pub use calls::{Client, list_all, request_stream, user, user_with_id};
pub use in_process::{Backend, FEED_CAPACITY, StuckReads, TestServer, sqlite_store};
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

/// Runs each named `async fn(Backend)` test against every store backend.
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
    };
}
