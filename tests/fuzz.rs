//! Fuzzing locate and match: arbitrary text and mutated queries (the project's own in PostHog's
//! shapes, and PostHog's corpus when it is present) never panic and stay within the analysis time
//! budget. (Runs in the normal suite; raise PROPTEST_CASES for longer runs.)

#[path = "common/corpus.rs"]
mod corpus;

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use preagg_proxy::outcome::Reason;
use preagg_proxy::rules;
use preagg_proxy::sql::rule::Rule;
use preagg_proxy::sql::{self, Context};
use proptest::prelude::*;

/// Budget given to the analysis, and the slack allowed on top (a debug build, a busy machine).
const BUDGET: Duration = Duration::from_millis(100);
const SLACK: Duration = Duration::from_millis(400);

fn rules() -> Vec<Arc<Rule>> {
    rules::load_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("rules")).unwrap().into_iter().map(Arc::new).collect()
}

fn check(rules: &[Arc<Rule>], text: &str) -> Result<(), TestCaseError> {
    let started = Instant::now();
    let result = sql::analyze(rules, text, &Context::default(), BUDGET);
    let elapsed = started.elapsed();
    prop_assert!(elapsed < BUDGET + SLACK, "analysis took {elapsed:?}");
    if let Ok(analysis) = result {
        for found in &analysis.found {
            prop_assert!(text.get(found.occurrence.body.clone()).is_some(), "body range must be a valid cut");
        }
    } else if let Err(reason) = result {
        prop_assert!(Reason::ALL.contains(&reason));
    }
    Ok(())
}

#[derive(Debug, Clone)]
enum Mutation {
    Delete(usize, usize),
    Insert(usize, String),
    Duplicate(usize, usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<usize>(), 0usize..40).prop_map(|(a, n)| Mutation::Delete(a, n)),
        (
            any::<usize>(),
            prop_oneof![
                Just("(".to_string()),
                Just(")".to_string()),
                Just("'".to_string()),
                Just(" SELECT ".to_string()),
                Just(",".to_string()),
                Just("`".to_string()),
                Just("{".to_string()),
                Just("/*".to_string()),
                "[ -~]{0,12}",
                "\\PC{0,4}"
            ]
        )
            .prop_map(|(a, s)| Mutation::Insert(a, s)),
        (any::<usize>(), 1usize..200).prop_map(|(a, n)| Mutation::Duplicate(a, n)),
    ]
}

fn apply(text: &str, mutations: &[Mutation]) -> String {
    let mut bytes = text.as_bytes().to_vec();
    for m in mutations {
        let len = bytes.len().max(1);
        match m {
            Mutation::Delete(at, n) => {
                let at = at % len;
                let end = (at + n).min(bytes.len());
                bytes.drain(at.min(end)..end);
            }
            Mutation::Insert(at, s) => {
                let at = at % len;
                bytes.splice(at.min(bytes.len())..at.min(bytes.len()), s.bytes());
            }
            Mutation::Duplicate(at, n) => {
                let at = at % len;
                let end = (at + n).min(bytes.len());
                let copy = bytes[at.min(end)..end].to_vec();
                bytes.splice(end..end, copy);
            }
        }
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_text_never_panics(text in "\\PC{0,300}") {
        let rules = rules();
        check(&rules, &text)?;
        check(&rules, &format!("SELECT a FROM (SELECT x FROM events WHERE '$feature_flag_called' {text}) GROUP BY a"))?;
    }

    #[test]
    fn mutated_own_queries_never_panic((file, mutations) in mutated()) {
        let shapes = corpus::shapes();
        check(&rules(), &apply(&shapes[file.index(shapes.len())].1, &mutations))?;
    }
}

/// A file (by index) and the mutations applied to it.
fn mutated() -> impl Strategy<Value = (proptest::sample::Index, Vec<Mutation>)> {
    (any::<proptest::sample::Index>(), proptest::collection::vec(mutation(), 1..6))
}

/// Mutations of every query of PostHog's corpus (redactions replaced).
#[test]
fn mutated_corpus_queries_never_panic() {
    let Some(files) = corpus::posthog() else { return };
    let texts: Vec<String> = files.iter().map(|(_, t)| corpus::unredacted(t, corpus::START, corpus::END)).collect();
    let rules = rules();
    let mut runner =
        proptest::test_runner::TestRunner::new(proptest::test_runner::contextualize_config(ProptestConfig {
            cases: 256,
            ..ProptestConfig::default()
        }));
    let result =
        runner.run(&mutated(), |(file, mutations)| check(&rules, &apply(&texts[file.index(texts.len())], &mutations)));
    if let Err(e) = result {
        panic!("{e}");
    }
}

#[test]
fn deep_nesting_is_refused_within_the_budget() {
    let rules = rules();
    let deep = format!(
        "SELECT {}1{} AS entity_id FROM events WHERE '$feature_flag_called' = '' GROUP BY entity_id",
        "(".repeat(5000),
        ")".repeat(5000)
    );
    let started = Instant::now();
    let result = sql::analyze(&rules, &deep, &Context::default(), BUDGET);
    assert!(result.is_err());
    assert!(started.elapsed() < BUDGET + SLACK, "{:?}", started.elapsed());
    let wide =
        format!("SELECT * FROM ({}) WHERE '$feature_flag_called'", "(SELECT 1) UNION ALL ".repeat(3000) + "(SELECT 1)");
    let started = Instant::now();
    let _ = sql::analyze(&rules, &wide, &Context::default(), BUDGET);
    assert!(started.elapsed() < BUDGET + SLACK, "{:?}", started.elapsed());
}
