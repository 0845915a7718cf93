//! Rule files: every `*.toml` of the rules directory read and validated into a
//! [`Rule`](crate::sql::rule::Rule).

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use crate::sql::rule::{Rule, RuleError, field_error, parse_rule};

/// Loads every `*.toml` file of `dir`, in name order. Rule names must be unique.
pub fn load_dir(dir: &Path) -> Result<Vec<Rule>, RuleError> {
    let dir_error = |message: String| RuleError::Dir { dir: dir.to_path_buf(), message };
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| dir_error(e.to_string()))?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    let mut rules = Vec::new();
    let mut names = HashSet::new();
    for file in files {
        let rule = load_file(&file)?;
        if !names.insert(rule.name.clone()) {
            return Err(field_error(&file, "name", format!("another rule file already uses the name `{}`", rule.name)));
        }
        rules.push(rule);
    }
    Ok(rules)
}

/// Loads and validates one rule file.
pub fn load_file(file: &Path) -> Result<Rule, RuleError> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| RuleError::File { file: file.to_path_buf(), message: e.to_string() })?;
    parse_rule(&text, file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_rules_load() {
        let rules = load_dir(Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/rules"))).unwrap();
        assert!(rules.iter().any(|r| r.name == "experiment_exposures"));
    }
}
