//! Corpus BLEU exactly as sacrebleu 2.x computes it with its defaults:
//! `sacrebleu.corpus_bleu(hyps, refs)` (13a tokenizer, case-sensitive, `smooth_method="exp"`,
//! n-grams up to [`MAX_NGRAM_ORDER`], no effective order).
//!
//! Per sentence, each segment is right-stripped and tokenized with [`tokenize_13a`]; hypothesis
//! n-gram counts are clipped by the maximum count of that n-gram in any one reference, and the
//! reference length is the one closest to the hypothesis length (the shorter on a tie). The
//! corpus score is `bp · exp(mean(log p_n))` over the summed statistics, with `p_n` in percent;
//! an order with no match but some candidates gets `100 / (2^k · total_n)` for its k-th such
//! order (the NIST "exp" smoothing), and an order with no candidates at all a precision of 0.

use std::collections::HashMap;

use crate::{check_streams, is_py_space, py_split, Result};

/// Highest n-gram order BLEU counts (sacrebleu's default).
pub const MAX_NGRAM_ORDER: usize = 4;

/// A corpus BLEU score and the statistics it was computed from (sacrebleu's `BLEUScore`).
#[derive(Debug, Clone, PartialEq)]
pub struct BleuScore {
    /// BLEU, 0–100.
    pub score: f64,
    /// Clipped n-gram matches per order (`counts[0]` for unigrams).
    pub counts: [u64; MAX_NGRAM_ORDER],
    /// Hypothesis n-grams per order.
    pub totals: [u64; MAX_NGRAM_ORDER],
    /// Smoothed precision per order, in percent.
    pub precisions: [f64; MAX_NGRAM_ORDER],
    /// Brevity penalty.
    pub bp: f64,
    /// Hypothesis tokens in the corpus.
    pub sys_len: u64,
    /// Tokens of the closest reference of every sentence, summed.
    pub ref_len: u64,
}

impl BleuScore {
    /// `sys_len / ref_len`, or 0 when there are no reference tokens (as sacrebleu reports it).
    pub fn ratio(&self) -> f64 {
        if self.ref_len == 0 {
            0.0
        } else {
            self.sys_len as f64 / self.ref_len as f64
        }
    }
}

/// Corpus BLEU of `hyps` against reference streams: `refs[k][i]` is the k-th reference of
/// `hyps[i]`.
///
/// Errors if there is no hypothesis or no stream, or if a stream does not hold exactly one
/// reference per hypothesis.
pub fn corpus_bleu<H: AsRef<str>, R: AsRef<str>>(hyps: &[H], refs: &[Vec<R>]) -> Result<BleuScore> {
    check_streams(hyps, refs)?;
    let mut sys_len = 0u64;
    let mut ref_len = 0u64;
    let mut counts = [0u64; MAX_NGRAM_ORDER];
    let mut totals = [0u64; MAX_NGRAM_ORDER];
    for (i, hyp) in hyps.iter().enumerate() {
        let ref_texts: Vec<String> = refs.iter().map(|s| preprocess(s[i].as_ref())).collect();
        let ref_tokens: Vec<Vec<&str>> = ref_texts.iter().map(|t| py_split(t).collect()).collect();
        let mut ref_ngrams: HashMap<&[&str], u64> = HashMap::new();
        for toks in &ref_tokens {
            for (ngram, count) in ngram_counts(toks) {
                let best = ref_ngrams.entry(ngram).or_insert(0);
                *best = (*best).max(count);
            }
        }
        let hyp_text = preprocess(hyp.as_ref());
        let hyp_tokens: Vec<&str> = py_split(&hyp_text).collect();
        let hyp_len = hyp_tokens.len();
        sys_len += hyp_len as u64;
        ref_len += closest_ref_len(hyp_len, ref_tokens.iter().map(Vec::len)) as u64;
        for (ngram, count) in ngram_counts(&hyp_tokens) {
            let n = ngram.len() - 1;
            totals[n] += count;
            if let Some(&r) = ref_ngrams.get(ngram) {
                counts[n] += count.min(r);
            }
        }
    }
    Ok(compute_bleu(counts, totals, sys_len, ref_len))
}

/// sacrebleu's `BLEU._preprocess_segment` with default options: `rstrip`, then 13a.
fn preprocess(segment: &str) -> String {
    tokenize_13a(segment.trim_end_matches(is_py_space))
}

/// Counts of all n-grams of orders 1 to [`MAX_NGRAM_ORDER`].
fn ngram_counts<'a, 'b>(tokens: &'a [&'b str]) -> HashMap<&'a [&'b str], u64> {
    let mut counts = HashMap::new();
    for n in 1..=MAX_NGRAM_ORDER.min(tokens.len()) {
        for ngram in tokens.windows(n) {
            *counts.entry(ngram).or_insert(0) += 1;
        }
    }
    counts
}

/// The reference length closest to `hyp_len`; the shorter one on a tie.
fn closest_ref_len(hyp_len: usize, ref_lens: impl Iterator<Item = usize>) -> usize {
    let mut best: Option<(usize, usize)> = None; // (difference, length)
    for len in ref_lens {
        let diff = hyp_len.abs_diff(len);
        best = match best {
            Some((d, l)) if d < diff || (d == diff && l <= len) => Some((d, l)),
            _ => Some((diff, len)),
        };
    }
    best.map_or(0, |(_, l)| l)
}

/// sacrebleu's `BLEU.compute_bleu` with `smooth_method="exp"`.
fn compute_bleu(
    counts: [u64; MAX_NGRAM_ORDER],
    totals: [u64; MAX_NGRAM_ORDER],
    sys_len: u64,
    ref_len: u64,
) -> BleuScore {
    let mut bp = 1.0;
    if sys_len < ref_len {
        bp = if sys_len > 0 { (1.0 - ref_len as f64 / sys_len as f64).exp() } else { 0.0 };
    }
    let mut precisions = [0.0; MAX_NGRAM_ORDER];
    let mut score = 0.0;
    if counts.iter().any(|&c| c > 0) {
        let mut smooth = 1.0;
        for n in 0..MAX_NGRAM_ORDER {
            if totals[n] == 0 {
                break;
            }
            precisions[n] = if counts[n] == 0 {
                smooth *= 2.0;
                100.0 / (smooth * totals[n] as f64)
            } else {
                100.0 * counts[n] as f64 / totals[n] as f64
            };
        }
        // sacrebleu's `my_log` floors log(0) at -9999999999.
        let log_sum: f64 = precisions.iter().map(|&p| if p == 0.0 { -9_999_999_999.0 } else { p.ln() }).sum();
        score = bp * (log_sum / MAX_NGRAM_ORDER as f64).exp();
    }
    BleuScore { score, counts, totals, precisions, bp, sys_len, ref_len }
}

/// sacrebleu's `Tokenizer13a` (mteval-v13a): drops `<skipped>`, joins `-\n` line breaks, turns
/// newlines into spaces, unescapes `&quot; &amp; &lt; &gt;`, splits off ASCII punctuation except
/// `'`, `,`, `.` and `-`, splits `.` and `,` unless next to a digit on the relevant side, splits
/// `-` after a digit, and joins the tokens with single spaces.
pub fn tokenize_13a(line: &str) -> String {
    let mut line = line.replace("<skipped>", "").replace("-\n", "").replace('\n', " ");
    if line.contains('&') {
        line = line.replace("&quot;", "\"").replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">");
    }
    // ([\{-\~\[-\` -\&\(-\+\:-\@\/]) -> " \1 "
    let mut s = String::with_capacity(line.len() * 2 + 2);
    for c in std::iter::once(' ').chain(line.chars()).chain(std::iter::once(' ')) {
        if matches!(c, '{'..='~' | '['..='`' | ' '..='&' | '('..='+' | ':'..='@' | '/') {
            s.push(' ');
            s.push(c);
            s.push(' ');
        } else {
            s.push(c);
        }
    }
    let digit = |c: char| c.is_ascii_digit();
    let dot_comma = |c: char| c == '.' || c == ',';
    // ([^0-9])([\.,]) -> "\1 \2 "
    let s = substitute_pairs(
        &s,
        |a| !digit(a),
        dot_comma,
        |a, b, out| {
            out.extend([a, ' ', b, ' ']);
        },
    );
    // ([\.,])([^0-9]) -> " \1 \2"
    let s = substitute_pairs(
        &s,
        dot_comma,
        |b| !digit(b),
        |a, b, out| {
            out.extend([' ', a, ' ', b]);
        },
    );
    // ([0-9])(-) -> "\1 \2 "
    let s = substitute_pairs(
        &s,
        digit,
        |b| b == '-',
        |a, b, out| {
            out.extend([a, ' ', b, ' ']);
        },
    );
    py_split(&s).collect::<Vec<_>>().join(" ")
}

/// Python's `re.sub` for a pattern of two one-character classes: scans left to right and
/// replaces non-overlapping matches.
fn substitute_pairs(
    s: &str,
    first: impl Fn(char) -> bool,
    second: impl Fn(char) -> bool,
    replace: impl Fn(char, char, &mut String),
) -> String {
    let chars: Vec<char> = s.chars().collect();
    let mut out = String::with_capacity(s.len() + s.len() / 4);
    let mut i = 0;
    while i < chars.len() {
        if i + 1 < chars.len() && first(chars[i]) && second(chars[i + 1]) {
            replace(chars[i], chars[i + 1], &mut out);
            i += 2;
        } else {
            out.push(chars[i]);
            i += 1;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Error;

    #[test]
    fn tokenize_13a_cases() {
        let cases = [
            ("Hello, world!", "Hello , world !"),
            ("It costs $1,000.50 today.", "It costs $ 1,000.50 today ."),
            ("U.S. troops", "U . S . troops"),
            ("ends with a.", "ends with a ."),
            ("3-4 and a-b", "3 - 4 and a-b"),
            ("&quot;x&quot; &amp;lt; y", "\" x \" < y"),
            ("a <skipped> b", "a b"),
            ("line-\nbreak\nnext", "linebreak next"),
            ("don't", "don't"),
            (".5 and 5. and ,5", ". 5 and 5 . and , 5"),
            ("a..b", "a . . b"),
            ("  spaced\tout\u{a0}text  ", "spaced out text"),
            ("", ""),
            ("नमस्ते, दुनिया।", "नमस्ते , दुनिया।"),
        ];
        for (input, want) in cases {
            assert_eq!(tokenize_13a(input), want, "input {input:?}");
        }
    }

    #[test]
    fn closest_reference_length_prefers_shorter_on_ties() {
        assert_eq!(closest_ref_len(5, [7, 3, 6].into_iter()), 6);
        assert_eq!(closest_ref_len(5, [7, 3].into_iter()), 3);
        assert_eq!(closest_ref_len(5, [3, 7].into_iter()), 3);
        assert_eq!(closest_ref_len(0, [0, 2].into_iter()), 0);
    }

    #[test]
    fn identical_corpus_scores_100() {
        let hyps = ["The cat sat on the mat.", "A dog barked twice at night."];
        let s = corpus_bleu(&hyps, &[hyps.to_vec()]).unwrap();
        assert!((s.score - 100.0).abs() < 1e-9, "{s:?}");
        assert_eq!(s.bp, 1.0);
        assert_eq!(s.sys_len, 14);
    }

    #[test]
    fn empty_hypotheses_score_zero_with_zero_brevity_penalty() {
        let s = corpus_bleu(&["", ""], &[vec!["a b c", "d e"]]).unwrap();
        assert_eq!(s.score, 0.0);
        assert_eq!(s.bp, 0.0);
        assert_eq!((s.sys_len, s.ref_len), (0, 5));
        assert_eq!(s.totals, [0; 4]);
    }

    #[test]
    fn unequal_counts_are_an_error() {
        let err = corpus_bleu(&["a", "b", "c"], &[vec!["a", "b"]]).unwrap_err();
        assert!(matches!(err, Error::LengthMismatch { expected: 3, found: 2, .. }));
        assert_eq!(err.to_string(), "expected 3 references in stream 0 (one per hypothesis), found 2");
        let err = corpus_bleu(&["a"], &[vec!["a"], vec!["a", "b"]]).unwrap_err();
        assert_eq!(err.to_string(), "expected 1 references in stream 1 (one per hypothesis), found 2");
    }
}
