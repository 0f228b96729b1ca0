//! Model-agnostic algebra on update maps ([`TensorMap`]s of f32 CPU tensors keyed by parameter
//! name) that the server uses to combine projected client updates. Pure: no I/O, no models, no
//! clocks; every function is deterministic given its inputs (and seed, where it takes one).
//!
//! The proposal's aggregation rule is `W ← W + η·Σ_i α_i·P(τ_i) / Σ_i α_i`, where `τ_i` is client
//! `i`'s task vector and `P` projects it into the server model. The tools here shape the pieces:
//!
//! * [`alpha`] — the weights `α_i` from a client's data size, label entropy and measured gain
//!   ([`compute_alphas`]).
//! * [`lars`] — a LARS-style trust ratio (You et al. 2017, arXiv 1708.03888) capping each
//!   parameter's update at `c·‖W‖` ([`trust_ratio`]), and the per-layer ratios `‖W‖/‖Δ‖` for
//!   logging ([`layer_rates`]).
//! * [`ties`] — TIES-Merging (Yadav et al. 2023, arXiv 2306.01708): trim, elect sign, disjoint
//!   mean ([`ties_merge`]).
//! * [`dare`] — DARE (Yu et al. 2023, arXiv 2311.03099): drop and rescale ([`dare()`]).
//! * [`continual`] — forgetting protection: EWC-style damping by a diagonal Fisher
//!   ([`fisher_damp`]) and O-LoRA-style orthogonal projection against the directions of earlier
//!   updates (Wang et al. 2023, arXiv 2310.14152; [`OrthoMemory`]).
//!
//! Interference-resolving merges were designed for merging fully fine-tuned models; a large
//! study of merging methods on LLMs (arXiv 2511.21437) found that TIES-like methods often hurt
//! rather than help there, and that plain (task-arithmetic) averaging is a strong baseline.
//! Treat every tool here as a hypothesis: measure it against the plain weighted mean.
//!
//! Errors are [`hetfed_core::Error::Msg`] sentences saying what was expected and what was found;
//! no function panics on bad input (shape mismatches, non-finite weights, empty inputs).

pub mod alpha;
pub mod continual;
pub mod dare;
pub mod lars;
pub mod ties;

pub use alpha::{compute_alphas, AlphaConfig, AlphaParts, ClientSignals};
pub use continual::{fisher_damp, OrthoMemory};
pub use dare::dare;
pub use lars::{layer_rates, trust_ratio};
pub use ties::ties_merge;

use candle_core::{DType, Tensor};
use hetfed_core::{Error, Result, TensorMap};

/// The elements of `t`, flattened, as f32.
pub(crate) fn to_f32_vec(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?)
}

/// A f32 tensor with the shape and device of `like` holding `v`.
pub(crate) fn from_f32_vec(v: Vec<f32>, like: &Tensor) -> Result<Tensor> {
    Ok(Tensor::from_vec(v, like.dims(), like.device())?)
}

/// `Σ a·b` over all elements, accumulated in f64.
pub(crate) fn dot(a: &Tensor, b: &Tensor) -> Result<f64> {
    let a = a.flatten_all()?.to_dtype(DType::F64)?;
    let b = b.flatten_all()?.to_dtype(DType::F64)?;
    Ok((a * b)?.sum_all()?.to_scalar::<f64>()?)
}

/// The Frobenius norm of `t`, accumulated in f64.
pub(crate) fn norm(t: &Tensor) -> Result<f64> {
    Ok(dot(t, t)?.sqrt())
}

/// Errs unless `found` has the shape of `expected`.
pub(crate) fn check_shape(name: &str, expected: &Tensor, found: &Tensor, what: &str) -> Result<()> {
    if expected.dims() != found.dims() {
        return Err(Error::msg(format!(
            "parameter `{name}`: expected shape {:?}, found {:?} in {what}",
            expected.dims(),
            found.dims()
        )));
    }
    Ok(())
}

/// Errs unless every element of every tensor of `map` is finite.
pub(crate) fn check_finite_map(map: &TensorMap, what: &str) -> Result<()> {
    for (name, t) in map {
        check_finite(name, t, what)?;
    }
    Ok(())
}

/// Errs unless every element of `t` is finite.
pub(crate) fn check_finite(name: &str, t: &Tensor, what: &str) -> Result<()> {
    let s = t.flatten_all()?.to_dtype(DType::F64)?.abs()?.sum_all()?.to_scalar::<f64>()?;
    if !s.is_finite() {
        return Err(Error::msg(format!("parameter `{name}` of {what}: expected finite values, found NaN or infinity")));
    }
    Ok(())
}

/// SplitMix64 finaliser of `seed ^ x·φ` (`hetfed_core::mix_seed`).
pub(crate) fn mix(seed: u64, x: u64) -> u64 {
    hetfed_core::mix_seed(seed, x)
}

/// FNV-1a 64 of a string: a stable (across platforms and releases) hash of a parameter name.
pub(crate) fn fnv1a(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

#[cfg(test)]
pub(crate) mod testutil {
    use candle_core::{Device, Tensor};
    use hetfed_core::TensorMap;

    pub fn t(v: &[f32], dims: &[usize]) -> Tensor {
        Tensor::from_vec(v.to_vec(), dims, &Device::Cpu).unwrap()
    }

    pub fn v(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    pub fn map(entries: &[(&str, &[f32])]) -> TensorMap {
        entries.iter().map(|(k, x)| (k.to_string(), t(x, &[x.len()]))).collect()
    }

    pub fn close(a: &[f32], b: &[f32], tol: f32) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() <= tol * (1.0 + x.abs().max(y.abs())))
    }

    pub fn maps_close(a: &TensorMap, b: &TensorMap, tol: f32) -> bool {
        a.len() == b.len()
            && a.iter()
                .zip(b)
                .all(|((ka, ta), (kb, tb))| ka == kb && ta.dims() == tb.dims() && close(&v(ta), &v(tb), tol))
    }
}
