//! Real client libraries run through the proxy exactly as against the server: Python's
//! clickhouse-connect and the official `clickhouse` Rust crate.

mod common;

use std::process::Command;

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
