//! Corpus chrF and chrF++ exactly as sacrebleu 2.x's `CHRF` computes them with its defaults
//! (`lowercase=False`, `whitespace=False`, `eps_smoothing=False`).
//!
//! Character n-grams (orders 1 to `char_order`) are taken over each segment with all white space
//! removed; word n-grams (orders 1 to `word_order`; 2 gives chrF++) over its white-space tokens,
//! with one ASCII punctuation character split off the end of a token (or else off its start).
//! For every sentence the statistics of the reference with the best sentence-level F-score are
//! kept (the first on a tie); the corpus score is computed once from their sums: the precisions
//! and recalls of the orders where both hypothesis and reference have n-grams are averaged, and
//! combined as `(1 + β²)·P·R / (β²·P + R)`.

use std::collections::HashMap;
use std::hash::Hash;

use crate::{check_streams, is_py_space, py_split, Error, Result};

/// sacrebleu's default character n-gram order.
pub const CHAR_ORDER: usize = 6;
/// Word n-gram order of chrF++ (chrF has 0).
pub const CHRF_PP_WORD_ORDER: usize = 2;
/// sacrebleu's default β (recall weighs β times as much as precision).
pub const BETA: u32 = 2;

/// Corpus chrF (`word_order = 0`) or chrF++ (`word_order = 2`) of `hyps` against reference
/// streams (`refs[k][i]` is the k-th reference of `hyps[i]`), 0–100. sacrebleu's defaults are
/// `char_order` [`CHAR_ORDER`] and `beta` [`BETA`].
///
/// Errors if there is no hypothesis or no stream, if a stream does not hold exactly one reference
/// per hypothesis, or if `char_order + word_order` is 0.
pub fn corpus_chrf<H: AsRef<str>, R: AsRef<str>>(
    hyps: &[H],
    refs: &[Vec<R>],
    char_order: usize,
    word_order: usize,
    beta: u32,
) -> Result<f64> {
    check_streams(hyps, refs)?;
    let order = char_order + word_order;
    if order == 0 {
        return Err(Error::InvalidArgument {
            name: "char_order + word_order",
            expected: "at least 1",
            found: "0".into(),
        });
    }
    let factor = f64::from(beta) * f64::from(beta);
    let mut corpus = vec![0u64; 3 * order];
    for (i, hyp) in hyps.iter().enumerate() {
        let hyp_units = Units::new(hyp.as_ref(), word_order);
        let hyp_counts = hyp_units.counts(char_order, word_order);
        let mut best: Option<(f64, Vec<u64>)> = None;
        for stream in refs {
            let ref_units = Units::new(stream[i].as_ref(), word_order);
            let stats = hyp_counts.match_statistics(&ref_units.counts(char_order, word_order));
            let f = f_score(&stats, factor);
            if best.as_ref().is_none_or(|(best_f, _)| f > *best_f) {
                best = Some((f, stats));
            }
        }
        if let Some((_, stats)) = best {
            for (total, s) in corpus.iter_mut().zip(stats) {
                *total += s;
            }
        }
    }
    Ok(f_score(&corpus, factor))
}

/// The characters (white space removed) and words (punctuation split off) of one segment.
struct Units<'t> {
    chars: Vec<char>,
    words: Vec<&'t str>,
}

impl<'t> Units<'t> {
    fn new(text: &'t str, word_order: usize) -> Self {
        Units {
            chars: text.chars().filter(|&c| !is_py_space(c)).collect(),
            words: if word_order > 0 { split_punctuation(text) } else { Vec::new() },
        }
    }

    fn counts(&self, char_order: usize, word_order: usize) -> Counts<'_, 't> {
        Counts {
            chars: (1..=char_order).map(|n| counts(&self.chars, n)).collect(),
            words: (1..=word_order).map(|n| counts(&self.words, n)).collect(),
        }
    }
}

/// N-gram counts per order: characters, then words.
struct Counts<'u, 't> {
    chars: Vec<HashMap<&'u [char], u64>>,
    words: Vec<HashMap<&'u [&'t str], u64>>,
}

impl Counts<'_, '_> {
    /// `[hyp, ref, match]` per order, as sacrebleu's `_get_match_statistics`.
    fn match_statistics(&self, reference: &Counts<'_, '_>) -> Vec<u64> {
        let mut stats = Vec::with_capacity(3 * (self.chars.len() + self.words.len()));
        for (h, r) in self.chars.iter().zip(&reference.chars) {
            stats.extend(order_statistics(h, r));
        }
        for (h, r) in self.words.iter().zip(&reference.words) {
            stats.extend(order_statistics(h, r));
        }
        stats
    }
}

fn counts<T: Eq + Hash>(units: &[T], n: usize) -> HashMap<&[T], u64> {
    let mut m = HashMap::new();
    if units.len() >= n {
        for g in units.windows(n) {
            *m.entry(g).or_insert(0) += 1;
        }
    }
    m
}

/// Hypothesis n-grams (0 when the reference has none of this order), reference n-grams, and
/// clipped matches.
fn order_statistics<K: Eq + Hash>(hyp: &HashMap<K, u64>, reference: &HashMap<K, u64>) -> [u64; 3] {
    let mut matched = 0;
    let mut hyp_count = 0;
    for (g, &c) in hyp {
        hyp_count += c;
        if let Some(&r) = reference.get(g) {
            matched += c.min(r);
        }
    }
    let ref_count = reference.values().sum();
    [if reference.is_empty() { 0 } else { hyp_count }, ref_count, matched]
}

/// sacrebleu's `CHRF._compute_f_score` with `eps_smoothing=False`, 0–100.
fn f_score(stats: &[u64], factor: f64) -> f64 {
    let mut avg_prec = 0.0;
    let mut avg_rec = 0.0;
    let mut effective_order = 0u32;
    for s in stats.chunks_exact(3) {
        let (n_hyp, n_ref, n_match) = (s[0], s[1], s[2]);
        if n_hyp > 0 && n_ref > 0 {
            avg_prec += n_match as f64 / n_hyp as f64;
            avg_rec += n_match as f64 / n_ref as f64;
            effective_order += 1;
        }
    }
    if effective_order == 0 {
        return 0.0;
    }
    avg_prec /= f64::from(effective_order);
    avg_rec /= f64::from(effective_order);
    if avg_prec + avg_rec == 0.0 {
        return 0.0;
    }
    let score = (1.0 + factor) * avg_prec * avg_rec / (factor * avg_prec + avg_rec);
    100.0 * score
}

/// sacrebleu's `CHRF._remove_punctuation`: white-space tokens, with one ASCII punctuation
/// character split off the end of a token, or else off its start.
fn split_punctuation(sent: &str) -> Vec<&str> {
    let mut out = Vec::new();
    for w in py_split(sent) {
        let mut chars = w.chars();
        let (Some(first), Some(last)) = (chars.next(), chars.next_back()) else {
            out.push(w); // a single character
            continue;
        };
        if last.is_ascii_punctuation() {
            let cut = w.len() - last.len_utf8();
            out.extend([&w[..cut], &w[cut..]]);
        } else if first.is_ascii_punctuation() {
            let cut = first.len_utf8();
            out.extend([&w[..cut], &w[cut..]]);
        } else {
            out.push(w);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn punctuation_split_as_sacrebleu() {
        assert_eq!(
            split_punctuation("(hello) world, \"x\" ! ab"),
            ["(hello", ")", "world", ",", "\"x", "\"", "!", "ab"]
        );
        assert_eq!(split_punctuation("-x"), ["-", "x"]);
    }

    #[test]
    fn identical_is_100_and_empty_is_0() {
        let refs = vec![vec!["The quick brown fox.", "नमस्ते दुनिया"]];
        let s = corpus_chrf(&["The quick brown fox.", "नमस्ते दुनिया"], &refs, 6, 2, 2).unwrap();
        assert!((s - 100.0).abs() < 1e-9);
        assert_eq!(corpus_chrf(&["", ""], &refs, 6, 0, 2).unwrap(), 0.0);
    }

    #[test]
    fn unequal_counts_and_zero_order_are_errors() {
        let err = corpus_chrf(&["a"], &[vec!["a", "b"]], 6, 0, 2).unwrap_err();
        assert_eq!(err.to_string(), "expected 1 references in stream 0 (one per hypothesis), found 2");
        let err = corpus_chrf(&["a"], &[vec!["a"]], 0, 0, 2).unwrap_err();
        assert_eq!(err.to_string(), "char_order + word_order: expected at least 1, found 0");
    }
}
