//! Tokens with byte offsets.
//!
//! sqlparser's tokenizer copes with everything ClickHouse prints, but its `Location`s count lines
//! and characters. Every cut the proxy makes is anchored on tokens, so each token here carries the
//! byte range it occupies in the query text. Whitespace and comments are dropped; string literals
//! are kept as written (no unescaping), so that values are read exactly as ClickHouse would.

use std::ops::Range;

use sqlparser::dialect::ClickHouseDialect;
use sqlparser::keywords::Keyword;
use sqlparser::tokenizer::{Location, Span, Token, TokenWithSpan, Tokenizer};

/// One token and where it is.
#[derive(Debug, Clone, PartialEq)]
pub struct Tok {
    /// The token.
    pub token: Token,
    /// Byte range in the query text.
    pub bytes: Range<usize>,
    /// sqlparser's span (for feeding the parser and mapping AST spans back to tokens).
    pub span: Span,
}

/// Errors of tokenization.
#[derive(Debug, thiserror::Error)]
#[error("cannot tokenize the query: {0}")]
pub struct TokenizeError(pub String);

/// The tokens of a text, without whitespace and comments.
#[derive(Debug, Clone)]
pub struct Tokens {
    /// Tokens in order.
    pub toks: Vec<Tok>,
}

impl Tokens {
    /// Tokenizes `sql` with ClickHouse's dialect.
    pub fn new(sql: &str) -> Result<Tokens, TokenizeError> {
        let dialect = ClickHouseDialect {};
        let raw = Tokenizer::new(&dialect, sql)
            .with_unescape(false)
            .tokenize_with_location()
            .map_err(|e| TokenizeError(e.to_string()))?;
        let mut cursor = Cursor::new(sql);
        let mut toks = Vec::with_capacity(raw.len() / 2);
        for TokenWithSpan { token, span } in raw {
            if matches!(token, Token::Whitespace(_) | Token::EOF) {
                continue;
            }
            let start = cursor.advance_to(span.start);
            let end = cursor.peek(span.end);
            toks.push(Tok { token, bytes: start..end, span });
        }
        Ok(Tokens { toks })
    }

    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.toks.len()
    }

    /// Whether there are no tokens.
    pub fn is_empty(&self) -> bool {
        self.toks.is_empty()
    }

    /// The token at `index`, if any.
    pub fn get(&self, index: usize) -> Option<&Token> {
        self.toks.get(index).map(|t| &t.token)
    }

    /// Index of the token that starts at `location`.
    pub fn index_at(&self, location: Location) -> Option<usize> {
        let key = (location.line, location.column);
        self.toks.binary_search_by_key(&key, |t| (t.span.start.line, t.span.start.column)).ok()
    }

    /// Number of tokens that start before `location`.
    pub fn count_before(&self, location: Location) -> usize {
        let key = (location.line, location.column);
        self.toks.partition_point(|t| (t.span.start.line, t.span.start.column) < key)
    }

    /// The tokens of `range` as the parser takes them.
    pub fn for_parser(&self, range: Range<usize>) -> Vec<TokenWithSpan> {
        self.toks[range].iter().map(|t| TokenWithSpan { token: t.token.clone(), span: t.span }).collect()
    }

    /// Byte range covering tokens `range` (start of the first to end of the last).
    pub fn byte_span(&self, range: Range<usize>) -> Range<usize> {
        match (self.toks.get(range.start), range.end.checked_sub(1).and_then(|i| self.toks.get(i))) {
            (Some(first), Some(last)) if range.start < range.end => first.bytes.start..last.bytes.end,
            (Some(first), _) => first.bytes.start..first.bytes.start,
            _ => 0..0,
        }
    }

    /// Extends a token range whose end is inside unclosed brackets to the token after the last
    /// closing bracket: sqlparser's spans of calls often stop before their closing parenthesis.
    /// `None` when the brackets close before `start` (the range was not an expression).
    pub fn balanced_end(&self, start: usize, end: usize) -> Option<usize> {
        let mut depth: isize = 0;
        let mut i = start;
        while i < self.toks.len() && (i < end || depth > 0) {
            match self.toks[i].token {
                Token::LParen | Token::LBracket => depth += 1,
                Token::RParen | Token::RBracket => {
                    depth -= 1;
                    if depth < 0 {
                        return None;
                    }
                }
                _ => {}
            }
            i += 1;
        }
        (depth == 0).then_some(i)
    }
}

/// Whether a token is the keyword `kw` (unquoted).
pub fn is_keyword(token: &Token, kw: Keyword) -> bool {
    matches!(token, Token::Word(w) if w.quote_style.is_none() && w.keyword == kw)
}

/// Walks the text once, turning line/column locations (in characters) into byte offsets.
struct Cursor<'a> {
    text: &'a str,
    byte: usize,
    line: u64,
    column: u64,
}

impl<'a> Cursor<'a> {
    fn new(text: &'a str) -> Cursor<'a> {
        Cursor { text, byte: 0, line: 1, column: 1 }
    }

    /// Moves to `location` (which must not be behind) and returns its byte offset.
    fn advance_to(&mut self, location: Location) -> usize {
        let (byte, line, column) = self.walk(location);
        self.byte = byte;
        self.line = line;
        self.column = column;
        byte
    }

    /// Byte offset of `location` without moving.
    fn peek(&self, location: Location) -> usize {
        self.walk(location).0
    }

    fn walk(&self, target: Location) -> (usize, u64, u64) {
        let (mut byte, mut line, mut column) = (self.byte, self.line, self.column);
        for c in self.text[byte..].chars() {
            if (line, column) >= (target.line, target.column) {
                break;
            }
            byte += c.len_utf8();
            if c == '\n' {
                line += 1;
                column = 1;
            } else {
                column += 1;
            }
        }
        (byte, line, column)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_offsets_count_bytes_not_characters() {
        let sql = "SELECT 'é€', x\n  FROM `t€`";
        let t = Tokens::new(sql).unwrap();
        let texts: Vec<&str> = t.toks.iter().map(|t| &sql[t.bytes.clone()]).collect();
        assert_eq!(texts, ["SELECT", "'é€'", ",", "x", "FROM", "`t€`"]);
    }

    #[test]
    fn strings_keep_their_escapes() {
        let sql = r"SELECT 'a\'b', 'c''d'";
        let t = Tokens::new(sql).unwrap();
        assert_eq!(&sql[t.toks[1].bytes.clone()], r"'a\'b'");
        assert_eq!(&sql[t.toks[3].bytes.clone()], "'c''d'");
    }

    #[test]
    fn brackets_balance() {
        let sql = "f(a, [1, (2)]) + g(";
        let t = Tokens::new(sql).unwrap();
        assert_eq!(t.balanced_end(0, 3), Some(12));
        assert_eq!(t.balanced_end(4, 12), None);
        assert_eq!(t.balanced_end(13, 15), None);
    }
}
