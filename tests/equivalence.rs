//! Proof of exactness on the real engine: for every supported query form and many ranges, the
//! rows through the proxy equal the direct rows, cold (answered by the original while windows
//! build) and warm (rewritten, which X-Preagg must confirm, or the test proves nothing).
//!
//! The forms are the project's own queries in PostHog's shapes and variants of them; the same
//! checks run over PostHog's corpus (01-04) when it is present (`corpus_*`).
//!
//! Data: the seeded generator plus edge rows on the bounds. The seed is random per run (printed);
//! set PREAGG_TEST_SEED to replay one, and PREAGG_EQUIVALENCE_ROUNDS for a longer randomized run
//! (`scripts/long-equivalence.sh`).

mod common;

use std::time::Duration;

use common::equivalence::{
    Answer, Form, answer, corpus_forms, edge_rows, exec, forms, passthrough_forms, run, same_rows, shift,
    until_rewritten, until_rewritten_by,
};
use common::{ChServer, ProxyProcess, client};

const TEAM: i64 = 99999;
const FLAG: &str = "test-experiment";

fn seed() -> u64 {
    std::env::var("PREAGG_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos() as u64 % 100_000
    })
}

/// Checks one form over one range: cold equals direct, then warm equals direct and is rewritten.
async fn check(server: &ChServer, proxy: &ProxyProcess, form: &Form, lo: &str, hi: &str, expect_rewrite: bool) {
    let sql = form.query(lo, hi);
    let direct = run(&server.url(), &sql).await;
    assert_eq!(direct.status, 200, "{}: direct failed: {:?}", form.name, direct.lines);
    let cold = run(&proxy.url(), &sql).await;
    if let Err(e) = same_rows(&direct, &cold) {
        panic!("{} [{lo}, {hi}] cold ({}): {e}", form.name, cold.preagg);
    }
    if !expect_rewrite {
        let again = run(&proxy.url(), &sql).await;
        assert!(again.preagg.starts_with("passthrough"), "{}: {}", form.name, again.preagg);
        return;
    }
    let warm = until_rewritten(&proxy.url(), &sql, Duration::from_secs(60)).await;
    assert!(
        warm.preagg.contains(&format!("occurrences={}", form.occurrences)),
        "{}: expected {} occurrences: {}",
        form.name,
        form.occurrences,
        warm.preagg
    );
    if let Err(e) = same_rows(&direct, &warm) {
        let jobs = common::client().get(format!("{}/admin/jobs", proxy.admin_url())).send().await.unwrap();
        eprintln!("jobs at failure: {}", jobs.text().await.unwrap_or_default());
        if let Some(last) = proxy.log_lines().iter().rev().find(|l| l["message"] == "rewritten query") {
            eprintln!("last rewritten query: {}", last["rewritten"]);
        }
        panic!("{} [{lo}, {hi}] warm ({}): {e}", form.name, warm.preagg);
    }
}

/// Ranges with exposures exactly on their bounds and one microsecond either side ([`edge_rows`]).
const EDGE_RANGES: [(&str, &str); 3] = [
    ("2026-10-03 07:15:00.250000", "2026-10-10 16:40:00.000000"),
    ("2026-10-01 00:00:00.000000", "2026-10-08 00:00:00.000000"),
    ("2026-10-02 13:00:00.000000", "2026-10-02 20:30:00.000000"),
];

/// A server with seeded data (the seed printed) plus the edge rows of [`EDGE_RANGES`], and a
/// proxy in front of it.
fn edge_server() -> (ChServer, ProxyProcess) {
    let seed = seed();
    eprintln!("equivalence seed: {seed} (replay with PREAGG_TEST_SEED={seed})");
    let server = ChServer::start();
    server.generate(&["--events", "150000", "--seed", &seed.to_string(), "--start", "2026-10-01", "--days", "14"]);
    exec(&server.url(), &edge_rows(TEAM, FLAG, &EDGE_RANGES));
    let proxy = ProxyProcess::start(&server.url(), &[]);
    proxy.wait_engine_ready();
    (server, proxy)
}

/// Checks every form over every edge range: rewritten once warm, the direct rows throughout.
async fn every_form_over_the_edge_ranges(server: &ChServer, proxy: &ProxyProcess, forms: &[Form]) {
    for form in forms {
        let (lo, hi) = EDGE_RANGES[0];
        let direct = run(&server.url(), &form.query(lo, hi)).await;
        assert!(direct.lines.len() > 2, "{}: the data gives it no rows to compare: {:?}", form.name, direct.lines);
        for (lo, hi) in EDGE_RANGES {
            check(server, proxy, form, lo, hi, true).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_form_returns_the_direct_rows_cold_and_warm() {
    let (server, proxy) = edge_server();
    every_form_over_the_edge_ranges(&server, &proxy, &forms(TEAM, FLAG)).await;
    // Queries that are no experiment queries pass through, with the direct rows.
    let (lo, hi) = EDGE_RANGES[0];
    for form in passthrough_forms(TEAM) {
        check(&server, &proxy, &form, lo, hi, false).await;
    }
    // A range too short to hold a whole hour window stays untouched.
    let form = &forms(TEAM, FLAG)[0];
    check(&server, &proxy, form, "2026-10-05 23:59:59.999999", "2026-10-06 00:59:59.000000", false).await;
}

/// The same over PostHog's corpus (01-04), when it is present.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corpus_forms_return_the_direct_rows_cold_and_warm() {
    let Some(forms) = corpus_forms() else { return };
    let (server, proxy) = edge_server();
    every_form_over_the_edge_ranges(&server, &proxy, &forms).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn randomized_ranges_match_direct() {
    let seed = seed();
    let rounds: usize = std::env::var("PREAGG_EQUIVALENCE_ROUNDS").ok().and_then(|r| r.parse().ok()).unwrap_or(6);
    eprintln!("randomized equivalence: seed {seed}, {rounds} rounds");
    let server = ChServer::start();
    server.generate(&["--events", "80000", "--seed", &(seed + 1).to_string(), "--start", "2026-10-01", "--days", "10"]);
    let proxy = ProxyProcess::start(&server.url(), &[("log_filter", "info,preagg_proxy::proxy=debug")]);
    proxy.wait_engine_ready();
    let forms = forms(TEAM, FLAG);
    let mut state = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    let mut next = |n: u64| {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (state >> 33) % n
    };
    for round in 0..rounds {
        let start_us = next(6 * 86_400) as i64 * 1_000_000 + next(1_000_000) as i64;
        let length_us = (7_200 + next(4 * 86_400)) as i64 * 1_000_000 + next(1_000_000) as i64;
        let lo = shift("2026-10-01 00:00:00.000000", start_us);
        let hi = shift(&lo, length_us);
        let form = &forms[next(forms.len() as u64) as usize];
        eprintln!("round {round}: {} [{lo}, {hi}]", form.name);
        check(&server, &proxy, form, &lo, &hi, true).await;
    }
}

/// Sends `sql` to `base` with `path_and_query` and `headers` (a GET when `sql` is empty: the query
/// is in the URL), answered in `TSVWithNamesAndTypes`.
async fn send(base: &str, path_and_query: &str, headers: &[(&str, &str)], sql: &str) -> Answer {
    let method = if sql.is_empty() { reqwest::Method::GET } else { reqwest::Method::POST };
    let mut request = client()
        .request(method, format!("{base}{path_and_query}"))
        .header("X-ClickHouse-Format", "TSVWithNamesAndTypes");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    answer(request.body(sql.to_string()).send().await.expect("query")).await.unwrap()
}

/// Sends the same request direct and through the proxy until the proxy rewrites it; both must
/// give the same rows.
async fn same_when_rewritten(server: &ChServer, proxy: &ProxyProcess, path: &str, headers: &[(&str, &str)], sql: &str) {
    let shown = &path[..path.len().min(80)];
    let direct = send(&server.url(), path, headers, sql).await;
    assert_eq!(direct.status, 200, "{shown}: direct failed: {:?}", direct.lines);
    let url = proxy.url();
    let proxied = until_rewritten_by(Duration::from_secs(60), || send(&url, path, headers, sql)).await;
    if let Err(e) = same_rows(&direct, &proxied) {
        panic!("{shown} {headers:?}: {e}");
    }
}

/// The request is read as ClickHouse reads it: the `X-ClickHouse-Database` header over the
/// `database` parameter, the first `query` parameter of several, and a `Content-Encoding` that
/// ClickHouse does not know (`identity`) left for ClickHouse to refuse.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_request_is_read_as_clickhouse_reads_it() {
    let server = ChServer::start();
    server.generate(&["--events", "40000", "--seed", "11", "--start", "2026-10-01", "--days", "10"]);
    // Another database with a third of the events: a query read against the wrong one gets other rows.
    exec(
        &server.url(),
        "CREATE DATABASE IF NOT EXISTS decoy;\nCREATE TABLE decoy.events AS default.events;\n\
         INSERT INTO decoy.events SELECT * FROM default.events WHERE cityHash64(uuid) % 3 = 0;\n\
         CREATE TABLE decoy.person_distinct_id_overrides AS default.person_distinct_id_overrides;\n\
         INSERT INTO decoy.person_distinct_id_overrides SELECT * FROM default.person_distinct_id_overrides",
    );
    let proxy = ProxyProcess::start(&server.url(), &[("build", "wait")]);
    proxy.wait_engine_ready();
    let form = &forms(TEAM, FLAG)[0];
    let week = form.query("2026-10-02 00:00:00.000000", "2026-10-08 00:00:00.000000");
    let days = form.query("2026-10-03 00:00:00.000000", "2026-10-05 00:00:00.000000");

    let decoy = send(&server.url(), "/?database=decoy", &[], &week).await;
    let main = send(&server.url(), "/?database=default", &[], &week).await;
    assert!(same_rows(&decoy, &main).is_err(), "the two databases must hold different exposures");
    same_when_rewritten(&server, &proxy, "/?database=decoy", &[("X-ClickHouse-Database", "default")], &week).await;
    same_when_rewritten(&server, &proxy, "/?database=default", &[("X-ClickHouse-Database", "decoy")], &week).await;
    same_when_rewritten(&server, &proxy, "/?database=&database=decoy&database=default", &[], &week).await;

    let encode = |sql: &str| -> String { form_urlencoded::byte_serialize(sql.as_bytes()).collect() };
    let two_queries = format!("/?query={}&query={}", encode(&week), encode(&days));
    same_when_rewritten(&server, &proxy, &two_queries, &[], "").await;

    let identity = [("Content-Encoding", "identity")];
    let direct = send(&server.url(), "/", &identity, &week).await;
    let proxied = send(&proxy.url(), "/", &identity, &week).await;
    assert_ne!(direct.status, 200, "ClickHouse refuses Content-Encoding: identity");
    assert_eq!((proxied.status, &proxied.lines), (direct.status, &direct.lines));
    assert!(proxied.preagg.starts_with("passthrough"), "{}", proxied.preagg);
}
