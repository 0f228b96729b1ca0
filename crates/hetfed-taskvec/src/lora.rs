//! The factored (LoRA) side of task vectors: checking factors, their dense update and norm,
//! folding a scale into them and stacking two adapters into one.

use std::collections::BTreeSet;

use candle_core::{DType, Tensor};
use hetfed_core::{Error, Result, TensorMap};
use hetfed_model::LoraConfig;

/// The two factors of one adapted module, checked against each other and the config.
pub(crate) struct Pair<'a> {
    pub module: &'a str,
    /// `[rank, in]`.
    pub a: &'a Tensor,
    /// `[out, rank]`.
    pub b: &'a Tensor,
}

impl Pair<'_> {
    fn in_dim(&self) -> usize {
        self.a.dims()[1]
    }
    fn out_dim(&self) -> usize {
        self.b.dims()[0]
    }
}

/// Every module's factors, in name order. Errors unless every name is `<module>.lora_A` or
/// `<module>.lora_B`, each `A` has its `B` and vice versa, both are matrices, and both have the
/// config's rank: anything else would make `B·A·scale` wrong or impossible.
pub(crate) fn pairs<'a>(config: &LoraConfig, factors: &'a TensorMap) -> Result<Vec<Pair<'a>>> {
    if config.rank == 0 {
        return Err(Error::msg("LoRA rank must be at least 1, found 0"));
    }
    if !config.alpha.is_finite() {
        return Err(Error::msg(format!("LoRA alpha must be finite, found {}", config.alpha)));
    }
    let mut out = Vec::new();
    for (name, t) in factors {
        if let Some(module) = name.strip_suffix(".lora_A") {
            let b_name = format!("{module}.lora_B");
            let b = factors
                .get(&b_name)
                .ok_or_else(|| Error::msg(format!("LoRA factors have `{name}` but no `{b_name}`")))?;
            let (Ok((ra, in_dim)), Ok((out_dim, rb))) = (t.dims2(), b.dims2()) else {
                return Err(Error::msg(format!(
                    "expected LoRA factors `{name}` [rank, in] and `{b_name}` [out, rank] to be matrices, found shapes {:?} and {:?}",
                    t.dims(),
                    b.dims()
                )));
            };
            let where_ = Some(format!("LoRA factors of rank {}", config.rank));
            if ra != config.rank {
                return Err(Error::Shape {
                    name: name.clone(),
                    expected: vec![config.rank, in_dim],
                    found: vec![ra, in_dim],
                    where_,
                });
            }
            if rb != config.rank {
                return Err(Error::Shape {
                    name: b_name,
                    expected: vec![out_dim, config.rank],
                    found: vec![out_dim, rb],
                    where_,
                });
            }
            out.push(Pair { module, a: t, b });
        } else if let Some(module) = name.strip_suffix(".lora_B") {
            if !factors.contains_key(&format!("{module}.lora_A")) {
                return Err(Error::msg(format!("LoRA factors have `{name}` but no `{module}.lora_A`")));
            }
        } else {
            return Err(Error::msg(format!(
                "expected LoRA factor names ending in `.lora_A` or `.lora_B`, found `{name}`"
            )));
        }
    }
    Ok(out)
}

/// `B·A·scale` in f32.
pub(crate) fn delta(p: &Pair<'_>, scale: f64) -> Result<Tensor> {
    let a = p.a.to_dtype(DType::F32)?;
    let b = p.b.to_dtype(DType::F32)?;
    Ok((b.matmul(&a)? * scale)?)
}

/// `||B·A·scale||²` as `scale² · sum((BᵀB) ⊙ (A·Aᵀ))` (the trace identity
/// `tr(AᵀBᵀBA) = tr((BᵀB)(AAᵀ))`): two `rank × rank` products instead of an `out × in` one. In
/// f64 because the Gram products cancel when the update is near zero.
pub(crate) fn sq_norm(p: &Pair<'_>, scale: f64) -> Result<f64> {
    let a = p.a.to_dtype(DType::F64)?;
    let b = p.b.to_dtype(DType::F64)?;
    let ga = a.matmul(&a.t()?)?;
    let gb = b.t()?.matmul(&b)?;
    let s = (ga * gb)?.sum_all()?.to_scalar::<f64>()?;
    // Rounding can leave a tiny negative value for a zero update.
    Ok((s * scale * scale).max(0.0))
}

/// The factors with `lambda` folded into every `B`, so `B·A·scale` scales by `lambda`.
pub(crate) fn scale_factors(config: &LoraConfig, factors: &TensorMap, lambda: f64) -> Result<TensorMap> {
    let mut out = TensorMap::new();
    for p in pairs(config, factors)? {
        out.insert(format!("{}.lora_A", p.module), p.a.clone());
        out.insert(format!("{}.lora_B", p.module), (p.b * lambda)?);
    }
    Ok(out)
}

/// One adapter whose update is the exact sum of two: `A = [A1; A2]` (rank `r1 + r2`) and
/// `B = [B1·s1/s, B2·s2/s]`, so that `B·A·s = B1·A1·s1 + B2·A2·s2`.
///
/// The result keeps the first operand's scale `s = s1` (or 1 if `s1` is zero or not finite), with
/// `alpha = s·(r1 + r2)` so that `alpha / rank` is still `s`; when both scales are equal no `B` is
/// rescaled at all. A module present in only one operand gets zero factors for the other so every
/// module has the config's rank. Targets are the union (first operand's order); dropout is the
/// first operand's, as it plays no part in the update.
pub(crate) fn stack(
    c1: &LoraConfig,
    f1: &TensorMap,
    c2: &LoraConfig,
    f2: &TensorMap,
) -> Result<(LoraConfig, TensorMap)> {
    let p1 = pairs(c1, f1)?;
    let p2 = pairs(c2, f2)?;
    let (s1, s2) = (c1.scale(), c2.scale());
    let s = if s1.is_finite() && s1 != 0.0 { s1 } else { 1.0 };
    let rank = c1.rank + c2.rank;
    let mut targets = c1.targets.clone();
    for t in &c2.targets {
        if !targets.contains(t) {
            targets.push(t.clone());
        }
    }
    let config = LoraConfig { rank, alpha: s * rank as f64, dropout: c1.dropout, targets };

    let modules: BTreeSet<&str> = p1.iter().chain(&p2).map(|p| p.module).collect();
    let find = |ps: &'_ [Pair<'_>], m: &str| ps.iter().position(|p| p.module == m);
    let mut out = TensorMap::new();
    for module in modules {
        let (q1, q2) = (find(&p1, module).map(|i| &p1[i]), find(&p2, module).map(|i| &p2[i]));
        // Every module comes from one of the operands, so this never skips.
        let Some(first) = q1.or(q2) else { continue };
        let (out_dim, in_dim, dev) = (first.out_dim(), first.in_dim(), first.a.device().clone());
        if let (Some(x), Some(y)) = (q1, q2) {
            if (x.out_dim(), x.in_dim()) != (y.out_dim(), y.in_dim()) {
                return Err(Error::Shape {
                    name: format!("{module}.weight"),
                    expected: vec![x.out_dim(), x.in_dim()],
                    found: vec![y.out_dim(), y.in_dim()],
                    where_: Some("the second LoRA task vector".into()),
                });
            }
        }
        let part = |q: Option<&Pair<'_>>, r: usize, si: f64| -> Result<(Tensor, Tensor)> {
            match q {
                Some(p) => {
                    let a = p.a.to_dtype(DType::F32)?;
                    let b = p.b.to_dtype(DType::F32)?;
                    // Skip the multiply when it is 1 so equal-scale sums stay bit-exact.
                    let b = if si == s { b } else { (b * (si / s))? };
                    Ok((a, b))
                }
                None => {
                    Ok((Tensor::zeros((r, in_dim), DType::F32, &dev)?, Tensor::zeros((out_dim, r), DType::F32, &dev)?))
                }
            }
        };
        let (a1, b1) = part(q1, c1.rank, s1)?;
        let (a2, b2) = part(q2, c2.rank, s2)?;
        out.insert(format!("{module}.lora_A"), Tensor::cat(&[&a1, &a2], 0)?);
        out.insert(format!("{module}.lora_B"), Tensor::cat(&[&b1, &b2], 1)?);
    }
    Ok((config, out))
}
