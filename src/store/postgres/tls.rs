//! TLS to the database as libpq's `sslmode` and `sslrootcert` have it, on
//! rustls (the server's own TLS library). tokio-postgres knows three
//! `sslmode` values and no `sslrootcert`, so the store reads both itself,
//! from the URL or `PGSSLMODE` and `PGSSLROOTCERT`, and hands tokio-postgres
//! the rest of the URL.
//!
//! | `sslmode` | TLS | the database's certificate |
//! | --- | --- | --- |
//! | `disable` | never | - |
//! | `allow` | only if the server refuses a plain connection | not checked |
//! | `prefer` (the default) | if the server offers it | not checked |
//! | `require` | always | with a root certificate, its chain (as `verify-ca`); without, chain and host name against the system's CAs |
//! | `verify-ca` | always | its chain, against the root certificate |
//! | `verify-full` | always | its chain and the host name, against the root certificate or (`sslrootcert=system`) the system's CAs |
//!
//! The root certificate is `sslrootcert` (a PEM file), else
//! `~/.postgresql/root.crt` if it exists, as for libpq. One place is
//! stricter than libpq: `require` without a root certificate, where libpq
//! checks nothing and would encrypt to whoever answers. Here the
//! certificate must then be one the system's CAs issued for the host;
//! `prefer` still encrypts without checking, for a server whose certificate
//! no one can verify.

use std::{path::Path, str::FromStr, sync::Arc};

use percent_encoding::percent_decode_str;
use tokio_postgres_rustls::MakeRustlsConnect;
use tokio_rustls::rustls::{
    self, CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme,
    client::{
        WebPkiServerVerifier,
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    },
    crypto::CryptoProvider,
    pki_types::{CertificateDer, ServerName, UnixTime},
};

use super::connect::ConfigError;
use crate::any_certificate::AnyCertificate;

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Allow,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    pub fn name(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    /// Whether every connection is TLS.
    pub fn requires_tls(self) -> bool {
        matches!(
            self,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull
        )
    }
}

impl FromStr for SslMode {
    type Err = ConfigError;

    fn from_str(value: &str) -> Result<SslMode, ConfigError> {
        Ok(match value {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => return Err(ConfigError::SslMode(other.to_owned())),
        })
    }
}

/// What the TLS parameters say: the mode, and the connector for every mode
/// but `disable`.
#[derive(Clone)]
pub struct Tls {
    pub mode: SslMode,
    pub connector: Option<MakeRustlsConnect>,
}

/// The certificates the database's is checked against.
enum Roots {
    /// A PEM file: its certificates alone, as libpq reads `sslrootcert`.
    File(String),
    /// `sslrootcert=system`: the system's CA certificates.
    System,
}

/// Takes `sslmode` and `sslrootcert` out of `url`'s query, and reads them,
/// with `PGSSLMODE`, `PGSSLROOTCERT` and `HOME` from `env` where the URL
/// has none. Returns the URL without them (for tokio-postgres) and the
/// TLS they ask for.
pub fn from_url(
    url: &str,
    env: &impl Fn(&str) -> Option<String>,
) -> Result<(String, Tls), ConfigError> {
    let (rest, mut mode, mut root_cert) = split_query(url);
    if mode.is_none() {
        mode = env("PGSSLMODE");
    }
    if root_cert.is_none() {
        root_cert = env("PGSSLROOTCERT");
    }
    let roots = match root_cert {
        Some(value) if value == "system" => Some(Roots::System),
        Some(path) => Some(Roots::File(path)),
        // libpq's default root certificate, when there is one.
        None => env("HOME")
            .map(|home| format!("{home}/.postgresql/root.crt"))
            .filter(|path| Path::new(path).is_file())
            .map(Roots::File),
    };
    let mode = match (mode.as_deref().map(SslMode::from_str).transpose()?, &roots) {
        // libpq 16: the system's CAs vouch for any name they were asked
        // to, so only a check of the host name makes them mean something.
        (None, Some(Roots::System)) => SslMode::VerifyFull,
        (Some(mode), Some(Roots::System)) if mode != SslMode::VerifyFull => {
            return Err(ConfigError::SystemRoots(mode.name()));
        }
        (mode, _) => mode.unwrap_or(SslMode::Prefer),
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier: Arc<dyn ServerCertVerifier> = match (mode, roots) {
        (SslMode::Disable, _) => {
            return Ok((
                rest,
                Tls {
                    mode,
                    connector: None,
                },
            ));
        }
        (SslMode::Allow | SslMode::Prefer, _) => Arc::new(AnyCertificate(provider.clone())),
        (SslMode::Require | SslMode::VerifyCa, Some(Roots::File(path))) => {
            Arc::new(ChainOnly(web_pki(load_file(&path)?, &provider)?))
        }
        (SslMode::VerifyFull, Some(Roots::File(path))) => web_pki(load_file(&path)?, &provider)?,
        (SslMode::Require, None) | (SslMode::VerifyFull, Some(Roots::System)) => {
            web_pki(load_system()?, &provider)?
        }
        (SslMode::VerifyCa | SslMode::VerifyFull, None) => {
            return Err(ConfigError::NoRootCert(mode.name()));
        }
        (SslMode::Require | SslMode::VerifyCa, Some(Roots::System)) => {
            unreachable!("refused above")
        }
    };
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions")
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok((
        rest,
        Tls {
            mode,
            connector: Some(MakeRustlsConnect::new(config)),
        },
    ))
}

/// `url` without its `sslmode` and `sslrootcert` parameters, and their
/// values (percent-decoded; the last of each, as libpq takes it).
fn split_query(url: &str) -> (String, Option<String>, Option<String>) {
    let Some((base, query)) = url.split_once('?') else {
        return (url.to_owned(), None, None);
    };
    let (mut mode, mut root_cert) = (None, None);
    let mut kept = Vec::new();
    for pair in query.split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let decoded = || percent_decode_str(value).decode_utf8_lossy().into_owned();
        match key {
            "sslmode" => mode = Some(decoded()),
            "sslrootcert" => root_cert = Some(decoded()),
            _ => kept.push(pair),
        }
    }
    let rest = if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    (rest, mode, root_cert)
}

fn load_file(path: &str) -> Result<RootCertStore, ConfigError> {
    use rustls::pki_types::pem::PemObject;
    let failed = |detail: String| ConfigError::RootCert {
        path: path.to_owned(),
        detail,
    };
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .and_then(Iterator::collect)
        .map_err(|err| failed(err.to_string()))?;
    let mut roots = RootCertStore::empty();
    for cert in certs {
        roots.add(cert).map_err(|err| failed(err.to_string()))?;
    }
    if roots.is_empty() {
        return Err(failed("no certificate in it".into()));
    }
    Ok(roots)
}

fn load_system() -> Result<RootCertStore, ConfigError> {
    let native = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    roots.add_parsable_certificates(native.certs);
    if roots.is_empty() {
        return Err(ConfigError::NoRoots(format!("{:?}", native.errors)));
    }
    Ok(roots)
}

/// rustls's own verifier: the chain and the host name.
fn web_pki(
    roots: RootCertStore,
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<WebPkiServerVerifier>, ConfigError> {
    WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|err| ConfigError::NoRoots(err.to_string()))
}

/// `verify-ca`: rustls's verifier, less the host name. rustls checks the
/// chain first and the name last, so a certificate refused only for its
/// name has a chain that verified.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |name| {
            vars.iter()
                .find(|(n, _)| *n == name)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    /// A PEM file holding one self-signed CA certificate.
    fn ca_file(dir: &Path) -> String {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let cert = params.self_signed(&key).unwrap();
        let path = dir.join("ca.pem");
        std::fs::write(&path, cert.pem()).unwrap();
        path.display().to_string()
    }

    fn mode(url: &str, vars: &[(&str, &str)]) -> Result<SslMode, ConfigError> {
        from_url(url, &env(vars)).map(|(_, tls)| tls.mode)
    }

    #[test]
    fn the_parameters_leave_the_url_and_the_rest_stays() {
        let (rest, tls) = from_url(
            "postgres://a@h/d?application_name=x&sslmode=disable&connect_timeout=2",
            &env(&[]),
        )
        .unwrap();
        assert_eq!(
            rest,
            "postgres://a@h/d?application_name=x&connect_timeout=2"
        );
        assert_eq!(tls.mode, SslMode::Disable);
        assert!(tls.connector.is_none());
        let dir = tempfile::tempdir().unwrap();
        let ca = ca_file(dir.path());
        let escaped = ca.replace('/', "%2F");
        let (rest, tls) = from_url(
            &format!("postgres://a@h/d?sslrootcert={escaped}&sslmode=verify-full"),
            &env(&[]),
        )
        .unwrap();
        assert_eq!(rest, "postgres://a@h/d");
        assert_eq!(tls.mode, SslMode::VerifyFull);
        assert!(tls.connector.is_some());
    }

    #[test]
    fn each_mode_as_libpq_reads_it() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ca_file(dir.path());
        assert_eq!(mode("postgres://a@h/d", &[]).unwrap(), SslMode::Prefer);
        for name in [
            "disable",
            "allow",
            "prefer",
            "require",
            "verify-ca",
            "verify-full",
        ] {
            let url = format!("postgres://a@h/d?sslmode={name}&sslrootcert={ca}");
            assert_eq!(mode(&url, &[]).unwrap().name(), name);
            // From the environment, and the URL wins over it.
            let vars = [("PGSSLMODE", name), ("PGSSLROOTCERT", ca.as_str())];
            assert_eq!(mode("postgres://a@h/d", &vars).unwrap().name(), name);
            let url = "postgres://a@h/d?sslmode=disable";
            assert_eq!(mode(url, &vars).unwrap(), SslMode::Disable);
        }
        assert!(matches!(
            mode("postgres://a@h/d?sslmode=verify", &[]),
            Err(ConfigError::SslMode(value)) if value == "verify"
        ));
        let err = mode("postgres://a@h/d", &[("PGSSLMODE", "bogus")]).unwrap_err();
        assert!(err.to_string().contains("verify-full"), "{err}");
    }

    #[test]
    fn verifying_needs_a_root_certificate() {
        let home = tempfile::tempdir().unwrap();
        let vars = [("HOME", home.path().to_str().unwrap())];
        for name in ["verify-ca", "verify-full"] {
            let url = format!("postgres://a@h/d?sslmode={name}");
            let err = mode(&url, &vars).unwrap_err();
            assert!(matches!(err, ConfigError::NoRootCert(_)), "{err:?}");
            assert!(err.to_string().contains("sslrootcert=PATH"), "{err}");
        }
        // libpq's default root certificate.
        std::fs::create_dir(home.path().join(".postgresql")).unwrap();
        let ca = ca_file(home.path());
        std::fs::rename(ca, home.path().join(".postgresql/root.crt")).unwrap();
        assert_eq!(
            mode("postgres://a@h/d?sslmode=verify-ca", &vars).unwrap(),
            SslMode::VerifyCa
        );
        // A root certificate that cannot be read is never passed over.
        let err = mode(
            "postgres://a@h/d?sslmode=require&sslrootcert=/nonexistent.pem",
            &vars,
        )
        .unwrap_err();
        assert!(err.to_string().contains("/nonexistent.pem"), "{err}");
    }

    #[test]
    fn the_systems_cas_go_with_verify_full_only() {
        assert!(matches!(
            mode("postgres://a@h/d?sslrootcert=system&sslmode=verify-ca", &[]),
            Err(ConfigError::SystemRoots("verify-ca"))
        ));
        assert!(matches!(
            mode("postgres://a@h/d?sslrootcert=system&sslmode=require", &[]),
            Err(ConfigError::SystemRoots("require"))
        ));
    }
}
