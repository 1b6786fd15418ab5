//! The gRPC service: one handler per method of `grpcUser.UserService`.
//!
//! Handlers are thin: decode, validate, one store call, convert. The
//! streaming methods live in their own modules, one per call pattern.

mod bulk;
mod list;
mod sync;

use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status, Streaming};

pub use list::UserListing;
pub use sync::SyncSession;

use crate::{
    gauges::Slots,
    proto,
    store::{Store, StoreExt},
    user::NewUser,
    validate,
};

/// The reply text of a successful AddUser.
pub const USER_SAVED: &str = "user saved successfully";

/// The `UserService` implementation over any [`Store`].
pub struct UserService<S> {
    store: S,
    /// Cancelled when the server starts shutting down: BulkAddUsers then
    /// commits the rows it has and ends. (Response streams are ended by the
    /// call guard, by one rule for every service.)
    shutdown: CancellationToken,
    /// One per open SyncUsers stream: past the cap, new ones are refused
    /// with `RESOURCE_EXHAUSTED`.
    subscribers: Slots,
}

impl<S: Store> UserService<S> {
    pub fn new(store: S, shutdown: CancellationToken, subscribers: Slots) -> Self {
        UserService {
            store,
            shutdown,
            subscribers,
        }
    }
}

#[tonic::async_trait]
impl<S: Store> proto::user_service_server::UserService for UserService<S> {
    /// Unary: one user in, one reply out.
    async fn add_user(
        &self,
        request: Request<proto::User>,
    ) -> Result<Response<proto::Response>, Status> {
        let user = NewUser::from(request.into_inner());
        validate::new_user(&user)?;
        let change = self.store.create(user).await?;
        Ok(Response::new(proto::Response {
            code: 200,
            message: USER_SAVED.to_owned(),
            user: Some(proto::User::from(&change.user)),
        }))
    }

    /// Unary: one id in, one user out.
    async fn get_user(
        &self,
        request: Request<proto::GetUserRequest>,
    ) -> Result<Response<proto::User>, Status> {
        let id = request.into_inner().id;
        validate::id("id", &id)?;
        let user = self.store.get(&id).await?;
        Ok(Response::new(proto::User::from(&user)))
    }

    type ListUsersStream = UserListing;

    /// Server streaming: the response is a stream that tonic polls.
    async fn list_users(
        &self,
        request: Request<proto::ListUsersRequest>,
    ) -> Result<Response<Self::ListUsersStream>, Status> {
        let listing = list::listing(self.store.clone(), request.into_inner())?;
        Ok(Response::new(listing))
    }

    /// Client streaming: read the whole request stream, then reply once.
    async fn bulk_add_users(
        &self,
        request: Request<Streaming<proto::User>>,
    ) -> Result<Response<proto::BulkAddUsersResponse>, Status> {
        let report = bulk::import(&self.store, request.into_inner(), &self.shutdown).await?;
        Ok(Response::new(report))
    }

    type SyncUsersStream = SyncSession<S>;

    /// Bidirectional streaming: the response stream reads the request stream.
    async fn sync_users(
        &self,
        request: Request<Streaming<proto::SyncRequest>>,
    ) -> Result<Response<Self::SyncUsersStream>, Status> {
        let slot = self.subscribers.try_take().ok_or_else(|| {
            Status::resource_exhausted("too many SyncUsers streams open; retry with backoff")
        })?;
        // Subscribes now, before the response headers are sent.
        let session = SyncSession::new(self.store.clone(), request.into_inner(), slot);
        Ok(Response::new(session))
    }
}
