//! The PostHog corpus, read in place from `../shared/corpus/posthog` (or `PREAGG_CORPUS_DIR`).

use std::path::PathBuf;

/// Directory of the corpus.
pub fn dir() -> PathBuf {
    std::env::var_os("PREAGG_CORPUS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/corpus/posthog"))
}

/// The first and last instant substituted for the corpus' timestamp redactions.
pub const START: &str = "2020-01-01 09:57:00.000000";
/// See [`START`].
pub const END: &str = "2020-01-15 14:30:00.000000";

/// A corpus query with its redactions (`'today'`, `'explicit_redacted_timestamp'`) replaced by
/// real timestamps, as the corpus README says.
pub fn unredacted(text: &str, start: &str, end: &str) -> String {
    text.replace("toDateTime64('today', 6, 'UTC')", &format!("toDateTime64('{start}', 6, 'UTC')"))
        .replace("toDateTime64('explicit_redacted_timestamp', 6, 'UTC')", &format!("toDateTime64('{end}', 6, 'UTC')"))
}

/// Every corpus file: (file name, original text). Panics if the corpus is missing: the tests
/// depend on it.
pub fn files() -> Vec<(String, String)> {
    let dir = dir();
    let mut files: Vec<(String, String)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("the corpus must be at {} (or set PREAGG_CORPUS_DIR): {e}", dir.display()))
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "sql"))
        .map(|p| {
            (p.file_name().unwrap_or_default().to_string_lossy().into_owned(), std::fs::read_to_string(&p).unwrap())
        })
        .collect();
    files.sort();
    assert!(files.len() >= 9, "expected the 9 corpus files in {}", dir.display());
    files
}
