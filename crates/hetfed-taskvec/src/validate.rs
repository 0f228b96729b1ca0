//! The one check a task vector passes before it touches a model, wherever it came from: the
//! server's uploads (`hetfed-fed`'s `validate_update`) and the command line (`hetfed taskvec
//! apply`, `--taskvec`) call the same [`TaskVector::validate`], so what one refuses the other
//! refuses too. Each failure is one sentence naming what was expected and what was found.

use candle_core::{DType, Tensor};
use hetfed_core::{Error, Result, TensorMap};
use hetfed_model::ModelIdentity;

use crate::{describe_pair, lora, Delta, TaskVector};

/// A task vector that passed [`TaskVector::validate`]: its dense update (f32, keyed by the
/// model's parameter names) and the update's global L2 norm.
#[derive(Debug, Clone)]
pub struct Checked {
    pub delta: TensorMap,
    pub norm: f64,
}

impl TaskVector {
    /// Checks that this task vector may be added to the model `base` (whose identity is
    /// `base_id`; `what` names it in messages, e.g. "the round's model"):
    ///
    /// - it was made from that model;
    /// - LoRA factors pair up and multiply out;
    /// - it updates at least one parameter, every one a parameter of the model with the model's
    ///   shape (LoRA factors are checked before any `B·A` is formed, so a small file cannot ask
    ///   for a huge dense matrix);
    /// - every value of the dense update is finite;
    /// - the update's global norm is at most `max_norm` (`f64::INFINITY` for no bound).
    ///
    /// Returns the dense update and its norm.
    pub fn validate(&self, base_id: &ModelIdentity, base: &TensorMap, what: &str, max_norm: f64) -> Result<Checked> {
        if *base_id != self.base {
            let (expected, found) = describe_pair(base_id, &self.base);
            return Err(Error::msg(format!("expected an update of {what} {expected}, found one of {found}")));
        }
        let model_shape = |name: &str| -> Result<&[usize]> {
            base.get(name)
                .map(Tensor::dims)
                .ok_or_else(|| Error::msg(format!("parameter `{name}` is not a parameter of {what}")))
        };
        let shape_err = |name: &str, expected: &[usize], found: &[usize]| {
            Error::msg(format!("parameter `{name}`: expected shape {expected:?}, found {found:?}"))
        };
        let mut delta = TensorMap::new();
        match &self.kind {
            Delta::Full(map) => {
                for (name, d) in map {
                    let expected = model_shape(name)?;
                    if d.dims() != expected {
                        return Err(shape_err(name, expected, d.dims()));
                    }
                    delta.insert(name.clone(), d.to_dtype(DType::F32)?);
                }
            }
            Delta::Lora { config, factors } => {
                let pairs = lora::pairs(config, factors)
                    .map_err(|e| Error::msg(format!("expected LoRA factors that multiply out: {e}")))?;
                // Every shape first: no dense product is formed for an update that does not fit.
                for p in &pairs {
                    let name = format!("{}.weight", p.module);
                    let expected = model_shape(&name)?;
                    let found = [p.b.dims()[0], p.a.dims()[1]];
                    if found != expected {
                        return Err(shape_err(&name, expected, &found));
                    }
                }
                for p in &pairs {
                    delta.insert(format!("{}.weight", p.module), lora::delta(p, config.scale())?);
                }
            }
        }
        if delta.is_empty() {
            return Err(Error::msg("expected at least one updated parameter, found none"));
        }
        let mut sq = 0.0;
        for (name, d) in &delta {
            if !all_finite(d)? {
                return Err(Error::msg(format!("parameter `{name}`: expected finite values, found NaN or infinity")));
            }
            sq += hetfed_core::sq_norm(d)?;
        }
        let norm = sq.sqrt();
        // A norm that overflowed is refused even without a bound.
        if !norm.is_finite() || norm > max_norm {
            return Err(Error::msg(format!("expected an update norm <= {max_norm}, found {norm:.4}")));
        }
        Ok(Checked { delta, norm })
    }

    /// [`TaskVector::validate`]'s checks and norm without the dense update: what a server needs
    /// to accept an upload. A dense update is checked as there; a LoRA update from its factors
    /// alone (shapes, finite values) with its norm from the factors' Gram matrices
    /// (`tr((BᵀB)(AAᵀ))`, f64), never `B·A`: a bloom-560m upload multiplied out is 1.2 GB. Finite
    /// factors with a finite norm give a finite product (no entry exceeds the norm); a norm past
    /// f32's range is refused as a product that would overflow.
    pub fn validate_norm(&self, base_id: &ModelIdentity, base: &TensorMap, what: &str, max_norm: f64) -> Result<f64> {
        let Delta::Lora { config, factors } = &self.kind else {
            return Ok(self.validate(base_id, base, what, max_norm)?.norm);
        };
        if *base_id != self.base {
            let (expected, found) = describe_pair(base_id, &self.base);
            return Err(Error::msg(format!("expected an update of {what} {expected}, found one of {found}")));
        }
        let pairs = lora::pairs(config, factors)
            .map_err(|e| Error::msg(format!("expected LoRA factors that multiply out: {e}")))?;
        let mut sq = 0.0;
        for p in &pairs {
            let name = format!("{}.weight", p.module);
            let expected = base
                .get(&name)
                .map(Tensor::dims)
                .ok_or_else(|| Error::msg(format!("parameter `{name}` is not a parameter of {what}")))?;
            let found = [p.b.dims()[0], p.a.dims()[1]];
            if found != expected {
                return Err(Error::msg(format!("parameter `{name}`: expected shape {expected:?}, found {found:?}")));
            }
            if !all_finite(p.a)? || !all_finite(p.b)? {
                return Err(Error::msg(format!("parameter `{name}`: expected finite values, found NaN or infinity")));
            }
            sq += lora::sq_norm(p, config.scale())?;
        }
        if pairs.is_empty() {
            return Err(Error::msg("expected at least one updated parameter, found none"));
        }
        let norm = sq.sqrt();
        if !norm.is_finite() || norm > max_norm || norm > f32::MAX as f64 {
            return Err(Error::msg(format!("expected an update norm <= {max_norm}, found {norm:.4}")));
        }
        Ok(norm)
    }

    /// `theta + lambda·tau` after [`TaskVector::validate`] (no norm bound): what the command line
    /// does with a task vector it is given. Also refuses a `lambda` that is not finite and a
    /// result that is not (finite values can still overflow when scaled). Parameters the task
    /// vector does not touch are passed through; each result keeps its base tensor's dtype.
    pub fn apply_validated(
        &self,
        base_id: &ModelIdentity,
        base: &TensorMap,
        lambda: f64,
        what: &str,
    ) -> Result<TensorMap> {
        if !lambda.is_finite() {
            return Err(Error::msg(format!("expected a finite scale (lambda) for the task vector, found {lambda}")));
        }
        let checked = self.validate(base_id, base, what, f64::INFINITY)?;
        let mut out = base.clone();
        for (name, d) in checked.delta {
            let theta = &base[&name];
            let updated =
                (theta.to_dtype(DType::F32)? + (d.to_device(theta.device())? * lambda)?)?.to_dtype(theta.dtype())?;
            if !all_finite(&updated)? {
                return Err(Error::msg(format!(
                    "parameter `{name}` of {what} plus {lambda}·tau: expected finite values, found NaN or infinity"
                )));
            }
            out.insert(name, updated);
        }
        Ok(out)
    }
}

/// Whether every value of a float tensor is finite.
pub fn all_finite(t: &Tensor) -> Result<bool> {
    let v: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    Ok(v.iter().all(|x| x.is_finite()))
}
