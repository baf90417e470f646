//! TLS for the cluster's gRPC and HTTP traffic, when given certificates.
//!
//! Servers (the head, node agents) serve with a certificate and key (PEM); clients (node
//! agents, drivers, workers, the CLI) trust a CA certificate (PEM) and then speak
//! `https` to every cluster address. Without them traffic is clear text (the token is
//! still required). Processes a node agent starts inherit the CA through
//! `VOLLEY_TLS_CA`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use volley_common::{Result, VolleyError};

/// Certificates to serve with and to trust.
#[derive(Debug, Clone, Default)]
pub struct TlsConfig {
    ca: Option<(PathBuf, Vec<u8>)>,
    identity: Option<(Vec<u8>, Vec<u8>)>,
}

fn read(path: &Path, what: &str) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| {
        VolleyError::Config(format!(
            "cannot read the TLS {what} {}: {e}",
            path.display()
        ))
    })
}

impl TlsConfig {
    /// No TLS.
    pub fn none() -> Self {
        Self::default()
    }

    /// From PEM files: `ca` to trust as a client, `cert` + `key` to serve with.
    pub fn from_files(ca: Option<&Path>, cert: Option<&Path>, key: Option<&Path>) -> Result<Self> {
        let ca = match ca {
            Some(p) => Some((p.to_path_buf(), read(p, "CA certificate")?)),
            None => None,
        };
        let identity = match (cert, key) {
            (Some(c), Some(k)) => Some((read(c, "certificate")?, read(k, "key")?)),
            (None, None) => None,
            _ => {
                return Err(VolleyError::Config(
                    "give both --tls-cert and --tls-key, or neither".into(),
                ))
            }
        };
        Ok(Self { ca, identity })
    }

    /// From `VOLLEY_TLS_CA`, `VOLLEY_TLS_CERT`, `VOLLEY_TLS_KEY`.
    pub fn from_env() -> Result<Self> {
        let var = |n: &str| {
            std::env::var_os(n)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        Self::from_files(
            var("VOLLEY_TLS_CA").as_deref(),
            var("VOLLEY_TLS_CERT").as_deref(),
            var("VOLLEY_TLS_KEY").as_deref(),
        )
    }

    /// Whether clients speak TLS.
    pub fn is_client(&self) -> bool {
        self.ca.is_some()
    }

    /// The CA file, for the environment of processes this one starts.
    pub fn ca_path(&self) -> Option<&Path> {
        self.ca.as_ref().map(|(p, _)| p.as_path())
    }

    pub(crate) fn client(&self) -> Option<tonic::transport::ClientTlsConfig> {
        self.ca.as_ref().map(|(_, pem)| {
            tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(pem))
        })
    }

    pub(crate) fn server(&self) -> Option<tonic::transport::ServerTlsConfig> {
        self.identity.as_ref().map(|(cert, key)| {
            tonic::transport::ServerTlsConfig::new()
                .identity(tonic::transport::Identity::from_pem(cert, key))
        })
    }

    /// A rustls acceptor for the HTTP API.
    pub(crate) fn acceptor(&self) -> Result<Option<tokio_rustls::TlsAcceptor>> {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let Some((cert, key)) = &self.identity else {
            return Ok(None);
        };
        let bad = |e: &dyn std::fmt::Display| VolleyError::Config(format!("TLS certificate: {e}"));
        let certs = CertificateDer::pem_slice_iter(cert)
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| bad(&e))?;
        let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| bad(&e))?;
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(&e))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| bad(&e))?;
        Ok(Some(tokio_rustls::TlsAcceptor::from(Arc::new(config))))
    }
}
