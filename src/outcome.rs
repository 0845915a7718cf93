//! What the proxy did with a request, as users see it in the `X-Preagg` response header.
//!
//! Every failure anywhere on the request path maps to a [`Reason`] with a stable code, and the
//! request is forwarded untouched.

use std::fmt;

use http::HeaderValue;

/// Why a request was not rewritten: forwarded untouched, or (`BadRequest`, `BodyTooLarge`)
/// answered by the proxy itself. The codes are stable: dashboards and tests use them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// The path is not ClickHouse's query endpoint (`/ping`, `/play`, ...).
    NotQueryEndpoint,
    /// The request could not be read (a malformed or oversized head, a body that broke off or
    /// stalled): the proxy answered it itself, with 400 or 431.
    BadRequest,
    /// A body other than INSERT data is larger than `max_body_bytes`: the proxy answered it
    /// itself, with 413.
    BodyTooLarge,
    /// An INSERT: the body is data.
    Insert,
    /// Not a SELECT (DDL, SHOW, SYSTEM, ...), or no query text.
    NotSelect,
    /// A multipart body (external tables).
    ExternalData,
    /// `--mode off`.
    ModeOff,
    /// No rule's prefilter literal occurs in the text.
    NotExperimentQuery,
    /// The text does not tokenize.
    TokenizeError,
    /// Analysis exceeded `max_parse_time`.
    ParseBudgetExceeded,
    /// A candidate subquery was found but its body does not parse.
    BodyParseError,
    /// No subquery with the rule's structure (FROM source, GROUP BY).
    NoCandidate,
    /// The body reads another table than the rule's source.
    OtherSourceTable,
    /// The body is not a plain SELECT (UNION, nested WITH, ...).
    NotPlainSelect,
    /// LIMIT, ORDER BY, HAVING, window functions, PREWHERE, DISTINCT, SETTINGS... in the body.
    UnsupportedClause,
    /// The GROUP BY is not the rule's entity key alone.
    UnsupportedGroupBy,
    /// A projected column is not one the rule knows how to re-aggregate.
    UnknownAggregate,
    /// A required predicate (team, event, ...) is missing.
    MissingPredicate,
    /// The time range has no lower or no upper bound.
    MissingBound,
    /// More than one lower or upper bound on the time column.
    AmbiguousBound,
    /// A bound is not a literal timestamp.
    NonLiteralBound,
    /// A bound literal's text or timezone cannot be interpreted exactly.
    UnparsedBoundLiteral,
    /// The time column is wrapped in an expression that may change instants.
    UnsupportedTimeExpression,
    /// The body uses `{name:Type}` query parameters.
    QueryParameters,
    /// The body calls a function whose value depends on when or where it runs (`now()`, ...).
    NonDeterministic,
    /// A column reference cannot be resolved to the source table unambiguously.
    AmbiguousColumn,
    /// An expression could not be anchored on tokens for an exact cut.
    Unlocatable,
    /// The time range is empty or inverted.
    EmptyRange,
    /// The candidate spans both the URL `query` parameter and the body.
    SplitQuery,
    /// No window of the range is sealed and covered by a ready job.
    NoWindowsReady,
    /// Windows are being built; until they are ready the query runs as the original.
    Building,
    /// The job store could not be reached.
    StoreUnavailable,
    /// Building a window failed.
    BuildFailed,
    /// `max_queued_builds` builds already wait for a slot: this query's windows are left for a
    /// later one.
    BuildQueueFull,
    /// The column types of the body could not be learned from ClickHouse.
    DescribeFailed,
    /// The rewritten query failed upstream; the original was sent instead (unless the rewritten
    /// one timed out: then the client gets that 504).
    RewrittenQueryFailed,
    /// `jobs_per_user` is on and the request authenticates in a way the proxy cannot read (an
    /// `Authorization` scheme other than Basic, a client certificate): its preaggregates could not
    /// be built as its user.
    UnknownCredentials,
    /// `exact_under_change` is on and the rule names no `ingestion_column`: rows ingested after a
    /// build could not be read again, so stored windows cannot be served exactly.
    NoIngestionColumn,
    /// `exact_under_change` is on and the query asks for ClickHouse's query cache: a cached answer
    /// could not follow later changes, and ClickHouse refuses to cache the guard's read of
    /// `system.mutations`.
    QueryCache,
    /// `exact_under_change` is on and an aggregate of a body that joins other relations reads a
    /// joined column: with the joins run at read time, per-identity partials could not compute it.
    JoinedAggregate,
    /// `exact_under_change` is on and the entity, a join condition or a filter on a joined
    /// relation reads a source column the rule does not store per identity (its
    /// `identity_columns`), or names the source in a way the read-time join cannot.
    UnstoredIdentity,
    /// `exact_under_change` is on and a WHERE conjunct reads other tables through a subquery (a
    /// cohort): what it reads could change after a build without the proxy knowing.
    SubqueryFilter,
    /// Shadow mode: the client gets the original; the rewrite is compared in the background.
    Shadow,
}

/// Every reason, its stable code and the `X-Preagg` value it gives, from one list: the values are
/// constants, so a pass-through answer's header costs no formatting.
macro_rules! reason_codes {
    ($($reason:ident => $code:literal,)*) => {
        impl Reason {
            /// Every reason, for metrics registration and documentation.
            pub const ALL: &'static [Reason] = &[$(Reason::$reason,)*];

            /// The stable code.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Reason::$reason => $code,)*
                }
            }

            /// The `X-Preagg` value of a request forwarded untouched for this reason.
            fn passthrough_header(self) -> HeaderValue {
                match self {
                    $(Reason::$reason => {
                        const VALUE: HeaderValue = HeaderValue::from_static(concat!("passthrough reason=", $code));
                        VALUE
                    })*
                }
            }
        }
    };
}

reason_codes! {
    NotQueryEndpoint => "not_query_endpoint",
    BadRequest => "bad_request",
    BodyTooLarge => "body_too_large",
    Insert => "insert",
    NotSelect => "not_select",
    ExternalData => "external_data",
    ModeOff => "mode_off",
    NotExperimentQuery => "not_experiment_query",
    TokenizeError => "tokenize_error",
    ParseBudgetExceeded => "parse_budget_exceeded",
    BodyParseError => "body_parse_error",
    NoCandidate => "no_candidate",
    OtherSourceTable => "other_source_table",
    NotPlainSelect => "not_plain_select",
    UnsupportedClause => "unsupported_clause",
    UnsupportedGroupBy => "unsupported_group_by",
    UnknownAggregate => "unknown_aggregate",
    MissingPredicate => "missing_predicate",
    MissingBound => "missing_bound",
    AmbiguousBound => "ambiguous_bound",
    NonLiteralBound => "non_literal_bound",
    UnparsedBoundLiteral => "unparsed_bound_literal",
    UnsupportedTimeExpression => "unsupported_time_expression",
    QueryParameters => "query_parameters",
    NonDeterministic => "non_deterministic",
    AmbiguousColumn => "ambiguous_column",
    Unlocatable => "unlocatable",
    EmptyRange => "empty_range",
    SplitQuery => "split_query",
    NoWindowsReady => "no_windows_ready",
    Building => "building",
    StoreUnavailable => "store_unavailable",
    BuildFailed => "build_failed",
    BuildQueueFull => "build_queue_full",
    DescribeFailed => "describe_failed",
    RewrittenQueryFailed => "rewritten_query_failed",
    UnknownCredentials => "unknown_credentials",
    NoIngestionColumn => "no_ingestion_column",
    QueryCache => "query_cache",
    JoinedAggregate => "joined_aggregate",
    UnstoredIdentity => "unstored_identity",
    SubqueryFilter => "subquery_filter",
    Shadow => "shadow",
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Counts describing a rewrite, for the `X-Preagg` header.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RewriteSummary {
    /// Rule name.
    pub rule: String,
    /// Occurrences rewritten.
    pub occurrences: usize,
    /// Distinct jobs read.
    pub jobs: usize,
    /// Raw sub-ranges read from the source table.
    pub raw_ranges: usize,
}

/// The proxy's decision for one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Forwarded untouched.
    Passthrough(Reason),
    /// Forwarded with rewritten subqueries.
    Rewritten(RewriteSummary),
}

impl Outcome {
    /// The `X-Preagg` header value (none when a rule's name cannot be a header value).
    pub fn header(&self) -> Option<HeaderValue> {
        match self {
            Outcome::Passthrough(reason) => Some(reason.passthrough_header()),
            Outcome::Rewritten(s) => HeaderValue::try_from(format!(
                "rewritten rule={} occurrences={} jobs={} raw_ranges={}",
                s.rule, s.occurrences, s.jobs, s.raw_ranges
            ))
            .ok(),
        }
    }

    /// A short label for logs and metrics: the reason code or `rewritten`.
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Passthrough(reason) => reason.as_str(),
            Outcome::Rewritten(_) => "rewritten",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_is_listed_once_with_a_unique_code() {
        let codes: std::collections::HashSet<_> = Reason::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(codes.len(), Reason::ALL.len());
        for r in Reason::ALL {
            assert_eq!(serde_json::to_value(r).unwrap(), r.as_str());
        }
    }

    #[test]
    fn header_values() {
        for r in Reason::ALL {
            let value = Outcome::Passthrough(*r).header().unwrap();
            assert_eq!(value, format!("passthrough reason={}", r.as_str()).as_str());
        }
        let s = RewriteSummary { rule: "r".into(), occurrences: 2, jobs: 30, raw_ranges: 3 };
        let value = Outcome::Rewritten(s).header().unwrap();
        assert_eq!(value, "rewritten rule=r occurrences=2 jobs=30 raw_ranges=3");
        let s = RewriteSummary { rule: "line\nbreak".into(), occurrences: 1, jobs: 1, raw_ranges: 0 };
        assert_eq!(Outcome::Rewritten(s).header(), None);
    }
}
