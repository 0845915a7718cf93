//! `preagg-proxy explain`: what the proxy would do with one query, without any IO.
//!
//! Every sealed window is assumed built (with placeholder job ids), so the output shows the
//! steady state: the windows served, the sub-ranges read raw, the INSERT a cold query triggers,
//! and the full rewritten SQL. Column types, which the live proxy learns from ClickHouse, appear
//! as placeholders.

use std::fmt::Write;
use std::sync::Arc;
use std::time::Duration;

use crate::outcome::Reason;
use crate::preagg::plan::{self, Plan};
use crate::sql::rewrite::{self, BuildWindow, Freshness, Target};
use crate::sql::rule::Rule;
use crate::sql::splice::{self, Edit};
use crate::sql::window::{Edge, RawRange, ReadyJob, Window};
use crate::sql::{self, Context, Found, quote};

/// Inputs of an explanation.
pub struct Request<'a> {
    /// Query text.
    pub text: &'a str,
    /// Loaded rules.
    pub rules: &'a [Arc<Rule>],
    /// Request context (database, URL settings).
    pub context: Context,
    /// "Now", in microseconds.
    pub now: i64,
    /// Sealing delay, in microseconds.
    pub seal_after: i64,
    /// Database of the preaggregate tables.
    pub preagg_database: String,
    /// Cluster mode: the cluster's name.
    pub cluster: Option<String>,
    /// Analysis budget.
    pub budget: Duration,
    /// Whether changes to the source after a build are accounted for (`exact_under_change`).
    pub exact_under_change: bool,
    /// The margin before a build's start within which rows are read again.
    pub ingestion_margin: Duration,
}

/// A bound as shown.
#[derive(Debug, serde::Serialize)]
pub struct BoundView {
    /// Instant, UTC.
    pub at: String,
    /// Whether the instant is included.
    pub inclusive: bool,
}

/// A window or raw range as shown.
#[derive(Debug, serde::Serialize)]
pub struct WindowView {
    /// Start, UTC.
    pub start: String,
    /// End (exclusive), UTC.
    pub end: String,
    /// `served` (from a job), `unsealed` (too recent: raw) or `raw`.
    pub status: &'static str,
}

/// One occurrence explained.
#[derive(Debug, serde::Serialize)]
pub struct OccurrenceView {
    /// Rule name.
    pub rule: String,
    /// Team id (0: no team filter).
    pub team_id: i64,
    /// Lower bound.
    pub lower: BoundView,
    /// Upper bound.
    pub upper: BoundView,
    /// Query hash.
    pub query_hash: String,
    /// Canonical shape.
    pub shape: String,
    /// Windows of the range.
    pub windows: Vec<WindowView>,
    /// Raw sub-ranges once every sealed window is built.
    pub raw_ranges: Vec<WindowView>,
    /// The INSERT a cold query runs (all sealed windows), if any window is sealed.
    pub insert: Option<String>,
    /// The statement that learns the column types.
    pub describe: String,
}

/// The explanation of one query.
#[derive(Debug, serde::Serialize)]
pub struct Explanation {
    /// Whether the query would be rewritten.
    pub rewritten: bool,
    /// Occurrences that would be rewritten.
    pub occurrences: usize,
    /// Why not, when not rewritten.
    pub reason: Option<Reason>,
    /// Candidates refused along the way.
    pub refused: Vec<Reason>,
    /// "Now" used for sealing.
    pub now: String,
    /// Per occurrence.
    pub occurrence: Vec<OccurrenceView>,
    /// The full rewritten SQL, with placeholder job ids and types.
    pub rewritten_sql: Option<String>,
}

fn time(micros: i64) -> String {
    quote::timestamp_text(micros)
}

fn placeholder_job(w: &Window) -> String {
    let unit = match w.end - w.start {
        plan::WEEK => "1w",
        plan::DAY => "1d",
        _ => "1h",
    };
    format!("job:{}+{unit}", time(w.start).replace(' ', "T").trim_end_matches(".000000"))
}

fn edge_view(r: &RawRange, range: (i64, i64)) -> WindowView {
    let at = |e: Edge, original: i64| match e {
        Edge::Original => original,
        Edge::At(a) => a,
    };
    WindowView { start: time(at(r.start, range.0)), end: time(at(r.end, range.1)), status: "raw" }
}

/// Explains `request.text`.
pub fn explain(request: &Request) -> Explanation {
    let now = time(request.now);
    // The same context the live proxy hashes with, so the hashes shown are the jobs' hashes.
    let context = sql::Context {
        preagg_database: request.preagg_database.clone(),
        exact_under_change: request.exact_under_change,
        ..request.context.clone()
    };
    let analysis = match sql::analyze(request.rules, request.text, &context, request.budget) {
        Ok(a) => a,
        Err(reason) => {
            return Explanation {
                rewritten: false,
                occurrences: 0,
                reason: Some(reason),
                refused: Vec::new(),
                now,
                occurrence: Vec::new(),
                rewritten_sql: None,
            };
        }
    };
    let target = |rule: &Rule| Target {
        database: request.preagg_database.clone(),
        table: rule.target.table.clone(),
        cluster: request.cluster.clone(),
    };
    let mut views = Vec::new();
    let mut edits = Vec::new();
    let mut reason = Reason::NoWindowsReady;
    for found in &analysis.found {
        let (view, plan) = explain_occurrence(request, found, &target(&found.rule));
        if request.exact_under_change && found.occurrence.ingestion_column.is_none() {
            reason = Reason::NoIngestionColumn;
        } else if plan.serves_any() {
            let types: Vec<String> =
                found.occurrence.stored_columns().iter().map(|c| format!("<type of {c}>")).collect();
            if let Ok(text) = rewrite::replacement(
                request.text,
                &found.occurrence,
                &plan.served,
                &plan.raw,
                &types,
                &target(&found.rule),
                request.exact_under_change.then(|| Freshness {
                    margin: i64::try_from(request.ingestion_margin.as_micros()).unwrap_or(i64::MAX),
                }),
            ) {
                edits.push(Edit::new(found.occurrence.body.clone(), text));
            }
        }
        views.push(view);
    }
    let rewritten_sql = (!edits.is_empty()).then(|| splice::apply(request.text, &edits).ok()).flatten();
    Explanation {
        rewritten: rewritten_sql.is_some(),
        occurrences: edits.len(),
        reason: rewritten_sql.is_none().then_some(reason),
        refused: analysis.refused,
        now,
        occurrence: views,
        rewritten_sql,
    }
}

fn explain_occurrence(request: &Request, found: &Found, target: &Target) -> (OccurrenceView, Plan) {
    let occ = &found.occurrence;
    // Every window the engine would build, assumed built: the sealed windows of the grid, and the
    // sealed hours of a day that is not sealed whole.
    let to_build = plan::plan(occ.range, &[], request.now, request.seal_after).missing;
    // Placeholder jobs: their confirmed row counts are unknown here, so the guard shows 0.
    let ready: Vec<ReadyJob> = to_build
        .iter()
        .map(|w| ReadyJob { id: placeholder_job(w), window: *w, rows: 0, built_at: request.now })
        .collect();
    let plan = plan::plan(occ.range, &ready, request.now, request.seal_after);
    let mut windows: Vec<WindowView> = plan
        .served
        .iter()
        .map(|j| WindowView { start: time(j.window.start), end: time(j.window.end), status: "served" })
        .collect();
    windows.extend(plan.unsealed.iter().map(|w| WindowView {
        start: time(w.start),
        end: time(w.end),
        status: "unsealed",
    }));
    let builds: Vec<BuildWindow> = to_build
        .iter()
        .map(|w| BuildWindow { window: *w, job_id: placeholder_job(w), expires_at: request.now })
        .collect();
    let view = OccurrenceView {
        rule: found.rule.name.clone(),
        team_id: occ.team_id,
        lower: BoundView { at: time(occ.lower.bound.micros), inclusive: occ.lower.bound.inclusive },
        upper: BoundView { at: time(occ.upper.bound.micros), inclusive: occ.upper.bound.inclusive },
        query_hash: found.query_hash.clone(),
        shape: found.shape.clone(),
        windows,
        raw_ranges: plan.raw.iter().map(|r| edge_view(r, (occ.lower.bound.micros, occ.upper.bound.micros))).collect(),
        insert: rewrite::insert_statement(request.text, occ, &builds, target).ok(),
        describe: rewrite::describe_statement(request.text, occ).unwrap_or_default(),
    };
    (view, plan)
}

/// The explanation as readable text.
pub fn render_text(e: &Explanation) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "rewritten: {}", e.rewritten);
    let _ = writeln!(out, "occurrences: {}", e.occurrences);
    if let Some(reason) = e.reason {
        let _ = writeln!(out, "reason: {reason}");
    }
    if !e.refused.is_empty() {
        let refused: Vec<&str> = e.refused.iter().map(|r| r.as_str()).collect();
        let _ = writeln!(out, "refused candidates: {}", refused.join(", "));
    }
    let _ = writeln!(out, "now: {}", e.now);
    for (i, o) in e.occurrence.iter().enumerate() {
        let bracket = |b: &BoundView, lower: bool| match (lower, b.inclusive) {
            (true, true) => "[",
            (true, false) => "(",
            (false, true) => "]",
            (false, false) => ")",
        };
        let _ = writeln!(out, "\noccurrence {}: rule {} team {}", i + 1, o.rule, o.team_id);
        let _ = writeln!(
            out,
            "  range: {}{}, {}{}",
            bracket(&o.lower, true),
            o.lower.at,
            o.upper.at,
            bracket(&o.upper, false)
        );
        let _ = writeln!(out, "  query_hash: {}", o.query_hash);
        let served = o.windows.iter().filter(|w| w.status == "served").count();
        let _ = writeln!(out, "  windows: {served} served, {} unsealed", o.windows.len() - served);
        for w in &o.windows {
            let _ = writeln!(out, "    {} {} .. {}", w.status, w.start, w.end);
        }
        for r in &o.raw_ranges {
            let _ = writeln!(out, "    raw {} .. {}", r.start, r.end);
        }
        if let Some(insert) = &o.insert {
            let _ = writeln!(out, "  insert:\n    {insert}");
        }
        let _ = writeln!(out, "  describe:\n    {}", o.describe);
    }
    if let Some(sql) = &e.rewritten_sql {
        let _ = writeln!(out, "\nrewritten sql:\n{sql}");
    }
    out
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::sql::rule::shipped_rules;

    const RUNNING: &str = "SELECT person_id AS entity_id, min(timestamp) AS first_exposure_time FROM events \
        WHERE event = '$feature_flag_called' AND timestamp >= '2026-01-01' AND timestamp < '2026-01-20 00:30:00' \
        GROUP BY person_id";

    #[test]
    fn a_running_range_serves_the_sealed_hours_of_its_last_day_as_the_engine_builds_them() {
        let rules: Vec<Arc<Rule>> = shipped_rules().into_iter().map(Arc::new).collect();
        let request = Request {
            text: RUNNING,
            rules: &rules,
            context: Context::default(),
            now: 1_768_869_000_000_000, // 2026-01-20 00:30 UTC
            seal_after: 2 * plan::HOUR,
            preagg_database: "default".into(),
            cluster: None,
            budget: std::time::Duration::from_secs(5),
            exact_under_change: true,
            ingestion_margin: std::time::Duration::from_secs(300),
        };
        let explanation = explain(&request);
        let occurrence = &explanation.occurrence[0];
        let raw: Vec<(&str, &str)> = occurrence.raw_ranges.iter().map(|w| (w.start.as_str(), w.end.as_str())).collect();
        assert_eq!(raw, [("2026-01-19 22:00:00.000000", "2026-01-20 00:30:00.000000")]);
        let served_hours =
            occurrence.windows.iter().filter(|w| w.status == "served" && w.start.starts_with("2026-01-19")).count();
        assert_eq!(served_hours, 22, "hours 00 to 21 of the last day are sealed, built and served");
    }
}
