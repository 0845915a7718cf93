//! Matching query expressions against rule patterns.
//!
//! A pattern is an expression in which `$name` placeholders are variables. Matching is structural
//! over sqlparser's AST (spans are ignored by its equality), with two refinements: column
//! references are compared by what they resolve to in the body's FROM scope (so `events.ts`,
//! `e.ts` and a bare `ts` can all mean the source table's `ts`), and a variable used twice must
//! bind equivalent expressions.

use std::collections::{HashMap, HashSet};

use sqlparser::ast::{Expr, Function, FunctionArg, FunctionArgExpr, FunctionArguments, Value};

/// What a column reference resolves to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Column {
    /// A column of the source table.
    Source(String),
    /// A column of a joined relation.
    Joined {
        /// The relation's name.
        relation: String,
        /// The column.
        column: String,
    },
    /// A SELECT alias.
    Alias(String),
}

/// The names visible in a body: the source table (and its alias), joined relations with the
/// columns they are known to produce, and the SELECT's aliases.
#[derive(Debug, Clone, Default)]
pub struct Scope {
    /// Names that qualify source-table columns (`events`, or its alias).
    pub source_names: Vec<String>,
    /// Joined relations: name, and their columns when known (`None`: a table, columns unknown).
    pub joined: Vec<(String, Option<HashSet<String>>)>,
    /// Aliases defined in the SELECT list (ClickHouse resolves bare names to them first).
    pub aliases: HashSet<String>,
    /// The source table name as rules write it.
    pub rule_table: String,
}

impl Scope {
    /// Resolves a query-side column reference; `None` when it is not one, or is ambiguous.
    pub fn resolve(&self, e: &Expr) -> Option<Column> {
        match e {
            Expr::Identifier(id) => {
                if self.aliases.contains(&id.value) {
                    return Some(Column::Alias(id.value.clone()));
                }
                let maybe_joined =
                    self.joined.iter().any(|(_, cols)| cols.as_ref().is_none_or(|c| c.contains(&id.value)));
                (!maybe_joined).then(|| Column::Source(id.value.clone()))
            }
            Expr::CompoundIdentifier(parts) if parts.len() == 2 => {
                let (qualifier, name) = (&parts[0].value, &parts[1].value);
                if self.source_names.contains(qualifier) {
                    Some(Column::Source(name.clone()))
                } else if self.joined.iter().any(|(j, _)| j == qualifier) {
                    Some(Column::Joined { relation: qualifier.clone(), column: name.clone() })
                } else {
                    None
                }
            }
            _ => None,
        }
    }

    /// Resolves a pattern-side column reference: `<rule table>.<column>` or a bare `<column>`.
    fn pattern_column(&self, e: &Expr) -> Option<Column> {
        match e {
            Expr::Identifier(id) => Some(Column::Source(id.value.clone())),
            Expr::CompoundIdentifier(parts) if parts.len() == 2 && parts[0].value == self.rule_table => {
                Some(Column::Source(parts[1].value.clone()))
            }
            _ => None,
        }
    }
}

/// Variable bindings of one match (shared across all the patterns of an occurrence).
pub type Bindings<'q> = HashMap<String, &'q Expr>;

/// A matcher over one body's scope.
pub struct Matcher<'s> {
    scope: &'s Scope,
}

impl<'s> Matcher<'s> {
    /// A matcher resolving columns in `scope`.
    pub fn new(scope: &'s Scope) -> Matcher<'s> {
        Matcher { scope }
    }

    /// Matches `query` against `pattern`, extending `bindings`. On failure the bindings may hold
    /// partial results: callers match against a copy.
    pub fn matches<'q>(&self, pattern: &Expr, query: &'q Expr, bindings: &mut Bindings<'q>) -> bool {
        self.walk(pattern, query, &mut Some(bindings))
    }

    /// Whether two query expressions are equivalent (same structure, same resolved columns).
    pub fn equivalent(&self, a: &Expr, b: &Expr) -> bool {
        self.walk(a, b, &mut None)
    }

    fn walk<'q>(&self, p: &Expr, q: &'q Expr, bindings: &mut Option<&mut Bindings<'q>>) -> bool {
        if let Some(b) = bindings.as_deref_mut()
            && let Some(name) = variable(p)
        {
            return match b.get(name) {
                Some(bound) => self.equivalent(bound, q),
                None => {
                    b.insert(name.to_string(), q);
                    true
                }
            };
        }
        match (p, q) {
            (Expr::Identifier(_) | Expr::CompoundIdentifier(_), _) => {
                let p_column = if bindings.is_some() { self.scope.pattern_column(p) } else { self.scope.resolve(p) };
                p_column.is_some() && p_column == self.scope.resolve(q)
            }
            (Expr::Function(pf), Expr::Function(qf)) => self.function(pf, qf, bindings),
            (Expr::BinaryOp { left: pl, op: po, right: pr }, Expr::BinaryOp { left: ql, op: qo, right: qr }) => {
                po == qo && self.walk(pl, ql, bindings) && self.walk(pr, qr, bindings)
            }
            (Expr::UnaryOp { op: po, expr: pe }, Expr::UnaryOp { op: qo, expr: qe }) => {
                po == qo && self.walk(pe, qe, bindings)
            }
            (Expr::Nested(pe), Expr::Nested(qe)) => self.walk(pe, qe, bindings),
            (Expr::IsNull(pe), Expr::IsNull(qe)) | (Expr::IsNotNull(pe), Expr::IsNotNull(qe)) => {
                self.walk(pe, qe, bindings)
            }
            (Expr::Array(pa), Expr::Array(qa)) => pa.named == qa.named && self.all(&pa.elem, &qa.elem, bindings),
            (Expr::Tuple(pt), Expr::Tuple(qt)) => self.all(pt, qt, bindings),
            (Expr::InList { expr: pe, list: pl, negated: pn }, Expr::InList { expr: qe, list: ql, negated: qn }) => {
                pn == qn && self.walk(pe, qe, bindings) && self.all(pl, ql, bindings)
            }
            _ => p == q,
        }
    }

    fn all<'q>(&self, p: &[Expr], q: &'q [Expr], bindings: &mut Option<&mut Bindings<'q>>) -> bool {
        p.len() == q.len() && p.iter().zip(q).all(|(a, b)| self.walk(a, b, bindings))
    }

    fn function<'q>(&self, p: &Function, q: &'q Function, bindings: &mut Option<&mut Bindings<'q>>) -> bool {
        p.name == q.name
            && p.uses_odbc_syntax == q.uses_odbc_syntax
            && p.within_group == q.within_group
            && p.filter.is_none()
            && q.filter.is_none()
            && p.null_treatment == q.null_treatment
            && p.over.is_none()
            && q.over.is_none()
            && self.arguments(&p.parameters, &q.parameters, bindings)
            && self.arguments(&p.args, &q.args, bindings)
    }

    fn arguments<'q>(
        &self,
        p: &FunctionArguments,
        q: &'q FunctionArguments,
        bindings: &mut Option<&mut Bindings<'q>>,
    ) -> bool {
        match (p, q) {
            (FunctionArguments::List(pl), FunctionArguments::List(ql)) => {
                pl.duplicate_treatment == ql.duplicate_treatment
                    && pl.clauses == ql.clauses
                    && pl.args.len() == ql.args.len()
                    && pl.args.iter().zip(&ql.args).all(|(pa, qa)| match (pa, qa) {
                        (
                            FunctionArg::Unnamed(FunctionArgExpr::Expr(pe)),
                            FunctionArg::Unnamed(FunctionArgExpr::Expr(qe)),
                        ) => self.walk(pe, qe, bindings),
                        _ => pa == qa,
                    })
            }
            _ => p == q,
        }
    }
}

/// The variable name of a `$name` placeholder.
pub fn variable(e: &Expr) -> Option<&str> {
    match e {
        Expr::Value(v) => match &v.value {
            Value::Placeholder(p) => p.strip_prefix('$'),
            _ => None,
        },
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sql::rule::parse_pattern;

    fn scope() -> Scope {
        Scope {
            source_names: vec!["events".into(), "e".into()],
            joined: vec![("o".into(), Some(["person_id".to_string()].into()))],
            aliases: ["entity_id".to_string()].into(),
            rule_table: "events".into(),
        }
    }

    fn matches(pattern: &str, query: &str) -> Option<Vec<(String, String)>> {
        let s = scope();
        let m = Matcher::new(&s);
        let (p, q) = (parse_pattern(pattern).unwrap(), parse_pattern(query).unwrap());
        let mut b = Bindings::new();
        m.matches(&p, &q, &mut b).then(|| {
            let mut v: Vec<_> = b.into_iter().map(|(k, e)| (k, e.to_string())).collect();
            v.sort();
            v
        })
    }

    #[test]
    fn columns_match_by_resolution() {
        assert!(matches("equals(events.event, 'x')", "equals(e.event, 'x')").is_some());
        assert!(matches("equals(events.event, 'x')", "equals(event, 'x')").is_some());
        assert!(matches("equals(events.event, 'x')", "equals(event, 'y')").is_none());
        // `person_id` may come from the join: ambiguous, so not the source column.
        assert!(matches("events.person_id", "person_id").is_none());
        assert!(matches("events.entity_id", "entity_id").is_none());
    }

    #[test]
    fn variables_bind_once_and_must_agree() {
        let b =
            matches("argMin($x, $t) + min($t)", "argMin(uuid, toTimeZone(ts, 'UTC')) + min(toTimeZone(e.ts, 'UTC'))");
        assert_eq!(b.unwrap().len(), 2);
        assert!(matches("argMin($x, $t) + min($t)", "argMin(uuid, ts) + min(ts2)").is_none());
        assert!(matches("count(DISTINCT $v)", "count(v)").is_none());
        assert!(matches("count(DISTINCT $v)", "count(DISTINCT v)").is_some());
        assert!(matches("min($t)", "min(ts) OVER ()").is_none());
    }
}
