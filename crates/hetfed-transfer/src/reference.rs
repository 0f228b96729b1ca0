//! The in-memory fit: every block's activations of both models captured at once
//! ([`capture`]), then each map fitted on its stacked, centred activations. It is what
//! [`PairMaps::fit`] computes without holding the activations, and stays as the reference the
//! streamed fit is tested and measured against.

use std::collections::BTreeMap;
use std::time::Instant;

use candle_core::Tensor;
use hetfed_core::{Error, Result};
use hetfed_model::Checkpoint;
use hetfed_project::{fit_procrustes, fit_ridge, random_orthogonal, Centring, Map};

use crate::calibration::{capture, Space};
use crate::maps::{
    embed_seed, modules_from_spaces, space_seed, weight_space_embed, weight_space_layer, Fitted, LayerFit, MapConfig,
    Method, PairMaps, Plan, FITTED_SPACES,
};

/// Centred fit and held-out halves of one space on both sides.
struct Paired {
    fit_s: Tensor,
    fit_l: Tensor,
    ho_s: Option<Tensor>,
    ho_l: Option<Tensor>,
}

fn split_centre(xs: &Tensor, xl: &Tensor, n_fit: usize) -> Result<Paired> {
    let n = xs.dim(0)?;
    let centre = |x: &Tensor| -> Result<(Tensor, Option<Tensor>)> {
        let fit = x.narrow(0, 0, n_fit)?;
        let mu = fit.mean_keepdim(0)?;
        let f = fit.broadcast_sub(&mu)?;
        let h = if n > n_fit { Some(x.narrow(0, n_fit, n - n_fit)?.broadcast_sub(&mu)?) } else { None };
        Ok((f, h))
    };
    let (fit_s, ho_s) = centre(xs)?;
    let (fit_l, ho_l) = centre(xl)?;
    Ok(Paired { fit_s, fit_l, ho_s, ho_l })
}

fn r2(map: &Map, p: &Paired) -> Result<f64> {
    match (&p.ho_s, &p.ho_l) {
        (Some(s), Some(l)) => map.explained_variance(s, l),
        _ => map.explained_variance(&p.fit_s, &p.fit_l),
    }
}

fn fit_one(method: Method, p: &Paired, ridge: f64, seed: u64) -> Result<Map> {
    let (d_s, d_l) = (p.fit_s.dim(1)?, p.fit_l.dim(1)?);
    Ok(match method {
        Method::Ridge => {
            let tr = hetfed_core::sq_norm(&p.fit_s)?;
            fit_ridge(&p.fit_s, &p.fit_l, ridge * tr / d_s as f64, Centring::None)?.0
        }
        Method::Procrustes => fit_procrustes(&p.fit_s, &p.fit_l, Centring::None)?.0,
        Method::Random => random_orthogonal(d_l, d_s, seed)?,
        Method::Identity => Map::identity(d_l, d_s)?,
        Method::WeightSpace => return Err(Error::msg("weight-space maps are fitted from weights, not activations")),
    })
}

impl PairMaps {
    /// The same maps as [`PairMaps::fit`], computed from every block's activations of both models
    /// held at once (stacked over all calibration tokens). Memory grows with blocks × tokens ×
    /// widths, so this is for small models: it is the reference the streamed fit is checked and
    /// measured against.
    pub fn fit_in_memory(
        small: &Checkpoint,
        large: &Checkpoint,
        seqs: &[Vec<u32>],
        calibration: &str,
        cfg: &MapConfig,
    ) -> Result<Self> {
        let t0 = Instant::now();
        let plan = Plan::new(small, large, seqs, cfg)?;
        let n_fit = plan.n_fit_seqs * plan.len;
        let acts_s = capture(small, seqs, 16)?;
        let acts_l = capture(large, seqs, 16)?;
        let mut layers = Vec::with_capacity(plan.cl.n_layer);
        let mut fits = Vec::with_capacity(plan.cl.n_layer);
        for (j, &i) in plan.pairing.iter().enumerate() {
            let tl = Instant::now();
            let paired =
                |space: Space| -> Result<Paired> { split_centre(&acts_s[i][&space], &acts_l[j][&space], n_fit) };
            let (modules, maps) = if cfg.method == Method::WeightSpace {
                weight_space_layer(small, large, i, j, (plan.cs.n_head, plan.cl.n_head))?
            } else {
                let maps = FITTED_SPACES
                    .into_iter()
                    .map(|space| {
                        Ok((space, fit_one(cfg.method, &paired(space)?, cfg.ridge, space_seed(cfg, j, space))?))
                    })
                    .collect::<Result<BTreeMap<_, _>>>()?;
                (modules_from_spaces(&maps), maps)
            };
            let explained_variance = maps
                .iter()
                .map(|(space, map)| Ok((space.name().to_string(), r2(map, &paired(*space)?)?)))
                .collect::<Result<_>>()?;
            layers.push(std::sync::Arc::new(modules));
            fits.push(LayerFit {
                large_layer: j,
                small_layer: i,
                explained_variance,
                seconds: tl.elapsed().as_secs_f64(),
            });
        }
        let p0 = split_centre(&acts_s[0][&Space::ResidIn], &acts_l[0][&Space::ResidIn], n_fit)?;
        let embed = if cfg.method == Method::WeightSpace {
            weight_space_embed(small, large)?
        } else {
            fit_one(cfg.method, &p0, cfg.ridge, embed_seed(cfg))?
        };
        let embed_explained_variance = r2(&embed, &p0)?;
        let fitted = Fitted { layers: crate::store::Layers::Memory(layers), fits, embed, embed_explained_variance };
        Self::assemble(small, large, calibration, cfg, plan, fitted, t0)
    }
}
