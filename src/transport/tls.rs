//! TLS settings: rustls (with the `ring` provider, as tonic's clients use),
//! HTTP/2 by ALPN, and optionally client certificates (mutual TLS).

use std::{fmt, sync::Arc};

use tokio_rustls::{
    TlsAcceptor,
    rustls::{
        RootCertStore, ServerConfig,
        crypto::ring,
        pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
        server::WebPkiClientVerifier,
    },
};

/// The server's TLS identity (PEM), and optionally the CA that client
/// certificates must chain to (mutual TLS: clients without one are refused
/// during the handshake).
#[derive(Clone)]
pub struct TlsConfig {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    pub client_ca_pem: Option<Vec<u8>>,
}

impl fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The private key stays out of logs.
        f.debug_struct("TlsConfig")
            .field("mutual", &self.client_ca_pem.is_some())
            .finish_non_exhaustive()
    }
}

/// Why the TLS settings cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("the certificate file holds no PEM certificate")]
    NoCertificate,
    #[error("the certificate file is not valid PEM: {0}")]
    Certificate(String),
    #[error("the key file holds no PEM private key (PKCS#8, PKCS#1 or SEC1): {0}")]
    Key(String),
    #[error("the client CA file holds no usable PEM certificate: {0}")]
    ClientCa(String),
    #[error("the certificate and key do not make a TLS identity: {0}")]
    Identity(String),
}

impl TlsConfig {
    /// The acceptor for incoming connections: gRPC only (ALPN `h2`).
    pub fn acceptor(&self) -> Result<TlsAcceptor, TlsError> {
        self.acceptor_offering(&[b"h2"])
    }

    /// The acceptor for a port that also serves the playground: ALPN
    /// `h2` (gRPC, preferred) and `http/1.1` (the page, over HTTPS).
    pub fn acceptor_with_playground(&self) -> Result<TlsAcceptor, TlsError> {
        self.acceptor_offering(&[b"h2", b"http/1.1"])
    }

    fn acceptor_offering(&self, protocols: &[&[u8]]) -> Result<TlsAcceptor, TlsError> {
        let certs = CertificateDer::pem_slice_iter(&self.cert_pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|err| TlsError::Certificate(err.to_string()))?;
        if certs.is_empty() {
            return Err(TlsError::NoCertificate);
        }
        let key = PrivateKeyDer::from_pem_slice(&self.key_pem)
            .map_err(|err| TlsError::Key(err.to_string()))?;

        let provider = Arc::new(ring::default_provider());
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|err| TlsError::Identity(err.to_string()))?;
        let builder = match &self.client_ca_pem {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = RootCertStore::empty();
                for cert in CertificateDer::pem_slice_iter(ca) {
                    let cert = cert.map_err(|err| TlsError::ClientCa(err.to_string()))?;
                    roots
                        .add(cert)
                        .map_err(|err| TlsError::ClientCa(err.to_string()))?;
                }
                let verifier = WebPkiClientVerifier::builder_with_provider(roots.into(), provider)
                    .build()
                    .map_err(|err| TlsError::ClientCa(err.to_string()))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder
            .with_single_cert(certs, key)
            .map_err(|err| TlsError::Identity(err.to_string()))?;
        // gRPC is HTTP/2 only; the server's order is its preference.
        config.alpn_protocols = protocols.iter().map(|p| p.to_vec()).collect();
        Ok(TlsAcceptor::from(Arc::new(config)))
    }
}
