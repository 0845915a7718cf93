//! Golden tests of `explain`: every fixture under `fixtures/` and every corpus query. The expected
//! outputs live in `fixtures/expected/`. Bless changes with
//! `INSTA_UPDATE=always cargo test --test fixtures`, then review the diff.

#[path = "common/corpus.rs"]
mod corpus;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use preagg_proxy::explain::{self, Explanation};
use preagg_proxy::outcome::Reason;
use preagg_proxy::rules;
use preagg_proxy::sql::Context;
use preagg_proxy::sql::rule::Rule;

fn rules() -> Vec<Arc<Rule>> {
    rules::load_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("rules")).unwrap().into_iter().map(Arc::new).collect()
}

fn explain_at(text: &str, now: &str) -> Explanation {
    let rules = rules();
    let request = explain::Request {
        text,
        rules: &rules,
        context: Context::default(),
        now: chrono::DateTime::parse_from_rfc3339(now).unwrap().timestamp_micros(),
        seal_after: 2 * 3_600_000_000,
        preagg_database: "default".into(),
        cluster: false,
        budget: Duration::from_secs(5),
    };
    explain::explain(&request)
}

#[test]
fn fixtures() {
    insta::glob!("../fixtures", "*.sql", |path| {
        let text = std::fs::read_to_string(path).unwrap();
        let explanation = explain_at(&text, "2026-11-01T00:00:00Z");
        let name = path.file_name().unwrap().to_string_lossy();
        assert_eq!(explanation.rewritten, !name.starts_with("refused_"), "{name}");
        insta::with_settings!({ snapshot_path => "../fixtures/expected", prepend_module_to_snapshot => false }, {
            insta::assert_snapshot!(explain::render_text(&explanation));
        });
    });
}

#[test]
fn corpus_occurrences_are_all_found() {
    let expected = [
        ("01_mean_metric_inlined_exposures.sql", 1),
        ("02_ratio_metric_exposures_inlined_twice.sql", 2),
        ("03_funnel_metric_inlined_exposures.sql", 2),
        ("04_retention_metric_with_cte.sql", 1),
    ];
    for (name, text) in corpus::files() {
        let explanation = explain_at(&corpus::unredacted(&text, corpus::START, corpus::END), "2020-02-01T00:00:00Z");
        let json = serde_json::to_value(&explanation).unwrap();
        assert!(json.get("rewritten").is_some() && json.get("occurrences").is_some() && json.get("reason").is_some());
        match expected.iter().find(|(n, _)| *n == name) {
            Some((_, count)) => {
                assert!(explanation.rewritten, "{name} must be rewritten: {:?}", explanation.reason);
                assert_eq!(explanation.occurrences, *count, "{name}");
            }
            None if name.starts_with("other_") => {
                assert!(!explanation.rewritten, "{name} must pass through");
                assert_eq!(explanation.reason, Some(Reason::NotExperimentQuery), "{name}");
            }
            None => assert!(!explanation.rewritten, "{name}"),
        }
        insta::with_settings!({
            snapshot_path => "../fixtures/expected/corpus",
            prepend_module_to_snapshot => false,
            snapshot_suffix => name.trim_end_matches(".sql").to_string(),
        }, {
            insta::assert_snapshot!("corpus", explain::render_text(&explanation));
        });
    }
}

#[test]
fn redacted_corpus_timestamps_are_refused_not_guessed() {
    for (name, text) in corpus::files().into_iter().filter(|(n, _)| n.starts_with("0")) {
        if !text.contains("'today'") {
            continue;
        }
        let explanation = explain_at(&text, "2020-02-01T00:00:00Z");
        assert_eq!(explanation.reason, Some(Reason::UnparsedBoundLiteral), "{name}");
    }
}

#[test]
fn three_occurrences_in_corpus_03_share_one_hash() {
    let (_, text) = corpus::files().into_iter().find(|(n, _)| n.starts_with("03_")).unwrap();
    let explanation = explain_at(&corpus::unredacted(&text, corpus::START, corpus::END), "2020-02-01T00:00:00Z");
    let hashes: Vec<&str> = explanation.occurrence.iter().map(|o| o.query_hash.as_str()).collect();
    assert_eq!(hashes.len(), 2);
    assert_eq!(hashes[0], hashes[1], "`exposures` and `exposure_data` compute the same thing");
}
