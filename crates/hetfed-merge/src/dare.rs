//! DARE, "Drop And REscale" (Yu et al. 2023, "Language Models are Super Mario", arXiv
//! 2311.03099): most of a fine-tuning delta is redundant, and dropping entries at random while
//! rescaling the survivors keeps the delta's expectation:
//!
//! ```text
//! m_j ~ Bernoulli(p),   τ̃_j = (1 − m_j) · τ_j / (1 − p),   E[τ̃] = τ
//! ```
//!
//! The mask of each parameter comes from a generator seeded with `seed` mixed with a stable
//! (FNV-1a) hash of the parameter name, so the result depends only on `(delta, p, seed)`: not on
//! which other parameters the map holds, nor on the platform.

use rand::{Rng, SeedableRng};

use hetfed_core::{Error, Result, TensorMap};

use crate::{check_finite_map, fnv1a, from_f32_vec, mix, to_f32_vec};

/// Drops each entry of `delta` with probability `drop` in `[0, 1)` and scales the survivors by
/// `1/(1 − drop)` (see the module docs). `drop = 0` returns the delta unchanged. Errs on a `drop`
/// outside `[0, 1)` or non-finite values. The result is f32.
pub fn dare(delta: &TensorMap, drop: f64, seed: u64) -> Result<TensorMap> {
    if !(0.0..1.0).contains(&drop) {
        return Err(Error::msg(format!("DARE: expected a drop probability in [0, 1), found {drop}")));
    }
    check_finite_map(delta, "the DARE input")?;
    if drop == 0.0 {
        return Ok(delta.clone());
    }
    let scale = 1.0 / (1.0 - drop);
    let mut out = TensorMap::new();
    for (name, t) in delta {
        let mut rng = rand::rngs::StdRng::seed_from_u64(mix(seed, fnv1a(name)));
        let x = to_f32_vec(t)?;
        let y: Vec<f32> =
            x.iter().map(|v| if rng.random::<f64>() < drop { 0.0 } else { (f64::from(*v) * scale) as f32 }).collect();
        out.insert(name.clone(), from_f32_vec(y, t)?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn drop_zero_is_the_identity(x in proptest::collection::vec(-5.0f32..5.0, 0..50), seed in any::<u64>()) {
            let d = map(&[("p", &x)]);
            let out = dare(&d, 0.0, seed).unwrap();
            prop_assert_eq!(v(&out["p"]), x);
        }

        #[test]
        fn survivors_are_rescaled_and_the_rest_dropped(
            x in proptest::collection::vec(0.1f32..5.0, 1..50),
            p in 0.0f64..0.95,
            seed in any::<u64>(),
        ) {
            let out = dare(&map(&[("p", &x)]), p, seed).unwrap();
            for (a, b) in x.iter().zip(v(&out["p"])) {
                prop_assert!(b == 0.0 || (f64::from(b) - f64::from(*a) / (1.0 - p)).abs() < 1e-5 * f64::from(b));
            }
        }
    }

    #[test]
    fn preserves_the_expectation() {
        let x: Vec<f32> = (0..64).map(|i| (i as f32 - 31.5) / 8.0).collect();
        let d = map(&[("layer.weight", &x)]);
        let seeds = 4000;
        let mut mean = vec![0.0f64; x.len()];
        for s in 0..seeds {
            for (m, y) in mean.iter_mut().zip(v(&dare(&d, 0.7, s).unwrap()["layer.weight"])) {
                *m += f64::from(y) / seeds as f64;
            }
        }
        // Per entry the standard error is |x|·sqrt(p/(1−p)/seeds) ≈ 0.024·|x|: allow 5 sigma.
        for (m, x) in mean.iter().zip(&x) {
            let x = f64::from(*x);
            assert!((m - x).abs() <= 0.12 * x.abs() + 1e-9, "mean {m} vs {x}");
        }
    }

    #[test]
    fn deterministic_under_seed_and_mixed_with_the_name() {
        let x: Vec<f32> = (1..=256).map(|i| i as f32).collect();
        let d = map(&[("a", &x), ("b", &x)]);
        let r1 = dare(&d, 0.5, 7).unwrap();
        let r2 = dare(&d, 0.5, 7).unwrap();
        assert_eq!(v(&r1["a"]), v(&r2["a"]));
        assert_ne!(v(&r1["a"]), v(&r1["b"]), "the name must change the mask");
        assert_ne!(v(&r1["a"]), v(&dare(&d, 0.5, 8).unwrap()["a"]), "the seed must change the mask");
        // A parameter's mask does not depend on the other parameters in the map.
        let alone = dare(&map(&[("b", &x)]), 0.5, 7).unwrap();
        assert_eq!(v(&alone["b"]), v(&r1["b"]));
        let kept = v(&r1["a"]).iter().filter(|y| **y != 0.0).count();
        assert!((90..=166).contains(&kept), "kept {kept} of 256 at p = 0.5");
    }

    #[test]
    fn bad_input_is_an_error_not_a_panic() {
        let d = map(&[("p", &[1.0, 2.0])]);
        assert!(dare(&d, 1.0, 0).is_err());
        assert!(dare(&d, -0.1, 0).is_err());
        assert!(dare(&d, f64::NAN, 0).is_err());
        assert!(dare(&map(&[("p", &[f32::INFINITY])]), 0.5, 0).is_err());
    }
}
