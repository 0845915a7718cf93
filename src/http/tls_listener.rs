//! TLS for the proxy's clients: with `tls_cert_file` and `tls_key_file` the client listener speaks
//! HTTPS only, as ClickHouse's `https_port` does, so a query runner that reaches ClickHouse over
//! HTTPS keeps doing so through the proxy. The certificate is read at start and again on SIGHUP
//! (renewed certificates are served to new connections without a restart; open connections keep
//! the session they have).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_rustls::TlsAcceptor;

use super::tls::TlsError;

/// A certificate chain and its private key, read from PEM files and checked to belong together.
#[derive(Clone)]
pub struct ListenerCert {
    cert_file: PathBuf,
    key_file: PathBuf,
    key: Arc<CertifiedKey>,
}

impl ListenerCert {
    /// Reads the chain of `cert_file` (the server's certificate first) and the private key of
    /// `key_file` (PKCS#8, PKCS#1 or SEC1), and checks that the key is the certificate's.
    pub fn load(cert_file: &Path, key_file: &Path) -> Result<ListenerCert, TlsError> {
        let unreadable = |path: &Path, message: String| TlsError::Unreadable { path: path.to_path_buf(), message };
        let chain = CertificateDer::pem_file_iter(cert_file)
            .map_err(|e| unreadable(cert_file, e.to_string()))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| unreadable(cert_file, e.to_string()))?;
        if chain.is_empty() {
            return Err(TlsError::NoCertificate { path: cert_file.to_path_buf() });
        }
        let private = PrivateKeyDer::from_pem_file(key_file).map_err(|e| unreadable(key_file, e.to_string()))?;
        let key = CertifiedKey::from_der(chain, private, &rustls::crypto::ring::default_provider()).map_err(|e| {
            TlsError::Key {
                cert_file: cert_file.to_path_buf(),
                key_file: key_file.to_path_buf(),
                message: e.to_string(),
            }
        })?;
        Ok(ListenerCert { cert_file: cert_file.to_path_buf(), key_file: key_file.to_path_buf(), key: Arc::new(key) })
    }

    /// The certificate file and the length of its chain, for the effective configuration.
    pub fn describe_chain(&self) -> String {
        let length = self.key.cert.len();
        let plural = if length == 1 { "" } else { "s" };
        format!("{} ({length} certificate{plural})", self.cert_file.display())
    }

    /// The key file, for the effective configuration.
    pub fn describe_key_file(&self) -> String {
        self.key_file.display().to_string()
    }
}

impl fmt::Debug for ListenerCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ListenerCert({}, key {})", self.describe_chain(), self.describe_key_file())
    }
}

/// The TLS side of the client listener: every handshake gets the certificate current at its start.
#[derive(Clone)]
pub struct ListenerTls {
    current: Arc<CurrentCert>,
    acceptor: TlsAcceptor,
}

/// The certificate handed to new handshakes; replaced on reload.
#[derive(Debug)]
struct CurrentCert(RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for CurrentCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.0.read().unwrap_or_else(std::sync::PoisonError::into_inner)))
    }
}

impl ListenerTls {
    /// TLS 1.2 and 1.3 with rustls' safe defaults, HTTP/1.1 by ALPN, presenting `cert`.
    pub fn new(cert: &ListenerCert) -> ListenerTls {
        let current = Arc::new(CurrentCert(RwLock::new(Arc::clone(&cert.key))));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map(|builder| builder.with_no_client_auth().with_cert_resolver(Arc::clone(&current) as _))
            // ring's provider supports the default protocol versions; this cannot fail.
            .unwrap_or_else(|error| unreachable!("rustls defaults with ring: {error}"));
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        ListenerTls { current, acceptor: TlsAcceptor::from(Arc::new(config)) }
    }

    /// Presents `cert` to the handshakes that start from now on.
    pub fn replace(&self, cert: &ListenerCert) {
        *self.current.0.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::clone(&cert.key);
    }

    /// The acceptor that runs a connection's handshake.
    pub fn acceptor(&self) -> &TlsAcceptor {
        &self.acceptor
    }
}

/// For tests: a self-signed certificate for `localhost` and its key, written to `dir` as
/// `NAME.pem` and `NAME.key`; their paths.
#[cfg(test)]
pub(crate) fn self_signed(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let (cert, key) = (dir.join(format!("{name}.pem")), dir.join(format!("{name}.key")));
    std::fs::write(&cert, certified.cert.pem()).unwrap();
    std::fs::write(&key, certified.signing_key.serialize_pem()).unwrap();
    (cert, key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_certificate_and_its_key_are_read_and_their_faults_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = self_signed(dir.path(), "one");
        let (_, other_key) = self_signed(dir.path(), "other");
        let loaded = ListenerCert::load(&cert, &key).unwrap();
        assert_eq!(loaded.describe_chain(), format!("{} (1 certificate)", cert.display()));
        assert_eq!(loaded.describe_key_file(), key.display().to_string());

        let missing = dir.path().join("missing.pem");
        assert!(matches!(ListenerCert::load(&missing, &key), Err(TlsError::Unreadable { .. })));
        assert!(matches!(ListenerCert::load(&cert, &missing), Err(TlsError::Unreadable { .. })));
        // A key file in the certificate's place, a certificate in the key's, another certificate's key.
        assert!(matches!(ListenerCert::load(&key, &key), Err(TlsError::NoCertificate { .. })));
        assert!(matches!(ListenerCert::load(&cert, &cert), Err(TlsError::Unreadable { .. })));
        let error = ListenerCert::load(&cert, &other_key).unwrap_err();
        assert!(matches!(error, TlsError::Key { .. }), "{error}");
    }
}
