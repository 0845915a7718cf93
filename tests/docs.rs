//! The README documents every configuration key and every pass-through reason code, and the files
//! it and the performance history point to exist.

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
    for document in ["README.md", "docs/performance-history.md"] {
        let text = std::fs::read_to_string(format!("{ROOT}/{document}")).unwrap();
        let named = named_files(&text);
        assert!(named.len() > 10, "{document} names only {named:?}");
        for path in named {
            assert!(std::path::Path::new(ROOT).join(path).is_file(), "{document} names {path}, which does not exist");
        }
    }
}
