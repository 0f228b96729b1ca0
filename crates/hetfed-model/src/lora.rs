//! LoRA: a low-rank update `B·A·(alpha/r)` added to the output of a frozen linear layer.
//!
//! The frozen base output is never scaled; only the adapter's contribution is. `A` has shape
//! `[r, in]` and `B` `[out, r]`, as in PEFT, so `B·A·scale` is exactly the layer's task vector.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Result, Tensor, Var};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use hetfed_core::TensorMap;

/// Which layers get an adapter and how big it is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f64,
    pub dropout: f64,
    /// Module names or name suffixes (PEFT semantics: `query_key_value` matches
    /// `transformer.h.0.self_attention.query_key_value`).
    pub targets: Vec<String>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self { rank: 8, alpha: 16.0, dropout: 0.0, targets: Vec::new() }
    }
}

impl LoraConfig {
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }

    /// PEFT's rule: a target matches a module whose full name equals it or ends with `.target`.
    pub fn matches(&self, module: &str) -> bool {
        self.targets.iter().any(|t| module == t || module.ends_with(&format!(".{t}")))
    }

    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.rank == 0 {
            return Err("LoRA rank must be at least 1, found 0".into());
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(format!("LoRA dropout must be in [0, 1), found {}", self.dropout));
        }
        if self.targets.is_empty() {
            return Err("LoRA needs at least one target module".into());
        }
        Ok(())
    }
}

/// The trainable factors of one adapted layer.
#[derive(Clone)]
pub struct LoraFactors {
    pub a: Var,
    pub b: Var,
}

/// All adapters of a model, keyed by module name (`transformer.h.0.self_attention.query_key_value`).
#[derive(Clone)]
pub struct LoraSet {
    pub config: LoraConfig,
    pub factors: BTreeMap<String, LoraFactors>,
    /// Dropout RNG; `None` = evaluation mode (no dropout).
    pub(crate) rng: Arc<Mutex<Option<StdRng>>>,
}

impl LoraSet {
    /// Fresh adapters for every 2-D `<module>.weight` in `weights` that the config targets:
    /// `A ~ U(-1/sqrt(in), 1/sqrt(in))` (PEFT's Kaiming-uniform with a = sqrt(5)), `B = 0`, so
    /// the adapted model starts equal to the base.
    pub fn init(config: &LoraConfig, weights: &TensorMap, seed: u64) -> hetfed_core::Result<Self> {
        config.validate().map_err(hetfed_core::Error::msg)?;
        let mut rng = StdRng::seed_from_u64(seed);
        let mut factors = BTreeMap::new();
        for (module, (out_dim, in_dim)) in linear_modules(weights) {
            if !config.matches(&module) {
                continue;
            }
            let bound = 1.0 / (in_dim as f32).sqrt();
            let a: Vec<f32> = (0..config.rank * in_dim).map(|_| rng.random_range(-bound..bound)).collect();
            let a = Var::from_tensor(&Tensor::from_vec(a, (config.rank, in_dim), &Device::Cpu)?)?;
            let b = Var::zeros((out_dim, config.rank), DType::F32, &Device::Cpu)?;
            factors.insert(module, LoraFactors { a, b });
        }
        if factors.is_empty() {
            let names: Vec<String> = linear_modules(weights).into_keys().collect();
            return Err(hetfed_core::Error::msg(format!(
                "LoRA targets {:?} match no linear layer; the model's linear layers are: {}",
                config.targets,
                names.join(", ")
            )));
        }
        Ok(Self { config: config.clone(), factors, rng: Arc::new(Mutex::new(None)) })
    }

    /// Adapters from saved factors (`<module>.lora_A` / `<module>.lora_B` tensors).
    pub fn from_tensors(config: &LoraConfig, map: &TensorMap) -> hetfed_core::Result<Self> {
        let mut factors = BTreeMap::new();
        for (name, a) in map {
            let Some(module) = name.strip_suffix(".lora_A") else { continue };
            let b = map
                .get(&format!("{module}.lora_B"))
                .ok_or_else(|| hetfed_core::Error::msg(format!("adapter has `{name}` but no `{module}.lora_B`")))?;
            factors.insert(
                module.to_string(),
                LoraFactors {
                    a: Var::from_tensor(&a.to_dtype(DType::F32)?)?,
                    b: Var::from_tensor(&b.to_dtype(DType::F32)?)?,
                },
            );
        }
        Ok(Self { config: config.clone(), factors, rng: Arc::new(Mutex::new(None)) })
    }

    /// The factors as `<module>.lora_A` / `<module>.lora_B` tensors (hetfed's own naming).
    pub fn to_tensors(&self) -> TensorMap {
        let mut m = TensorMap::new();
        for (module, f) in &self.factors {
            m.insert(format!("{module}.lora_A"), f.a.as_detached_tensor());
            m.insert(format!("{module}.lora_B"), f.b.as_detached_tensor());
        }
        m
    }

    pub fn vars(&self) -> Vec<(String, Var)> {
        let mut v = Vec::new();
        for (module, f) in &self.factors {
            v.push((format!("{module}.lora_A"), f.a.clone()));
            v.push((format!("{module}.lora_B"), f.b.clone()));
        }
        v
    }

    /// Turns dropout on (with a seeded RNG) for training, or off for evaluation.
    pub fn set_train(&self, seed: Option<u64>) {
        *self.rng.lock().expect("lora rng lock") = seed.map(StdRng::seed_from_u64);
    }

    /// Delta weight `B·A·scale` of one module.
    pub fn delta(&self, module: &str) -> Result<Option<Tensor>> {
        match self.factors.get(module) {
            None => Ok(None),
            Some(f) => Ok(Some((f.b.as_tensor().matmul(f.a.as_tensor())? * self.config.scale())?)),
        }
    }
}

/// Every 2-D `<module>.weight` that is a linear layer (not an embedding or the LM head), with
/// its `(out, in)` shape.
pub fn linear_modules(weights: &TensorMap) -> BTreeMap<String, (usize, usize)> {
    weights
        .iter()
        .filter_map(|(name, t)| {
            let module = name.strip_suffix(".weight")?;
            let is_embedding =
                module.ends_with("word_embeddings") || module.ends_with("embed_tokens") || module == "lm_head";
            match (t.dims(), is_embedding) {
                (&[o, i], false) => Some((module.to_string(), (o, i))),
                _ => None,
            }
        })
        .collect()
}

/// A linear layer `y = x·Wᵀ + b`, optionally with a factored change `B·A` of the weights
/// ([`crate::delta`], frozen) and a LoRA adapter.
#[derive(Clone)]
pub struct Linear {
    w: Tensor,
    b: Option<Tensor>,
    /// `(A, B)` of a factored change: `x·Aᵀ·Bᵀ` is added to the output.
    delta: Option<(Tensor, Tensor)>,
    lora: Option<Adapter>,
}

#[derive(Clone)]
struct Adapter {
    a: Tensor,
    b: Tensor,
    scale: f64,
    dropout: f64,
    rng: Arc<Mutex<Option<StdRng>>>,
}

impl Linear {
    /// Builds `module` from `weights` (`<module>.weight`, optional `<module>.bias`), checking shapes.
    pub fn load(
        weights: &crate::Weights,
        module: &str,
        out_dim: usize,
        in_dim: usize,
        bias: bool,
        lora: Option<&LoraSet>,
    ) -> hetfed_core::Result<Self> {
        let w = weights.get(&format!("{module}.weight"), &[out_dim, in_dim])?;
        let b = if bias { Some(weights.get(&format!("{module}.bias"), &[out_dim])?) } else { None };
        let delta = crate::delta::get(weights.map, module, out_dim, in_dim)
            .map_err(|e| hetfed_core::Error::msg(format!("{}: {e}", weights.source)))?;
        let lora = lora.and_then(|set| {
            set.factors.get(module).map(|f| Adapter {
                a: f.a.as_tensor().clone(),
                b: f.b.as_tensor().clone(),
                scale: set.config.scale(),
                dropout: set.config.dropout,
                rng: set.rng.clone(),
            })
        });
        if let Some(ad) = &lora {
            let (r, i) = ad.a.dims2()?;
            let (o, r2) = ad.b.dims2()?;
            if i != in_dim || o != out_dim || r != r2 {
                return Err(hetfed_core::Error::Shape {
                    name: format!("{module} (LoRA B·A)"),
                    expected: vec![out_dim, in_dim],
                    found: vec![o, i],
                    where_: Some(format!("adapter of rank {r}/{r2}")),
                });
            }
        }
        Ok(Self { w, b, delta, lora })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let in_dim = *dims.last().expect("linear input has a last dim");
        let x2 = x.reshape(((), in_dim))?;
        let mut y = crate::ops::linear(&x2, &self.w, self.b.as_ref())?;
        if let Some((a, b)) = &self.delta {
            y = (y + x2.matmul(&a.t()?)?.matmul(&b.t()?)?)?;
        }
        if let Some(ad) = &self.lora {
            let xd = ad.dropout_input(&x2)?;
            let z = xd.matmul(&ad.a.t()?)?.matmul(&ad.b.t()?)?;
            y = (y + (z * ad.scale)?)?;
        }
        let mut out_dims = dims;
        *out_dims.last_mut().unwrap() = y.dim(1)?;
        y.reshape(out_dims)
    }

    /// The tensors of this layer that training tracks: LoRA factors, or the weight and bias
    /// when they are `Var`-backed (full fine-tuning).
    pub(crate) fn trainable(&self) -> Vec<Tensor> {
        let lora = self.lora.iter().flat_map(|ad| [ad.a.clone(), ad.b.clone()]);
        let delta = self.delta.iter().flat_map(|(a, b)| [a.clone(), b.clone()]);
        [Some(self.w.clone()), self.b.clone()]
            .into_iter()
            .flatten()
            .chain(delta)
            .chain(lora)
            .filter(Tensor::track_op)
            .collect()
    }
}

impl Adapter {
    fn dropout_input(&self, x: &Tensor) -> Result<Tensor> {
        if self.dropout <= 0.0 {
            return Ok(x.clone());
        }
        let mut guard = self.rng.lock().expect("lora rng lock");
        let Some(rng) = guard.as_mut() else {
            return Ok(x.clone());
        };
        let keep = 1.0 - self.dropout;
        let mask: Vec<f32> =
            (0..x.elem_count()).map(|_| if rng.random::<f64>() < keep { (1.0 / keep) as f32 } else { 0.0 }).collect();
        x * Tensor::from_vec(mask, x.shape(), x.device())?
    }
}
