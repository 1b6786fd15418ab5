//! The generated wire types and gRPC stubs for `proto/user.proto`, and their
//! conversions to and from the domain types in `user`.

#![allow(clippy::all, missing_docs)]

tonic::include_proto!("grpc_user");

/// The encoded file descriptor set of `proto/user.proto`, served by the
/// reflection service so that grpcurl needs no proto file.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("user_descriptor");

/// The well-known types (`google.protobuf.Any`, `Duration`) that the error
/// details in a status import, for the reflection service to serve with them.
pub const WELL_KNOWN_DESCRIPTOR_SET: &[u8] =
    tonic::include_file_descriptor_set!("well_known_descriptor");

use crate::user;

impl From<User> for user::NewUser {
    /// Takes the client's fields; `version` is the store's, so it is dropped.
    fn from(u: User) -> Self {
        user::NewUser {
            id: u.id,
            first_name: u.first_name,
            last_name: u.last_name,
            address: u.address,
            verified: u.verified,
        }
    }
}

impl From<&user::User> for User {
    fn from(u: &user::User) -> Self {
        User {
            first_name: u.first_name().to_owned(),
            last_name: u.last_name().to_owned(),
            address: u.address().to_owned(),
            verified: u.verified(),
            id: u.id().to_owned(),
            version: u.version(),
        }
    }
}

impl From<user::ChangeKind> for change::Kind {
    fn from(kind: user::ChangeKind) -> Self {
        match kind {
            user::ChangeKind::Created => change::Kind::Created,
            user::ChangeKind::Updated => change::Kind::Updated,
            user::ChangeKind::Deleted => change::Kind::Deleted,
        }
    }
}

impl From<&user::Change> for Change {
    fn from(c: &user::Change) -> Self {
        Change {
            seq: c.seq,
            kind: change::Kind::from(c.kind).into(),
            user: Some(User::from(&c.user)),
        }
    }
}
