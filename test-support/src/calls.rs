//! Requests the tests make again and again.

use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use user_service::proto::{self, user_service_client::UserServiceClient};

use crate::within;

/// The generated client, on a tonic channel.
pub type Client = UserServiceClient<Channel>;

/// A valid user with no id.
pub fn user(first_name: &str) -> proto::User {
    proto::User {
        first_name: first_name.into(),
        last_name: "Doe".into(),
        address: "1 Long Street, Springfield".into(),
        verified: false,
        id: String::new(),
        version: 0,
    }
}

/// A valid user with a client-chosen id.
pub fn user_with_id(id: &str) -> proto::User {
    user_named(id, "Ann")
}

/// A valid user with a client-chosen id and first name.
pub fn user_named(id: &str, first_name: &str) -> proto::User {
    proto::User {
        id: id.into(),
        ..user(first_name)
    }
}

/// The ids a listing after `after` (`""`: from the start) returns, and the
/// status it ends with if it fails.
pub async fn list_after(client: &mut Client, after: &str) -> (Vec<String>, Option<tonic::Status>) {
    let request = proto::ListUsersRequest {
        after_id: after.into(),
        ..Default::default()
    };
    let mut stream = client
        .list_users(request)
        .await
        .expect("list_users")
        .into_inner();
    let mut ids = Vec::new();
    loop {
        match within("a listed user", stream.message()).await {
            Ok(Some(user)) => ids.push(user.id),
            Ok(None) => return (ids, None),
            Err(status) => return (ids, Some(status)),
        }
    }
}

/// Asserts that `status` is what a client gets for the stored user `id`
/// when its row cannot be read back.
pub fn assert_damaged(status: &tonic::Status, id: &str) {
    assert_eq!(status.code(), tonic::Code::DataLoss, "{status:?}");
    assert_eq!(
        status.message(),
        format!("stored user {id:?} is damaged and cannot be read")
    );
}

/// A request stream the test feeds by hand, for the client-streaming and
/// bidirectional calls. Dropping the sender closes the client's side.
pub fn request_stream<T>() -> (tokio::sync::mpsc::Sender<T>, ReceiverStream<T>) {
    let (tx, rx) = tokio::sync::mpsc::channel(1024);
    (tx, ReceiverStream::new(rx))
}

/// Every user, through ListUsers.
pub async fn list_all(client: &mut Client) -> Vec<proto::User> {
    let mut stream = client
        .list_users(proto::ListUsersRequest::default())
        .await
        .expect("list_users")
        .into_inner();
    let mut users = Vec::new();
    while let Some(user) = within("a listed user", stream.message())
        .await
        .expect("stream")
    {
        users.push(user);
    }
    users
}
