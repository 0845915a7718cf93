//! Shadow mode, metrics and the admin API, on the chdb-backed ClickHouse with the proxy binary.
//!
//! Shadow mode must never touch the client's answer: every proxied answer here is compared with
//! the direct one, and X-Preagg must say `passthrough reason=shadow` (a comparison was offered),
//! or the test proves nothing. What the comparisons concluded is read back from `/admin/shadow`,
//! the mismatch samples in the job store, and `/metrics`.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::LazyLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::equivalence::{Answer, exec, form, forms, run, same_rows};
use common::{ChServer, ProxyProcess, client, metric, proxy_binary, read_until, root};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const TEAM: i64 = 99999;
const FLAG: &str = "test-experiment";
const LO: &str = "2026-10-02 09:57:00.000000";
const HI: &str = "2026-10-12 14:30:00.000000";
const RULE: &str = "experiment_exposures";

/// One server with data for the whole file; each test keeps its preaggregates in a database of
/// its own, so tampering with one test's rows cannot reach another's.
static SERVER: LazyLock<ChServer> = LazyLock::new(|| {
    let server = ChServer::start();
    server.generate(&["--events", "150000", "--seed", "7", "--start", "2026-10-01", "--days", "14"]);
    server
});

/// The first form (the own mean metric shape, exposures inlined) over the test range.
fn query() -> String {
    forms(TEAM, FLAG).remove(0).query(LO, HI)
}

/// A proxy whose preaggregates live in `database` (created here).
fn proxy_in(database: &str, settings: &[(&str, &str)]) -> ProxyProcess {
    exec(&SERVER.url(), &format!("CREATE DATABASE IF NOT EXISTS {database}"));
    let mut all = vec![("preagg_database", database)];
    all.extend_from_slice(settings);
    let proxy = ProxyProcess::start(&SERVER.url(), &all);
    proxy.wait_engine_ready();
    proxy
}

/// An admin request with an optional bearer token: (status, body text).
async fn admin(proxy: &ProxyProcess, method: &str, path: &str, token: Option<&str>, body: &str) -> (u16, String) {
    let mut request = client().request(method.parse().unwrap(), format!("{}{path}", proxy.admin_url()));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.body(body.to_string()).send().await.expect("admin request");
    (response.status().as_u16(), response.text().await.unwrap_or_default())
}

/// An admin JSON answer that must be 200.
async fn admin_json(
    proxy: &ProxyProcess,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> serde_json::Value {
    let (status, text) = admin(proxy, method, path, token, body).await;
    assert_eq!(status, 200, "{method} {path}: {text}");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{method} {path}: {e}: {text}"))
}

/// Builds the windows of `sql` through `POST /admin/warm`; returns the windows built.
async fn warm(proxy: &ProxyProcess, sql: &str, token: Option<&str>) -> u64 {
    let answer = admin_json(proxy, "POST", "/admin/warm", token, sql).await;
    answer["windows_built"].as_array().unwrap().iter().map(|n| n.as_u64().unwrap()).sum()
}

/// The counters of `RULE` in `/admin/shadow`.
async fn rule_stats(proxy: &ProxyProcess) -> serde_json::Value {
    admin_json(proxy, "GET", "/admin/shadow", None, "").await["rules"][RULE].clone()
}

fn count(stats: &serde_json::Value, field: &str) -> u64 {
    stats[field].as_u64().unwrap_or(0)
}

/// Comparisons that ended (match, mismatch, noise or error).
fn concluded(stats: &serde_json::Value) -> u64 {
    ["matches", "mismatches", "noise", "errors"].iter().map(|f| count(stats, f)).sum()
}

/// Polls `/admin/shadow` until `done` holds for the rule's counters.
async fn until_stats(
    proxy: &ProxyProcess,
    what: &str,
    timeout: Duration,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    read_until(what, timeout, || rule_stats(proxy), done).await
}

/// Runs `sql` through the proxy until a shadow comparison is offered for it (its windows are
/// built); every answer on the way must equal `direct`.
async fn until_shadowed(proxy: &ProxyProcess, sql: &str, direct: &Answer, timeout: Duration) -> Answer {
    let started = Instant::now();
    loop {
        let answer = run(&proxy.url(), sql).await;
        same_rows(direct, &answer)
            .unwrap_or_else(|e| panic!("shadow mode changed the answer ({}): {e}", answer.preagg));
        assert!(!answer.preagg.starts_with("rewritten"), "shadow mode served a rewrite: {}", answer.preagg);
        if answer.preagg == "passthrough reason=shadow" {
            return answer;
        }
        assert!(started.elapsed() < timeout, "no shadow comparison within {timeout:?}: {}", answer.preagg);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `/metrics` text.
async fn scrape(proxy: &ProxyProcess) -> String {
    let (status, text) = admin(proxy, "GET", "/metrics", None, "").await;
    assert_eq!(status, 200, "{text}");
    text
}

/// Ready jobs of `proxy`, by id.
async fn ready_job_ids(proxy: &ProxyProcess, token: Option<&str>) -> BTreeSet<String> {
    let jobs = admin_json(proxy, "GET", "/admin/jobs?limit=100000", token, "").await;
    jobs["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|j| j["status"] == "ready")
        .map(|j| j["id"].as_str().unwrap().to_string())
        .collect()
}

/// The rows of `sql` on the server, as TSV lines.
fn select(sql: &str) -> Vec<String> {
    let output = std::process::Command::new("curl")
        .args(["-sS", "--fail-with-body", "--data-binary", sql, &SERVER.url()])
        .output()
        .expect("curl");
    assert!(output.status.success(), "{sql}: {}", String::from_utf8_lossy(&output.stdout));
    String::from_utf8_lossy(&output.stdout).lines().map(str::to_string).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shadowed_experiment_traffic_reports_only_matches() {
    let proxy = proxy_in("shadow_matches", &[("mode", "shadow")]);
    let forms = forms(TEAM, FLAG);
    let ranges = [(LO, HI), ("2026-10-01 00:00:00.000000", "2026-10-08 00:00:00.000000")];
    let mut offered = 0;
    for form in &forms {
        for (lo, hi) in ranges {
            let sql = form.query(lo, hi);
            let direct = run(&SERVER.url(), &sql).await;
            assert_eq!(direct.status, 200, "{}: {:?}", form.name, direct.lines);
            let started = Instant::now();
            until_shadowed(&proxy, &sql, &direct, Duration::from_secs(120)).await;
            offered += 1;
            eprintln!("{} [{lo}, {hi}]: shadowed after {:?}", form.name, started.elapsed());
        }
    }
    let stats = until_stats(&proxy, "every comparison", Duration::from_secs(120), |s| concluded(s) >= offered).await;
    eprintln!("shadow stats: {stats}");
    assert_eq!(count(&stats, "matches"), offered, "{stats}");
    for field in ["mismatches", "noise", "errors", "dropped", "skipped"] {
        assert_eq!(count(&stats, field), 0, "{field}: {stats}");
    }
    assert!(count(&stats, "original_ms") > 0 && count(&stats, "rewritten_ms") > 0, "times are kept: {stats}");
    let report = admin_json(&proxy, "GET", "/admin/shadow", None, "").await;
    assert_eq!(report["enabled"], true);
    assert_eq!(report["samples"], serde_json::json!([]), "no mismatch samples");

    let metrics = scrape(&proxy).await;
    let shadow = |result| metric(&metrics, "preagg_shadow_total", &[("rule", RULE), ("result", result)]);
    assert_eq!(shadow("match"), offered as f64, "{metrics}");
    for result in ["mismatch", "noise", "error", "skipped", "dropped"] {
        assert_eq!(shadow(result), 0.0, "{result}");
    }
    assert!(
        metric(&metrics, "preagg_requests_total", &[("outcome", "shadow"), ("status", "200")]) >= offered as f64,
        "{metrics}"
    );
    assert_eq!(metric(&metrics, "preagg_requests_total", &[("outcome", "rewritten")]), 0.0);
    assert!(metric(&metrics, "preagg_builds_started_total", &[("rule", RULE)]) >= forms.len() as f64);
    assert_eq!(metric(&metrics, "preagg_builds_failed_total", &[("rule", RULE)]), 0.0);
    assert!(metric(&metrics, "preagg_build_rows_written_total", &[("rule", RULE)]) > 0.0);
    assert_eq!(metric(&metrics, "preagg_shadow_speedup_count", &[]), offered as f64, "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_preaggregated_row_is_reported_as_a_mismatch_with_a_sample() {
    let database = "shadow_tampered";
    // Noise measurement on: the original agrees with itself, so the difference is the rewrite's.
    let proxy = proxy_in(database, &[("mode", "shadow"), ("shadow_noise", "true")]);
    let sql = query();
    let direct = run(&SERVER.url(), &sql).await;
    assert!(warm(&proxy, &sql, None).await > 30, "the range holds many sealed windows");
    let answer = run(&proxy.url(), &sql).await;
    assert_eq!(answer.preagg, "passthrough reason=shadow", "warmed windows are compared at once");
    same_rows(&direct, &answer).unwrap();
    until_stats(&proxy, "the first comparison", Duration::from_secs(60), |s| count(s, "matches") == 1).await;

    // One stored row changes its variant behind the proxy's back; the row count stays the same, so
    // the rewrite's row-count guard cannot notice.
    let jobs = ready_job_ids(&proxy, None).await;
    let table = format!("{database}.experiment_exposures_preaggregated");
    // Rows are per identity (the body joins the person overrides): one distinct id's row.
    let victim = select(&format!(
        "SELECT distinct_id, job_id FROM {table} FINAL WHERE team_id = {TEAM} AND variant = 'control' \
         AND job_id IN ({}) ORDER BY distinct_id, job_id LIMIT 1",
        jobs.iter().map(|j| format!("'{j}'")).collect::<Vec<_>>().join(", ")
    ));
    let (distinct_id, job) = victim[0].split_once('\t').unwrap();
    let rows_before = select(&format!("SELECT count() FROM {table}"));
    exec(
        &SERVER.url(),
        &format!(
            "ALTER TABLE {table} UPDATE variant = 'test' WHERE distinct_id = '{distinct_id}' AND job_id = '{job}' \
             SETTINGS mutations_sync = 2"
        ),
    );
    assert_eq!(select(&format!("SELECT count() FROM {table}")), rows_before);
    assert_eq!(
        select(&format!("SELECT variant FROM {table} WHERE distinct_id = '{distinct_id}' AND job_id = '{job}'")),
        vec!["test".to_string()]
    );

    // The client still gets the original's rows; the comparison finds the difference.
    let answer = run(&proxy.url(), &sql).await;
    assert_eq!(answer.preagg, "passthrough reason=shadow");
    same_rows(&direct, &answer).unwrap();
    let stats = until_stats(&proxy, "the mismatch", Duration::from_secs(60), |s| count(s, "mismatches") == 1).await;
    assert_eq!((count(&stats, "matches"), count(&stats, "noise"), count(&stats, "errors")), (1, 0, 0), "{stats}");

    let report = admin_json(&proxy, "GET", "/admin/shadow", None, "").await;
    let samples = report["samples"].as_array().unwrap();
    assert_eq!(samples.len(), 1, "{report}");
    let sample = &samples[0];
    assert_eq!(sample["rule"], RULE);
    assert!(sample["job_ids"].as_array().unwrap().iter().any(|j| j == job), "the sample names the jobs read");
    assert_eq!(sample["query_hashes"].as_array().unwrap().len(), 1);
    let difference = sample["first_difference"].as_str().unwrap();
    assert!(difference.contains("differ"), "{difference}");
    assert!(sample["original_query_id"].as_str().unwrap().starts_with("preagg-shadow-"));
    assert!(sample["rewritten_query_id"].as_str().unwrap().starts_with("preagg-shadow-"));
    eprintln!("mismatch sample: {sample}");

    let metrics = scrape(&proxy).await;
    let shadow = |result| metric(&metrics, "preagg_shadow_total", &[("rule", RULE), ("result", result)]);
    assert_eq!((shadow("match"), shadow("mismatch"), shadow("noise")), (1.0, 1.0, 0.0));

    // The status page lists the mismatch.
    let (status, page) = admin(&proxy, "GET", "/admin", None, "").await;
    assert_eq!(status, 200);
    assert!(page.contains("Recent mismatches") && page.contains(sample["original_query_id"].as_str().unwrap()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn noise_is_measured_and_not_blamed_on_the_rewrite() {
    // An outer query that is not deterministic (rand() over the exposures): the original disagrees
    // with itself, so a difference from the rewrite is noise, not a mismatch.
    let sql = form(TEAM, FLAG, "infix").query(LO, HI).replacen(
        "SELECT variant, count() AS persons,",
        "SELECT variant, count() + rand() % 1000 AS persons,",
        1,
    );
    assert!(sql.contains("rand()"));
    for (noise, expected) in [("true", "noise"), ("false", "mismatches")] {
        let proxy = proxy_in("shadow_noise", &[("mode", "shadow"), ("shadow_noise", noise)]);
        warm(&proxy, &sql, None).await;
        for _ in 0..3 {
            let answer = run(&proxy.url(), &sql).await;
            assert_eq!(answer.preagg, "passthrough reason=shadow");
        }
        let stats = until_stats(&proxy, "three comparisons", Duration::from_secs(60), |s| concluded(s) == 3).await;
        // rand() % 1000 may agree by chance for one variant, hardly for every variant three times.
        assert_eq!(count(&stats, expected), 3, "shadow_noise={noise}: {stats}");
        let samples = admin_json(&proxy, "GET", "/admin/shadow", None, "").await["samples"].as_array().unwrap().len();
        assert_eq!(samples, if noise == "true" { 0 } else { 3 }, "noise leaves no mismatch sample");
    }
}

/// An HTTP-aware relay in front of the server that holds every connection whose first request
/// is a shadow run (its query id starts `preagg-shadow-`) without ever answering, while the
/// proxy's own connections pass. The shadow runner keeps a connection pool of its own, so a
/// connection carries shadow runs only or client queries only.
struct ShadowTrap {
    port: u16,
    hang: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl ShadowTrap {
    async fn start(target: u16) -> ShadowTrap {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let hang = Arc::new(AtomicBool::new(true));
        let trap = Arc::clone(&hang);
        let task = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let trap = Arc::clone(&trap);
                tokio::spawn(async move {
                    // Read up to the end of the request line.
                    let mut head = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !head.windows(2).any(|w| w == b"\r\n") {
                        match client.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let line = String::from_utf8_lossy(&head[..head.windows(2).position(|w| w == b"\r\n").unwrap()]);
                    if line.contains("query_id=preagg-shadow-") && trap.load(Ordering::SeqCst) {
                        // Hold the connection: the shadow run waits for an answer that never comes.
                        let _held = client;
                        return std::future::pending::<()>().await;
                    }
                    let Ok(mut upstream) = TcpStream::connect(("127.0.0.1", target)).await else { return };
                    if upstream.write_all(&head).await.is_ok() {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
                    }
                });
            }
        });
        ShadowTrap { port, hang, task }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for ShadowTrap {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_shadow_neither_delays_nor_changes_the_answer() {
    let trap = ShadowTrap::start(SERVER.port).await;
    let database = "shadow_hanging";
    exec(&SERVER.url(), &format!("CREATE DATABASE IF NOT EXISTS {database}"));
    // Two comparisons at once, one waiting for a slot, one in the queue: the fifth is dropped.
    let timeout = Duration::from_secs(6);
    let proxy = ProxyProcess::start(
        &trap.url(),
        &[
            ("preagg_database", database),
            ("clickhouse_url", &SERVER.url()),
            ("mode", "shadow"),
            ("shadow_concurrency", "2"),
            ("shadow_queue", "1"),
            ("shadow_timeout", "6s"),
        ],
    );
    proxy.wait_engine_ready();
    let sql = query();
    let direct = run(&SERVER.url(), &sql).await;
    warm(&proxy, &sql, None).await;
    let started = Instant::now();
    for i in 0..5 {
        let sent = Instant::now();
        let answer = run(&proxy.url(), &sql).await;
        let took = sent.elapsed();
        eprintln!("answer {i}: {took:?}");
        assert_eq!(answer.preagg, "passthrough reason=shadow");
        same_rows(&direct, &answer).unwrap();
        assert!(took < Duration::from_secs(3), "answer {i} took {took:?} while its shadow hangs");
    }
    // Every answer arrived while the first comparisons still hung.
    assert!(started.elapsed() < timeout, "the answers took {:?}", started.elapsed());
    let stats = rule_stats(&proxy).await;
    assert_eq!((concluded(&stats), count(&stats, "dropped")), (0, 1), "{stats}");
    // The hung comparisons end at the shadow timeout as errors, two at a time.
    let stats = until_stats(&proxy, "the timeouts", Duration::from_secs(30), |s| count(s, "errors") == 4).await;
    assert_eq!(count(&stats, "matches") + count(&stats, "mismatches"), 0, "{stats}");
    assert!(started.elapsed() >= timeout * 2, "four comparisons, two slots: two rounds of the timeout");
    let metrics = scrape(&proxy).await;
    let shadow = |result| metric(&metrics, "preagg_shadow_total", &[("rule", RULE), ("result", result)]);
    assert_eq!((shadow("error"), shadow("dropped")), (4.0, 1.0));

    // Once ClickHouse answers again, comparisons run and match.
    trap.hang.store(false, Ordering::SeqCst);
    let answer = run(&proxy.url(), &sql).await;
    same_rows(&direct, &answer).unwrap();
    until_stats(&proxy, "a match", Duration::from_secs(60), |s| count(s, "matches") == 1).await;
    let log = proxy.log_text();
    assert!(log.contains("comparison took longer than 6s"), "the timeout is logged");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_rewrite_is_an_error_and_its_jobs_are_rebuilt() {
    let database = "shadow_failing";
    let proxy = proxy_in(database, &[("mode", "shadow")]);
    let sql = query();
    let direct = run(&SERVER.url(), &sql).await;
    warm(&proxy, &sql, None).await;
    until_shadowed(&proxy, &sql, &direct, Duration::from_secs(10)).await;
    until_stats(&proxy, "a match", Duration::from_secs(60), |s| count(s, "matches") == 1).await;
    // The stored rows vanish: the rewrite's row-count guard fails the rewritten query.
    exec(&SERVER.url(), &format!("TRUNCATE TABLE {database}.experiment_exposures_preaggregated"));
    let answer = run(&proxy.url(), &sql).await;
    assert_eq!(answer.preagg, "passthrough reason=shadow");
    same_rows(&direct, &answer).unwrap();
    let stats = until_stats(&proxy, "the error", Duration::from_secs(60), |s| count(s, "errors") == 1).await;
    assert_eq!(count(&stats, "mismatches"), 0, "a failed rewrite is an error, not a mismatch: {stats}");
    let error = proxy
        .log_lines()
        .into_iter()
        .find(|l| l["message"] == "shadow comparison failed")
        .unwrap_or_else(|| panic!("no failure logged: {}", proxy.log_text()));
    assert!(error["error"].as_str().unwrap().contains("preaggregated rows missing"), "{error}");
    // The jobs whose rows vanished were expired, so the windows are built again and compared.
    until_shadowed(&proxy, &sql, &direct, Duration::from_secs(60)).await;
    let stats = until_stats(&proxy, "a match again", Duration::from_secs(60), |s| count(s, "matches") == 2).await;
    assert_eq!((count(&stats, "errors"), count(&stats, "mismatches")), (1, 0), "{stats}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rule_in_shadow_mode_is_compared_and_sampling_skips() {
    // The proxy rewrites, but the rule file puts this rule in shadow mode.
    let rules = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(root().join("rules/experiment_exposures.toml")).unwrap();
    let text = text.replacen("\nprefilter = ", "\nmode = \"shadow\"\nprefilter = ", 1);
    std::fs::write(rules.path().join("experiment_exposures.toml"), text).unwrap();
    let rules_dir = rules.path().display().to_string();
    let sql = query();
    let direct = run(&SERVER.url(), &sql).await;
    for (rate, compared) in [("1.0", 2), ("0.0", 0)] {
        let proxy =
            proxy_in("shadow_per_rule", &[("mode", "rewrite"), ("rules", &rules_dir), ("shadow_sample_rate", rate)]);
        let rules = admin_json(&proxy, "GET", "/admin/rules", None, "").await;
        assert_eq!(rules["rules"][0]["mode"], "shadow", "{rules}");
        warm(&proxy, &sql, None).await;
        for _ in 0..2 {
            let answer = run(&proxy.url(), &sql).await;
            assert_eq!(answer.preagg, "passthrough reason=shadow", "the rule's mode wins over mode=rewrite");
            same_rows(&direct, &answer).unwrap();
        }
        let stats = until_stats(&proxy, "the comparisons", Duration::from_secs(60), |s| {
            count(s, "matches") + count(s, "skipped") == 2
        })
        .await;
        assert_eq!((count(&stats, "matches"), count(&stats, "skipped")), (compared, 2 - compared), "rate {rate}");
        let metrics = scrape(&proxy).await;
        let skipped = metric(&metrics, "preagg_shadow_total", &[("rule", RULE), ("result", "skipped")]);
        assert_eq!(skipped, (2 - compared) as f64);
    }
}

/// The `jobs=N` of a rewritten X-Preagg (0 for a pass-through).
fn jobs_in_header(preagg: &str) -> usize {
    preagg.split(' ').find_map(|kv| kv.strip_prefix("jobs=")).and_then(|n| n.parse().ok()).unwrap_or(0)
}

/// Every admin endpoint, and what a request without the token gets.
const ADMIN_ENDPOINTS: &[(&str, &str)] = &[
    ("GET", "/admin"),
    ("GET", "/admin/jobs"),
    ("POST", "/admin/jobs/invalidate"),
    ("GET", "/admin/rules"),
    ("GET", "/admin/shadow"),
    ("POST", "/admin/warm"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_api_wants_its_token_and_warming_makes_the_next_query_rewritten() {
    let token = "s3cret-token";
    let proxy = proxy_in("admin_api", &[("admin_token", token)]);
    let sql = query();
    for (method, path) in ADMIN_ENDPOINTS {
        for wrong in [None, Some("wrong-token"), Some("")] {
            let mut request = client().request(method.parse().unwrap(), format!("{}{path}", proxy.admin_url()));
            if let Some(wrong) = wrong {
                request = request.header("authorization", format!("Bearer {wrong}"));
            }
            let response = request.body(sql.clone()).send().await.unwrap();
            assert_eq!(response.status().as_u16(), 401, "{method} {path} with {wrong:?}");
            assert_eq!(response.headers()["www-authenticate"], "Bearer");
        }
        // The token in the URL opens the status page only.
        let (status, _) = admin(&proxy, method, &format!("{path}?token={token}"), None, "").await;
        assert_eq!(status, if *path == "/admin" { 200 } else { 401 }, "{method} {path}?token=");
    }
    // Probes and the scraper need no token.
    for path in ["/healthz", "/readyz", "/metrics"] {
        assert_eq!(admin(&proxy, "GET", path, None, "").await.0, 200, "{path}");
    }
    // Nothing was built by the refused warm-up.
    let jobs = admin_json(&proxy, "GET", "/admin/jobs", Some(token), "").await;
    assert_eq!(jobs["jobs"], serde_json::json!([]), "{jobs}");
    // The scheme is case-insensitive; a GET on a POST endpoint is 405.
    let (status, _) = admin(&proxy, "GET", "/admin/warm", Some(token), "").await;
    assert_eq!(status, 405);
    let response = client()
        .get(format!("{}/admin/rules", proxy.admin_url()))
        .header("authorization", format!("bearer {token}"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let rules: serde_json::Value = response.json().await.unwrap();
    assert_eq!(rules["rules"][0]["name"], RULE);

    // Warm-up builds every sealed window, so the very first query is rewritten.
    let built = warm(&proxy, &sql, Some(token)).await;
    assert!(built > 30, "{built} windows");
    let ready = ready_job_ids(&proxy, Some(token)).await;
    assert_eq!(ready.len() as u64, built);
    let direct = run(&SERVER.url(), &sql).await;
    let answer = run(&proxy.url(), &sql).await;
    assert!(answer.preagg.starts_with("rewritten"), "{}", answer.preagg);
    same_rows(&direct, &answer).unwrap();
    let jobs_read = jobs_in_header(&answer.preagg);
    // Warming again builds nothing.
    assert_eq!(warm(&proxy, &sql, Some(token)).await, 0);
    let (status, body) = admin(&proxy, "POST", "/admin/warm", Some(token), "SELECT 1").await;
    assert_eq!(status, 422, "{body}");

    // Invalidation expires the jobs: the next query is not served from them.
    let bad = admin(&proxy, "POST", "/admin/jobs/invalidate", Some(token), "{\"team\": 1}").await;
    assert_eq!(bad.0, 400, "{}", bad.1);
    let invalidated = admin_json(
        &proxy,
        "POST",
        "/admin/jobs/invalidate",
        Some(token),
        &format!("{{\"team_id\": {TEAM}, \"start\": \"2026-10-05T00:00:00Z\"}}"),
    )
    .await;
    let invalidated = invalidated["invalidated"].as_u64().unwrap();
    assert!(invalidated > 0 && invalidated < built, "only windows ending after the start: {invalidated} of {built}");
    let answer = run(&proxy.url(), &sql).await;
    same_rows(&direct, &answer).unwrap();
    assert!(
        jobs_in_header(&answer.preagg) + invalidated as usize <= jobs_read,
        "the invalidated windows are read raw while they are built again: {} (before: {jobs_read} jobs)",
        answer.preagg
    );
    let started = Instant::now();
    loop {
        let answer = run(&proxy.url(), &sql).await;
        same_rows(&direct, &answer).unwrap();
        if jobs_in_header(&answer.preagg) == jobs_read {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "not rebuilt: {}", answer.preagg);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let metrics = scrape(&proxy).await;
    assert!(metrics.contains("# TYPE preagg_requests_total counter"), "{metrics}");
    let requests = |outcome| metric(&metrics, "preagg_requests_total", &[("outcome", outcome), ("status", "200")]);
    assert!(requests("rewritten") >= 2.0, "{metrics}");
    assert_eq!(metric(&metrics, "preagg_builds_started_total", &[("rule", RULE)]), 2.0, "warm-up, then the rebuild");
    assert_eq!(metric(&metrics, "preagg_builds_failed_total", &[]), 0.0);
    assert!(metric(&metrics, "preagg_build_rows_written_total", &[("rule", RULE)]) > 0.0);
    assert_eq!(metric(&metrics, "preagg_build_duration_seconds_count", &[("rule", RULE)]), 2.0, "{metrics}");
    assert!(metrics.contains("preagg_request_duration_seconds_bucket{le=\"0.5\"}"), "histograms have buckets");
    assert_eq!(metric(&metrics, "preagg_requests_in_flight", &[]), 0.0);
}

/// Runs the `preagg-proxy` binary: (success, stdout, stderr).
fn cli(args: &[&str]) -> (bool, String, String) {
    let output = std::process::Command::new(proxy_binary())
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .output()
        .expect("running preagg-proxy");
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (output.status.success(), text(&output.stdout), text(&output.stderr))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_warm_and_jobs_commands_work_on_the_store_the_proxy_uses() {
    let database = "cli_store";
    exec(&SERVER.url(), &format!("CREATE DATABASE IF NOT EXISTS {database}"));
    let dir = tempfile::tempdir().unwrap();
    let store = format!("sqlite://{}", dir.path().join("jobs.db").display());
    let rules = root().join("rules").display().to_string();
    let upstream = SERVER.url();
    let common = ["--store", &store, "--upstream", &upstream, "--rules", &rules, "--preagg-database", database];
    let sql = query();
    let file = dir.path().join("experiment.sql");
    std::fs::write(&file, &sql).unwrap();
    let other = dir.path().join("not-an-experiment.sql");
    std::fs::write(&other, "SELECT 1").unwrap();

    // On a terminal (script(1) provides one) the command draws its progress bar and reports each file.
    let binary = proxy_binary().display().to_string();
    let command = [&[binary.as_str(), "warm", file.to_str().unwrap()][..], &common[..]]
        .concat()
        .iter()
        .map(|a| format!("'{a}'"))
        .collect::<Vec<_>>()
        .join(" ");
    let output = std::process::Command::new("script").args(["-qec", &command, "/dev/null"]).output().unwrap();
    let shown = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "warm failed: {shown}");
    assert!(shown.contains("1/1 done"), "the progress bar: {shown}");
    assert!(shown.contains(&format!("{}: 1 occurrence(s), windows built: [", file.display())), "{shown}");
    let (ok, out, err) = cli(&[&["jobs"][..], &common[..], &["list"][..]].concat());
    assert!(ok, "{err}");
    let jobs: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(jobs.len() > 30, "{out}");
    assert!(jobs.iter().all(|j| j["status"] == "ready" && j["team_id"] == TEAM), "{out}");
    assert!(jobs[0]["window_start_utc"].as_str().unwrap().starts_with("2026-10-"), "{}", jobs[0]);
    let (_, some, _) =
        cli(&[&["jobs"][..], &common[..], &["list", "--team", &TEAM.to_string(), "--limit", "5"][..]].concat());
    assert_eq!(some.lines().count(), 5);
    let (_, none, _) = cli(&[&["jobs"][..], &common[..], &["list", "--team", "1"][..]].concat());
    assert_eq!(none, "");
    // A file that cannot be warmed fails the command, naming it; the others are still warmed.
    let (ok, out, err) = cli(&[&["warm", other.to_str().unwrap(), file.to_str().unwrap()][..], &common[..]].concat());
    assert!(!ok, "{out} {err}");
    assert!(err.contains("1 query(ies) could not be warmed"), "{err}");

    // The proxy reads the same store: the windows the command built serve its first query.
    let proxy = ProxyProcess::start(
        &SERVER.url(),
        &[("store", &store), ("preagg_database", database), ("job_cache_ttl", "100ms")],
    );
    proxy.wait_engine_ready();
    let direct = run(&SERVER.url(), &sql).await;
    let answer = run(&proxy.url(), &sql).await;
    assert!(answer.preagg.starts_with("rewritten"), "{}", answer.preagg);
    same_rows(&direct, &answer).unwrap();
    let jobs_read = jobs_in_header(&answer.preagg);

    // Invalidation from the command line reaches the proxy once its cache entry lapses.
    let (ok, out, err) = cli(&[
        &["jobs"][..],
        &common[..],
        &["invalidate", "--team", &TEAM.to_string(), "--from", "2026-10-05T00:00:00Z"][..],
    ]
    .concat());
    assert!(ok, "{err}");
    let invalidated: usize =
        out.trim().strip_prefix("invalidated ").unwrap().strip_suffix(" job(s)").unwrap().parse().unwrap();
    assert!(invalidated > 0 && invalidated < jobs.len(), "{out}");
    let (_, listed, _) = cli(&[&["jobs"][..], &common[..], &["list"][..]].concat());
    let now = chrono::Utc::now().timestamp_micros();
    let expired = listed
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|j| j["expires_at"].as_i64().unwrap() <= now)
        .count();
    assert_eq!(expired, invalidated);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let answer = run(&proxy.url(), &sql).await;
    same_rows(&direct, &answer).unwrap();
    assert!(jobs_in_header(&answer.preagg) < jobs_read, "{} (before: {jobs_read} jobs)", answer.preagg);
    let (ok, _, err) =
        cli(&[&["jobs"][..], &common[..], &["invalidate", "--team", "1", "--from", "yesterday"][..]].concat());
    assert!(!ok && err.contains("RFC 3339"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_names_what_is_missing_while_health_stays_ok() {
    // A port nothing listens on: neither the upstream nor the engine's ClickHouse is there.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let proxy = ProxyProcess::start(&format!("http://127.0.0.1:{closed}"), &[("admin_token", "t")]);
    assert_eq!(admin(&proxy, "GET", "/healthz", None, "").await, (200, "ok\n".to_string()));
    let (status, body) = admin(&proxy, "GET", "/readyz", None, "").await;
    assert_eq!(status, 503, "{body}");
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["ready"], false);
    let problems = body["problems"].to_string();
    assert!(problems.contains("upstream") && problems.contains("engine"), "{problems}");
    // The API still checks the token first, then says the engine is not ready.
    assert_eq!(admin(&proxy, "GET", "/admin/jobs", None, "").await.0, 401);
    let (status, body) = admin(&proxy, "GET", "/admin/jobs", Some("t"), "").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("engine is not ready"), "{body}");
}
