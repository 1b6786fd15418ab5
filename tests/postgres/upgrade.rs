//! Upgrading a running deployment from schema version 2 (a changelog row
//! per change) to version 3 (a row per commit, packed): the migration packs
//! the changes in place and a subscriber goes on with no gap after them;
//! while a replica of the older build is connected the newer one refuses to
//! migrate, naming what to do, and leaves the database as it was.

use std::time::{Duration, Instant};

use user_service::store::postgres::{SCHEMA_VERSION, VERSION_TABLE};

use test_support::{
    PATIENCE,
    postgres::{TestSchema, connect, database_url, psql_ok},
    user_named,
};

use crate::{
    packed::{Change, changelog},
    replica::{Replica, Sync, assert_gapless},
};

/// The exit status of `src/main.rs` for a refused database.
const EXIT_STORE_REFUSED: i32 = 65;

/// The tables as builds of schema version 1 created them.
pub const VERSION_1: &str = "
    CREATE TABLE user_service_schema (version integer NOT NULL);
    INSERT INTO user_service_schema (version) VALUES (1);
    CREATE TABLE users (
        id text COLLATE \"C\" PRIMARY KEY,
        first_name text NOT NULL,
        last_name text NOT NULL,
        address text NOT NULL,
        verified boolean NOT NULL,
        version bigint NOT NULL
    );
    CREATE TABLE user_change_seq (
        only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row),
        seq bigint NOT NULL
    );
    INSERT INTO user_change_seq (seq) VALUES (0);
    CREATE TABLE user_changes (
        seq bigint PRIMARY KEY,
        kind smallint NOT NULL,
        id text COLLATE \"C\" NOT NULL,
        first_name text NOT NULL,
        last_name text NOT NULL,
        address text NOT NULL,
        verified boolean NOT NULL,
        version bigint NOT NULL,
        committed_at timestamptz NOT NULL DEFAULT now()
    );";

/// What version 2 added to version 1: the limits (the blank first name
/// rule shortened to plain spaces, enough for these rows).
const VERSION_2: &str = "
    ALTER TABLE users
        ADD CONSTRAINT id_rules
            CHECK (octet_length(id) BETWEEN 1 AND 64 AND id !~ '[^A-Za-z0-9_-]'),
        ADD CONSTRAINT first_name_rules CHECK (first_name ~ '[^ ]'),
        ADD CONSTRAINT version_rules CHECK (version >= 1);
    ALTER TABLE user_changes
        ADD CONSTRAINT seq_rules CHECK (seq >= 1),
        ADD CONSTRAINT kind_rules CHECK (kind BETWEEN 1 AND 3),
        ADD CONSTRAINT first_name_rules CHECK (first_name ~ '[^ ]');
    UPDATE user_service_schema SET version = 2;";

/// A database at schema version 2 with what a replica of that build wrote:
/// `a`, `b` and `c` created in one commit, `a` updated in a second, `b`
/// deleted in a third (seqs 1 to 5).
fn write_version_2(schema: &TestSchema) {
    psql_ok(
        &schema.url,
        &format!(
            "{VERSION_1} {VERSION_2}
             INSERT INTO users VALUES
                 ('a', 'Ann', 'Lee', '1 Road', true, 2), ('c', 'Cy', '', '', false, 1);
             UPDATE user_change_seq SET seq = 5;
             INSERT INTO user_changes VALUES
                 (1, 1, 'a', 'Ann', '', '', false, 1, now()),
                 (2, 1, 'b', 'Bob', '', '', false, 1, now()),
                 (3, 1, 'c', 'Cy', '', '', false, 1, now()),
                 (4, 2, 'a', 'Ann', 'Lee', '1 Road', true, 2, now() + '1 ms'),
                 (5, 3, 'b', 'Bob', '', '', false, 1, now() + '2 ms');"
        ),
    );
}

fn change(kind: i32, id: &str, first: &str, last: &str, address: &str, version: i64) -> Change {
    Change {
        kind,
        id: id.into(),
        first_name: first.into(),
        last_name: last.into(),
        address: address.into(),
        verified: !address.is_empty(),
        version,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_version_2_changelog_is_packed_in_place_and_the_feed_goes_on_after_it() {
    if test_support::postgres::skip_without_database() {
        return;
    }
    let schema = TestSchema::new().await;
    write_version_2(&schema);
    let replica = Replica::start(&schema.url, &[]).await;
    let db = schema.client().await;
    let version: i32 = db
        .query_one(&format!("SELECT version FROM {VERSION_TABLE}"), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(version, SCHEMA_VERSION);
    let old_table = db
        .query_one("SELECT to_regclass('user_changes') IS NULL", &[])
        .await
        .unwrap();
    assert!(old_table.get::<_, bool>(0), "user_changes is dropped");
    // One batch per commit of the older build, each change as it was.
    let ranges: Vec<(i64, i64)> = db
        .query(
            "SELECT first_seq, last_seq FROM user_change_batches ORDER BY last_seq",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    assert_eq!(ranges, [(1, 3), (4, 4), (5, 5)]);
    let expected = [
        change(1, "a", "Ann", "", "", 1),
        change(1, "b", "Bob", "", "", 1),
        change(1, "c", "Cy", "", "", 1),
        change(2, "a", "Ann", "Lee", "1 Road", 2),
        change(3, "b", "Bob", "", "", 1),
    ];
    assert_eq!(
        changelog(&db).await,
        (1..).zip(expected).collect::<Vec<_>>()
    );

    // The feed goes on from seq 6, on this replica and on a second one.
    let other = Replica::start(&schema.url, &[]).await;
    let mut on_other = Sync::open(&other).await;
    let mut client = replica.client().await;
    for id in ["d", "e"] {
        client.add_user(user_named(id, "N")).await.unwrap();
    }
    assert_gapless(&on_other.changes_through(7).await, 6);
    let (users, _) = test_support::list_after(&mut client, "").await;
    assert_eq!(users, ["a", "c", "d", "e"]);
}

/// A database of its own, dropped at the end: a connection that looks like
/// an older replica's must not hold up the other tests' migrations.
struct OwnDatabase {
    name: String,
    url: String,
}

impl OwnDatabase {
    async fn new() -> OwnDatabase {
        let base = database_url();
        let name = format!("upgrade_{}_{}", std::process::id(), fastrand::u32(..));
        connect(&base)
            .await
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap();
        let (head, query) = match base.split_once('?') {
            Some((head, query)) => (head, format!("?{query}")),
            None => (base.as_str(), String::new()),
        };
        let server = head.rsplit_once('/').expect("a database in the URL").0;
        OwnDatabase {
            url: format!("{server}/{name}{query}"),
            name,
        }
    }
}

impl Drop for OwnDatabase {
    fn drop(&mut self) {
        psql_ok(
            &database_url(),
            &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_migration_waits_for_every_replica_of_the_older_build_to_stop() {
    if test_support::postgres::skip_without_database() {
        return;
    }
    let database = OwnDatabase::new().await;
    let schema = TestSchema::in_database(&database.url).await;
    write_version_2(&schema);
    // An older replica's tailer: it runs this read every time it reads.
    let older = schema.client().await;
    let read = "SELECT seq, kind, id, first_name, last_name, address, verified, version
                 FROM user_changes WHERE seq > $1 ORDER BY seq LIMIT $2";
    let rows = older.query(read, &[&0i64, &4096i64]).await.unwrap();
    assert_eq!(rows.len(), 5);

    let (status, log) = Replica::run_to_exit(&schema.url).await;
    assert_eq!(status.code(), Some(EXIT_STORE_REFUSED), "{log}");
    for words in [
        "1 connection(s) of a user-service build older than schema version 3",
        "stop every replica of the older build",
        "docs/scale-out.md, \"Upgrading\"",
        "database left untouched",
    ] {
        assert!(log.contains(words), "{words}: {log}");
    }
    let db = schema.client().await;
    let untouched = db
        .query_one(
            &format!(
                "SELECT (SELECT version FROM {VERSION_TABLE}),
                        (SELECT count(*) FROM user_changes),
                        to_regclass('user_change_batches') IS NULL"
            ),
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        (
            untouched.get::<_, i32>(0),
            untouched.get::<_, i64>(1),
            untouched.get::<_, bool>(2)
        ),
        (2, 5, true)
    );

    // The older replica stopped, the newer one migrates.
    drop(older);
    let started = Instant::now();
    loop {
        let left: i64 = db
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE datname = current_database() AND pid <> pg_backend_pid()
                   AND strpos(query, 'FROM user_changes WHERE seq > $1') > 0",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if left == 0 {
            break;
        }
        assert!(
            started.elapsed() < PATIENCE,
            "the older replica's connection stays"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(db);
    let replica = Replica::start(&schema.url, &[]).await;
    let mut client = replica.client().await;
    client.add_user(user_named("d", "N")).await.unwrap();
    let db = schema.client().await;
    let log = changelog(&db).await;
    assert_eq!(log.len(), 6);
    assert_eq!(log[5].1.id, "d");
}
