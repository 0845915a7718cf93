//! Prometheus metrics. Every metric the proxy exports is recorded through a function here, so the
//! full list (names, labels, meaning) is in one place. Without an installed recorder (tests, the
//! CLI) the calls are no-ops.

use std::cell::RefCell;
use std::collections::HashMap;
use std::time::Duration;

use metrics::{Counter, Gauge, Histogram, counter, gauge, histogram};
use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};

/// Bucket bounds of the `*_seconds` histograms: from the sub-millisecond analysis to long builds.
const SECONDS_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0, 900.0,
];

/// Bucket bounds of `preagg_shadow_speedup` (original time over rewritten time).
const SPEEDUP_BUCKETS: &[f64] = &[0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 20.0, 50.0, 100.0];

/// How often histogram samples are folded into the exported buckets. A scrape folds them too,
/// but without scrapes they would pile up in memory, one entry per recorded value: at 50,000
/// requests a second, a 5-second interval let about 12 MB pile up between folds.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(1);

/// Why the recorder could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The recorder could not be built or another one is installed.
    #[error(transparent)]
    Build(#[from] BuildError),
    /// The upkeep thread could not be started.
    #[error("cannot start the metrics upkeep thread: {0}")]
    Upkeep(#[from] std::io::Error),
}

/// Installs the global Prometheus recorder and returns the handle that renders `/metrics`.
///
/// Histograms are exported as Prometheus histograms (buckets, sum, count), so they aggregate
/// across proxies. A background thread runs the recorder's upkeep: the exporter keeps every
/// histogram sample until upkeep (or a scrape) folds it into the buckets.
pub fn install() -> Result<PrometheusHandle, MetricsError> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full("preagg_shadow_speedup".into()), SPEEDUP_BUCKETS)?
        .install_recorder()?;
    describe();
    let upkeep = handle.clone();
    std::thread::Builder::new().name("metrics-upkeep".into()).spawn(move || {
        loop {
            std::thread::sleep(UPKEEP_INTERVAL);
            upkeep.run_upkeep();
        }
    })?;
    Ok(handle)
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "preagg_requests_total",
        "Requests by outcome (pass-through reason code, or rewritten) and status"
    );
    describe_gauge!("preagg_requests_in_flight", "Requests whose response body is not finished");
    describe_histogram!("preagg_request_duration_seconds", "Time from request to the end of the response body");
    describe_histogram!("preagg_upstream_latency_seconds", "Time from forwarding to the upstream's response headers");
    describe_histogram!(
        "preagg_analysis_seconds",
        "Time to locate and match (tokenize, parse) a query that passed the prefilter"
    );
    describe_histogram!("preagg_plan_seconds", "Time to plan windows (job lookups included)");
    describe_histogram!("preagg_rewrite_seconds", "Time to produce the rewritten text");
    describe_counter!("preagg_builds_started_total", "Window builds started (one build may fill many windows)");
    describe_counter!("preagg_builds_failed_total", "Window builds that failed");
    describe_counter!("preagg_builds_waited_total", "Queries that waited for a build (build=wait)");
    describe_gauge!("preagg_builds_queued", "Builds waiting for a slot (max_concurrent_builds)");
    describe_histogram!("preagg_build_duration_seconds", "Duration of one build statement");
    describe_counter!("preagg_build_rows_written_total", "Rows written by builds");
    describe_counter!("preagg_job_cache_total", "Job lookups by result (hit or miss)");
    describe_counter!("preagg_shadow_total", "Shadow comparisons by rule and result");
    describe_histogram!("preagg_shadow_speedup", "Original time divided by rewritten time, per shadowed query");
}

/// Handles of the metrics every request records, resolved once per thread: looking a metric up
/// by name and labels (hashing, label allocation) cost more than recording into it. The recorder
/// is installed before the proxy serves its first request. While a thread exits (its runtime
/// dropping what is left) nothing more is recorded.
struct RequestMetrics {
    in_flight: Gauge,
    duration: Histogram,
    upstream_latency: Histogram,
    analysis: Histogram,
    totals: RefCell<HashMap<(&'static str, u16, bool), Counter>>,
}

thread_local! {
    static REQUEST_METRICS: RequestMetrics = RequestMetrics {
        in_flight: gauge!("preagg_requests_in_flight"),
        duration: histogram!("preagg_request_duration_seconds"),
        upstream_latency: histogram!("preagg_upstream_latency_seconds"),
        analysis: histogram!("preagg_analysis_seconds"),
        totals: RefCell::default(),
    };
}

/// A request arrived.
pub fn request_started() {
    let _ = REQUEST_METRICS.try_with(|m| m.in_flight.increment(1.0));
}

/// A request's response body ended (sent or abandoned).
pub fn request_finished(outcome: &'static str, status: u16, elapsed: Duration, complete: bool) {
    let _ = REQUEST_METRICS.try_with(|m| {
        m.in_flight.decrement(1.0);
        m.duration.record(elapsed.as_secs_f64());
        let mut totals = m.totals.borrow_mut();
        let total = totals.entry((outcome, status, complete)).or_insert_with(|| {
            counter!("preagg_requests_total", "outcome" => outcome, "status" => status.to_string(),
                "complete" => if complete { "true" } else { "false" })
        });
        total.increment(1);
    });
}

/// The upstream answered with headers after `elapsed`.
pub fn upstream_latency(elapsed: Duration) {
    let _ = REQUEST_METRICS.try_with(|m| m.upstream_latency.record(elapsed.as_secs_f64()));
}

/// Locate and match took `elapsed`.
pub fn analysis_time(elapsed: Duration) {
    let _ = REQUEST_METRICS.try_with(|m| m.analysis.record(elapsed.as_secs_f64()));
}

/// Planning took `elapsed`.
pub fn plan_time(elapsed: Duration) {
    histogram!("preagg_plan_seconds").record(elapsed.as_secs_f64());
}

/// Rewriting took `elapsed`.
pub fn rewrite_time(elapsed: Duration) {
    histogram!("preagg_rewrite_seconds").record(elapsed.as_secs_f64());
}

/// A build started.
pub fn build_started(rule: &str) {
    counter!("preagg_builds_started_total", "rule" => rule.to_string()).increment(1);
}

/// A build finished; `rows` is `None` when it failed.
pub fn build_finished(rule: &str, elapsed: Duration, rows: Option<u64>) {
    histogram!("preagg_build_duration_seconds", "rule" => rule.to_string()).record(elapsed.as_secs_f64());
    match rows {
        Some(rows) => counter!("preagg_build_rows_written_total", "rule" => rule.to_string()).increment(rows),
        None => counter!("preagg_builds_failed_total", "rule" => rule.to_string()).increment(1),
    }
}

/// A build began waiting for a slot (`true`) or stopped waiting (`false`).
pub fn build_queued(waiting: bool) {
    let gauge = gauge!("preagg_builds_queued");
    if waiting { gauge.increment(1.0) } else { gauge.decrement(1.0) }
}

/// A query waited for its build.
pub fn build_waited() {
    counter!("preagg_builds_waited_total").increment(1);
}

/// A job lookup was answered from the cache (`hit`) or the store.
pub fn job_cache(hit: bool) {
    counter!("preagg_job_cache_total", "result" => if hit { "hit" } else { "miss" }).increment(1);
}

/// A shadow comparison ended with `result` (match, mismatch, noise, error, skipped, dropped).
pub fn shadow(rule: &str, result: &'static str) {
    counter!("preagg_shadow_total", "rule" => rule.to_string(), "result" => result).increment(1);
}

/// A shadowed query would have been `speedup` times faster.
pub fn shadow_speedup(speedup: f64) {
    histogram!("preagg_shadow_speedup").record(speedup);
}
