//! TLS to ClickHouse: which certificates an `https://` endpoint (the upstream, `clickhouse_url`)
//! must chain to. By default the web's root authorities (Mozilla's list, built in); with
//! `tls_ca_file`, the authorities of that PEM file instead: ClickHouse servers inside a company
//! usually carry certificates of the company's own authority. The file must hold the authority
//! that issued the server's certificate; a self-signed server certificate marked as an authority
//! (`openssl req -x509` makes those) is refused as its own end entity by webpki, where
//! `curl --cacert` accepts it.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

/// TCP keep-alive probes on connections to ClickHouse.
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);

/// Why certificates (authorities to trust, or the listener's own) could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The file could not be read, or a PEM section in it is malformed.
    #[error("{path}: {message}")]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The file holds no certificate.
    #[error("{path}: no PEM certificate (-----BEGIN CERTIFICATE-----) in the file")]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// A certificate in the file does not parse.
    #[error("{path}: certificate {index}: {message}")]
    BadCertificate {
        /// The file.
        path: PathBuf,
        /// Its position in the file, from 1.
        index: usize,
        /// What rustls said.
        message: String,
    },
    /// A private key that cannot be used, or is not the certificate's.
    #[error("{key_file} (the key of {cert_file}): {message}")]
    Key {
        /// The certificate file.
        cert_file: PathBuf,
        /// The key file.
        key_file: PathBuf,
        /// What rustls said.
        message: String,
    },
}

/// The TLS settings of connections to ClickHouse: the authorities a server certificate must
/// chain to, and where they came from.
#[derive(Clone)]
pub struct ClientTls {
    config: Arc<rustls::ClientConfig>,
    authorities: Authorities,
}

/// Where the trusted authorities come from.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Authorities {
    WebRoots,
    File { path: PathBuf, certificates: usize },
}

impl ClientTls {
    /// Trusts the certificates of the PEM file `path` (and no others).
    pub fn from_ca_file(path: &Path) -> Result<ClientTls, TlsError> {
        let unreadable = |message: String| TlsError::Unreadable { path: path.to_path_buf(), message };
        let certificates = CertificateDer::pem_file_iter(path)
            .map_err(|e| unreadable(e.to_string()))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| unreadable(e.to_string()))?;
        if certificates.is_empty() {
            return Err(TlsError::NoCertificate { path: path.to_path_buf() });
        }
        let mut roots = rustls::RootCertStore::empty();
        for (index, certificate) in certificates.iter().enumerate() {
            roots.add(certificate.clone()).map_err(|e| TlsError::BadCertificate {
                path: path.to_path_buf(),
                index: index + 1,
                message: e.to_string(),
            })?;
        }
        let authorities = Authorities::File { path: path.to_path_buf(), certificates: certificates.len() };
        Ok(ClientTls::with_roots(roots, authorities))
    }

    /// The file the authorities come from, when they do not come from the web's roots.
    pub fn ca_file(&self) -> Option<&Path> {
        match &self.authorities {
            Authorities::WebRoots => None,
            Authorities::File { path, .. } => Some(path),
        }
    }

    /// The rustls configuration, for tests that speak TLS themselves.
    #[cfg(test)]
    pub(crate) fn rustls_config(&self) -> Arc<rustls::ClientConfig> {
        Arc::clone(&self.config)
    }

    fn with_roots(roots: rustls::RootCertStore, authorities: Authorities) -> ClientTls {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map(|builder| builder.with_root_certificates(roots).with_no_client_auth())
            // ring's provider supports the default protocol versions; this cannot fail.
            .unwrap_or_else(|error| unreachable!("rustls defaults with ring: {error}"));
        ClientTls { config: Arc::new(config), authorities }
    }

    /// How the proxy connects to ClickHouse: TCP (no Nagle delay, keep-alive probes, connecting
    /// within `connect_timeout`), then TLS for `https://` endpoints, for HTTP/1.1 (no ALPN is
    /// offered).
    pub fn connector(&self, connect_timeout: Duration) -> HttpsConnector<HttpConnector> {
        let mut tcp = HttpConnector::new();
        tcp.set_connect_timeout(Some(connect_timeout));
        tcp.set_nodelay(true);
        tcp.set_keepalive(Some(TCP_KEEPALIVE));
        tcp.enforce_http(false);
        HttpsConnectorBuilder::new()
            .with_tls_config(rustls::ClientConfig::clone(&self.config))
            .https_or_http()
            .enable_http1()
            .wrap_connector(tcp)
    }
}

impl Default for ClientTls {
    /// Trusts the web's root authorities.
    fn default() -> ClientTls {
        let roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
        ClientTls::with_roots(roots, Authorities::WebRoots)
    }
}

impl fmt::Display for ClientTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.authorities {
            Authorities::WebRoots => f.write_str("web roots"),
            Authorities::File { path, certificates } => {
                let plural = if *certificates == 1 { "" } else { "s" };
                write!(f, "{} ({certificates} certificate{plural})", path.display())
            }
        }
    }
}

impl fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ClientTls({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn a_ca_file_is_read_and_its_faults_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let authority = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
        let pem = authority.cert.pem();
        let good = write(dir.path(), "ca.pem", &format!("# a comment line\n{pem}{pem}"));
        let tls = ClientTls::from_ca_file(&good).unwrap();
        assert_eq!(tls.to_string(), format!("{} (2 certificates)", good.display()));

        let missing = dir.path().join("missing.pem");
        let error = ClientTls::from_ca_file(&missing).unwrap_err();
        assert!(matches!(error, TlsError::Unreadable { .. }), "{error}");

        let empty = write(dir.path(), "empty.pem", "not a certificate\n");
        let error = ClientTls::from_ca_file(&empty).unwrap_err();
        assert!(matches!(error, TlsError::NoCertificate { .. }), "{error}");

        let garbage = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        let bad = write(dir.path(), "bad.pem", &format!("{pem}{garbage}"));
        let error = ClientTls::from_ca_file(&bad).unwrap_err();
        assert!(matches!(error, TlsError::BadCertificate { index: 2, .. }), "{error}");

        assert_eq!(ClientTls::default().to_string(), "web roots");
    }
}
