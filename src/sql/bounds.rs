//! Reading the time bounds of a body: which conjuncts compare the time column with a literal, and
//! which instant each literal denotes, exactly as ClickHouse would read it.
//!
//! Instants are microseconds since the Unix epoch (UTC). A range is converted to half-open form
//! `[start, end)` on the column's precision, so that windows can be checked against it exactly.

use chrono::{NaiveDate, NaiveDateTime, TimeZone};
use chrono_tz::Tz;
use sqlparser::ast::{BinaryOperator, Expr, Function, FunctionArg, FunctionArgExpr, FunctionArguments, Value};

use crate::outcome::Reason;

/// Which side of the range a bound limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    /// `>=` or `>`.
    Lower,
    /// `<=` or `<`.
    Upper,
}

/// A comparison of the time expression with a literal instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Bound {
    /// Lower or upper.
    pub side: Side,
    /// Instant in microseconds.
    pub micros: i64,
    /// Whether the instant itself satisfies the bound (`>=`, `<=`).
    pub inclusive: bool,
}

/// The half-open range `[start, end)` in microseconds holding exactly the values of a column of
/// `precision` fractional digits (multiples of its tick) that satisfy both bounds.
pub fn half_open(lower: &Bound, upper: &Bound, precision: u32) -> (i64, i64) {
    let tick = 10i64.pow(6 - precision.min(6));
    let floor = |v: i64| v.div_euclid(tick) * tick;
    let ceil = |v: i64| -(-v).div_euclid(tick) * tick;
    let start = if lower.inclusive { ceil(lower.micros) } else { floor(lower.micros) + tick };
    let end = if upper.inclusive { floor(upper.micros) + tick } else { ceil(upper.micros) };
    (start, end)
}

/// A comparison operator normalised so that the time expression is on the left.
fn comparison(name: &str) -> Option<(Side, bool)> {
    match name {
        "greaterOrEquals" => Some((Side::Lower, true)),
        "greater" => Some((Side::Lower, false)),
        "lessOrEquals" => Some((Side::Upper, true)),
        "less" => Some((Side::Upper, false)),
        _ => None,
    }
}

fn binary_comparison(op: &BinaryOperator) -> Option<&'static str> {
    match op {
        BinaryOperator::GtEq => Some("greaterOrEquals"),
        BinaryOperator::Gt => Some("greater"),
        BinaryOperator::LtEq => Some("lessOrEquals"),
        BinaryOperator::Lt => Some("less"),
        _ => None,
    }
}

fn flipped(name: &str) -> &'static str {
    match name {
        "greaterOrEquals" => "lessOrEquals",
        "greater" => "less",
        "lessOrEquals" => "greaterOrEquals",
        _ => "greater",
    }
}

/// The plain arguments of a call, or `None` if any argument is named or special.
pub fn call_args(f: &Function) -> Option<Vec<&Expr>> {
    let FunctionArguments::List(list) = &f.args else { return None };
    if list.duplicate_treatment.is_some() || !list.clauses.is_empty() {
        return None;
    }
    list.args
        .iter()
        .map(|a| match a {
            FunctionArg::Unnamed(FunctionArgExpr::Expr(e)) => Some(e),
            _ => None,
        })
        .collect()
}

/// A plain call `name(args...)`: no parameters, window, filter or DISTINCT.
pub fn plain_call(e: &Expr) -> Option<(String, Vec<&Expr>)> {
    let Expr::Function(f) = e else { return None };
    if f.over.is_some() || f.filter.is_some() || !matches!(f.parameters, FunctionArguments::None) {
        return None;
    }
    Some((f.name.to_string(), call_args(f)?))
}

/// A comparison in either spelling, with `ifNull(…, 0)` unwrapped: `(name, left, right)`.
pub fn comparison_parts(e: &Expr) -> Option<(&'static str, &Expr, &Expr)> {
    if let Some((name, args)) = plain_call(e) {
        if name == "ifNull" && args.len() == 2 && is_zero(args[1]) {
            return comparison_parts(args[0]);
        }
        if let (Some(_), [l, r]) = (comparison(&name), args.as_slice()) {
            let canonical = ["greaterOrEquals", "greater", "lessOrEquals", "less"].into_iter().find(|c| *c == name)?;
            return Some((canonical, l, r));
        }
        return None;
    }
    match e {
        Expr::Nested(inner) => comparison_parts(inner),
        Expr::BinaryOp { left, op, right } => binary_comparison(op).map(|name| (name, left.as_ref(), right.as_ref())),
        _ => None,
    }
}

fn is_zero(e: &Expr) -> bool {
    matches!(e, Expr::Value(v) if matches!(&v.value, Value::Number(n, _) if n == "0"))
}

/// What a conjunct says about the time column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TimeTest<'a> {
    /// A bound: the time expression (as written) and the bound.
    Bound {
        /// The time expression as written.
        time_expr: &'a Expr,
        /// The bound.
        bound: Bound,
    },
    /// A comparison of the time expression with something that is not a literal.
    NonLiteral,
    /// Not a comparison of the time expression.
    Other,
}

/// Classifies a conjunct. `time_tz` tells whether an expression is the time expression, and if so
/// the timezone its values carry (used to read bare string literals).
pub fn time_test<'a>(e: &'a Expr, time_tz: &impl Fn(&Expr) -> Option<Tz>) -> Result<TimeTest<'a>, Reason> {
    let Some((name, left, right)) = comparison_parts(e) else { return Ok(TimeTest::Other) };
    let (name, time_expr, literal, tz) = if let Some(tz) = time_tz(left) {
        (name, left, right, tz)
    } else if let Some(tz) = time_tz(right) {
        (flipped(name), right, left, tz)
    } else {
        return Ok(TimeTest::Other);
    };
    let Some(micros) = literal_instant(literal, tz)? else { return Ok(TimeTest::NonLiteral) };
    let (side, inclusive) = comparison(name).ok_or(Reason::UnsupportedTimeExpression)?;
    Ok(TimeTest::Bound { time_expr, bound: Bound { side, micros, inclusive } })
}

/// The instant a literal timestamp expression denotes: `Ok(None)` if it is not a literal,
/// `Err` if it is one that cannot be read exactly (relative words, missing timezone, ...).
pub fn literal_instant(e: &Expr, compared_tz: Tz) -> Result<Option<i64>, Reason> {
    if let Expr::Value(v) = e {
        return match &v.value {
            Value::SingleQuotedString(s) => parse_timestamp(s, compared_tz, 6).map(Some),
            _ => Ok(None),
        };
    }
    if let Expr::Nested(inner) = e {
        return literal_instant(inner, compared_tz);
    }
    let Some((name, args)) = plain_call(e) else { return Ok(None) };
    match (name.as_str(), args.as_slice()) {
        ("assumeNotNull", [inner]) => literal_instant(inner, compared_tz),
        ("toDateTime64", [text, precision, tz]) => {
            let (Some(text), Some(precision), Some(tz)) = (string(text), number(precision), string(tz)) else {
                return Ok(None);
            };
            let precision = u32::try_from(precision).map_err(|_| Reason::UnparsedBoundLiteral)?;
            parse_timestamp(text, parse_tz(tz)?, precision.min(6)).map(Some)
        }
        ("toDateTime", [text, tz]) => {
            let (Some(text), Some(tz)) = (string(text), string(tz)) else { return Ok(None) };
            parse_timestamp(text, parse_tz(tz)?, 0).map(Some)
        }
        // Without a timezone argument the session timezone applies, which the proxy cannot see.
        ("toDateTime64", [_, _]) | ("toDateTime", [_]) => Err(Reason::UnparsedBoundLiteral),
        ("plus" | "minus", [base, interval]) => {
            let Some(base) = literal_instant(base, compared_tz)? else { return Ok(None) };
            let Some(delta) = interval_micros(interval) else { return Ok(None) };
            let delta = if name == "plus" { delta } else { -delta };
            base.checked_add(delta).map(Some).ok_or(Reason::UnparsedBoundLiteral)
        }
        _ => Ok(None),
    }
}

/// A fixed-length interval literal such as `toIntervalSecond(0)`, in microseconds. Days and
/// longer are calendar units under a timezone and are not read.
fn interval_micros(e: &Expr) -> Option<i64> {
    let (name, args) = plain_call(e)?;
    let [count] = args.as_slice() else { return None };
    let count = number(count)?;
    let unit: i64 = match name.as_str() {
        "toIntervalSecond" => 1_000_000,
        "toIntervalMinute" => 60_000_000,
        "toIntervalHour" => 3_600_000_000,
        _ => return None,
    };
    count.checked_mul(unit)
}

fn string(e: &Expr) -> Option<&str> {
    match e {
        Expr::Value(v) => match &v.value {
            Value::SingleQuotedString(s) => Some(s.as_str()),
            _ => None,
        },
        _ => None,
    }
}

fn number(e: &Expr) -> Option<i64> {
    match e {
        Expr::Value(v) => match &v.value {
            Value::Number(n, _) => n.parse().ok(),
            _ => None,
        },
        _ => None,
    }
}

fn parse_tz(name: &str) -> Result<Tz, Reason> {
    name.parse().map_err(|_| Reason::UnparsedBoundLiteral)
}

/// Reads `YYYY-MM-DD`, `YYYY-MM-DD hh:mm:ss` or `YYYY-MM-DD hh:mm:ss.fff…` as local time in `tz`,
/// allowing at most `precision` fractional digits (what ClickHouse keeps).
pub fn parse_timestamp(text: &str, tz: Tz, precision: u32) -> Result<i64, Reason> {
    if text.contains('\\') {
        return Err(Reason::UnparsedBoundLiteral);
    }
    let naive = if text.len() == 10 {
        NaiveDate::parse_from_str(text, "%Y-%m-%d").ok().and_then(|d| d.and_hms_opt(0, 0, 0))
    } else {
        let digits = text.split_once('.').map(|(_, f)| f.len()).unwrap_or(0);
        if digits > precision as usize || text.as_bytes().get(10) != Some(&b' ') {
            return Err(Reason::UnparsedBoundLiteral);
        }
        NaiveDateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S%.f").ok()
    }
    .ok_or(Reason::UnparsedBoundLiteral)?;
    // ClickHouse's DateTime range; outside it values wrap or saturate.
    if !(1970..2100).contains(&chrono::Datelike::year(&naive)) {
        return Err(Reason::UnparsedBoundLiteral);
    }
    match tz.from_local_datetime(&naive) {
        chrono::LocalResult::Single(t) => Ok(t.timestamp_micros()),
        _ => Err(Reason::UnparsedBoundLiteral),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sql::rule::parse_pattern;

    fn utc(e: &Expr) -> Option<Tz> {
        match e {
            Expr::Identifier(i) if i.value == "ts" => Some(Tz::UTC),
            _ => plain_call(e).and_then(|(n, a)| (n == "toTimeZone" && a.len() == 2).then_some(Tz::UTC)),
        }
    }

    fn test(sql: &str) -> Result<Option<Bound>, Reason> {
        let e = parse_pattern(sql).unwrap();
        Ok(match time_test(&e, &utc)? {
            TimeTest::Bound { bound, .. } => Some(bound),
            TimeTest::NonLiteral => None,
            TimeTest::Other => return Err(Reason::NoCandidate),
        })
    }

    const T0: i64 = 1_577_880_000_000_000; // 2020-01-01 12:00:00 UTC

    #[test]
    fn reads_every_printed_form() {
        let b = |side, micros, inclusive| Ok(Some(Bound { side, micros, inclusive }));
        assert_eq!(
            test("greaterOrEquals(toTimeZone(ts, 'UTC'), toDateTime64('2020-01-01 12:00:00.000000', 6, 'UTC'))"),
            b(Side::Lower, T0, true)
        );
        assert_eq!(
            test(
                "ifNull(lessOrEquals(toTimeZone(ts, 'UTC'), assumeNotNull(toDateTime('2020-01-01 12:00:00', 'UTC'))), 0)"
            ),
            b(Side::Upper, T0, true)
        );
        assert_eq!(test("ts < '2020-01-01 12:00:00'"), b(Side::Upper, T0, false));
        assert_eq!(test("'2020-01-01' < ts"), b(Side::Lower, T0 - 12 * 3_600_000_000, false));
        assert_eq!(
            test("less(ts, plus(assumeNotNull(toDateTime('2020-01-01 12:00:00', 'UTC')), toIntervalSecond(5)))"),
            b(Side::Upper, T0 + 5_000_000, false)
        );
        assert_eq!(
            test("greater(ts, toDateTime64('2020-01-01 07:00:00.5', 3, 'America/New_York'))"),
            b(Side::Lower, T0 + 500_000, false)
        );
    }

    #[test]
    fn refuses_what_it_cannot_read_exactly() {
        assert_eq!(test("ts >= toDateTime64('today', 6, 'UTC')"), Err(Reason::UnparsedBoundLiteral));
        assert_eq!(test("ts >= toDateTime64('2020-01-01 00:00:00', 6)"), Err(Reason::UnparsedBoundLiteral));
        assert_eq!(test("ts >= toDateTime('2020-01-01 00:00:00.5', 'UTC')"), Err(Reason::UnparsedBoundLiteral));
        assert_eq!(
            test("ts >= toDateTime('2020-03-08 02:30:00', 'America/New_York')"),
            Err(Reason::UnparsedBoundLiteral)
        );
        assert_eq!(test("ts >= now()"), Ok(None));
        assert_eq!(test("ts >= other.first_time"), Ok(None));
        assert_eq!(test("equals(ts, '2020-01-01')"), Err(Reason::NoCandidate));
    }

    #[test]
    fn half_open_ranges_follow_inclusivity_and_precision() {
        let lo = Bound { side: Side::Lower, micros: 10, inclusive: false };
        let hi = Bound { side: Side::Upper, micros: 20, inclusive: true };
        assert_eq!(half_open(&lo, &hi, 6), (11, 21));
        assert_eq!(half_open(&lo, &hi, 3), (1000, 1000));
        let lo = Bound { side: Side::Lower, micros: 1500, inclusive: true };
        let hi = Bound { side: Side::Upper, micros: 3500, inclusive: false };
        assert_eq!(half_open(&lo, &hi, 3), (2000, 4000));
    }
}
