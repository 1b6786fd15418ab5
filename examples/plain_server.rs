//! The four call patterns on the server side, in the plainest tonic style:
//! one file, a `Mutex`-guarded map, and a spawned task feeding a channel for
//! each streaming reply. Start here to learn how a handler of each kind is
//! written; `src/service/` is how the real server does the same, and
//! `docs/patterns.md` says why it is built differently.
//!
//!     cargo run --release --example plain_server -- --addr 127.0.0.1:8080
//!
//! It speaks the same contract as `user-service` (the same messages, codes
//! and ordering), so every client example works against it. What it leaves
//! out: durability, limits, deadlines over whole streams, reflection, health.
//! Exits 0 on Ctrl-C; 1, saying why in one line, when it cannot listen (the
//! port is taken: is `user-service` running on it?) or serve.

use std::{
    collections::BTreeMap,
    path::PathBuf,
    pin::Pin,
    process::ExitCode,
    sync::{Arc, Mutex},
};

use clap::Parser;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::{Stream, StreamExt, wrappers::ReceiverStream};
use tonic::{Request, Response, Status, Streaming, transport::Server};
use user_service::{
    proto::{
        self, change::Kind, sync_request::Op, sync_response::Event,
        user_service_server::UserServiceServer,
    },
    user::NewUser,
    validate,
};

#[derive(Parser)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: String,
    /// Once listening, write the address to this file (for scripts).
    #[arg(long)]
    addr_file: Option<PathBuf>,
}

/// The store: users by id, and the seq of the last change. Handlers lock
/// it for a few map operations and never across an `.await`.
#[derive(Default)]
struct Users {
    by_id: BTreeMap<String, proto::User>,
    seq: u64,
}

/// The service: the shared store, and the feed every SyncUsers stream
/// subscribes to. tonic calls its methods from many tasks at once; a
/// clone is a handle to the same store, for the tasks that feed streams.
#[derive(Clone)]
struct Plain {
    users: Arc<Mutex<Users>>,
    changes: broadcast::Sender<proto::Change>,
}

impl Plain {
    /// Commits one change: bumps the seq and publishes it, under the lock,
    /// so that every subscriber sees changes in commit order.
    fn commit(&self, users: &mut Users, kind: Kind, user: proto::User) -> proto::Change {
        users.seq += 1;
        let change = proto::Change {
            seq: users.seq,
            kind: kind as i32,
            user: Some(user),
        };
        // An error only means nobody is subscribed.
        let _ = self.changes.send(change.clone());
        change
    }

    /// Stores a new user (version 1), with a new UUIDv7 id if it has none.
    fn create(&self, user: proto::User) -> Result<proto::Change, Status> {
        validate::new_user(&NewUser::from(user.clone()))
            .map_err(|err| Status::invalid_argument(err.to_string()))?;
        let id = match user.id.is_empty() {
            true => uuid::Uuid::now_v7().to_string(),
            false => user.id.clone(),
        };
        let mut users = self.users.lock().unwrap();
        if users.by_id.contains_key(&id) {
            return Err(Status::already_exists(format!(
                "user {id:?} already exists"
            )));
        }
        let user = proto::User {
            id: id.clone(),
            version: 1,
            ..user
        };
        users.by_id.insert(id, user.clone());
        Ok(self.commit(&mut users, Kind::Created, user))
    }

    /// Applies one SyncUsers op; returns its Ack.
    fn apply(&self, request: proto::SyncRequest) -> proto::Ack {
        let mut ack = proto::Ack {
            request_id: request.request_id,
            ..Default::default()
        };
        match self.apply_op(request) {
            Ok(change) => {
                ack.seq = change.seq;
                ack.user = change.user;
            }
            Err(status) => {
                ack.code = status.code() as i32;
                ack.message = status.message().to_owned();
            }
        }
        ack
    }

    fn apply_op(&self, request: proto::SyncRequest) -> Result<proto::Change, Status> {
        let expected = request.expected_version;
        // The stored version must be the expected one (0: no such user),
        // unless no version is expected.
        let check = |stored: u64| match expected {
            0 => Ok(()),
            _ if expected == stored => Ok(()),
            _ => Err(Status::failed_precondition(format!(
                "expected version {expected}, stored version is {stored}"
            ))),
        };
        match request.op {
            Some(Op::Upsert(user)) if user.id.is_empty() => {
                check(0)?;
                self.create(user)
            }
            Some(Op::Upsert(user)) => {
                validate::new_user(&NewUser::from(user.clone()))
                    .map_err(|err| Status::invalid_argument(err.to_string()))?;
                let mut users = self.users.lock().unwrap();
                let stored = users.by_id.get(&user.id).map_or(0, |u| u.version);
                check(stored)?;
                let kind = if stored == 0 {
                    Kind::Created
                } else {
                    Kind::Updated
                };
                let user = proto::User {
                    version: stored + 1,
                    ..user
                };
                users.by_id.insert(user.id.clone(), user.clone());
                Ok(self.commit(&mut users, kind, user))
            }
            Some(Op::DeleteId(id)) => {
                validate::id("delete_id", &id)
                    .map_err(|err| Status::invalid_argument(err.to_string()))?;
                let mut users = self.users.lock().unwrap();
                let stored = users.by_id.get(&id).map_or(0, |u| u.version);
                check(stored)?;
                let user = users
                    .by_id
                    .remove(&id)
                    .ok_or_else(|| Status::not_found(format!("user {id:?} not found")))?;
                Ok(self.commit(&mut users, Kind::Deleted, user))
            }
            None => Err(Status::invalid_argument(
                "op: set either upsert or delete_id",
            )),
        }
    }
}

/// A streaming reply: the receiving end of a channel that a spawned task
/// feeds. tonic polls it and sends each item as it comes; an `Err` ends the
/// call with that status, and the end of the channel ends it with OK.
type ReplyStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Messages a streaming reply may hold before its task waits for the client.
const REPLY_BUFFER: usize = 64;

#[tonic::async_trait]
impl proto::user_service_server::UserService for Plain {
    /// Unary: one request in, one reply (or one error status) out.
    async fn add_user(
        &self,
        request: Request<proto::User>,
    ) -> Result<Response<proto::Response>, Status> {
        let change = self.create(request.into_inner())?;
        Ok(Response::new(proto::Response {
            code: 200,
            message: "user saved successfully".into(),
            user: change.user,
        }))
    }

    /// Unary, again: a read.
    async fn get_user(
        &self,
        request: Request<proto::GetUserRequest>,
    ) -> Result<Response<proto::User>, Status> {
        let id = request.into_inner().id;
        validate::id("id", &id).map_err(|err| Status::invalid_argument(err.to_string()))?;
        let users = self.users.lock().unwrap();
        match users.by_id.get(&id) {
            Some(user) => Ok(Response::new(user.clone())),
            None => Err(Status::not_found(format!("user {id:?} not found"))),
        }
    }

    type ListUsersStream = ReplyStream<proto::User>;

    /// Server streaming: the handler returns at once with a stream; a task
    /// sends the users into it. `send` waits while the channel is full, so
    /// a slow client slows the task down; a client that goes away makes
    /// `send` fail, and the task stops.
    async fn list_users(
        &self,
        request: Request<proto::ListUsersRequest>,
    ) -> Result<Response<Self::ListUsersStream>, Status> {
        let request = request.into_inner();
        if !request.after_id.is_empty() {
            validate::id("after_id", &request.after_id)
                .map_err(|err| Status::invalid_argument(err.to_string()))?;
        }
        // A copy of the matching users, taken under the lock: simple, at
        // the cost of memory (the real server reads a page at a time).
        let users: Vec<proto::User> = {
            let users = self.users.lock().unwrap();
            let after = std::ops::Bound::Excluded(request.after_id.clone());
            let start = match request.after_id.is_empty() {
                true => std::ops::Bound::Unbounded,
                false => after,
            };
            users
                .by_id
                .range((start, std::ops::Bound::Unbounded))
                .map(|(_, user)| user)
                .filter(|user| request.verified.is_none_or(|v| user.verified == v))
                .take(match request.limit {
                    0 => usize::MAX,
                    limit => limit as usize,
                })
                .cloned()
                .collect()
        };
        let (tx, rx) = mpsc::channel(REPLY_BUFFER);
        tokio::spawn(async move {
            for user in users {
                if tx.send(Ok(user)).await.is_err() {
                    return; // the client went away
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    /// Client streaming: read every message of the request stream, then
    /// answer once.
    async fn bulk_add_users(
        &self,
        request: Request<Streaming<proto::User>>,
    ) -> Result<Response<proto::BulkAddUsersResponse>, Status> {
        let mut rows = request.into_inner();
        let mut report = proto::BulkAddUsersResponse::default();
        let mut index = 0;
        // `message()` is `Ok(None)` once the client has closed its side.
        while let Some(row) = rows.message().await? {
            match self.create(row) {
                Ok(_) => report.added += 1,
                Err(status) => {
                    report.failed += 1;
                    if report.errors.len() < 100 {
                        report.errors.push(proto::BulkError {
                            index,
                            code: status.code() as i32,
                            message: status.message().to_owned(),
                        });
                    }
                }
            }
            index += 1;
        }
        Ok(Response::new(report))
    }

    type SyncUsersStream = ReplyStream<proto::SyncResponse>;

    /// Bidirectional streaming: requests in and replies out at the same
    /// time. One task reads the requests and the change feed and sends
    /// both kinds of reply into the stream tonic polls.
    async fn sync_users(
        &self,
        request: Request<Streaming<proto::SyncRequest>>,
    ) -> Result<Response<Self::SyncUsersStream>, Status> {
        let mut requests = request.into_inner();
        // Subscribed before the reply goes out: no change is missed.
        let mut changes = self.changes.subscribe();
        let (tx, rx) = mpsc::channel(REPLY_BUFFER);
        let service = self.clone();
        tokio::spawn(async move {
            let reply = |event| Ok(proto::SyncResponse { event: Some(event) });
            // The seq of this stream's last committed op.
            let mut own_seq = 0;
            loop {
                tokio::select! {
                    // Changes first: an op's Change is published before its
                    // Ack is sent, so it goes out right after that Ack.
                    biased;
                    change = changes.recv() => {
                        let change = match change {
                            Ok(change) => change,
                            Err(broadcast::error::RecvError::Lagged(_)) => {
                                let _ = tx.send(Err(Status::aborted("fell too far behind the change feed"))).await;
                                return;
                            }
                            Err(broadcast::error::RecvError::Closed) => return,
                        };
                        if tx.send(reply(Event::Change(change))).await.is_err() {
                            return; // the client went away
                        }
                    }
                    request = requests.next() => match request {
                        Some(Ok(request)) => {
                            let ack = service.apply(request);
                            own_seq = own_seq.max(ack.seq);
                            if tx.send(reply(Event::Ack(ack))).await.is_err() {
                                return;
                            }
                        }
                        Some(Err(status)) => {
                            let _ = tx.send(Err(status)).await;
                            return;
                        }
                        // The client closed its side: send the Changes up
                        // to this stream's own last op, then end with OK.
                        None => {
                            while let Ok(change) = changes.try_recv() {
                                let seq = change.seq;
                                if seq > own_seq || tx.send(reply(Event::Change(change))).await.is_err() {
                                    return;
                                }
                                if seq == own_seq {
                                    return;
                                }
                            }
                            return;
                        }
                    },
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let (changes, _) = broadcast::channel(4096);
    let service = Plain {
        users: Arc::default(),
        changes,
    };
    // Failures to start are printed as one line with what failed, and exit
    // 1: not returned from `main`, which would print them with `{:?}`.
    let listener = match tokio::net::TcpListener::bind(&args.addr).await {
        Ok(listener) => listener,
        Err(err) => {
            eprintln!("cannot listen on {}: {err}", args.addr);
            return ExitCode::FAILURE;
        }
    };
    let addr = listener
        .local_addr()
        .expect("a bound socket has an address");
    eprintln!("plain_server listening on {addr}");
    if let Some(path) = args.addr_file
        && let Err(err) = std::fs::write(&path, format!("{addr}\n"))
    {
        eprintln!("cannot write {}: {err}", path.display());
        return ExitCode::FAILURE;
    }
    let served = Server::builder()
        .add_service(UserServiceServer::new(service))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            async {
                let _ = tokio::signal::ctrl_c().await;
            },
        )
        .await;
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("plain_server stopped: {err}");
            ExitCode::FAILURE
        }
    }
}
