//! Transparency: through the proxy, a client sees exactly what ClickHouse (here the chdb-backed
//! server) answers, and the proxy's own failures read like ClickHouse errors.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::LazyLock;
use std::time::{Duration, Instant};

use common::{ChServer, ProxyProcess, client, wait_for};
use futures_util::StreamExt;
use reqwest::header::HeaderMap;

/// One server and one proxy shared by the tests of this file.
static SERVER: LazyLock<ChServer> = LazyLock::new(|| {
    let server = ChServer::start();
    let setup = "CREATE TABLE IF NOT EXISTS t (a UInt32, b String) ENGINE = MergeTree ORDER BY a";
    let out =
        std::process::Command::new("curl").args(["-sS", "--data-binary", setup, &server.url()]).output().expect("curl");
    assert!(out.status.success());
    server
});

static PROXY: LazyLock<ProxyProcess> =
    LazyLock::new(|| ProxyProcess::start(&SERVER.url(), &[("max_body_bytes", "1048576"), ("upstream_timeout", "3s")]));

#[derive(Debug)]
struct Answer {
    status: u16,
    headers: HeaderMap,
    body: Vec<u8>,
}

async fn send(base: &str, method: &str, path_and_query: &str, headers: &[(&str, &str)], body: Vec<u8>) -> Answer {
    let mut request = client().request(method.parse().unwrap(), format!("{base}{path_and_query}"));
    for (k, v) in headers {
        request = request.header(*k, *v);
    }
    let response = request.body(body).send().await.expect("request");
    Answer {
        status: response.status().as_u16(),
        headers: response.headers().clone(),
        body: response.bytes().await.expect("body").to_vec(),
    }
}

/// Sends the same request direct and through the proxy; both must agree on status, body and the
/// ClickHouse headers that do not vary per run.
async fn same(method: &str, path_and_query: &str, headers: &[(&str, &str)], body: &[u8]) -> (Answer, Answer) {
    let direct = send(&SERVER.url(), method, path_and_query, headers, body.to_vec()).await;
    let proxied = send(&PROXY.url(), method, path_and_query, headers, body.to_vec()).await;
    assert_eq!(direct.status, proxied.status, "status of {method} {path_and_query}");
    assert_eq!(
        String::from_utf8_lossy(&direct.body),
        String::from_utf8_lossy(&proxied.body),
        "body of {method} {path_and_query}"
    );
    for name in ["x-clickhouse-exception-code", "x-clickhouse-format", "content-type", "x-clickhouse-timezone"] {
        assert_eq!(direct.headers.get(name), proxied.headers.get(name), "header {name} of {method} {path_and_query}");
    }
    assert!(proxied.headers.get("x-preagg").is_some(), "X-Preagg on {path_and_query}");
    (direct, proxied)
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(data).unwrap();
    encoder.finish().unwrap()
}

#[tokio::test]
async fn every_request_shape_answers_as_direct() {
    same("GET", "/?query=SELECT%201", &[], b"").await;
    same("POST", "/", &[], b"SELECT number, toString(number) FROM numbers(5)").await;
    same("POST", "/?query=SELECT%20number%20FROM%20numbers(10)%20WHERE", &[], b"number % 3 = 0").await;
    same("POST", "/?default_format=JSONEachRow", &[], b"SELECT 1 AS one").await;
    same("POST", "/", &[("X-ClickHouse-Format", "CSVWithNames")], b"SELECT 1 AS one, 'x' AS s").await;
    same("POST", "/?default_format=CSV", &[], b"SELECT 2 AS two FORMAT JSONCompactEachRow").await;
    same("POST", "/?param_n=4&param_s=a%27b", &[], b"SELECT {n:UInt32} + 1 AS n, {s:String} AS s").await;
    same("POST", "/", &[("Content-Encoding", "gzip")], &gzip(b"SELECT sum(number) FROM numbers(1000)")).await;
    same("POST", "/?max_result_rows=2&result_overflow_mode=throw", &[], b"SELECT number FROM numbers(10)").await;
    same("POST", "/?no_such_setting_at_all=1", &[], b"SELECT 1").await;
    same("POST", "/", &[], b"SELECT * FROM no_such_table").await;
    same("POST", "/", &[], b"SELEC 1").await;
    let (_, p) = same("GET", "/ping", &[], b"").await;
    assert_eq!(p.body, b"Ok.\n");
    assert_eq!(p.headers["x-preagg"], "passthrough reason=not_query_endpoint");
    let (_, p) = same("POST", "/", &[], b"SELECT 1").await;
    assert_eq!(p.headers["x-preagg"], "passthrough reason=not_experiment_query");
}

#[tokio::test]
async fn inserts_pass_through_untouched_in_either_form() {
    let (_, p) = same("POST", "/?query=INSERT%20INTO%20t%20FORMAT%20CSV", &[], b"1,\"one\"\n2,\"two\"\n").await;
    assert_eq!(p.headers["x-preagg"], "passthrough reason=insert");
    same("POST", "/", &[], b"INSERT INTO t FORMAT TSV\n3\tthree\n").await;
    let count = send(&PROXY.url(), "POST", "/", &[], b"SELECT count() FROM t WHERE a IN (1, 2, 3)".to_vec()).await;
    assert_eq!(count.body, b"6\n", "both INSERTs ran twice: once direct, once through the proxy");
}

#[tokio::test]
async fn credentials_query_id_and_parameters_reach_the_upstream_verbatim() {
    // One credential scheme per request: ClickHouse refuses a mix.
    let query = "/?query_id=qid-transparency-1&user=someone&password=s3cret%21&database=default\
                 &max_threads=2&param_x=%C3%A9&session_id=sess-1&log_comment=b&log_comment=a";
    let p = send(&PROXY.url(), "POST", query, &[("X-Custom-Header", "kept")], b"SELECT {x:String} AS x".to_vec()).await;
    assert_eq!(p.status, 200, "{}", String::from_utf8_lossy(&p.body));
    assert_eq!(p.headers["x-clickhouse-query-id"], "qid-transparency-1");
    let headers = [("X-ClickHouse-User", "header-user"), ("X-ClickHouse-Key", "header-key")];
    let h = send(&PROXY.url(), "POST", "/?query_id=qid-transparency-4", &headers, b"SELECT 1".to_vec()).await;
    assert_eq!(h.status, 200);
    let basic = [("Authorization", "Basic dXNlcjpwYXNz")];
    let q = "/?query_id=qid-transparency-2";
    let d = send(&SERVER.url(), "POST", q.replace("-2", "-3").as_str(), &basic, b"SELECT 1".to_vec()).await;
    let b = send(&PROXY.url(), "POST", q, &basic, b"SELECT 1".to_vec()).await;
    assert_eq!((d.status, d.body), (b.status, b.body));
    let logged = |id: &str| {
        wait_for("the request in the server log", Duration::from_secs(5), || {
            SERVER.requests().into_iter().find(|r| r.to_string().contains(id))
        })
        .to_string()
    };
    let text = logged("qid-transparency-1");
    for expected in ["s3cret%21", "log_comment=b&log_comment=a", "kept", "sess-1", "param_x=%C3%A9"] {
        assert!(text.contains(expected), "{expected} missing upstream: {text}");
    }
    let text = logged("qid-transparency-4");
    assert!(text.contains("header-user") && text.contains("header-key"), "{text}");
    assert!(logged("qid-transparency-2").contains("Basic dXNlcjpwYXNz"));
    assert!(!PROXY.log_text().contains("s3cret"), "a password reached the proxy's log");
    assert!(!PROXY.log_text().contains("header-key"), "a key reached the proxy's log");
}

#[tokio::test]
async fn authentication_errors_come_back_unchanged() {
    let guarded = ChServer::start_with(&["--auth", "alice:wonder"]);
    let proxy = ProxyProcess::start(&guarded.url(), &[]);
    for creds in [("alice", "wonder"), ("alice", "wrong")] {
        let q = format!("/?user={}&password={}", creds.0, creds.1);
        let direct = send(&guarded.url(), "POST", &q, &[], b"SELECT 1".to_vec()).await;
        let proxied = send(&proxy.url(), "POST", &q, &[], b"SELECT 1".to_vec()).await;
        assert_eq!(direct.status, proxied.status);
        assert_eq!(
            direct.headers.get("x-clickhouse-exception-code"),
            proxied.headers.get("x-clickhouse-exception-code")
        );
    }
}

#[tokio::test]
async fn large_results_stream_with_flat_memory() {
    // About 200 MB of result, read slowly at first so that backpressure must hold it upstream.
    let query = "SELECT repeat('x', 1000) FROM numbers(200000) SETTINGS max_block_size = 1000";
    let response = client().post(PROXY.url()).body(query).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let mut stream = response.bytes_stream();
    let mut total = 0usize;
    let mut chunks = 0usize;
    while let Some(chunk) = stream.next().await {
        total += chunk.unwrap().len();
        chunks += 1;
        if chunks < 50 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    assert_eq!(total, 200_000 * 1001);
    let peak_mb = PROXY.peak_rss_kb() / 1024;
    assert!(peak_mb < 100, "proxy peak memory {peak_mb} MB while streaming 200 MB");
}

#[tokio::test]
async fn a_client_that_disconnects_cancels_the_upstream_query() {
    let query_id = "qid-disconnect-1";
    let body = "SELECT number, sleepEachRow(0.05) FROM numbers(2000)";
    let request = format!(
        "POST /?query_id={query_id}&max_block_size=1&readonly=2&cancel_http_readonly_queries_on_client_close=1 \
         HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    // A client that reads the first rows, then closes its socket.
    let mut stream = TcpStream::connect(("127.0.0.1", PROXY.port)).unwrap();
    stream.write_all(request.as_bytes()).unwrap();
    let mut first = [0u8; 256];
    let read = stream.read(&mut first).unwrap();
    assert!(String::from_utf8_lossy(&first[..read]).starts_with("HTTP/1.1 200"));
    drop(stream);
    let closed = Instant::now();
    let entry = wait_for("the upstream to see the disconnect", Duration::from_secs(20), || {
        SERVER.requests().into_iter().find(|r| r.to_string().contains(query_id) && r["cancelled"] == true)
    });
    assert!(closed.elapsed() < Duration::from_secs(5), "cancelled after {:?}: {entry}", closed.elapsed());
}

fn raw_exchange(port: u16, request: &[u8]) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    stream.write_all(request).unwrap();
    let mut out = Vec::new();
    let _ = stream.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn malformed_oversized_unreachable_and_slow_get_documented_answers() {
    // Malformed HTTP.
    let answer = raw_exchange(PROXY.port, b"THIS IS NOT HTTP\r\n\r\n");
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("X-ClickHouse-Exception-Code: 1001"), "{answer}");
    assert!(answer.contains("Code: 1001. DB::Exception: preagg-proxy: malformed HTTP request"), "{answer}");
    assert!(answer.contains("X-Preagg: passthrough reason=bad_request"), "{answer}");
    // A chunked body that breaks off mid-chunk.
    let answer = raw_exchange(
        PROXY.port,
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\nzz\r\nSELECT\r\n",
    );
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.to_ascii_lowercase().contains("x-preagg: passthrough reason=bad_request"), "{answer}");
    // Oversized query text (the cap is 1 MiB here); INSERT data may be larger.
    let big = format!("SELECT '{}'", "x".repeat(2 * 1024 * 1024));
    let p = send(&PROXY.url(), "POST", "/", &[], big.into_bytes()).await;
    assert_eq!(p.status, 413);
    assert_eq!(p.headers["x-preagg"], "passthrough reason=body_too_large");
    assert!(
        String::from_utf8_lossy(&p.body).starts_with("Code: 1002. DB::Exception: preagg-proxy: request body is larger")
    );
    let rows: String = (0..200_000).map(|i| format!("{i},\"row{i}\"\n")).collect();
    let p = send(&PROXY.url(), "POST", "/", &[], format!("INSERT INTO t FORMAT CSV\n{rows}").into_bytes()).await;
    assert_eq!(p.status, 200, "{}", String::from_utf8_lossy(&p.body));
    // Slow upstream: the timeout here is 3 s.
    let p = send(&PROXY.url(), "POST", "/", &[], b"SELECT sleep(3), sleep(2)".to_vec()).await;
    assert_eq!(p.status, 504);
    assert_eq!(p.headers["x-clickhouse-exception-code"], "159");
    // Unreachable upstream.
    let nowhere = ProxyProcess::start("http://127.0.0.1:9", &[]);
    let p = send(&nowhere.url(), "POST", "/", &[], b"SELECT 1".to_vec()).await;
    assert_eq!(p.status, 502);
    assert_eq!(p.headers["x-clickhouse-exception-code"], "210");
    assert!(String::from_utf8_lossy(&p.body).contains("cannot connect to upstream ClickHouse at http://127.0.0.1:9"));
    // And the proxy keeps serving.
    let ok = send(&PROXY.url(), "POST", "/", &[], b"SELECT 42".to_vec()).await;
    assert_eq!((ok.status, ok.body), (200, b"42\n".to_vec()));
}

#[tokio::test]
async fn every_request_is_logged_once_without_credentials() {
    let p = send(&PROXY.url(), "POST", "/?password=hunter2&query_id=qid-log-1", &[], b"SELECT 7".to_vec()).await;
    assert_eq!(p.status, 200);
    let line = wait_for("the access log line", Duration::from_secs(5), || {
        PROXY.log_lines().into_iter().find(|l| l["target"] == "preagg_proxy::access" && l["bytes"] == 2)
    });
    for field in ["method", "path", "status", "bytes", "duration_ms", "outcome"] {
        assert!(line.get(field).is_some(), "{field} missing from {line}");
    }
    assert!(!PROXY.log_text().contains("hunter2"));
}

#[tokio::test]
async fn sigterm_drains_in_flight_requests() {
    let mut proxy = ProxyProcess::start(&SERVER.url(), &[("shutdown_grace", "10s")]);
    let url = proxy.url();
    let slow = tokio::spawn(async move { send(&url, "POST", "/", &[], b"SELECT sleep(1.5) AS slept".to_vec()).await });
    tokio::time::sleep(Duration::from_millis(400)).await;
    proxy.signal("TERM");
    let answer = slow.await.unwrap();
    assert_eq!(answer.status, 200);
    assert_eq!(answer.body, b"0\n");
    assert_eq!(proxy.wait_exit(Duration::from_secs(10)), Some(true));
    assert!(TcpStream::connect(("127.0.0.1", proxy.port)).is_err(), "stopped accepting");
}
