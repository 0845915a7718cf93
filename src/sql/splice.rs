//! Splicing: replace byte ranges of a text, keeping every other byte.

use std::ops::Range;

/// One replacement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Edit {
    /// Byte range replaced.
    pub range: Range<usize>,
    /// New text.
    pub text: String,
}

impl Edit {
    /// Replaces `range` by `text`.
    pub fn new(range: Range<usize>, text: impl Into<String>) -> Edit {
        Edit { range, text: text.into() }
    }

    /// Inserts `text` at `at`.
    pub fn insert(at: usize, text: impl Into<String>) -> Edit {
        Edit { range: at..at, text: text.into() }
    }
}

/// Errors of splicing.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpliceError {
    /// Two edits overlap.
    #[error("edits overlap at byte {0}")]
    Overlap(usize),
    /// An edit is outside the text or not on a character boundary.
    #[error("edit range {0:?} is not a valid range of the text")]
    OutOfBounds(Range<usize>),
}

/// Applies non-overlapping edits (in any order) to `text`. Insertions at the same point keep
/// their given order.
pub fn apply(text: &str, edits: &[Edit]) -> Result<String, SpliceError> {
    let mut ordered: Vec<&Edit> = edits.iter().collect();
    ordered.sort_by_key(|e| (e.range.start, e.range.end));
    let mut out = String::with_capacity(text.len() + edits.iter().map(|e| e.text.len()).sum::<usize>());
    let mut copied = 0;
    for edit in ordered {
        let Range { start, end } = edit.range;
        if start > end || end > text.len() || !text.is_char_boundary(start) || !text.is_char_boundary(end) {
            return Err(SpliceError::OutOfBounds(edit.range.clone()));
        }
        if start < copied {
            return Err(SpliceError::Overlap(start));
        }
        out.push_str(&text[copied..start]);
        out.push_str(&edit.text);
        copied = end;
    }
    out.push_str(&text[copied..]);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn replaces_and_inserts() {
        let out =
            apply("SELECT a FROM t WHERE x", &[Edit::new(7..8, "b, c"), Edit::insert(16, "PREWHERE y ")]).unwrap();
        assert_eq!(out, "SELECT b, c FROM t PREWHERE y WHERE x");
        assert_eq!(apply("abc", &[Edit::new(0..2, ""), Edit::new(1..3, "")]), Err(SpliceError::Overlap(1)));
        assert!(apply("é", &[Edit::new(1..2, "")]).is_err());
    }

    proptest! {
        /// Every byte outside the replaced ranges survives, in order, around the new texts.
        #[test]
        fn bytes_outside_edits_are_kept(text in "[a-z é(),']{0,80}", cuts in proptest::collection::vec((0usize..80, 0usize..8, "[A-Z]{0,4}"), 0..5)) {
            let mut edits: Vec<Edit> = Vec::new();
            let mut taken = 0;
            let mut sorted = cuts.clone();
            sorted.sort();
            for (start, len, new) in sorted {
                let start = start.min(text.len());
                if start < taken || !text.is_char_boundary(start) { continue; }
                let mut end = (start + len).min(text.len());
                while !text.is_char_boundary(end) { end -= 1; }
                edits.push(Edit::new(start..end, new));
                taken = end.max(start + 1);
            }
            let out = apply(&text, &edits).unwrap();
            let mut expected = String::new();
            let mut copied = 0;
            for e in &edits {
                expected.push_str(&text[copied..e.range.start]);
                expected.push_str(&e.text);
                copied = e.range.end;
            }
            expected.push_str(&text[copied..]);
            prop_assert_eq!(out, expected);
        }
    }
}
