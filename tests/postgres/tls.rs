//! `sslmode=require`: the server reaches its database over TLS only, and
//! verifies the database's certificate (against `PGSSLROOTCERT` here).

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair,
};

use test_support::{
    postgres::{Cluster, connect},
    user_named,
};

use crate::replica::Replica;

/// A CA, and a certificate for `localhost` signed by it: the CA's PEM, the
/// certificate's and its key's.
fn certificates() -> (String, String, String) {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(DnType::CommonName, "user-service test CA");
    let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
    let mut params = CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &ca).unwrap();
    (ca.pem(), cert.pem(), key.serialize_pem())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sslmode_require_connects_over_verified_tls() {
    if test_support::postgres::skip_without_server_programs() {
        return;
    }
    let (ca, cert, key) = certificates();
    let cluster = tokio::task::spawn_blocking(move || {
        let cluster = Cluster::start();
        cluster.require_tls(&cert, &key);
        cluster
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca).unwrap();
    let url = format!(
        "postgres://postgres@localhost:{}/postgres?sslmode=require",
        cluster.port
    );

    // Not trusting the database's CA: refused at startup, nothing served.
    let (status, log) = Replica::run_to_exit(&url).await;
    assert_eq!(status.code(), Some(69), "{log}");
    assert!(log.contains("certificate"), "{log}");

    // Trusting it: every connection of the server is TLS.
    let replica = Replica::start_with_env(&url, &[], &[("PGSSLROOTCERT", &ca_file)]).await;
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
}
