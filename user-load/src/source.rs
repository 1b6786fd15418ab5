//! Where the users sent come from: a pool of generated users, or a JSON
//! Lines file read by a thread as the workers need them.

use std::{
    fs::File,
    io::{self, BufRead, BufReader},
    path::Path,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
};

use futures::StreamExt;
use sample_users::UserPool;
use user_service::proto;

/// Generated users cycle through a pool of this many: enough variety that
/// the server sees realistic rows, small enough to build in milliseconds.
pub const POOL_SIZE: usize = 65_536;

/// Users read ahead from a `--data` file: keeps the workers fed without
/// loading the file into memory.
const DATA_READ_AHEAD: usize = 4096;

/// The users of a run: cloned into every worker.
pub enum Source {
    Pool(Arc<UserPool>),
    File(Pin<Box<async_channel::Receiver<proto::User>>>),
}

impl Clone for Source {
    fn clone(&self) -> Self {
        match self {
            Source::Pool(pool) => Source::Pool(pool.clone()),
            Source::File(rx) => Source::File(Box::pin(async_channel::Receiver::clone(rx))),
        }
    }
}

/// Lines of `--data` that could not be read, for the report.
#[derive(Default)]
pub struct DataErrors {
    pub bad_lines: AtomicU64,
    pub first: Mutex<Option<String>>,
}

/// A line of `--data`: the fields of `proto::User` a client sets.
#[derive(serde::Deserialize, serde::Serialize)]
pub struct JsonUser {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub id: String,
    #[serde(default)]
    pub first_name: String,
    #[serde(default)]
    pub last_name: String,
    #[serde(default)]
    pub address: String,
    #[serde(default)]
    pub verified: bool,
}

impl From<JsonUser> for proto::User {
    fn from(u: JsonUser) -> Self {
        proto::User {
            id: u.id,
            first_name: u.first_name,
            last_name: u.last_name,
            address: u.address,
            verified: u.verified,
            version: 0,
        }
    }
}

impl From<proto::User> for JsonUser {
    fn from(u: proto::User) -> Self {
        JsonUser {
            id: u.id,
            first_name: u.first_name,
            last_name: u.last_name,
            address: u.address,
            verified: u.verified,
        }
    }
}

impl Source {
    pub fn pool(seed: u64) -> Source {
        Source::Pool(Arc::new(UserPool::new(POOL_SIZE, seed)))
    }

    /// Starts reading `path` on its own thread.
    pub fn file(path: &Path, errors: Arc<DataErrors>) -> io::Result<Source> {
        let file = BufReader::new(File::open(path)?);
        let (tx, rx) = async_channel::bounded(DATA_READ_AHEAD);
        std::thread::spawn(move || {
            for (i, line) in file.lines().enumerate() {
                let parsed = line.map_err(|err| err.to_string()).and_then(|line| {
                    if line.trim().is_empty() {
                        return Ok(None);
                    }
                    serde_json::from_str::<JsonUser>(&line)
                        .map(Some)
                        .map_err(|err| err.to_string())
                });
                let user = match parsed {
                    Ok(Some(user)) => proto::User::from(user),
                    Ok(None) => continue,
                    Err(err) => {
                        errors.bad_lines.fetch_add(1, Ordering::Relaxed);
                        if let Ok(mut first) = errors.first.lock() {
                            first.get_or_insert(format!("line {}: {err}", i + 1));
                        }
                        continue;
                    }
                };
                // An error means every worker has stopped reading.
                if tx.send_blocking(user).is_err() {
                    break;
                }
            }
        });
        Ok(Source::File(Box::pin(rx)))
    }

    /// The user for unit `n`, waiting for the file if need be; `None` at the
    /// end of the file.
    pub async fn next(&mut self, n: u64) -> Option<proto::User> {
        std::future::poll_fn(|cx| self.poll_next(n, cx)).await
    }

    pub fn poll_next(&mut self, n: u64, cx: &mut Context<'_>) -> Poll<Option<proto::User>> {
        match self {
            Source::Pool(pool) => Poll::Ready(Some(pool.get(n).clone())),
            Source::File(rx) => rx.poll_next_unpin(cx),
        }
    }
}
