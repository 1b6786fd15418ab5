//! The schema as the binary finds it: created once when replicas start
//! together, a newer one or another program's tables refused with exit
//! status 65 and nothing touched, an unreachable database refused with 69.

use user_service::store::{
    Store,
    postgres::{PostgresOptions, PostgresStore, SCHEMA_VERSION, VERSION_TABLE},
};

use test_support::postgres::{TestSchema, with_schema};

use crate::replica::Replica;

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
        ["user_change_seq", "user_changes", VERSION_TABLE, "users"]
    );
    assert_eq!(version, Some(SCHEMA_VERSION));
}

#[tokio::test]
async fn a_newer_schema_is_refused_untouched() {
    if test_support::postgres::skip_without_database() {
        return;
    }
    let schema = TestSchema::new().await;
    PostgresStore::open(&schema.url, PostgresOptions::new(16))
        .await
        .unwrap()
        .close()
        .await;
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
