//! A factored change to a model's linear layers, kept next to the weights it changes: module
//! `m`'s change is `B·A`, stored as `m.delta_a` (`[rank, in]`) and `m.delta_b` (`[out, rank]`),
//! f32, in the same `TensorMap` as the (possibly half-precision, memory-mapped) base weights.
//!
//! A model built from such a map ([`crate::Arch::build`]) adds `x·Aᵀ·Bᵀ` to each changed layer's
//! output, as a frozen LoRA adapter of scale 1 would, so the base weights are never rewritten:
//! a 7B base stays in its stored dtype and a change costs `rank·(in + out)` floats per layer
//! instead of a dense copy. Successive changes append their factors ([`append`]; the rank grows
//! by theirs). [`merge`] folds them into dense f32 weights (export, or code that needs `W`);
//! [`factors`] is what a checkpoint of such a model stores beyond its base.

use std::collections::BTreeMap;

use candle_core::{DType, Tensor};
use hetfed_core::{Error, Result, TensorMap};

const A: &str = "delta_a";
const B: &str = "delta_b";

/// The names of `module`'s factors (`module` as in `transformer.h.0.mlp.dense_h_to_4h`).
pub fn names(module: &str) -> (String, String) {
    (format!("{module}.{A}"), format!("{module}.{B}"))
}

/// Whether `name` is a factor of a factored change.
pub fn is_factor(name: &str) -> bool {
    name.ends_with(&format!(".{A}")) || name.ends_with(&format!(".{B}"))
}

/// `module`'s factors `(A, B)` in `weights`, checked against the layer's `(out, in)` shape; `None`
/// when the module has no factored change.
pub fn get(weights: &TensorMap, module: &str, out_dim: usize, in_dim: usize) -> Result<Option<(Tensor, Tensor)>> {
    let (na, nb) = names(module);
    match (weights.get(&na), weights.get(&nb)) {
        (None, None) => Ok(None),
        (Some(a), Some(b)) => {
            let (ra, ia) = a.dims2().map_err(|_| shape_error(&na, a, "[rank, in]"))?;
            let (ob, rb) = b.dims2().map_err(|_| shape_error(&nb, b, "[out, rank]"))?;
            if ia != in_dim || ob != out_dim || ra != rb {
                return Err(Error::msg(format!(
                    "{module}: expected factors of shapes [r, {in_dim}] and [{out_dim}, r], found {:?} and {:?}",
                    a.dims(),
                    b.dims()
                )));
            }
            Ok(Some((a.to_dtype(DType::F32)?, b.to_dtype(DType::F32)?)))
        }
        _ => Err(Error::msg(format!("{module}: expected both `{na}` and `{nb}`, found only one"))),
    }
}

fn shape_error(name: &str, t: &Tensor, expected: &str) -> Error {
    Error::msg(format!("`{name}`: expected a matrix {expected}, found shape {:?}", t.dims()))
}

/// Adds `b·a` (`a: [r, in]`, `b: [out, r]`) to `module`'s factored change in `weights`: the
/// factors are concatenated along the rank, so the change becomes `B·A + b·a`. `module.weight`
/// must exist with shape `[out, in]`.
pub fn append(weights: &mut TensorMap, module: &str, a: &Tensor, b: &Tensor) -> Result<()> {
    let w = weights
        .get(&format!("{module}.weight"))
        .ok_or_else(|| Error::msg(format!("factored change: the model has no linear layer `{module}`")))?;
    let (out_dim, in_dim) = w.dims2()?;
    let (ra, ia) = a.dims2()?;
    let (ob, rb) = b.dims2()?;
    if ia != in_dim || ob != out_dim || ra != rb {
        return Err(Error::msg(format!(
            "factored change of `{module}` ([{out_dim}, {in_dim}]): expected factors [r, {in_dim}] and [{out_dim}, r], found {:?} and {:?}",
            a.dims(),
            b.dims()
        )));
    }
    let (a, b) = (a.to_dtype(DType::F32)?, b.to_dtype(DType::F32)?);
    let (na, nb) = names(module);
    let (a, b) = match get(weights, module, out_dim, in_dim)? {
        None => (a, b),
        Some((a0, b0)) => (Tensor::cat(&[&a0, &a], 0)?, Tensor::cat(&[&b0, &b], 1)?),
    };
    weights.insert(na, a.contiguous()?);
    weights.insert(nb, b.contiguous()?);
    Ok(())
}

/// The rank of every module's factored change.
pub fn ranks(weights: &TensorMap) -> BTreeMap<String, usize> {
    weights
        .iter()
        .filter_map(|(k, t)| Some((k.strip_suffix(&format!(".{A}"))?.to_string(), t.dims().first().copied()?)))
        .collect()
}

/// Only the factors of `weights`' factored changes.
pub fn factors(weights: &TensorMap) -> TensorMap {
    weights.iter().filter(|(k, _)| is_factor(k)).map(|(k, v)| (k.clone(), v.clone())).collect()
}

/// `weights` with every factored change folded into its dense weight (`W + B·A`, in f32) and
/// the factors dropped; weights without a change are returned as they are.
pub fn merge(weights: &TensorMap) -> Result<TensorMap> {
    let mut out: TensorMap =
        weights.iter().filter(|(k, _)| !is_factor(k)).map(|(k, v)| (k.clone(), v.clone())).collect();
    for module in ranks(weights).into_keys() {
        let name = format!("{module}.weight");
        let w = out
            .get(&name)
            .ok_or_else(|| Error::msg(format!("factored change of `{module}`, which has no `{name}`")))?;
        let (o, i) = w.dims2()?;
        let (a, b) = get(weights, &module, o, i)?.expect("a module with a rank has factors");
        let merged = (w.to_dtype(DType::F32)? + b.matmul(&a)?)?;
        out.insert(name, merged);
    }
    Ok(out)
}
