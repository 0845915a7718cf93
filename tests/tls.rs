//! ClickHouse over HTTPS with a certificate of a private authority, as inside most companies:
//! trusted with `tls_ca_file` for forwarded queries and for the proxy's own statements (tables,
//! builds); refused without it, and refused under a name the certificate does not carry (both
//! checked on forwarded queries).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::equivalence::{forms, run, same_rows, until_rewritten};
use common::{ChServer, ProxyProcess, client, python, root};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};

/// The authority's certificate, and the server's certificate (for `localhost`) and key, as PEM
/// files in `dir`.
struct Pki {
    authority: PathBuf,
    certificate: PathBuf,
    key: PathBuf,
}

impl Pki {
    fn create(dir: &Path) -> Pki {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, "preagg-proxy test authority");
        let authority = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
        let server_key = KeyPair::generate().unwrap();
        let server =
            CertificateParams::new(vec!["localhost".to_string()]).unwrap().signed_by(&server_key, &authority).unwrap();
        let write = |name: &str, pem: String| {
            let path = dir.join(name);
            std::fs::write(&path, pem).unwrap();
            path
        };
        Pki {
            authority: write("authority.pem", authority.pem()),
            certificate: write("server.pem", server.pem()),
            key: write("server.key", server_key.serialize_pem()),
        }
    }
}

/// Generates events through the server's HTTPS endpoint, Python trusting the authority.
fn generate(url: &str, authority: &Path) {
    let status = Command::new(python())
        .arg(root().join("tests/data/generate.py"))
        .args(["--url", url, "--events", "40000", "--seed", "5", "--start", "2026-10-01", "--days", "10"])
        .env("SSL_CERT_FILE", authority)
        .stdout(Stdio::null())
        .status()
        .expect("running tests/data/generate.py");
    assert!(status.success(), "generate.py over HTTPS failed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_clickhouse_of_a_private_authority_is_trusted_with_tls_ca_file_only() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::create(dir.path());
    let server = ChServer::start_with(&[
        "--tls-cert",
        pki.certificate.to_str().unwrap(),
        "--tls-key",
        pki.key.to_str().unwrap(),
    ]);
    let https = format!("https://localhost:{}", server.port);
    generate(&https, &pki.authority);

    // The web's roots do not know the authority: the handshake fails and the client is told so.
    let untrusted = ProxyProcess::start(&https, &[("mode", "off")]);
    let response = client().post(untrusted.url()).body("SELECT 1").send().await.unwrap();
    assert_eq!(response.status(), 502);
    let body = response.text().await.unwrap();
    assert!(body.to_lowercase().contains("certificate"), "the error names the certificate: {body}");

    let authority = pki.authority.to_str().unwrap();
    // The certificate names `localhost`, not the address: the name is checked too.
    let by_address = format!("https://127.0.0.1:{}", server.port);
    let misnamed = ProxyProcess::start(&by_address, &[("mode", "off"), ("tls_ca_file", authority)]);
    let response = client().post(misnamed.url()).body("SELECT 1").send().await.unwrap();
    assert_eq!(response.status(), 502);
    let body = response.text().await.unwrap();
    assert!(body.to_lowercase().contains("not valid for name"), "the error names the mismatch: {body}");

    let plain = ProxyProcess::start(&https, &[("mode", "off"), ("tls_ca_file", authority)]);
    let proxy = ProxyProcess::start(&https, &[("tls_ca_file", authority)]);
    proxy.wait_engine_ready();
    let query =
        forms(99999, "test-experiment").remove(0).query("2026-10-02 09:57:00.000000", "2026-10-08 14:30:00.000000");
    let original = run(&plain.url(), &query).await;
    assert_eq!(original.status, 200, "{:?}", original.lines);
    assert!(original.lines.len() >= 4, "the query has variants to compare: {:?}", original.lines);
    // Rewritten: tables created, windows built and read over HTTPS by the proxy's own client.
    let rewritten = until_rewritten(&proxy.url(), &query, Duration::from_secs(120)).await;
    same_rows(&original, &rewritten).unwrap();
}
