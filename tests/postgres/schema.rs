//! The schema as the binary finds it: created once when replicas start
//! together, a newer one or another program's tables refused with exit
//! status 65 and nothing touched, an older one with rows outside the limits
//! refused likewise until they are fixed, an unreachable database refused
//! with 69; and the constraints' blank first names are the API's.

use user_service::store::{
    Store,
    postgres::{PostgresOptions, PostgresStore, SCHEMA_VERSION, VERSION_TABLE},
};

use test_support::postgres::{TestSchema, psql_ok, with_schema};

use crate::{replica::Replica, upgrade::VERSION_1};

/// The exit statuses of `src/main.rs`.
const EXIT_STORE_REFUSED: i32 = 65;
const EXIT_UNAVAILABLE: i32 = 69;

/// The tables of the schema and the recorded version.
async fn snapshot(schema: &TestSchema) -> (Vec<String>, Option<i32>) {
    let db = schema.client().await;
    let tables = db
        .query(
            "SELECT tablename::text FROM pg_tables WHERE schemaname = current_schema()
             ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    let version = db
        .query_opt(&format!("SELECT version FROM {VERSION_TABLE}"), &[])
        .await
        .ok()
        .flatten()
        .map(|row| row.get(0));
    (tables, version)
}

/// Creates this build's schema in `schema`, as a store opening it does.
async fn create(schema: &TestSchema) {
    PostgresStore::open(&schema.url, PostgresOptions::new(16))
        .await
        .unwrap()
        .close()
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_starting_together_create_the_schema_once() {
    if test_support::postgres::skip_without_database() {
        return;
    }
    let schema = TestSchema::new().await;
    let opening = (0..3).map(|_| {
        let url = schema.url.clone();
        tokio::spawn(async move { PostgresStore::open(&url, PostgresOptions::new(16)).await })
    });
    for open in opening.collect::<Vec<_>>() {
        open.await
            .unwrap()
            .expect("each replica opens")
            .close()
            .await;
    }
    let (tables, version) = snapshot(&schema).await;
    assert_eq!(
        tables,
        [
            "user_change_batches",
            "user_change_seq",
            VERSION_TABLE,
            "users"
        ]
    );
    assert_eq!(version, Some(SCHEMA_VERSION));
}

#[tokio::test]
async fn a_newer_schema_is_refused_untouched() {
    if test_support::postgres::skip_without_database() {
        return;
    }
    let schema = TestSchema::new().await;
    create(&schema).await;
    let db = schema.client().await;
    db.execute(
        &format!("UPDATE {VERSION_TABLE} SET version = $1"),
        &[&(SCHEMA_VERSION + 1)],
    )
    .await
    .unwrap();
    let before = snapshot(&schema).await;
    let (status, log) = Replica::run_to_exit(&schema.url).await;
    assert_eq!(status.code(), Some(EXIT_STORE_REFUSED), "{log}");
    assert!(log.contains("is newer than this build supports"), "{log}");
    assert!(log.contains("database left untouched"), "{log}");
    assert_eq!(snapshot(&schema).await, before);
}

#[tokio::test]
async fn another_programs_users_table_is_refused_untouched() {
    if test_support::postgres::skip_without_database() {
        return;
    }
    let schema = TestSchema::new().await;
    let db = schema.client().await;
    db.batch_execute("CREATE TABLE users (name text); INSERT INTO users VALUES ('theirs')")
        .await
        .unwrap();
    let before = snapshot(&schema).await;
    let (status, log) = Replica::run_to_exit(&schema.url).await;
    assert_eq!(status.code(), Some(EXIT_STORE_REFUSED), "{log}");
    assert!(log.contains("is not user-service's"), "{log}");
    assert_eq!(snapshot(&schema).await, before);
}

#[tokio::test]
async fn an_unreachable_database_stops_the_server_at_startup() {
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = with_schema(&format!("postgres://postgres@127.0.0.1:{port}/none"), "x");
    let (status, log) = Replica::run_to_exit(&url).await;
    assert_eq!(status.code(), Some(EXIT_UNAVAILABLE), "{log}");
    assert!(log.contains("cannot reach PostgreSQL"), "{log}");
}

/// The names of the CHECK constraints on our tables, and whether each is
/// validated.
async fn constraints(schema: &TestSchema) -> Vec<(String, String, bool)> {
    let db = schema.client().await;
    db.query(
        "SELECT conrelid::regclass::text, conname::text, convalidated FROM pg_constraint
         WHERE connamespace = current_schema()::regnamespace AND contype = 'c'
         ORDER BY 1, 2",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|row| (row.get(0), row.get(1), row.get(2)))
    .collect()
}

/// A schema at version 1 (no limits), with users written with psql that
/// break them: the migration refuses it, naming them, and leaves it as it
/// was; fixed with psql, it migrates.
#[tokio::test]
async fn users_outside_the_limits_refuse_the_migration_until_fixed() {
    // The limits a schema of this build has.
    let limits = {
        let fresh = TestSchema::new().await;
        create(&fresh).await;
        constraints(&fresh).await
    };
    let schema = TestSchema::new().await;
    psql_ok(
        &schema.url,
        &format!(
            "{VERSION_1}
             INSERT INTO users VALUES ('a', 'Ann', '', '', false, 1);
             INSERT INTO users VALUES ('big', repeat('x', 70000), '', '', false, 1);
             INSERT INTO users VALUES ('no id', 'Bob', '', '', false, 1);"
        ),
    );
    let before = (snapshot(&schema).await, constraints(&schema).await);
    let (status, log) = Replica::run_to_exit(&schema.url).await;
    assert_eq!(status.code(), Some(EXIT_STORE_REFUSED), "{log}");
    assert!(
        log.contains(r#"the rows of users with ids "big", "no id" break the limits"#),
        "{log}"
    );
    assert!(log.contains("database left untouched"), "{log}");
    assert_eq!(
        (snapshot(&schema).await, constraints(&schema).await),
        before
    );

    psql_ok(
        &schema.url,
        "UPDATE users SET first_name = 'Big' WHERE id = 'big';
         DELETE FROM users WHERE id = 'no id';",
    );
    let store = PostgresStore::open(&schema.url, PostgresOptions::new(16))
        .await
        .expect("the fixed schema migrates");
    assert_eq!(store.get("big").await.unwrap().first_name(), "Big");
    store.close().await;
    assert_eq!(snapshot(&schema).await.1, Some(SCHEMA_VERSION));
    assert_eq!(constraints(&schema).await, limits, "every limit, validated");
    assert!(limits.iter().all(|(_, _, validated)| *validated));
}

/// The schema's blank first names are `validate`'s: every character Rust's
/// `trim` trims, and no other, read from the constraint itself.
#[tokio::test]
async fn the_schema_trims_what_validation_trims() {
    let schema = TestSchema::new().await;
    create(&schema).await;
    let db = schema.client().await;
    {
        let table = "users";
        let rule: String = db
            .query_one(
                "SELECT pg_get_expr(conbin, conrelid) FROM pg_constraint
                 WHERE conrelid = $1::text::regclass AND conname = 'first_name_rules'",
                &[&table],
            )
            .await
            .unwrap()
            .get(0);
        // Every code point but NUL and the surrogates, twice over.
        let refused: Vec<i32> = db
            .query_one(
                &format!(
                    "SELECT array_agg(c ORDER BY c) FROM (
                         SELECT c, repeat(chr(c), 2) AS first_name
                         FROM generate_series(1, 1114111) AS c
                         WHERE c NOT BETWEEN 55296 AND 57343
                     ) AS chars WHERE NOT ({rule})"
                ),
                &[],
            )
            .await
            .unwrap()
            .get(0);
        let blank: Vec<i32> = (1..=0x10FFFF)
            .filter_map(char::from_u32)
            .filter(|c| c.is_whitespace())
            .map(|c| c as i32)
            .collect();
        assert_eq!(refused, blank, "{table}");
    }
}
