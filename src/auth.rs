//! Optional bearer-token authentication.
//!
//! With a token configured, every call to a guarded service must carry
//! `authorization: Bearer <token>`, or it gets `UNAUTHENTICATED`. The token
//! is compared in constant time and never logged (its `Debug` is redacted).

use std::{fmt, path::Path, sync::Arc};

use subtle::ConstantTimeEq;

use crate::gauges::{Gauges, Limit};
use tonic::{
    Request, Status,
    metadata::{Ascii, MetadataValue},
    service::Interceptor,
};

/// A shared secret clients present as a bearer token.
#[derive(Clone)]
pub struct AuthToken(Arc<[u8]>);

/// Why a token could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum AuthTokenError {
    #[error("cannot read the token file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("the token is empty")]
    Empty,
    #[error("the token must be printable ASCII without spaces")]
    Invalid,
}

impl AuthToken {
    /// A token from its text. Surrounding whitespace (a trailing newline in
    /// a file) is not part of it.
    pub fn new(token: &str) -> Result<Self, AuthTokenError> {
        let token = token.trim();
        if token.is_empty() {
            return Err(AuthTokenError::Empty);
        }
        // What a header value can carry after "Bearer ".
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(AuthTokenError::Invalid);
        }
        Ok(AuthToken(token.as_bytes().into()))
    }

    /// Reads the token from a file (its whole content, trimmed).
    pub fn from_file(path: &Path) -> Result<Self, AuthTokenError> {
        let text = std::fs::read_to_string(path).map_err(|source| AuthTokenError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::new(&text)
    }

    /// The `authorization` value a client sends: `Bearer <token>`.
    pub fn header_value(&self) -> MetadataValue<Ascii> {
        let token = std::str::from_utf8(&self.0).expect("checked in `new`: ASCII");
        format!("Bearer {token}")
            .parse()
            .expect("checked in `new`: printable ASCII")
    }

    /// Whether `presented` is this token, in time that does not depend on
    /// where the two differ. (Their lengths may still be told apart.)
    fn matches(&self, presented: &[u8]) -> bool {
        self.0.as_ref().ct_eq(presented).into()
    }
}

impl fmt::Debug for AuthToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AuthToken(<redacted>)")
    }
}

/// The interceptor that checks the bearer token; lets everything through
/// when no token is configured. Refusals are counted in `gauges`.
#[derive(Debug, Clone, Default)]
pub struct Authenticate {
    token: Option<AuthToken>,
    gauges: Gauges,
}

impl Authenticate {
    pub fn new(token: Option<AuthToken>, gauges: Gauges) -> Self {
        Authenticate { token, gauges }
    }

    fn refuse(&self, message: &'static str) -> Status {
        self.gauges.count_refused(Limit::Auth);
        Status::unauthenticated(message)
    }
}

impl Interceptor for Authenticate {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let Some(token) = &self.token else {
            return Ok(request);
        };
        let Some(value) = request.metadata().get("authorization") else {
            return Err(self.refuse("missing bearer token"));
        };
        let value = value.as_bytes();
        // "Bearer <token>"; the scheme is case-insensitive (RFC 7235).
        let presented = match value.split_at_checked(7) {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case(b"bearer ") => rest,
            _ => return Err(self.refuse("expected a bearer token")),
        };
        if token.matches(presented) {
            Ok(request)
        } else {
            tracing::debug!("call refused: wrong bearer token");
            Err(self.refuse("invalid bearer token"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(auth: &mut Authenticate, header: Option<&str>) -> Result<(), tonic::Code> {
        let mut request = Request::new(());
        if let Some(header) = header {
            request
                .metadata_mut()
                .insert("authorization", header.parse().unwrap());
        }
        auth.call(request).map(drop).map_err(|status| status.code())
    }

    #[test]
    fn checks_the_bearer_token() {
        let gauges = Gauges::default();
        let mut auth = Authenticate::new(Some(AuthToken::new("s3cret\n").unwrap()), gauges.clone());
        assert_eq!(call(&mut auth, Some("Bearer s3cret")), Ok(()));
        assert_eq!(call(&mut auth, Some("bearer s3cret")), Ok(()));
        let unauthenticated = Err(tonic::Code::Unauthenticated);
        assert_eq!(call(&mut auth, None), unauthenticated);
        assert_eq!(call(&mut auth, Some("Bearer s3cre")), unauthenticated);
        assert_eq!(call(&mut auth, Some("Bearer s3cret2")), unauthenticated);
        assert_eq!(call(&mut auth, Some("Basic s3cret")), unauthenticated);
        assert_eq!(call(&mut auth, Some("s3cret")), unauthenticated);
        assert_eq!(call(&mut auth, Some("Bearer")), unauthenticated);
        assert_eq!(gauges.refused(Limit::Auth), 6);
    }

    #[test]
    fn the_client_header_is_what_the_server_accepts() {
        let token = AuthToken::new(" s3cret\n").unwrap();
        assert_eq!(token.header_value(), "Bearer s3cret");
        let mut auth = Authenticate::new(Some(token.clone()), Gauges::default());
        let value = token.header_value();
        assert_eq!(call(&mut auth, value.to_str().ok()), Ok(()));
    }

    #[test]
    fn no_token_lets_everything_through() {
        let mut auth = Authenticate::new(None, Gauges::default());
        assert_eq!(call(&mut auth, None), Ok(()));
        assert_eq!(call(&mut auth, Some("Bearer anything")), Ok(()));
    }

    #[test]
    fn tokens_are_checked_and_never_printed() {
        assert!(matches!(AuthToken::new(" \n"), Err(AuthTokenError::Empty)));
        assert!(matches!(
            AuthToken::new("a b"),
            Err(AuthTokenError::Invalid)
        ));
        let token = AuthToken::new("s3cret").unwrap();
        assert!(!format!("{token:?}").contains("s3cret"));
    }
}
