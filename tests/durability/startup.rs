//! Files the server refuses to open, left as they were.

use std::path::Path;

use user_service::store::sqlite::{APPLICATION_ID, SCHEMA_VERSION};

use crate::run_to_exit;

/// The exit code for a refused store file (see `src/main.rs`).
const EXIT_STORE_REFUSED: i32 = 65;

fn assert_refused(db: &Path, why: &str) {
    let before = std::fs::read(db).unwrap();
    let (status, log) = run_to_exit(db);
    assert_eq!(status.code(), Some(EXIT_STORE_REFUSED), "{log}");
    assert!(log.contains(why), "the log should say {why:?}:\n{log}");
    assert!(log.contains("left untouched"), "{log}");
    assert!(!log.contains("listening"), "{log}");
    assert_eq!(std::fs::read(db).unwrap(), before, "the file changed");
}

#[test]
fn refuses_a_corrupted_foreign_or_newer_file_at_startup() {
    let dir = tempfile::tempdir().unwrap();

    let garbage = dir.path().join("garbage.db");
    std::fs::write(&garbage, "id,first_name\n1,Ann\n".repeat(100)).unwrap();
    assert_refused(&garbage, "not a SQLite database");

    let foreign = dir.path().join("foreign.db");
    let conn = rusqlite::Connection::open(&foreign).unwrap();
    conn.execute_batch("CREATE TABLE notes (body TEXT); INSERT INTO notes VALUES ('hi');")
        .unwrap();
    drop(conn);
    assert_refused(&foreign, "not a user-service store");

    // A store written by a newer build: same application id, higher version.
    let newer = dir.path().join("newer.db");
    let conn = rusqlite::Connection::open(&newer).unwrap();
    conn.execute_batch(&format!(
        "PRAGMA application_id = {};
         CREATE TABLE schema_version (version INTEGER NOT NULL);
         INSERT INTO schema_version VALUES ({});",
        APPLICATION_ID,
        SCHEMA_VERSION + 1
    ))
    .unwrap();
    drop(conn);
    assert_refused(&newer, "is newer than this build supports");
}
