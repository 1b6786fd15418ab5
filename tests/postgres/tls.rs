//! TLS to the database, as libpq's `sslmode` and `sslrootcert` say: each
//! mode against a throwaway cluster that serves a certificate for
//! `localhost` from a test CA, once serving TLS only and once offering it
//! beside plain connections.

use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair,
};

use test_support::{
    postgres::{Cluster, connect},
    user_named,
};
use user_service::store::postgres::Connector;

use crate::replica::Replica;

/// The exit status for settings that cannot be used (see `src/main.rs`).
const EXIT_CONFIG: i32 = 78;

/// The exit status for a database out of reach, which one whose
/// certificate does not verify is.
const EXIT_UNAVAILABLE: i32 = 69;

/// A CA's PEM and the CA itself, to sign with.
fn new_ca(name: &str) -> (String, CertifiedIssuer<'static, KeyPair>) {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
    (ca.pem(), ca)
}

/// A CA, and a certificate for `localhost` signed by it: the CA's PEM, the
/// certificate's and its key's.
fn certificates() -> (String, String, String) {
    let (ca_pem, ca) = new_ca("user-service test CA");
    let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &ca).unwrap();
    (ca_pem, cert.pem(), key.serialize_pem())
}

/// The files a test points `sslrootcert` and `HOME` at.
struct Files {
    _dir: tempfile::TempDir,
    /// The CA that signed the cluster's certificate.
    ca: String,
    /// A CA that signed nothing of the cluster's.
    other_ca: String,
    /// A home without `~/.postgresql/root.crt`.
    home: String,
}

impl Files {
    fn new(ca_pem: &str) -> Files {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, text).unwrap();
            path.display().to_string()
        };
        let ca = write("ca.pem", ca_pem);
        let other_ca = write("other-ca.pem", &new_ca("another CA").0);
        let home = dir.path().join("home");
        std::fs::create_dir(&home).unwrap();
        Files {
            ca,
            other_ca,
            home: home.display().to_string(),
            _dir: dir,
        }
    }
}

/// Connects as the store would to `host` on the cluster with `params`
/// (with no `PG*` variables, and a home without a root certificate):
/// whether the connection is TLS, or the error in full.
async fn ssl_in_use(
    cluster: &Cluster,
    host: &str,
    params: &str,
    files: &Files,
) -> Result<bool, String> {
    let url = format!(
        "postgres://postgres@{host}:{}/postgres?{params}",
        cluster.port
    );
    let home = files.home.clone();
    let connector =
        Connector::from_url_and_env(&url, move |name| (name == "HOME").then(|| home.clone()))
            .map_err(|err| err.to_string())?;
    let client = connector.connect().await.map_err(|err| {
        let mut text = err.to_string();
        let mut source = std::error::Error::source(&err);
        while let Some(cause) = source {
            text.push_str(&format!(": {cause}"));
            source = cause.source();
        }
        text
    })?;
    let row = client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap();
    Ok(row.get(0))
}

async fn cluster_with_tls(cert: String, key: String, only: bool) -> Cluster {
    tokio::task::spawn_blocking(move || {
        let cluster = Cluster::start();
        if only {
            cluster.require_tls(&cert, &key);
        } else {
            cluster.offer_tls(&cert, &key);
        }
        cluster
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_sslmode_against_a_server_that_serves_tls_only() {
    if test_support::postgres::skip_without_server_programs() {
        return;
    }
    let (ca, cert, key) = certificates();
    let files = Files::new(&ca);
    let cluster = cluster_with_tls(cert, key, true).await;
    let (ca, other) = (&files.ca, &files.other_ca);
    let ok = |ssl: Result<bool, String>, what: &str| assert_eq!(ssl, Ok(true), "{what}");
    let refused = |ssl: Result<bool, String>, what: &str, why: &str| match ssl {
        Err(err) => assert!(err.contains(why), "{what}: {err}"),
        Ok(ssl) => panic!("{what} connected (ssl {ssl})"),
    };

    refused(
        ssl_in_use(&cluster, "localhost", "sslmode=disable", &files).await,
        "disable",
        "no encryption",
    );
    // Plain first, refused by the server, then TLS.
    ok(
        ssl_in_use(&cluster, "localhost", "sslmode=allow", &files).await,
        "allow",
    );
    // Neither checks the certificate.
    for mode in ["allow", "prefer"] {
        let params = format!("sslmode={mode}&sslrootcert={other}");
        ok(
            ssl_in_use(&cluster, "127.0.0.1", &params, &files).await,
            mode,
        );
    }
    // require with a root certificate is verify-ca: the chain, not the name
    // (the certificate is for localhost).
    for mode in ["require", "verify-ca"] {
        let params = format!("sslmode={mode}&sslrootcert={ca}");
        ok(
            ssl_in_use(&cluster, "127.0.0.1", &params, &files).await,
            mode,
        );
        let params = format!("sslmode={mode}&sslrootcert={other}");
        refused(
            ssl_in_use(&cluster, "localhost", &params, &files).await,
            mode,
            "UnknownIssuer",
        );
    }
    // require without one: the chain and the name, against the system's
    // CAs, which never signed the test CA's certificate (the one place
    // stricter than libpq).
    refused(
        ssl_in_use(&cluster, "localhost", "sslmode=require", &files).await,
        "require without a root certificate",
        "UnknownIssuer",
    );
    let params = format!("sslmode=verify-full&sslrootcert={ca}");
    ok(
        ssl_in_use(&cluster, "localhost", &params, &files).await,
        "verify-full",
    );
    refused(
        ssl_in_use(&cluster, "127.0.0.1", &params, &files).await,
        "verify-full to another name",
        "certificate not valid for name",
    );
    refused(
        ssl_in_use(&cluster, "localhost", "sslmode=verify-ca", &files).await,
        "verify-ca without a root certificate",
        "sslrootcert=PATH",
    );
    // libpq's default root certificate, ~/.postgresql/root.crt.
    let dot = Path::new(&files.home).join(".postgresql");
    std::fs::create_dir(&dot).unwrap();
    std::fs::copy(ca, dot.join("root.crt")).unwrap();
    ok(
        ssl_in_use(&cluster, "localhost", "sslmode=verify-full", &files).await,
        "verify-full with ~/.postgresql/root.crt",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_sslmode_against_a_server_that_offers_tls() {
    if test_support::postgres::skip_without_server_programs() {
        return;
    }
    let (ca, cert, key) = certificates();
    let files = Files::new(&ca);
    let cluster = cluster_with_tls(cert, key, false).await;
    for (params, ssl) in [
        ("sslmode=disable", false),
        // Plain when the server takes it.
        ("sslmode=allow", false),
        // TLS when the server offers it, libpq's default.
        ("sslmode=prefer", true),
        ("application_name=x", true),
        (
            &*format!("sslmode=verify-full&sslrootcert={}", files.ca),
            true,
        ),
    ] {
        let used = ssl_in_use(&cluster, "localhost", params, &files).await;
        assert_eq!(used, Ok(ssl), "{params}");
    }
}

/// Through the binary: refused at startup without the root certificate
/// (the exit status says which kind of failure), then every connection of
/// the server over TLS with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_reaches_its_database_over_verified_tls() {
    if test_support::postgres::skip_without_server_programs() {
        return;
    }
    let (ca, cert, key) = certificates();
    let files = Files::new(&ca);
    let cluster = cluster_with_tls(cert, key, true).await;
    let home = Path::new(&files.home);
    let url = |mode: &str| {
        format!(
            "postgres://postgres@localhost:{}/postgres?sslmode={mode}",
            cluster.port
        )
    };

    // Not trusting the database's CA: refused at startup, nothing served.
    let (status, log) = Replica::run_to_exit_with_env(&url("require"), &[("HOME", home)]).await;
    assert_eq!(status.code(), Some(EXIT_UNAVAILABLE), "{log}");
    assert!(log.contains("certificate"), "{log}");
    assert!(!log.contains("listening"), "{log}");
    // No root certificate to verify with: settings to fix.
    let (status, log) = Replica::run_to_exit_with_env(&url("verify-full"), &[("HOME", home)]).await;
    assert_eq!(status.code(), Some(EXIT_CONFIG), "{log}");
    assert!(log.contains("add sslrootcert=PATH"), "{log}");

    // Trusting it: every connection of the server is TLS.
    let replica = Replica::start_with_env(
        &url("verify-full"),
        &[],
        &[("PGSSLROOTCERT", Path::new(&files.ca)), ("HOME", home)],
    )
    .await;
    let mut client = replica.client().await;
    client.add_user(user_named("over-tls", "T")).await.unwrap();
    let admin = connect(&format!(
        "host={} port={} user=postgres dbname=postgres",
        cluster.socket_dir().display(),
        cluster.port
    ))
    .await;
    let row = admin
        .query_one(
            "SELECT count(*), count(*) FILTER (WHERE s.ssl)
             FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
             WHERE a.application_name = 'user-service'",
            &[],
        )
        .await
        .unwrap();
    let (all, tls): (i64, i64) = (row.get(0), row.get(1));
    assert!(all >= 2, "the writer and the tailer at least: {all}");
    assert_eq!(tls, all, "every connection over TLS");
    assert!(
        replica.log().contains("(TLS, sslmode=verify-full)"),
        "{}",
        replica.log()
    );
}
