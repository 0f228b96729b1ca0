//! [`PairMaps`]: every map between one small and one large BLOOM model, how they were fitted,
//! and their on-disk cache.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use hetfed_core::{Error, Result, TensorMap};
use hetfed_model::{Arch, Checkpoint, ModelIdentity};
use hetfed_project::{
    fit_procrustes, fit_weight_space, pair_layers, split_rows_interleaved, Centring, Map, WeightFitOptions,
};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::calibration::Space;
use crate::store::{layer_file, write_layer, LayerMaps, Layers};

/// The linear modules of a BLOOM block that updates are projected for, as named under
/// `transformer.h.{i}.`.
pub const MODULES: [&str; 4] =
    ["self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"];

/// The spaces a module reads (`T_in`) and writes (`T_out`, three for the fused QKV).
pub(crate) fn module_spaces(module: &str) -> (Vec<Space>, Space) {
    match module {
        "self_attention.query_key_value" => (vec![Space::Q, Space::K, Space::V], Space::AttnIn),
        "self_attention.dense" => (vec![Space::Resid], Space::Ctx),
        // GELU is elementwise, so the pre-activation space has the coordinates of the GELU
        // output; the latter is fitted because it spans the whole space (pre-activations span
        // at most the hidden size, which would leave most of the map undetermined).
        "mlp.dense_h_to_4h" => (vec![Space::MlpHidden], Space::MlpIn),
        _ => (vec![Space::Resid], Space::MlpHidden),
    }
}

/// How the maps are made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// Ridge least squares on centred calibration activations.
    Ridge,
    /// Orthogonal Procrustes on centred calibration activations (Theseus / Ariadne).
    Procrustes,
    /// Data-free LiGO-style fit `A·W_s·B^T ≈ W_l` on the base weights, per module.
    WeightSpace,
    /// Haar-random semi-orthogonal maps: the control every method must beat.
    Random,
    /// `[I; 0]`: the control "coordinates already agree".
    Identity,
}

impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Method::Ridge => "ridge",
            Method::Procrustes => "procrustes",
            Method::WeightSpace => "weight_space",
            Method::Random => "random",
            Method::Identity => "identity",
        }
    }
}

impl std::str::FromStr for Method {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Ok(match s {
            "ridge" => Method::Ridge,
            "procrustes" => Method::Procrustes,
            "weight_space" | "weight-space" => Method::WeightSpace,
            "random" => Method::Random,
            "identity" => Method::Identity,
            _ => {
                return Err(format!(
                    "expected a map method (ridge, procrustes, weight_space, random, identity), found {s:?}"
                ))
            }
        })
    }
}

/// Settings of a fit (part of the cache key).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MapConfig {
    pub method: Method,
    /// Ridge strength relative to the mean eigenvalue of `X_s^T·X_s`:
    /// `lambda = ridge·trace(X_s^T·X_s)/d_s`.
    pub ridge: f64,
    /// Small layer for each large layer; empty = `round(j·(L_s-1)/(L_l-1))`.
    pub pairing: Vec<usize>,
    /// Fraction of the calibration sequences held out to measure each map's explained variance.
    pub held_out: f64,
    /// Seed of the random control maps.
    pub seed: u64,
}

impl Default for MapConfig {
    fn default() -> Self {
        Self { method: Method::Procrustes, ridge: 1e-2, pairing: Vec::new(), held_out: 0.2, seed: 0 }
    }
}

impl MapConfig {
    pub fn validate(&self) -> std::result::Result<(), String> {
        if !(self.ridge >= 0.0 && self.ridge.is_finite()) {
            return Err(format!("maps.ridge: expected a number >= 0, found {}", self.ridge));
        }
        if !(0.0..0.9).contains(&self.held_out) {
            return Err(format!("maps.held_out: expected a fraction in [0, 0.9), found {}", self.held_out));
        }
        Ok(())
    }
}

/// The maps of one module of one large layer. Modules that read or write the same space share
/// its map.
#[derive(Debug, Clone)]
pub struct ModuleMaps {
    /// Output maps: one, or Q, K, V for the fused attention projection.
    pub out: Vec<Arc<Map>>,
    pub input: Arc<Map>,
}

/// What the fit of one large layer achieved.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerFit {
    pub large_layer: usize,
    pub small_layer: usize,
    /// Space → R² of its map on the held-out calibration tokens (1 perfect, 0 = predicting the
    /// mean, negative = worse). For the weight-space method: the maps of the first module that
    /// reads or writes the space.
    pub explained_variance: BTreeMap<String, f64>,
    /// Seconds for this layer: its fit and, in the streamed fit, the forward passes through the
    /// two blocks that produce its activations.
    pub seconds: f64,
}

/// What a whole fit achieved.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FitSummary {
    pub method: Method,
    pub layers: Vec<LayerFit>,
    /// R² of the embedding map on held-out tokens (block 0's input).
    pub embed_explained_variance: f64,
    /// Mean R² over every layer and space.
    pub mean_explained_variance: f64,
    pub tokens_fit: usize,
    pub tokens_held_out: usize,
    /// Seconds for the whole fit (forward passes included).
    pub seconds: f64,
    /// What the calibration text was (part of the cache key).
    pub calibration: String,
}

/// Every map between a small and a large BLOOM model (see the crate docs).
#[derive(Debug, Clone)]
pub struct PairMaps {
    pub small: ModelIdentity,
    pub large: ModelIdentity,
    pub config: MapConfig,
    /// Large layer → small layer.
    pub pairing: Vec<usize>,
    pub n_head_small: usize,
    pub n_head_large: usize,
    /// Per large layer, module (see [`MODULES`]) → maps: in memory, or one file per layer read
    /// when asked for ([`PairMaps::layer`]).
    pub(crate) layers: Layers,
    /// Maps embedding rows (the residual space entering block 0).
    pub embed: Map,
    pub summary: FitSummary,
}

fn bloom_cfg(ck: &Checkpoint) -> Result<&hetfed_model::bloom::Config> {
    match &ck.arch {
        Arch::Bloom(c) => Ok(c),
        other => {
            Err(Error::msg(format!("{}: projection supports BLOOM models, found {}", ck.source(), other.model_type())))
        }
    }
}

/// The spaces fitted per layer: every space but the residual stream entering the block (the
/// previous block's output, or the embedding) and the MLP pre-activations (see
/// [`module_spaces`]).
pub(crate) const FITTED_SPACES: [Space; 8] =
    [Space::AttnIn, Space::Q, Space::K, Space::V, Space::Ctx, Space::MlpIn, Space::MlpHidden, Space::Resid];

/// The checked inputs of a fit, shared by the streamed and the in-memory fit.
pub(crate) struct Plan<'a> {
    pub cs: &'a hetfed_model::bloom::Config,
    pub cl: &'a hetfed_model::bloom::Config,
    /// Large layer → small layer.
    pub pairing: Vec<usize>,
    pub n_seqs: usize,
    /// The first `n_fit_seqs` sequences are fitted on, the rest held out.
    pub n_fit_seqs: usize,
    /// Tokens per sequence (the first sequence's; the fits check that all agree).
    pub len: usize,
}

impl<'a> Plan<'a> {
    pub fn new(small: &'a Checkpoint, large: &'a Checkpoint, seqs: &[Vec<u32>], cfg: &MapConfig) -> Result<Self> {
        cfg.validate().map_err(Error::msg)?;
        let (cs, cl) = (bloom_cfg(small)?, bloom_cfg(large)?);
        if cs.vocab_size != cl.vocab_size {
            return Err(Error::msg(format!(
                "projection needs one tokenizer for both models: expected equal vocabularies, found {} ({}) and {} ({})",
                cs.vocab_size,
                small.source(),
                cl.vocab_size,
                large.source()
            )));
        }
        let pairing = if cfg.pairing.is_empty() {
            pair_layers(cs.n_layer, cl.n_layer)?
        } else {
            if cfg.pairing.len() != cl.n_layer || cfg.pairing.iter().any(|&i| i >= cs.n_layer) {
                return Err(Error::msg(format!(
                    "maps.pairing: expected {} entries (one per large layer), each below {} (small layers), found {:?}",
                    cl.n_layer, cs.n_layer, cfg.pairing
                )));
            }
            cfg.pairing.clone()
        };
        let n_seqs = seqs.len();
        let n_ho_seqs = ((n_seqs as f64) * cfg.held_out).round() as usize;
        let n_fit_seqs = n_seqs - n_ho_seqs.min(n_seqs.saturating_sub(1));
        let len = seqs.first().map(Vec::len).unwrap_or(0);
        Ok(Self { cs, cl, pairing, n_seqs, n_fit_seqs, len })
    }
}

/// The seed of the random map of `space` in large layer `j`.
pub(crate) fn space_seed(cfg: &MapConfig, j: usize, space: Space) -> u64 {
    hetfed_core::mix_seed(cfg.seed, (j * 16 + space as usize) as u64)
}

/// The seed of the random embedding map.
pub(crate) fn embed_seed(cfg: &MapConfig) -> u64 {
    hetfed_core::mix_seed(cfg.seed, u64::MAX)
}

/// One large layer's modules from the maps fitted per space (modules sharing a space share its
/// map).
pub(crate) fn modules_from_spaces(maps: &BTreeMap<Space, Map>) -> LayerMaps {
    let maps: BTreeMap<Space, Arc<Map>> = maps.iter().map(|(s, m)| (*s, Arc::new(m.clone()))).collect();
    MODULES
        .iter()
        .map(|m| {
            let (outs, input) = module_spaces(m);
            (
                m.to_string(),
                ModuleMaps { out: outs.iter().map(|s| maps[s].clone()).collect(), input: maps[&input].clone() },
            )
        })
        .collect()
}

/// One large layer's data-free modules, and per space the map its R² is reported for (that of
/// the first module that reads or writes it).
pub(crate) fn weight_space_layer(
    small: &Checkpoint,
    large: &Checkpoint,
    i: usize,
    j: usize,
    nh: (usize, usize),
) -> Result<(BTreeMap<String, ModuleMaps>, BTreeMap<Space, Map>)> {
    let mut modules = BTreeMap::new();
    let mut first = BTreeMap::new();
    for m in MODULES {
        let mm = weight_space_module(small, large, i, j, m, nh.0, nh.1)?;
        let (outs, input) = module_spaces(m);
        for (space, map) in outs.iter().zip(&mm.out).chain(std::iter::once((&input, &mm.input))) {
            first.entry(*space).or_insert_with(|| (**map).clone());
        }
        modules.insert(m.to_string(), mm);
    }
    Ok((modules, first))
}

/// The data-free embedding map: Procrustes between the two embedding matrices.
pub(crate) fn weight_space_embed(small: &Checkpoint, large: &Checkpoint) -> Result<Map> {
    fn get(ck: &Checkpoint) -> Result<&Tensor> {
        ck.weights
            .get("transformer.word_embeddings.weight")
            .ok_or_else(|| Error::msg(format!("{}: missing transformer.word_embeddings.weight", ck.source())))
    }
    Ok(fit_procrustes(get(small)?, get(large)?, Centring::None)?.0)
}

/// What a fit computed, before it becomes [`PairMaps`].
pub(crate) struct Fitted {
    pub layers: Layers,
    pub fits: Vec<LayerFit>,
    pub embed: Map,
    pub embed_explained_variance: f64,
}

impl PairMaps {
    /// The maps and their summary from what a fit computed.
    pub(crate) fn assemble(
        small: &Checkpoint,
        large: &Checkpoint,
        calibration: &str,
        cfg: &MapConfig,
        plan: Plan<'_>,
        fitted: Fitted,
        t0: Instant,
    ) -> Result<Self> {
        let len = plan.len;
        let all: Vec<f64> =
            fitted.fits.iter().flat_map(|f| f.explained_variance.values().copied()).filter(|v| v.is_finite()).collect();
        let mean_explained_variance = all.iter().sum::<f64>() / all.len().max(1) as f64;
        let summary = FitSummary {
            method: cfg.method,
            layers: fitted.fits,
            embed_explained_variance: fitted.embed_explained_variance,
            mean_explained_variance,
            tokens_fit: plan.n_fit_seqs * len,
            tokens_held_out: (plan.n_seqs - plan.n_fit_seqs) * len,
            seconds: t0.elapsed().as_secs_f64(),
            calibration: calibration.to_string(),
        };
        Ok(Self {
            small: small.identity()?,
            large: large.identity()?,
            config: cfg.clone(),
            pairing: plan.pairing,
            n_head_small: plan.cs.n_head,
            n_head_large: plan.cl.n_head,
            layers: fitted.layers,
            embed: fitted.embed,
            summary,
        })
    }

    /// Large layer `j`'s maps (read from its file when the maps are on disk; see [`Layers`]).
    pub fn layer(&self, j: usize) -> Result<Arc<LayerMaps>> {
        self.layers.get(j)
    }

    /// The number of large layers.
    pub fn n_layers(&self) -> usize {
        self.layers.len()
    }

    /// The cache directory name for this pair, settings and calibration: both models' identities
    /// go into the key, so a changed model never reuses stale maps.
    pub fn cache_name(small: &ModelIdentity, large: &ModelIdentity, cfg: &MapConfig, calibration: &str) -> String {
        let key = json!({"small": small, "large": large, "config": cfg, "calibration": calibration, "format": FORMAT});
        let h = hetfed_core::sha256_hex(key.to_string().as_bytes());
        format!("maps-{}-{}", cfg.method.name(), &h[..16])
    }

    /// The maps from `cache_dir` when fitted before for exactly these models, settings and
    /// calibration; otherwise fits them on `calibration_seqs()` into a directory there, writing
    /// each layer's maps as soon as they are fitted (the fit holds one layer's maps at a time),
    /// and renames it into place once complete. Returns the maps, read one layer at a time from
    /// the cache, and whether they came from the cache.
    pub fn load_or_fit(
        cache_dir: &Path,
        small: &Checkpoint,
        large: &Checkpoint,
        calibration: &str,
        cfg: &MapConfig,
        calibration_seqs: impl FnOnce() -> Result<Vec<Vec<u32>>>,
    ) -> Result<(Self, bool)> {
        let (si, li) = (small.identity()?, large.identity()?);
        let path: PathBuf = cache_dir.join(Self::cache_name(&si, &li, cfg, calibration));
        if path.exists() {
            match Self::load(&path) {
                Ok(maps) if maps.small == si && maps.large == li && &maps.config == cfg => return Ok((maps, true)),
                Ok(_) => {
                    tracing::warn!("{}: cached maps are for other models or settings; fitting again", path.display())
                }
                Err(e) => tracing::warn!("{}: unreadable cached maps ({e}); fitting again", path.display()),
            }
        }
        let seqs = calibration_seqs()?;
        let tmp = cache_dir.join(format!(
            ".{}.partial-{}",
            path.file_name().and_then(|n| n.to_str()).unwrap_or("maps"),
            std::process::id()
        ));
        Self::fit_into(&tmp, small, large, &seqs, calibration, cfg)?;
        if path.exists() {
            std::fs::remove_dir_all(&path).map_err(|e| Error::io(&path, e))?;
        }
        std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;
        Ok((Self::load(&path)?, false))
    }

    /// Writes the maps as a directory: `pair.safetensors` (the embedding map, with identities,
    /// settings and the fit summary as JSON metadata) and one `layer-{j}.safetensors` per large
    /// layer (each distinct map once). Layers are read and written one at a time.
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let same_dir = matches!(&self.layers, Layers::Disk { dir: d, .. } if d == dir);
        if !same_dir {
            for j in 0..self.n_layers() {
                write_layer(&layer_file(dir, j), &*self.layer(j)?)?;
            }
        }
        self.write_pair(dir)
    }

    /// The directory's `pair.safetensors`; written last, so a directory without it is an
    /// unfinished fit.
    pub(crate) fn write_pair(&self, dir: &Path) -> Result<()> {
        let mut t = TensorMap::new();
        t.insert("embed".into(), self.embed.to_tensor(&Device::Cpu)?);
        let meta = json!({
            "small": self.small, "large": self.large, "config": self.config, "pairing": self.pairing,
            "n_head_small": self.n_head_small, "n_head_large": self.n_head_large, "summary": self.summary,
        });
        let mut md = BTreeMap::new();
        md.insert("hetfed.format".to_string(), FORMAT.to_string());
        md.insert("hetfed.pair_maps".to_string(), meta.to_string());
        hetfed_core::save_safetensors(&t, DType::F32, &md, &dir.join(PAIR_FILE))
    }

    /// Reads maps written by [`PairMaps::save`] (or a map cache entry). Only the embedding map and
    /// the metadata are read now; each layer's maps are read when that layer is asked for.
    pub fn load(dir: &Path) -> Result<Self> {
        let path = dir.join(PAIR_FILE);
        if !path.is_file() {
            return Err(Error::msg(format!(
                "{}: expected a maps directory written by hetfed (with {PAIR_FILE}), found {}",
                dir.display(),
                if dir.is_dir() { "a directory without it (an unfinished fit?)" } else { "no directory" }
            )));
        }
        let (mut t, md) = hetfed_core::load_safetensors(&path)?;
        let bad = |msg: String| Error::Format { path: path.to_path_buf(), msg };
        if md.get("hetfed.format").map(String::as_str) != Some(FORMAT) {
            return Err(bad(format!(
                "expected hetfed pair maps (format {FORMAT}), found format {:?}",
                md.get("hetfed.format")
            )));
        }
        let meta: serde_json::Value =
            serde_json::from_str(md.get("hetfed.pair_maps").map(String::as_str).unwrap_or(""))
                .map_err(|e| bad(format!("expected JSON metadata: {e}")))?;
        let field = |k: &str| meta.get(k).cloned().ok_or_else(|| bad(format!("metadata lacks `{k}`")));
        let parse = |k: &str| -> Result<serde_json::Value> { field(k) };
        let small: ModelIdentity = serde_json::from_value(parse("small")?).map_err(|e| bad(e.to_string()))?;
        let large: ModelIdentity = serde_json::from_value(parse("large")?).map_err(|e| bad(e.to_string()))?;
        let config: MapConfig = serde_json::from_value(parse("config")?).map_err(|e| bad(e.to_string()))?;
        let pairing: Vec<usize> = serde_json::from_value(parse("pairing")?).map_err(|e| bad(e.to_string()))?;
        let summary: FitSummary = serde_json::from_value(parse("summary")?).map_err(|e| bad(e.to_string()))?;
        let n_head_small = parse("n_head_small")?.as_u64().unwrap_or(0) as usize;
        let n_head_large = parse("n_head_large")?.as_u64().unwrap_or(0) as usize;
        let embed =
            Map::from_tensor(&t.remove("embed").ok_or_else(|| bad("expected tensor `embed`, found none".into()))?)?;
        if let Some(j) = (0..pairing.len()).find(|&j| !layer_file(dir, j).is_file()) {
            return Err(Error::msg(format!(
                "{}: expected one maps file per large layer ({}), found none for layer {j}",
                dir.display(),
                pairing.len()
            )));
        }
        let layers = Layers::Disk { dir: dir.to_path_buf(), n: pairing.len(), resident: Default::default() };
        Ok(Self { small, large, config, pairing, n_head_small, n_head_large, layers, embed, summary })
    }

    /// Refuses an update made from any base other than this pair's small model.
    pub fn check_base(&self, base: &ModelIdentity) -> Result<()> {
        if base != &self.small {
            return Err(Error::msg(format!(
                "expected an update of the small model these maps were fitted for, {}, found one of {}; fit maps for that model first",
                self.small, base
            )));
        }
        Ok(())
    }
}

const FORMAT: &str = "pair-maps-2";

/// A maps directory's file of the embedding map and the metadata.
const PAIR_FILE: &str = "pair.safetensors";

/// Data-free maps of one module: per output part `A_p` from `A·W_s^p·B^T ≈ W_l^p`, and the input
/// map `B` from the whole (stacked) matrix.
fn weight_space_module(
    small: &Checkpoint,
    large: &Checkpoint,
    i: usize,
    j: usize,
    m: &str,
    nh_s: usize,
    nh_l: usize,
) -> Result<ModuleMaps> {
    let ws = small
        .weights
        .get(&format!("transformer.h.{i}.{m}.weight"))
        .ok_or_else(|| Error::msg(format!("{}: missing transformer.h.{i}.{m}.weight", small.source())))?;
    let wl = large
        .weights
        .get(&format!("transformer.h.{j}.{m}.weight"))
        .ok_or_else(|| Error::msg(format!("{}: missing transformer.h.{j}.{m}.weight", large.source())))?;
    let opts = WeightFitOptions::default();
    let whole = fit_weight_space(std::slice::from_ref(ws), std::slice::from_ref(wl), &opts)?;
    if m == MODULES[0] {
        let ps = split_rows_interleaved(ws, nh_s, 3)?;
        let pl = split_rows_interleaved(wl, nh_l, 3)?;
        let out = ps
            .iter()
            .zip(&pl)
            .map(|(s, l)| {
                Ok(Arc::new(fit_weight_space(std::slice::from_ref(s), std::slice::from_ref(l), &opts)?.out_map))
            })
            .collect::<Result<_>>()?;
        Ok(ModuleMaps { out, input: Arc::new(whole.in_map) })
    } else {
        Ok(ModuleMaps { out: vec![Arc::new(whole.out_map)], input: Arc::new(whole.in_map) })
    }
}
