//! Shared pieces of the equivalence tests: query forms, edge-case data, and comparing answers.

use std::time::Duration;

use super::{client, corpus, root};

/// A query form with `{LO}`/`{HI}` bound placeholders (`YYYY-MM-DD hh:mm:ss.ffffff`, UTC).
pub struct Form {
    /// Name for messages.
    pub name: String,
    /// Text with placeholders.
    pub template: String,
    /// Occurrences the proxy must rewrite once warm.
    pub occurrences: usize,
}

impl Form {
    /// The query for a range; `{LO_NY}`/`{HI_NY}` are the same instants as New York local time.
    pub fn query(&self, lo: &str, hi: &str) -> String {
        self.template
            .replace("{LO_NY}", &new_york(lo))
            .replace("{HI_NY}", &new_york(hi))
            .replace("{LO}", lo)
            .replace("{HI}", hi)
    }
}

/// An own shape (`fixtures/shapes/`) as a template: its team and flag (also in a
/// `$feature/<flag>` property) replaced by `team` and `flag`, its bounds by the `{LO}`/`{HI}` placeholders (the retention shape's whole seconds become
/// `toDateTime64` with microseconds, as the ranges need).
fn shape_template(prefix: &str, team: i64, flag: &str) -> String {
    use corpus::own;
    let seconds = |instant: &str| format!("toDateTime('{instant}', 'UTC')");
    corpus::shape(prefix)
        .replace(own::START, "{LO}")
        .replace(own::END, "{HI}")
        .replace(&seconds(own::START_SECONDS), "toDateTime64('{LO}', 6, 'UTC')")
        .replace(&seconds(own::END_SECONDS), "toDateTime64('{HI}', 6, 'UTC')")
        .replace(own::TEAM, &team.to_string())
        .replace(&format!("$feature/{}", own::FLAG.trim_matches('\'')), &format!("$feature/{flag}"))
        .replace(own::FLAG, &format!("'{flag}'"))
}

/// An experiment form from an own shape; every bound of it must have become a placeholder.
fn shape_form(name: &str, prefix: &str, occurrences: usize, team: i64, flag: &str) -> Form {
    let template = shape_template(prefix, team, flag);
    assert!(template.contains("{LO}") && template.contains("{HI}"), "{name}");
    for constant in [corpus::own::START, corpus::own::END, corpus::own::START_SECONDS, corpus::own::END_SECONDS] {
        assert!(!template.contains(constant), "{name}: {constant} left in the template");
    }
    Form { name: name.into(), template, occurrences }
}

/// The own shapes that are no experiment queries (`other_*`): they must pass through.
pub fn passthrough_forms(team: i64) -> Vec<Form> {
    corpus::shapes()
        .into_iter()
        .filter(|(name, _)| name.starts_with("other_"))
        .map(|(name, _)| Form { template: shape_template(&name, team, ""), name, occurrences: 0 })
        .collect()
}

/// PostHog's corpus 01-04 (team 99999, flag `test-experiment`) as forms, when the corpus is
/// present (see [`corpus::posthog`]).
pub fn corpus_forms() -> Option<Vec<Form>> {
    let files = corpus::posthog()?;
    let template = |prefix| corpus::unredacted(&corpus::find(&files, prefix), "{LO}", "{HI}");
    let retention = template("04_")
        .replace("2020-01-01 12:00:00", "{LO}")
        .replace("2020-01-15 12:00:00", "{HI}")
        .replace("toDateTime('{LO}', 'UTC')", "toDateTime64('{LO}', 6, 'UTC')")
        .replace("toDateTime('{HI}', 'UTC')", "toDateTime64('{HI}', 6, 'UTC')");
    // The funnel metric calls PostHog's aggregate_funnel_array UDF, which chdb has not: keep the
    // query's structure (exposures inlined plus the `exposure_data` copy) with a plain metric.
    let funnel = template("03_");
    let funnel_value_start = funnel.find("if(ifNull(greater(length(arrayFilter(").unwrap();
    let funnel_value_end = funnel[funnel_value_start..].find(" AS value").unwrap() + funnel_value_start;
    let funnel = format!("{}count(metric_events.uuid){}", &funnel[..funnel_value_start], &funnel[funnel_value_end..]);
    Some(vec![
        Form { name: "corpus 01 mean metric, inlined".into(), template: template("01_"), occurrences: 1 },
        Form { name: "corpus 02 ratio metric, inlined twice".into(), template: template("02_"), occurrences: 2 },
        Form { name: "corpus 03 funnel, exposures and exposure_data".into(), template: funnel, occurrences: 2 },
        Form { name: "corpus 04 retention, CTE".into(), template: retention, occurrences: 1 },
    ])
}

/// Every supported form: the project's own queries in PostHog's shapes, and variants of them.
pub fn forms(team: i64, flag: &str) -> Vec<Form> {
    let standalone = std::fs::read_to_string(root().join("fixtures/standalone_exposures_with_settings_and_format.sql"))
        .unwrap()
        .replace("2026-10-03 07:15:00.000000", "{LO}")
        .replace("2026-10-20 16:40:00.250000", "{HI}")
        .replace("'checkout-redesign'", "'test-experiment'")
        .replace("['control', 'test', 'test-2']", "['control', 'test']")
        .replace("events.team_id, 2)", "events.team_id, 99999)")
        .replace("FORMAT JSONEachRow", "");
    let full_columns = standalone.replacen(
        "       max(toTimeZone(events.timestamp, 'UTC')) AS last_exposure_time\n",
        "       max(toTimeZone(events.timestamp, 'UTC')) AS last_exposure_time,\n       \
         argMin(events.uuid, toTimeZone(events.timestamp, 'UTC')) AS exposure_event_uuid,\n       \
         argMin(events.`$session_id`, toTimeZone(events.timestamp, 'UTC')) AS exposure_session_id\n",
        1,
    );
    let first_seen_ny = format!(
        "SELECT * FROM (SELECT events.person_id AS entity_id, \
         argMin(JSONExtractString(events.properties, '$feature_flag_response'), toTimeZone(events.timestamp, 'America/New_York')) AS variant, \
         min(toTimeZone(events.timestamp, 'America/New_York')) AS first_exposure_time, \
         argMin(events.uuid, toTimeZone(events.timestamp, 'America/New_York')) AS exposure_event_uuid \
         FROM events WHERE events.team_id = {team} AND events.event = '$feature_flag_called' \
         AND JSONExtractString(events.properties, '$feature_flag') = '{flag}' \
         AND toTimeZone(events.timestamp, 'America/New_York') > toDateTime64('{{LO_NY}}', 6, 'America/New_York') \
         AND toTimeZone(events.timestamp, 'America/New_York') < toDateTime64('{{HI_NY}}', 6, 'America/New_York') \
         GROUP BY entity_id)"
    );
    let exclusive_infix = format!(
        "SELECT variant, count() AS persons, min(first_exposure_time) AS first FROM (\
         SELECT events.person_id AS entity_id, \
         if(greater(count(DISTINCT JSONExtractString(events.properties, '$feature_flag_response')), 1), '$multiple', \
         any(JSONExtractString(events.properties, '$feature_flag_response'))) AS variant, \
         min(events.timestamp) AS first_exposure_time FROM events \
         WHERE events.team_id = {team} AND events.event = '$feature_flag_called' \
         AND JSONExtractString(events.properties, '$feature_flag') = '{flag}' \
         AND events.timestamp > '{{LO}}' AND events.timestamp <= '{{HI}}' GROUP BY entity_id) AS exposures \
         GROUP BY variant"
    );
    vec![
        shape_form("mean metric, inlined", "mean_metric_inlined_", 1, team, flag),
        shape_form("ratio metric, inlined twice", "ratio_", 2, team, flag),
        shape_form("funnel, exposures and exposure_data", "funnel_", 2, team, flag),
        shape_form("retention, CTE", "retention_", 1, team, flag),
        Form { name: "standalone exposures, SETTINGS".into(), template: standalone, occurrences: 1 },
        Form { name: "standalone exposures, all six columns".into(), template: full_columns, occurrences: 1 },
        Form {
            name: "first seen, New York time, exclusive lower bound".into(),
            template: first_seen_ny,
            occurrences: 1,
        },
        Form { name: "infix, exclusive lower, inclusive upper".into(), template: exclusive_infix, occurrences: 1 },
        shape_form("exposures over time, first exposure day", "exposures_timeseries_", 1, team, flag),
        shape_form("mean metric with a breakdown, CTE", "mean_metric_breakdown_", 1, team, flag),
        shape_form("exposures over time, custom exposure", "exposures_custom_", 1, team, flag),
        shape_form("data warehouse, exposure identifier key", "data_warehouse_", 1, team, flag),
    ]
}

/// The form whose name starts with `name`.
pub fn form(team: i64, flag: &str, name: &str) -> Form {
    forms(team, flag).into_iter().find(|f| f.name.starts_with(name)).unwrap_or_else(|| panic!("no form {name}"))
}

/// Rows that sit exactly on the bounds and one microsecond either side, persons seen in two
/// variants in different windows, a merged identity, a variant outside the list, other flags and
/// teams. `bounds` are (lo, hi) pairs in `YYYY-MM-DD hh:mm:ss.ffffff`.
pub fn edge_rows(team: i64, flag: &str, bounds: &[(&str, &str)]) -> String {
    let mut rows = Vec::new();
    let mut n = 0u32;
    let mut push = |ts: String, variant: &str, person: u32, distinct: String, event_team: i64, event_flag: &str| {
        n += 1;
        rows.push(format!(
            "(generateUUIDv4(), '$feature_flag_called', '{{\"$feature_flag\": \"{event_flag}\", \"$feature_flag_response\": \"{variant}\"}}', \
             toDateTime64('{ts}', 6, 'UTC'), {event_team}, '{distinct}', toUUID('00000000-0000-4000-8000-{person:012}'), \
             'edge-session-{n}', '', now64(), now())"
        ));
    };
    for (i, (lo, hi)) in bounds.iter().enumerate() {
        for (j, base) in [lo, hi].iter().enumerate() {
            for (k, delta) in [-1i64, 0, 1].iter().enumerate() {
                let person = 1000 + (i * 10 + j * 3 + k) as u32;
                let ts = shift(base, *delta);
                push(ts, if k % 2 == 0 { "control" } else { "test" }, person, format!("edge-{person}"), team, flag);
            }
        }
    }
    // One person in two variants, in windows a week apart; one merged identity.
    push("2026-10-02 10:00:00.000001".into(), "control", 2000, "edge-2000".into(), team, flag);
    push("2026-10-09 10:00:00.000002".into(), "test", 2000, "edge-2000".into(), team, flag);
    push("2026-10-04 03:00:00.000003".into(), "test", 2001, "edge-2001-alias".into(), team, flag);
    push("2026-10-04 05:00:00.000004".into(), "holdout", 2002, "edge-2002".into(), team, flag);
    push("2026-10-04 06:00:00.000005".into(), "control", 2003, "edge-2003".into(), team, "another-flag");
    push("2026-10-04 07:00:00.000006".into(), "control", 2004, "edge-2004".into(), 2, flag);
    format!(
        "INSERT INTO events (uuid, event, properties, timestamp, team_id, distinct_id, person_id, `$session_id`, \
         elements_chain, created_at, _timestamp) VALUES {};\n\
         INSERT INTO person_distinct_id_overrides VALUES ({team}, 'edge-2001-alias', toUUID('00000000-0000-4000-8000-{:012}'), 0, 5)",
        rows.join(", "),
        2000
    )
}

/// A UTC timestamp as New York local time.
fn new_york(utc: &str) -> String {
    let t = chrono::NaiveDateTime::parse_from_str(utc, "%Y-%m-%d %H:%M:%S%.f").unwrap().and_utc();
    t.with_timezone(&chrono_tz::America::New_York).format("%Y-%m-%d %H:%M:%S%.6f").to_string()
}

/// `text` (a timestamp) shifted by `micros`.
pub fn shift(text: &str, micros: i64) -> String {
    let t = chrono::NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S%.f").unwrap();
    (t + chrono::Duration::microseconds(micros)).format("%Y-%m-%d %H:%M:%S%.6f").to_string()
}

/// An answer: status, the `X-Preagg` header, and the body rows (TSV with names and types).
#[derive(Debug, Clone)]
pub struct Answer {
    /// HTTP status.
    pub status: u16,
    /// X-Preagg (empty when talking to ClickHouse directly).
    pub preagg: String,
    /// Body lines, sorted after the two header lines (unless the query orders its rows).
    pub lines: Vec<String>,
}

/// Runs `sql` against `base` in `TSVWithNamesAndTypes`.
pub async fn run(base: &str, sql: &str) -> Answer {
    let response = client()
        .post(format!("{base}/?default_format=TSVWithNamesAndTypes"))
        .body(sql.to_string())
        .send()
        .await
        .expect("query");
    answer(response).await.unwrap()
}

/// A response as an [`Answer`]; an error when its body breaks off.
pub async fn answer(response: reqwest::Response) -> Result<Answer, reqwest::Error> {
    let status = response.status().as_u16();
    let preagg = response.headers().get("x-preagg").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
    let text = response.text().await?;
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    if lines.len() > 2 {
        lines[2..].sort();
    }
    Ok(Answer { status, preagg, lines })
}

/// Whether two TSV answers are equal, floats compared with a relative tolerance (sums of floats
/// may differ in their last bits between any two runs of the same query).
pub fn same_rows(a: &Answer, b: &Answer) -> Result<(), String> {
    if a.status != b.status {
        return Err(format!("status {} vs {}", a.status, b.status));
    }
    if a.lines.len() != b.lines.len() {
        let only = |x: &Answer, y: &Answer| -> Vec<String> {
            x.lines.iter().filter(|l| !y.lines.contains(l)).take(5).cloned().collect()
        };
        return Err(format!(
            "{} lines vs {} lines; only direct: {:?}; only proxied: {:?}",
            a.lines.len(),
            b.lines.len(),
            only(a, b),
            only(b, a)
        ));
    }
    for (x, y) in a.lines.iter().zip(&b.lines) {
        let fields: Vec<(&str, &str)> = x.split('\t').zip(y.split('\t')).collect();
        let equal = x.split('\t').count() == y.split('\t').count()
            && fields.iter().all(|(p, q)| {
                p == q
                    || matches!((p.parse::<f64>(), q.parse::<f64>()),
                        (Ok(u), Ok(v)) if (u - v).abs() <= 1e-9 * u.abs().max(v.abs()))
            });
        if !equal {
            return Err(format!("line differs:\n  direct:  {x}\n  proxied: {y}"));
        }
    }
    Ok(())
}

/// Polls the proxy until `sql` is rewritten (its builds are done), or panics.
pub async fn until_rewritten(proxy: &str, sql: &str, timeout: Duration) -> Answer {
    until_rewritten_by(timeout, || run(proxy, sql)).await
}

/// Asks with `ask` until the answer is rewritten, or panics after `timeout`.
pub async fn until_rewritten_by<F: Future<Output = Answer>>(timeout: Duration, mut ask: impl FnMut() -> F) -> Answer {
    let started = std::time::Instant::now();
    loop {
        let answer = ask().await;
        if answer.preagg.starts_with("rewritten") {
            return answer;
        }
        assert!(started.elapsed() < timeout, "not rewritten within {timeout:?}: {}", answer.preagg);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs statements (`;`-separated) directly on the server.
pub fn exec(base: &str, statements: &str) {
    for statement in statements.split(";\n").filter(|s| !s.trim().is_empty()) {
        let output = std::process::Command::new("curl")
            .args(["-sS", "--fail-with-body", "--data-binary", statement, base])
            .output()
            .expect("curl");
        assert!(output.status.success(), "{statement}: {}", String::from_utf8_lossy(&output.stdout));
    }
}
