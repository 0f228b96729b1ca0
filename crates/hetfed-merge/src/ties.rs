//! TIES-Merging (Yadav et al. 2023, "TIES-Merging: Resolving Interference When Merging Models",
//! arXiv 2306.01708), with per-delta weights.
//!
//! For each parameter, with deltas `τ_i` and weights `w_i ≥ 0`:
//!
//! 1. **Trim**: keep the `k = ceil(top_k · numel)` largest-magnitude entries of each `τ_i`
//!    (every entry whose magnitude is at least the `k`-th largest, so ties at the threshold are
//!    all kept), zero the rest: `τ̂_i`.
//! 2. **Elect**: `γ_j = sign(Σ_i w_i · τ̂_ij)` for every entry `j` (0 when the sum vanishes up to
//!    rounding, i.e. `|Σ| ≤ 1e-9 · Σ|w_i τ̂_ij|`).
//! 3. **Disjoint mean**: over `A_j = {i : τ̂_ij ≠ 0, sign(τ̂_ij) = γ_j}`,
//!    `τ_j = Σ_{i∈A_j} w_i τ̂_ij / Σ_{i∈A_j} w_i` (0 when `A_j` is empty or has weight 0).
//!
//! The paper's unweighted version is `w_i = 1`. A parameter missing from some deltas counts as
//! zero there (those deltas then take no part in its mean). The result has no global scale:
//! multiply by the paper's `λ` (or the server learning rate) when applying it. Memory: one f64
//! accumulator pair per parameter plus one delta's copy at a time.

use hetfed_core::{Error, Result, TensorMap};

use crate::{check_shape, from_f32_vec, to_f32_vec};

/// Merges weighted deltas by TIES (see the module docs). `top_k` in `(0, 1]` is the fraction of
/// each delta's entries kept per parameter; 1 keeps everything (sign election and disjoint mean
/// only). Errs on an empty list, a negative or non-finite weight, weights that are all zero, a
/// shape that differs between deltas, or non-finite values.
pub fn ties_merge(deltas: &[(f64, &TensorMap)], top_k: f64) -> Result<TensorMap> {
    if deltas.is_empty() {
        return Err(Error::msg("TIES merge: expected at least one delta, found none"));
    }
    if !(top_k > 0.0 && top_k <= 1.0) {
        return Err(Error::msg(format!("TIES merge: expected top_k in (0, 1], found {top_k}")));
    }
    for (i, (w, _)) in deltas.iter().enumerate() {
        if !(*w >= 0.0 && w.is_finite()) {
            return Err(Error::msg(format!("TIES merge: delta {i}: expected a weight >= 0, found {w}")));
        }
    }
    if deltas.iter().all(|(w, _)| *w == 0.0) {
        return Err(Error::msg("TIES merge: expected at least one positive weight, found all zero"));
    }
    let mut names: Vec<&String> = deltas.iter().flat_map(|(_, m)| m.keys()).collect();
    names.sort();
    names.dedup();

    let mut out = TensorMap::new();
    for name in names {
        let present: Vec<(usize, f64, &candle_core::Tensor)> =
            deltas.iter().enumerate().filter_map(|(i, (w, m))| m.get(name).map(|t| (i, *w, t))).collect();
        let like = present[0].2;
        for (i, _, t) in &present[1..] {
            check_shape(name, like, t, &format!("delta {i}"))?;
        }
        let n = like.elem_count();
        let keep = ((top_k * n as f64).ceil() as usize).clamp(1, n.max(1));

        // Pass 1: per-delta thresholds and the weighted sum that elects the sign.
        let mut thresholds = Vec::with_capacity(present.len());
        let mut sum = vec![0.0f64; n];
        let mut abs_sum = vec![0.0f64; n];
        for (i, w, t) in &present {
            let x = to_f32_vec(t)?;
            if x.iter().any(|v| !v.is_finite()) {
                return Err(Error::msg(format!(
                    "TIES merge: parameter `{name}` of delta {i}: expected finite values, found NaN or infinity"
                )));
            }
            let thr = kth_largest_magnitude(&x, keep);
            thresholds.push(thr);
            for ((s, a), v) in sum.iter_mut().zip(abs_sum.iter_mut()).zip(&x) {
                if v.abs() >= thr {
                    let c = w * f64::from(*v);
                    *s += c;
                    *a += c.abs();
                }
            }
        }
        let sign: Vec<f64> =
            sum.iter().zip(&abs_sum).map(|(s, a)| if s.abs() <= 1e-9 * a { 0.0 } else { s.signum() }).collect();
        drop(sum);
        drop(abs_sum);

        // Pass 2: disjoint mean over the entries that agree with the elected sign.
        let mut num = vec![0.0f64; n];
        let mut den = vec![0.0f64; n];
        for ((_, w, t), thr) in present.iter().zip(&thresholds) {
            let x = to_f32_vec(t)?;
            for (j, v) in x.iter().enumerate() {
                if *v != 0.0 && v.abs() >= *thr && f64::from(v.signum()) == sign[j] {
                    num[j] += w * f64::from(*v);
                    den[j] += w;
                }
            }
        }
        let merged: Vec<f32> = num.iter().zip(&den).map(|(a, b)| if *b > 0.0 { (a / b) as f32 } else { 0.0 }).collect();
        out.insert(name.clone(), from_f32_vec(merged, like)?);
    }
    Ok(out)
}

/// The `k`-th largest `|x|` (1-based; `k ≤ len`), or 0 for an empty slice.
fn kth_largest_magnitude(x: &[f32], k: usize) -> f32 {
    if x.is_empty() {
        return 0.0;
    }
    if k >= x.len() {
        return 0.0; // everything is kept (zeros contribute nothing)
    }
    let mut mags: Vec<f32> = x.iter().map(|v| v.abs()).collect();
    let (_, kth, _) = mags.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
    *kth
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;
    use proptest::prelude::*;

    fn delta_map(n: usize) -> impl Strategy<Value = TensorMap> {
        (proptest::collection::vec(-1.0f32..1.0, n), proptest::collection::vec(-1.0f32..1.0, 2 * n)).prop_map(
            |(a, b)| {
                let mut m = TensorMap::new();
                m.insert("a".into(), t(&a, &[a.len()]));
                m.insert("b".into(), t(&b, &[2, b.len() / 2]));
                m
            },
        )
    }

    proptest! {
        #[test]
        fn identical_deltas_with_top_k_one_give_the_delta(
            d in (1usize..20).prop_flat_map(delta_map),
            weights in proptest::collection::vec(0.01f64..5.0, 1..5),
        ) {
            let deltas: Vec<(f64, &TensorMap)> = weights.iter().map(|w| (*w, &d)).collect();
            let m = ties_merge(&deltas, 1.0).unwrap();
            prop_assert!(maps_close(&m, &d, 1e-6));
        }

        #[test]
        fn a_single_delta_with_top_k_one_is_unchanged(d in (1usize..20).prop_flat_map(delta_map), w in 0.01f64..5.0) {
            let m = ties_merge(&[(w, &d)], 1.0).unwrap();
            prop_assert!(maps_close(&m, &d, 0.0));
        }

        #[test]
        fn order_of_deltas_does_not_matter(
            (ds, perm) in (1usize..12).prop_flat_map(|n| proptest::collection::vec((0.01f64..5.0, delta_map(n)), 1..5))
                .prop_flat_map(|ds| { let idx: Vec<usize> = (0..ds.len()).collect(); (Just(ds), Just(idx).prop_shuffle()) }),
            top_k in 0.05f64..1.0,
        ) {
            let a: Vec<(f64, &TensorMap)> = ds.iter().map(|(w, m)| (*w, m)).collect();
            let b: Vec<(f64, &TensorMap)> = perm.iter().map(|i| (ds[*i].0, &ds[*i].1)).collect();
            let ma = ties_merge(&a, top_k).unwrap();
            let mb = ties_merge(&b, top_k).unwrap();
            prop_assert!(maps_close(&ma, &mb, 1e-6));
        }
    }

    #[test]
    fn trims_elects_and_takes_the_disjoint_mean() {
        let d1 = map(&[("p", &[1.0, -2.0, 0.1, 3.0])]);
        let d2 = map(&[("p", &[-1.0, -4.0, 0.2, 0.5])]);
        let d3 = map(&[("p", &[-0.5, 6.0, 0.05, 0.0])]);
        // top_k 0.5 of 4 entries keeps 2 per delta:
        // d1 → [0, -2, 0, 3], d2 → [-1, -4, 0, 0], d3 → [-0.5, 6, 0, 0].
        // Weighted sums (w = 1, 1, 2): [-2, 6, 0, 3] → signs [-, +, 0, +].
        // Agreeing: entry 0: d2, d3 → (-1 + 2·-0.5)/3; entry 1: d3 → 6; entry 3: d1 → 3.
        let m = ties_merge(&[(1.0, &d1), (1.0, &d2), (2.0, &d3)], 0.5).unwrap();
        assert!(close(&v(&m["p"]), &[-2.0 / 3.0, 6.0, 0.0, 3.0], 1e-6), "{:?}", v(&m["p"]));
    }

    #[test]
    fn missing_parameters_count_as_zero() {
        let d1 = map(&[("p", &[1.0, -1.0]), ("q", &[2.0])]);
        let d2 = map(&[("p", &[3.0, -3.0])]);
        let m = ties_merge(&[(1.0, &d1), (1.0, &d2)], 1.0).unwrap();
        assert!(close(&v(&m["p"]), &[2.0, -2.0], 1e-6));
        assert!(close(&v(&m["q"]), &[2.0], 1e-6));
    }

    #[test]
    fn bad_input_is_an_error_not_a_panic() {
        let d = map(&[("p", &[1.0, 2.0])]);
        let other = map(&[("p", &[1.0, 2.0, 3.0])]);
        let nan = map(&[("p", &[f32::NAN, 2.0])]);
        assert!(ties_merge(&[], 0.5).is_err());
        assert!(ties_merge(&[(1.0, &d), (1.0, &other)], 0.5).is_err());
        assert!(ties_merge(&[(f64::NAN, &d)], 0.5).is_err());
        assert!(ties_merge(&[(-1.0, &d)], 0.5).is_err());
        assert!(ties_merge(&[(0.0, &d)], 0.5).is_err());
        assert!(ties_merge(&[(1.0, &nan)], 0.5).is_err());
        assert!(ties_merge(&[(1.0, &d)], 0.0).is_err());
        assert!(ties_merge(&[(1.0, &d)], 1.5).is_err());
        let empty = map(&[("e", &[])]);
        assert_eq!(ties_merge(&[(1.0, &empty)], 0.5).unwrap()["e"].elem_count(), 0);
    }
}
