//! Where the server keeps its users, as `--store` names it: `memory`, a
//! SQLite file, or a PostgreSQL URL.
//!
//! A SQLite file can be written the ways people write it, each with one
//! meaning:
//!
//! | `--store` | file |
//! | --- | --- |
//! | `sqlite:users.db`, `sqlite:data/users.db` | relative to the working directory |
//! | `sqlite:/var/lib/users.db` | absolute |
//! | `sqlite://users.db` | relative (`sqlite://` and then the path, as sqlx reads it) |
//! | `sqlite:///var/lib/users.db` | absolute (the path is `/var/lib/users.db`) |
//! | `users.db`, `./users.db`, `/var/lib/users.db` | the path as it is |
//!
//! What could mean two things is refused with the form to write instead:
//! four slashes (SQLAlchemy's absolute form, a relative one to sqlx), URL
//! query strings, fragments and escapes (`?mode=ro`, `%20`: the store's
//! settings are flags, and a file name is taken as written), a `~` (which
//! the shell expands only at the start of a word), SQLite's own
//! `:memory:` (say `memory`), a missing path, a kind of store alone
//! (`postgres`), and anything else with a scheme that is not one of these.

use std::{path::PathBuf, str::FromStr};

/// What `--store` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreLocation {
    /// `memory`: users are lost on exit.
    Memory,
    /// A SQLite file.
    Sqlite(PathBuf),
    /// A PostgreSQL URL (`postgres://` or `postgresql://`), as given.
    Postgres(String),
}

/// Why a `--store` value was refused: the message names what to write
/// instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct LocationError(String);

/// The forms, for messages.
const FORMS: &str = "expected `memory`, a SQLite file (`sqlite:PATH`, `sqlite://RELATIVE`, \
                     `sqlite:///ABSOLUTE` or a bare path) or `postgres://USER@HOST:PORT/DB`";

impl FromStr for StoreLocation {
    type Err = LocationError;

    fn from_str(value: &str) -> Result<StoreLocation, LocationError> {
        if value == "memory" {
            return Ok(StoreLocation::Memory);
        }
        if let Some(rest) = value
            .strip_prefix("postgres:")
            .or_else(|| value.strip_prefix("postgresql:"))
        {
            return if rest.starts_with("//") {
                Ok(StoreLocation::Postgres(value.to_owned()))
            } else {
                Err(LocationError(format!(
                    "{value:?}: a PostgreSQL URL starts with `postgres://` \
                     (`postgres://USER@HOST:PORT/DB`, or `postgres:///DB` for the PG* variables' \
                     host)"
                )))
            };
        }
        match value.strip_prefix("sqlite:") {
            Some(rest) => sqlite_url(value, rest),
            None if is_bare_path(value) => bare_path(value),
            None => Err(LocationError(format!("{value:?}: {FORMS}"))),
        }
    }
}

/// A value without a scheme: no `:` at all, or a path that starts like
/// one (`/`, `./`, `../`), whatever it holds.
fn is_bare_path(value: &str) -> bool {
    !value.contains(':') || ["/", "./", "../"].iter().any(|p| value.starts_with(p))
}

fn bare_path(value: &str) -> Result<StoreLocation, LocationError> {
    if value.is_empty() {
        return Err(LocationError(format!("an empty store: {FORMS}")));
    }
    if ["sqlite", "postgres", "postgresql"].contains(&value) {
        return Err(LocationError(format!(
            "{value:?}: a store's kind without where it is: {FORMS} (`./{value}` for a \
             SQLite file of that name)"
        )));
    }
    if value.starts_with('~') {
        return Err(LocationError(format!(
            "{value:?}: `~` is the shell's, expanded only at the start of a word it sees: \
             write the path out (`$HOME/{}`)",
            value.trim_start_matches('~').trim_start_matches('/')
        )));
    }
    Ok(StoreLocation::Sqlite(value.into()))
}

/// `rest` is what follows `sqlite:` in `value`.
fn sqlite_url(value: &str, rest: &str) -> Result<StoreLocation, LocationError> {
    let path = match rest.strip_prefix("//") {
        // `sqlite:///abs` is `/abs`; `sqlite://rel` is `rel`.
        Some(after) => after,
        None => rest,
    };
    if path.starts_with("//") {
        return Err(LocationError(format!(
            "{value:?}: four slashes mean an absolute path to some and a relative one to \
             others; write `sqlite:///{}` for the absolute path",
            path.trim_start_matches('/')
        )));
    }
    if path.is_empty() || path == "/" {
        return Err(LocationError(format!(
            "{value:?}: no file named; write `sqlite:users.db` (relative) or \
             `sqlite:///var/lib/users.db` (absolute)"
        )));
    }
    if path == ":memory:" || path.starts_with("file:") {
        return Err(LocationError(format!(
            "{value:?}: SQLite's special names are not files the server can keep users in; \
             write `memory` for a store that lives in memory, or `sqlite:PATH` for a file"
        )));
    }
    if let Some(c) = path.chars().find(|c| matches!(c, '?' | '#' | '%')) {
        return Err(LocationError(format!(
            "{value:?}: `{c}` in a SQLite URL could be a URL's (parameters, a fragment, an \
             escape) or the file name's; the store's settings are flags (`--sync`), and a \
             file name is taken as written: give a file whose name holds `{c}` as a bare \
             path (`--store '{}'`)",
            if path.starts_with('/') {
                path.to_owned()
            } else {
                format!("./{path}")
            }
        )));
    }
    bare_path(path).map_err(|_| {
        LocationError(format!(
            "{value:?}: `~` is the shell's, expanded only at the start of a word it sees: \
             write the path out (`sqlite:$HOME/{}`)",
            path.trim_start_matches('~').trim_start_matches('/')
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sqlite(value: &str) -> PathBuf {
        match value.parse() {
            Ok(StoreLocation::Sqlite(path)) => path,
            other => panic!("{value}: {other:?}"),
        }
    }

    fn refused(value: &str) -> String {
        match value.parse::<StoreLocation>() {
            Err(LocationError(message)) => message,
            Ok(location) => panic!("{value} was taken as {location:?}"),
        }
    }

    #[test]
    fn each_sqlite_form_has_one_meaning() {
        for (value, path) in [
            ("sqlite:users.db", "users.db"),
            ("sqlite:data/users.db", "data/users.db"),
            ("sqlite:./users.db", "./users.db"),
            ("sqlite:/var/lib/users.db", "/var/lib/users.db"),
            ("sqlite://users.db", "users.db"),
            ("sqlite://data/users.db", "data/users.db"),
            ("sqlite:///var/lib/users.db", "/var/lib/users.db"),
            ("users.db", "users.db"),
            ("./users.db", "./users.db"),
            ("../users.db", "../users.db"),
            ("/var/lib/users.db", "/var/lib/users.db"),
            ("./odd:name.db", "./odd:name.db"),
            ("./what?.db", "./what?.db"),
        ] {
            assert_eq!(sqlite(value), PathBuf::from(path), "{value}");
        }
    }

    #[test]
    fn the_other_stores() {
        assert_eq!("memory".parse(), Ok(StoreLocation::Memory));
        for url in ["postgres://u@h:5432/db", "postgresql:///db", "postgres://"] {
            assert_eq!(url.parse(), Ok(StoreLocation::Postgres(url.into())));
        }
        assert!(refused("postgres:db").contains("postgres://USER@HOST:PORT/DB"));
        assert!(refused("mysql://u@h/db").contains("sqlite:PATH"));
        assert!(refused("").contains("expected `memory`"));
    }

    #[test]
    fn what_could_mean_two_things_is_refused_with_the_form_to_write() {
        for (value, hint) in [
            ("sqlite:", "`sqlite:users.db`"),
            ("sqlite://", "`sqlite:users.db`"),
            ("sqlite:///", "`sqlite:users.db`"),
            (
                "sqlite:////var/lib/users.db",
                "`sqlite:///var/lib/users.db`",
            ),
            ("sqlite:users.db?mode=ro", "`--sync`"),
            (
                "sqlite:///srv/my%20users.db",
                "--store '/srv/my%20users.db'",
            ),
            ("sqlite:my%20users.db", "--store './my%20users.db'"),
            ("sqlite:users.db#x", "a bare path"),
            ("sqlite::memory:", "write `memory`"),
            ("sqlite:file:users.db", "write `memory`"),
            ("sqlite:~/users.db", "`sqlite:$HOME/users.db`"),
            ("~/users.db", "`$HOME/users.db`"),
            ("postgres", "`postgres://USER@HOST:PORT/DB`"),
            ("sqlite", "`./sqlite`"),
        ] {
            let message = refused(value);
            assert!(message.contains(hint), "{value}: {message}");
            assert!(message.contains(&format!("{value:?}")), "{message}");
        }
    }
}
