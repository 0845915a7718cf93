//! The status page: plain server-rendered HTML. Per (team, query hash) a timeline of its windows
//! (ready, building, failed, expired, and the gaps read raw), then the shadow match rate and
//! speedup per rule, then the newest mismatches.

use std::collections::BTreeMap;
use std::fmt::Write;

use super::ShadowReport;
use crate::preagg::store::{Job, Status};
use crate::sql::quote::timestamp_text;

/// HTML-escapes text.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;").replace('\'', "&#39;")
}

fn state(job: &Job, now: i64) -> (&'static str, &'static str) {
    match job.status {
        Status::Ready if job.expires_at.is_some_and(|e| e <= now) => ("expired", "expired"),
        Status::Ready => ("ready", "ready"),
        Status::Pending => ("building", "building"),
        Status::Failed => ("failed", "failed"),
    }
}

const STYLE: &str = "body{font:14px system-ui,sans-serif;margin:24px;color:#222}h1{font-size:20px}\
h2{font-size:16px;margin-top:28px}table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;\
padding:4px 8px;text-align:left;vertical-align:top}.timeline{display:flex;height:22px;width:900px;\
border:1px solid #999;margin:4px 0}.timeline div{height:100%;border-right:1px solid #fff;box-sizing:border-box}\
.ready{background:#2e9d4f}.building{background:#e8a317}.failed{background:#c8362f}.expired{background:#9aa}\
.raw{background:repeating-linear-gradient(45deg,#eee,#eee 4px,#ddd 4px,#ddd 8px)}.legend span{display:inline-block;\
width:12px;height:12px;margin:0 4px 0 12px}.mono{font-family:monospace;font-size:12px}.nowrap{white-space:nowrap}";

/// Characters of a query hash shown in the mismatch table (the full hash is its tooltip).
const SHORT_HASH: usize = 16;

/// Renders the page.
pub fn render(jobs: &[Job], shadow: &ShadowReport, now: i64) -> String {
    let mut html = String::new();
    let _ = write!(
        html,
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>preagg-proxy status</title><style>{STYLE}</style>\
         </head><body><h1>preagg-proxy status</h1><p>Generated {} UTC.</p>\
         <div class=\"legend\"><span class=\"ready\"></span>ready<span class=\"building\"></span>building\
         <span class=\"failed\"></span>failed<span class=\"expired\"></span>expired<span class=\"raw\"></span>raw</div>",
        esc(&timestamp_text(now))
    );
    render_windows(&mut html, jobs, now);
    render_shadow(&mut html, shadow);
    html.push_str("</body></html>\n");
    html
}

fn render_windows(html: &mut String, jobs: &[Job], now: i64) {
    let mut groups: BTreeMap<(i64, &str), Vec<&Job>> = BTreeMap::new();
    for job in jobs {
        groups.entry((job.team_id, job.query_hash.as_str())).or_default().push(job);
    }
    let _ = write!(html, "<h2>Windows by query hash</h2>");
    if groups.is_empty() {
        html.push_str("<p>No jobs yet.</p>");
    }
    for ((team, hash), mut group) in groups {
        // Newest attempt per window wins the cell.
        group.sort_by_key(|j| (j.window.start, j.window.end, j.created_at));
        let mut latest: BTreeMap<(i64, i64), &Job> = BTreeMap::new();
        for job in &group {
            latest.insert((job.window.start, job.window.end), job);
        }
        let cells: Vec<&Job> = latest.values().copied().collect();
        let (Some(start), Some(end)) =
            (cells.first().map(|j| j.window.start), cells.iter().map(|j| j.window.end).max())
        else {
            continue;
        };
        let span = (end - start).max(1) as f64;
        let count = |s: &str| cells.iter().filter(|j| state(j, now).0 == s).count();
        let rows: i64 = cells.iter().filter_map(|j| j.rows_written).sum();
        let _ = write!(
            html,
            "<h3 class=\"mono\">team {team} · {}</h3><p>{} ready, {} building, {} failed, {} expired · {rows} rows · \
             {} .. {}</p><div class=\"timeline\">",
            esc(hash),
            count("ready"),
            count("building"),
            count("failed"),
            count("expired"),
            esc(&timestamp_text(start)),
            esc(&timestamp_text(end))
        );
        let mut cursor = start;
        for job in &cells {
            if job.window.start < cursor {
                continue;
            }
            if job.window.start > cursor {
                let width = (job.window.start - cursor) as f64 / span * 100.0;
                let _ = write!(html, "<div class=\"raw\" style=\"width:{width:.3}%\" title=\"raw\"></div>");
            }
            let (class, label) = state(job, now);
            let width = (job.window.end - job.window.start) as f64 / span * 100.0;
            let title = format!(
                "{label}: {} .. {}{}",
                timestamp_text(job.window.start),
                timestamp_text(job.window.end),
                job.error.as_deref().map(|e| format!(" ({e})")).unwrap_or_default()
            );
            let _ = write!(html, "<div class=\"{class}\" style=\"width:{width:.3}%\" title=\"{}\"></div>", esc(&title));
            cursor = job.window.end;
        }
        html.push_str("</div>");
    }
}

fn render_shadow(html: &mut String, shadow: &ShadowReport) {
    let _ = write!(html, "<h2>Shadow comparisons</h2>");
    if !shadow.enabled {
        html.push_str("<p>Shadow mode is off.</p>");
    }
    if !shadow.rules.is_empty() {
        html.push_str(
            "<table><tr><th>rule</th><th>match rate</th><th>matches</th><th>mismatches</th><th>noise</th>\
             <th>errors</th><th>skipped</th><th>dropped</th><th>speedup</th></tr>",
        );
        for (rule, s) in &shadow.rules {
            let rate = s.match_rate().map(|r| format!("{:.1}%", r * 100.0)).unwrap_or_else(|| "–".into());
            let speedup = s.speedup().map(|x| format!("{x:.1}×")).unwrap_or_else(|| "–".into());
            let _ = write!(
                html,
                "<tr><td>{}</td><td>{rate}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>\
                 <td>{speedup}</td></tr>",
                esc(rule),
                s.matches,
                s.mismatches,
                s.noise,
                s.errors,
                s.skipped,
                s.dropped
            );
        }
        html.push_str("</table>");
    }
    let _ = write!(html, "<h2>Recent mismatches</h2>");
    if shadow.samples.is_empty() {
        html.push_str("<p>None.</p>");
        return;
    }
    html.push_str(
        "<table><tr><th>when</th><th>rule</th><th>query hash</th><th>rows (original / rewritten)</th>\
         <th>first difference</th><th>query ids</th></tr>",
    );
    for s in &shadow.samples {
        let short: Vec<&str> = s.query_hashes.iter().map(|h| h.get(..SHORT_HASH).unwrap_or(h)).collect();
        let _ = write!(
            html,
            "<tr><td>{}</td><td>{}</td><td class=\"mono\" title=\"{}\">{}</td><td>{} / {}</td>\
             <td class=\"mono\">{}</td><td class=\"mono nowrap\">{}<br>{}</td></tr>",
            esc(&timestamp_text(s.created_at)),
            esc(&s.rule),
            esc(&s.query_hashes.join(", ")),
            esc(&short.join(", ")),
            s.original_rows,
            s.rewritten_rows,
            esc(&s.first_difference),
            esc(&s.original_query_id),
            esc(&s.rewritten_query_id)
        );
    }
    html.push_str("</table>");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::preagg::store::MismatchSample;
    use crate::sql::window::Window;

    fn job(start: i64, end: i64, status: Status) -> Job {
        Job {
            id: format!("j{start}"),
            team_id: 1,
            rule: "r".into(),
            query_hash: "<hash>".into(),
            window: Window { start, end },
            status,
            lease_owner: None,
            lease_expires_at: None,
            attempts: 1,
            created_at: 0,
            computed_at: None,
            expires_at: Some(100),
            rows_written: Some(3),
            error: Some("bad <thing>".into()),
            source_seen_at: None,
        }
    }

    #[test]
    fn renders_timelines_with_gaps_and_escapes_text() {
        let jobs = [job(0, 10, Status::Ready), job(20, 30, Status::Failed), job(30, 40, Status::Pending)];
        let report = ShadowReport { enabled: false, rules: BTreeMap::new(), samples: Vec::new() };
        let html = render(&jobs, &report, 50);
        assert!(html.contains("class=\"raw\" style=\"width:25.000%\""));
        assert!(html.contains("1 ready, 1 building, 1 failed, 0 expired"));
        assert!(html.contains("&lt;hash&gt;") && html.contains("bad &lt;thing&gt;"));
        assert!(!html.contains("<hash>"));
    }

    #[test]
    fn mismatches_show_short_hashes_and_escaped_differences() {
        let sample = MismatchSample {
            id: "s".into(),
            created_at: 0,
            rule: "r".into(),
            query_hashes: vec!["0123456789abcdef0123456789abcdef".into()],
            job_ids: Vec::new(),
            original_rows: 2,
            rewritten_rows: 3,
            first_difference: "row counts differ: <b>".into(),
            original_query_id: "preagg-shadow-1".into(),
            rewritten_query_id: "preagg-shadow-2".into(),
            original_ms: 10,
            rewritten_ms: 5,
        };
        let report = ShadowReport { enabled: true, rules: BTreeMap::new(), samples: vec![sample] };
        let html = render(&[], &report, 0);
        assert!(html.contains("title=\"0123456789abcdef0123456789abcdef\">0123456789abcdef</td>"), "{html}");
        assert!(html.contains("row counts differ: &lt;b&gt;") && html.contains("2 / 3"));
        assert!(html.contains("No jobs yet.") && !html.contains("Shadow mode is off."));
    }
}
