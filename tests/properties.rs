//! Property tests of the analysis: what must and must not change the query hash, and that a
//! rewrite keeps every byte outside the replaced bodies.

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

fn corpus_query(prefix: &str) -> String {
    let (_, text) = corpus::files().into_iter().find(|(n, _)| n.starts_with(prefix)).unwrap();
    corpus::unredacted(&text, corpus::START, corpus::END)
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

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn whitespace_comments_and_keyword_case_do_not_change_the_hash(seed in proptest::collection::vec(any::<u8>(), 1..64)) {
        for prefix in ["01_", "04_"] {
            let text = corpus_query(prefix);
            let respelled = respell(&text, &seed);
            prop_assert_eq!(hashes(&respelled), hashes(&text));
        }
    }

    #[test]
    fn a_rewrite_keeps_every_byte_outside_the_bodies(seed in proptest::collection::vec(any::<u8>(), 1..64)) {
        let text = respell(&corpus_query("02_"), &seed);
        let analysis = sql::analyze(&rules(), &text, &Context::default(), Duration::from_secs(5)).unwrap();
        let edits: Vec<_> = analysis.found.iter()
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
    }
}

#[test]
fn team_and_bounds_stay_out_of_the_hash() {
    let text = corpus_query("04_");
    let other = text
        .replace("99999", "123")
        .replace("2020-01-01 12:00:00", "2020-02-03 04:05:06")
        .replace("2020-01-15 12:00:00", "2020-03-01 00:00:00");
    assert_eq!(hashes(&other), hashes(&text));
    let inclusive_to_exclusive = text.replacen("ifNull(lessOrEquals(toTimeZone(", "ifNull(less(toTimeZone(", 1);
    assert_eq!(hashes(&inclusive_to_exclusive), hashes(&text));
}

#[test]
fn what_is_computed_changes_the_hash() {
    let text = corpus_query("04_");
    let base = hashes(&text);
    assert_eq!(base.len(), 1);
    let changes = [
        ("flag key", text.replacen("'test-experiment'", "'test-experiment-2'", 1)),
        ("variant list", text.replacen("['control', 'test']", "['control', 'test', 'holdout']", 1)),
        (
            "predicate",
            text.replacen(
                "equals(events.team_id, 99999), ",
                "equals(events.team_id, 99999), notEmpty(events.distinct_id), ",
                1,
            ),
        ),
        ("column", text.replacen("          max(toTimeZone(events.timestamp, 'UTC')) AS last_exposure_time,\n", "", 1)),
        (
            "entity",
            text.replacen(
                "events__override.person_id, events.person_id) AS entity_id",
                "events__override.person_id, events.person_id) AS entity_id_x",
                1,
            ),
        ),
    ];
    for (what, changed) in changes {
        let h = hashes(&changed);
        assert!(h.is_empty() || h != base, "changing the {what} must change the hash");
    }
    // A different column still matches, so the hash must exist and differ.
    assert_ne!(
        hashes(&text.replacen("          max(toTimeZone(events.timestamp, 'UTC')) AS last_exposure_time,\n", "", 1)),
        base
    );
}

#[test]
fn result_changing_settings_and_the_database_change_the_hash() {
    let text = corpus_query("01_");
    let analyze = |context: &Context, text: &str| {
        sql::analyze(&rules(), text, context, Duration::from_secs(5)).unwrap().found[0].query_hash.clone()
    };
    let base = analyze(&Context::default(), &text);
    let other_db = Context { database: "analytics".into(), ..Context::default() };
    assert_ne!(analyze(&other_db, &text), base);
    assert_ne!(analyze(&Context::default(), &text.replace("transform_null_in=1", "transform_null_in=0")), base);
    assert_eq!(analyze(&Context::default(), &text.replace("max_execution_time=600", "max_execution_time=60")), base);
    let url = Context { url_settings: [("join_use_nulls".to_string(), "1".to_string())].into(), ..Context::default() };
    assert_ne!(analyze(&url, &text), base);
}
