//! Rows as the store reads them back: a user from `users` (GetUser, listing
//! pages, the writer's delete, which returns the user it removed) and a
//! change from the changelog (the tailer), and the changelog's codes for
//! the kinds of change. The one place that decodes what the database
//! holds, for the writer, the reader and the tailer alike.

use crate::user::{ChangeKind, User};

/// The changelog's code for each kind of change.
pub(super) fn kind_code(kind: ChangeKind) -> i16 {
    match kind {
        ChangeKind::Created => 1,
        ChangeKind::Updated => 2,
        ChangeKind::Deleted => 3,
    }
}

/// The kind of change a changelog code stands for.
pub(super) fn kind_of(code: i16) -> Option<ChangeKind> {
    match code {
        1 => Some(ChangeKind::Created),
        2 => Some(ChangeKind::Updated),
        3 => Some(ChangeKind::Deleted),
        _ => None,
    }
}

/// A user from `id, first_name, last_name, address, verified, version`
/// (at `offset`), its text copied once, into the user.
pub(super) fn user_at(
    row: &tokio_postgres::Row,
    offset: usize,
) -> Result<User, tokio_postgres::Error> {
    let text = |index| row.try_get::<_, &str>(offset + index);
    let version: i64 = row.try_get(offset + 5)?;
    Ok(User::from_fields(
        [text(0)?, text(1)?, text(2)?, text(3)?],
        row.try_get(offset + 4)?,
        version as u64,
    ))
}

/// A user from a row of `users`: `id, first_name, last_name, address,
/// verified, version`.
pub(super) fn user(row: &tokio_postgres::Row) -> Result<User, tokio_postgres::Error> {
    user_at(row, 0)
}
