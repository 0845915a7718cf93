//! Proof of exactness on the real engine: for every supported query form and many ranges, the
//! rows through the proxy equal the direct rows, cold (answered by the original while windows
//! build) and warm (rewritten, which X-Preagg must confirm, or the test proves nothing).
//!
//! Data: the seeded generator plus edge rows on the bounds. The seed is random per run (printed);
//! set PREAGG_TEST_SEED to replay one, and PREAGG_EQUIVALENCE_ROUNDS for a longer randomized run
//! (`scripts/long-equivalence.sh`).

mod common;

use std::time::Duration;

use common::equivalence::{Form, edge_rows, exec, forms, run, same_rows, shift, until_rewritten};
use common::{ChServer, ProxyProcess};

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_form_returns_the_direct_rows_cold_and_warm() {
    let seed = seed();
    eprintln!("equivalence seed: {seed} (replay with PREAGG_TEST_SEED={seed})");
    let server = ChServer::start();
    server.generate(&["--events", "150000", "--seed", &seed.to_string(), "--start", "2026-10-01", "--days", "14"]);
    let ranges = [
        ("2026-10-03 07:15:00.250000", "2026-10-10 16:40:00.000000"),
        ("2026-10-01 00:00:00.000000", "2026-10-08 00:00:00.000000"),
        ("2026-10-02 13:00:00.000000", "2026-10-02 20:30:00.000000"),
    ];
    exec(&server.url(), &edge_rows(TEAM, FLAG, &ranges));
    let proxy = ProxyProcess::start(&server.url(), &[]);
    proxy.wait_engine_ready();
    for form in forms(TEAM, FLAG) {
        for (lo, hi) in ranges {
            check(&server, &proxy, &form, lo, hi, true).await;
        }
    }
    // A range too short to hold a whole hour window stays untouched.
    let form = &forms(TEAM, FLAG)[0];
    check(&server, &proxy, form, "2026-10-05 23:59:59.999999", "2026-10-06 00:59:59.000000", false).await;
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
