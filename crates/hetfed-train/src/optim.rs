//! AdamW (decoupled weight decay, as `torch.optim.AdamW`) with state that can be saved and
//! restored, and learning-rate schedules with linear warmup.

use candle_core::{Result, Tensor, Var};
use serde::{Deserialize, Serialize};

use hetfed_core::TensorMap;

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    Constant,
    Linear,
    Cosine,
}

impl std::str::FromStr for Schedule {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "constant" => Ok(Self::Constant),
            "linear" => Ok(Self::Linear),
            "cosine" => Ok(Self::Cosine),
            o => Err(format!("expected constant, linear or cosine, found {o:?}")),
        }
    }
}

/// Learning rate at optimizer step `step` (0-based) of `total`: linear warmup from 0 over
/// `warmup` steps, then constant, linear decay to 0, or cosine decay to 0.
pub fn lr_at(base: f64, schedule: Schedule, warmup: usize, total: usize, step: usize) -> f64 {
    if step < warmup {
        return base * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let p = ((step - warmup) as f64 / span).min(1.0);
    match schedule {
        Schedule::Constant => base,
        Schedule::Linear => base * (1.0 - p),
        Schedule::Cosine => base * 0.5 * (1.0 + (std::f64::consts::PI * p).cos()),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 }
    }
}

#[derive(Clone, Copy)]
struct Coeffs {
    b1: f32,
    b2: f32,
    eps: f32,
    decay: f32,
    /// lr / (1 - beta1^t)
    step: f32,
    /// 1 / sqrt(1 - beta2^t)
    inv_sqrt_bc2: f32,
}

/// `p ← p·(1 - lr·wd) - lr·m̂/(sqrt(v̂) + eps)` with the moment updates, as torch's AdamW.
fn adamw_kernel(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], k: Coeffs) {
    use rayon::prelude::*;
    const CHUNK: usize = 1 << 14;
    p.par_chunks_mut(CHUNK)
        .zip(g.par_chunks(CHUNK))
        .zip(m.par_chunks_mut(CHUNK))
        .zip(v.par_chunks_mut(CHUNK))
        .for_each(|(((p, g), m), v)| {
            for j in 0..p.len() {
                let gj = g[j];
                m[j] = k.b1 * m[j] + (1.0 - k.b1) * gj;
                v[j] = k.b2 * v[j] + (1.0 - k.b2) * gj * gj;
                let denom = v[j].sqrt() * k.inv_sqrt_bc2 + k.eps;
                p[j] = p[j] * k.decay - k.step * m[j] / denom;
            }
        });
}

/// AdamW over named variables.
pub struct AdamW {
    pub cfg: AdamWConfig,
    vars: Vec<(String, Var)>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    /// Number of updates applied so far.
    pub t: usize,
}

impl AdamW {
    pub fn new(vars: Vec<(String, Var)>, cfg: AdamWConfig) -> Result<Self> {
        let m = vars.iter().map(|(_, v)| v.zeros_like()).collect::<Result<Vec<_>>>()?;
        let v = vars.iter().map(|(_, v)| v.zeros_like()).collect::<Result<Vec<_>>>()?;
        Ok(Self { cfg, vars, m, v, t: 0 })
    }

    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    /// One update with gradients `grads[i]` for `vars[i]` at learning rate `lr`.
    ///
    /// Fused: one pass per parameter over (param, grad, m, v) instead of a dozen tensor ops,
    /// each of which would allocate and sweep memory.
    pub fn step(&mut self, grads: &[Tensor], lr: f64) -> Result<()> {
        self.t += 1;
        let c = self.cfg;
        let bc1 = 1.0 - c.beta1.powi(self.t as i32);
        let bc2 = 1.0 - c.beta2.powi(self.t as i32);
        let k = Coeffs {
            b1: c.beta1 as f32,
            b2: c.beta2 as f32,
            eps: c.eps as f32,
            decay: (1.0 - lr * c.weight_decay) as f32,
            step: (lr / bc1) as f32,
            inv_sqrt_bc2: (1.0 / bc2.sqrt()) as f32,
        };
        for (i, (_, var)) in self.vars.iter().enumerate() {
            let shape = var.shape().clone();
            let p = var.as_detached_tensor().flatten_all()?.to_vec1::<f32>()?;
            let g = grads[i].flatten_all()?.to_vec1::<f32>()?;
            let mut m = self.m[i].flatten_all()?.to_vec1::<f32>()?;
            let mut v = self.v[i].flatten_all()?.to_vec1::<f32>()?;
            let mut p = p;
            adamw_kernel(&mut p, &g, &mut m, &mut v, k);
            let dev = var.device().clone();
            var.set(&Tensor::from_vec(p, shape.clone(), &dev)?)?;
            self.m[i] = Tensor::from_vec(m, shape.clone(), &dev)?;
            self.v[i] = Tensor::from_vec(v, shape, &dev)?;
        }
        Ok(())
    }

    /// Moments as tensors named `m.<var>` / `v.<var>`.
    pub fn state(&self) -> TensorMap {
        let mut out = TensorMap::new();
        for (i, (name, _)) in self.vars.iter().enumerate() {
            out.insert(format!("m.{name}"), self.m[i].clone());
            out.insert(format!("v.{name}"), self.v[i].clone());
        }
        out
    }

    pub fn load_state(&mut self, state: &TensorMap, t: usize) -> hetfed_core::Result<()> {
        for (i, (name, var)) in self.vars.iter().enumerate() {
            for (key, slot) in [(format!("m.{name}"), &mut self.m[i]), (format!("v.{name}"), &mut self.v[i])] {
                let s = state
                    .get(&key)
                    .ok_or_else(|| hetfed_core::Error::msg(format!("optimizer state has no `{key}`")))?;
                if s.dims() != var.dims() {
                    return Err(hetfed_core::Error::Shape {
                        name: key,
                        expected: var.dims().to_vec(),
                        found: s.dims().to_vec(),
                        where_: Some("optimizer state".into()),
                    });
                }
                *slot = s.clone();
            }
        }
        self.t = t;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn warmup_then_cosine_reaches_zero() {
        assert!((lr_at(1.0, Schedule::Cosine, 10, 110, 0) - 0.1).abs() < 1e-12);
        assert!((lr_at(1.0, Schedule::Cosine, 10, 110, 9) - 1.0).abs() < 1e-12);
        assert!((lr_at(1.0, Schedule::Cosine, 10, 110, 60) - 0.5).abs() < 1e-12);
        assert!(lr_at(1.0, Schedule::Cosine, 10, 110, 110).abs() < 1e-12);
        assert!((lr_at(2.0, Schedule::Linear, 0, 100, 50) - 1.0).abs() < 1e-12);
    }

    /// Three steps of AdamW on f(w) = sum(w²), checked against torch.optim.AdamW
    /// (lr 0.1, betas (0.9, 0.999), eps 1e-8, weight_decay 0.01) from w = [1, -2].
    #[test]
    fn adamw_matches_torch_trajectory() {
        let w = Var::new(&[1.0f32, -2.0], &Device::Cpu).unwrap();
        let mut opt =
            AdamW::new(vec![("w".into(), w.clone())], AdamWConfig { weight_decay: 0.01, ..Default::default() })
                .unwrap();
        for _ in 0..3 {
            let g = (w.as_tensor() * 2.0).unwrap();
            opt.step(&[g], 0.1).unwrap();
        }
        let got = w.as_tensor().to_vec1::<f32>().unwrap();
        let want = [0.698_911_25f32, -1.694_944_6];
        for (a, b) in got.iter().zip(want) {
            assert!((a - b).abs() < 1e-4, "{got:?}");
        }
    }
}
