//! Task arithmetic: scaling, negating and adding task vectors.

use candle_core::DType;
use hetfed_core::{Error, Result, TensorMap};

use crate::{describe_pair, lora, Delta, TaskVector};

impl TaskVector {
    /// `lambda·tau`. A LoRA vector stays factored: `lambda` is folded into every `B`, leaving the
    /// config (and so the scale `alpha / rank`) unchanged.
    pub fn scale(&self, lambda: f64) -> Result<Self> {
        let kind = match &self.kind {
            Delta::Full(map) => {
                Delta::Full(map.iter().map(|(name, t)| Ok((name.clone(), (t * lambda)?))).collect::<Result<_>>()?)
            }
            Delta::Lora { config, factors } => {
                Delta::Lora { config: config.clone(), factors: lora::scale_factors(config, factors, lambda)? }
            }
        };
        Ok(Self { base: self.base.clone(), kind })
    }

    /// `-tau`: what removes this task vector's effect when applied.
    pub fn negate(&self) -> Result<Self> {
        self.scale(-1.0)
    }

    /// `tau + other`, for two task vectors of the same base model.
    ///
    /// - Full + Full: element-wise over the union of names (a name in one only is kept as is);
    ///   shapes of shared names must match.
    /// - LoRA + LoRA: exact and still factored, by stacking the factors; the result has rank
    ///   `r1 + r2`, the first operand's scale `s1` (1 if `s1` is zero) and `alpha = s1·(r1 + r2)`,
    ///   with the second operand's `B` rescaled by `s2 / s1`.
    /// - Mixed: both are materialised and the result is Full.
    pub fn add(&self, other: &TaskVector) -> Result<Self> {
        if self.base != other.base {
            let (a, b) = describe_pair(&self.base, &other.base);
            return Err(Error::msg(format!(
                "cannot add task vectors of different base models: the first was made from {a}, the second from {b}"
            )));
        }
        let kind = match (&self.kind, &other.kind) {
            (Delta::Lora { config: c1, factors: f1 }, Delta::Lora { config: c2, factors: f2 }) => {
                let (config, factors) = lora::stack(c1, f1, c2, f2)?;
                Delta::Lora { config, factors }
            }
            (Delta::Full(m1), Delta::Full(m2)) => Delta::Full(add_dense(m1, m2)?),
            _ => Delta::Full(add_dense(&self.materialize()?, &other.materialize()?)?),
        };
        Ok(Self { base: self.base.clone(), kind })
    }
}

/// Element-wise sum over the union of names, in f32.
fn add_dense(m1: &TensorMap, m2: &TensorMap) -> Result<TensorMap> {
    let mut out = m1.clone();
    for (name, t2) in m2 {
        let sum = match m1.get(name) {
            None => t2.to_dtype(DType::F32)?,
            Some(t1) if t1.dims() != t2.dims() => {
                return Err(Error::Shape {
                    name: name.clone(),
                    expected: t1.dims().to_vec(),
                    found: t2.dims().to_vec(),
                    where_: Some("the second task vector".into()),
                })
            }
            Some(t1) => (t1.to_dtype(DType::F32)? + t2.to_dtype(DType::F32)?)?,
        };
        out.insert(name.clone(), sum);
    }
    Ok(out)
}
