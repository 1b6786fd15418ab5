//! sink: a UserService that decodes every request and stores nothing.
//!
//! Pointing the generator at it measures the generator (and the gRPC stack)
//! alone: if it sends much faster to the sink than to the real server, the
//! server, not the generator, sets the real figures.

use std::pin::Pin;

use futures::{Stream, StreamExt};
use sample_users::UserPool;
use tonic::{Request, Response, Status, Streaming};
use user_service::{
    proto::{
        self,
        sync_response::Event,
        user_service_server::{UserService, UserServiceServer},
    },
    server::MAX_MESSAGE_SIZE,
    service::USER_SAVED,
    transport::MAX_CONCURRENT_STREAMS,
};

use crate::cli::HostPort;

/// Users in one ListUsers reply from the sink (a limit asks for fewer): the
/// size of the store the list benchmark reads.
const SINK_LIST_USERS: u64 = 1_000_000;

/// Distinct users the sink lists, cycled.
const SINK_POOL: usize = 4096;

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

struct Sink {
    pool: std::sync::Arc<UserPool>,
}

#[tonic::async_trait]
impl UserService for Sink {
    async fn add_user(
        &self,
        request: Request<proto::User>,
    ) -> Result<Response<proto::Response>, Status> {
        let mut user = request.into_inner();
        user.version = 1;
        Ok(Response::new(proto::Response {
            code: 200,
            message: USER_SAVED.to_owned(),
            user: Some(user),
        }))
    }

    async fn get_user(
        &self,
        request: Request<proto::GetUserRequest>,
    ) -> Result<Response<proto::User>, Status> {
        let id = request.into_inner().id;
        Ok(Response::new(proto::User {
            id,
            version: 1,
            ..self.pool.get(0).clone()
        }))
    }

    type ListUsersStream = BoxStream<proto::User>;

    async fn list_users(
        &self,
        request: Request<proto::ListUsersRequest>,
    ) -> Result<Response<Self::ListUsersStream>, Status> {
        let limit = match request.into_inner().limit {
            0 => SINK_LIST_USERS,
            n => u64::from(n).min(SINK_LIST_USERS),
        };
        let pool = self.pool.clone();
        let users = futures::stream::iter(0..limit).map(move |n| {
            Ok(proto::User {
                id: format!("sink-{n:010}"),
                version: 1,
                ..pool.get(n).clone()
            })
        });
        Ok(Response::new(Box::pin(users)))
    }

    async fn bulk_add_users(
        &self,
        request: Request<Streaming<proto::User>>,
    ) -> Result<Response<proto::BulkAddUsersResponse>, Status> {
        let mut rows = request.into_inner();
        let mut added = 0;
        while let Some(row) = rows.next().await {
            row?;
            added += 1;
        }
        Ok(Response::new(proto::BulkAddUsersResponse {
            added,
            failed: 0,
            errors: Vec::new(),
        }))
    }

    type SyncUsersStream = BoxStream<proto::SyncResponse>;

    /// Acknowledges every request; sends no Changes.
    async fn sync_users(
        &self,
        request: Request<Streaming<proto::SyncRequest>>,
    ) -> Result<Response<Self::SyncUsersStream>, Status> {
        let mut seq = 0;
        let acks = request.into_inner().map(move |request| {
            let request = request?;
            seq += 1;
            let user = match request.op {
                Some(proto::sync_request::Op::Upsert(user)) => Some(user),
                _ => None,
            };
            Ok(proto::SyncResponse {
                event: Some(Event::Ack(proto::Ack {
                    request_id: request.request_id,
                    code: 0,
                    message: String::new(),
                    seq,
                    user,
                })),
            })
        });
        Ok(Response::new(Box::pin(acks)))
    }
}

/// Serves the sink on `addr` until Ctrl-C; once listening, writes the
/// address bound to `addr_file`, if given.
pub async fn serve(
    addr: &HostPort,
    addr_file: Option<&std::path::Path>,
) -> Result<(), Box<dyn std::error::Error>> {
    let listener = tokio::net::TcpListener::bind(addr.as_str())
        .await
        .map_err(|err| format!("cannot listen on {addr}: {err}"))?;
    let bound = listener.local_addr()?;
    eprintln!("user-load sink listening on {bound}");
    if let Some(path) = addr_file {
        // Whole or not at all: written beside it, then renamed.
        let mut temporary = path.as_os_str().to_owned();
        temporary.push(".tmp");
        std::fs::write(&temporary, format!("{bound}\n"))
            .and_then(|()| std::fs::rename(&temporary, path))
            .map_err(|err| format!("cannot write the address file {}: {err}", path.display()))?;
    }
    let service = UserServiceServer::new(Sink {
        pool: std::sync::Arc::new(UserPool::new(SINK_POOL, 1)),
    })
    .max_decoding_message_size(MAX_MESSAGE_SIZE)
    .max_encoding_message_size(MAX_MESSAGE_SIZE);
    // The health service answers the generator's connection probe.
    let (_, health) = tonic_health::server::health_reporter();
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    tonic::transport::Server::builder()
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .add_service(health)
        .add_service(service)
        .serve_with_incoming_shutdown(incoming, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
