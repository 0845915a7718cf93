//! Security properties: literals that try to break quoting come out byte for byte; preaggregates
//! can be kept per ClickHouse user, and are then built as that user; analysis has a time budget.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::equivalence::{exec, run, same_rows, until_rewritten};
use common::{ChServer, ProxyProcess, client};
use preagg_proxy::outcome::Reason;
use preagg_proxy::rules;
use preagg_proxy::sql::{self, Context};

/// A flag key that tries every quoting trick, and the same key as a ClickHouse string literal.
const NASTY_FLAG: &str = "it's \\ «ü» 実験 ') OR 1=1 -- ";
const NASTY_FLAG_LITERAL: &str = "'it\\'s \\\\ «ü» 実験 \\') OR 1=1 -- '";

fn exposures_query(flag_literal: &str) -> String {
    format!(
        "SELECT events.person_id AS entity_id, \
         if(greater(count(DISTINCT JSONExtractString(events.properties, '$feature_flag_response')), 1), '$multiple', \
         any(JSONExtractString(events.properties, '$feature_flag_response'))) AS variant, \
         min(events.timestamp) AS first_exposure_time FROM events \
         WHERE events.team_id = 99999 AND events.event = '$feature_flag_called' \
         AND JSONExtractString(events.properties, '$feature_flag') = {flag_literal} \
         AND events.timestamp >= '2026-10-02 09:00:00' AND events.timestamp < '2026-10-09 17:30:00' \
         GROUP BY entity_id"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quoting_tricks_in_flag_keys_come_out_exactly() {
    let server = ChServer::start();
    server.generate(&["--events", "50000", "--seed", "3", "--start", "2026-10-01", "--days", "10"]);
    // Exposures of the nasty flag: its JSON property is built by ClickHouse from the literal.
    exec(
        &server.url(),
        &format!(
            "INSERT INTO events (uuid, event, properties, timestamp, team_id, distinct_id, person_id, `$session_id`, \
             elements_chain, created_at, _timestamp) SELECT generateUUIDv4(), '$feature_flag_called', \
             toJSONString(map('$feature_flag', {NASTY_FLAG_LITERAL}, '$feature_flag_response', if(number % 2 = 0, 'control', 'test'))), \
             toDateTime64('2026-10-03 00:00:00', 6, 'UTC') + toIntervalSecond(number * 97), 99999, concat('nasty-', toString(number % 300)), \
             reinterpretAsUUID(sipHash128(number % 300)), '', '', now64(), now() FROM numbers(3000)"
        ),
    );
    let proxy = ProxyProcess::start(&server.url(), &[("build", "wait")]);
    proxy.wait_engine_ready();
    let sql = exposures_query(NASTY_FLAG_LITERAL);
    let direct = run(&server.url(), &sql).await;
    assert!(direct.lines.len() > 200, "the nasty flag's exposures are found directly: {}", direct.lines.len());
    let warm = until_rewritten(&proxy.url(), &sql, Duration::from_secs(60)).await;
    same_rows(&direct, &warm).unwrap();
    // The decoded value really is the nasty key (the literal was not re-quoted on the way).
    let check = run(
        &server.url(),
        &format!("SELECT {NASTY_FLAG_LITERAL} = '{}'", NASTY_FLAG.replace('\\', "\\\\").replace('\'', "\\'")),
    )
    .await;
    assert_eq!(check.lines.last().map(String::as_str), Some("1"));
}

/// Posts `sql` to `url` with one credential header.
async fn post_as(url: &str, (name, value): (&str, &str), sql: &str) -> reqwest::Response {
    client().post(url).header(name, value).body(sql.to_string()).send().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_per_user_keeps_preaggregates_apart() {
    let server = ChServer::start();
    server.generate(&["--events", "30000", "--seed", "5", "--start", "2026-10-01", "--days", "10"]);
    let sql = exposures_query("'test-experiment'");
    // Alice twice, the second time with a role: with jobs_per_user, roles keep jobs apart too;
    // and carol through a warm.
    for (per_user, expected_hashes) in [("true", 4), ("false", 1)] {
        let database = format!("per_user_{per_user}");
        exec(&server.url(), &format!("CREATE DATABASE IF NOT EXISTS {database}"));
        let proxy = ProxyProcess::start(
            &server.url(),
            &[("build", "wait"), ("jobs_per_user", per_user), ("preagg_database", &database)],
        );
        proxy.wait_engine_ready();
        for (user, role) in [("alice", ""), ("bob", ""), ("alice", "&role=analyst")] {
            let url = format!("{}/?default_format=TSV{role}", proxy.url());
            let response = post_as(&url, ("X-ClickHouse-User", user), &sql).await;
            let preagg = response.headers()["x-preagg"].to_str().unwrap().to_string();
            assert!(preagg.starts_with("rewritten"), "{user}: {preagg}");
        }
        if per_user == "true" {
            // A warm names its user as a query does.
            let url = format!("{}/admin/warm", proxy.admin_url());
            let response = post_as(&url, ("X-ClickHouse-User", "carol"), &sql).await;
            assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
        }
        let jobs: serde_json::Value =
            client().get(format!("{}/admin/jobs", proxy.admin_url())).send().await.unwrap().json().await.unwrap();
        let hashes: std::collections::HashSet<&str> =
            jobs["jobs"].as_array().unwrap().iter().map(|j| j["query_hash"].as_str().unwrap()).collect();
        assert_eq!(hashes.len(), expected_hashes, "jobs_per_user={per_user}");
        // Kept per user, windows are built as the user, so that its grants and row policies apply.
        let builders: std::collections::BTreeSet<String> = server
            .requests()
            .iter()
            .filter(|r| r["query"].as_str().is_some_and(|q| q.starts_with(&format!("INSERT INTO `{database}`"))))
            .map(|r| r["user"].as_str().unwrap_or("").to_string())
            .collect();
        let expected: &[&str] = if per_user == "true" { &["alice", "bob", "carol"] } else { &["default"] };
        assert_eq!(builders.iter().map(String::as_str).collect::<Vec<_>>(), expected, "jobs_per_user={per_user}");
        if per_user == "true" {
            // Credentials the proxy cannot read: nothing is built, the query goes as it came.
            let url = format!("{}/?default_format=TSV", proxy.url());
            let response = post_as(&url, ("Authorization", "Negotiate dG9rZW4="), &sql).await;
            assert_eq!(response.headers()["x-preagg"], "passthrough reason=unknown_credentials");
        }
    }
}

#[test]
fn analysis_stops_at_its_time_budget() {
    let rules: Vec<_> = rules::load_dir(&common::root().join("rules")).unwrap().into_iter().map(Arc::new).collect();
    let one = exposures_query("'x'");
    let many: Vec<String> = (0..400).map(|_| format!("SELECT count() FROM ({one})")).collect();
    let text = many.join(" UNION ALL ");
    let result = sql::analyze(&rules, &text, &Context::default(), Duration::from_micros(1));
    assert_eq!(result.err(), Some(Reason::ParseBudgetExceeded));
    assert!(sql::analyze(&rules, &text, &Context::default(), Duration::from_secs(30)).is_ok());
}
