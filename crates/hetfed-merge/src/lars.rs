//! Layer-wise trust ratios in the manner of LARS (You et al. 2017, arXiv 1708.03888): no
//! parameter's update may be large relative to the parameter itself.
//!
//! For each parameter `W` with update `Δ`, [`trust_ratio`] applies
//!
//! ```text
//! Δ ← Δ · min(1, c·R / ‖Δ‖),   R = ‖W‖
//! ```
//!
//! **Zero parameters.** A parameter with `‖W‖ = 0` (a bias or a LoRA-B initialised at zero) has no
//! scale of its own, and capping at `c·0` would freeze it forever. It is instead capped at the norm
//! it would have if its elements had the model's typical magnitude:
//! `R = sqrt(numel(W)) · ‖W_all‖ / sqrt(numel_all)`, the root mean square of every element of
//! `global` times `sqrt(numel(W))`. When the whole global model is zero, such parameters are left
//! untouched.

use std::collections::BTreeMap;

use hetfed_core::{Error, Result, TensorMap};

use crate::{check_shape, norm};

/// Caps every parameter's update at `c` times the parameter's norm (see the module docs), in
/// place. Returns the factor applied to each parameter of `delta` (1.0 where it was left alone).
/// Every parameter of `delta` must exist in `global` with the same shape, and be finite.
pub fn trust_ratio(global: &TensorMap, delta: &mut TensorMap, c: f64) -> Result<BTreeMap<String, f64>> {
    if !(c > 0.0 && c.is_finite()) {
        return Err(Error::msg(format!("trust ratio: expected a positive finite c, found {c}")));
    }
    let mut w_norms = BTreeMap::new();
    let (mut sq_all, mut n_all) = (0.0f64, 0usize);
    for name in delta.keys() {
        let w = global.get(name).ok_or_else(|| {
            Error::msg(format!("update names parameter `{name}`, which the global model does not have"))
        })?;
        check_shape(name, w, &delta[name], "the update")?;
        let n = norm(w)?;
        if !n.is_finite() {
            return Err(Error::msg(format!(
                "parameter `{name}` of the global model: expected finite values, found norm {n}"
            )));
        }
        w_norms.insert(name.clone(), n);
    }
    // The typical element magnitude, only needed when some parameter is zero.
    if w_norms.values().any(|n| *n == 0.0) {
        for w in global.values() {
            let n = norm(w)?;
            if n.is_finite() {
                sq_all += n * n;
                n_all += w.elem_count();
            }
        }
    }
    let rms_all = if n_all == 0 { 0.0 } else { (sq_all / n_all as f64).sqrt() };

    let mut factors = BTreeMap::new();
    for (name, d) in delta.iter_mut() {
        let d_norm = norm(d)?;
        if !d_norm.is_finite() {
            return Err(Error::msg(format!(
                "parameter `{name}` of the update: expected finite values, found norm {d_norm}"
            )));
        }
        let w_norm = w_norms[name];
        let reference = if w_norm > 0.0 { w_norm } else { rms_all * (d.elem_count() as f64).sqrt() };
        let cap = c * reference;
        let f = if reference > 0.0 && d_norm > cap { cap / d_norm } else { 1.0 };
        if f != 1.0 {
            *d = (&*d * f)?;
        }
        factors.insert(name.clone(), f);
    }
    Ok(factors)
}

/// `‖W‖ / ‖Δ‖` per parameter, for logging how large each layer's step was relative to the layer.
/// Parameters missing from `global`, with a different shape there, or with `‖Δ‖ = 0` are left out.
pub fn layer_rates(global: &TensorMap, delta: &TensorMap) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for (name, d) in delta {
        let Some(w) = global.get(name) else { continue };
        if w.dims() != d.dims() {
            continue;
        }
        if let (Ok(wn), Ok(dn)) = (norm(w), norm(d)) {
            if dn > 0.0 {
                out.insert(name.clone(), wn / dn);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;
    use proptest::prelude::*;

    fn pair() -> impl Strategy<Value = (Vec<f32>, Vec<f32>)> {
        (1usize..40).prop_flat_map(|n| {
            (proptest::collection::vec(-2.0f32..2.0, n), proptest::collection::vec(-10.0f32..10.0, n))
        })
    }

    proptest! {
        #[test]
        fn never_leaves_an_update_above_the_cap(params in proptest::collection::vec(pair(), 1..5), c in 0.001f64..2.0) {
            let mut global = TensorMap::new();
            let mut delta = TensorMap::new();
            for (i, (w, d)) in params.iter().enumerate() {
                global.insert(format!("p{i}"), t(w, &[w.len()]));
                delta.insert(format!("p{i}"), t(d, &[d.len()]));
            }
            let before = delta.clone();
            let f = trust_ratio(&global, &mut delta, c).unwrap();
            for (name, d) in &delta {
                let (wn, dn) = (norm(&global[name]).unwrap(), norm(d).unwrap());
                if wn > 0.0 {
                    prop_assert!(dn <= c * wn * (1.0 + 1e-5) + 1e-12, "{name}: {dn} > {c}·{wn}");
                }
                prop_assert!(f[name] > 0.0 && f[name] <= 1.0);
                // The factor reported is the factor applied.
                let expect: Vec<f32> = v(&before[name]).iter().map(|x| (*x as f64 * f[name]) as f32).collect();
                prop_assert!(close(&v(d), &expect, 1e-5));
            }
        }

        #[test]
        fn leaves_small_updates_unchanged(
            (w, d) in pair(),
            c in 0.001f64..2.0,
            shrink in 0.0f64..0.99,
        ) {
            let wt = t(&w, &[w.len()]);
            let (wn, dn) = (norm(&wt).unwrap(), norm(&t(&d, &[d.len()])).unwrap());
            prop_assume!(wn > 0.0 && dn > 0.0);
            let k = shrink * c * wn / dn;
            let small: Vec<f32> = d.iter().map(|x| (*x as f64 * k) as f32).collect();
            let global: TensorMap = [("p".to_string(), wt)].into();
            let mut delta: TensorMap = [("p".to_string(), t(&small, &[small.len()]))].into();
            let f = trust_ratio(&global, &mut delta, c).unwrap();
            prop_assert_eq!(f["p"], 1.0);
            prop_assert_eq!(v(&delta["p"]), small);
        }
    }

    #[test]
    fn zero_parameters_are_capped_by_the_model_scale() {
        // Global: 4 elements of magnitude 1 and a zero bias of 4 elements: rms = sqrt(4/8).
        let global = map(&[("w", &[1.0, -1.0, 1.0, -1.0]), ("b", &[0.0; 4])]);
        let mut delta = map(&[("w", &[0.0; 4]), ("b", &[10.0, 0.0, 0.0, 0.0])]);
        let f = trust_ratio(&global, &mut delta, 0.1).unwrap();
        let cap = 0.1 * (0.5f64).sqrt() * 2.0;
        assert!((f["b"] - cap / 10.0).abs() < 1e-9);
        assert!((norm(&delta["b"]).unwrap() - cap).abs() < 1e-6);
        assert_eq!(f["w"], 1.0);
        // An all-zero model leaves the update alone.
        let zero = map(&[("b", &[0.0; 4])]);
        let mut d = map(&[("b", &[10.0, 0.0, 0.0, 0.0])]);
        assert_eq!(trust_ratio(&zero, &mut d, 0.1).unwrap()["b"], 1.0);
    }

    #[test]
    fn bad_input_is_an_error_not_a_panic() {
        let global = map(&[("w", &[1.0, 2.0])]);
        assert!(trust_ratio(&global, &mut map(&[("w", &[1.0, 2.0, 3.0])]), 0.1).is_err());
        assert!(trust_ratio(&global, &mut map(&[("x", &[1.0, 2.0])]), 0.1).is_err());
        assert!(trust_ratio(&global, &mut map(&[("w", &[f32::NAN, 2.0])]), 0.1).is_err());
        assert!(trust_ratio(&global, &mut map(&[("w", &[1.0, 2.0])]), f64::NAN).is_err());
        assert!(trust_ratio(&global, &mut map(&[("w", &[1.0, 2.0])]), 0.0).is_err());
    }

    #[test]
    fn layer_rates_are_norm_ratios() {
        let global = map(&[("w", &[3.0, 4.0]), ("z", &[1.0])]);
        let delta = map(&[("w", &[0.3, 0.4]), ("z", &[0.0]), ("missing", &[1.0])]);
        let r = layer_rates(&global, &delta);
        assert_eq!(r.len(), 1);
        assert!((r["w"] - 10.0).abs() < 1e-6);
    }
}
