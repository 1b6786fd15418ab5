//! Files the server refuses to open, left as they were.

use std::path::Path;

use test_support::user_named;
use user_service::{
    proto::GetUserRequest,
    store::sqlite::{APPLICATION_ID, SCHEMA_VERSION},
};

use crate::{run_to_exit, shell::sqlite3_ok, start};

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

/// A store file as schema version 2 left it (no constraints), written with
/// the sqlite3 shell: users that break the API's limits make the migration
/// refuse the file, naming them; fixed with the shell, it migrates keeping
/// every user.
#[tokio::test]
async fn users_outside_the_limits_refuse_the_migration_until_fixed() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("users.db");
    sqlite3_ok(
        &db,
        &format!(
            "PRAGMA application_id = {APPLICATION_ID};
             PRAGMA journal_mode = WAL;
             CREATE TABLE schema_version (version INTEGER NOT NULL) STRICT;
             INSERT INTO schema_version (version) VALUES (2);
             CREATE TABLE users (
                 id TEXT PRIMARY KEY NOT NULL,
                 first_name TEXT NOT NULL,
                 last_name TEXT NOT NULL,
                 address TEXT NOT NULL,
                 verified INTEGER NOT NULL,
                 version INTEGER NOT NULL
             ) STRICT, WITHOUT ROWID;
             CREATE TABLE change_seq (seq INTEGER NOT NULL) STRICT;
             INSERT INTO change_seq (seq) VALUES (3);
             INSERT INTO users VALUES ('a', 'Ann', '', '', 1, 1);
             INSERT INTO users VALUES ('big', printf('%.*c', 70000, 'x'), '', '', 0, 1);
             INSERT INTO users VALUES ('no id', 'Bob', '', '', 0, 1);"
        ),
    );
    assert_refused(
        &db,
        r#"the stored users with ids "big", "no id" break the limits"#,
    );

    sqlite3_ok(
        &db,
        "UPDATE users SET first_name = 'Big' WHERE id = 'big';
         DELETE FROM users WHERE id = 'no id';",
    );
    let server = start(&db);
    let mut client = server.client().await;
    for (id, name) in [("a", "Ann"), ("big", "Big")] {
        let user = client
            .get_user(GetUserRequest { id: id.into() })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(user.first_name, name);
    }
    let (status, log) = server.stop().await;
    assert!(status.success(), "{log}");
    assert!(
        log.contains(&format!("from=2 to={SCHEMA_VERSION}")),
        "{log}"
    );
}

/// The exit code for a store file another server holds (see `src/main.rs`).
const EXIT_STORE_IN_USE: i32 = 75;

/// A second server on a file another one serves would commit changes that
/// the first one's SyncUsers streams never see: it refuses to start, and
/// the first goes on serving. The lock goes with its holder's process, so a
/// start after a `kill -9` of the holder is not blocked.
#[tokio::test]
async fn a_second_server_on_the_same_file_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("users.db");
    let first = start(&db);
    let mut client = first.client().await;
    client.add_user(user_named("kept", "Kept")).await.unwrap();

    // The same file, and the same file through a symlink.
    let link = dir.path().join("link.db");
    std::os::unix::fs::symlink(&db, &link).unwrap();
    for path in [&db, &link] {
        let (status, log) = run_to_exit(path);
        assert_eq!(status.code(), Some(EXIT_STORE_IN_USE), "{log}");
        assert!(
            log.contains(&format!(
                "{}: in use by another user-service",
                path.display()
            )),
            "{log}"
        );
        assert!(!log.contains("listening"), "{log}");
    }

    // The first server never noticed.
    let added = client.add_user(user_named("after", "After")).await.unwrap();
    assert_eq!(added.into_inner().user.unwrap().id, "after");

    first.kill();
    let second = start(&db);
    let mut client = second.client().await;
    for id in ["kept", "after"] {
        let user = client
            .get_user(GetUserRequest { id: id.into() })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(user.id, id);
    }
    let (status, log) = second.stop().await;
    assert!(status.success(), "{log}");
}

/// Each way of naming a SQLite file opens the file it says: relative forms
/// in the working directory, absolute ones where they point; a form that
/// could mean two things is refused with the one to write.
#[tokio::test]
async fn store_forms_open_the_files_they_name() {
    let dir = tempfile::tempdir().unwrap();
    let cwd = dir.path().join("cwd");
    std::fs::create_dir(&cwd).unwrap();
    let absolute = dir.path().join("absolute");
    std::fs::create_dir(&absolute).unwrap();
    let abs = |name: &str| absolute.join(name).display().to_string();
    let forms = [
        ("sqlite:colon.db".to_owned(), cwd.join("colon.db")),
        ("sqlite://slashes.db".to_owned(), cwd.join("slashes.db")),
        (
            format!("sqlite://{}", abs("three.db")),
            absolute.join("three.db"),
        ),
        (format!("sqlite:{}", abs("one.db")), absolute.join("one.db")),
        ("bare.db".to_owned(), cwd.join("bare.db")),
        (abs("bare-absolute.db"), absolute.join("bare-absolute.db")),
    ];
    for (store, file) in &forms {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_user-service"));
        command.current_dir(&cwd).args(["--store", store]);
        let server = test_support::ServerProcess::spawn(command);
        let mut client = server.client().await;
        client.add_user(user_named("in-it", "In")).await.unwrap();
        let (status, log) = server.stop().await;
        assert!(status.success(), "{log}");
        assert!(
            file.exists(),
            "{store} should open {}:\n{log}",
            file.display()
        );
    }
    let mut files: Vec<_> = std::fs::read_dir(&cwd)
        .unwrap()
        .chain(std::fs::read_dir(&absolute).unwrap())
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .collect();
    files.sort();
    assert_eq!(
        files,
        [
            "bare-absolute.db",
            "bare.db",
            "colon.db",
            "one.db",
            "slashes.db",
            "three.db"
        ]
    );

    let four = format!("sqlite:///{}", abs("four.db"));
    let (status, log) = test_support::run_to_exit({
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_user-service"));
        command.current_dir(&cwd).args(["--store", &four]);
        command
    });
    assert_eq!(status.code(), Some(2), "{log}");
    assert!(
        log.contains(&format!("write `sqlite://{}`", abs("four.db"))),
        "{log}"
    );
}
