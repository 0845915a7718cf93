//! Rules: what a rewritable subquery looks like and how its columns re-aggregate, read from a
//! rule file's text (the [`rules`](crate::rules) module finds and reads the files).
//!
//! A rule is data (`rules/*.toml`), loaded and validated at start. Patterns are ClickHouse
//! expressions in which `$name` stands for any sub-expression (the same name must bind equal
//! expressions everywhere); column references are written `<source table>.<column>` and match
//! however the query spells that column. Merge templates are expressions over stored columns (by
//! their rule names) and pattern variables.

use std::collections::{BTreeSet, HashSet};
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sqlparser::ast::Expr;
use sqlparser::dialect::ClickHouseDialect;
use sqlparser::parser::Parser;
use sqlparser::tokenizer::Token;

use super::tokens::Tokens;

/// How the proxy treats experiment queries: for every query (the `mode` key) or for one rule's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Serve matched subqueries from preaggregated windows.
    Rewrite,
    /// Answer with the original; compare the rewrite in the background.
    Shadow,
    /// Never rewrite; plain pass-through.
    Off,
}

/// A rule file that cannot be used; the message names the file and the field.
#[derive(Debug, thiserror::Error)]
pub enum RuleError {
    /// The rules directory cannot be read.
    #[error("rules directory {dir}: {message}")]
    Dir {
        /// The directory.
        dir: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A file is unreadable or not valid TOML for a rule.
    #[error("rule file {file}: {message}")]
    File {
        /// The rule file.
        file: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A field has an invalid value.
    #[error("rule file {file}: field `{field}`: {message}")]
    Field {
        /// The rule file.
        file: PathBuf,
        /// The field, as a path such as `column[2].forms[0].query`.
        field: String,
        /// What is wrong.
        message: String,
    },
}

/// A loaded, validated rule.
#[derive(Debug, Clone)]
pub struct Rule {
    /// Unique rule name (joins the query hash).
    pub name: String,
    /// Version; bump it when the rule's meaning changes (joins the query hash).
    pub version: u32,
    /// Human description.
    pub description: String,
    /// File the rule came from.
    pub file: PathBuf,
    /// Strings of which one must occur in a query (and in a candidate body) before it is
    /// tokenized.
    pub prefilter: Vec<String>,
    /// Per-rule mode override (`shadow` to trial one rule in production).
    pub mode: Option<Mode>,
    /// The table the pattern reads.
    pub source: SourceTable,
    /// The table that holds preaggregates.
    pub target: TargetTable,
    /// Conjuncts the WHERE must contain, besides the team equality and the time bounds.
    pub predicates: Vec<Predicate>,
    /// Output columns other than the entity key.
    pub columns: Vec<ColumnRule>,
    /// Per-row group keys a body may group by beside the entity.
    pub keys: Vec<GroupKey>,
}

/// A per-row group key beside the entity (PostHog's data-warehouse `exposure_identifier`): a
/// composite key splits by time exactly, so its value is stored per window and grouped by again
/// when the windows are read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupKey {
    /// Output alias in the query, and stored column name.
    pub name: String,
    /// ClickHouse type of the stored column.
    pub stored_type: String,
}

/// The source table of a rule.
#[derive(Debug, Clone)]
pub struct SourceTable {
    /// Table name as written in FROM (optionally aliased).
    pub table: String,
    /// Raw time column; bounds must compare it (or `toTimeZone` of it) with literals.
    pub time_column: String,
    /// Timezone of the time column's type (reads bare string bounds).
    pub time_column_timezone: chrono_tz::Tz,
    /// Fractional-second digits of the time column (0 to 6).
    pub time_column_precision: u32,
    /// Team column; the WHERE must test it for equality with an integer literal.
    pub team_column: String,
    /// Column that records when a row was ingested (PostHog's `inserted_at`, set by ClickHouse):
    /// rows ingested after a window was built are read again from the source. `None`: stored
    /// windows hold only what was there at build time.
    pub ingestion_column: Option<String>,
    /// The tables whose mutations (deletions, updates) change what the source holds: the source
    /// itself, and where it is a `Distributed` table the local tables under it (PostHog's
    /// `sharded_events`). A mutation of one since a build makes the build stale.
    pub mutation_tables: Vec<String>,
    /// The source columns an entity is resolved from (PostHog's `distinct_id` and `person_id`).
    /// When a body joins other relations to find its entity (the person overrides), windows store
    /// rows per value of these columns instead of per entity, and the joins run when the windows
    /// are read: a merge of persons after a build is in the next answer. Empty: bodies with joins
    /// are served only with `exact_under_change = false`.
    pub identity_columns: Vec<IdentityColumn>,
}

/// A source column stored per window so that an entity can be resolved at read time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityColumn {
    /// Column name, in the source and in the preaggregate table.
    pub name: String,
    /// ClickHouse type of the stored column: the source column's type.
    pub stored_type: String,
}

/// The preaggregate table of a rule.
#[derive(Debug, Clone)]
pub struct TargetTable {
    /// Table name (in the configured preaggregate database).
    pub table: String,
    /// Output alias of the GROUP BY key (stored as String).
    pub entity: String,
}

/// A required predicate.
#[derive(Debug, Clone)]
pub struct Predicate {
    /// Name for messages.
    pub name: String,
    /// Accepted spellings.
    pub patterns: Vec<Pattern>,
}

/// An output column the rule can re-aggregate.
#[derive(Debug, Clone)]
pub struct ColumnRule {
    /// Output alias in the query, and stored column name.
    pub name: String,
    /// ClickHouse type of the stored column.
    pub stored_type: String,
    /// How to compute the stored value when the query does not project this column but a merge
    /// needs it (a pattern over variables bound elsewhere, e.g. `min($t)`).
    pub derive: Option<Template>,
    /// Accepted query forms with their merges.
    pub forms: Vec<Form>,
    /// Expressions over this column's aggregate that a query may project under any alias
    /// (`toDateOrNull(toString(min($t))) AS day`): never stored themselves, they are computed
    /// after the merge from the stored column.
    pub outputs: Vec<Form>,
}

/// One accepted spelling of a column and how it re-aggregates.
#[derive(Debug, Clone)]
pub struct Form {
    /// Pattern the projected expression must match.
    pub query: Pattern,
    /// Re-aggregation over stored columns.
    pub merge: Template,
}

/// A parsed pattern expression.
#[derive(Debug, Clone)]
pub struct Pattern {
    /// Source text.
    pub text: String,
    /// Parsed form; `$name` placeholders are variables.
    pub expr: Expr,
}

/// An output template: an expression whose `$name` tokens are replaced by bound sub-expressions
/// and whose stored-column words are replaced by their inner names.
#[derive(Debug, Clone)]
pub struct Template {
    /// Source text.
    pub text: String,
}

impl Template {
    /// Renders the template: `$var` tokens via `var`, unquoted words naming stored columns via
    /// `column`; all other bytes are copied.
    pub fn render(
        &self,
        mut var: impl FnMut(&str) -> Option<String>,
        mut column: impl FnMut(&str) -> Option<String>,
    ) -> Option<String> {
        let tokens = Tokens::new(&self.text).ok()?;
        let mut out = String::with_capacity(self.text.len() + 32);
        let mut copied = 0;
        for (i, tok) in tokens.toks.iter().enumerate() {
            let is_column = tokens.get(i + 1) != Some(&Token::LParen)
                && tokens.get(i + 1) != Some(&Token::Period)
                && (i == 0 || tokens.get(i - 1) != Some(&Token::Period));
            let replacement = match &tok.token {
                Token::Placeholder(p) => Some(var(p.strip_prefix('$')?)?),
                Token::Word(w) if w.quote_style.is_none() && is_column => column(&w.value),
                _ => None,
            };
            if let Some(replacement) = replacement {
                out.push_str(&self.text[copied..tok.bytes.start]);
                out.push_str(&replacement);
                copied = tok.bytes.end;
            }
        }
        out.push_str(&self.text[copied..]);
        Some(out)
    }

    /// Variables (`$name`) used by the template.
    pub fn variables(&self) -> BTreeSet<String> {
        placeholders(&self.text)
    }
}

fn placeholders(text: &str) -> BTreeSet<String> {
    Tokens::new(text)
        .map(|t| {
            t.toks
                .iter()
                .filter_map(|tok| match &tok.token {
                    Token::Placeholder(p) => p.strip_prefix('$').map(str::to_string),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default()
}

impl Rule {
    /// The column rule named `name`.
    pub fn column(&self, name: &str) -> Option<&ColumnRule> {
        self.columns.iter().find(|c| c.name == name)
    }

    /// The group key named `name`.
    pub fn key(&self, name: &str) -> Option<&GroupKey> {
        self.keys.iter().find(|k| k.name == name)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    name: String,
    version: u32,
    #[serde(default)]
    description: String,
    prefilter: Vec<String>,
    mode: Option<Mode>,
    source: SourceFile,
    target: TargetFile,
    #[serde(default)]
    predicate: Vec<PredicateFile>,
    column: Vec<ColumnFile>,
    #[serde(default)]
    key: Vec<KeyFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFile {
    name: String,
    #[serde(rename = "type")]
    stored_type: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SourceFile {
    table: String,
    time_column: String,
    time_column_timezone: String,
    time_column_precision: u32,
    team_column: String,
    ingestion_column: Option<String>,
    #[serde(default)]
    mutation_tables: Vec<String>,
    #[serde(default)]
    identity_columns: Vec<IdentityColumnFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct IdentityColumnFile {
    name: String,
    #[serde(rename = "type")]
    stored_type: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TargetFile {
    table: String,
    entity: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PredicateFile {
    name: String,
    patterns: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ColumnFile {
    name: String,
    #[serde(rename = "type")]
    stored_type: String,
    derive: Option<String>,
    forms: Vec<FormFile>,
    #[serde(default)]
    outputs: Vec<FormFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FormFile {
    query: String,
    merge: String,
}

pub(crate) fn field_error(file: &Path, field: impl Into<String>, message: impl Into<String>) -> RuleError {
    RuleError::Field { file: file.to_path_buf(), field: field.into(), message: message.into() }
}

/// Parses and validates rule text; `file` names it in errors.
pub fn parse_rule(text: &str, file: &Path) -> Result<Rule, RuleError> {
    let raw: RuleFile =
        toml::from_str(text).map_err(|e| RuleError::File { file: file.to_path_buf(), message: e.to_string() })?;
    let err = |field: &str, message: String| field_error(file, field, message);

    identifier(&raw.name).map_err(|m| err("name", m))?;
    if raw.version == 0 {
        return Err(err("version", "must be 1 or more".into()));
    }
    if raw.prefilter.is_empty() || raw.prefilter.iter().any(String::is_empty) {
        return Err(err("prefilter", "needs at least one non-empty string".into()));
    }
    let s = &raw.source;
    identifier(&s.table).map_err(|m| err("source.table", m))?;
    identifier(&s.time_column).map_err(|m| err("source.time_column", m))?;
    identifier(&s.team_column).map_err(|m| err("source.team_column", m))?;
    if let Some(column) = &s.ingestion_column {
        identifier(column).map_err(|m| err("source.ingestion_column", m))?;
    }
    for (i, table) in s.mutation_tables.iter().enumerate() {
        identifier(table).map_err(|m| err(&format!("source.mutation_tables[{i}]"), m))?;
    }
    let mutation_tables = if s.mutation_tables.is_empty() { vec![s.table.clone()] } else { s.mutation_tables.clone() };
    let time_column_timezone: chrono_tz::Tz = s
        .time_column_timezone
        .parse()
        .map_err(|_| err("source.time_column_timezone", format!("`{}` is not a timezone", s.time_column_timezone)))?;
    if s.time_column_precision > 6 {
        return Err(err("source.time_column_precision", "must be between 0 and 6 (microseconds)".into()));
    }
    identifier(&raw.target.table).map_err(|m| err("target.table", m))?;
    identifier(&raw.target.entity).map_err(|m| err("target.entity", m))?;

    let mut predicates = Vec::new();
    for (i, p) in raw.predicate.iter().enumerate() {
        if p.patterns.is_empty() {
            return Err(err(&format!("predicate[{i}].patterns"), "needs at least one pattern".into()));
        }
        let patterns = p
            .patterns
            .iter()
            .enumerate()
            .map(|(j, text)| {
                let expr = parse_pattern(text).map_err(|m| err(&format!("predicate[{i}].patterns[{j}]"), m))?;
                Ok(Pattern { text: text.clone(), expr })
            })
            .collect::<Result<_, _>>()?;
        predicates.push(Predicate { name: p.name.clone(), patterns });
    }

    let column_names: HashSet<&str> = raw.column.iter().map(|c| c.name.as_str()).collect();
    if column_names.len() != raw.column.len() {
        return Err(err("column", "column names must be unique".into()));
    }
    if raw.column.is_empty() {
        return Err(err("column", "needs at least one column".into()));
    }
    let mut columns = Vec::new();
    for (i, c) in raw.column.iter().enumerate() {
        let field = |name: &str| format!("column[{i}].{name}");
        identifier(&c.name).map_err(|m| err(&field("name"), m))?;
        if c.name == raw.target.entity {
            return Err(err(&field("name"), "the entity key is not a column".into()));
        }
        if c.stored_type.trim().is_empty() {
            return Err(err(&field("type"), "is empty".into()));
        }
        if c.forms.is_empty() {
            return Err(err(&field("forms"), "needs at least one form".into()));
        }
        let derive = match &c.derive {
            Some(text) => {
                parse_pattern(text).map_err(|m| err(&field("derive"), m))?;
                Some(Template { text: text.clone() })
            }
            None => None,
        };
        let parse_forms = |list: &[FormFile], key: &str| -> Result<Vec<Form>, RuleError> {
            let mut forms = Vec::new();
            for (j, f) in list.iter().enumerate() {
                let expr = parse_pattern(&f.query).map_err(|m| err(&field(&format!("{key}[{j}].query")), m))?;
                let query = Pattern { text: f.query.clone(), expr };
                let merge = Template { text: f.merge.clone() };
                validate_merge(&merge, &query, &column_names)
                    .map_err(|m| err(&field(&format!("{key}[{j}].merge")), m))?;
                forms.push(Form { query, merge });
            }
            Ok(forms)
        };
        let forms = parse_forms(&c.forms, "forms")?;
        let outputs = parse_forms(&c.outputs, "outputs")?;
        columns.push(ColumnRule { name: c.name.clone(), stored_type: c.stored_type.clone(), derive, forms, outputs });
    }
    for (i, c) in columns.iter().enumerate() {
        // A form stores its own column; an output stores none, so every column it reads must be
        // derivable.
        let forms = c.forms.iter().map(|f| (f, Some(&c.name)));
        for (form, own) in forms.chain(c.outputs.iter().map(|f| (f, None))) {
            for needed in merge_columns(&form.merge, &column_names) {
                let target = columns.iter().find(|x| x.name == needed);
                if own != Some(&needed) && target.is_some_and(|t| t.derive.is_none()) {
                    return Err(err(
                        &format!("column[{i}].forms"),
                        format!("merge reads `{needed}`, which has no `derive` for queries that do not project it"),
                    ));
                }
            }
        }
    }

    // Identity columns and group keys are table columns beside the fixed ones and the rule's
    // columns: each needs a plain name no other stored column has, and a type.
    let mut taken: HashSet<String> = ["team_id", "job_id", "computed_at", "expires_at", raw.target.entity.as_str()]
        .iter()
        .map(|n| n.to_string())
        .chain(column_names.iter().map(|n| n.to_string()))
        .collect();
    let mut stored_column = |field: String, name: &str, stored_type: &str| -> Result<(), RuleError> {
        identifier(name).map_err(|m| err(&format!("{field}.name"), m))?;
        if !taken.insert(name.to_string()) {
            return Err(err(&format!("{field}.name"), format!("`{name}` names another stored column")));
        }
        if stored_type.trim().is_empty() {
            return Err(err(&format!("{field}.type"), "is empty".into()));
        }
        Ok(())
    };
    let mut identity_columns = Vec::new();
    for (i, c) in s.identity_columns.iter().enumerate() {
        stored_column(format!("source.identity_columns[{i}]"), &c.name, &c.stored_type)?;
        identity_columns.push(IdentityColumn { name: c.name.clone(), stored_type: c.stored_type.clone() });
    }
    let mut keys = Vec::new();
    for (i, k) in raw.key.iter().enumerate() {
        stored_column(format!("key[{i}]"), &k.name, &k.stored_type)?;
        keys.push(GroupKey { name: k.name.clone(), stored_type: k.stored_type.clone() });
    }

    Ok(Rule {
        name: raw.name,
        version: raw.version,
        description: raw.description,
        file: file.to_path_buf(),
        prefilter: raw.prefilter,
        mode: raw.mode,
        source: SourceTable {
            table: s.table.clone(),
            time_column: s.time_column.clone(),
            time_column_timezone,
            time_column_precision: s.time_column_precision,
            team_column: s.team_column.clone(),
            ingestion_column: s.ingestion_column.clone(),
            mutation_tables,
            identity_columns,
        },
        target: TargetTable { table: raw.target.table, entity: raw.target.entity },
        predicates,
        columns,
        keys,
    })
}

/// Parses a pattern expression, requiring the whole text to be one expression.
pub fn parse_pattern(text: &str) -> Result<Expr, String> {
    let dialect = ClickHouseDialect {};
    let mut parser = Parser::new(&dialect).try_with_sql(text).map_err(|e| e.to_string())?;
    let expr = parser.parse_expr().map_err(|e| e.to_string())?;
    if parser.peek_token().token != Token::EOF {
        return Err(format!("unexpected text after the expression: `{}`", parser.peek_token().token));
    }
    Ok(expr)
}

fn validate_merge(merge: &Template, query: &Pattern, columns: &HashSet<&str>) -> Result<(), String> {
    let bound = placeholders(&query.text);
    if let Some(unbound) = merge.variables().difference(&bound).next() {
        return Err(format!("uses `${unbound}`, which the query pattern does not bind"));
    }
    if merge_columns(merge, columns).is_empty() {
        return Err("reads no stored column".into());
    }
    let probe = merge.render(|_| Some("NULL".into()), |_| None).ok_or("does not tokenize")?;
    parse_pattern(&probe).map(|_| ())
}

/// Stored columns a merge template reads.
fn merge_columns(merge: &Template, columns: &HashSet<&str>) -> BTreeSet<String> {
    let mut used = BTreeSet::new();
    merge.render(
        |_| Some(String::new()),
        |word| {
            if columns.contains(word) {
                used.insert(word.to_string());
            }
            None
        },
    );
    used
}

fn identifier(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !s.starts_with(|c: char| c.is_ascii_digit());
    if ok { Ok(()) } else { Err(format!("`{s}` is not a plain identifier")) }
}

/// The rules shipped in `rules/`, for tests.
#[cfg(test)]
pub(crate) fn shipped_rules() -> Vec<Rule> {
    let text = include_str!("../../rules/experiment_exposures.toml");
    vec![parse_rule(text, Path::new("rules/experiment_exposures.toml")).expect("the shipped rule parses")]
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        name = "r"
        version = 1
        prefilter = ["x"]
        [source]
        table = "events"
        time_column = "timestamp"
        time_column_timezone = "UTC"
        time_column_precision = 6
        team_column = "team_id"
        [target]
        table = "t"
        entity = "entity_id"
        [[column]]
        name = "first"
        type = "DateTime64(6, 'UTC')"
        derive = "min($t)"
        forms = [{ query = "min($t)", merge = "min(first)" }]
        [[column]]
        name = "uuid"
        type = "UUID"
        forms = [{ query = "argMin($x, $t)", merge = "argMin(uuid, first)" }]
    "#;

    #[test]
    fn a_minimal_rule_loads_and_renders() {
        let rule = parse_rule(MINIMAL, Path::new("r.toml")).unwrap();
        let merge = &rule.column("uuid").unwrap().forms[0].merge;
        let out = merge.render(|_| None, |c| Some(format!("__{c}"))).unwrap();
        // Function names and qualified names are never column references.
        assert_eq!(out, "argMin(__uuid, __first)");
    }

    fn error_of(text: &str) -> String {
        parse_rule(text, Path::new("bad.toml")).unwrap_err().to_string()
    }

    #[test]
    fn errors_name_file_and_field() {
        let e = error_of(&MINIMAL.replace("\"min($t)\", merge", "\"min($t\", merge"));
        assert!(e.contains("bad.toml") && e.contains("column[0].forms[0].query"), "{e}");
        let e = error_of(&MINIMAL.replace("argMin(uuid, first)", "argMin(uuid, $nope)"));
        assert!(e.contains("column[1].forms[0].merge") && e.contains("$nope"), "{e}");
        let e = error_of(&MINIMAL.replace("time_column_timezone = \"UTC\"", "time_column_timezone = \"Mars/Base\""));
        assert!(e.contains("source.time_column_timezone"), "{e}");
        let e = error_of(&MINIMAL.replace("derive = \"min($t)\"\n", ""));
        assert!(e.contains("column[1].forms") && e.contains("derive"), "{e}");
        let identity = "team_column = \"team_id\"\n identity_columns = [{ name = \"uuid\", type = \"UUID\" }]";
        let e = error_of(&MINIMAL.replace("team_column = \"team_id\"", identity));
        assert!(e.contains("source.identity_columns[0].name") && e.contains("another stored column"), "{e}");
        let key = format!("{MINIMAL}\n[[key]]\nname = \"first\"\ntype = \"String\"\n");
        let e = error_of(&key);
        assert!(e.contains("key[0].name") && e.contains("another stored column"), "{e}");
        let e = error_of(&MINIMAL.replace("prefilter", "prefiltre"));
        assert!(e.contains("bad.toml") && e.contains("prefiltre"), "{e}");
    }
}
