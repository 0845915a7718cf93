//! The queries the tests read: the project's own, in the shapes PostHog prints
//! (`fixtures/shapes/`, always there), and PostHog's real corpus, read in place from
//! `../shared/corpus/posthog` (or `PREAGG_CORPUS_DIR`), which a fresh clone does not have.
//!
//! The default suite runs on the own shapes. The tests over the real corpus run whenever it is
//! present; without it they are skipped with a line saying so, except under CI, where a missing
//! corpus fails them ([`posthog`]).

#![allow(dead_code)]

use std::io::Write;
use std::path::{Path, PathBuf};

/// Every `.sql` file of `dir`, sorted by name: (file name, text).
fn sql_files(dir: &Path) -> std::io::Result<Vec<(String, String)>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|x| x == "sql") {
            let name = path.file_name().unwrap_or_default().to_string_lossy().into_owned();
            files.push((name, std::fs::read_to_string(&path)?));
        }
    }
    files.sort();
    Ok(files)
}

/// The text of the file whose name starts with `prefix` (exactly one must).
pub fn find(files: &[(String, String)], prefix: &str) -> String {
    let found: Vec<_> = files.iter().filter(|(n, _)| n.starts_with(prefix)).collect();
    assert_eq!(found.len(), 1, "one file must start with {prefix}: {found:?}");
    found[0].1.clone()
}

/// Directory of the project's own queries in PostHog's shapes.
pub fn shapes_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/shapes")
}

/// The project's own queries (`fixtures/shapes/*.sql`): experiment queries in each shape of the
/// corpus and `other_*` queries that must pass through.
pub fn shapes() -> Vec<(String, String)> {
    let dir = shapes_dir();
    let files = sql_files(&dir).unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()));
    assert!(files.len() >= 7, "expected the own shapes in {}", dir.display());
    files
}

/// The own shape whose file name starts with `prefix`.
pub fn shape(prefix: &str) -> String {
    find(&shapes(), prefix)
}

/// Team, flag and bounds the own shapes are written with (the retention shape's bounds are
/// whole seconds, `toDateTime('...', 'UTC')`, as PostHog prints a retention metric's).
pub mod own {
    /// The team id.
    pub const TEAM: &str = "4242";
    /// The flag key, quoted.
    pub const FLAG: &str = "'signup-flow-v2'";
    /// The lower bound of the `toDateTime64` shapes.
    pub const START: &str = "2026-10-02 08:20:00.000000";
    /// The upper bound of the `toDateTime64` shapes.
    pub const END: &str = "2026-10-12 17:45:00.000000";
    /// The lower bound of the retention shape.
    pub const START_SECONDS: &str = "2026-10-02 06:00:00";
    /// The upper bound of the retention shape.
    pub const END_SECONDS: &str = "2026-10-12 18:00:00";
}

/// Directory of PostHog's corpus.
pub fn dir() -> PathBuf {
    std::env::var_os("PREAGG_CORPUS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/corpus/posthog"))
}

/// Whether this is a CI run, read as insta reads it: `CI` set to anything but `false`, `0` or
/// nothing. There a missing corpus or snapshot is a failure, not a skip.
pub fn ci() -> bool {
    !matches!(std::env::var("CI").ok().as_deref(), None | Some("" | "false" | "0"))
}

/// PostHog's corpus files, (file name, original text), for a test over the real corpus. `None`
/// when the corpus is absent: the test is skipped, with a line on stderr naming it (written past
/// the test harness' capture, so `cargo test` shows it); under CI absence fails the test instead.
pub fn posthog() -> Option<Vec<(String, String)>> {
    let dir = dir();
    if !dir.is_dir() {
        assert!(!ci(), "CI: the tests over PostHog's corpus need it at {} (or PREAGG_CORPUS_DIR)", dir.display());
        let test = match std::thread::current().name() {
            Some(name) if name != "main" => name.to_string(),
            _ => "the corpus queries".to_string(),
        };
        let _ = writeln!(
            std::io::stderr(),
            "skipped {test}: no corpus at {} (set PREAGG_CORPUS_DIR; required under CI=true)",
            dir.display()
        );
        return None;
    }
    let files = sql_files(&dir).unwrap_or_else(|e| panic!("reading the corpus at {}: {e}", dir.display()));
    assert!(files.len() >= 12, "expected the 12 corpus files in {}", dir.display());
    Some(files)
}

/// The first and last instant substituted for the corpus' timestamp redactions.
pub const START: &str = "2020-01-01 09:57:00.000000";
/// See [`START`].
pub const END: &str = "2020-01-15 14:30:00.000000";

/// The instant substituted for `'today'` where it is the only redaction: in 07 and 08 it ends a
/// range that starts at a concrete `2024-01-01`.
pub const TODAY: &str = "2024-01-15 14:30:00.000000";

/// A corpus query with its redactions replaced by real timestamps, as the corpus README says:
/// `'today'` by `start` and `'explicit_redacted_timestamp'` by `end` where both bound the range
/// (01-03), a lone `'today'` (the end of the range) by [`TODAY`].
pub fn unredacted(text: &str, start: &str, end: &str) -> String {
    let today = if text.contains("'explicit_redacted_timestamp'") { start } else { TODAY };
    text.replace("toDateTime64('today', 6, 'UTC')", &format!("toDateTime64('{today}', 6, 'UTC')"))
        .replace("toDateTime64('explicit_redacted_timestamp', 6, 'UTC')", &format!("toDateTime64('{end}', 6, 'UTC')"))
}
