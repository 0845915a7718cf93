//! Deciding whether one candidate body is an occurrence of a rule, and recording where every piece
//! of it is, so that it can be hashed and rewritten by byte offsets.
//!
//! The body (and only the body) is parsed with sqlparser's ClickHouse dialect; every check is a
//! check on the AST. Byte ranges come from tokens: an AST node's span gives its first token, the
//! range is extended until its brackets balance, and the cut is verified by parsing the cut text
//! again and comparing it with the node.

use std::collections::HashSet;
use std::ops::Range;

use sqlparser::ast::{
    Expr, GroupByExpr, JoinConstraint, JoinOperator, Query, Select, SelectItem, SetExpr, Spanned, TableFactor,
    TableWithJoins, Value,
};
use sqlparser::dialect::ClickHouseDialect;
use sqlparser::keywords::Keyword;
use sqlparser::parser::Parser;
use sqlparser::tokenizer::Token;

use super::bounds::{self, Bound, Side, TimeTest};
use super::locate::{Candidate, find_top_level};
use super::pattern::{Bindings, Column, Matcher, Scope};
use super::quote;
use super::rule::{Form, Rule, parse_pattern};
use super::tokens::{Tokens, is_keyword};
use crate::outcome::Reason;

/// Functions whose value depends on when, where or by whom a query runs: a body using one cannot
/// be stored and served later.
const NON_DETERMINISTIC: &[&str] = &[
    "now",
    "now64",
    "nowinblock",
    "today",
    "yesterday",
    "rand",
    "rand32",
    "rand64",
    "randconstant",
    "randuniform",
    "randnormal",
    "randlognormal",
    "randexponential",
    "randbernoulli",
    "randbinomial",
    "randcanonical",
    "randomstring",
    "randomfixedstring",
    "randomprintableascii",
    "randomstringutf8",
    "generateuuidv4",
    "generateuuidv7",
    "generateulid",
    "generatesnowflakeid",
    "currentuser",
    "user",
    "currentroles",
    "enabledroles",
    "defaultroles",
    "currentprofiles",
    "hostname",
    "fqdn",
    "uptime",
    "serveruuid",
    "queryid",
    "initialqueryid",
    "rownumberinblock",
    "rownumberinallblocks",
    "blocknumber",
    "blocksize",
    "runningdifference",
    "runningaccumulate",
    "neighbor",
    "timezone",
    "servertimezone",
    "currentdatabase",
];

/// The prefix of the names the rewrite gives stored columns inside its own subquery, so that
/// merges never capture an output alias.
pub const INNER_PREFIX: &str = "__preagg_";

/// A time-bound conjunct and the time expression it compares.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BoundCut {
    /// The bound.
    pub bound: Bound,
    /// Byte range of the whole conjunct (replaced in raw sub-ranges and builds).
    pub conjunct: Range<usize>,
    /// The time expression as written (reused in replacement conjuncts).
    pub time_expr: String,
}

/// One projected column of an occurrence, in projection order.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct OutputColumn {
    /// Output alias (and stored column name).
    pub name: String,
    /// What the column is to the rewrite.
    pub role: Role,
    /// Byte range of the whole item (`expr AS alias`).
    pub item: Range<usize>,
    /// Re-aggregation over inner stored columns (`None` for the entity and group keys).
    pub merge: Option<String>,
}

/// What a projected column is to the rewrite.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum Role {
    /// The entity key.
    Entity,
    /// A per-row group key beside the entity (one of the rule's keys): stored, and grouped by
    /// again at read time.
    GroupKey,
    /// A rule column under its own name: stored per window, merged at read time.
    Merged,
    /// An output computed after the merge from other stored columns (`min(t) AS day`): never
    /// stored, and builds leave it out.
    Output,
}

impl OutputColumn {
    /// Whether the column is stored under its name.
    pub fn is_stored(&self) -> bool {
        self.role != Role::Output
    }
}

/// A stored column a merge needs that the query does not project.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DerivedColumn {
    /// Stored column name.
    pub name: String,
    /// Expression computing it per window.
    pub expr: String,
}

/// An occurrence of a rule's pattern in a query.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Occurrence {
    /// Rule name.
    pub rule: String,
    /// Byte range of the body (between the parentheses, or the whole statement).
    pub body: Range<usize>,
    /// Token range of the body.
    #[serde(skip)]
    pub body_tokens: Range<usize>,
    /// Team id (0 when the body has no team equality).
    pub team_id: i64,
    /// Byte ranges of the literals equal to the team id (abstracted in the hash).
    #[serde(skip)]
    pub team_tokens: Vec<usize>,
    /// Lower bound.
    pub lower: BoundCut,
    /// Upper bound.
    pub upper: BoundCut,
    /// Half-open range `[start, end)` in microseconds.
    pub range: (i64, i64),
    /// The raw time column, qualified, for PREWHERE (`` `events`.`timestamp` ``).
    pub time_column: String,
    /// The database the body names its source table in (`posthog.events`); `None`: the query's
    /// database.
    pub source_database: Option<String>,
    /// The tables whose mutations make a build of this body stale (the rule's `mutation_tables`),
    /// in [`source_database`](Self::source_database).
    pub mutation_tables: Vec<String>,
    /// The ingestion column of the source, qualified as [`time_column`](Self::time_column), when
    /// the rule names one.
    pub ingestion_column: Option<String>,
    /// Byte offset of the body's `WHERE` keyword.
    pub where_at: usize,
    /// Byte offset just after the last projection item.
    pub projection_end: usize,
    /// Projected columns in order.
    pub columns: Vec<OutputColumn>,
    /// Stored columns computed only for merges.
    pub derived: Vec<DerivedColumn>,
    /// What one stored row stands for.
    pub keying: Keying,
}

/// What one stored row of an occurrence stands for.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub enum Keying {
    /// One entity, as the body computes it: a body that reads the source alone, or any body when
    /// `exact_under_change` is off.
    Entity,
    /// One value of the rule's identity columns: the body's joins (the person overrides) run when
    /// the rows are read, so that they see the joined tables as they are then.
    Identity(IdentityJoin),
}

/// Where the parts of a body that read joined relations are, to run them at read time.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct IdentityJoin {
    /// The name the body reads the source under (its alias, else its table name); read time gives
    /// the stored rows this name.
    pub source_name: String,
    /// Byte range of the joins, from the first join keyword to the end of the last join.
    pub joins: Range<usize>,
    /// The entity expression, as written.
    pub entity_expr: String,
    /// Byte range of the entity's item in the GROUP BY.
    pub group_key: Range<usize>,
    /// Byte ranges of the WHERE conjuncts that read a joined relation or the entity: they filter
    /// at read time.
    pub joined_conjuncts: Vec<Range<usize>>,
    /// The stored identity columns (the rule's), in rule order.
    pub columns: Vec<String>,
}

impl Occurrence {
    /// Stored columns in the order raw sub-ranges and builds produce them: the projection (with
    /// the identity columns in the entity's place when keyed by identity), then the derived
    /// columns.
    pub fn stored_columns(&self) -> Vec<&str> {
        let mut stored = Vec::new();
        for column in self.columns.iter().filter(|c| c.is_stored()) {
            match &self.keying {
                Keying::Identity(join) if column.role == Role::Entity => {
                    stored.extend(join.columns.iter().map(String::as_str))
                }
                _ => stored.push(column.name.as_str()),
            }
        }
        stored.extend(self.derived.iter().map(|d| d.name.as_str()));
        stored
    }
}

/// Matches one candidate body against `rule`. With `exact_under_change`, a body that joins other
/// relations is keyed by identity ([`Keying::Identity`]), or refused when its joins cannot run
/// at read time, and a filter that reads other tables through a subquery is refused: what it
/// reads could change after a build.
pub fn match_candidate(
    text: &str,
    tokens: &Tokens,
    candidate: &Candidate,
    rule: &Rule,
    exact_under_change: bool,
) -> Result<Occurrence, Reason> {
    let range = candidate.body.clone();
    let body_bytes = tokens.byte_span(range.clone());
    if tokens.toks[range.clone()].iter().any(|t| t.token == Token::LBrace) {
        return Err(Reason::QueryParameters);
    }
    if let Some(reason) = non_deterministic(tokens, range.clone()) {
        return Err(reason);
    }
    let query = parse_body(tokens, range.clone())?;
    let select = plain_select(&query)?;
    let (scope, source_alias, source_database) = scope_of(select, rule)?;
    let matcher = Matcher::new(&scope);
    let cut = Cutter { text, tokens };

    // Projection: every item is aliased; one is the entity key, the others are rule columns.
    let items = projection_items(tokens, range.clone())?;
    if items.len() != select.projection.len() {
        return Err(Reason::Unlocatable);
    }
    let mut bindings = Bindings::new();
    let mut entity_expr = None;
    let mut key_exprs: Vec<(&str, &Expr)> = Vec::new();
    let mut matched = Vec::new();
    let mut names = HashSet::new();
    for (item, tokens_range) in select.projection.iter().zip(&items) {
        let SelectItem::ExprWithAlias { expr, alias } = item else { return Err(Reason::UnknownAggregate) };
        if !names.insert(alias.value.clone()) {
            return Err(Reason::UnknownAggregate);
        }
        let item_bytes = tokens.byte_span(tokens_range.clone());
        if alias.value == rule.target.entity {
            entity_expr = Some(expr);
            matched.push((alias.value.clone(), item_bytes, Role::Entity, None));
            continue;
        }
        if rule.key(&alias.value).is_some() {
            key_exprs.push((alias.value.as_str(), expr));
            matched.push((alias.value.clone(), item_bytes, Role::GroupKey, None));
            continue;
        }
        // A rule column under its own name is stored; any other item is an output over stored
        // columns: one of a column's outputs, or a column's form under another alias.
        let own_column = rule.column(&alias.value);
        let stored = own_column.and_then(|column| first_match(&column.forms, &matcher, expr, &mut bindings));
        let form = match stored {
            Some(form) => Some((Role::Merged, form)),
            None => first_match(rule.columns.iter().flat_map(|c| &c.outputs), &matcher, expr, &mut bindings)
                .or_else(|| {
                    let forms = rule.columns.iter().flat_map(|c| &c.forms);
                    own_column.is_none().then(|| first_match(forms, &matcher, expr, &mut bindings)).flatten()
                })
                .map(|form| (Role::Output, form)),
        };
        let (role, form) = form.ok_or(Reason::UnknownAggregate)?;
        matched.push((alias.value.clone(), item_bytes, role, Some(form)));
    }
    let entity_expr = entity_expr.ok_or(Reason::UnsupportedGroupBy)?;
    let entity_key = check_group_by(select, (&rule.target.entity, entity_expr), &key_exprs, &matcher)?;

    // WHERE: bounds, team, required predicates.
    let selection = select.selection.as_ref().ok_or(Reason::MissingBound)?;
    let conjuncts = flatten_and(selection);
    let time_tz = |e: &Expr| time_expression_tz(e, &scope, rule);
    let (mut lower, mut upper) = (None, None);
    let mut team: Option<(i64, usize)> = None;
    for conjunct in &conjuncts {
        match bounds::time_test(conjunct, &time_tz)? {
            TimeTest::NonLiteral => return Err(Reason::NonLiteralBound),
            TimeTest::Bound { time_expr, bound } => {
                let slot = if bound.side == Side::Lower { &mut lower } else { &mut upper };
                if slot.is_some() {
                    return Err(Reason::AmbiguousBound);
                }
                let conjunct_range = cut.verified(conjunct).ok_or(Reason::Unlocatable)?;
                let time_range = cut.verified(time_expr).ok_or(Reason::Unlocatable)?;
                *slot = Some(BoundCut {
                    bound,
                    conjunct: tokens.byte_span(conjunct_range),
                    time_expr: text[tokens.byte_span(time_range)].to_string(),
                });
            }
            TimeTest::Other => {
                if let Some(found) = team_equality(conjunct, &scope, &rule.source.team_column, tokens) {
                    if team.is_some_and(|(id, _)| id != found.0) {
                        return Err(Reason::MissingPredicate);
                    }
                    team = Some(found);
                }
            }
        }
    }
    let (lower, upper) = (lower.ok_or(Reason::MissingBound)?, upper.ok_or(Reason::MissingBound)?);
    if exact_under_change && conjuncts.iter().any(|c| has_subquery(c)) {
        return Err(Reason::SubqueryFilter);
    }
    for predicate in &rule.predicates {
        let present = conjuncts
            .iter()
            .any(|c| predicate.patterns.iter().any(|p| matcher.matches(&p.expr, c, &mut Bindings::new())));
        if !present {
            return Err(Reason::MissingPredicate);
        }
    }
    let range_micros = bounds::half_open(&lower.bound, &upper.bound, rule.source.time_column_precision);
    if range_micros.0 >= range_micros.1 {
        return Err(Reason::EmptyRange);
    }

    // Merges and the stored columns they need.
    let projected: HashSet<String> =
        matched.iter().filter(|(_, _, role, _)| *role != Role::Output).map(|(name, ..)| name.clone()).collect();
    let rule_columns: HashSet<&str> = rule.columns.iter().map(|c| c.name.as_str()).collect();
    let bound_text = |name: &str| -> Option<String> {
        let expr = bindings.get(name)?;
        cut.verified(expr).map(|r| text[tokens.byte_span(r)].to_string())
    };
    let inner = |column: &str| rule_columns.contains(column).then(|| format!("{INNER_PREFIX}{column}"));
    let mut columns = Vec::new();
    let mut needed = Vec::new();
    for (name, item, role, form) in matched {
        let merge = match form {
            None => None,
            Some(form) => {
                let merge = form.merge.render(bound_text, inner).ok_or(Reason::Unlocatable)?;
                form.merge.render(
                    |_| Some(String::new()),
                    |word| {
                        if rule_columns.contains(word) && !projected.contains(word) && !needed.iter().any(|n| n == word)
                        {
                            needed.push(word.to_string());
                        }
                        None
                    },
                );
                Some(merge)
            }
        };
        columns.push(OutputColumn { name, role, item, merge });
    }
    let mut derived = Vec::new();
    for name in needed {
        let column = rule.column(&name).ok_or(Reason::UnknownAggregate)?;
        let template = column.derive.as_ref().ok_or(Reason::UnknownAggregate)?;
        let expr = template.render(bound_text, |_| None).ok_or(Reason::UnknownAggregate)?;
        derived.push(DerivedColumn { name, expr });
    }

    let where_index =
        find_top_level(tokens, range.clone(), |t| is_keyword(t, Keyword::WHERE)).ok_or(Reason::Unlocatable)?;
    let keying = match select.from.first() {
        Some(from) if exact_under_change && !from.joins.is_empty() => {
            let joined = JoinedBody { select, scope: &scope, source_name: &source_alias, rule, cut: &cut };
            Keying::Identity(joined.identity_join(range.clone(), where_index, (entity_expr, entity_key), &conjuncts)?)
        }
        _ => Keying::Entity,
    };
    let projection_end = items.last().map(|r| tokens.byte_span(r.clone()).end).ok_or(Reason::Unlocatable)?;
    let (team_id, team_tokens) = match team {
        Some((id, _)) => (id, team_literal_tokens(tokens, range.clone(), id)),
        None => (0, Vec::new()),
    };
    Ok(Occurrence {
        rule: rule.name.clone(),
        body: body_bytes,
        body_tokens: range,
        team_id,
        team_tokens,
        lower,
        upper,
        range: range_micros,
        time_column: format!("{}.{}", quote::identifier(&source_alias), quote::identifier(&rule.source.time_column)),
        source_database,
        mutation_tables: rule.source.mutation_tables.clone(),
        ingestion_column: rule
            .source
            .ingestion_column
            .as_ref()
            .map(|column| format!("{}.{}", quote::identifier(&source_alias), quote::identifier(column))),
        where_at: tokens.toks[where_index].bytes.start,
        projection_end,
        columns,
        derived,
        keying,
    })
}

/// A body that joins other relations, read for what must run at read time.
struct JoinedBody<'a> {
    select: &'a Select,
    scope: &'a Scope,
    source_name: &'a str,
    rule: &'a Rule,
    cut: &'a Cutter<'a>,
}

/// What a column reference of a body with joins reads.
enum Reads {
    /// A column of the source.
    Source,
    /// A name only read time has: a joined relation's column, or the entity alias.
    AtReadTime,
    /// Anything else.
    Unknown,
}

impl JoinedBody<'_> {
    fn identity_join(
        &self,
        body: Range<usize>,
        where_index: usize,
        (entity_expr, entity_key): (&Expr, &Expr),
        conjuncts: &[&Expr],
    ) -> Result<IdentityJoin, Reason> {
        let tokens = self.cut.tokens;
        if self.rule.source.identity_columns.is_empty() {
            return Err(Reason::UnstoredIdentity);
        }
        // Aggregates run over the stored partials: they may read the source only.
        for item in &self.select.projection {
            if let SelectItem::ExprWithAlias { expr, alias } = item
                && alias.value != self.rule.target.entity
                && !self.reads_only(expr, |r| matches!(r, Reads::Source))
            {
                return Err(Reason::JoinedAggregate);
            }
        }
        // The entity and the join conditions run at read time, over identity columns.
        let at_read_time = |e: &Expr| self.reads_only(e, |r| matches!(r, Reads::AtReadTime | Reads::Source));
        if !at_read_time(entity_expr) || !self.reads_identity_only(entity_expr) {
            return Err(Reason::UnstoredIdentity);
        }
        for join in self.select.from.iter().flat_map(|f| &f.joins) {
            let (JoinOperator::Left(JoinConstraint::On(on))
            | JoinOperator::LeftOuter(JoinConstraint::On(on))
            | JoinOperator::Inner(JoinConstraint::On(on))
            | JoinOperator::Join(JoinConstraint::On(on))) = &join.join_operator
            else {
                return Err(Reason::UnsupportedClause);
            };
            if !at_read_time(on) || !self.reads_identity_only(on) {
                return Err(Reason::UnstoredIdentity);
            }
        }
        // Filters on the source stay in the build; filters on joined relations move to read time.
        let mut joined_conjuncts = Vec::new();
        for conjunct in conjuncts {
            if self.reads_only(conjunct, |r| matches!(r, Reads::Source)) {
                continue;
            }
            if !at_read_time(conjunct) || !self.reads_identity_only(conjunct) {
                return Err(Reason::UnstoredIdentity);
            }
            let cut = self.cut.verified(conjunct).ok_or(Reason::Unlocatable)?;
            joined_conjuncts.push(tokens.byte_span(cut));
        }
        let group_key = self.cut.verified(entity_key).ok_or(Reason::Unlocatable)?;
        let entity = self.cut.verified(entity_expr).ok_or(Reason::Unlocatable)?;
        Ok(IdentityJoin {
            source_name: self.source_name.to_string(),
            joins: self.joins(body, where_index)?,
            entity_expr: self.cut.text[tokens.byte_span(entity)].to_string(),
            group_key: tokens.byte_span(group_key),
            joined_conjuncts,
            columns: self.rule.source.identity_columns.iter().map(|c| c.name.clone()).collect(),
        })
    }

    /// Byte range of the joins: from the first top-level join keyword after FROM to the WHERE,
    /// checked by parsing it again behind a stand-in table.
    fn joins(&self, body: Range<usize>, where_index: usize) -> Result<Range<usize>, Reason> {
        const JOIN_START: &[Keyword] = &[
            Keyword::LEFT,
            Keyword::RIGHT,
            Keyword::INNER,
            Keyword::FULL,
            Keyword::CROSS,
            Keyword::JOIN,
            Keyword::GLOBAL,
            Keyword::ANY,
            Keyword::ALL,
            Keyword::ASOF,
            Keyword::SEMI,
            Keyword::ANTI,
            Keyword::ARRAY,
        ];
        let tokens = self.cut.tokens;
        let from = find_top_level(tokens, body, |t| is_keyword(t, Keyword::FROM)).ok_or(Reason::Unlocatable)?;
        let first = find_top_level(tokens, from + 1..where_index, |t| JOIN_START.iter().any(|k| is_keyword(t, *k)))
            .ok_or(Reason::Unlocatable)?;
        let bytes = tokens.byte_span(first..where_index);
        let text = format!("SELECT 1 FROM stand_in {}", &self.cut.text[bytes.clone()]);
        let reparsed = Parser::parse_sql(&ClickHouseDialect {}, &text).map_err(|_| Reason::Unlocatable)?;
        let same = match reparsed.as_slice() {
            [sqlparser::ast::Statement::Query(q)] => match (q.body.as_ref(), self.select.from.first()) {
                (SetExpr::Select(s), Some(original)) => s.from.first().is_some_and(|f| f.joins == original.joins),
                _ => false,
            },
            _ => false,
        };
        if same { Ok(bytes) } else { Err(Reason::Unlocatable) }
    }

    /// What a column reference reads.
    fn reads(&self, e: &Expr) -> Reads {
        match self.scope.resolve(e) {
            Some(Column::Source(_)) => Reads::Source,
            Some(Column::Joined { .. }) => Reads::AtReadTime,
            Some(Column::Alias(name)) if name == self.rule.target.entity => Reads::AtReadTime,
            _ => Reads::Unknown,
        }
    }

    /// Whether every column reference in `e` reads what `allowed` accepts.
    fn reads_only(&self, e: &Expr, allowed: impl Fn(Reads) -> bool) -> bool {
        visit_column_refs(e, |r| allowed(self.reads(r))).is_continue()
    }

    /// Whether every source column `e` reads is an identity column, named as the read-time rows
    /// are (unqualified, or qualified by the source's name).
    fn reads_identity_only(&self, e: &Expr) -> bool {
        let identity = |name: &str| self.rule.source.identity_columns.iter().any(|c| c.name == name);
        visit_column_refs(e, |r| match (r, self.reads(r)) {
            (Expr::Identifier(i), Reads::Source) => identity(&i.value),
            (Expr::CompoundIdentifier(parts), Reads::Source) => {
                parts[0].value == self.source_name && identity(&parts[1].value)
            }
            _ => true,
        })
        .is_continue()
    }
}

/// Calls `keep` on every column reference of `e` until it returns false.
fn visit_column_refs(e: &Expr, keep: impl Fn(&Expr) -> bool) -> std::ops::ControlFlow<()> {
    sqlparser::ast::visit_expressions(e, |e| match e {
        Expr::Identifier(_) | Expr::CompoundIdentifier(_) if !keep(e) => std::ops::ControlFlow::Break(()),
        _ => std::ops::ControlFlow::Continue(()),
    })
}

/// Whether `e` holds a subquery (whose names the body's scope does not resolve).
fn has_subquery(e: &Expr) -> bool {
    sqlparser::ast::visit_expressions(e, |e| match e {
        Expr::Subquery(_) | Expr::InSubquery { .. } | Expr::Exists { .. } => std::ops::ControlFlow::Break(()),
        _ => std::ops::ControlFlow::Continue(()),
    })
    .is_break()
}

/// The first of `forms` whose pattern `expr` matches, extending `bindings` with that match.
fn first_match<'f, 'q>(
    forms: impl IntoIterator<Item = &'f Form>,
    matcher: &Matcher,
    expr: &'q Expr,
    bindings: &mut Bindings<'q>,
) -> Option<&'f Form> {
    forms.into_iter().find(|form| {
        let mut trial = bindings.clone();
        let ok = matcher.matches(&form.query.expr, expr, &mut trial);
        if ok {
            *bindings = trial;
        }
        ok
    })
}

/// What a cheap look at a candidate's tokens says, before any parsing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Candidacy {
    /// Groups rows of the rule's source table: worth parsing.
    Promising,
    /// Groups rows of another table.
    OtherTable,
    /// Does not group rows of a table (reads a subquery, or has no GROUP BY).
    Unrelated,
}

/// Cheap structural check before parsing: does the body group rows read from `table`?
pub fn candidacy(tokens: &Tokens, candidate: &Candidate, table: &str) -> Candidacy {
    let range = candidate.body.clone();
    if find_top_level(tokens, range.clone(), |t| is_keyword(t, Keyword::GROUP)).is_none() {
        return Candidacy::Unrelated;
    }
    let Some(from) = find_top_level(tokens, range, |t| is_keyword(t, Keyword::FROM)) else {
        return Candidacy::Unrelated;
    };
    let word = |i: usize| match tokens.get(i) {
        Some(Token::Word(w)) => Some(w.value.as_str()),
        _ => None,
    };
    let name = if tokens.get(from + 2) == Some(&Token::Period) { word(from + 3) } else { word(from + 1) };
    match name {
        Some(name) if name == table => Candidacy::Promising,
        Some(_) => Candidacy::OtherTable,
        None => Candidacy::Unrelated,
    }
}

fn non_deterministic(tokens: &Tokens, range: Range<usize>) -> Option<Reason> {
    let toks = &tokens.toks[range];
    toks.windows(2)
        .any(|pair| {
            pair[1].token == Token::LParen
                && matches!(&pair[0].token, Token::Word(w) if w.quote_style.is_none()
                && NON_DETERMINISTIC.contains(&w.value.to_ascii_lowercase().as_str()))
        })
        .then_some(Reason::NonDeterministic)
}

fn parse_body(tokens: &Tokens, range: Range<usize>) -> Result<Box<Query>, Reason> {
    let dialect = ClickHouseDialect {};
    let mut parser = Parser::new(&dialect).with_tokens_with_locations(tokens.for_parser(range));
    let query = parser.parse_query().map_err(|_| Reason::BodyParseError)?;
    if parser.peek_token().token != Token::EOF {
        return Err(Reason::BodyParseError);
    }
    Ok(query)
}

/// The body must be one SELECT without clauses that change what a per-window aggregate means.
fn plain_select(query: &Query) -> Result<&Select, Reason> {
    let Query { with, body, order_by, limit_clause, fetch, locks, for_clause, settings, format_clause, pipe_operators } =
        query;
    if with.is_some() {
        return Err(Reason::NotPlainSelect);
    }
    if order_by.is_some()
        || limit_clause.is_some()
        || fetch.is_some()
        || !locks.is_empty()
        || for_clause.is_some()
        || settings.is_some()
        || format_clause.is_some()
        || !pipe_operators.is_empty()
    {
        return Err(Reason::UnsupportedClause);
    }
    let SetExpr::Select(select) = body.as_ref() else { return Err(Reason::NotPlainSelect) };
    let s = select.as_ref();
    let window_function = sqlparser::ast::visit_expressions(&s.projection, |e| match e {
        Expr::Function(f) if f.over.is_some() => std::ops::ControlFlow::Break(()),
        _ => std::ops::ControlFlow::Continue(()),
    });
    if window_function.is_break() {
        return Err(Reason::UnsupportedClause);
    }
    let unsupported = s.distinct.is_some()
        || s.top.is_some()
        || s.into.is_some()
        || !s.lateral_views.is_empty()
        || s.prewhere.is_some()
        || !s.connect_by.is_empty()
        || !s.cluster_by.is_empty()
        || !s.distribute_by.is_empty()
        || !s.sort_by.is_empty()
        || s.having.is_some()
        || !s.named_window.is_empty()
        || s.qualify.is_some()
        || s.exclude.is_some()
        || s.value_table_mode.is_some()
        || s.select_modifiers.is_some();
    if unsupported { Err(Reason::UnsupportedClause) } else { Ok(s) }
}

/// The FROM scope: the rule's source table (optionally aliased) with LEFT/INNER joins.
/// Also returns the alias the source is named by, and the database it is qualified with.
fn scope_of(select: &Select, rule: &Rule) -> Result<(Scope, String, Option<String>), Reason> {
    let [TableWithJoins { relation, joins }] = select.from.as_slice() else { return Err(Reason::OtherSourceTable) };
    let TableFactor::Table { name, alias, args: None, with_hints, version: None, partitions, sample: None, .. } =
        relation
    else {
        return Err(Reason::OtherSourceTable);
    };
    let table = name.0.last().and_then(|p| p.as_ident()).map(|i| i.value.clone()).ok_or(Reason::OtherSourceTable)?;
    let database = match name.0.as_slice() {
        [_] => None,
        [database, _] => Some(database.as_ident().ok_or(Reason::OtherSourceTable)?.value.clone()),
        _ => return Err(Reason::OtherSourceTable),
    };
    if table != rule.source.table || !with_hints.is_empty() || !partitions.is_empty() {
        return Err(Reason::OtherSourceTable);
    }
    let alias = alias.as_ref().map(|a| a.name.value.clone());
    if alias.as_ref().is_some_and(|_| relation_alias_has_columns(relation)) {
        return Err(Reason::UnsupportedClause);
    }
    let mut scope = Scope { rule_table: rule.source.table.clone(), ..Scope::default() };
    scope.source_names.push(table.clone());
    if let Some(a) = &alias {
        scope.source_names.push(a.clone());
    }
    for join in joins {
        let supported = matches!(
            &join.join_operator,
            JoinOperator::Left(JoinConstraint::On(_))
                | JoinOperator::LeftOuter(JoinConstraint::On(_))
                | JoinOperator::Inner(JoinConstraint::On(_))
                | JoinOperator::Join(JoinConstraint::On(_))
        );
        if !supported {
            return Err(Reason::UnsupportedClause);
        }
        scope.joined.push(joined_relation(&join.relation)?);
    }
    scope.aliases = select
        .projection
        .iter()
        .filter_map(|i| match i {
            SelectItem::ExprWithAlias { alias, .. } => Some(alias.value.clone()),
            _ => None,
        })
        .collect();
    Ok((scope, alias.unwrap_or(table), database))
}

fn relation_alias_has_columns(relation: &TableFactor) -> bool {
    matches!(relation, TableFactor::Table { alias: Some(a), .. } if !a.columns.is_empty())
}

/// A joined relation's name and, for a subquery, the columns it outputs.
fn joined_relation(relation: &TableFactor) -> Result<(String, Option<HashSet<String>>), Reason> {
    match relation {
        TableFactor::Derived { subquery, alias: Some(alias), .. } => {
            let columns = match subquery.body.as_ref() {
                SetExpr::Select(s) => s
                    .projection
                    .iter()
                    .map(|item| match item {
                        SelectItem::ExprWithAlias { alias, .. } => Some(alias.value.clone()),
                        SelectItem::UnnamedExpr(Expr::Identifier(i)) => Some(i.value.clone()),
                        SelectItem::UnnamedExpr(Expr::CompoundIdentifier(p)) => p.last().map(|i| i.value.clone()),
                        _ => None,
                    })
                    .collect::<Option<HashSet<_>>>(),
                _ => None,
            };
            Ok((alias.name.value.clone(), columns))
        }
        TableFactor::Table { name, alias, .. } => {
            let name = alias
                .as_ref()
                .map(|a| a.name.value.clone())
                .or_else(|| name.0.last().and_then(|p| p.as_ident()).map(|i| i.value.clone()))
                .ok_or(Reason::UnsupportedClause)?;
            Ok((name, None))
        }
        _ => Err(Reason::UnsupportedClause),
    }
}

/// The timezone of a time expression: the raw time column (its type's timezone) or
/// `toTimeZone(<time column>, '<tz>')`. Anything else (`toDate`, `toStartOfHour`, ...) may change
/// instants and is not a time expression.
fn time_expression_tz(e: &Expr, scope: &Scope, rule: &Rule) -> Option<chrono_tz::Tz> {
    if scope.resolve(e) == Some(Column::Source(rule.source.time_column.clone())) {
        return Some(rule.source.time_column_timezone);
    }
    let (name, args) = bounds::plain_call(e)?;
    match (name.as_str(), args.as_slice()) {
        ("toTimeZone", [inner, Expr::Value(v)]) => {
            let Value::SingleQuotedString(tz) = &v.value else { return None };
            (scope.resolve(inner) == Some(Column::Source(rule.source.time_column.clone())))
                .then(|| tz.parse().ok())
                .flatten()
        }
        _ => None,
    }
}

/// `equals(team_column, N)`, `team_column = N` (either order): the team id and its token index.
fn team_equality(e: &Expr, scope: &Scope, team_column: &str, tokens: &Tokens) -> Option<(i64, usize)> {
    let (left, right) = match e {
        Expr::BinaryOp { left, op: sqlparser::ast::BinaryOperator::Eq, right } => (left.as_ref(), right.as_ref()),
        _ => {
            let (name, args) = bounds::plain_call(e)?;
            match (name.as_str(), args.as_slice()) {
                ("equals", [l, r]) => (*l, *r),
                _ => return None,
            }
        }
    };
    let team = Some(Column::Source(team_column.to_string()));
    let literal = if scope.resolve(left) == team {
        right
    } else if scope.resolve(right) == team {
        left
    } else {
        return None;
    };
    let Expr::Value(v) = literal else { return None };
    let Value::Number(n, _) = &v.value else { return None };
    Some((n.parse().ok()?, tokens.index_at(v.span.start)?))
}

/// Token indices of number literals equal to the team id.
fn team_literal_tokens(tokens: &Tokens, range: Range<usize>, team: i64) -> Vec<usize> {
    let team = team.to_string();
    range.filter(|&i| matches!(tokens.get(i), Some(Token::Number(n, _)) if *n == team)).collect()
}

/// The GROUP BY must be the entity and the projected group keys, each once (by alias or by
/// expression), in any order. Returns the entity's GROUP BY item.
fn check_group_by<'s>(
    select: &'s Select,
    entity: (&str, &Expr),
    keys: &[(&str, &Expr)],
    matcher: &Matcher,
) -> Result<&'s Expr, Reason> {
    let GroupByExpr::Expressions(items, modifiers) = &select.group_by else { return Err(Reason::UnsupportedGroupBy) };
    if !modifiers.is_empty() || items.len() != 1 + keys.len() {
        return Err(Reason::UnsupportedGroupBy);
    }
    let is = |item: &Expr, (name, expr): (&str, &Expr)| {
        matches!(item, Expr::Identifier(i) if i.value == name) || matcher.equivalent(item, expr)
    };
    let entity_item = items.iter().find(|item| is(item, entity)).ok_or(Reason::UnsupportedGroupBy)?;
    for key in keys {
        if !items.iter().any(|item| !std::ptr::eq(item, entity_item) && is(item, *key)) {
            return Err(Reason::UnsupportedGroupBy);
        }
    }
    Ok(entity_item)
}

/// Conjuncts of a WHERE: `and(...)` calls, `AND` chains and parentheses are flattened.
fn flatten_and(e: &Expr) -> Vec<&Expr> {
    match e {
        Expr::BinaryOp { left, op: sqlparser::ast::BinaryOperator::And, right } => {
            let mut out = flatten_and(left);
            out.extend(flatten_and(right));
            out
        }
        Expr::Nested(inner)
            if matches!(inner.as_ref(), Expr::BinaryOp { op: sqlparser::ast::BinaryOperator::And, .. }) =>
        {
            flatten_and(inner)
        }
        _ => match bounds::plain_call(e) {
            Some((name, args)) if name.eq_ignore_ascii_case("and") && !args.is_empty() => {
                args.into_iter().flat_map(flatten_and).collect()
            }
            _ => vec![e],
        },
    }
}

/// Token ranges of the projection items (between `SELECT` and the top-level `FROM`).
fn projection_items(tokens: &Tokens, body: Range<usize>) -> Result<Vec<Range<usize>>, Reason> {
    let from = find_top_level(tokens, body.clone(), |t| is_keyword(t, Keyword::FROM)).ok_or(Reason::Unlocatable)?;
    let mut items = Vec::new();
    let mut item_start = body.start + 1;
    let mut depth = 0usize;
    for i in body.start + 1..from {
        match tokens.toks[i].token {
            Token::LParen | Token::LBracket => depth += 1,
            Token::RParen | Token::RBracket => depth = depth.saturating_sub(1),
            Token::Comma if depth == 0 => {
                items.push(item_start..i);
                item_start = i + 1;
            }
            _ => {}
        }
    }
    items.push(item_start..from);
    if items.iter().any(|r| r.is_empty()) {
        return Err(Reason::Unlocatable);
    }
    Ok(items)
}

/// Cuts AST nodes out of the text by tokens and checks each cut.
struct Cutter<'a> {
    text: &'a str,
    tokens: &'a Tokens,
}

impl Cutter<'_> {
    /// The token range of `expr`, verified by re-parsing the cut text.
    fn verified(&self, expr: &Expr) -> Option<Range<usize>> {
        let span = expr.span();
        let start = self.tokens.index_at(span.start)?;
        let end = self.tokens.balanced_end(start, self.tokens.count_before(span.end).max(start + 1))?;
        let cut = &self.text[self.tokens.byte_span(start..end)];
        (parse_pattern(cut).ok()? == *expr).then_some(start..end)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sql::locate::candidates;
    use crate::sql::rule::shipped_rules;

    fn rule() -> Rule {
        shipped_rules().into_iter().find(|r| r.name == "experiment_exposures").unwrap()
    }

    fn first(sql: &str) -> Result<Occurrence, Reason> {
        first_keyed(sql, true)
    }

    fn first_keyed(sql: &str, exact_under_change: bool) -> Result<Occurrence, Reason> {
        let t = Tokens::new(sql).unwrap();
        let c = candidates(&t)
            .into_iter()
            .find(|c| candidacy(&t, c, "events") == Candidacy::Promising)
            .ok_or(Reason::NoCandidate)?;
        match_candidate(sql, &t, &c, &rule(), exact_under_change)
    }

    const JOINED: &str = "SELECT if(not(empty(o.distinct_id)), o.person_id, events.person_id) AS entity_id, \
        min(timestamp) AS first_exposure_time FROM events \
        LEFT JOIN (SELECT argMax(person_id, version) AS person_id, distinct_id FROM person_distinct_id_overrides \
        GROUP BY distinct_id) AS o ON equals(events.distinct_id, o.distinct_id) \
        WHERE event = '$feature_flag_called' AND timestamp >= '2026-01-01' AND timestamp < '2026-01-15' \
        GROUP BY entity_id";

    #[test]
    fn a_body_with_joins_is_keyed_by_identity() {
        let o = first(JOINED).unwrap();
        let Keying::Identity(join) = &o.keying else { panic!("{:?}", o.keying) };
        assert_eq!(join.columns, ["distinct_id", "person_id"]);
        assert_eq!(join.entity_expr, "if(not(empty(o.distinct_id)), o.person_id, events.person_id)");
        assert!(JOINED[join.joins.clone()].starts_with("LEFT JOIN (SELECT"));
        assert!(JOINED[join.joins.clone()].ends_with("o.distinct_id)"));
        assert_eq!(&JOINED[join.group_key.clone()], "entity_id");
        assert_eq!(o.stored_columns(), ["distinct_id", "person_id", "first_exposure_time"]);
        // A filter on the joined relation runs at read time.
        let filtered = JOINED.replace("WHERE event", "WHERE notEmpty(o.distinct_id) AND event");
        let Keying::Identity(join) = first(&filtered).unwrap().keying else { panic!() };
        let moved: Vec<&str> = join.joined_conjuncts.iter().map(|r| &filtered[r.clone()]).collect();
        assert_eq!(moved, ["notEmpty(o.distinct_id)"]);
        // Without exactness, and without joins, rows are per entity.
        assert_eq!(first_keyed(JOINED, false).unwrap().keying, Keying::Entity);
        assert_eq!(first(SEED).unwrap().keying, Keying::Entity);
        // A filter through a subquery (a cohort) is stored as answered at build time: only
        // without exactness.
        let cohort = SEED.replace("WHERE event", "WHERE person_id IN (SELECT person_id FROM cohortpeople) AND event");
        assert_eq!(first(&cohort).map(|_| ()), Err(Reason::SubqueryFilter));
        assert!(first_keyed(&cohort, false).is_ok());
    }

    #[test]
    fn joins_that_cannot_run_at_read_time_are_refused() {
        let cases = [
            (JOINED.replace("min(timestamp)", "min(o.version)"), Reason::JoinedAggregate),
            (
                JOINED.replace("min(timestamp) AS first_exposure_time", "argMin(o.person_id, timestamp) AS variant"),
                Reason::JoinedAggregate,
            ),
            (JOINED.replace(", events.person_id) AS", ", events.uuid) AS"), Reason::UnstoredIdentity),
            (JOINED.replace("WHERE event", "WHERE o.person_id != events.uuid AND event"), Reason::UnstoredIdentity),
            (JOINED.replace("WHERE event", "WHERE o.person_id IN (SELECT 1) AND event"), Reason::SubqueryFilter),
        ];
        for (sql, reason) in cases {
            assert_eq!(first(&sql).map(|_| ()), Err(reason), "{sql}");
        }
    }

    const SEED: &str = "SELECT person_id AS entity_id, argMin(properties.$feature_flag_response, timestamp) AS variant, \
        min(timestamp) AS first_exposure_time, max(timestamp) AS last_exposure_time, \
        argMin(uuid, timestamp) AS exposure_event_uuid, argMin($session_id, timestamp) AS exposure_session_id \
        FROM events WHERE event = '$feature_flag_called' AND properties.$feature_flag = 'my-experiment-flag' \
        AND timestamp >= '2026-01-01' AND timestamp < '2026-01-15' GROUP BY person_id";

    #[test]
    fn the_seed_form_matches() {
        let o = first(SEED).unwrap();
        assert_eq!(o.team_id, 0);
        assert!(o.lower.bound.inclusive && !o.upper.bound.inclusive);
        assert_eq!(&SEED[o.lower.conjunct.clone()], "timestamp >= '2026-01-01'");
        assert_eq!(o.time_column, "`events`.`timestamp`");
        assert_eq!(o.columns.len(), 6);
        assert_eq!(o.columns[1].merge.as_deref(), Some("argMin(__preagg_variant, __preagg_first_exposure_time)"));
        assert!(o.derived.is_empty());
    }

    #[test]
    fn a_missing_first_time_is_derived_for_argmin() {
        let sql = SEED.replace("min(timestamp) AS first_exposure_time, ", "");
        let o = first(&sql).unwrap();
        assert_eq!(o.derived, [DerivedColumn { name: "first_exposure_time".into(), expr: "min(timestamp)".into() }]);
    }

    #[test]
    fn outputs_over_a_merged_column_are_computed_after_the_merge() {
        // A column's form under another alias, and an output form under any alias.
        let sql = SEED
            .replace("min(timestamp) AS first_exposure_time", "min(timestamp) AS first_seen")
            .replace("max(timestamp) AS", "toDateOrNull(toString(min(timestamp))) AS day, max(timestamp) AS");
        let o = first(&sql).unwrap();
        let outputs: Vec<(&str, bool, Option<&str>)> =
            o.columns.iter().map(|c| (c.name.as_str(), c.is_stored(), c.merge.as_deref())).collect();
        assert!(outputs.contains(&("first_seen", false, Some("min(__preagg_first_exposure_time)"))), "{outputs:?}");
        assert!(outputs.contains(&("day", false, Some("toDateOrNull(toString(min(__preagg_first_exposure_time)))"))));
        assert_eq!(o.derived, [DerivedColumn { name: "first_exposure_time".into(), expr: "min(timestamp)".into() }]);
        assert!(!o.stored_columns().contains(&"day") && !o.stored_columns().contains(&"first_seen"));
        // Under a rule column's own name, only that column's forms count.
        let misnamed = SEED.replace("max(timestamp) AS last_exposure_time", "min(timestamp) AS last_exposure_time");
        assert_eq!(first(&misnamed).map(|_| ()), Err(Reason::UnknownAggregate));
    }

    #[test]
    fn a_group_key_beside_the_entity_is_stored_and_grouped_by() {
        let keyed = SEED
            .replace(" FROM events", ", lower(distinct_id) AS exposure_identifier FROM events")
            .replace("GROUP BY person_id", "GROUP BY lower(distinct_id), person_id");
        let o = first(&keyed).unwrap();
        let key = o.columns.iter().find(|c| c.name == "exposure_identifier").unwrap();
        assert!(key.role == Role::GroupKey && key.is_stored() && key.merge.is_none());
        assert!(o.stored_columns().contains(&"exposure_identifier"));
        // Not in the GROUP BY (an aggregate could hide under the key's name): refused.
        let by_alias =
            keyed.replace("GROUP BY lower(distinct_id), person_id", "GROUP BY person_id, exposure_identifier");
        assert!(first(&by_alias).is_ok());
        let ungrouped = keyed.replace("GROUP BY lower(distinct_id), person_id", "GROUP BY person_id");
        assert_eq!(first(&ungrouped).map(|_| ()), Err(Reason::UnsupportedGroupBy));
        let aggregate = ungrouped.replace("lower(distinct_id) AS", "max(timestamp) AS");
        assert_eq!(first(&aggregate).map(|_| ()), Err(Reason::UnsupportedGroupBy));
    }

    #[test]
    fn refusals_have_reasons() {
        let cases = [
            (SEED.replace(" GROUP BY person_id", " GROUP BY person_id LIMIT 5"), Reason::UnsupportedClause),
            (SEED.replace("GROUP BY person_id", "GROUP BY person_id, event"), Reason::UnsupportedGroupBy),
            (SEED.replace("max(timestamp)", "sum(timestamp)"), Reason::UnknownAggregate),
            (SEED.replace("timestamp >= '2026-01-01' AND ", ""), Reason::MissingBound),
            (SEED.replace("'2026-01-01'", "now()"), Reason::NonDeterministic),
            (SEED.replace("'2026-01-01'", "other_time"), Reason::NonLiteralBound),
            (SEED.replace("'2026-01-15'", "'2026-01-01'"), Reason::EmptyRange),
            (
                // No exposure event equality at all (any event's would do).
                SEED.replace("event = '$feature_flag_called' AND", "'$feature_flag_called' != '' AND"),
                Reason::MissingPredicate,
            ),
            (SEED.replace("'my-experiment-flag'", "{flag:String}"), Reason::QueryParameters),
            (
                SEED.replace(
                    "AND timestamp < '2026-01-15'",
                    "AND timestamp < '2026-01-15' AND timestamp < '2026-01-16'",
                ),
                Reason::AmbiguousBound,
            ),
            (SEED.replace("min(timestamp)", "min(timestamp) OVER ()"), Reason::UnsupportedClause),
        ];
        for (sql, reason) in cases {
            assert_eq!(first(&sql).map(|_| ()), Err(reason), "{sql}");
        }
    }
}
