//! Shadow mode: the client always gets the original's answer; in the background the proxy runs
//! the rewritten query too, reads both answers in one canonical format and compares them.
//!
//! Learned from GitHub Scientist (the control is always returned, the candidate compared and
//! published) and Twitter Diffy (noise is measured by comparing the old path with itself, so
//! non-deterministic queries are not blamed on the rewrite). Work is bounded: a fixed number of
//! comparisons run at once, a bounded queue waits, and the rest are dropped and counted.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use sqlparser::keywords::Keyword;
use tokio::sync::{Semaphore, mpsc};

use crate::clickhouse_http::request::UrlParams;
use crate::config::Config;
use crate::error::error_chain;
use crate::http::client::RequestBody;
use crate::http::pool::Upstream;
use crate::metrics as m;
use crate::preagg::EngineSlot;
use crate::preagg::store::MismatchSample;
use crate::sql::locate::find_top_level;
use crate::sql::splice::{self, Edit};
use crate::sql::tokens::{Tokens, is_keyword};

/// The canonical format both answers are read in: typed, one JSON array per row.
const CANONICAL_FORMAT: &str = "JSONCompactEachRowWithNamesAndTypes";

/// Largest answer compared; a larger one ends the comparison as an error (not compared).
const MAX_ANSWER_BYTES: usize = 64 * 1024 * 1024;

/// Longest description of a difference kept in a mismatch sample (rows can be wide).
const MAX_DIFFERENCE_CHARS: usize = 2000;

/// URL parameters of the client's request that a shadow run must not reuse: its own query id
/// (the client's query is still running), the session (it would lock the client's session), the
/// output format and query text, which the shadow sets itself, and ClickHouse's native
/// compression (`compress=1` would answer in compressed blocks, `decompress=1` would expect a
/// compressed body; the shadow sends and reads plain text).
const NOT_COPIED: &[&str] = &[
    "query",
    "query_id",
    "session_id",
    "session_check",
    "session_timeout",
    "default_format",
    "wait_end_of_query",
    "compress",
    "decompress",
];

/// Request headers a shadow run copies: credentials and the database.
const COPIED_HEADERS: &[&str] =
    &["authorization", "x-clickhouse-user", "x-clickhouse-key", "x-clickhouse-database", "x-clickhouse-quota"];

/// One query to compare.
#[derive(Debug, Clone)]
pub struct ShadowRequest {
    /// Rule of the rewrite (stats are kept per rule).
    pub rule: String,
    /// Query hashes of the rewritten occurrences.
    pub hashes: Vec<String>,
    /// Jobs the rewrite reads.
    pub job_ids: Vec<String>,
    /// The original text.
    pub original: String,
    /// The rewritten text.
    pub rewritten: String,
    /// The client's URL path.
    pub path: String,
    /// The client's URL parameters, minus those a shadow run sets itself.
    pub params: Vec<(String, String)>,
    /// The client's credentials and database headers.
    pub headers: HeaderMap,
}

impl ShadowRequest {
    /// Captures what a shadow run needs from the client's request.
    pub fn capture(params: &UrlParams, headers: &HeaderMap, path: &str) -> (Vec<(String, String)>, HeaderMap, String) {
        let params = params.pairs().filter(|(k, _)| !NOT_COPIED.contains(&k.as_str())).collect();
        let mut copied = HeaderMap::new();
        for name in COPIED_HEADERS {
            if let Some(value) = headers.get(*name) {
                copied.insert(*name, value.clone());
            }
        }
        (params, copied, path.to_string())
    }
}

/// Counters of one rule.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct RuleStats {
    /// Rewrite and original agreed.
    pub matches: u64,
    /// They disagreed and the original agreed with itself.
    pub mismatches: u64,
    /// They disagreed but so did the original with itself.
    pub noise: u64,
    /// A run failed or timed out.
    pub errors: u64,
    /// Not sampled.
    pub skipped: u64,
    /// Dropped because the queue was full.
    pub dropped: u64,
    /// Total time of the original runs compared (ms).
    pub original_ms: u64,
    /// Total time of the rewritten runs compared (ms).
    pub rewritten_ms: u64,
}

impl RuleStats {
    /// Original time over rewritten time, over all comparisons.
    pub fn speedup(&self) -> Option<f64> {
        (self.rewritten_ms > 0).then(|| self.original_ms as f64 / self.rewritten_ms as f64)
    }

    /// Share of compared queries that matched.
    pub fn match_rate(&self) -> Option<f64> {
        let compared = self.matches + self.mismatches;
        (compared > 0).then(|| self.matches as f64 / compared as f64)
    }
}

/// A parsed canonical answer.
#[derive(Debug, Clone, PartialEq)]
struct Answer {
    names: serde_json::Value,
    types: serde_json::Value,
    rows: Vec<Vec<serde_json::Value>>,
    elapsed: Duration,
    query_id: String,
}

/// The result of one comparison.
#[derive(Debug)]
enum Verdict {
    Match { original: Duration, rewritten: Duration },
    Mismatch(Box<MismatchSample>),
    Noise,
    Error(String),
}

/// The shadow runner.
pub struct Shadow {
    queue: mpsc::Sender<ShadowRequest>,
    stats: Arc<Mutex<BTreeMap<String, RuleStats>>>,
    sample_rate: AtomicU64,
}

struct Worker {
    upstream: Upstream,
    engine: EngineSlot,
    stats: Arc<Mutex<BTreeMap<String, RuleStats>>>,
    noise: bool,
    tolerance: f64,
    timeout: Duration,
    samples: usize,
}

impl Shadow {
    /// Starts the comparison workers.
    pub fn start(config: &Config, engine: EngineSlot) -> Arc<Shadow> {
        let (queue, mut receiver) = mpsc::channel::<ShadowRequest>(config.shadow_queue);
        let stats = Arc::new(Mutex::new(BTreeMap::new()));
        let worker = Arc::new(Worker {
            upstream: Upstream::new(
                config.upstream.clone(),
                &config.tls_ca_file,
                config.connect_timeout,
                config.shadow_timeout,
            ),
            engine,
            stats: Arc::clone(&stats),
            noise: config.shadow_noise,
            tolerance: config.shadow_float_tolerance,
            timeout: config.shadow_timeout,
            samples: config.shadow_samples,
        });
        let slots = Arc::new(Semaphore::new(config.shadow_concurrency));
        tokio::spawn(async move {
            while let Some(request) = receiver.recv().await {
                let Ok(permit) = Arc::clone(&slots).acquire_owned().await else { return };
                let worker = Arc::clone(&worker);
                tokio::spawn(async move {
                    worker.run(request).await;
                    drop(permit);
                });
            }
        });
        Arc::new(Shadow { queue, stats, sample_rate: AtomicU64::new(config.shadow_sample_rate.to_bits()) })
    }

    /// Applies a new sampling share (configuration reload).
    pub fn set_sample_rate(&self, rate: f64) {
        self.sample_rate.store(rate.to_bits(), Ordering::Relaxed);
    }

    /// Offers a query for comparison: sampled, then queued or dropped. Never waits.
    pub fn offer(&self, request: ShadowRequest) {
        let rule = request.rule.clone();
        if rand_unit() >= f64::from_bits(self.sample_rate.load(Ordering::Relaxed)) {
            self.count(&rule, |s| s.skipped += 1);
            m::shadow(&rule, "skipped");
            return;
        }
        if self.queue.try_send(request).is_err() {
            self.count(&rule, |s| s.dropped += 1);
            m::shadow(&rule, "dropped");
        }
    }

    fn count(&self, rule: &str, f: impl FnOnce(&mut RuleStats)) {
        if let Ok(mut stats) = self.stats.lock() {
            f(stats.entry(rule.to_string()).or_default());
        }
    }

    /// Counters per rule.
    pub fn summary(&self) -> BTreeMap<String, RuleStats> {
        self.stats.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

/// A uniform number in [0, 1) (sampling needs no cryptographic randomness).
fn rand_unit() -> f64 {
    (uuid::Uuid::new_v4().as_u128() >> 75) as f64 / (1u64 << 53) as f64
}

impl Worker {
    async fn run(&self, request: ShadowRequest) {
        let rule = request.rule.clone();
        let verdict = match tokio::time::timeout(self.timeout, self.compare(&request)).await {
            Ok(verdict) => verdict,
            Err(_) => Verdict::Error(format!("comparison took longer than {:?}", self.timeout)),
        };
        // Log and store first, count last: whoever sees a count also finds its sample and log line.
        match &verdict {
            Verdict::Mismatch(sample) => {
                tracing::warn!(rule = %rule, hashes = ?sample.query_hashes, difference = %sample.first_difference,
                    "shadow mismatch: the rewrite disagrees with the original");
                if let Some(engine) = self.engine.get()
                    && let Err(error) = engine.store().add_sample(sample, self.samples).await
                {
                    tracing::warn!(%error, "cannot store a shadow mismatch sample");
                }
            }
            Verdict::Error(error) => tracing::info!(rule = %rule, %error, "shadow comparison failed"),
            Verdict::Match { .. } | Verdict::Noise => {}
        }
        let label = match &verdict {
            Verdict::Match { .. } => "match",
            Verdict::Mismatch(_) => "mismatch",
            Verdict::Noise => "noise",
            Verdict::Error(_) => "error",
        };
        m::shadow(&rule, label);
        if let Ok(mut stats) = self.stats.lock() {
            let entry = stats.entry(rule).or_default();
            match &verdict {
                Verdict::Match { original, rewritten } => {
                    entry.matches += 1;
                    entry.original_ms += original.as_millis() as u64;
                    entry.rewritten_ms += rewritten.as_millis() as u64;
                    if !rewritten.is_zero() {
                        m::shadow_speedup(original.as_secs_f64() / rewritten.as_secs_f64());
                    }
                }
                Verdict::Mismatch(_) => entry.mismatches += 1,
                Verdict::Noise => entry.noise += 1,
                Verdict::Error(_) => entry.errors += 1,
            }
        }
    }

    async fn compare(&self, request: &ShadowRequest) -> Verdict {
        let ordered = is_ordered(&request.original);
        let original = match self.run_query(request, &request.original).await {
            Ok(a) => a,
            Err(e) => return Verdict::Error(format!("original: {e}")),
        };
        let rewritten = match self.run_query(request, &request.rewritten).await {
            Ok(a) => a,
            Err(e) => {
                // A guard of the rewrite fired (stored rows missing, the source mutated): as on the
                // rewrite path, expire the jobs so the next query rebuilds them instead of failing
                // the same way forever.
                if let Some(guard) = crate::sql::rewrite::guard_fired(&e)
                    && let Some(engine) = self.engine.get()
                {
                    engine.expire_jobs(&request.job_ids, guard).await;
                }
                return Verdict::Error(format!("rewritten: {e}"));
            }
        };
        let Some(difference) = difference(&original, &rewritten, ordered, self.tolerance) else {
            return Verdict::Match { original: original.elapsed, rewritten: rewritten.elapsed };
        };
        if self.noise {
            match self.run_query(request, &request.original).await {
                Ok(again) if difference_exists(&original, &again, ordered, self.tolerance) => return Verdict::Noise,
                Ok(_) => {}
                Err(e) => return Verdict::Error(format!("original (noise run): {e}")),
            }
        }
        Verdict::Mismatch(Box::new(MismatchSample {
            id: uuid::Uuid::new_v4().to_string(),
            created_at: crate::preagg::now_micros(),
            rule: request.rule.clone(),
            query_hashes: request.hashes.clone(),
            job_ids: request.job_ids.clone(),
            original_rows: original.rows.len() as i64,
            rewritten_rows: rewritten.rows.len() as i64,
            first_difference: truncated(&difference, MAX_DIFFERENCE_CHARS),
            original_query_id: original.query_id,
            rewritten_query_id: rewritten.query_id,
            original_ms: original.elapsed.as_millis() as i64,
            rewritten_ms: rewritten.elapsed.as_millis() as i64,
        }))
    }

    /// Runs one text with the client's credentials and parameters, in the canonical format.
    async fn run_query(&self, request: &ShadowRequest, text: &str) -> Result<Answer, String> {
        let query_id = format!("preagg-shadow-{}", uuid::Uuid::new_v4());
        let path = {
            let mut params = form_urlencoded::Serializer::new(String::new());
            for (k, v) in &request.params {
                params.append_pair(k, v);
            }
            params.append_pair("query_id", &query_id);
            params.append_pair("default_format", CANONICAL_FORMAT);
            format!("{}?{}", request.path, params.finish())
        };
        let body = without_format_clause(text);
        let started = Instant::now();
        let response = self
            .upstream
            .send(Method::POST, &path, request.headers.clone(), RequestBody::Full(Bytes::from(body)))
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status();
        let bytes = Limited::new(response.into_body(), MAX_ANSWER_BYTES)
            .collect()
            .await
            .map_err(|e| {
                if e.is::<LengthLimitError>() {
                    format!("the answer is larger than {MAX_ANSWER_BYTES} bytes; not compared")
                } else {
                    format!("reading the answer: {}", error_chain(e.as_ref()))
                }
            })?
            .to_bytes();
        let elapsed = started.elapsed();
        if !status.is_success() {
            return Err(format!("status {status}: {}", String::from_utf8_lossy(&bytes).trim()));
        }
        parse_answer(&bytes, elapsed, query_id)
    }
}

/// Removes the top-level `FORMAT name` clause so the canonical format applies.
fn without_format_clause(text: &str) -> String {
    let Ok(tokens) = Tokens::new(text) else { return text.to_string() };
    match find_top_level(&tokens, 0..tokens.len(), |t| is_keyword(t, Keyword::FORMAT)) {
        Some(i) if i + 1 < tokens.len() => {
            splice::apply(text, &[Edit::new(tokens.byte_span(i..i + 2), "")]).unwrap_or_else(|_| text.to_string())
        }
        _ => text.to_string(),
    }
}

/// Whether the statement orders its rows (then they are compared in order).
fn is_ordered(text: &str) -> bool {
    Tokens::new(text)
        .map(|t| find_top_level(&t, 0..t.len(), |tok| is_keyword(tok, Keyword::ORDER)).is_some())
        .unwrap_or(false)
}

/// `text` cut to at most `max` characters, marked when cut.
fn truncated(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_string(),
    }
}

/// Parses `JSONCompactEachRowWithNamesAndTypes`; any line that is not a JSON array is an
/// exception ClickHouse wrote into the body after the 200 (plain `Code: ...` text, or framed
/// between `__exception__` markers since 25.11): the error quotes the body from that line on.
fn parse_answer(bytes: &[u8], elapsed: Duration, query_id: String) -> Result<Answer, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "answer is not UTF-8".to_string())?;
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let mut next_array = |what: &str| -> Result<Vec<serde_json::Value>, String> {
        let line = lines.next().ok_or_else(|| format!("answer has no {what} line"))?;
        match serde_json::from_str::<serde_json::Value>(line) {
            Ok(serde_json::Value::Array(values)) => Ok(values),
            _ => {
                let rest = text[line.as_ptr() as usize - text.as_ptr() as usize..].trim();
                Err(format!("error inside the answer: {}", truncated(rest, 500)))
            }
        }
    };
    let names = serde_json::Value::Array(next_array("names")?);
    let types = serde_json::Value::Array(next_array("types")?);
    let mut rows = Vec::new();
    loop {
        match next_array("row") {
            Ok(row) => rows.push(row),
            Err(e) if e.starts_with("answer has no") => break,
            Err(e) => return Err(e),
        }
    }
    Ok(Answer { names, types, rows, elapsed, query_id })
}

fn values_equal(a: &serde_json::Value, b: &serde_json::Value, tolerance: f64) -> bool {
    use serde_json::Value;
    match (a, b) {
        (Value::Number(x), Value::Number(y)) if x.is_f64() || y.is_f64() => {
            let (x, y) = (x.as_f64().unwrap_or(f64::NAN), y.as_f64().unwrap_or(f64::NAN));
            x == y || (x - y).abs() <= tolerance * x.abs().max(y.abs())
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| values_equal(p, q, tolerance))
        }
        _ => a == b,
    }
}

/// A sort key that orders rows the same way on both sides despite float noise.
fn sort_key(row: &[serde_json::Value]) -> String {
    fn round(v: &serde_json::Value) -> serde_json::Value {
        match v {
            serde_json::Value::Number(n) if n.is_f64() => {
                serde_json::Value::String(format!("{:.9e}", n.as_f64().unwrap_or_default()))
            }
            serde_json::Value::Array(items) => serde_json::Value::Array(items.iter().map(round).collect()),
            other => other.clone(),
        }
    }
    serde_json::to_string(&row.iter().map(round).collect::<Vec<_>>()).unwrap_or_default()
}

fn difference_exists(a: &Answer, b: &Answer, ordered: bool, tolerance: f64) -> bool {
    difference(a, b, ordered, tolerance).is_some()
}

fn in_comparison_order(rows: &[Vec<serde_json::Value>], ordered: bool) -> Vec<&Vec<serde_json::Value>> {
    let mut rows: Vec<&Vec<serde_json::Value>> = rows.iter().collect();
    if !ordered {
        rows.sort_by_cached_key(|r| sort_key(r));
    }
    rows
}

/// The first difference between two answers, described; `None` when they agree.
fn difference(a: &Answer, b: &Answer, ordered: bool, tolerance: f64) -> Option<String> {
    if a.names != b.names || a.types != b.types {
        return Some(format!("columns differ: original {} {}, rewritten {} {}", a.names, a.types, b.names, b.types));
    }
    if a.rows.len() != b.rows.len() {
        return Some(format!("row counts differ: original {}, rewritten {}", a.rows.len(), b.rows.len()));
    }
    let (left, right) = (in_comparison_order(&a.rows, ordered), in_comparison_order(&b.rows, ordered));
    left.iter()
        .zip(&right)
        .position(|(x, y)| !values_equal(&serde_json::json!(x), &serde_json::json!(y), tolerance))
        .map(|i| {
            format!(
                "row {i} differs: original {}, rewritten {}",
                serde_json::json!(left[i]),
                serde_json::json!(right[i])
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(rows: &str) -> Answer {
        let text = format!("[\"a\",\"b\"]\n[\"String\",\"Float64\"]\n{rows}");
        parse_answer(text.as_bytes(), Duration::ZERO, String::new()).unwrap()
    }

    #[test]
    fn multisets_compare_regardless_of_order_and_float_noise() {
        let a = answer("[\"x\",0.1]\n[\"y\",0.30000000000000004]\n");
        let b = answer("[\"y\",0.3]\n[\"x\",0.1]\n");
        assert_eq!(difference(&a, &b, false, 1e-9), None);
        assert!(difference(&a, &b, true, 1e-9).is_some());
        let c = answer("[\"y\",0.31]\n[\"x\",0.1]\n");
        assert!(difference(&a, &c, false, 1e-9).unwrap().contains("differs"));
    }

    #[test]
    fn an_error_written_after_the_200_is_caught() {
        let text = "[\"a\"]\n[\"String\"]\n[\"x\"]\nCode: 241. DB::Exception: Memory limit exceeded\n";
        let err = parse_answer(text.as_bytes(), Duration::ZERO, String::new()).unwrap_err();
        assert!(err.contains("Code: 241"), "{err}");
    }

    #[test]
    fn a_framed_exception_is_caught_with_its_message() {
        let text = "[\"a\"]\n[\"String\"]\n[\"x\"]\n\r\n__exception__\r\nAbCdEfGhIjKlMnOp\r\n\
                    Code: 395. DB::Exception: boom. (FUNCTION_THROW_IF_VALUE_IS_NON_ZERO)\n64 AbCdEfGhIjKlMnOp\r\n\
                    __exception__\r\n";
        let err = parse_answer(text.as_bytes(), Duration::ZERO, String::new()).unwrap_err();
        assert!(err.contains("__exception__") && err.contains("Code: 395"), "{err}");
    }

    #[test]
    fn long_differences_are_cut_on_a_character_boundary() {
        assert_eq!(truncated("héllo", 2), "hé…");
        assert_eq!(truncated("héllo", 5), "héllo");
    }

    #[test]
    fn format_clauses_and_ordering_are_read_from_tokens() {
        assert_eq!(without_format_clause("SELECT 1 FORMAT JSON"), "SELECT 1 ");
        assert_eq!(without_format_clause("SELECT 'FORMAT JSON'"), "SELECT 'FORMAT JSON'");
        assert!(is_ordered("SELECT a FROM t ORDER BY a"));
        assert!(!is_ordered("SELECT a FROM (SELECT a FROM t ORDER BY a)"));
    }
}
