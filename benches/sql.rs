//! Criterion benchmarks of the pure SQL path: the cost of analysing and rewriting each corpus
//! query, and of dismissing a query that is not an experiment query.
//!
//! Run: `cargo bench --bench sql` (figures in the README).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use preagg_proxy::preagg::plan;
use preagg_proxy::rules;
use preagg_proxy::sql::rewrite::{self, Target};
use preagg_proxy::sql::rule::Rule;
use preagg_proxy::sql::splice::{self, Edit};
use preagg_proxy::sql::window::ReadyJob;
use preagg_proxy::sql::{self, Context};

fn corpus() -> Vec<(String, String)> {
    let dir = std::env::var_os("PREAGG_CORPUS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/corpus/posthog"));
    let mut files: Vec<(String, String)> = std::fs::read_dir(&dir)
        .expect("corpus directory")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "sql"))
        .map(|p| {
            let text = std::fs::read_to_string(&p)
                .expect("corpus file")
                .replace("toDateTime64('today', 6, 'UTC')", "toDateTime64('2020-01-01 09:57:00.000000', 6, 'UTC')")
                .replace(
                    "toDateTime64('explicit_redacted_timestamp', 6, 'UTC')",
                    "toDateTime64('2020-01-15 14:30:00.000000', 6, 'UTC')",
                );
            (p.file_stem().unwrap_or_default().to_string_lossy().into_owned(), text)
        })
        .collect();
    files.sort();
    files
}

/// Analysis plus a full rewrite with every window served: the request path's CPU work.
fn analyze_and_rewrite(rules: &[Arc<Rule>], text: &str) -> usize {
    let Ok(analysis) = sql::analyze(rules, text, &Context::default(), Duration::from_secs(1)) else { return 0 };
    let now = 1_580_515_200_000_000; // 2020-02-01
    let target =
        Target { database: "default".into(), table: "experiment_exposures_preaggregated".into(), cluster: false };
    let edits: Vec<Edit> = analysis
        .found
        .iter()
        .map(|f| {
            let occ = &f.occurrence;
            let ready: Vec<ReadyJob> = plan::grid(occ.range.0, occ.range.1)
                .into_iter()
                .map(|w| ReadyJob { id: uuid_like(w.start), window: w, rows: 1000 })
                .collect();
            let p = plan::plan(occ.range, &ready, now, 7_200_000_000);
            let types: Vec<String> = occ.stored_columns().iter().map(|_| "String".to_string()).collect();
            let body = rewrite::replacement(text, occ, &p.served, &p.raw, &types, &target).expect("rewrite");
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
    let files = corpus();
    let mut group = c.benchmark_group("analyze_and_rewrite");
    for (name, text) in files.iter().filter(|(n, _)| n.starts_with('0')) {
        group.throughput(Throughput::Bytes(text.len() as u64));
        group.bench_function(name.as_str(), |b| b.iter(|| analyze_and_rewrite(&rules, std::hint::black_box(text))));
    }
    group.finish();
    let mut group = c.benchmark_group("dismiss_non_experiment");
    for (name, text) in files.iter().filter(|(n, _)| n.starts_with("other_")) {
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
