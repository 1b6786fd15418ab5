//! Rows read back are input too.
//!
//! A durable store's rows may have been written by another program: the
//! sqlite3 shell or psql that the README offers for looking at the data,
//! or a build with other rules. The schemas refuse what breaks the API's
//! limits (CHECK constraints), but not everything that reaches a backend
//! is checked there: SQLite's TEXT holds any bytes, not only UTF-8, and a
//! constraint can be dropped. So a backend decodes every user it reads with
//! [`user`], which holds the row to the rules the API holds a new user to
//! ([`validate::stored_user`]). A row that breaks them is an error that
//! names it, never a panic and never a user handed on as if it were sound:
//! GetUser and ListUsers answer `DATA_LOSS` for that user and go on serving
//! the others.

use std::fmt::Display;

use super::StoreError;
use crate::{user::User, validate};

/// A user row's columns as a backend decoded them from its own types, not
/// yet checked.
#[derive(Debug, Clone, Copy)]
pub struct Columns<'a> {
    /// `id`, `first_name`, `last_name`, `address`.
    pub text: [&'a str; 4],
    pub verified: bool,
    pub version: i64,
}

/// The user a stored row holds, or why it holds none (for logs): the row
/// must follow the API's rules, and its version be at least 1.
pub fn user(columns: Columns<'_>) -> Result<User, String> {
    validate::stored_user(columns.text).map_err(|invalid| invalid.to_string())?;
    let version = u64::try_from(columns.version)
        .ok()
        .filter(|&version| version >= 1)
        .ok_or_else(|| format!("version: must be at least 1, got {}", columns.version))?;
    User::from_fields(columns.text, columns.verified, version).map_err(|err| err.to_string())
}

/// The error for the stored user `id`, which cannot be read because of
/// `detail`; logged here, once, where it was found.
pub fn unreadable(id: &str, detail: impl Display) -> StoreError {
    let detail = detail.to_string();
    tracing::error!(
        id,
        %detail,
        "a stored user cannot be read; fix or delete its row (see docs/storage.md)"
    );
    StoreError::Unreadable {
        id: id.to_owned(),
        detail,
    }
}

/// Most rows a refusal to migrate names: enough to find and fix them with a
/// shell, few enough for one log line; the count says how many in all.
pub const MAX_NAMED_ROWS: usize = 10;

/// The rows that keep a schema from taking its constraints, as a refusal
/// names them: the keys of the first [`MAX_NAMED_ROWS`] (ids as `"a"`,
/// seqs as `17`), and how many there are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowNames {
    pub first: Vec<String>,
    pub total: u64,
}

impl std::fmt::Display for RowNames {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.first.join(", "))?;
        let more = self.total.saturating_sub(self.first.len() as u64);
        if more > 0 {
            write!(f, " and {more} more")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn columns<'a>(text: [&'a str; 4], version: i64) -> Columns<'a> {
        Columns {
            text,
            verified: true,
            version,
        }
    }

    #[test]
    fn a_row_within_the_rules_is_a_user() {
        let user = user(columns(["a", "Ann", "Lee", "1 Main St"], 3)).unwrap();
        assert_eq!(
            (
                user.id(),
                user.first_name(),
                user.last_name(),
                user.address()
            ),
            ("a", "Ann", "Lee", "1 Main St")
        );
        assert_eq!((user.verified(), user.version()), (true, 3));
    }

    #[test]
    fn a_row_that_breaks_a_rule_says_which() {
        let long = "x".repeat(70_000);
        let detail = user(columns(["a", &long, "", ""], 1)).unwrap_err();
        assert!(
            detail.starts_with("first_name: must be at most 256 bytes"),
            "{detail}"
        );
        let detail = user(columns(["a b", "Ann", "", ""], 1)).unwrap_err();
        assert!(detail.starts_with("id:"), "{detail}");
        for version in [0, -1] {
            let detail = user(columns(["a", "Ann", "", ""], version)).unwrap_err();
            assert_eq!(
                detail,
                format!("version: must be at least 1, got {version}")
            );
        }
    }

    #[test]
    fn row_names_say_how_many_they_leave_out() {
        let names = |first: &[&str], total| RowNames {
            first: first.iter().map(|name| name.to_string()).collect(),
            total,
        };
        assert_eq!(names(&["\"a\"", "\"b\""], 2).to_string(), "\"a\", \"b\"");
        assert_eq!(names(&["17"], 12).to_string(), "17 and 11 more");
    }

    #[test]
    fn unreadable_names_the_user() {
        let err = unreadable("a", "first_name: too long");
        assert_eq!(
            err,
            StoreError::Unreadable {
                id: "a".into(),
                detail: "first_name: too long".into()
            }
        );
        assert_eq!(
            err.to_string(),
            "stored user \"a\" cannot be read: first_name: too long"
        );
    }
}
