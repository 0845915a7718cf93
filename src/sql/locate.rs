//! Finding candidate subqueries by token structure, without parsing the whole query.
//!
//! A candidate is the body of every parenthesised `( SELECT ... )` (a CTE body or an inlined
//! subquery) and the whole statement when it starts with `SELECT` (its trailing `SETTINGS`,
//! `FORMAT` and `;` stay outside the body, so they keep applying to the rewritten statement).
//! Candidates come outermost first.

use std::ops::Range;

use sqlparser::keywords::Keyword;
use sqlparser::tokenizer::Token;

use super::tokens::{Tokens, is_keyword};

/// A subquery body that may be an occurrence of a rule's pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// Token range of the body, from `SELECT` to the last token inside.
    pub body: Range<usize>,
    /// Whether the body is the whole statement rather than a parenthesised subquery.
    pub top_level: bool,
}

/// Every candidate body in `tokens`, outermost first.
pub fn candidates(tokens: &Tokens) -> Vec<Candidate> {
    let mut out = Vec::new();
    if tokens.get(0).is_some_and(|t| is_keyword(t, Keyword::SELECT)) {
        out.push(Candidate { body: 0..statement_end(tokens), top_level: true });
    }
    // One pass with a stack of open brackets: each `( SELECT` is closed by its matching `)`.
    let mut open: Vec<(usize, bool)> = Vec::new();
    let mut bodies = Vec::new();
    for (i, tok) in tokens.toks.iter().enumerate() {
        match tok.token {
            Token::LParen | Token::LBracket => {
                let starts_select =
                    tok.token == Token::LParen && tokens.get(i + 1).is_some_and(|t| is_keyword(t, Keyword::SELECT));
                open.push((i, starts_select));
            }
            Token::RParen | Token::RBracket => match open.pop() {
                Some((start, true)) if tok.token == Token::RParen => bodies.push(start + 1..i),
                Some(_) => {}
                None => break,
            },
            _ => {}
        }
    }
    bodies.sort_by_key(|b| b.start);
    out.extend(bodies.into_iter().map(|body| Candidate { body, top_level: false }));
    out
}

/// End of the top-level statement body: the first depth-0 `SETTINGS`, `FORMAT`, `INTO OUTFILE`
/// or `;`, or the end of the tokens.
fn statement_end(tokens: &Tokens) -> usize {
    let mut depth = 0usize;
    for (i, tok) in tokens.toks.iter().enumerate() {
        match &tok.token {
            Token::LParen | Token::LBracket => depth += 1,
            Token::RParen | Token::RBracket => depth = depth.saturating_sub(1),
            Token::SemiColon if depth == 0 => return i,
            t if depth == 0
                && (is_keyword(t, Keyword::SETTINGS)
                    || is_keyword(t, Keyword::FORMAT)
                    || is_keyword(t, Keyword::INTO)) =>
            {
                return i;
            }
            _ => {}
        }
    }
    tokens.len()
}

/// Index of the first depth-0 token within `range` satisfying `pred`.
pub fn find_top_level(tokens: &Tokens, range: Range<usize>, pred: impl Fn(&Token) -> bool) -> Option<usize> {
    let mut depth = 0usize;
    for i in range {
        let token = &tokens.toks[i].token;
        match token {
            Token::LParen | Token::LBracket => depth += 1,
            Token::RParen | Token::RBracket => depth = depth.saturating_sub(1),
            t if depth == 0 && pred(t) => return Some(i),
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bodies(sql: &str) -> Vec<String> {
        let t = Tokens::new(sql).unwrap();
        candidates(&t).into_iter().map(|c| sql[t.byte_span(c.body)].to_string()).collect()
    }

    #[test]
    fn finds_cte_inline_and_top_level_bodies() {
        assert_eq!(
            bodies("WITH e AS (SELECT 1 FROM x) SELECT * FROM (SELECT a FROM (SELECT 2)) AS q"),
            ["SELECT 1 FROM x", "SELECT a FROM (SELECT 2)", "SELECT 2"]
        );
        assert_eq!(bodies("SELECT a FROM t GROUP BY a SETTINGS x=1 FORMAT JSON;"), ["SELECT a FROM t GROUP BY a"]);
        assert_eq!(bodies("SELECT (SELECT 1) FORMAT TSV"), ["SELECT (SELECT 1)", "SELECT 1"]);
    }

    #[test]
    fn unbalanced_parentheses_are_not_candidates() {
        assert_eq!(bodies("SELECT * FROM (SELECT 1"), ["SELECT * FROM (SELECT 1"]);
    }
}
