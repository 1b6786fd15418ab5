//! `user-load copy` from a server on a SQLite store to one on a PostgreSQL
//! store: every id and field kept, a refused user reported with its reason
//! and a failing exit status, and a copy resumed with `--after-id`.

use std::process::{Command, Output, Stdio};

use test_support::{Backend, Client, TestServer, list_all, user, user_named, within};
use user_service::proto::User;

/// Exit status of a copy that left users behind (see `user-load --help`).
const EXIT_FAILED: i32 = 1;

/// Runs `user-load copy` with `args` to its end, bounded (blocking; call it
/// off the servers' runtime threads).
async fn copy(args: Vec<String>) -> (i32, String, String) {
    let run = tokio::task::spawn_blocking(move || {
        let child = Command::new(env!("CARGO_BIN_EXE_user-load"))
            .arg("copy")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn user-load");
        child.wait_with_output().expect("user-load ran")
    });
    let Output {
        status,
        stdout,
        stderr,
    } = within("user-load copy", run).await.unwrap();
    (
        status.code().unwrap_or(-1),
        String::from_utf8(stdout).unwrap(),
        String::from_utf8(stderr).unwrap(),
    )
}

/// What a copy keeps of a user: everything but the version, which starts
/// again at 1.
fn kept(user: &User) -> (String, String, String, String, bool) {
    (
        user.id.clone(),
        user.first_name.clone(),
        user.last_name.clone(),
        user.address.clone(),
        user.verified,
    )
}

/// 150 users with ids of their own and 100 with ids the server assigns
/// (UUIDv7s, which sort before the others), every field varied.
async fn fill(client: &mut Client) {
    let mut users: Vec<User> = (0..150)
        .map(|i| User {
            last_name: format!("Last {i}"),
            address: format!("{i} Copy Street"),
            verified: i % 3 == 0,
            ..user_named(&format!("u{i:03}"), &format!("First {i}"))
        })
        .collect();
    users.extend((0..100).map(|i| User {
        verified: i % 2 == 0,
        ..user(&format!("Assigned {i}"))
    }));
    let reply = client
        .bulk_add_users(tokio_stream::iter(users))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((reply.added, reply.failed), (250, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_sqlite_to_postgres_keeping_ids_and_reporting_refusals() {
    if test_support::postgres::skip_without_database() {
        return;
    }
    let source = Backend::Sqlite.start().await;
    let destination = Backend::Postgres.start().await;
    let mut from = source.client().await;
    let mut to = destination.client().await;
    fill(&mut from).await;
    // Already in the destination, with other fields: refused, not replaced.
    to.add_user(user_named("u100", "Other")).await.unwrap();
    let users = list_all(&mut from).await;
    let last = users.last().unwrap().id.clone();

    let addrs = |from: &TestServer, to: &TestServer| {
        vec![
            "--from".to_owned(),
            from.addr.to_string(),
            "--to".to_owned(),
            to.addr.to_string(),
        ]
    };
    let (code, stdout, stderr) = copy(addrs(&source, &destination)).await;
    assert_eq!(code, EXIT_FAILED, "{stdout}{stderr}");
    assert!(
        stdout.contains("read 250, added 249, failed 1\n"),
        "{stdout}"
    );
    assert!(
        stdout.contains(r#"failed "u100": AlreadyExists: user "u100" already exists"#),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!(
            "last id read: {last:?} (--after-id {last} goes on"
        )),
        "{stdout}"
    );
    assert!(stderr.contains("1 users not copied"), "{stderr}");

    let copied = list_all(&mut to).await;
    assert_eq!(copied.len(), 250);
    for (original, copy) in users.iter().zip(&copied) {
        if original.id == "u100" {
            assert_eq!(copy.first_name, "Other");
            continue;
        }
        assert_eq!(kept(copy), kept(original));
        assert_eq!(copy.version, 1);
    }

    // Resumed after an id, into an empty store: the users after it.
    let resumed = Backend::Postgres.start().await;
    let after = "u074";
    let mut args = addrs(&source, &resumed);
    args.extend(["--after-id".to_owned(), after.to_owned()]);
    let (code, stdout, stderr) = copy(args).await;
    assert_eq!(code, 0, "{stdout}{stderr}");
    let expected: Vec<_> = users
        .iter()
        .filter(|user| user.id.as_str() > after)
        .map(kept)
        .collect();
    assert_eq!(expected.len(), 75);
    assert!(stdout.contains("read 75, added 75, failed 0\n"), "{stdout}");
    let copied: Vec<_> = list_all(&mut resumed.client().await)
        .await
        .iter()
        .map(kept)
        .collect();
    assert_eq!(copied, expected);
}

#[tokio::test]
async fn a_server_out_of_reach_stops_the_copy_with_a_failure() {
    let source = Backend::Memory.start().await;
    // A port nothing listens on: bound, then closed.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let nowhere = closed.local_addr().unwrap().to_string();
    drop(closed);
    let args = vec![
        "--from".to_owned(),
        source.addr.to_string(),
        "--to".to_owned(),
        nowhere.clone(),
    ];
    let (code, stdout, stderr) = copy(args).await;
    assert_eq!(code, EXIT_FAILED, "{stdout}{stderr}");
    assert!(
        stderr.contains(&format!(
            "copy stopped: 0 calls reached the server at {nowhere}: cannot connect"
        )),
        "{stderr}"
    );
}
