//! The domain types: a stored [`User`], the [`NewUser`] a client asks to store,
//! and the [`Change`] that every committed write produces.
//!
//! Nothing here knows about gRPC; `proto` converts to and from the wire types.

use std::fmt;

use triomphe::ThinArc;

use crate::validate;

/// A user as a client sends it: every field but the version, which the store
/// owns. An empty `id` asks the store to assign one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NewUser {
    pub id: String,
    pub first_name: String,
    pub last_name: String,
    pub address: String,
    pub verified: bool,
}

/// A stored user: immutable, and cheap to clone (a reference count), so one
/// copy is shared by the store, the change feed and every reply.
///
/// All of it lives in one heap allocation: the reference count, the
/// version, the `verified` flag and where each field ends, then the four text
/// fields back to back. A million stored users are then a million
/// allocations rather than two or five million, which is much of the
/// difference between fitting in 256 MB and not, and of what a bulk import
/// spends allocating. An update stores a new `User`.
#[derive(Clone)]
pub struct User(ThinArc<Meta, u8>);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Meta {
    version: u64,
    /// Where `id`, `first_name` and `last_name` end in the text. Field
    /// lengths are validated (at most 256 bytes each), so `u16` is always
    /// enough.
    ends: [u16; 3],
    verified: bool,
}

/// The longest text that validated fields make, assembled on the stack
/// before it is copied into the user's allocation.
const MAX_VALID_TEXT: usize = validate::MAX_ID_LEN + 3 * validate::MAX_TEXT_LEN;

/// Fields a [`User`] cannot hold: `id`, `first_name` and `last_name` take
/// this many bytes together, past where a `u16` can say a field ends.
/// Validated fields take at most 576.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "id, first_name and last_name take {0} bytes together, more than a user holds ({max})",
    max = u16::MAX
)]
pub struct TooLong(pub usize);

impl User {
    /// Builds a user from validated parts.
    ///
    /// # Panics
    /// If `id`, `first_name` and `last_name` together exceed 64 KiB, which
    /// validation rules out (see [`TooLong`]).
    pub fn new(id: &str, user: &NewUser, version: u64) -> Self {
        Self::from_fields(
            [id, &user.first_name, &user.last_name, &user.address],
            user.verified,
            version,
        )
        .expect("validated fields fit in a user")
    }

    /// Builds a user from its four text fields (`id`, `first_name`,
    /// `last_name`, `address`) as borrowed strings, copied once into the
    /// user's allocation: what a store reading rows needs, with no
    /// intermediate `String`s. Fails, rather than panics, on fields too long
    /// for a user: a row read back may have been written by another program.
    pub fn from_fields(parts: [&str; 4], verified: bool, version: u64) -> Result<Self, TooLong> {
        let mut ends = [0u16; 3];
        let mut end = 0;
        for (slot, part) in ends.iter_mut().zip(parts) {
            end += part.len();
            *slot = u16::try_from(end).map_err(|_| TooLong(end))?;
        }
        let meta = Meta {
            version,
            ends,
            verified,
        };
        let len = end + parts[3].len();
        let concat = |buf: &mut [u8]| {
            let mut at = 0;
            for part in parts {
                buf[at..at + part.len()].copy_from_slice(part.as_bytes());
                at += part.len();
            }
        };
        let text = if len <= MAX_VALID_TEXT {
            let mut buf = [0u8; MAX_VALID_TEXT];
            concat(&mut buf[..len]);
            ThinArc::from_header_and_slice(meta, &buf[..len])
        } else {
            let mut buf = vec![0u8; len];
            concat(&mut buf);
            ThinArc::from_header_and_slice(meta, &buf)
        };
        Ok(User(text))
    }

    /// The same user at another version: changed in place when this is the
    /// only handle to it, copied otherwise.
    pub fn with_version(mut self, version: u64) -> Self {
        let unique = self.0.with_arc_mut(|arc| {
            triomphe::Arc::get_mut(arc)
                .map(|user| user.header_mut().version = version)
                .is_some()
        });
        if unique {
            self
        } else {
            Self::from_fields(
                [
                    self.id(),
                    self.first_name(),
                    self.last_name(),
                    self.address(),
                ],
                self.verified(),
                version,
            )
            .expect("a user's own fields fit in a user")
        }
    }

    fn meta(&self) -> &Meta {
        &self.0.header.header
    }

    /// The four fields, back to back.
    fn text(&self) -> &str {
        // SAFETY: the bytes were copied from four `&str`s placed back to back
        // (see `from_fields`) and are never changed, so they are valid UTF-8, and
        // each field boundary in `ends` is a boundary between two of them.
        unsafe { std::str::from_utf8_unchecked(&self.0.slice) }
    }

    fn field(&self, index: usize) -> &str {
        let ends = self.meta().ends;
        let start = if index == 0 {
            0
        } else {
            ends[index - 1] as usize
        };
        let end = ends
            .get(index)
            .map_or(self.0.slice.len(), |&end| end as usize);
        &self.text()[start..end]
    }

    pub fn id(&self) -> &str {
        self.field(0)
    }

    pub fn first_name(&self) -> &str {
        self.field(1)
    }

    pub fn last_name(&self) -> &str {
        self.field(2)
    }

    pub fn address(&self) -> &str {
        self.field(3)
    }

    pub fn verified(&self) -> bool {
        self.meta().verified
    }

    /// 1 on create, +1 on every update.
    pub fn version(&self) -> u64 {
        self.meta().version
    }
}

impl PartialEq for User {
    fn eq(&self, other: &Self) -> bool {
        self.meta() == other.meta() && self.0.slice == other.0.slice
    }
}

impl Eq for User {}

impl fmt::Debug for User {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("User")
            .field("id", &self.id())
            .field("first_name", &self.first_name())
            .field("last_name", &self.last_name())
            .field("address", &self.address())
            .field("verified", &self.verified())
            .field("version", &self.version())
            .finish()
    }
}

/// What a committed write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    Created,
    Updated,
    Deleted,
}

/// One committed write, as the change feed publishes it.
///
/// Cheap to clone: the user is shared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// Store-wide sequence number: gapless and strictly increasing in commit order.
    pub seq: u64,
    pub kind: ChangeKind,
    /// The user after the change; for a delete, the user as it was.
    pub user: User,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packed_fields_read_back() {
        let new = NewUser {
            id: String::new(),
            first_name: "Zoë".into(),
            last_name: "".into(),
            address: "1 Main St".into(),
            verified: true,
        };
        let user = User::new("u-1", &new, 7);
        assert_eq!(user.id(), "u-1");
        assert_eq!(user.first_name(), "Zoë");
        assert_eq!(user.last_name(), "");
        assert_eq!(user.address(), "1 Main St");
        assert!(user.verified());
        assert_eq!(user.version(), 7);
    }

    #[test]
    fn with_version_changes_the_version_only_of_the_user_it_returns() {
        let new = NewUser {
            first_name: "Ann".into(),
            address: "1 Main St".into(),
            verified: true,
            ..NewUser::default()
        };
        let fields = |user: &User| {
            (
                user.id().to_owned(),
                user.first_name().to_owned(),
                user.last_name().to_owned(),
                user.address().to_owned(),
                user.verified(),
            )
        };
        let user = User::new("u-1", &new, 1);
        let shared = user.clone();
        // Another handle exists: a copy, the shared one left as it was.
        let bumped = user.with_version(2);
        assert_eq!((shared.version(), bumped.version()), (1, 2));
        assert_eq!(fields(&bumped), fields(&shared));
        assert_ne!(bumped.0.as_ptr(), shared.0.as_ptr());
        // The only handle: changed in place.
        let at = bumped.0.as_ptr();
        let again = bumped.with_version(3);
        assert_eq!(again.0.as_ptr(), at);
        assert_eq!(again.version(), 3);
        assert_eq!(fields(&again), fields(&shared));
    }

    #[test]
    fn fields_too_long_for_a_user_are_an_error_not_a_panic() {
        let long = "a".repeat(70_000);
        assert_eq!(
            User::from_fields(["id", &long, "", ""], false, 1),
            Err(TooLong(70_002))
        );
        // The address is not counted: only where the first three end is.
        let user = User::from_fields(["id", "Ann", "", &long], false, 1).unwrap();
        assert_eq!(user.address().len(), 70_000);
    }

    #[test]
    fn text_longer_than_valid_fields_still_reads_back() {
        let new = NewUser {
            first_name: "é".repeat(300),
            address: "a".repeat(1000),
            ..NewUser::default()
        };
        let user = User::new("id", &new, 1);
        assert_eq!(user.id(), "id");
        assert_eq!(user.first_name(), new.first_name);
        assert_eq!(user.last_name(), "");
        assert_eq!(user.address(), new.address);
        assert_eq!(user.clone(), user);
        assert_ne!(User::new("id", &new, 2), user);
    }
}
