//! Forgetting protection for a server model that keeps absorbing updates.
//!
//! * [`fisher_damp`]: an EWC-style (Kirkpatrick et al. 2017, arXiv 1612.00796) damping of the
//!   update where the diagonal Fisher `F` of earlier tasks says the parameters matter:
//!   `Δ_j ← Δ_j / (1 + λ · F_j / mean(F))`, per parameter. This is the closed-form step of the
//!   quadratic penalty `λ/2·Σ F_j (w_j − w*_j)²` against a unit-curvature loss, with `F`
//!   normalised per parameter so `λ` does not depend on the Fisher's scale.
//! * [`OrthoMemory`]: in the spirit of O-LoRA (Wang et al. 2023, "Orthogonal Subspace Learning
//!   for Language Model Continual Learning", arXiv 2310.14152), keep an orthonormal basis of the
//!   directions earlier updates took (per parameter, flattened) and remove from new updates their
//!   components in that span: `Δ ← Δ − Σ_k (Δ·u_k) u_k` (modified Gram-Schmidt).

use std::collections::BTreeMap;

use candle_core::{DType, Tensor};
use hetfed_core::{Error, Result, TensorMap};

use crate::{check_finite, check_shape, dot, norm};

/// Damps `delta` in place by the diagonal Fisher (see the module docs), parameter by parameter;
/// parameters missing from `fisher`, or whose Fisher is all zero, are left untouched. Returns, per
/// parameter of `delta`, the fraction of its norm kept `‖Δ'‖/‖Δ‖` (1 when `‖Δ‖ = 0` or
/// untouched). Errs on a negative or non-finite `strength`, a Fisher of another shape, or a
/// Fisher with negative or non-finite entries.
pub fn fisher_damp(delta: &mut TensorMap, fisher: &TensorMap, strength: f64) -> Result<BTreeMap<String, f64>> {
    if !(strength >= 0.0 && strength.is_finite()) {
        return Err(Error::msg(format!("Fisher damping: expected a strength >= 0, found {strength}")));
    }
    // Validate everything before changing anything.
    let mut means = BTreeMap::new();
    for (name, d) in delta.iter() {
        let Some(f) = fisher.get(name) else { continue };
        check_shape(name, d, f, "the Fisher")?;
        let f64s = f.flatten_all()?.to_dtype(DType::F64)?;
        let min = if f.elem_count() == 0 { 0.0 } else { f64s.min(0)?.to_scalar::<f64>()? };
        let sum = f64s.sum_all()?.to_scalar::<f64>()?;
        if !(min >= 0.0 && sum.is_finite()) {
            return Err(Error::msg(format!(
                "parameter `{name}` of the Fisher: expected finite values >= 0, found minimum {min}, sum {sum}"
            )));
        }
        let mean = if f.elem_count() == 0 { 0.0 } else { sum / f.elem_count() as f64 };
        means.insert(name.clone(), mean);
    }
    let mut kept = BTreeMap::new();
    for (name, d) in delta.iter_mut() {
        let mean = means.get(name).copied().unwrap_or(0.0);
        if strength == 0.0 || mean <= 0.0 {
            kept.insert(name.clone(), 1.0);
            continue;
        }
        let before = norm(d)?;
        let denom = fisher[name].to_dtype(d.dtype())?.affine(strength / mean, 1.0)?;
        *d = d.div(&denom)?;
        let after = norm(d)?;
        kept.insert(name.clone(), if before > 0.0 { after / before } else { 1.0 });
    }
    Ok(kept)
}

/// An orthonormal basis, per parameter, of the directions of remembered updates (see the module
/// docs). At most `max_per_param` vectors are kept per parameter; the oldest go first.
#[derive(Debug, Clone, Default)]
pub struct OrthoMemory {
    max_per_param: usize,
    /// Per parameter, orthonormal 1-D f32 vectors of the parameter's element count, oldest first.
    basis: BTreeMap<String, Vec<Tensor>>,
}

/// A residual below this fraction of the update's norm is treated as already in the span.
const RESIDUAL_EPS: f64 = 1e-6;

impl OrthoMemory {
    pub fn new(max_per_param: usize) -> Self {
        Self { max_per_param, basis: BTreeMap::new() }
    }

    pub fn max_per_param(&self) -> usize {
        self.max_per_param
    }

    /// The number of stored vectors, over all parameters.
    pub fn len(&self) -> usize {
        self.basis.values().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The number of stored vectors of one parameter.
    pub fn len_of(&self, param: &str) -> usize {
        self.basis.get(param).map_or(0, Vec::len)
    }

    /// Removes from `delta`, in place, its components in the span of the stored vectors of each
    /// parameter. Returns the fraction of the update's total squared norm removed (0 for a zero
    /// update). Parameters without stored vectors are untouched.
    pub fn project_out(&self, delta: &mut TensorMap) -> Result<f64> {
        let (mut total, mut removed) = (0.0, 0.0);
        for (name, d) in delta.iter_mut() {
            let before = dot(d, d)?;
            if !before.is_finite() {
                return Err(Error::msg(format!(
                    "parameter `{name}` of the update: expected finite values, found norm² {before}"
                )));
            }
            total += before;
            let Some(basis) = self.basis.get(name) else { continue };
            if basis.is_empty() {
                continue;
            }
            let r = self.residual(name, d, basis, 1)?;
            let after = dot(&r, &r)?;
            removed += (before - after).max(0.0);
            *d = r.reshape(d.dims())?.to_dtype(d.dtype())?;
        }
        Ok(if total > 0.0 { (removed / total).min(1.0) } else { 0.0 })
    }

    /// Adds, per parameter of `delta`, the normalised direction of its component orthogonal to
    /// the stored vectors (nothing when that component is negligible), dropping the oldest
    /// vectors beyond `max_per_param`.
    pub fn remember(&mut self, delta: &TensorMap) -> Result<()> {
        if self.max_per_param == 0 {
            return Ok(());
        }
        let mut additions = Vec::new();
        for (name, d) in delta {
            check_finite(name, d, "the update to remember")?;
            let dn = norm(d)?;
            if dn == 0.0 {
                continue;
            }
            let empty = Vec::new();
            let basis = self.basis.get(name).unwrap_or(&empty);
            // Two Gram-Schmidt passes ("twice is enough") keep the basis orthonormal in f32.
            let r = self.residual(name, d, basis, 2)?;
            let rn = norm(&r)?;
            if rn <= RESIDUAL_EPS * dn {
                continue;
            }
            additions.push((name.clone(), (r / rn)?));
        }
        for (name, u) in additions {
            let b = self.basis.entry(name).or_default();
            b.push(u);
            if b.len() > self.max_per_param {
                let excess = b.len() - self.max_per_param;
                b.drain(..excess);
            }
        }
        Ok(())
    }

    /// `d` (flattened, f32) minus its components along `basis`, in `passes` modified
    /// Gram-Schmidt sweeps.
    fn residual(&self, name: &str, d: &Tensor, basis: &[Tensor], passes: usize) -> Result<Tensor> {
        let mut r = d.flatten_all()?.to_dtype(DType::F32)?;
        if let Some(u) = basis.first() {
            if u.elem_count() != r.elem_count() {
                return Err(Error::msg(format!(
                    "parameter `{name}`: expected {} elements (as the remembered directions), found {} in the update",
                    u.elem_count(),
                    r.elem_count()
                )));
            }
        }
        for _ in 0..passes {
            for u in basis {
                let c = dot(&r, u)?;
                r = (r - (u * c)?)?;
            }
        }
        Ok(r)
    }

    /// The stored vectors as tensors named `ortho.{k}.{param}`, `k = 0` the oldest, for
    /// checkpointing.
    pub fn to_tensors(&self) -> TensorMap {
        let mut out = TensorMap::new();
        for (name, b) in &self.basis {
            for (k, u) in b.iter().enumerate() {
                out.insert(format!("ortho.{k}.{name}"), u.clone());
            }
        }
        out
    }

    /// Restores a memory from [`OrthoMemory::to_tensors`]. Per parameter the indices must run
    /// `0..n` and the vectors share one length; when `n > max_per_param` only the newest
    /// `max_per_param` are kept.
    pub fn from_tensors(max_per_param: usize, tensors: TensorMap) -> Result<Self> {
        let mut by_param: BTreeMap<String, BTreeMap<usize, Tensor>> = BTreeMap::new();
        for (key, t) in tensors {
            let parsed = key
                .strip_prefix("ortho.")
                .and_then(|rest| rest.split_once('.'))
                .and_then(|(k, name)| k.parse::<usize>().ok().filter(|_| !name.is_empty()).map(|k| (k, name)));
            let Some((k, name)) = parsed else {
                return Err(Error::msg(format!(
                    "orthogonal memory: expected tensors named `ortho.{{k}}.{{param}}`, found `{key}`"
                )));
            };
            if t.rank() != 1 {
                return Err(Error::msg(format!(
                    "orthogonal memory: `{key}`: expected a 1-D vector, found shape {:?}",
                    t.dims()
                )));
            }
            check_finite(&key, &t, "the orthogonal memory")?;
            by_param.entry(name.to_string()).or_default().insert(k, t.to_dtype(DType::F32)?);
        }
        let mut basis = BTreeMap::new();
        for (name, vecs) in by_param {
            let n = vecs.len();
            if vecs.keys().copied().ne(0..n) {
                return Err(Error::msg(format!(
                    "orthogonal memory: parameter `{name}`: expected indices 0..{n}, found {:?}",
                    vecs.keys().collect::<Vec<_>>()
                )));
            }
            let len = vecs[&0].elem_count();
            if let Some((k, t)) = vecs.iter().find(|(_, t)| t.elem_count() != len) {
                return Err(Error::msg(format!(
                    "orthogonal memory: `ortho.{k}.{name}`: expected {len} elements (as `ortho.0.{name}`), found {}",
                    t.elem_count()
                )));
            }
            let mut v: Vec<Tensor> = vecs.into_values().collect();
            if v.len() > max_per_param {
                v.drain(..v.len() - max_per_param);
            }
            if !v.is_empty() {
                basis.insert(name, v);
            }
        }
        Ok(Self { max_per_param, basis })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn zero_strength_is_the_identity(
            x in proptest::collection::vec(-5.0f32..5.0, 1..30),
            f in proptest::collection::vec(0.0f32..100.0, 30),
        ) {
            let mut d = map(&[("p", &x)]);
            let fisher = map(&[("p", &f[..x.len()])]);
            let kept = fisher_damp(&mut d, &fisher, 0.0).unwrap();
            prop_assert_eq!(v(&d["p"]), x);
            prop_assert_eq!(kept["p"], 1.0);
        }

        #[test]
        fn damping_never_grows_an_entry(
            x in proptest::collection::vec(-5.0f32..5.0, 1..30),
            f in proptest::collection::vec(0.0f32..100.0, 30),
            s in 0.0f64..100.0,
        ) {
            let mut d = map(&[("p", &x)]);
            let kept = fisher_damp(&mut d, &map(&[("p", &f[..x.len()])]), s).unwrap();
            for (a, b) in x.iter().zip(v(&d["p"])) {
                prop_assert!(b.abs() <= a.abs() * (1.0 + 1e-6) && a.signum() * b >= 0.0);
            }
            prop_assert!(kept["p"] <= 1.0 + 1e-9);
        }

        #[test]
        fn remembered_directions_are_projected_out(
            xs in proptest::collection::vec(proptest::collection::vec(-1.0f32..1.0, 16), 1..4),
            y in proptest::collection::vec(-1.0f32..1.0, 16),
        ) {
            let mut mem = OrthoMemory::new(8);
            for x in &xs {
                mem.remember(&map(&[("p", x)])).unwrap();
            }
            // Every remembered update now lies in the span.
            for x in &xs {
                let mut d = map(&[("p", x)]);
                mem.project_out(&mut d).unwrap();
                let n0 = norm(&t(x, &[16])).unwrap();
                prop_assert!(norm(&d["p"]).unwrap() <= 1e-4 * n0 + 1e-6);
            }
            // A projected update is orthogonal to all of them, and projecting twice changes nothing.
            let mut d = map(&[("p", &y)]);
            mem.project_out(&mut d).unwrap();
            for x in &xs {
                prop_assert!(dot(&d["p"], &t(x, &[16])).unwrap().abs() <= 1e-4);
            }
            let once = v(&d["p"]);
            let frac = mem.project_out(&mut d).unwrap();
            prop_assert!(close(&v(&d["p"]), &once, 1e-4));
            prop_assert!(frac <= 1e-4);
        }
    }

    #[test]
    fn huge_fisher_on_an_entry_shrinks_it() {
        let mut d = map(&[("p", &[1.0, 1.0, 1.0, 1.0]), ("free", &[2.0])]);
        let fisher = map(&[("p", &[1e6, 1.0, 1.0, 1.0])]);
        let kept = fisher_damp(&mut d, &fisher, 1.0).unwrap();
        let y = v(&d["p"]);
        // mean(F) ≈ 250000.75: entry 0 is divided by ≈ 5, the others by ≈ 1.000004.
        assert!((y[0] - 1.0 / (1.0 + 1e6 / 250_000.75)).abs() < 1e-5, "{y:?}");
        assert!(y[1..].iter().all(|v| (v - 1.0).abs() < 1e-5), "{y:?}");
        assert!(kept["p"] < 0.9);
        assert_eq!(v(&d["free"]), vec![2.0]);
        assert_eq!(kept["free"], 1.0);
    }

    #[test]
    fn fisher_bad_input_is_an_error_not_a_panic() {
        let fisher = map(&[("p", &[1.0, 2.0])]);
        assert!(fisher_damp(&mut map(&[("p", &[1.0, 2.0, 3.0])]), &fisher, 1.0).is_err());
        assert!(fisher_damp(&mut map(&[("p", &[1.0, 2.0])]), &map(&[("p", &[-1.0, 2.0])]), 1.0).is_err());
        assert!(fisher_damp(&mut map(&[("p", &[1.0, 2.0])]), &map(&[("p", &[f32::NAN, 2.0])]), 1.0).is_err());
        assert!(fisher_damp(&mut map(&[("p", &[1.0, 2.0])]), &fisher, f64::NAN).is_err());
        assert!(fisher_damp(&mut map(&[("p", &[1.0, 2.0])]), &fisher, -1.0).is_err());
        // A zero Fisher leaves the update alone rather than dividing by zero.
        let mut d = map(&[("p", &[1.0, 2.0])]);
        assert_eq!(fisher_damp(&mut d, &map(&[("p", &[0.0, 0.0])]), 1.0).unwrap()["p"], 1.0);
        assert_eq!(v(&d["p"]), vec![1.0, 2.0]);
    }

    #[test]
    fn remember_then_project_out_removes_it_and_spares_the_orthogonal() {
        let mut mem = OrthoMemory::new(4);
        let d = map(&[("w", &[1.0, 2.0, 0.0, -1.0]), ("b", &[3.0, 0.0])]);
        mem.remember(&d).unwrap();
        assert_eq!(mem.len(), 2);
        let mut again = d.clone();
        let frac = mem.project_out(&mut again).unwrap();
        assert!((frac - 1.0).abs() < 1e-6);
        assert!(v(&again["w"]).iter().chain(&v(&again["b"])).all(|x| x.abs() < 1e-6));
        // Orthogonal to both remembered vectors: unchanged; "new" has no memory: unchanged.
        let orth = map(&[("w", &[2.0, -1.0, 5.0, 0.0]), ("b", &[0.0, 7.0]), ("new", &[1.0])]);
        let mut o = orth.clone();
        assert!(mem.project_out(&mut o).unwrap().abs() < 1e-9);
        assert!(maps_close(&o, &orth, 1e-6));
        // A 2-D parameter keeps its shape.
        let mut mem2 = OrthoMemory::new(4);
        let m = [("m".to_string(), t(&[1.0, 0.0, 0.0, 1.0], &[2, 2]))].into_iter().collect::<TensorMap>();
        mem2.remember(&m).unwrap();
        let mut half = [("m".to_string(), t(&[1.0, 1.0, 0.0, 1.0], &[2, 2]))].into_iter().collect::<TensorMap>();
        let frac = mem2.project_out(&mut half).unwrap();
        assert_eq!(half["m"].dims(), &[2, 2]);
        assert!(close(&v(&half["m"]), &[0.0, 1.0, 0.0, 0.0], 1e-6));
        assert!((frac - 2.0 / 3.0).abs() < 1e-6);
    }

    #[test]
    fn oldest_directions_are_dropped_beyond_the_cap() {
        let mut mem = OrthoMemory::new(2);
        for i in 0..3 {
            let mut e = [0.0f32; 3];
            e[i] = 1.0;
            mem.remember(&map(&[("p", &e)])).unwrap();
        }
        assert_eq!(mem.len_of("p"), 2);
        let mut d = map(&[("p", &[1.0, 1.0, 1.0])]);
        mem.project_out(&mut d).unwrap();
        assert!(close(&v(&d["p"]), &[1.0, 0.0, 0.0], 1e-6), "the first direction was forgotten");
        // A direction already in the span adds nothing; max 0 remembers nothing.
        mem.remember(&map(&[("p", &[0.0, 2.0, -3.0])])).unwrap();
        assert_eq!(mem.len_of("p"), 2);
        let mut none = OrthoMemory::new(0);
        none.remember(&map(&[("p", &[1.0])])).unwrap();
        assert!(none.is_empty());
    }

    #[test]
    fn checkpoint_round_trip() {
        let mut mem = OrthoMemory::new(3);
        mem.remember(&map(&[("a.weight", &[1.0, 2.0, 3.0]), ("b", &[1.0])])).unwrap();
        mem.remember(&map(&[("a.weight", &[0.0, 1.0, -1.0])])).unwrap();
        let ts = mem.to_tensors();
        assert!(
            ts.contains_key("ortho.0.a.weight") && ts.contains_key("ortho.1.a.weight") && ts.contains_key("ortho.0.b")
        );
        let back = OrthoMemory::from_tensors(3, ts.clone()).unwrap();
        assert_eq!(back.len(), mem.len());
        assert!(maps_close(&back.to_tensors(), &ts, 0.0));
        let probe = map(&[("a.weight", &[0.3, -0.2, 0.9]), ("b", &[4.0])]);
        let (mut p1, mut p2) = (probe.clone(), probe);
        assert_eq!(mem.project_out(&mut p1).unwrap(), back.project_out(&mut p2).unwrap());
        assert!(maps_close(&p1, &p2, 0.0));
        // Fewer slots keep the newest.
        let small = OrthoMemory::from_tensors(1, ts.clone()).unwrap();
        assert!(maps_close(
            &small.to_tensors().into_iter().filter(|(k, _)| k.ends_with("a.weight")).collect(),
            &[("ortho.0.a.weight".to_string(), ts["ortho.1.a.weight"].clone())].into_iter().collect(),
            0.0
        ));
        // Malformed checkpoints are errors.
        let bad = |k: &str, x: &[f32]| OrthoMemory::from_tensors(3, map(&[(k, x)])).is_err();
        assert!(bad("ortho.x.p", &[1.0]));
        assert!(bad("other.0.p", &[1.0]));
        assert!(bad("ortho.1.p", &[1.0]));
        assert!(bad("ortho.0.", &[1.0]));
        let mut mixed = map(&[("ortho.0.p", &[1.0, 0.0])]);
        mixed.insert("ortho.1.p".into(), t(&[1.0], &[1]));
        assert!(OrthoMemory::from_tensors(3, mixed).is_err());
        // An update whose parameter changed size is an error.
        assert!(mem.project_out(&mut map(&[("b", &[1.0, 2.0])])).is_err());
    }
}
