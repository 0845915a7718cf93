//! ClickHouse over HTTPS with a certificate of a private authority, as inside most companies:
//! trusted with `tls_ca_file` for forwarded queries and for the proxy's own statements (tables,
//! builds); refused without it, and refused under a name the certificate does not carry (both
//! checked on forwarded queries). And the proxy's own listener over HTTPS (`tls_cert_file`,
//! `tls_key_file`), its certificate renewed on SIGHUP.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::equivalence::{forms, run, same_rows, until_rewritten};
use common::{ChServer, ProxyProcess, client, python, root, wait_for};
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

/// A client of the proxy that trusts only the authority of `pki`.
fn trusting(pki: &Pki) -> reqwest::Client {
    let authority = reqwest::Certificate::from_pem(&std::fs::read(&pki.authority).unwrap()).unwrap();
    reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(authority)
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

/// The body of `query` from `url`, or the error of the request.
async fn answer(client: &reqwest::Client, url: &str, query: &str) -> Result<(u16, String), reqwest::Error> {
    let response = client.post(url).body(query.to_string()).send().await?;
    let status = response.status().as_u16();
    Ok((status, response.text().await?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_reach_the_proxy_over_https_and_a_renewed_certificate_is_served_after_sighup() {
    let dir = tempfile::tempdir().unwrap();
    let (first_dir, second_dir) = (dir.path().join("first"), dir.path().join("second"));
    std::fs::create_dir_all(&first_dir).unwrap();
    std::fs::create_dir_all(&second_dir).unwrap();
    let (first, second) = (Pki::create(&first_dir), Pki::create(&second_dir));
    // The files the proxy reads: the first authority's certificate now, the second's after renewal.
    let (certificate, key) = (dir.path().join("listener.pem"), dir.path().join("listener.key"));
    std::fs::copy(&first.certificate, &certificate).unwrap();
    std::fs::copy(&first.key, &key).unwrap();

    let server = ChServer::start();
    let settings = [("tls_cert_file", certificate.to_str().unwrap()), ("tls_key_file", key.to_str().unwrap())];
    let proxy = ProxyProcess::start(&server.url(), &settings);
    let https = format!("https://localhost:{}", proxy.port);
    // Half a megabyte of answer: many TLS records, written as they come.
    let query = "SELECT number, toString(number * 7) FROM numbers(60000) FORMAT TSV";
    let direct = answer(&client(), &server.url(), query).await.unwrap();
    assert_eq!(direct.0, 200);
    assert!(direct.1.len() > 500_000, "{}", direct.1.len());

    let first_client = trusting(&first);
    assert_eq!(answer(&first_client, &https, query).await.unwrap(), direct, "the answer over HTTPS is the direct one");
    let failing = "SELECT no_such_column";
    let error = answer(&client(), &server.url(), failing).await.unwrap();
    assert_ne!(error.0, 200);
    assert_eq!(answer(&first_client, &https, failing).await.unwrap(), error, "an error comes through as direct");
    // Plain HTTP gets no answer from an HTTPS listener, and a client that does not trust the
    // authority gets no connection.
    assert!(answer(&client(), &proxy.url(), "SELECT 1").await.is_err(), "plain HTTP was answered");
    assert!(answer(&trusting(&second), &https, "SELECT 1").await.is_err(), "an untrusted certificate was accepted");

    // Renewal: new files, SIGHUP. New connections get the new certificate; the connection the
    // first client keeps alive stays up.
    std::fs::copy(&second.certificate, &certificate).unwrap();
    std::fs::copy(&second.key, &key).unwrap();
    proxy.signal("HUP");
    wait_for("the reload", Duration::from_secs(10), || {
        proxy.log_lines().iter().any(|l| l["message"] == "configuration reloaded").then_some(())
    });
    assert_eq!(answer(&trusting(&second), &https, query).await.unwrap(), direct, "the renewed certificate is served");
    assert!(answer(&trusting(&first), &https, "SELECT 1").await.is_err(), "the old certificate is still served");
    assert_eq!(answer(&first_client, &https, query).await.unwrap(), direct, "the open connection was kept");
    // Each refused handshake is logged (worker threads write their lines out every second).
    wait_for("three failed handshakes in the log", Duration::from_secs(5), || {
        let failed = proxy.log_lines().into_iter().filter(|l| l["message"] == "TLS handshake failed").count();
        (failed == 3).then_some(())
    });
}
