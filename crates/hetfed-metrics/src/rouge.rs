//! ROUGE-1, ROUGE-2 and ROUGE-L as Google's `rouge-score` computes them
//! (`RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=...)`), or with the tokenizer of
//! XL-Sum's multilingual ROUGE (`multilingual_rouge`, `RougeScorer(..., lang=...)`).
//!
//! Scoring is the same in both: n-gram overlap (clipped counts) for ROUGE-1/2, the longest common
//! subsequence of tokens for ROUGE-L; precision, recall and F1 per example; with several
//! references, each type takes the scores of the reference with the highest F1 (the first on a
//! tie), as `score_multi` does. A corpus score is the mean per-example F1 × 100.
//!
//! Tokenizers:
//!
//! - [`Rouge::new`] (rouge-score): lowercase, every run of characters outside `[a-z0-9]` becomes
//!   a separator (so any non-Latin script is dropped), and with the stemmer, tokens longer than 3
//!   characters go through nltk's Porter stemmer ([`crate::porter`]).
//! - [`Rouge::multilingual`] (XL-Sum): lowercase; control and format characters (zero-width
//!   joiners included) are removed; white space and punctuation (ASCII symbols and Unicode `P*`)
//!   separate words and are dropped; then OpenNMT's "aggressive" tokenizer splits letters from
//!   digits and makes every other symbol a token of its own, keeping combining marks (Indic vowel
//!   signs, viramas) on the character before them; finally every CJK ideograph is a token. No
//!   stemming. This is the tokenizer XL-Sum uses for every language written with spaces between
//!   words (Hindi, Bengali, Tamil, Telugu, Gujarati, Marathi, Urdu, English, ...).

use std::collections::HashMap;

use crate::unicode_table::RANGES;
use crate::{check_streams, porter, Error, Result};

/// Precision, recall and F1 of one ROUGE type on one example, each in `[0, 1]`.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Score {
    /// Matches over hypothesis n-grams (or LCS length over hypothesis tokens).
    pub precision: f64,
    /// Matches over reference n-grams (or LCS length over reference tokens).
    pub recall: f64,
    /// Harmonic mean of precision and recall (0 when both are 0).
    pub fmeasure: f64,
}

impl Score {
    fn new(hits: usize, hyp_count: usize, ref_count: usize) -> Self {
        let precision = hits as f64 / hyp_count.max(1) as f64;
        let recall = hits as f64 / ref_count.max(1) as f64;
        let fmeasure = if precision + recall > 0.0 { 2.0 * precision * recall / (precision + recall) } else { 0.0 };
        Score { precision, recall, fmeasure }
    }
}

/// ROUGE-1, ROUGE-2 and ROUGE-L of one example.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct RougeScores {
    /// Unigram overlap.
    pub rouge1: Score,
    /// Bigram overlap.
    pub rouge2: Score,
    /// Longest common subsequence (rouge-score's `rougeL`, not the summary-level `rougeLsum`).
    pub rouge_l: Score,
}

/// Mean per-example F1 of a corpus, 0–100.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct RougeF1 {
    /// Mean ROUGE-1 F1 × 100.
    pub rouge1: f64,
    /// Mean ROUGE-2 F1 × 100.
    pub rouge2: f64,
    /// Mean ROUGE-L F1 × 100.
    pub rouge_l: f64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Tokenizer {
    Default { stemmer: bool },
    Multilingual { lang: String },
}

/// A ROUGE scorer: rouge-score's ([`Rouge::new`]) or XL-Sum's multilingual one
/// ([`Rouge::multilingual`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rouge {
    tokenizer: Tokenizer,
}

impl Rouge {
    /// rouge-score's `RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=use_stemmer)`.
    /// Its tokenizer keeps only `[a-z0-9]` after lowercasing: use [`Rouge::multilingual`] for
    /// text outside the Latin alphabet.
    pub fn new(use_stemmer: bool) -> Self {
        Rouge { tokenizer: Tokenizer::Default { stemmer: use_stemmer } }
    }

    /// XL-Sum's multilingual ROUGE, `RougeScorer([...], lang=lang, use_stemmer=False)`, for
    /// `lang` an XL-Sum language name (`"hindi"`, `"bengali"`, `"tamil"`, `"english"`, ...).
    ///
    /// Errors for the languages whose reference tokenizer is a word segmenter (`"chinese"`,
    /// `"chinese_simplified"`, `"chinese_traditional"`, `"japanese"`, `"thai"`, `"burmese"`).
    /// Every other name gets the same tokenizer, as in the reference.
    pub fn multilingual(lang: &str) -> Result<Self> {
        if matches!(lang, "chinese" | "chinese_simplified" | "chinese_traditional" | "japanese" | "thai" | "burmese") {
            return Err(Error::UnsupportedLanguage(lang.to_string()));
        }
        Ok(Rouge { tokenizer: Tokenizer::Multilingual { lang: lang.to_string() } })
    }

    /// The tokens this scorer compares (stemmed if it stems).
    pub fn tokenize(&self, text: &str) -> Vec<String> {
        match &self.tokenizer {
            Tokenizer::Default { stemmer } => tokenize_default(text, *stemmer),
            Tokenizer::Multilingual { .. } => tokenize_multilingual(text),
        }
    }

    /// Scores one hypothesis against one reference (rouge-score's `score(target, prediction)`).
    pub fn score(&self, reference: &str, hypothesis: &str) -> RougeScores {
        let r = self.tokenize(reference);
        let h = self.tokenize(hypothesis);
        score_tokens(&r, &h)
    }

    /// Scores one hypothesis against several references: per type, the scores of the reference
    /// with the highest F1, the first on a tie (rouge-score's `score_multi`).
    ///
    /// Errors if `references` is empty.
    pub fn score_multi<R: AsRef<str>>(&self, references: &[R], hypothesis: &str) -> Result<RougeScores> {
        if references.is_empty() {
            return Err(Error::Empty { what: "reference".into() });
        }
        let h = self.tokenize(hypothesis);
        let mut best: Option<RougeScores> = None;
        for reference in references {
            let s = score_tokens(&self.tokenize(reference.as_ref()), &h);
            best = Some(match best {
                None => s,
                Some(b) => RougeScores {
                    rouge1: better(b.rouge1, s.rouge1),
                    rouge2: better(b.rouge2, s.rouge2),
                    rouge_l: better(b.rouge_l, s.rouge_l),
                },
            });
        }
        Ok(best.unwrap_or_default())
    }

    /// Mean F1 × 100 over a corpus with reference streams: `refs[k][i]` is the k-th reference of
    /// `hyps[i]`, as for BLEU and chrF.
    ///
    /// Errors if there is no hypothesis or no stream, or if a stream does not hold exactly one
    /// reference per hypothesis.
    pub fn corpus<H: AsRef<str>, R: AsRef<str>>(&self, hyps: &[H], refs: &[Vec<R>]) -> Result<RougeF1> {
        check_streams(hyps, refs)?;
        let per_example = hyps.iter().enumerate().map(|(i, h)| {
            let references: Vec<&str> = refs.iter().map(|s| s[i].as_ref()).collect();
            self.score_multi(&references, h.as_ref())
        });
        mean_f1(per_example, hyps.len())
    }

    /// Mean F1 × 100 over a corpus where `refs[i]` lists the references of `hyps[i]` (any number,
    /// at least one), as SciTLDR-style data comes.
    ///
    /// Errors if there is no hypothesis, if `refs` does not have one list per hypothesis, or if a
    /// list is empty.
    pub fn corpus_per_example<H: AsRef<str>, R: AsRef<str>>(&self, hyps: &[H], refs: &[Vec<R>]) -> Result<RougeF1> {
        if hyps.is_empty() {
            return Err(Error::Empty { what: "hypothesis".into() });
        }
        if refs.len() != hyps.len() {
            return Err(Error::LengthMismatch {
                what: "reference lists (one per hypothesis)".into(),
                expected: hyps.len(),
                found: refs.len(),
            });
        }
        let per_example = hyps.iter().zip(refs).enumerate().map(|(i, (h, r))| {
            if r.is_empty() {
                return Err(Error::Empty { what: format!("reference for hypothesis {i}") });
            }
            self.score_multi(r, h.as_ref())
        });
        mean_f1(per_example, hyps.len())
    }
}

/// `np.argmax` over F1: the later score wins only if strictly better.
fn better(best: Score, candidate: Score) -> Score {
    if candidate.fmeasure > best.fmeasure {
        candidate
    } else {
        best
    }
}

fn mean_f1(per_example: impl Iterator<Item = Result<RougeScores>>, n: usize) -> Result<RougeF1> {
    let mut sum = RougeF1::default();
    for s in per_example {
        let s = s?;
        sum.rouge1 += s.rouge1.fmeasure;
        sum.rouge2 += s.rouge2.fmeasure;
        sum.rouge_l += s.rouge_l.fmeasure;
    }
    let n = n as f64;
    Ok(RougeF1 { rouge1: 100.0 * sum.rouge1 / n, rouge2: 100.0 * sum.rouge2 / n, rouge_l: 100.0 * sum.rouge_l / n })
}

fn score_tokens(reference: &[String], hypothesis: &[String]) -> RougeScores {
    RougeScores {
        rouge1: score_ngrams(reference, hypothesis, 1),
        rouge2: score_ngrams(reference, hypothesis, 2),
        rouge_l: score_lcs(reference, hypothesis),
    }
}

fn ngram_counts(tokens: &[String], n: usize) -> HashMap<&[String], usize> {
    let mut counts = HashMap::new();
    if tokens.len() >= n {
        for g in tokens.windows(n) {
            *counts.entry(g).or_insert(0) += 1;
        }
    }
    counts
}

fn score_ngrams(reference: &[String], hypothesis: &[String], n: usize) -> Score {
    let r = ngram_counts(reference, n);
    let h = ngram_counts(hypothesis, n);
    let hits = r.iter().map(|(g, &c)| c.min(h.get(g).copied().unwrap_or(0))).sum();
    Score::new(hits, h.values().sum(), r.values().sum())
}

fn score_lcs(reference: &[String], hypothesis: &[String]) -> Score {
    if reference.is_empty() || hypothesis.is_empty() {
        return Score::default();
    }
    let mut prev = vec![0usize; hypothesis.len() + 1];
    let mut cur = vec![0usize; hypothesis.len() + 1];
    for r in reference {
        for (j, h) in hypothesis.iter().enumerate() {
            cur[j + 1] = if r == h { prev[j] + 1 } else { prev[j + 1].max(cur[j]) };
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    Score::new(prev[hypothesis.len()], hypothesis.len(), reference.len())
}

/// rouge-score's `tokenize.tokenize`.
fn tokenize_default(text: &str, stemmer: bool) -> Vec<String> {
    let lower = text.to_lowercase();
    lower
        .split(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit()))
        .filter(|t| !t.is_empty())
        .map(|t| if stemmer && t.len() > 3 { porter::stem(t) } else { t.to_string() })
        .filter(|t| !t.is_empty() && t.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()))
        .collect()
}

/// How the multilingual tokenizer treats a character; see `unicode_table.rs`. Characters with no
/// class (control, format, unassigned, U+FFFD) are removed without splitting the word.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CharClass {
    /// White space: separates words.
    Space,
    /// Punctuation (ASCII symbols and Unicode `P*`): separates words and is dropped.
    Punct,
    Letter,
    Number,
    /// Combining mark: stays with the character before it.
    Mark,
    /// Any other symbol: a token of its own.
    Other,
}

fn char_class(c: char) -> Option<CharClass> {
    let cp = u32::from(c);
    let i = RANGES.partition_point(|&(_, last, _)| last < cp);
    match RANGES.get(i) {
        Some(&(first, _, class)) if first <= cp => Some(class),
        _ => None,
    }
}

/// `multilingual_rouge`'s `MultiTokenizer` for a language without a dedicated segmenter:
/// BERT's `BasicTokenizer` clean-up and punctuation split, pyonmttok's aggressive mode, and a
/// split around CJK ideographs.
fn tokenize_multilingual(text: &str) -> Vec<String> {
    let lower = text.to_lowercase();
    // BasicTokenizer: drop control and format characters, split on white space and punctuation.
    let mut joined: Vec<(char, CharClass)> = Vec::with_capacity(lower.len());
    let mut word_open = false;
    for c in lower.chars() {
        match char_class(c) {
            None => {}
            Some(CharClass::Space | CharClass::Punct) => word_open = false,
            Some(class) => {
                if !word_open && !joined.is_empty() {
                    joined.push((' ', CharClass::Space));
                }
                word_open = true;
                joined.push((c, class));
            }
        }
    }
    onmt_aggressive(&joined).iter().flat_map(|t| split_cjk(t)).collect()
}

/// pyonmttok's `Tokenizer("aggressive")` with its default options on text whose words are
/// separated by single spaces.
fn onmt_aggressive(chars: &[(char, CharClass)]) -> Vec<String> {
    #[derive(PartialEq)]
    enum State {
        Space,
        Letter,
        Number,
        Other,
    }
    let mut tokens = Vec::new();
    let mut current = String::new();
    let mut segment = |current: &mut String| {
        if !current.is_empty() {
            tokens.push(std::mem::take(current));
        }
    };
    let mut state = State::Space;
    let mut i = 0;
    while i < chars.len() {
        let (c, class) = chars[i];
        let mut next = i + 1;
        while next < chars.len() && chars[next].1 == CharClass::Mark {
            next += 1;
        }
        let marks = chars[i + 1..next].iter().map(|&(m, _)| m);
        match class {
            CharClass::Space if next == i + 1 => {
                if state != State::Space {
                    segment(&mut current);
                }
                state = State::Space;
            }
            CharClass::Space => {
                // A separator carrying combining marks: escaped, with its marks, as one token.
                if state != State::Space {
                    segment(&mut current);
                }
                current.push_str(&format!("\u{ff05}{:04x}", u32::from(c)));
                current.extend(marks);
                segment(&mut current);
                state = State::Other;
            }
            CharClass::Letter => {
                if state == State::Number {
                    segment(&mut current);
                }
                push_substituted(&mut current, c);
                current.extend(marks);
                state = State::Letter;
            }
            CharClass::Number => {
                if state == State::Letter {
                    segment(&mut current);
                }
                push_substituted(&mut current, c);
                current.extend(marks);
                state = State::Number;
            }
            // Symbols, and a combining mark with nothing before it.
            CharClass::Other | CharClass::Mark | CharClass::Punct => {
                if state != State::Space {
                    segment(&mut current);
                }
                push_substituted(&mut current, c);
                current.extend(marks);
                segment(&mut current);
                state = State::Other;
            }
        }
        i = next;
    }
    segment(&mut current);
    tokens
}

/// OpenNMT replaces its own marker characters by look-alikes.
fn push_substituted(s: &mut String, c: char) {
    match c {
        '\u{2581}' => s.push('_'),
        '\u{ffed}' => s.push('\u{25a0}'),
        '\u{ffe8}' => s.push('\u{2502}'),
        '\u{ff05}' => s.push('%'),
        '\u{ff03}' => s.push('#'),
        '\u{ff1a}' => s.push(':'),
        c => s.push(c),
    }
}

/// BERT's `_is_chinese_char`: the CJK Unified Ideographs blocks.
fn is_cjk(c: char) -> bool {
    matches!(u32::from(c),
        0x4E00..=0x9FFF
        | 0x3400..=0x4DBF
        | 0x20000..=0x2A6DF
        | 0x2A700..=0x2B73F
        | 0x2B740..=0x2B81F
        | 0x2B820..=0x2CEAF
        | 0xF900..=0xFAFF
        | 0x2F800..=0x2FA1F)
}

/// Every CJK ideograph of `token` becomes a token of its own.
fn split_cjk(token: &str) -> Vec<String> {
    if !token.chars().any(is_cjk) {
        return vec![token.to_string()];
    }
    let mut out = Vec::new();
    let mut current = String::new();
    for c in token.chars() {
        if is_cjk(c) {
            if !current.is_empty() {
                out.push(std::mem::take(&mut current));
            }
            out.push(c.to_string());
        } else {
            current.push(c);
        }
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unicode_table_is_sorted_and_disjoint() {
        assert!(RANGES.windows(2).all(|w| w[0].1 < w[1].0));
        assert!(RANGES.iter().all(|&(a, b, _)| a <= b));
        assert_eq!(char_class('a'), Some(CharClass::Letter));
        assert_eq!(char_class('\u{94d}'), Some(CharClass::Mark)); // Devanagari virama
        assert_eq!(char_class('\u{964}'), Some(CharClass::Punct)); // danda
        assert_eq!(char_class('\u{200d}'), None); // zero width joiner
        assert_eq!(char_class('\u{10ffff}'), None);
    }

    #[test]
    fn default_tokenizer() {
        let r = Rouge::new(false);
        assert_eq!(r.tokenize("The U.S.-led talks, 2x!"), ["the", "u", "s", "led", "talks", "2x"]);
        assert_eq!(r.tokenize("हिंदी text"), ["text"]);
        assert_eq!(Rouge::new(true).tokenize("Running runs ran"), ["run", "run", "ran"]);
    }

    #[test]
    fn multilingual_tokenizer_keeps_indic_words_whole() {
        let r = Rouge::multilingual("hindi").unwrap();
        assert_eq!(r.tokenize("क्षेत्र में १२३ लोग, 45abc।"), ["क्षेत्र", "में", "१२३", "लोग", "45", "abc"]);
        assert_eq!(r.tokenize(""), Vec::<String>::new());
        assert!(matches!(Rouge::multilingual("japanese"), Err(Error::UnsupportedLanguage(_))));
    }

    #[test]
    fn scores_like_rouge_score() {
        let r = Rouge::new(false);
        let s = r.score("the cat sat on the mat", "the cat on the mat");
        assert_eq!(s.rouge1.precision, 1.0);
        assert!((s.rouge1.recall - 5.0 / 6.0).abs() < 1e-15);
        assert_eq!(s.rouge2.precision, 3.0 / 4.0);
        assert!((s.rouge_l.recall - 5.0 / 6.0).abs() < 1e-15);
        let empty = r.score("the cat", "");
        assert_eq!(empty, RougeScores::default());
    }

    #[test]
    fn multi_reference_takes_best_per_type() {
        let r = Rouge::new(false);
        let s = r.score_multi(&["a b c d", "c d a b x"], "a b c d x").unwrap();
        // ROUGE-1 from the second reference (all five unigrams); ROUGE-2 from the first (3 of
        // the 4 hypothesis bigrams, all 3 of its own).
        assert_eq!(s.rouge1.fmeasure, 1.0);
        assert!((s.rouge2.fmeasure - 6.0 / 7.0).abs() < 1e-15);
        assert_eq!(s.rouge2.recall, 1.0);
        assert!(r.score_multi::<&str>(&[], "a").is_err());
    }

    #[test]
    fn corpus_shapes_are_checked() {
        let r = Rouge::new(false);
        let err = r.corpus(&["a", "b"], &[vec!["a"]]).unwrap_err();
        assert_eq!(err.to_string(), "expected 2 references in stream 0 (one per hypothesis), found 1");
        let err = r.corpus_per_example(&["a", "b"], &[vec!["a"]]).unwrap_err();
        assert_eq!(err.to_string(), "expected 2 reference lists (one per hypothesis), found 1");
        let err = r.corpus_per_example(&["a", "b"], &[vec!["a"], vec![]]).unwrap_err();
        assert_eq!(err.to_string(), "expected at least one reference for hypothesis 1, found none");
        let f = r.corpus_per_example(&["a b", ""], &[vec!["a b"], vec!["c"]]).unwrap();
        assert_eq!(f.rouge1, 50.0);
    }
}
