//! Property tests of the analysis: what must and must not change the query hash, and that a
//! rewrite keeps every byte outside the replaced bodies. On the project's own queries in PostHog's
//! shapes, and (tests named `corpus_*`) on PostHog's corpus when it is present.

#[path = "common/corpus.rs"]
mod corpus;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use preagg_proxy::rules;
use preagg_proxy::sql::rule::Rule;
use preagg_proxy::sql::tokens::Tokens;
use preagg_proxy::sql::{self, Context};
use proptest::prelude::*;
use sqlparser::tokenizer::Token;

fn rules() -> Vec<Arc<Rule>> {
    rules::load_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("rules")).unwrap().into_iter().map(Arc::new).collect()
}

fn hashes(text: &str) -> Vec<String> {
    sql::analyze(&rules(), text, &Context::default(), Duration::from_secs(5))
        .map(|a| a.found.into_iter().map(|f| f.query_hash).collect())
        .unwrap_or_default()
}

/// Rewrites the whitespace runs between tokens and flips the case of keywords, leaving every
/// token otherwise as it is.
fn respell(text: &str, seed: &[u8]) -> String {
    let tokens = Tokens::new(text).unwrap();
    let fillers = [" ", "\n", "  \t", " /* note */ ", " -- note\n", "\n\n   "];
    let mut out = String::new();
    let mut previous_end = 0;
    for (i, tok) in tokens.toks.iter().enumerate() {
        let gap = &text[previous_end..tok.bytes.start];
        let pick = seed.get(i % seed.len().max(1)).copied().unwrap_or(0) as usize;
        if gap.is_empty() {
            out.push_str(gap);
        } else {
            out.push_str(fillers[pick % fillers.len()]);
        }
        let word = &text[tok.bytes.clone()];
        let keyword = matches!(&tok.token, Token::Word(w) if w.quote_style.is_none()
            && ["SELECT", "FROM", "WHERE", "AS", "GROUP", "BY", "LEFT", "OUTER", "JOIN", "ON", "HAVING", "AND"]
                .contains(&w.value.to_ascii_uppercase().as_str()));
        if keyword && pick.is_multiple_of(3) {
            out.push_str(&word.to_ascii_lowercase());
        } else if keyword && pick % 3 == 1 {
            out.push_str(&word.to_ascii_uppercase());
        } else {
            out.push_str(word);
        }
        previous_end = tok.bytes.end;
    }
    out.push_str(&text[previous_end..]);
    out
}

/// `text` with `from` replaced by `to` (the first `n` times, or every time), which must change it:
/// a replacement that finds nothing would make a test that cannot fail.
fn replaced(text: &str, from: &str, to: &str, n: Option<usize>) -> String {
    assert!(text.contains(from), "the query must contain {from:?}");
    n.map_or_else(|| text.replace(from, to), |n| text.replacen(from, to, n))
}

/// Respelling `text` keeps the hashes of its occurrences.
fn respelling_keeps_the_hashes(text: &str, seed: &[u8]) -> Result<(), TestCaseError> {
    let respelled = respell(text, seed);
    prop_assert_eq!(hashes(&respelled), hashes(text));
    Ok(())
}

/// Rewriting `text`, respelled, keeps every byte outside the occurrences' bodies.
fn a_rewrite_keeps_the_bytes_outside_the_bodies(text: &str, seed: &[u8]) -> Result<(), TestCaseError> {
    let text = respell(text, seed);
    let analysis = sql::analyze(&rules(), &text, &Context::default(), Duration::from_secs(5)).unwrap();
    prop_assert!(!analysis.found.is_empty());
    let edits: Vec<_> = analysis
        .found
        .iter()
        .map(|f| sql::splice::Edit::new(f.occurrence.body.clone(), format!("<body {}>", f.query_hash)))
        .collect();
    let rewritten = sql::splice::apply(&text, &edits).unwrap();
    let mut rest = rewritten.as_str();
    let mut cursor = 0;
    for f in &analysis.found {
        let kept = &text[cursor..f.occurrence.body.start];
        prop_assert!(rest.starts_with(kept));
        rest = &rest[kept.len()..];
        let marker = format!("<body {}>", f.query_hash);
        prop_assert!(rest.starts_with(&marker));
        rest = &rest[marker.len()..];
        cursor = f.occurrence.body.end;
    }
    prop_assert_eq!(rest, &text[cursor..]);
    Ok(())
}

fn seeds() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 1..64)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn whitespace_comments_and_keyword_case_do_not_change_the_hash(seed in seeds()) {
        for prefix in ["mean_metric_inlined_", "retention_"] {
            respelling_keeps_the_hashes(&corpus::shape(prefix), &seed)?;
        }
    }

    #[test]
    fn a_rewrite_keeps_every_byte_outside_the_bodies(seed in seeds()) {
        a_rewrite_keeps_the_bytes_outside_the_bodies(&corpus::shape("ratio_"), &seed)?;
    }
}

/// The same two properties over PostHog's corpus: 01 and 04 respelled, 02 rewritten.
#[test]
fn corpus_respelling_keeps_the_hashes_and_a_rewrite_the_bytes() {
    let Some(files) = corpus::posthog() else { return };
    let query = |prefix| corpus::unredacted(&corpus::find(&files, prefix), corpus::START, corpus::END);
    let (mean, retention, ratio) = (query("01_"), query("04_"), query("02_"));
    let mut runner =
        proptest::test_runner::TestRunner::new(proptest::test_runner::contextualize_config(ProptestConfig {
            cases: 48,
            ..ProptestConfig::default()
        }));
    let result = runner.run(&seeds(), |seed| {
        respelling_keeps_the_hashes(&mean, &seed)?;
        respelling_keeps_the_hashes(&retention, &seed)?;
        a_rewrite_keeps_the_bytes_outside_the_bodies(&ratio, &seed)
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

/// A retention query with a CTE, and the literals the hash tests change in it.
struct Retention {
    text: String,
    team: &'static str,
    flag: &'static str,
    lo: &'static str,
    hi: &'static str,
}

fn own_retention() -> Retention {
    Retention {
        text: corpus::shape("retention_"),
        team: corpus::own::TEAM,
        flag: corpus::own::FLAG,
        lo: corpus::own::START_SECONDS,
        hi: corpus::own::END_SECONDS,
    }
}

fn team_and_bounds_stay_out_of_the_hash_in(query: &Retention) {
    let text = &query.text;
    let other = replaced(text, query.team, "123", None);
    let other = replaced(&other, query.lo, "2019-02-03 04:05:06", None);
    let other = replaced(&other, query.hi, "2019-03-01 00:00:00", None);
    assert_eq!(hashes(&other), hashes(text));
    let inclusive_to_exclusive = replaced(text, "ifNull(lessOrEquals(toTimeZone(", "ifNull(less(toTimeZone(", Some(1));
    assert_eq!(hashes(&inclusive_to_exclusive), hashes(text));
}

fn what_is_computed_changes_the_hash_in(query: &Retention) {
    let text = &query.text;
    let base = hashes(text);
    assert_eq!(base.len(), 1);
    let other_flag = format!("'{}-2'", query.flag.trim_matches('\''));
    let team = format!("equals(events.team_id, {}), ", query.team);
    let last_exposure = "max(toTimeZone(events.timestamp, 'UTC')) AS last_exposure_time,";
    let entity = "events__override.person_id, events.person_id) AS entity_id";
    let changes = [
        ("flag key", replaced(text, query.flag, &other_flag, Some(1))),
        ("variant list", replaced(text, "['control', 'test']", "['control', 'test', 'holdout']", Some(1))),
        ("predicate", replaced(text, &team, &format!("{team}notEmpty(events.distinct_id), "), Some(1))),
        ("column", replaced(text, last_exposure, "", Some(1))),
        ("entity", replaced(text, entity, &format!("{entity}_x"), Some(1))),
    ];
    for (what, changed) in changes {
        let h = hashes(&changed);
        assert!(h.is_empty() || h != base, "changing the {what} must change the hash");
    }
    // A different column still matches, so the hash must exist and differ.
    let fewer_columns = hashes(&replaced(text, last_exposure, "", Some(1)));
    assert_eq!(fewer_columns.len(), 1);
    assert_ne!(fewer_columns, base);
}

/// `execution_time` is the query's `max_execution_time=N` setting, which must not change the hash.
fn result_changing_settings_and_the_database_change_the_hash_in(text: &str, execution_time: &str) {
    let analyze = |context: &Context, text: &str| {
        sql::analyze(&rules(), text, context, Duration::from_secs(5)).unwrap().found[0].query_hash.clone()
    };
    let base = analyze(&Context::default(), text);
    let other_db = Context { database: "analytics".into(), ..Context::default() };
    assert_ne!(analyze(&other_db, text), base);
    assert_ne!(analyze(&Context::default(), &replaced(text, "transform_null_in=1", "transform_null_in=0", None)), base);
    assert_eq!(analyze(&Context::default(), &replaced(text, execution_time, "max_execution_time=61", None)), base);
    let url = Context { url_settings: [("join_use_nulls".to_string(), "1".to_string())].into(), ..Context::default() };
    assert_ne!(analyze(&url, text), base);
}

#[test]
fn team_and_bounds_stay_out_of_the_hash() {
    team_and_bounds_stay_out_of_the_hash_in(&own_retention());
}

#[test]
fn what_is_computed_changes_the_hash() {
    what_is_computed_changes_the_hash_in(&own_retention());
}

#[test]
fn result_changing_settings_and_the_database_change_the_hash() {
    result_changing_settings_and_the_database_change_the_hash_in(
        &corpus::shape("mean_metric_inlined_"),
        "max_execution_time=300",
    );
}

/// The three tests above over PostHog's corpus: 04 (retention) and 01 (mean metric).
#[test]
fn corpus_what_changes_the_hash_and_what_does_not() {
    let Some(files) = corpus::posthog() else { return };
    let retention = Retention {
        text: corpus::find(&files, "04_"),
        team: "99999",
        flag: "'test-experiment'",
        lo: "2020-01-01 12:00:00",
        hi: "2020-01-15 12:00:00",
    };
    team_and_bounds_stay_out_of_the_hash_in(&retention);
    what_is_computed_changes_the_hash_in(&retention);
    let mean = corpus::unredacted(&corpus::find(&files, "01_"), corpus::START, corpus::END);
    result_changing_settings_and_the_database_change_the_hash_in(&mean, "max_execution_time=600");
}
