//! metrics: BLEU, chrF, ROUGE, accuracy; depends on nothing heavy.
//!
//! Every text metric reproduces the implementation people report numbers with, tokenizer and
//! corner cases included, and is tested against it on committed fixtures made from real text
//! (`tools/parity/make_metric_fixtures.py`):
//!
//! - [`bleu::corpus_bleu`]: sacrebleu 2.x `corpus_bleu` with its defaults (13a tokenizer,
//!   exponential smoothing, brevity penalty, n-grams up to 4, several reference streams);
//! - [`chrf::corpus_chrf`]: sacrebleu's `CHRF` (chrF, and chrF++ with word order 2);
//! - [`rouge::Rouge`]: ROUGE-1/2/L F1 as Google's `rouge-score` computes them (its tokenizer and,
//!   optionally, its Porter stemmer, see [`porter`]), or as XL-Sum's multilingual ROUGE does for
//!   languages outside the Latin alphabet;
//! - [`classification`]: accuracy and macro-F1 (as scikit-learn), and perplexity.
//!
//! # Conventions
//!
//! - Corpus functions take hypotheses and reference *streams*, as sacrebleu does: `refs[k][i]` is
//!   the k-th reference of hypothesis `i`, and every stream holds one reference per hypothesis.
//!   Numbers that do not pair up are an [`Error::LengthMismatch`], never a silent truncation.
//! - Text metrics are on the 0–100 scale; classification metrics are fractions in `[0, 1]`.
//! - An empty hypothesis is valid input and scores what the references make of it (usually 0).

pub mod bleu;
pub mod chrf;
pub mod classification;
pub mod porter;
pub mod rouge;
#[rustfmt::skip]
mod unicode_table;

/// What can go wrong computing a metric. Messages say what was expected and what was found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Two inputs that must pair up one to one have different lengths.
    #[error("expected {expected} {what}, found {found}")]
    LengthMismatch {
        /// What was counted, e.g. `references in stream 1 (one per hypothesis)`.
        what: String,
        expected: usize,
        found: usize,
    },
    /// An input that needs at least one element has none.
    #[error("expected at least one {what}, found none")]
    Empty { what: String },
    /// An argument outside its domain.
    #[error("{name}: expected {expected}, found {found}")]
    InvalidArgument {
        /// The argument (or combination of arguments).
        name: &'static str,
        expected: &'static str,
        found: String,
    },
    /// Multilingual ROUGE for a language written without spaces between words, whose reference
    /// implementation calls a word segmenter (jieba, MeCab, PyThaiNLP, Burmese syllable rules).
    #[error(
        "multilingual ROUGE for `{0}` needs a word segmenter that hetfed-metrics does not have; \
         expected a language that separates words with spaces"
    )]
    UnsupportedLanguage(String),
}

/// Result of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Checks that there is at least one hypothesis and one reference stream, and that every stream
/// has one reference per hypothesis.
pub(crate) fn check_streams<H, R>(hyps: &[H], refs: &[Vec<R>]) -> Result<()> {
    if hyps.is_empty() {
        return Err(Error::Empty { what: "hypothesis".into() });
    }
    if refs.is_empty() {
        return Err(Error::Empty { what: "reference stream".into() });
    }
    for (k, stream) in refs.iter().enumerate() {
        if stream.len() != hyps.len() {
            return Err(Error::LengthMismatch {
                what: format!("references in stream {k} (one per hypothesis)"),
                expected: hyps.len(),
                found: stream.len(),
            });
        }
    }
    Ok(())
}

/// Python's `str.isspace` for one character (what `str.split()` with no argument splits on).
pub(crate) fn is_py_space(c: char) -> bool {
    matches!(
        c,
        '\u{09}'..='\u{0d}'
            | '\u{1c}'..='\u{20}'
            | '\u{85}'
            | '\u{a0}'
            | '\u{1680}'
            | '\u{2000}'..='\u{200a}'
            | '\u{2028}'
            | '\u{2029}'
            | '\u{202f}'
            | '\u{205f}'
            | '\u{3000}'
    )
}

/// Python's `s.split()`: the non-empty runs between white space.
pub(crate) fn py_split(s: &str) -> impl Iterator<Item = &str> {
    s.split(is_py_space).filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_split_matches_str_split() {
        let s = " a\u{1f}b\u{a0}c\u{200b}d\u{3000}\te\u{2028}\u{85}f  ";
        // U+200B (zero width space) is not white space for Python.
        assert_eq!(py_split(s).collect::<Vec<_>>(), ["a", "b", "c\u{200b}d", "e", "f"]);
        assert_eq!(py_split("").count(), 0);
    }

    #[test]
    fn stream_checks_name_what_is_wrong() {
        let hyps = ["a".to_string(), "b".to_string()];
        let err = check_streams(&hyps, &[vec!["x"; 2], vec!["y"; 1]]).unwrap_err();
        assert_eq!(err.to_string(), "expected 2 references in stream 1 (one per hypothesis), found 1");
        let none: [Vec<&str>; 0] = [];
        assert_eq!(
            check_streams(&hyps, &none).unwrap_err().to_string(),
            "expected at least one reference stream, found none"
        );
        let no_hyps: [&str; 0] = [];
        assert_eq!(
            check_streams(&no_hyps, &[Vec::<&str>::new()]).unwrap_err().to_string(),
            "expected at least one hypothesis, found none"
        );
    }
}
