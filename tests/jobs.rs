//! Jobs under pressure: concurrent cold queries, failing and interrupted builds, a job store that
//! goes away. Every answer must still equal the direct one.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::LazyLock;
use std::time::Duration;

use common::equivalence::{Answer, exec, forms, run, same_rows, until_rewritten};
use common::relay::{Mode, Relay};
use common::{ChServer, ProxyProcess, client, metric, read_until};

const LO: &str = "2026-10-02 09:57:00.000000";
const HI: &str = "2026-10-12 14:30:00.000000";

/// One server with data for the whole file.
static SERVER: LazyLock<ChServer> = LazyLock::new(|| {
    let server = ChServer::start();
    server.generate(&["--events", "300000", "--seed", "11", "--start", "2026-10-01", "--days", "14"]);
    server
});

fn query() -> String {
    forms(99999, "test-experiment").remove(0).query(LO, HI)
}

async fn direct() -> Answer {
    run(&SERVER.url(), &query()).await
}

/// Jobs as the admin API lists them: (window start, end) -> statuses.
type Jobs = HashMap<(i64, i64), Vec<String>>;

/// Jobs as the admin API lists them.
async fn jobs_by_window(proxy: &ProxyProcess) -> Jobs {
    let body: serde_json::Value = client()
        .get(format!("{}/admin/jobs?limit=100000", proxy.admin_url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut out = Jobs::new();
    for job in body["jobs"].as_array().unwrap() {
        let window = (job["window"]["start"].as_i64().unwrap(), job["window"]["end"].as_i64().unwrap());
        out.entry(window).or_default().push(job["status"].as_str().unwrap().to_string());
    }
    out
}

/// Builds waiting for a slot, by the proxy's gauge.
async fn builds_queued(proxy: &ProxyProcess) -> f64 {
    metric(&proxy.metrics().await, "preagg_builds_queued", &[])
}

fn addr(url: &str) -> SocketAddr {
    url.trim_start_matches("http://").parse().unwrap()
}

/// A ready proxy whose own ClickHouse calls (DDL, builds) go through a relay, into a database of
/// their own; client queries go straight to the server.
async fn builds_through_a_relay(database: &str, settings: &[(&str, &str)]) -> (Relay, ProxyProcess) {
    let relay = Relay::start(addr(&SERVER.url())).await;
    exec(&SERVER.url(), &format!("CREATE DATABASE IF NOT EXISTS {database}"));
    let clickhouse = relay.url("http");
    let mut settings = settings.to_vec();
    settings.extend([("clickhouse_url", clickhouse.as_str()), ("preagg_database", database)]);
    let proxy = ProxyProcess::start(&SERVER.url(), &settings);
    proxy.wait_engine_ready();
    (relay, proxy)
}

/// Holds the proxy's ClickHouse calls at `relay` and sends a cold query (answered by the original,
/// as `building`); returns once its build's jobs are pending.
async fn leave_a_build_hanging(relay: &Relay, proxy: &ProxyProcess, expected: &Answer) {
    relay.set(Mode::Hang);
    let cold = run(&proxy.url(), &query()).await;
    same_rows(expected, &cold).unwrap();
    assert_eq!(cold.preagg, "passthrough reason=building");
    read_until(
        "a pending job",
        Duration::from_secs(10),
        || jobs_by_window(proxy),
        |jobs| jobs.values().any(|s| s.contains(&"pending".to_string())),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn identical_cold_queries_build_each_window_once() {
    let expected = direct().await;
    for build in ["wait", "background"] {
        let proxy = ProxyProcess::start(&SERVER.url(), &[("build", build), ("build_wait_timeout", "60s")]);
        proxy.wait_engine_ready();
        let answers = futures_util::future::join_all((0..24).map(|_| {
            let url = proxy.url();
            async move { run(&url, &query()).await }
        }))
        .await;
        for answer in &answers {
            same_rows(&expected, answer).unwrap_or_else(|e| panic!("build={build}: {e}"));
            if build == "wait" {
                assert!(answer.preagg.starts_with("rewritten"), "build=wait answers are rewritten: {}", answer.preagg);
            }
        }
        if build == "background" {
            until_rewritten(&proxy.url(), &query(), Duration::from_secs(60)).await;
        }
        let jobs = jobs_by_window(&proxy).await;
        assert!(jobs.len() > 30, "build={build}: {} windows", jobs.len());
        for (window, statuses) in jobs {
            assert_eq!(statuses, vec!["ready".to_string()], "build={build}: window {window:?} built more than once");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_build_falls_back_and_is_retried() {
    let expected = direct().await;
    let database = "faults_failed_build";
    exec(&SERVER.url(), &format!("CREATE DATABASE IF NOT EXISTS {database}"));
    let proxy = ProxyProcess::start(
        &SERVER.url(),
        &[("build", "wait"), ("build_retry_after", "1s"), ("preagg_database", database)],
    );
    proxy.wait_engine_ready();
    // The table disappears behind the proxy's back: the build's INSERT fails with a server error.
    exec(&SERVER.url(), &format!("DROP TABLE {database}.experiment_exposures_preaggregated"));
    let answer = run(&proxy.url(), &query()).await;
    same_rows(&expected, &answer).unwrap();
    assert_eq!(answer.preagg, "passthrough reason=build_failed");
    let jobs = jobs_by_window(&proxy).await;
    assert!(jobs.values().all(|s| s == &vec!["failed".to_string()]), "{jobs:?}");
    // After the retry delay the table is created again and the query is rewritten.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let answer = run(&proxy.url(), &query()).await;
    assert!(answer.preagg.starts_with("rewritten"), "{}", answer.preagg);
    same_rows(&expected, &answer).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_connections_during_a_build_fall_back() {
    let expected = direct().await;
    let (relay, proxy) =
        builds_through_a_relay("faults_dropped", &[("build", "wait"), ("build_retry_after", "1s")]).await;
    relay.set(Mode::Drop);
    let answer = run(&proxy.url(), &query()).await;
    same_rows(&expected, &answer).unwrap();
    assert_eq!(answer.preagg, "passthrough reason=build_failed");
    relay.set(Mode::Forward);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let answer = run(&proxy.url(), &query()).await;
    assert!(answer.preagg.starts_with("rewritten"), "{}", answer.preagg);
    same_rows(&expected, &answer).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_build_outlives_the_query_that_stopped_waiting_for_it() {
    let expected = direct().await;
    let settings =
        [("build", "wait"), ("build_wait_timeout", "300ms"), ("lease_duration", "3s"), ("build_retry_after", "1s")];
    let (relay, proxy) = builds_through_a_relay("faults_waiter_left", &settings).await;
    // ClickHouse holds the build: the query stops waiting for it and is answered by the original.
    leave_a_build_hanging(&relay, &proxy, &expected).await;
    // The build the query left is still running: when ClickHouse cuts it, it fails and is
    // retried, instead of holding its windows under a lease renewed forever.
    relay.set(Mode::Forward);
    let warm = until_rewritten(&proxy.url(), &query(), Duration::from_secs(30)).await;
    same_rows(&expected, &warm).unwrap();
    let jobs = jobs_by_window(&proxy).await;
    assert!(jobs.values().any(|s| s.contains(&"failed".to_string())), "the cut build failed: {jobs:?}");
    assert!(jobs.values().all(|s| s.contains(&"ready".to_string())), "{jobs:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn builds_beyond_the_queue_are_refused_while_clickhouse_holds_them_and_asked_again_later() {
    // Four queries over disjoint days: four builds of different windows.
    let ranges = [
        ("2026-10-02 09:57:00.000000", "2026-10-04 14:30:00.000000"),
        ("2026-10-05 09:57:00.000000", "2026-10-07 14:30:00.000000"),
        ("2026-10-08 09:57:00.000000", "2026-10-10 14:30:00.000000"),
        ("2026-10-11 09:57:00.000000", "2026-10-13 14:30:00.000000"),
    ];
    let form = forms(99999, "test-experiment").remove(0);
    let sqls: Vec<String> = ranges.iter().map(|(lo, hi)| form.query(lo, hi)).collect();
    let mut expected = Vec::new();
    for sql in &sqls {
        expected.push(run(&SERVER.url(), sql).await);
    }
    let settings = [
        ("build", "background"),
        ("max_concurrent_builds", "1"),
        ("max_queued_builds", "1"),
        ("build_retry_after", "1s"),
    ];
    let (relay, proxy) = builds_through_a_relay("faults_build_queue", &settings).await;
    relay.set(Mode::Hang);

    // The first build takes the one slot and hangs in ClickHouse.
    let first = run(&proxy.url(), &sqls[0]).await;
    assert_eq!(first.preagg, "passthrough reason=building");
    read_until(
        "the first build to hold its windows",
        Duration::from_secs(10),
        || jobs_by_window(&proxy),
        |jobs| jobs.values().any(|s| s.contains(&"pending".to_string())),
    )
    .await;

    // Three queries for three other builds at once: one place is left in the queue, and only one
    // of them takes it, although each decides before any build has started (they start after
    // the answers, with `build = background`). The others start none, and say so.
    let url = proxy.url();
    let racing = futures_util::future::join_all(sqls[1..].iter().map(|sql| run(&url, sql))).await;
    let outcomes: Vec<&str> = racing.iter().map(|answer| answer.preagg.as_str()).collect();
    let queued: Vec<usize> = (1..)
        .zip(&outcomes)
        .filter(|(_, outcome)| **outcome == "passthrough reason=building")
        .map(|(range, _)| range)
        .collect();
    assert_eq!(queued.len(), 1, "exactly one build queues: {outcomes:?}");
    let refused = outcomes.iter().filter(|&&outcome| outcome == "passthrough reason=build_queue_full").count();
    assert_eq!(refused, 2, "{outcomes:?}");
    // The query whose build queued joins it when asked again; a refused one is refused again.
    let queued_again = run(&proxy.url(), &sqls[queued[0]]).await;
    assert_eq!(queued_again.preagg, "passthrough reason=building");
    let refused_range = (1..sqls.len()).find(|range| *range != queued[0]).unwrap();
    let refused_again = run(&proxy.url(), &sqls[refused_range]).await;
    assert_eq!(refused_again.preagg, "passthrough reason=build_queue_full");
    // An operator's warm-up keeps to the same bound.
    let warm_up = client()
        .post(format!("{}/admin/warm", proxy.admin_url()))
        .body(sqls[refused_range].clone())
        .send()
        .await
        .unwrap();
    assert_eq!(warm_up.status().as_u16(), 503, "{:?}", warm_up.text().await);
    same_rows(&expected[0], &first).unwrap();
    for (answer, range) in racing.iter().zip(1..).chain([(&queued_again, queued[0]), (&refused_again, refused_range)]) {
        same_rows(&expected[range], answer).unwrap();
    }
    assert_eq!(builds_queued(&proxy).await, 1.0, "the refused builds did not queue");

    // ClickHouse lets go (the held build is cut and fails): the queued build runs, and the refused
    // ones are asked again by their next queries; every range ends rewritten and right.
    relay.set(Mode::Forward);
    for (sql, expected) in sqls.iter().zip(&expected) {
        let warm = until_rewritten(&proxy.url(), sql, Duration::from_secs(60)).await;
        same_rows(expected, &warm).unwrap();
    }
    read_until("the queue to empty", Duration::from_secs(30), || builds_queued(&proxy), |n| *n == 0.0).await;
    let totals = proxy.metrics().await;
    assert!(metric(&totals, "preagg_requests_total", &[("outcome", "build_queue_full")]) >= 2.0, "{totals}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_hangs_up_on_a_cold_query_still_leaves_its_windows_built() {
    let relay = Relay::start(addr(&SERVER.url())).await;
    let database = "faults_client_left";
    exec(&SERVER.url(), &format!("CREATE DATABASE IF NOT EXISTS {database}"));
    // Client queries go through the relay; the proxy's own ClickHouse calls go straight to the server.
    let proxy = ProxyProcess::start(
        &relay.url("http"),
        &[("build", "background"), ("clickhouse_url", &SERVER.url()), ("preagg_database", database)],
    );
    proxy.wait_engine_ready();
    relay.set(Mode::Hang);
    let abandoned = client().post(proxy.url()).body(query()).timeout(Duration::from_secs(3)).send().await;
    assert!(abandoned.is_err(), "the held query was answered: {abandoned:?}");
    // The relay still holds the upstream side: only the client's leaving ends the request.
    read_until(
        "the windows to be built",
        Duration::from_secs(60),
        || jobs_by_window(&proxy),
        |jobs| !jobs.is_empty() && jobs.values().all(|s| s == &vec!["ready".to_string()]),
    )
    .await;
    relay.set(Mode::Forward);
    let warm = run(&proxy.url(), &query()).await;
    assert!(warm.preagg.starts_with("rewritten"), "{}", warm.preagg);
    same_rows(&direct().await, &warm).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_killed_mid_build_recovers_after_restart() {
    let expected = direct().await;
    let relay = Relay::start(addr(&SERVER.url())).await;
    let dir = tempfile::tempdir().unwrap();
    let store = format!("sqlite://{}", dir.path().join("jobs.db").display());
    let database = "faults_killed";
    exec(&SERVER.url(), &format!("CREATE DATABASE IF NOT EXISTS {database}"));
    let settings = [
        ("store", store.as_str()),
        ("lease_duration", "3s"),
        ("clickhouse_url", &relay.url("http")),
        ("preagg_database", database),
    ];
    let first = ProxyProcess::start(&SERVER.url(), &settings);
    first.wait_engine_ready();
    // Builds hang inside ClickHouse; the proxy dies while its jobs are pending.
    leave_a_build_hanging(&relay, &first, &expected).await;
    first.signal("KILL");
    drop(first);
    relay.set(Mode::Forward);
    let second = ProxyProcess::start(&SERVER.url(), &settings);
    second.wait_engine_ready();
    let started = std::time::Instant::now();
    let warm = until_rewritten(&second.url(), &query(), Duration::from_secs(60)).await;
    same_rows(&expected, &warm).unwrap();
    eprintln!("rewritten again {:?} after the restart", started.elapsed());
    let jobs = jobs_by_window(&second).await;
    assert!(jobs.values().any(|s| s.contains(&"failed".to_string())), "the dead owner's jobs were taken over");
    assert!(jobs.values().all(|s| s.contains(&"ready".to_string())), "{jobs:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_stopped_mid_build_hands_its_windows_over_at_once() {
    let expected = direct().await;
    let dir = tempfile::tempdir().unwrap();
    let store = format!("sqlite://{}", dir.path().join("jobs.db").display());
    let settings = [("store", store.as_str())];
    let database = "faults_stopped";
    let (relay, mut first) = builds_through_a_relay(database, &settings).await;
    // Builds hang inside ClickHouse; the proxy is stopped while its jobs are pending.
    leave_a_build_hanging(&relay, &first, &expected).await;
    first.signal("TERM");
    assert_eq!(first.wait_exit(Duration::from_secs(30)), Some(true), "the proxy stops cleanly");
    // The leases are two minutes long; released, the next proxy takes the windows over at once.
    let (_relay, second) = builds_through_a_relay(database, &settings).await;
    let started = std::time::Instant::now();
    let warm = until_rewritten(&second.url(), &query(), Duration::from_secs(30)).await;
    same_rows(&expected, &warm).unwrap();
    eprintln!("rewritten {:?} after the restart", started.elapsed());
    assert!(first.log_text().contains("released the leases of unfinished builds"), "{}", first.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_store_that_is_down_means_pass_through_then_recovery() {
    let expected = direct().await;
    let relay = Relay::start("127.0.0.1:5432".parse().unwrap()).await;
    let store = common::postgres_url().replace("127.0.0.1:5432", &format!("127.0.0.1:{}", relay.port));
    // The PostgreSQL store outlives this run: a database of its own keeps its jobs apart.
    let database = format!("faults_store_down_{}", uuid::Uuid::new_v4().simple());
    let database = database.as_str();
    exec(&SERVER.url(), &format!("CREATE DATABASE IF NOT EXISTS {database}"));
    let proxy = ProxyProcess::start(
        &SERVER.url(),
        &[("store", &store), ("build", "wait"), ("job_cache_ttl", "100ms"), ("preagg_database", database)],
    );
    proxy.wait_engine_ready();
    let warm = until_rewritten(&proxy.url(), &query(), Duration::from_secs(60)).await;
    same_rows(&expected, &warm).unwrap();
    relay.set(Mode::Drop);
    tokio::time::sleep(Duration::from_millis(200)).await;
    for _ in 0..3 {
        let started = std::time::Instant::now();
        let answer = run(&proxy.url(), &query()).await;
        same_rows(&expected, &answer).unwrap();
        assert_eq!(answer.preagg, "passthrough reason=store_unavailable");
        assert!(started.elapsed() < Duration::from_secs(5), "a down store must not stall queries");
    }
    relay.set(Mode::Forward);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let again = until_rewritten(&proxy.url(), &query(), Duration::from_secs(30)).await;
    same_rows(&expected, &again).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_missing_in_clickhouse_are_never_served() {
    let expected = direct().await;
    let database = "faults_rows_missing";
    exec(&SERVER.url(), &format!("CREATE DATABASE IF NOT EXISTS {database}"));
    let proxy = ProxyProcess::start(&SERVER.url(), &[("build", "wait"), ("preagg_database", database)]);
    proxy.wait_engine_ready();
    let warm = until_rewritten(&proxy.url(), &query(), Duration::from_secs(60)).await;
    same_rows(&expected, &warm).unwrap();
    // Rows vanish behind the proxy's back (a truncate, an early TTL, a restored backup...).
    exec(&SERVER.url(), &format!("TRUNCATE TABLE {database}.experiment_exposures_preaggregated"));
    let answer = run(&proxy.url(), &query()).await;
    same_rows(&expected, &answer).unwrap();
    assert_eq!(answer.preagg, "passthrough reason=rewritten_query_failed");
    // The jobs were expired, so the next query rebuilds them and is rewritten again.
    let again = until_rewritten(&proxy.url(), &query(), Duration::from_secs(60)).await;
    same_rows(&expected, &again).unwrap();
}
