//! Rows as the store reads them back: a user from `users` (GetUser, listing
//! pages, the writer's delete, which returns the user it removed), and the
//! changelog's codes for the kinds of change (its rows are `packed`'s).
//!
//! Decoding is fallible (see [`stored`]): the schema's constraints hold
//! the rows to the API's limits, but a row written while one was dropped,
//! or read from a database whose encoding is not UTF-8, gets here too.

use crate::{
    store::{
        StoreError,
        stored::{self, Columns},
    },
    user::{ChangeKind, User},
};

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

/// The columns `id, first_name, last_name, address, verified, version`,
/// from `offset`, the text borrowed from the row.
fn columns_at(row: &tokio_postgres::Row, offset: usize) -> Result<Columns<'_>, String> {
    const NAMES: [&str; 6] = [
        "id",
        "first_name",
        "last_name",
        "address",
        "verified",
        "version",
    ];
    let failed = |index: usize| move |err| format!("{}: {err}", NAMES[index]);
    let text = |index: usize| {
        row.try_get::<_, &str>(offset + index)
            .map_err(failed(index))
    };
    Ok(Columns {
        text: [text(0)?, text(1)?, text(2)?, text(3)?],
        verified: row.try_get(offset + 4).map_err(failed(4))?,
        version: row.try_get(offset + 5).map_err(failed(5))?,
    })
}

/// A user from a row of `users` (`id, first_name, last_name, address,
/// verified, version`), its text copied once, into the user; a row that
/// cannot be read is [`StoreError::Unreadable`], logged.
pub(super) fn user(row: &tokio_postgres::Row) -> Result<User, StoreError> {
    columns_at(row, 0).and_then(stored::user).map_err(|detail| {
        let id = row.try_get::<_, &str>(0).unwrap_or_default();
        stored::unreadable(id, detail)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_reads_back_from_its_code() {
        for kind in [
            ChangeKind::Created,
            ChangeKind::Updated,
            ChangeKind::Deleted,
        ] {
            assert_eq!(kind_of(kind_code(kind)), Some(kind));
        }
        assert_eq!(kind_of(0), None);
        assert_eq!(kind_of(4), None);
    }
}
