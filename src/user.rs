//! The domain types: a stored [`User`], the [`NewUser`] a client asks to store,
//! and the [`Change`] that every committed write produces.
//!
//! Nothing here knows about gRPC; `proto` converts to and from the wire types.

use std::{fmt, sync::Arc};

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

/// A stored user.
///
/// The four text fields live in one heap allocation rather than four: a
/// million users then cost one allocation each instead of four, which is most
/// of the difference between fitting in 256 MB and not. Fields are read
/// through accessors; a `User` never changes once built (an update stores a
/// new one), so it is shared as `Arc<User>` between the store, the change feed
/// and replies without copying.
#[derive(Clone, PartialEq, Eq)]
pub struct User {
    /// `id`, `first_name`, `last_name` and `address`, back to back.
    text: Box<str>,
    /// Where `id`, `first_name` and `last_name` end in `text`. Field lengths
    /// are validated (at most 256 bytes each), so `u16` is always enough.
    ends: [u16; 3],
    verified: bool,
    version: u64,
}

impl User {
    /// Builds a user from validated parts.
    ///
    /// # Panics
    /// If the fields together exceed 64 KiB, which validation rules out.
    pub fn new(id: &str, user: &NewUser, version: u64) -> Self {
        fn end(text: &str) -> u16 {
            u16::try_from(text.len()).expect("validated field lengths fit in u16")
        }
        let mut text = String::with_capacity(
            id.len() + user.first_name.len() + user.last_name.len() + user.address.len(),
        );
        text.push_str(id);
        let id_end = end(&text);
        text.push_str(&user.first_name);
        let first_end = end(&text);
        text.push_str(&user.last_name);
        let last_end = end(&text);
        text.push_str(&user.address);
        User {
            text: text.into_boxed_str(),
            ends: [id_end, first_end, last_end],
            verified: user.verified,
            version,
        }
    }

    pub fn id(&self) -> &str {
        &self.text[..self.ends[0] as usize]
    }

    pub fn first_name(&self) -> &str {
        &self.text[self.ends[0] as usize..self.ends[1] as usize]
    }

    pub fn last_name(&self) -> &str {
        &self.text[self.ends[1] as usize..self.ends[2] as usize]
    }

    pub fn address(&self) -> &str {
        &self.text[self.ends[2] as usize..]
    }

    pub fn verified(&self) -> bool {
        self.verified
    }

    /// 1 on create, +1 on every update.
    pub fn version(&self) -> u64 {
        self.version
    }
}

impl fmt::Debug for User {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("User")
            .field("id", &self.id())
            .field("first_name", &self.first_name())
            .field("last_name", &self.last_name())
            .field("address", &self.address())
            .field("verified", &self.verified)
            .field("version", &self.version)
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
    pub user: Arc<User>,
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
}
