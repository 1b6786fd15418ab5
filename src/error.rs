//! The one place where errors become what clients see.
//!
//! Each variant maps to one gRPC code. Validation errors carry a
//! `google.rpc.BadRequest` detail naming the field; storage failures reach
//! the client only as a generic `INTERNAL` (or `RESOURCE_EXHAUSTED` for a
//! full disk, `UNAVAILABLE` for a database out of reach), and a stored user
//! that cannot be read as `DATA_LOSS` naming its id and nothing more. They
//! are not logged here: the store logs each failure once, where it knows
//! what failed (a batch of a thousand rows that did not commit is one log
//! line, not a thousand).

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::{store::StoreError, validate::ValidationError};

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Error {
    /// The gRPC status code for this error. Also used where the contract
    /// reports a code inside a message (SyncUsers Acks, BulkAddUsers errors).
    pub fn code(&self) -> Code {
        match self {
            Error::Invalid(_) => Code::InvalidArgument,
            Error::Store(StoreError::AlreadyExists(_)) => Code::AlreadyExists,
            Error::Store(StoreError::NotFound(_)) => Code::NotFound,
            Error::Store(StoreError::VersionMismatch { .. }) => Code::FailedPrecondition,
            Error::Store(StoreError::Full(_)) => Code::ResourceExhausted,
            Error::Store(StoreError::Unavailable(_)) => Code::Unavailable,
            Error::Store(StoreError::Internal(_)) => Code::Internal,
            // Not INTERNAL: the server works, the stored data is damaged,
            // and asking again will not help until the row is fixed.
            Error::Store(StoreError::Unreadable { .. }) => Code::DataLoss,
        }
    }

    /// The message a client sees.
    pub fn client_message(&self) -> String {
        match self {
            Error::Store(StoreError::Full(_)) => "storage full".to_owned(),
            Error::Store(StoreError::Unavailable(_)) => {
                "storage unavailable; retry with backoff".to_owned()
            }
            Error::Store(StoreError::Internal(_)) => "internal storage error".to_owned(),
            // The id is the client's to know (it asked for it, or lists
            // ids); what is wrong with the row is for the logs.
            Error::Store(StoreError::Unreadable { id, .. }) => {
                format!("stored user {id:?} is damaged and cannot be read")
            }
            other => other.to_string(),
        }
    }
}

impl From<Error> for Status {
    fn from(err: Error) -> Status {
        match &err {
            Error::Invalid(invalid) => Status::with_error_details(
                Code::InvalidArgument,
                invalid.to_string(),
                ErrorDetails::with_bad_request_violation(invalid.field, &invalid.description),
            ),
            _ => Status::new(err.code(), err.client_message()),
        }
    }
}

impl From<ValidationError> for Status {
    fn from(err: ValidationError) -> Status {
        Error::from(err).into()
    }
}

impl From<StoreError> for Status {
    fn from(err: StoreError) -> Status {
        Error::from(err).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_error_has_its_code() {
        let cases = [
            (StoreError::AlreadyExists("a".into()), Code::AlreadyExists),
            (StoreError::NotFound("a".into()), Code::NotFound),
            (
                StoreError::VersionMismatch {
                    expected: 1,
                    actual: 2,
                },
                Code::FailedPrecondition,
            ),
            (StoreError::Full("disk".into()), Code::ResourceExhausted),
            (StoreError::Unavailable("db".into()), Code::Unavailable),
            (StoreError::Internal("disk".into()), Code::Internal),
            (
                StoreError::Unreadable {
                    id: "a".into(),
                    detail: "first_name: too long".into(),
                },
                Code::DataLoss,
            ),
        ];
        for (err, code) in cases {
            assert_eq!(Status::from(err).code(), code);
        }
        let invalid = ValidationError::new("first_name", "must not be empty");
        assert_eq!(Status::from(invalid).code(), Code::InvalidArgument);
    }

    #[test]
    fn storage_details_stay_in_the_logs() {
        let status = Status::from(StoreError::Internal(
            "/var/db/users.db: disk I/O error".into(),
        ));
        assert_eq!(status.code(), Code::Internal);
        assert_eq!(status.message(), "internal storage error");
        let status = Status::from(StoreError::Full(
            "/var/db/users.db: database or disk is full".into(),
        ));
        assert_eq!(status.message(), "storage full");
        let status = Status::from(StoreError::Unreadable {
            id: "u-1".into(),
            detail: "first_name: not valid UTF-8 (invalid utf-8 sequence of 1 bytes from index 0)"
                .into(),
        });
        assert_eq!(status.code(), Code::DataLoss);
        assert_eq!(
            status.message(),
            "stored user \"u-1\" is damaged and cannot be read"
        );
    }
}
