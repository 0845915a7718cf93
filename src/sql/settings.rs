//! Settings that can change what a query returns.
//!
//! A setting given in the query's trailing `SETTINGS` clause or as a URL parameter applies to the
//! whole statement, including the exposures body. Settings that may change results (such as
//! `transform_null_in`) join the query hash and are applied to the builds, so preaggregates are
//! only shared between queries that compute the same thing. Settings known not to change results
//! (limits, optimizations, formats) are left out. Unknown settings count as result-changing.

use std::collections::BTreeMap;

use sqlparser::keywords::Keyword;
use sqlparser::tokenizer::Token;

use super::tokens::{Tokens, is_keyword};

/// URL parameters of the ClickHouse HTTP interface that are not settings.
const NOT_SETTINGS: &[&str] = &[
    "query",
    "database",
    "default_format",
    "user",
    "password",
    "quota_key",
    "query_id",
    "session_id",
    "session_timeout",
    "session_check",
    "compress",
    "decompress",
    "buffer_size",
    "wait_end_of_query",
    "stacktrace",
    "role",
    "enable_http_compression",
    "http_zlib_compression_level",
    "http_native_compression_disable_checksumming_on_decompress",
    "send_progress_in_http_headers",
    "http_headers_progress_interval_ms",
    "http_wait_end_of_query",
    "http_response_buffer_size",
    "query_kind",
];

/// Settings that limit, tune or format a query without changing its rows.
const NEUTRAL: &[&str] = &[
    "readonly",
    "cancel_http_readonly_queries_on_client_close",
    "max_execution_time",
    "max_threads",
    "max_memory_usage",
    "max_memory_usage_for_user",
    "max_ast_elements",
    "max_expanded_ast_elements",
    "max_ast_depth",
    "max_query_size",
    "max_parser_depth",
    "max_bytes_before_external_group_by",
    "max_bytes_before_external_sort",
    "max_bytes_ratio_before_external_group_by",
    "max_block_size",
    "max_insert_block_size",
    "min_insert_block_size_rows",
    "min_insert_block_size_bytes",
    "priority",
    "log_comment",
    "log_queries",
    "use_query_cache",
    "use_hive_partitioning",
    "join_algorithm",
    "allow_experimental_join_condition",
    "allow_experimental_object_type",
    "max_result_rows",
    "max_result_bytes",
    "result_overflow_mode",
    "timeout_before_checking_execution_speed",
    "distributed_product_mode",
    "enable_http_compression",
];

/// Setting prefixes that only tune execution or formatting.
const NEUTRAL_PREFIXES: &[&str] = &[
    "optimize_",
    "grace_hash_join_",
    "format_",
    "output_format_",
    "input_format_",
    "http_",
    "max_bytes_in_",
    "max_rows_in_",
    "max_rows_to_",
    "max_bytes_to_",
];

/// Whether a setting may change the rows a query returns.
pub fn changes_results(name: &str) -> bool {
    !NEUTRAL.contains(&name) && !NEUTRAL_PREFIXES.iter().any(|p| name.starts_with(p))
}

/// Settings given as URL parameters (every parameter that is not a known non-setting).
pub fn url_settings(pairs: impl Iterator<Item = (String, String)>) -> BTreeMap<String, String> {
    pairs.filter(|(name, _)| !NOT_SETTINGS.contains(&name.as_str()) && !name.starts_with("param_")).collect()
}

/// The trailing top-level `SETTINGS a = 1, b = 'x'` clause of a statement. Values are as written,
/// except that a plain string literal gives its content, the way a URL parameter would carry it.
pub fn statement_settings(text: &str, tokens: &Tokens) -> BTreeMap<String, String> {
    let mut depth = 0usize;
    let mut start = None;
    for (i, tok) in tokens.toks.iter().enumerate() {
        match tok.token {
            Token::LParen | Token::LBracket => depth += 1,
            Token::RParen | Token::RBracket => depth = depth.saturating_sub(1),
            _ if depth == 0 && is_keyword(&tok.token, Keyword::SETTINGS) => start = Some(i + 1),
            _ => {}
        }
    }
    let mut out = BTreeMap::new();
    let Some(start) = start else { return out };
    let mut i = start;
    while let (Some(Token::Word(name)), Some(Token::Eq)) = (tokens.get(i), tokens.get(i + 1)) {
        let value_start = i + 2;
        let mut end = value_start;
        while end < tokens.len()
            && !matches!(tokens.get(end), Some(Token::Comma | Token::SemiColon))
            && !tokens.get(end).is_some_and(|t| is_keyword(t, Keyword::FORMAT))
        {
            end += 1;
        }
        if end == value_start {
            break;
        }
        let value = match tokens.get(value_start) {
            Some(Token::SingleQuotedString(v)) if end == value_start + 1 && !v.contains('\\') => v.clone(),
            _ => text[tokens.byte_span(value_start..end)].to_string(),
        };
        out.insert(name.value.clone(), value);
        if tokens.get(end) != Some(&Token::Comma) {
            break;
        }
        i = end + 1;
    }
    out
}

/// Settings a build must not inherit from the query that triggered it: they would block the
/// INSERT or cut it short (the build has its own timeout).
const NOT_FOR_BUILDS: &[&str] = &[
    "readonly",
    "max_execution_time",
    "max_result_rows",
    "max_result_bytes",
    "result_overflow_mode",
    "use_query_cache",
    "log_comment",
    "enable_http_compression",
];

/// The settings in force for a statement: URL settings overridden by its SETTINGS clause.
pub fn effective(url: &BTreeMap<String, String>, clause: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    url.iter().chain(clause.iter()).map(|(k, v)| (k.clone(), v.clone())).collect()
}

/// The settings that may change results: they join the query hash.
pub fn result_changing(settings: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    settings.iter().filter(|(name, _)| changes_results(name)).map(|(k, v)| (k.clone(), v.clone())).collect()
}

/// The settings a build runs with, so that it computes what the query computes (including the
/// settings a body needs to run at all, such as `allow_experimental_join_condition`).
pub fn for_builds(settings: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    settings
        .iter()
        .filter(|(name, _)| !NOT_FOR_BUILDS.contains(&name.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// Whether a boolean setting is on in `settings` (`1` or `true`, as ClickHouse reads them).
pub fn enabled(settings: &BTreeMap<String, String>, name: &str) -> bool {
    settings.get(name).is_some_and(|value| {
        let value = value.trim().trim_matches('\'');
        value == "1" || value.eq_ignore_ascii_case("true")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_trailing_settings_clause() {
        let sql = "SELECT (SELECT 1 SETTINGS a=1) LIMIT 100 SETTINGS readonly=2, transform_null_in=1, \
                   join_algorithm='grace_hash' FORMAT JSON";
        let t = Tokens::new(sql).unwrap();
        let s = statement_settings(sql, &t);
        assert_eq!(s.get("transform_null_in").map(String::as_str), Some("1"));
        assert_eq!(s.get("join_algorithm").map(String::as_str), Some("grace_hash"));
        assert!(!s.contains_key("a"));
        let url = url_settings(
            [("query_id", "x"), ("transform_null_in", "0"), ("max_threads", "2"), ("param_p", "1")]
                .into_iter()
                .map(|(a, b)| (a.to_string(), b.to_string())),
        );
        let all = effective(&url, &s);
        assert_eq!(all["transform_null_in"], "1");
        let hashed = result_changing(&all);
        assert_eq!(hashed.into_iter().collect::<Vec<_>>(), [("transform_null_in".to_string(), "1".to_string())]);
        let build = for_builds(&all);
        assert!(build.contains_key("join_algorithm") && build.contains_key("max_threads"));
        assert!(!build.contains_key("readonly"));
    }
}
