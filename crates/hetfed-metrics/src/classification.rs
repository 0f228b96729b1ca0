//! Classification metrics as scikit-learn computes them (`accuracy_score`,
//! `f1_score(average="macro")`), as fractions in `[0, 1]`, and perplexity.

use std::collections::HashMap;
use std::hash::Hash;

use crate::{Error, Result};

fn check_pairs<L>(gold: &[L], pred: &[L]) -> Result<()> {
    if gold.is_empty() {
        return Err(Error::Empty { what: "gold label".into() });
    }
    if pred.len() != gold.len() {
        return Err(Error::LengthMismatch {
            what: "predictions (one per gold label)".into(),
            expected: gold.len(),
            found: pred.len(),
        });
    }
    Ok(())
}

/// The fraction of predictions equal to their gold label.
///
/// Errors if there are no labels or the two slices differ in length.
pub fn accuracy<L: PartialEq>(gold: &[L], pred: &[L]) -> Result<f64> {
    check_pairs(gold, pred)?;
    let correct = gold.iter().zip(pred).filter(|(g, p)| g == p).count();
    Ok(correct as f64 / gold.len() as f64)
}

/// The unweighted mean over labels of the per-label F1 `2·tp / (2·tp + fp + fn)`, the labels
/// being every label that occurs in `gold` or `pred` (scikit-learn's default label set): a label
/// that is only ever predicted, or never predicted, scores 0.
///
/// Errors if there are no labels or the two slices differ in length.
pub fn macro_f1<L: Eq + Hash>(gold: &[L], pred: &[L]) -> Result<f64> {
    check_pairs(gold, pred)?;
    // Per label: (true positives, false positives, false negatives), in first-seen order.
    let mut index: HashMap<&L, usize> = HashMap::new();
    let mut counts: Vec<[u64; 3]> = Vec::new();
    let mut slot = |label| {
        *index.entry(label).or_insert_with(|| {
            counts.push([0; 3]);
            counts.len() - 1
        })
    };
    let pairs: Vec<(usize, usize)> = gold.iter().zip(pred).map(|(g, p)| (slot(g), slot(p))).collect();
    for (g, p) in pairs {
        if g == p {
            counts[g][0] += 1;
        } else {
            counts[p][1] += 1;
            counts[g][2] += 1;
        }
    }
    let sum: f64 = counts
        .iter()
        .map(|&[tp, fp, fn_]| {
            let denom = 2 * tp + fp + fn_;
            if denom == 0 {
                0.0
            } else {
                (2 * tp) as f64 / denom as f64
            }
        })
        .sum();
    Ok(sum / counts.len() as f64)
}

/// `exp(sum_nll / n_tokens)`: the perplexity of a model that gave `n_tokens` tokens a summed
/// negative log-likelihood (natural log) of `sum_nll`.
///
/// Errors if `n_tokens` is 0 or `sum_nll` is negative or not finite.
pub fn perplexity(sum_nll: f64, n_tokens: u64) -> Result<f64> {
    if n_tokens == 0 {
        return Err(Error::InvalidArgument { name: "n_tokens", expected: "at least 1 token", found: "0".into() });
    }
    if !sum_nll.is_finite() || sum_nll < 0.0 {
        return Err(Error::InvalidArgument {
            name: "sum_nll",
            expected: "a finite, non-negative sum of negative log-likelihoods",
            found: sum_nll.to_string(),
        });
    }
    Ok((sum_nll / n_tokens as f64).exp())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accuracy_and_macro_f1() {
        let gold = ["a", "b", "c", "c"];
        let pred = ["a", "a", "c", "c"];
        assert_eq!(accuracy(&gold, &pred).unwrap(), 0.75);
        // a: tp 1, fp 1 -> 2/3; b: fn 1 -> 0; c: 1.
        assert!((macro_f1(&gold, &pred).unwrap() - (2.0 / 3.0 + 1.0) / 3.0).abs() < 1e-15);
        // A label only predicted counts, with F1 0.
        assert_eq!(macro_f1(&[1, 1], &[1, 2]).unwrap(), (2.0 / 3.0) / 2.0);
    }

    #[test]
    fn errors_say_what_is_wrong() {
        assert_eq!(
            accuracy(&[1, 2], &[1]).unwrap_err().to_string(),
            "expected 2 predictions (one per gold label), found 1"
        );
        assert_eq!(macro_f1::<u8>(&[], &[]).unwrap_err().to_string(), "expected at least one gold label, found none");
        assert_eq!(perplexity(1.0, 0).unwrap_err().to_string(), "n_tokens: expected at least 1 token, found 0");
        assert_eq!(
            perplexity(f64::NAN, 3).unwrap_err().to_string(),
            "sum_nll: expected a finite, non-negative sum of negative log-likelihoods, found NaN"
        );
    }

    #[test]
    fn perplexity_is_exp_mean_nll() {
        assert_eq!(perplexity(0.0, 5).unwrap(), 1.0);
        let p = perplexity(10.0 * 2f64.ln(), 10).unwrap();
        assert!((p - 2.0).abs() < 1e-12);
    }
}
