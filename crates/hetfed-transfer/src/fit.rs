//! The streamed fit ([`PairMaps::fit`]): both models walked one block at a time over the
//! calibration batches, each layer's maps fitted from sufficient statistics of that layer's
//! activations ([`Moments`]) and the activations dropped before the next layer.
//!
//! What is held at any time: both models' residual streams at the current block boundary for
//! every calibration batch (`[batch, seq, hidden]` each, plus the next boundary's while a block
//! is being read), one batch's activations of one block per model, the held-out activations of
//! the current layer, and per fitted space the f64 statistics (`d_large·d_small` for the cross
//! products of Procrustes and ridge, `d_small²` more for ridge).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Tensor};
use hetfed_core::{Error, Result};
use hetfed_model::{bloom, Checkpoint};
use hetfed_project::{random_orthogonal, Map, Moments};

use crate::calibration::{bloom_model, by_space, check_seqs, id_batch, Space};
use crate::maps::{
    embed_seed, modules_from_spaces, space_seed, weight_space_embed, weight_space_layer, Fitted, LayerFit, MapConfig,
    Method, PairMaps, Plan, FITTED_SPACES,
};
use crate::store::{layer_file, write_layer, LayerMaps, Layers};

/// Calibration sequences per forward batch.
pub(crate) const BATCH: usize = 16;

/// One model's residual streams over the calibration batches at one block boundary.
struct Stream {
    model: bloom::Model,
    /// Id batches: the fitted sequences first, then the held-out ones; no batch holds both.
    ids: Vec<Tensor>,
    /// The stream entering block `pos`, per batch.
    x: Vec<Tensor>,
    /// The stream leaving block `pos`, per batch, as far as [`Stream::capture`] has computed it.
    next: Vec<Option<Tensor>>,
    pos: usize,
}

impl Stream {
    fn new(ck: &Checkpoint, seqs: &[Vec<u32>], n_fit_seqs: usize, batch: usize) -> Result<Self> {
        let model = bloom_model(ck)?;
        let len = check_seqs(&model, &ck.source(), seqs)?;
        let (fit, held_out) = seqs.split_at(n_fit_seqs);
        let ids = fit
            .chunks(batch.max(1))
            .chain(held_out.chunks(batch.max(1)))
            .map(|c| id_batch(c, len))
            .collect::<Result<Vec<_>>>()?;
        let mut s = Self { model, ids, x: Vec::new(), next: Vec::new(), pos: 0 };
        s.rewind()?;
        Ok(s)
    }

    /// Back to the embeddings (block 0's input).
    fn rewind(&mut self) -> Result<()> {
        self.x = self.ids.iter().map(|ids| self.model.embed_ids(ids)).collect::<candle_core::Result<_>>()?;
        self.next = vec![None; self.ids.len()];
        self.pos = 0;
        Ok(())
    }

    /// Moves to the input of block `i`: from the start again when `i` lies behind, otherwise
    /// forward (reusing the outputs [`Stream::capture`] computed when moving one block on).
    fn advance_to(&mut self, i: usize) -> Result<()> {
        if i < self.pos {
            self.rewind()?;
        }
        if i > self.pos {
            if let Some(next) = self.next.iter_mut().map(Option::take).collect::<Option<Vec<_>>>() {
                self.x = next;
                self.pos += 1;
            }
        }
        self.next = vec![None; self.ids.len()];
        while self.pos < i {
            for x in &mut self.x {
                *x = self.model.capture_block(self.pos, x)?.1;
            }
            self.pos += 1;
        }
        Ok(())
    }

    /// Block `pos`'s activations on batch `b` (`[batch·seq, d]` per space); keeps the block's
    /// output for the next [`Stream::advance_to`].
    fn capture(&mut self, b: usize) -> Result<[(Space, Tensor); 10]> {
        let (acts, next) = self.model.capture_block(self.pos, &self.x[b])?;
        self.next[b] = Some(next);
        Ok(by_space(acts))
    }

    /// Batch `b`'s stream at the current boundary as `[batch·seq, hidden]` rows.
    fn rows(&self, b: usize) -> Result<Tensor> {
        let (n, t, h) = self.x[b].dims3()?;
        Ok(self.x[b].reshape((n * t, h))?)
    }
}

/// One space's statistics over the fitted batches and its held-out activations.
struct SpaceStats {
    moments: Moments,
    ho_s: Vec<Tensor>,
    ho_l: Vec<Tensor>,
}

impl SpaceStats {
    /// Statistics for `method`; the cross products and the Gram matrix are kept only when a fit
    /// or the R² on the fitted tokens (no held-out tokens) needs them.
    fn new(d_s: usize, d_l: usize, method: Method, held_out: bool) -> Self {
        let cross = matches!(method, Method::Procrustes | Method::Ridge) || !held_out;
        let gram = method == Method::Ridge || !held_out;
        Self { moments: Moments::new(d_s, d_l, cross, gram), ho_s: Vec::new(), ho_l: Vec::new() }
    }

    fn add(&mut self, fit: bool, xs: Tensor, xl: Tensor) -> Result<()> {
        if fit {
            self.moments.add(&xs, &xl)
        } else {
            self.ho_s.push(xs);
            self.ho_l.push(xl);
            Ok(())
        }
    }

    /// The map of `method` (never the weight-space one, fitted from weights).
    ///
    /// With held-out tokens (whose R² needs only the means), Procrustes moves the cross products
    /// out of the statistics rather than copying them: at real widths they are 512 MiB.
    fn fit(&mut self, method: Method, ridge: f64, seed: u64) -> Result<Map> {
        let held_out = !self.ho_s.is_empty();
        let m = &mut self.moments;
        let (d_s, d_l) = m.dims();
        match method {
            Method::Ridge => m.fit_ridge(ridge * m.total_sq_small()? / d_s as f64),
            Method::Procrustes if held_out => m.take_procrustes(),
            Method::Procrustes => m.fit_procrustes(),
            Method::Random => random_orthogonal(d_l, d_s, seed),
            Method::Identity => Map::identity(d_l, d_s),
            Method::WeightSpace => Err(Error::msg("weight-space maps are fitted from weights, not activations")),
        }
    }

    /// R² of `map` on the held-out tokens, centred by the fitted tokens' means; on the fitted
    /// tokens when none are held out.
    fn r2(&self, map: &Map) -> Result<f64> {
        if self.ho_s.is_empty() {
            return self.moments.explained_variance(map);
        }
        let (mu_s, mu_l) = self.moments.means()?;
        let centre = |parts: &[Tensor], mu: &hetfed_project::nalgebra::DVector<f64>| -> Result<Tensor> {
            let mu: Vec<f32> = mu.iter().map(|&v| v as f32).collect();
            let mu = Tensor::from_vec(mu, (1, parts[0].dim(1)?), parts[0].device())?;
            Ok(Tensor::cat(parts, 0)?.to_dtype(DType::F32)?.broadcast_sub(&mu)?)
        };
        map.explained_variance(&centre(&self.ho_s, &mu_s)?, &centre(&self.ho_l, &mu_l)?)
    }
}

/// What every layer's fit reads.
struct Ctx<'a> {
    small: &'a Checkpoint,
    large: &'a Checkpoint,
    cfg: &'a MapConfig,
    /// Batches `0..n_fit_batches` are fitted on, the rest held out.
    n_fit_batches: usize,
    n_head: (usize, usize),
}

impl Ctx<'_> {
    fn held_out(&self, s: &Stream) -> bool {
        s.ids.len() > self.n_fit_batches
    }
}

/// Adds one batch's paired activations of `spaces` to `stats`.
fn accumulate(
    cx: &Ctx<'_>,
    stats: &mut BTreeMap<Space, SpaceStats>,
    b: usize,
    held_out: bool,
    pairs: impl Iterator<Item = (Space, Tensor, Tensor)>,
) -> Result<()> {
    for (space, xs, xl) in pairs {
        let st = match stats.entry(space) {
            std::collections::btree_map::Entry::Occupied(e) => e.into_mut(),
            std::collections::btree_map::Entry::Vacant(e) => {
                e.insert(SpaceStats::new(xs.dim(1)?, xl.dim(1)?, cx.cfg.method, held_out))
            }
        };
        st.add(b < cx.n_fit_batches, xs, xl)?;
    }
    Ok(())
}

/// The maps of large layer `j` (paired with small layer `i`) and its report.
fn fit_layer(cx: &Ctx<'_>, s: &mut Stream, l: &mut Stream, i: usize, j: usize) -> Result<(LayerMaps, LayerFit)> {
    let tl = Instant::now();
    s.advance_to(i)?;
    l.advance_to(j)?;
    let held_out = cx.held_out(s);
    let mut stats = BTreeMap::new();
    for b in 0..s.ids.len() {
        let (a_s, a_l) = (s.capture(b)?, l.capture(b)?);
        let pairs = a_s
            .into_iter()
            .zip(a_l)
            .filter(|((space, _), _)| FITTED_SPACES.contains(space))
            .map(|((space, xs), (_, xl))| (space, xs, xl));
        accumulate(cx, &mut stats, b, held_out, pairs)?;
    }
    let (modules, maps) = if cx.cfg.method == Method::WeightSpace {
        weight_space_layer(cx.small, cx.large, i, j, cx.n_head)?
    } else {
        let maps = stats
            .iter_mut()
            .map(|(space, st)| Ok((*space, st.fit(cx.cfg.method, cx.cfg.ridge, space_seed(cx.cfg, j, *space))?)))
            .collect::<Result<BTreeMap<_, _>>>()?;
        (modules_from_spaces(&maps), maps)
    };
    let explained_variance =
        maps.iter().map(|(space, map)| Ok((space.name().to_string(), stats[space].r2(map)?))).collect::<Result<_>>()?;
    Ok((modules, LayerFit { large_layer: j, small_layer: i, explained_variance, seconds: tl.elapsed().as_secs_f64() }))
}

/// The embedding map (the residual stream entering block 0) and its R²; both streams must be at
/// block 0.
fn fit_embed(cx: &Ctx<'_>, s: &Stream, l: &Stream) -> Result<(Map, f64)> {
    let held_out = cx.held_out(s);
    let mut stats = BTreeMap::new();
    for b in 0..s.ids.len() {
        accumulate(cx, &mut stats, b, held_out, std::iter::once((Space::ResidIn, s.rows(b)?, l.rows(b)?)))?;
    }
    let st = stats.get_mut(&Space::ResidIn).ok_or_else(|| Error::msg("maps: no calibration batches"))?;
    let map = if cx.cfg.method == Method::WeightSpace {
        weight_space_embed(cx.small, cx.large)?
    } else {
        st.fit(cx.cfg.method, cx.cfg.ridge, embed_seed(cx.cfg))?
    };
    let r2 = st.r2(&map)?;
    Ok((map, r2))
}

impl PairMaps {
    /// Fits every map between `small` and `large` (both BLOOM, one vocabulary) on the
    /// calibration sequences `seqs` (described by `calibration` for reports and the cache key).
    ///
    /// Both models are walked one block at a time over batches of the sequences, and each
    /// layer's maps are fitted from that layer's activations alone (see the `fit` module), so
    /// memory does not grow with the number of layers; the result equals
    /// [`PairMaps::fit_in_memory`]'s up to rounding.
    pub fn fit(
        small: &Checkpoint,
        large: &Checkpoint,
        seqs: &[Vec<u32>],
        calibration: &str,
        cfg: &MapConfig,
    ) -> Result<Self> {
        Self::fit_batched(small, large, seqs, calibration, cfg, BATCH, None)
    }

    /// [`PairMaps::fit`] into the directory `dir` (the format of [`PairMaps::save`]): each
    /// layer's maps are written as soon as they are fitted and dropped, so the fit holds one
    /// layer's maps at a time; the maps returned read their layers from `dir`.
    pub fn fit_into(
        dir: &Path,
        small: &Checkpoint,
        large: &Checkpoint,
        seqs: &[Vec<u32>],
        calibration: &str,
        cfg: &MapConfig,
    ) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let maps = Self::fit_batched(small, large, seqs, calibration, cfg, BATCH, Some(dir))?;
        maps.write_pair(dir)?;
        Ok(maps)
    }

    /// [`PairMaps::fit`] with `batch` sequences per forward batch.
    pub(crate) fn fit_batched(
        small: &Checkpoint,
        large: &Checkpoint,
        seqs: &[Vec<u32>],
        calibration: &str,
        cfg: &MapConfig,
        batch: usize,
        store: Option<&Path>,
    ) -> Result<Self> {
        let t0 = Instant::now();
        let plan = Plan::new(small, large, seqs, cfg)?;
        let mut s = Stream::new(small, seqs, plan.n_fit_seqs, batch)?;
        let mut l = Stream::new(large, seqs, plan.n_fit_seqs, batch)?;
        let n_fit_batches = plan.n_fit_seqs.div_ceil(batch.max(1));
        let cx = Ctx { small, large, cfg, n_fit_batches, n_head: (plan.cs.n_head, plan.cl.n_head) };
        let (embed, embed_explained_variance) = fit_embed(&cx, &s, &l)?;
        let mut layers = Vec::with_capacity(plan.pairing.len());
        let mut fits = Vec::with_capacity(plan.pairing.len());
        for (j, &i) in plan.pairing.iter().enumerate() {
            let (modules, fit) = fit_layer(&cx, &mut s, &mut l, i, j)?;
            tracing::info!(layer = j, seconds = fit.seconds, "maps fitted");
            match store {
                Some(dir) => write_layer(&layer_file(dir, j), &modules)?,
                None => layers.push(Arc::new(modules)),
            }
            fits.push(fit);
        }
        let layers = match store {
            Some(dir) => Layers::Disk { dir: dir.to_path_buf(), n: fits.len(), resident: Default::default() },
            None => Layers::Memory(layers),
        };
        let fitted = Fitted { layers, fits, embed, embed_explained_variance };
        Self::assemble(small, large, calibration, cfg, plan, fitted, t0)
    }
}
