//! Certificates made at test time (rcgen): a CA, a server certificate for
//! `localhost` and `127.0.0.1` and a client certificate, both signed by it.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair,
};
use tonic::transport::{Certificate, ClientTlsConfig, Identity};
use user_service::server::TlsConfig;

/// A CA and the certificates it signed, as PEM; made fresh for each test.
pub struct Pki {
    pub ca_pem: String,
    pub server_cert_pem: String,
    pub server_key_pem: String,
    pub client_cert_pem: String,
    pub client_key_pem: String,
}

/// A self-signed CA named `name`.
pub fn ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
}

/// A certificate for `names`, for `usage`, signed by `issuer`: its PEM and
/// its key's.
pub fn leaf(
    issuer: &CertifiedIssuer<'static, KeyPair>,
    names: &[&str],
    usage: ExtendedKeyUsagePurpose,
) -> (String, String) {
    let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let mut params = CertificateParams::new(names).unwrap();
    params.extended_key_usages = vec![usage];
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

impl Default for Pki {
    fn default() -> Self {
        Self::new()
    }
}

impl Pki {
    pub fn new() -> Pki {
        let ca = ca("user-service test CA");
        let (server_cert_pem, server_key_pem) = leaf(
            &ca,
            &["localhost", "127.0.0.1"],
            ExtendedKeyUsagePurpose::ServerAuth,
        );
        let (client_cert_pem, client_key_pem) =
            leaf(&ca, &["client"], ExtendedKeyUsagePurpose::ClientAuth);
        Pki {
            ca_pem: ca.pem(),
            server_cert_pem,
            server_key_pem,
            client_cert_pem,
            client_key_pem,
        }
    }

    /// The server's side, for an in-process server; with `mutual`, client
    /// certificates are required.
    pub fn server_tls(&self, mutual: bool) -> TlsConfig {
        TlsConfig {
            cert_pem: self.server_cert_pem.clone().into_bytes(),
            key_pem: self.server_key_pem.clone().into_bytes(),
            client_ca_pem: mutual.then(|| self.ca_pem.clone().into_bytes()),
        }
    }

    /// A tonic client that trusts the CA and dials `localhost`.
    pub fn client_tls(&self) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .domain_name("localhost")
    }

    /// The client certificate, for mutual TLS.
    pub fn client_identity(&self) -> Identity {
        Identity::from_pem(&self.client_cert_pem, &self.client_key_pem)
    }

    /// Everything written to files in a new temporary directory, for the
    /// binaries' flags: `ca.pem`, `server.pem`, `server.key`, `client.pem`,
    /// `client.key`, and two token files, `token` and `wrong-token`.
    pub fn files(&self) -> PkiFiles {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in [
            ("ca.pem", self.ca_pem.as_str()),
            ("server.pem", &self.server_cert_pem),
            ("server.key", &self.server_key_pem),
            ("client.pem", &self.client_cert_pem),
            ("client.key", &self.client_key_pem),
            ("token", "right-token\n"),
            ("wrong-token", "wrong-token\n"),
        ] {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        PkiFiles { dir }
    }
}

/// The files of a [`Pki`], removed when dropped.
pub struct PkiFiles {
    dir: tempfile::TempDir,
}

impl PkiFiles {
    /// The path of one of the files, as a flag's value.
    pub fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn join(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}
