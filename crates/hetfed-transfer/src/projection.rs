//! Projecting a small model's task vector into the large model's weight space.

use std::collections::BTreeMap;
use std::time::Instant;

use candle_core::{DType, Tensor};
use hetfed_core::{Error, Result, TensorMap};
use hetfed_project::{
    concat_rows_interleaved, matrix_to_tensor, project_full, project_lora, project_vector, split_rows_interleaved, Map,
};
use hetfed_taskvec::{Delta, TaskVector};
use serde::Serialize;

use crate::maps::{ModuleMaps, PairMaps, MODULES};

/// One projected module.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ProjectedModule {
    /// The large model's module (`transformer.h.{j}.{module}`).
    pub name: String,
    /// The small model's module it came from.
    pub from: String,
    /// Frobenius norm of the (effective) update before and after projection.
    pub norm_in: f64,
    pub norm_out: f64,
}

/// What a projection did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ProjectReport {
    pub modules: Vec<ProjectedModule>,
    /// Parameters of the small update with no counterpart (LayerNorm gains and biases), with
    /// their norms: left out of the projected update.
    pub dropped: Vec<(String, f64)>,
    pub seconds: f64,
}

/// `transformer.h.{i}.{module}` → `(i, module)` for the projected modules.
fn parse_module(name: &str) -> Option<(usize, &str)> {
    let rest = name.strip_prefix("transformer.h.")?;
    let (i, module) = rest.split_once('.')?;
    let i: usize = i.parse().ok()?;
    MODULES.contains(&module).then_some((i, module))
}

/// `transformer.h.{i}.{module}.weight|bias` → `(i, module, is_weight)` for the projected modules.
fn parse_param(name: &str) -> Option<(usize, &str, bool)> {
    let (m, is_weight) = match name.strip_suffix(".weight") {
        Some(m) => (m, true),
        None => (name.strip_suffix(".bias")?, false),
    };
    parse_module(m).map(|(i, module)| (i, module, is_weight))
}

/// One LoRA module of a small layer to project: `(module, full name, B, A, norm of B·A)`.
type LoraItem<'a> = (&'a str, &'a str, &'a Tensor, &'a Tensor, f64);

fn norm(t: &Tensor) -> Result<f64> {
    Ok(hetfed_core::sq_norm(t)?.sqrt())
}

impl PairMaps {
    /// `f(j, i, layer j's maps, the items of small layer i)` for every large layer `j` in order,
    /// `i` its paired small layer, skipping layers whose small layer has no items. Large layer
    /// by large layer, so that maps read from disk are read once each and one at a time.
    fn per_large_layer<T>(
        &self,
        by_small: &BTreeMap<usize, Vec<T>>,
        mut f: impl FnMut(usize, &crate::LayerMaps, &[T]) -> Result<()>,
    ) -> Result<()> {
        for (j, i) in self.pairing.iter().enumerate() {
            if let Some(items) = by_small.get(i) {
                f(j, &*self.layer(j)?, items)?;
            }
        }
        Ok(())
    }

    /// Projects `tv` (made from this pair's small model) into the large model: the result is a
    /// task vector of the large model, LoRA with the same rank and scaling when `tv` is LoRA,
    /// dense otherwise. A small layer's update goes to every large layer paired with it.
    pub fn project(&self, tv: &TaskVector) -> Result<(TaskVector, ProjectReport)> {
        self.check_base(&tv.base)?;
        let t0 = Instant::now();
        let mut report = ProjectReport::default();
        let kind = match &tv.kind {
            Delta::Lora { config, factors } => {
                let mut out = TensorMap::new();
                let scale = config.scale();
                // Small layer → its modules' (module, full name, B, A, norm), all checked before
                // any map is read.
                let mut by_small: BTreeMap<usize, Vec<LoraItem<'_>>> = BTreeMap::new();
                for (name, a) in factors {
                    let Some(module_full) = name.strip_suffix(".lora_A") else { continue };
                    let b = factors
                        .get(&format!("{module_full}.lora_B"))
                        .ok_or_else(|| Error::msg(format!("LoRA update has `{name}` but no `{module_full}.lora_B`")))?;
                    let (i, module) = parse_module(module_full).ok_or_else(|| {
                        Error::msg(format!(
                            "expected LoRA factors of BLOOM's linear modules ({}), found `{module_full}`",
                            MODULES.join(", ")
                        ))
                    })?;
                    let norm_in = norm(&b.matmul(a)?)? * scale;
                    by_small.entry(i).or_default().push((module, module_full, b, a, norm_in));
                }
                self.per_large_layer(&by_small, |j, layer, items| {
                    for &(module, module_full, b, a, norm_in) in items {
                        let (b2, a2) = self.project_factors(&layer[module], b, a)?;
                        let large = format!("transformer.h.{j}.{module}");
                        report.modules.push(ProjectedModule {
                            name: large.clone(),
                            from: module_full.to_string(),
                            norm_in,
                            norm_out: norm(&b2.matmul(&a2)?)? * scale,
                        });
                        out.insert(format!("{large}.lora_A"), a2);
                        out.insert(format!("{large}.lora_B"), b2);
                    }
                    Ok(())
                })?;
                Delta::Lora { config: config.clone(), factors: out }
            }
            Delta::Full(delta) => {
                let mut out = TensorMap::new();
                let mut by_small: BTreeMap<usize, Vec<(&str, bool, &String, &Tensor)>> = BTreeMap::new();
                for (name, d) in delta {
                    if name == "transformer.word_embeddings.weight" {
                        // Rows are residual-space vectors: dE_l = dE_s·T^T.
                        let tt = matrix_to_tensor(&self.embed.matrix().transpose(), d.device())?;
                        let p = d.to_dtype(DType::F32)?.matmul(&tt)?;
                        report.modules.push(ProjectedModule {
                            name: name.clone(),
                            from: name.clone(),
                            norm_in: norm(d)?,
                            norm_out: norm(&p)?,
                        });
                        out.insert(name.clone(), p);
                        continue;
                    }
                    let Some((i, module, is_weight)) = parse_param(name) else {
                        if name.contains("layernorm") || name.starts_with("transformer.ln_f") {
                            report.dropped.push((name.clone(), norm(d)?));
                            continue;
                        }
                        return Err(Error::msg(format!(
                            "expected parameters of a BLOOM model, found `{name}` in the update"
                        )));
                    };
                    by_small.entry(i).or_default().push((module, is_weight, name, d));
                }
                self.per_large_layer(&by_small, |j, layer, items| {
                    for &(module, is_weight, name, d) in items {
                        let p = self.project_dense(&layer[module], d, is_weight)?;
                        let large = format!("transformer.h.{j}.{module}.{}", if is_weight { "weight" } else { "bias" });
                        report.modules.push(ProjectedModule {
                            name: large.clone(),
                            from: name.clone(),
                            norm_in: norm(d)?,
                            norm_out: norm(&p)?,
                        });
                        out.insert(large, p);
                    }
                    Ok(())
                })?;
                Delta::Full(out)
            }
        };
        report.seconds = t0.elapsed().as_secs_f64();
        Ok((TaskVector { base: self.large.clone(), kind }, report))
    }

    /// `(T_out·B, A·T_in^T)`, per Q/K/V part for the fused attention projection.
    fn project_factors(&self, mm: &ModuleMaps, b: &Tensor, a: &Tensor) -> Result<(Tensor, Tensor)> {
        if mm.out.len() == 1 {
            return project_lora(b, a, &mm.out[0], &mm.input);
        }
        let parts = split_rows_interleaved(b, self.n_head_small, 3)?;
        let mut bs = Vec::with_capacity(3);
        let mut a_out = None;
        for (p, t) in parts.iter().zip(&mm.out) {
            let (b2, a2) = project_lora(p, a, t, &mm.input)?;
            bs.push(b2);
            a_out = Some(a2);
        }
        let a2 = a_out.ok_or_else(|| Error::msg("fused QKV: expected three parts"))?;
        Ok((concat_rows_interleaved(&bs, self.n_head_large)?, a2))
    }

    /// `f(part, T_out of the part)` for a module's output rows: the whole tensor for one output
    /// map, or Q, K and V separately (BLOOM's per-head interleaved rows, split with `heads_in`
    /// heads and joined with `heads_out`) for the fused attention projection.
    fn per_part(
        d: &Tensor,
        mm: &ModuleMaps,
        heads_in: usize,
        heads_out: usize,
        f: impl Fn(&Tensor, &Map) -> Result<Tensor>,
    ) -> Result<Tensor> {
        if mm.out.len() == 1 {
            return f(d, &mm.out[0]);
        }
        let parts = split_rows_interleaved(d, heads_in, mm.out.len())?;
        let ps = parts.iter().zip(&mm.out).map(|(p, t)| f(p, t)).collect::<Result<Vec<_>>>()?;
        concat_rows_interleaved(&ps, heads_out)
    }

    /// A dense weight (`T_out·dW·T_in^T`) or bias (`T_out·db`) update of large layer `j`.
    fn project_dense(&self, mm: &ModuleMaps, d: &Tensor, is_weight: bool) -> Result<Tensor> {
        Self::per_part(d, mm, self.n_head_small, self.n_head_large, |p, t| {
            if is_weight {
                project_full(p, t, &mm.input)
            } else {
                project_vector(p, t)
            }
        })
    }

    /// The reverse direction, for personalisation: a task vector of the *large* model moved into
    /// the small one with the transposed maps, `dW_s = T_out^T·dW_l·T_in` (biases `T_out^T·db`,
    /// embedding rows `dE_l·T`), averaged over the large layers paired with each small layer.
    /// LoRA factors are multiplied out first (the result is dense). For semi-orthogonal maps
    /// this inverts [`PairMaps::project`] on the directions the small model has.
    pub fn project_back(&self, tv: &TaskVector) -> Result<(TaskVector, ProjectReport)> {
        if tv.base != self.large {
            return Err(Error::msg(format!(
                "expected an update of the large model these maps were fitted for, {}, found one of {}",
                self.large, tv.base
            )));
        }
        let t0 = Instant::now();
        let mut report = ProjectReport::default();
        let mut acc: BTreeMap<String, (Tensor, usize)> = BTreeMap::new();
        for (name, d) in tv.materialize()? {
            let d = d.to_dtype(DType::F32)?;
            if name == "transformer.word_embeddings.weight" {
                let t = matrix_to_tensor(self.embed.matrix(), d.device())?;
                let p = d.matmul(&t)?;
                report.modules.push(ProjectedModule {
                    name: name.clone(),
                    from: name.clone(),
                    norm_in: norm(&d)?,
                    norm_out: norm(&p)?,
                });
                acc.insert(name, (p, 1));
                continue;
            }
            let Some((j, module, is_weight)) = parse_param(&name) else {
                report.dropped.push((name.clone(), norm(&d)?));
                continue;
            };
            let i = *self
                .pairing
                .get(j)
                .ok_or_else(|| Error::msg(format!("`{name}`: the large model has {} layers", self.pairing.len())))?;
            let layer = self.layer(j)?;
            let mm = &layer[module];
            // The transposed maps: T_out^T·dW·T_in (weights), T_out^T·db (biases).
            let p = Self::per_part(&d, mm, self.n_head_large, self.n_head_small, |part, out| {
                let to_t = matrix_to_tensor(&out.matrix().transpose(), part.device())?;
                if is_weight {
                    Ok(to_t.matmul(part)?.matmul(&mm.input.to_tensor(part.device())?)?)
                } else {
                    Ok(to_t.matmul(&part.unsqueeze(1)?)?.squeeze(1)?)
                }
            })?;
            let small = format!("transformer.h.{i}.{module}.{}", if is_weight { "weight" } else { "bias" });
            report.modules.push(ProjectedModule {
                name: small.clone(),
                from: name.clone(),
                norm_in: norm(&d)?,
                norm_out: norm(&p)?,
            });
            let next = match acc.remove(&small) {
                Some((a, n)) => ((a + p)?, n + 1),
                None => (p, 1),
            };
            acc.insert(small, next);
        }
        let out = acc.into_iter().map(|(k, (t, n))| Ok((k, (t / n as f64)?))).collect::<Result<TensorMap>>()?;
        report.seconds = t0.elapsed().as_secs_f64();
        Ok((TaskVector { base: self.small.clone(), kind: Delta::Full(out) }, report))
    }

    /// Explained variance per space averaged over layers (for reports).
    pub fn mean_explained_variance_by_space(&self) -> BTreeMap<String, f64> {
        let mut acc: BTreeMap<String, (f64, usize)> = BTreeMap::new();
        for l in &self.summary.layers {
            for (k, v) in &l.explained_variance {
                if v.is_finite() {
                    let e = acc.entry(k.clone()).or_default();
                    e.0 += v;
                    e.1 += 1;
                }
            }
        }
        acc.into_iter().map(|(k, (s, n))| (k, s / n.max(1) as f64)).collect()
    }
}
