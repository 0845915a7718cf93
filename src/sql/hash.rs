//! The shape of an occurrence and its query hash.
//!
//! The shape is the body's canonical token stream: whitespace and comments dropped, clause
//! keywords upper-cased, the two bound conjuncts replaced by markers and the team literal by a
//! marker. The hash is sha256 over the shape, the rule's name and version, and the request context
//! that changes results (database, result-changing settings, and the user when preaggregates are
//! kept per user). Team and exact bounds stay out, so experiments with the same definition share
//! windows; the team is part of every job's key instead.

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};
use sqlparser::keywords::Keyword;
use sqlparser::tokenizer::Token;

use super::matcher::{Keying, Occurrence};
use super::rule::Rule;
use super::tokens::Tokens;

/// Context of a query that joins its hash.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct HashContext {
    /// The `database` the query runs in (unqualified tables resolve there); empty for the default.
    pub database: String,
    /// The ClickHouse user, when preaggregates are kept per user.
    pub user: Option<String>,
    /// The roles the request sets, when preaggregates are kept per user (hashed only when some
    /// are set, so that other hashes stay as they were).
    pub roles: Vec<String>,
    /// Settings that may change results.
    pub settings: BTreeMap<String, String>,
    /// Where the preaggregates live: jobs built into one database are not served from another.
    pub preagg_database: String,
}

/// Keywords whose case ClickHouse ignores and which never name a column in these bodies.
const CASE_INSENSITIVE: &[Keyword] = &[
    Keyword::SELECT,
    Keyword::FROM,
    Keyword::WHERE,
    Keyword::PREWHERE,
    Keyword::AS,
    Keyword::AND,
    Keyword::OR,
    Keyword::NOT,
    Keyword::GROUP,
    Keyword::BY,
    Keyword::LEFT,
    Keyword::RIGHT,
    Keyword::INNER,
    Keyword::OUTER,
    Keyword::FULL,
    Keyword::JOIN,
    Keyword::ON,
    Keyword::USING,
    Keyword::IN,
    Keyword::IS,
    Keyword::NULL,
    Keyword::DISTINCT,
    Keyword::HAVING,
    Keyword::ORDER,
    Keyword::LIMIT,
    Keyword::SETTINGS,
    Keyword::GLOBAL,
    Keyword::CASE,
    Keyword::WHEN,
    Keyword::THEN,
    Keyword::ELSE,
    Keyword::END,
    Keyword::BETWEEN,
    Keyword::LIKE,
    Keyword::ILIKE,
    Keyword::ASC,
    Keyword::DESC,
    Keyword::UNION,
    Keyword::ALL,
    Keyword::INTERVAL,
    Keyword::CROSS,
    Keyword::TRUE,
    Keyword::FALSE,
];

/// The canonical token stream of an occurrence's body.
pub fn shape(text: &str, tokens: &Tokens, occurrence: &Occurrence) -> String {
    let mut out: Vec<String> = Vec::new();
    let cuts = [(&occurrence.lower.conjunct, "<lower_bound>"), (&occurrence.upper.conjunct, "<upper_bound>")];
    for i in occurrence.body_tokens.clone() {
        let tok = &tokens.toks[i];
        if let Some((range, marker)) = cuts.iter().find(|(r, _)| r.start <= tok.bytes.start && tok.bytes.end <= r.end) {
            if tok.bytes.start == range.start {
                out.push((*marker).to_string());
            }
            continue;
        }
        if occurrence.team_tokens.contains(&i) {
            out.push("<team>".to_string());
            continue;
        }
        match &tok.token {
            Token::Word(w) if w.quote_style.is_none() && CASE_INSENSITIVE.contains(&w.keyword) => {
                out.push(w.value.to_ascii_uppercase())
            }
            _ => out.push(text[tok.bytes.clone()].to_string()),
        }
    }
    out.join(" ")
}

/// sha256 (hex) over the rule, the shape, what a stored row stands for and the context.
pub fn query_hash(rule: &Rule, shape: &str, keying: &Keying, context: &HashContext) -> String {
    let mut hasher = Sha256::new();
    let mut field = |name: &str, value: &str| {
        hasher.update(name.as_bytes());
        hasher.update([0x1f]);
        hasher.update((value.len() as u64).to_le_bytes());
        hasher.update(value.as_bytes());
    };
    field("rule", &rule.name);
    field("version", &rule.version.to_string());
    field("database", &context.database);
    field("user", context.user.as_deref().unwrap_or(""));
    for role in &context.roles {
        field("role", role);
    }
    field("preagg_database", &context.preagg_database);
    field("preagg_table", &rule.target.table);
    for (name, value) in &context.settings {
        field(&format!("setting.{name}"), value);
    }
    field("shape", shape);
    // Rows per identity and rows per entity are different jobs (hashed only for identity, so that
    // other hashes stay as they were).
    if let Keying::Identity(_) = keying {
        field("keyed_by", "identity");
    }
    hex::encode(hasher.finalize().as_slice())
}
