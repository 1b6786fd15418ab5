//! Settings the server cannot start with: refused at startup with
//! `EX_CONFIG`, naming what to fix.

use crate::replica::Replica;

/// The exit status for settings that cannot be used (see `src/main.rs`).
const EXIT_CONFIG: i32 = 78;

#[tokio::test]
async fn a_database_that_does_not_exist_is_a_setting_to_fix() {
    if test_support::postgres::skip_without_database() {
        return;
    }
    let base = test_support::postgres::database_url();
    let (server, _) = base.rsplit_once('/').expect("a URL with a database");
    let url = format!("{server}/no_such_user_service_db");
    let (status, log) = Replica::run_to_exit(&url).await;
    assert_eq!(status.code(), Some(EXIT_CONFIG), "{log}");
    assert!(
        log.contains(r#"database "no_such_user_service_db" does not exist"#),
        "{log}"
    );
    assert!(log.contains("createdb"), "{log}");
    assert!(!log.contains("listening"), "{log}");
}

#[tokio::test]
async fn an_sslmode_libpq_does_not_know_is_refused_with_the_ones_it_does() {
    let url = "postgres://postgres@127.0.0.1:1/postgres?sslmode=verify";
    let (status, log) = Replica::run_to_exit(url).await;
    assert_eq!(status.code(), Some(EXIT_CONFIG), "{log}");
    assert!(
        log.contains(r#"invalid sslmode "verify": libpq's are disable, allow, prefer, require, verify-ca and verify-full"#),
        "{log}"
    );
}
