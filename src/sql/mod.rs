//! The proxy's brain, as pure functions: locate by tokens, understand by the parser, splice by
//! bytes.
//!
//! [`analyze`] takes a query's text and finds every occurrence of a rule's pattern in it:
//! prefilter (no tokenizing unless a rule's literal occurs), tokenize, list candidate bodies,
//! check each structurally, parse and match the promising ones, hash them. The rest of the query
//! is never parsed and never re-printed.

pub mod bounds;
pub mod hash;
pub mod locate;
pub mod matcher;
pub mod pattern;
pub mod quote;
pub mod rewrite;
pub mod rule;
pub mod settings;
pub mod splice;
pub mod tokens;
pub mod window;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cpu_time::ThreadTime;

use crate::outcome::Reason;
use hash::HashContext;
use matcher::Occurrence;
use rule::Rule;
use tokens::Tokens;

/// The request context that can change what a query computes.
#[derive(Debug, Clone, Default)]
pub struct Context {
    /// Settings given as URL parameters.
    pub url_settings: BTreeMap<String, String>,
    /// The `database` parameter (empty: the user's default).
    pub database: String,
    /// The ClickHouse user, when preaggregates are kept per user.
    pub user: Option<String>,
    /// The roles the request sets (`role` parameters), when preaggregates are kept per user.
    pub roles: Vec<String>,
    /// The database holding the preaggregate tables (jobs are only shared within one).
    pub preagg_database: String,
    /// `exact_under_change`: key the stored rows of bodies with joins by identity, running the
    /// joins at read time (see [`matcher::Keying`]), and refuse filters through subqueries.
    pub exact_under_change: bool,
}

/// One occurrence with its rule, shape and hash.
#[derive(Debug, Clone)]
pub struct Found {
    /// The rule it matches.
    pub rule: Arc<Rule>,
    /// Where it is and what it computes.
    pub occurrence: Occurrence,
    /// Canonical token stream (bounds and team abstracted).
    pub shape: String,
    /// sha256 over rule, shape and context.
    pub query_hash: String,
}

/// The result of analysing a query that has at least one occurrence.
#[derive(Debug, Clone)]
pub struct Analysis {
    /// Occurrences, in text order.
    pub found: Vec<Found>,
    /// Settings in force for the statement (URL parameters overridden by its SETTINGS clause).
    pub settings: BTreeMap<String, String>,
    /// Candidates that looked like occurrences but were refused, with why.
    pub refused: Vec<Reason>,
}

/// The rules one of whose prefilter literals occurs in `text`: a memchr scan, no tokenizing. Fails
/// with `not_experiment_query` when there is none.
pub fn prefilter<'r>(rules: &'r [Arc<Rule>], text: &str) -> Result<Vec<&'r Arc<Rule>>, Reason> {
    let applicable: Vec<_> = rules
        .iter()
        .filter(|rule| {
            rule.prefilter.iter().any(|needle| memchr::memmem::find(text.as_bytes(), needle.as_bytes()).is_some())
        })
        .collect();
    if applicable.is_empty() { Err(Reason::NotExperimentQuery) } else { Ok(applicable) }
}

/// Time spent by the current thread since a start.
enum BudgetClock {
    /// The thread's CPU time.
    Cpu(ThreadTime),
    /// Wall time, where the platform has no thread clock.
    Wall(Instant),
}

impl BudgetClock {
    fn start() -> BudgetClock {
        ThreadTime::try_now().map_or_else(|_| BudgetClock::Wall(Instant::now()), BudgetClock::Cpu)
    }

    fn spent(&self) -> Duration {
        match self {
            BudgetClock::Cpu(started) => started.try_elapsed().unwrap_or(Duration::MAX),
            BudgetClock::Wall(started) => started.elapsed(),
        }
    }
}

/// Finds every occurrence of a rule's pattern in `text`. Fails with the reason of the most
/// promising refused candidate when there is none.
///
/// `budget` bounds the CPU time the analysis may use on its thread (wall time where the platform
/// has no thread clock), so that a machine busy with other work does not stretch it.
pub fn analyze(rules: &[Arc<Rule>], text: &str, context: &Context, budget: Duration) -> Result<Analysis, Reason> {
    analyze_applicable(&prefilter(rules, text)?, text, context, budget)
}

/// [`analyze`] for the rules [`prefilter`] let through (for a caller that prefiltered already).
pub fn analyze_applicable(
    applicable: &[&Arc<Rule>],
    text: &str,
    context: &Context,
    budget: Duration,
) -> Result<Analysis, Reason> {
    // After the prefilter: reading the thread's CPU clock is a system call, and most queries are
    // dismissed before it would matter.
    let started = BudgetClock::start();
    let tokens = Tokens::new(text).map_err(|_| Reason::TokenizeError)?;
    let settings = settings::effective(&context.url_settings, &settings::statement_settings(text, &tokens));
    let hash_context = HashContext {
        database: context.database.clone(),
        user: context.user.clone(),
        roles: context.roles.clone(),
        settings: settings::result_changing(&settings),
        preagg_database: context.preagg_database.clone(),
    };
    let mut found: Vec<Found> = Vec::new();
    let mut refused = Vec::new();
    for candidate in locate::candidates(&tokens) {
        if found.iter().any(|f| f.occurrence.body_tokens.contains(&candidate.body.start)) {
            continue;
        }
        for rule in applicable {
            let body = &text[tokens.byte_span(candidate.body.clone())];
            if !rule.prefilter.iter().any(|needle| body.contains(needle.as_str())) {
                continue;
            }
            match matcher::candidacy(&tokens, &candidate, &rule.source.table) {
                matcher::Candidacy::Promising => {}
                matcher::Candidacy::OtherTable => {
                    refused.push(Reason::OtherSourceTable);
                    continue;
                }
                matcher::Candidacy::Unrelated => continue,
            }
            match matcher::match_candidate(text, &tokens, &candidate, rule, context.exact_under_change) {
                Ok(occurrence) => {
                    let shape = hash::shape(text, &tokens, &occurrence);
                    let query_hash = hash::query_hash(rule, &shape, &occurrence.keying, &hash_context);
                    found.push(Found { rule: Arc::clone(rule), occurrence, shape, query_hash });
                    break;
                }
                Err(reason) => refused.push(reason),
            }
        }
        if started.spent() > budget {
            return Err(Reason::ParseBudgetExceeded);
        }
    }
    if found.is_empty() {
        return Err(refused.first().copied().unwrap_or(Reason::NoCandidate));
    }
    Ok(Analysis { found, settings, refused })
}
