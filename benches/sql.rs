//! Criterion benchmarks of the pure SQL path: the cost of analysing and rewriting each query (the
//! project's own in PostHog's shapes, and PostHog's corpus when it is present), and of dismissing
//! a query that is not an experiment query.
//!
//! Run: `cargo bench --bench sql` (figures in the README).

#[path = "../tests/common/corpus.rs"]
mod corpus;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use preagg_proxy::preagg::plan;
use preagg_proxy::rules;
use preagg_proxy::sql::rewrite::{self, Freshness, Target};
use preagg_proxy::sql::rule::Rule;
use preagg_proxy::sql::splice::{self, Edit};
use preagg_proxy::sql::window::ReadyJob;
use preagg_proxy::sql::{self, Context};

/// The queries measured: the project's own in PostHog's shapes (`shapes/<name>`), and PostHog's
/// corpus by file name when it is present, redactions replaced.
fn queries() -> Vec<(String, String)> {
    let own = corpus::shapes().into_iter().map(|(name, text)| (format!("shapes/{name}"), text));
    let posthog = corpus::posthog().unwrap_or_default().into_iter().map(|(name, text)| {
        let text = corpus::unredacted(&text, corpus::START, corpus::END);
        (name, text)
    });
    own.chain(posthog).map(|(name, text)| (name.trim_end_matches(".sql").to_string(), text)).collect()
}

/// Analysis plus a full rewrite with every window served: the request path's CPU work.
fn analyze_and_rewrite(rules: &[Arc<Rule>], text: &str) -> usize {
    let Ok(analysis) = sql::analyze(rules, text, &Context::default(), Duration::from_secs(1)) else { return 0 };
    let now = 1_793_491_200_000_000; // 2026-11-01: every window of the own shapes and the corpus sealed
    let target =
        Target { database: "default".into(), table: "experiment_exposures_preaggregated".into(), cluster: None };
    let edits: Vec<Edit> = analysis
        .found
        .iter()
        .map(|f| {
            let occ = &f.occurrence;
            let ready: Vec<ReadyJob> = plan::grid(occ.range.0, occ.range.1)
                .into_iter()
                .map(|w| ReadyJob { id: uuid_like(w.start), window: w, rows: 1000, built_at: now })
                .collect();
            let p = plan::plan(occ.range, &ready, now, 7_200_000_000);
            let types: Vec<String> = occ.stored_columns().iter().map(|_| "String".to_string()).collect();
            let body = rewrite::replacement(
                text,
                occ,
                &p.served,
                &p.raw,
                &types,
                &target,
                Some(Freshness { margin: 300_000_000 }),
            )
            .expect("rewrite");
            Edit::new(occ.body.clone(), body)
        })
        .collect();
    splice::apply(text, &edits).map(|s| s.len()).unwrap_or(0)
}

fn uuid_like(n: i64) -> String {
    format!("{:08x}-0000-4000-8000-{:012x}", n >> 32, n & 0xffff_ffff_ffff)
}

fn benches(c: &mut Criterion) {
    let rules: Vec<Arc<Rule>> = rules::load_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("rules"))
        .expect("rules")
        .into_iter()
        .map(Arc::new)
        .collect();
    let files = queries();
    let mut group = c.benchmark_group("analyze_and_rewrite");
    let other = |name: &str| name.trim_start_matches("shapes/").starts_with("other_");
    for (name, text) in files.iter().filter(|(n, _)| !other(n)) {
        group.throughput(Throughput::Bytes(text.len() as u64));
        group.bench_function(name.as_str(), |b| b.iter(|| analyze_and_rewrite(&rules, std::hint::black_box(text))));
    }
    group.finish();
    let mut group = c.benchmark_group("dismiss_non_experiment");
    for (name, text) in files.iter().filter(|(n, _)| other(n)) {
        group.throughput(Throughput::Bytes(text.len() as u64));
        group.bench_function(format!("prefilter/{name}"), |b| {
            b.iter(|| sql::prefilter(&rules, std::hint::black_box(text)).is_err())
        });
        group.bench_function(format!("analyze/{name}"), |b| {
            b.iter(|| {
                sql::analyze(&rules, std::hint::black_box(text), &Context::default(), Duration::from_secs(1)).is_err()
            })
        });
    }
    group.finish();
}

criterion_group!(sql_benches, benches);
criterion_main!(sql_benches);
