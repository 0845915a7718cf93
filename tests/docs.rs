//! The README documents every configuration key and every pass-through reason code, the example
//! configuration file lists every key, and the files the README and the documents in `docs/` point
//! to exist.

use preagg_proxy::config::KEYS;
use preagg_proxy::outcome::Reason;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn readme() -> String {
    std::fs::read_to_string(format!("{ROOT}/README.md")).unwrap()
}

#[test]
fn every_configuration_key_is_documented() {
    let readme = readme();
    for key in KEYS {
        assert!(readme.contains(&format!("| `{}` |", key.name)), "README lacks configuration key `{}`", key.name);
    }
}

#[test]
fn every_reason_code_is_documented() {
    let readme = readme();
    for reason in Reason::ALL {
        assert!(readme.contains(&format!("`{}`", reason.as_str())), "README lacks reason code `{reason}`");
    }
}

/// Every key appears in `preagg-proxy.example.toml`, set (`key = ...`) or commented out
/// (`# key = ...`), so that the file a user copies names everything they can set.
#[test]
fn every_configuration_key_is_in_the_example_file() {
    let example = std::fs::read_to_string(format!("{ROOT}/preagg-proxy.example.toml")).unwrap();
    for key in KEYS {
        let set = format!("{} =", key.name);
        let commented = format!("# {} =", key.name);
        assert!(
            example.lines().map(str::trim_start).any(|line| line.starts_with(&set) || line.starts_with(&commented)),
            "preagg-proxy.example.toml lacks configuration key `{}`",
            key.name
        );
    }
}

/// Paths under `bench/results/` and `docs/` that a text names.
fn named_files(text: &str) -> Vec<&str> {
    let mut named = Vec::new();
    for prefix in ["bench/results/", "docs/"] {
        for (start, _) in text.match_indices(prefix) {
            let rest = &text[start + prefix.len()..];
            let len = rest.find(|c: char| !(c.is_ascii_alphanumeric() || "._+-".contains(c))).unwrap_or(rest.len());
            let path = &text[start..start + prefix.len() + len];
            if path.ends_with(".md") || path.ends_with(".png") {
                named.push(path);
            }
        }
    }
    named
}

#[test]
fn every_report_and_document_named_exists() {
    // The least each document names: a count far below it means the scan no longer finds the
    // names (a changed prefix or spelling), not that the document shrank.
    let documents = [
        ("README.md", 5),
        ("docs/architecture.md", 1),
        ("docs/performance.md", 10),
        ("docs/performance-history.md", 10),
    ];
    for (document, least) in documents {
        let text = std::fs::read_to_string(format!("{ROOT}/{document}")).unwrap();
        let named = named_files(&text);
        assert!(named.len() >= least, "{document} names only {named:?}");
        for path in named {
            assert!(std::path::Path::new(ROOT).join(path).is_file(), "{document} names {path}, which does not exist");
        }
    }
}
