//! Task vectors: what fine-tuning changed in a model, `tau = theta_ft - theta_base`, together
//! with the identity of the base model it was made from, so that it is never applied to a model
//! it does not belong to.
//!
//! A task vector is kept either dense per parameter ([`Delta::Full`]) or as LoRA factors
//! ([`Delta::Lora`]), whose update of `<module>.weight` is `B·A·(alpha/rank)`. Task arithmetic
//! (Ilharco et al., 2212.04089) scales, negates and adds task vectors. LoRA vectors stay factored
//! through all of it: scaling folds into `B`, and adding stacks the factors (as FLoRA does), so a
//! sum is exact and still low rank. They are made dense only when a caller asks
//! ([`TaskVector::materialize`]) or when a LoRA vector is added to a dense one.
//!
//! Before a task vector from outside touches a model it passes [`TaskVector::validate`] (base
//! identity, names, shapes, finite values, norm bound): the federated server's uploads and the
//! command line share that one check ([`TaskVector::apply_validated`]).
//!
//! This crate does no I/O beyond (de)serialising task vectors ([`TaskVector::save`],
//! [`TaskVector::load`]) and PEFT adapters ([`peft`]). Files are parsed behind
//! [`hetfed_core::guard::parse`]: any bytes give a task vector or a one-line error, never a panic.

mod arith;
mod file;
mod lora;
pub mod peft;
#[cfg(test)]
mod tests;
mod validate;

use candle_core::{DType, Tensor};
use hetfed_core::{Error, Result, TensorMap};
use hetfed_model::{LoraConfig, LoraSet, ModelIdentity};

pub use file::{FORMAT, META_FORMAT};
pub use validate::{all_finite, Checked};

/// What a fine-tuning run changed.
#[derive(Debug, Clone)]
pub enum Delta {
    /// Dense `theta_ft - theta_base`, keyed by the model's canonical parameter names.
    Full(TensorMap),
    /// LoRA factors `<module>.lora_A` (`[rank, in]`) and `<module>.lora_B` (`[out, rank]`). The
    /// update of `<module>.weight` is `B·A·config.scale()`; `config.rank` equals the factors' rank.
    Lora { config: LoraConfig, factors: TensorMap },
}

impl Delta {
    /// `"full"` or `"lora"`, as written in the `hetfed.kind` metadata of a saved task vector.
    pub fn name(&self) -> &'static str {
        match self {
            Delta::Full(_) => "full",
            Delta::Lora { .. } => "lora",
        }
    }
}

/// A task vector and the model it was made from.
#[derive(Debug, Clone)]
pub struct TaskVector {
    /// The base model `theta_base`; [`TaskVector::apply`] refuses any other.
    pub base: ModelIdentity,
    pub kind: Delta,
}

impl TaskVector {
    /// `finetuned - base`, parameter by parameter, in f32. Both maps must hold exactly the same
    /// names with the same shapes: a parameter missing from either side would silently drop or
    /// invent part of the update.
    pub fn full_diff(base_id: ModelIdentity, base: &TensorMap, finetuned: &TensorMap) -> Result<Self> {
        if let Some(name) = finetuned.keys().find(|n| !base.contains_key(*n)) {
            return Err(Error::msg(format!(
                "fine-tuned weights have `{name}` but the base model {base_id} has no such parameter"
            )));
        }
        let mut delta = TensorMap::new();
        for (name, theta) in base {
            let ft = finetuned.get(name).ok_or_else(|| {
                Error::msg(format!(
                    "base model {base_id} has `{name}` but the fine-tuned weights have no such parameter"
                ))
            })?;
            if theta.dims() != ft.dims() {
                return Err(Error::Shape {
                    name: name.clone(),
                    expected: theta.dims().to_vec(),
                    found: ft.dims().to_vec(),
                    where_: Some("the fine-tuned weights".into()),
                });
            }
            delta.insert(name.clone(), (ft.to_dtype(DType::F32)? - theta.to_dtype(DType::F32)?)?);
        }
        Ok(Self { base: base_id, kind: Delta::Full(delta) })
    }

    /// The task vector of trained LoRA adapters, kept factored.
    pub fn from_lora(base_id: ModelIdentity, set: &LoraSet) -> Result<Self> {
        Self::from_lora_factors(base_id, set.config.clone(), set.to_tensors())
    }

    /// A LoRA task vector from `<module>.lora_A` / `<module>.lora_B` factors, checking that every
    /// `A` has its `B`, that both are matrices of matching rank, and that the rank is `config.rank`.
    pub fn from_lora_factors(base_id: ModelIdentity, config: LoraConfig, factors: TensorMap) -> Result<Self> {
        lora::pairs(&config, &factors)?;
        Ok(Self { base: base_id, kind: Delta::Lora { config, factors } })
    }

    /// The LoRA config, for a factored task vector.
    pub fn lora_config(&self) -> Option<&LoraConfig> {
        match &self.kind {
            Delta::Full(_) => None,
            Delta::Lora { config, .. } => Some(config),
        }
    }

    /// A LoRA task vector's modules with their factors `(module, A, B·scale)` in f32, so that
    /// `B·scale·A` is the module's dense update; in module-name order. An error for a dense task
    /// vector (`what` names the caller in it).
    pub fn scaled_factors(&self, what: &str) -> Result<Vec<(String, Tensor, Tensor)>> {
        let Delta::Lora { config, factors } = &self.kind else {
            return Err(Error::msg(format!("{what}: expected LoRA factors, found a dense task vector")));
        };
        lora::pairs(config, factors)?
            .into_iter()
            .map(|p| {
                let a = p.a.to_dtype(DType::F32)?;
                let b = (p.b.to_dtype(DType::F32)? * config.scale())?;
                Ok((p.module.to_string(), a, b))
            })
            .collect()
    }

    /// The dense update keyed by parameter name (`<module>.weight = B·A·scale` for LoRA).
    pub fn materialize(&self) -> Result<TensorMap> {
        let mut out = TensorMap::new();
        self.for_each_dense(|name, delta| {
            out.insert(name, delta);
            Ok(())
        })?;
        Ok(out)
    }

    /// `theta + lambda·tau` for a base whose identity is `base_id`. Parameters the task vector
    /// does not touch are passed through; each result keeps its base tensor's dtype.
    ///
    /// Errors when `base_id` is not the model the task vector was made from, when the task vector
    /// updates a parameter the base lacks, and on a shape mismatch.
    pub fn apply(&self, base_id: &ModelIdentity, base: &TensorMap, lambda: f64) -> Result<TensorMap> {
        if *base_id != self.base {
            let (made, given) = describe_pair(&self.base, base_id);
            return Err(Error::msg(format!("task vector was made from {made} but the base is {given}")));
        }
        self.apply_unchecked(base, lambda)
    }

    /// [`TaskVector::apply`] without the identity check, for weights that are known to descend
    /// from the right base although their hash differs (another task vector already applied,
    /// say). Names and shapes are still checked.
    pub fn apply_unchecked(&self, base: &TensorMap, lambda: f64) -> Result<TensorMap> {
        let mut out = base.clone();
        self.for_each_dense(|name, delta| {
            let theta = out.get(&name).ok_or_else(|| {
                Error::msg(format!("task vector updates `{name}` but the base model has no such parameter"))
            })?;
            if theta.dims() != delta.dims() {
                return Err(Error::Shape {
                    name,
                    expected: theta.dims().to_vec(),
                    found: delta.dims().to_vec(),
                    where_: Some("the task vector".into()),
                });
            }
            let step = (delta.to_device(theta.device())?.to_dtype(DType::F32)? * lambda)?;
            let updated = (theta.to_dtype(DType::F32)? + step)?.to_dtype(theta.dtype())?;
            out.insert(name, updated);
            Ok(())
        })?;
        Ok(out)
    }

    /// L2 (Frobenius) norm of the update of each parameter, by name. For LoRA the norm of
    /// `B·A·scale` is computed from the `rank × rank` Gram matrices, without the dense update.
    pub fn layer_norms(&self) -> Result<Vec<(String, f64)>> {
        match &self.kind {
            Delta::Full(map) => {
                map.iter().map(|(name, t)| Ok((name.clone(), hetfed_core::sq_norm(t)?.sqrt()))).collect()
            }
            Delta::Lora { config, factors } => lora::pairs(config, factors)?
                .into_iter()
                .map(|f| Ok((format!("{}.weight", f.module), lora::sq_norm(&f, config.scale())?.sqrt())))
                .collect(),
        }
    }

    /// L2 norm of the whole update, `sqrt(sum of squared layer norms)`.
    pub fn global_norm(&self) -> Result<f64> {
        Ok(self.layer_norms()?.iter().map(|(_, n)| n * n).sum::<f64>().sqrt())
    }

    /// Number of model parameters the update touches (dense size).
    pub fn num_params(&self) -> usize {
        match &self.kind {
            Delta::Full(map) => map.values().map(Tensor::elem_count).sum(),
            Delta::Lora { factors, .. } => factors
                .iter()
                .filter_map(|(name, a)| {
                    let module = name.strip_suffix(".lora_A")?;
                    let b = factors.get(&format!("{module}.lora_B"))?;
                    Some(b.dims().first().unwrap_or(&0) * a.dims().last().unwrap_or(&0))
                })
                .sum(),
        }
    }

    /// Number of values stored (and sent): the factors' size for LoRA, the dense size otherwise.
    pub fn num_stored_values(&self) -> usize {
        match &self.kind {
            Delta::Full(map) => map.values().map(Tensor::elem_count).sum(),
            Delta::Lora { factors, .. } => factors.values().map(Tensor::elem_count).sum(),
        }
    }

    /// Calls `f` with each parameter's dense update (f32), one at a time, so applying a LoRA
    /// vector never holds more than one dense matrix besides the weights.
    fn for_each_dense(&self, mut f: impl FnMut(String, Tensor) -> Result<()>) -> Result<()> {
        match &self.kind {
            Delta::Full(map) => {
                for (name, t) in map {
                    f(name.clone(), t.to_dtype(DType::F32)?)?;
                }
            }
            Delta::Lora { config, factors } => {
                for pair in lora::pairs(config, factors)? {
                    f(format!("{}.weight", pair.module), lora::delta(&pair, config.scale())?)?;
                }
            }
        }
        Ok(())
    }
}

/// Both identities as shown to a person. `ModelIdentity`'s `Display` abbreviates the hashes; when
/// two different identities abbreviate to the same text, the full hashes are shown instead so the
/// message still tells them apart.
pub(crate) fn describe_pair(a: &ModelIdentity, b: &ModelIdentity) -> (String, String) {
    let (sa, sb) = (a.to_string(), b.to_string());
    if sa != sb {
        return (sa, sb);
    }
    let full = |m: &ModelIdentity| format!("{} (config {}, weights {})", m.arch, m.config_hash, m.weights_hash);
    (full(a), full(b))
}
