//! The module graph points one way: each top-level module of `src/` names (as `crate::...`)
//! only modules below it in [`LAYERS`]. A new module must be placed in the list, and an import
//! that points up fails here.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Top-level modules, lowest first. Modules on one line may not name each other.
const LAYERS: &[&[&str]] = &[
    &["outcome", "metrics", "error", "log_lines"],
    &["http"],
    &["sql"],
    &["rules"],
    &["config"],
    &["clickhouse_http"],
    &["preagg"],
    &["shadow", "access_log"],
    &["proxy"],
    &["admin"],
    &["explain"],
    &["app"],
];

fn rank(module: &str) -> Option<usize> {
    LAYERS.iter().position(|layer| layer.contains(&module))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file belongs to (`None` for `lib.rs` and `main.rs`).
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let relative = file.strip_prefix(src).unwrap();
    let first = relative.components().next()?.as_os_str().to_string_lossy().into_owned();
    let name = first.trim_end_matches(".rs").to_string();
    (name != "lib" && name != "main").then_some(name)
}

/// Every `crate::NAME` a text names, with the line it is on.
fn crate_references(text: &str) -> Vec<(usize, String)> {
    let mut found = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let code = line.split("//").next().unwrap_or_default();
        for (at, _) in code.match_indices("crate::") {
            let preceded_by_word = code[..at].chars().next_back().is_some_and(|c| c.is_alphanumeric() || c == '_');
            if preceded_by_word {
                continue;
            }
            let rest = &code[at + "crate::".len()..];
            let name: String = rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect();
            if !name.is_empty() {
                found.push((number + 1, name));
            }
        }
    }
    found
}

/// `crate::{a, b}` groups, which [`crate_references`] would miss.
fn crate_groups(text: &str) -> usize {
    text.matches("crate::{").count()
}

#[test]
fn every_import_points_down_the_layers() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut upward: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for file in &files {
        let Some(module) = module_of(&src, file) else { continue };
        let from = rank(&module).unwrap_or_else(|| panic!("module `{module}` is not placed in LAYERS"));
        let text = std::fs::read_to_string(file).unwrap();
        assert_eq!(crate_groups(&text), 0, "{}: name each module in its own `use crate::...`", file.display());
        for (line, target) in crate_references(&text) {
            if target == module {
                continue;
            }
            let to = rank(&target)
                .unwrap_or_else(|| panic!("{}:{line}: `crate::{target}` is not in LAYERS", file.display()));
            if to >= from {
                upward.entry(module.clone()).or_default().push(format!("{}:{line} -> {target}", file.display()));
            }
        }
    }
    assert!(upward.is_empty(), "imports that point up or sideways: {upward:#?}");
}

#[test]
fn the_http_module_knows_no_clickhouse_and_no_configuration() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/http");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for (line, target) in crate_references(&text) {
            assert!(
                ["error", "log_lines", "metrics", "http"].contains(&target.as_str()),
                "{}:{line}: http names crate::{target}",
                file.display()
            );
        }
    }
}

#[test]
fn the_reference_scanner_sees_what_it_must() {
    let text = "use crate::sql::rule::Rule;\nlet x = crate::error::error_chain(e); // crate::app\nmy_crate::no";
    let found: Vec<String> = crate_references(text).into_iter().map(|(_, name)| name).collect();
    assert_eq!(found, ["sql", "error"]);
    assert_eq!(crate_groups("use crate::{a, b};"), 1);
}
