//! Request validation: the rules every write path applies before it touches
//! the store.
//!
//! Kept apart from gRPC so the rules can be tested on their own; `error`
//! turns a [`ValidationError`] into `INVALID_ARGUMENT` with a
//! `google.rpc.BadRequest` detail naming the field.

use crate::user::NewUser;

/// Longest `first_name`, `last_name` or `address`, in bytes.
pub const MAX_TEXT_LEN: usize = 256;

/// Longest client-supplied id, in characters (ids are ASCII, so also bytes).
pub const MAX_ID_LEN: usize = 64;

/// A request field that breaks a rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {description}")]
pub struct ValidationError {
    /// The field's name as it appears in the proto.
    pub field: &'static str,
    pub description: String,
}

impl ValidationError {
    pub fn new(field: &'static str, description: impl Into<String>) -> Self {
        ValidationError {
            field,
            description: description.into(),
        }
    }
}

/// Checks a user about to be created or replaced. An empty id is allowed: the
/// store assigns one.
pub fn new_user(user: &NewUser) -> Result<(), ValidationError> {
    if !user.id.is_empty() {
        id("id", &user.id)?;
    }
    fields(&user.first_name, &user.last_name, &user.address)
}

/// Checks a user read back from the store, whose row another program may
/// have written: the rules of [`new_user`], with the id required. `parts`
/// are `id`, `first_name`, `last_name` and `address`.
pub fn stored_user(parts: [&str; 4]) -> Result<(), ValidationError> {
    let [stored_id, first_name, last_name, address] = parts;
    id("id", stored_id)?;
    fields(first_name, last_name, address)
}

/// The rules of a user's text fields.
fn fields(first_name: &str, last_name: &str, address: &str) -> Result<(), ValidationError> {
    if first_name.trim().is_empty() {
        return Err(ValidationError::new("first_name", "must not be empty"));
    }
    text("first_name", first_name)?;
    text("last_name", last_name)?;
    text("address", address)?;
    Ok(())
}

/// Checks an id naming a user: 1 to 64 characters of `[A-Za-z0-9_-]`.
/// `field` is the request field that carries it.
pub fn id(field: &'static str, id: &str) -> Result<(), ValidationError> {
    if id.is_empty() {
        return Err(ValidationError::new(field, "must not be empty"));
    }
    if id.len() > MAX_ID_LEN {
        return Err(ValidationError::new(
            field,
            format!("must be at most {MAX_ID_LEN} characters, got {}", id.len()),
        ));
    }
    if let Some(bad) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
    {
        return Err(ValidationError::new(
            field,
            format!("may only contain A-Z, a-z, 0-9, '-' and '_', found {bad:?}"),
        ));
    }
    Ok(())
}

fn text(field: &'static str, value: &str) -> Result<(), ValidationError> {
    if value.len() > MAX_TEXT_LEN {
        return Err(ValidationError::new(
            field,
            format!("must be at most {MAX_TEXT_LEN} bytes, got {}", value.len()),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(first_name: &str) -> NewUser {
        NewUser {
            first_name: first_name.into(),
            ..NewUser::default()
        }
    }

    fn field_of(result: Result<(), ValidationError>) -> &'static str {
        result.expect_err("should be rejected").field
    }

    #[test]
    fn accepts_a_minimal_user() {
        assert_eq!(new_user(&user("Ann")), Ok(()));
    }

    #[test]
    fn first_name_must_not_be_blank() {
        assert_eq!(field_of(new_user(&user(""))), "first_name");
        assert_eq!(field_of(new_user(&user(" \t\n"))), "first_name");
    }

    #[test]
    fn text_fields_are_bounded_in_bytes() {
        let at_limit = "a".repeat(MAX_TEXT_LEN);
        let over = "a".repeat(MAX_TEXT_LEN + 1);
        assert_eq!(new_user(&user(&at_limit)), Ok(()));
        assert_eq!(field_of(new_user(&user(&over))), "first_name");
        // 128 two-byte characters are 256 bytes; one more is over.
        assert_eq!(new_user(&user(&"é".repeat(128))), Ok(()));
        assert_eq!(field_of(new_user(&user(&"é".repeat(129)))), "first_name");

        let mut u = user("Ann");
        u.last_name = over.clone();
        assert_eq!(field_of(new_user(&u)), "last_name");
        let mut u = user("Ann");
        u.address = over;
        assert_eq!(field_of(new_user(&u)), "address");
    }

    #[test]
    fn client_ids_are_checked() {
        let mut u = user("Ann");
        u.id = "Abc-09_z".into();
        assert_eq!(new_user(&u), Ok(()));
        u.id = "a".repeat(MAX_ID_LEN);
        assert_eq!(new_user(&u), Ok(()));
        for bad in [
            "a".repeat(MAX_ID_LEN + 1),
            "a b".into(),
            "a/b".into(),
            "é".into(),
        ] {
            u.id = bad;
            assert_eq!(field_of(new_user(&u)), "id");
        }
    }

    #[test]
    fn stored_users_follow_the_same_rules_with_an_id() {
        let long = "a".repeat(MAX_TEXT_LEN + 1);
        assert_eq!(stored_user(["a", "Ann", "", ""]), Ok(()));
        assert_eq!(field_of(stored_user(["", "Ann", "", ""])), "id");
        assert_eq!(field_of(stored_user(["a b", "Ann", "", ""])), "id");
        assert_eq!(
            field_of(stored_user(["a", "\u{3000}", "", ""])),
            "first_name"
        );
        assert_eq!(field_of(stored_user(["a", &long, "", ""])), "first_name");
        assert_eq!(field_of(stored_user(["a", "Ann", &long, ""])), "last_name");
        assert_eq!(field_of(stored_user(["a", "Ann", "", &long])), "address");
    }

    #[test]
    fn id_names_the_field_it_checks() {
        assert_eq!(field_of(id("delete_id", "")), "delete_id");
        assert_eq!(field_of(id("after_id", "no spaces")), "after_id");
        assert_eq!(id("id", "ok"), Ok(()));
    }
}
