//! Real client libraries run through the proxy exactly as against the server: Python's
//! clickhouse-connect (also configured as PostHog configures it, with experiment queries) and the
//! official `clickhouse` Rust crate.

mod common;

use std::process::Command;

use std::io::Write;
use std::time::Duration;

use common::equivalence::forms;
use common::{ChServer, ProxyProcess, python, root};
use serde::{Deserialize, Serialize};

fn clickhouse_connect_session(url: &str, table: &str) -> serde_json::Value {
    let out = Command::new(python())
        .arg(root().join("tests/clients/clickhouse_connect_check.py"))
        .args([url, table])
        .output()
        .expect("running clickhouse-connect");
    assert!(out.status.success(), "clickhouse-connect against {url}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn clickhouse_connect_behaves_the_same_through_the_proxy() {
    let server = ChServer::start();
    let proxy = ProxyProcess::start(&server.url(), &[]);
    let direct = clickhouse_connect_session(&server.url(), "connect_direct");
    let proxied = clickhouse_connect_session(&proxy.url(), "connect_proxied");
    assert_eq!(direct, proxied);
    assert_eq!(proxied["streamed_rows"], 5000);
    assert_eq!(proxied["error"], true);
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, clickhouse::Row)]
struct Item {
    id: u32,
    name: String,
    score: f64,
}

async fn rust_client_session(url: &str, table: &str) -> (Vec<Item>, u64, String) {
    // Native LZ4 framing (`compress=1`) is what the chdb test server does not implement.
    let client = clickhouse::Client::default().with_url(url).with_compression(clickhouse::Compression::None);
    client.query_raw(&format!("DROP TABLE IF EXISTS {table}")).execute().await.unwrap();
    client
        .query_raw(&format!(
            "CREATE TABLE {table} (id UInt32, name String, score Float64) ENGINE = MergeTree ORDER BY id"
        ))
        .execute()
        .await
        .unwrap();
    let mut insert = client.insert::<Item>(table).await.unwrap();
    for i in 0..3000u32 {
        insert.write(&Item { id: i, name: format!("name-{i}"), score: f64::from(i) / 3.0 }).await.unwrap();
    }
    insert.end().await.unwrap();
    let rows = client
        .query(&format!("SELECT ?fields FROM {table} WHERE id % 500 = 0 ORDER BY id"))
        .fetch_all::<Item>()
        .await
        .unwrap();
    let count: u64 = client.query(&format!("SELECT count() FROM {table}")).fetch_one().await.unwrap();
    let error = client.query("SELECT * FROM definitely_missing_table").execute().await.unwrap_err().to_string();
    (rows, count, error)
}

#[tokio::test]
async fn the_clickhouse_crate_behaves_the_same_through_the_proxy() {
    let server = ChServer::start();
    let proxy = ProxyProcess::start(&server.url(), &[]);
    let direct = rust_client_session(&server.url(), "crate_direct").await;
    let proxied = rust_client_session(&proxy.url(), "crate_proxied").await;
    assert_eq!(direct.0, proxied.0);
    assert_eq!((direct.1, proxied.1), (3000, 3000));
    assert!(direct.2.contains("UNKNOWN_TABLE") && proxied.2.contains("UNKNOWN_TABLE"), "{}", proxied.2);
}

/// What clickhouse-connect, configured as PostHog's `ProxyClient` is, returned for `queries`.
fn posthog_client_session(url: &str, prefix: &str, queries: &serde_json::Value) -> serde_json::Value {
    let mut child = Command::new(python())
        .arg(root().join("tests/clients/posthog_client_check.py"))
        .args([url, prefix])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("running clickhouse-connect");
    child.stdin.take().unwrap().write_all(queries.to_string().as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "clickhouse-connect against {url}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn posthogs_client_path_gets_rewritten_answers_equal_to_direct() {
    const TEAM: i64 = 99999;
    const FLAG: &str = "test-experiment";
    let (lo, hi) = ("2026-10-01 07:30:00.000000", "2026-10-12 18:15:00.000000");
    let server = ChServer::start();
    server.generate(&["--events", "40000", "--seed", "5", "--start", "2026-10-01", "--days", "14"]);
    // The library adds URL settings of its own that join the query hash: windows are warmed
    // with the same parameters, as the README tells PostHog operators to.
    let proxy = ProxyProcess::start(&server.url(), &[]);
    proxy.wait_engine_ready();
    let forms = forms(TEAM, FLAG);
    for form in &forms {
        let warm = common::client()
            .post(format!(
                "{}/admin/warm?date_time_input_format=best_effort&cast_string_to_dynamic_use_inference=1",
                proxy.admin_url()
            ))
            .body(form.query(lo, hi))
            .send()
            .await
            .unwrap();
        assert_eq!(warm.status(), 200, "{}: {}", form.name, warm.text().await.unwrap());
    }
    let queries: serde_json::Value =
        forms.iter().map(|f| serde_json::json!({"name": f.name, "sql": f.query(lo, hi), "flag": FLAG})).collect();
    let rewritten =
        || async { common::metric(&proxy.metrics().await, "preagg_requests_total", &[("outcome", "rewritten")]) };
    let before = rewritten().await;
    let direct = posthog_client_session(&server.url(), "direct", &queries);
    let proxied = posthog_client_session(&proxy.url(), "proxied", &queries);
    // Requests are counted when their connection's work is done: wait a little for the last.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while rewritten().await - before < forms.len() as f64 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let outcomes = proxy.metrics().await;
    let outcomes: Vec<&str> = outcomes.lines().filter(|l| l.starts_with("preagg_requests_total")).collect();
    assert_eq!(rewritten().await - before, forms.len() as f64, "every query rewritten: {outcomes:#?}");
    for (d, p) in direct.as_array().unwrap().iter().zip(proxied.as_array().unwrap()) {
        let name = &d["name"];
        assert_eq!(d["column_names"], p["column_names"], "{name}");
        assert_eq!(d["rows"], p["rows"], "{name}");
        assert!(!d["rows"].as_array().unwrap().is_empty(), "{name}: the query has rows");
        assert_eq!(d["summary_keys"], p["summary_keys"], "{name}: the summary the library reads");
        // The query id the client chose comes back, through the proxy as directly.
        assert!(p["query_id"].as_str().unwrap().starts_with("proxied-"), "{name}: {}", p["query_id"]);
        assert!(d["query_id"].as_str().unwrap().starts_with("direct-"), "{name}: {}", d["query_id"]);
    }
}
