//! The one place SQL literals are written. Everything the proxy adds to a query (timestamps, job
//! ids, type names, table names) goes through these functions; text copied from the query is
//! copied byte for byte and never re-quoted.

use chrono::{DateTime, Utc};

/// `value` between `quote` characters, with `\` and the quote character escaped by a backslash.
fn quoted(value: &str, quote: char) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push(quote);
    for c in value.chars() {
        if c == '\\' || c == quote {
            out.push('\\');
        }
        out.push(c);
    }
    out.push(quote);
    out
}

/// A ClickHouse string literal: single quotes, with `\` and `'` escaped by a backslash. Other
/// characters (including multibyte UTF-8 and control characters) stand for themselves.
pub fn string(value: &str) -> String {
    quoted(value, '\'')
}

/// A ClickHouse identifier in backticks (backticks and backslashes escaped).
pub fn identifier(name: &str) -> String {
    quoted(name, '`')
}

/// `database.table`, both quoted.
pub fn qualified(database: &str, table: &str) -> String {
    format!("{}.{}", identifier(database), identifier(table))
}

/// A UTC instant in microseconds since the epoch, as `YYYY-MM-DD hh:mm:ss.ffffff`.
pub fn timestamp_text(micros: i64) -> String {
    DateTime::<Utc>::from_timestamp_micros(micros)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S%.6f").to_string())
        .unwrap_or_else(|| "1970-01-01 00:00:00.000000".to_string())
}

/// A `DateTime64(6, 'UTC')` literal for an instant in microseconds.
pub fn datetime64(micros: i64) -> String {
    format!("toDateTime64({}, 6, {})", string(&timestamp_text(micros)), string("UTC"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_escape_quotes_and_backslashes_only() {
        assert_eq!(string("it's"), r"'it\'s'");
        assert_eq!(string(r"a\b"), r"'a\\b'");
        assert_eq!(string("é€\n"), "'é€\n'");
        assert_eq!(identifier("we`ird"), r"`we\`ird`");
    }

    #[test]
    fn timestamps_have_microseconds() {
        assert_eq!(datetime64(1_577_880_000_000_001), "toDateTime64('2020-01-01 12:00:00.000001', 6, 'UTC')");
    }
}
