//! Hugging Face checkpoint directories: `config.json`, `model.safetensors` (or a sharded
//! `model.safetensors.index.json`) and `tokenizer.json`. Loading dispatches on `model_type`;
//! an architecture's behaviour is one [`Architecture`] implementation in its own file, registered
//! in [`Arch`].

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use candle_core::DType;
use serde_json::Value;

use hetfed_core::{Error, Result, TensorMap};

use crate::lora::LoraSet;
use crate::model::{CausalLm, Weights};
use crate::recompute::Recompute;
use crate::{bloom, llama};

/// What an architecture provides, implemented by its typed config (`bloom::Config`,
/// `llama::Config`) in its own file. Adding an architecture is that file plus its registration
/// in [`Arch`]: a variant, its `model_type` in [`Arch::from_config`] and its arm in `Arch::spec`.
pub trait Architecture: std::fmt::Debug + Send + Sync {
    /// The config's own consistency (head counts dividing the width, ...).
    fn validate(&self) -> std::result::Result<(), String>;
    /// The layer count and the named sizes bounded by [`Arch::from_config`].
    fn sizes(&self) -> (usize, Vec<(&'static str, usize)>);
    /// Canonical (HF `save_pretrained`) names from a checkpoint's raw names.
    fn canonicalize(&self, raw: TensorMap) -> TensorMap;
    /// Every parameter with its shape, in canonical names.
    fn param_shapes(&self) -> Vec<(String, Vec<usize>)>;
    /// The network from canonical weights; with `recompute`, every block that holds trainable
    /// tensors is recomputed in the backward pass ([`crate::recompute`]).
    fn build(&self, w: &Weights, lora: Option<&LoraSet>, recompute: Option<&Recompute>) -> Result<Box<dyn CausalLm>>;
    /// The linear layers LoRA adapts by default.
    fn default_lora_targets(&self) -> &'static [&'static str];
    /// The typed config as JSON (what the config hash covers).
    fn config_string(&self) -> String;
    fn vocab_size(&self) -> usize;
    /// The `config.json` key of the longest trained sequence (2048 when absent).
    fn max_positions_key(&self) -> &'static str;
    fn eos_token_id(&self) -> Option<u32>;
}

/// The architectures hetfed knows, each with its typed config.
#[derive(Debug, Clone, PartialEq)]
pub enum Arch {
    Bloom(bloom::Config),
    Llama(llama::Config),
}

impl Arch {
    pub const KNOWN: &'static [&'static str] = &["bloom", "llama"];

    /// The architecture's behaviour (the only dispatch on the variant besides parsing).
    fn spec(&self) -> &dyn Architecture {
        match self {
            Arch::Bloom(c) => c,
            Arch::Llama(c) => c,
        }
    }

    /// Parses a `config.json` value, dispatching on `model_type`.
    pub fn from_config(v: &Value, path: &Path) -> Result<Self> {
        let fmt = |msg: String| Error::Format { path: path.to_owned(), msg };
        let mt = v.get("model_type").and_then(Value::as_str).ok_or_else(|| {
            fmt(format!("expected a string field `model_type` (one of {:?}), found none", Self::KNOWN))
        })?;
        fn typed<T: serde::de::DeserializeOwned>(v: &Value, mt: &str) -> std::result::Result<T, String> {
            serde_json::from_value(v.clone()).map_err(|e| format!("{mt} config: {e}"))
        }
        let arch = match mt {
            "bloom" => Arch::Bloom(typed(v, mt).map_err(&fmt)?),
            "llama" => Arch::Llama(typed(v, mt).map_err(&fmt)?),
            other => return Err(fmt(format!("unknown model_type {other:?}: expected one of {:?}", Self::KNOWN))),
        };
        arch.spec().validate().map_err(&fmt)?;
        arch.check_sizes().map_err(fmt)?;
        Ok(arch)
    }

    /// Parses the bytes of a `config.json` (`path` names it in errors) into the architecture and
    /// the raw JSON. Any bytes give `Ok` or an error naming the file, never a panic.
    pub fn from_config_bytes(bytes: &[u8], path: &Path) -> Result<(Self, Value)> {
        hetfed_core::guard::parse(path, "a model config (config.json)", || {
            let v: Value = serde_json::from_slice(bytes)
                .map_err(|e| Error::Format { path: path.to_owned(), msg: format!("expected JSON: {e}") })?;
            Ok((Self::from_config(&v, path)?, v))
        })
    }

    /// Sizes no real checkpoint exceeds. A damaged config (a digit too many) would otherwise
    /// describe a model whose parameter list alone does not fit in memory, or whose shapes
    /// overflow when multiplied.
    fn check_sizes(&self) -> std::result::Result<(), String> {
        const MAX_LAYERS: usize = 4096;
        const MAX_DIM: usize = 1 << 24;
        let (layers, dims) = self.spec().sizes();
        if layers > MAX_LAYERS {
            return Err(format!("expected at most {MAX_LAYERS} layers, found {layers}"));
        }
        if let Some((k, v)) = dims.into_iter().find(|(_, v)| *v > MAX_DIM) {
            return Err(format!("expected `{k}` of at most {MAX_DIM}, found {v}"));
        }
        Ok(())
    }

    pub fn model_type(&self) -> &'static str {
        match self {
            Arch::Bloom(_) => "bloom",
            Arch::Llama(_) => "llama",
        }
    }

    fn canonicalize(&self, raw: TensorMap) -> TensorMap {
        self.spec().canonicalize(raw)
    }

    /// Every parameter of the model with its shape, in canonical (HF `save_pretrained`) names.
    pub fn param_shapes(&self) -> Vec<(String, Vec<usize>)> {
        self.spec().param_shapes()
    }

    /// Builds the network from canonical weights (plain tensors, or `Var`s to train them).
    pub fn build(&self, weights: &TensorMap, source: &str, lora: Option<&LoraSet>) -> Result<Box<dyn CausalLm>> {
        self.spec().build(&Weights { map: weights, source }, lora, None)
    }

    /// [`Arch::build`] with activation recomputation ([`crate::recompute`]): training holds one
    /// block's intermediates at a time; gradients of the blocks' trainable tensors reach the
    /// caller through [`Recompute::drain_into`].
    pub fn build_recomputing(
        &self,
        weights: &TensorMap,
        source: &str,
        lora: Option<&LoraSet>,
        recompute: &Recompute,
    ) -> Result<Box<dyn CausalLm>> {
        self.spec().build(&Weights { map: weights, source }, lora, Some(recompute))
    }

    /// The linear layers LoRA adapts by default: every projection of attention and MLP.
    pub fn default_lora_targets(&self) -> Vec<String> {
        self.spec().default_lora_targets().iter().map(|s| s.to_string()).collect()
    }

    /// A stable hash of the typed config (what determines the network's shape and math).
    pub fn config_hash(&self) -> String {
        hetfed_core::sha256_hex(format!("{}:{}", self.model_type(), self.spec().config_string()).as_bytes())
    }

    pub fn vocab_size(&self) -> usize {
        self.spec().vocab_size()
    }

    /// The longest sequence the model was trained for (`max_position_embeddings`; BLOOM, whose
    /// ALiBi has no table, reports `seq_length` when its config has one); 2048 when absent.
    pub fn max_positions(&self, config_json: &Value) -> usize {
        config_json.get(self.spec().max_positions_key()).and_then(Value::as_u64).map_or(2048, |v| v as usize)
    }

    pub fn eos_token_id(&self) -> Option<u32> {
        self.spec().eos_token_id()
    }
}

/// Who a model is: architecture, config hash and weights hash. Task vectors carry it, so one
/// is never applied to a base it was not made from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ModelIdentity {
    pub arch: String,
    pub config_hash: String,
    pub weights_hash: String,
}

impl std::fmt::Display for ModelIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let short = |h: &str| h.chars().take(12).collect::<String>();
        write!(f, "{} (config {}, weights {})", self.arch, short(&self.config_hash), short(&self.weights_hash))
    }
}

/// The dtype weight matrices are kept in once loaded. Tensors of fewer than two dimensions
/// (norms, biases) are always widened to f32: they are small, and the kernels read them as f32.
///
/// Half-precision matrices are frozen: the kernels ([`crate::ops::linear`], the fused head,
/// embedding lookups) widen them a block at a time as they read them, and anything trained (full
/// fine-tuning, Fisher estimates) or updated (task vectors, federated deltas) is computed in f32,
/// the updated tensors coming out widened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightDtype {
    /// As stored: an f16 or bf16 file stays half precision in memory, an f32 file stays f32.
    #[default]
    Stored,
    /// Widened (or kept) to f32: what training and every weight-space computation read.
    F32,
    /// bfloat16 (an f32 or f16 file is rounded to it).
    Bf16,
    /// IEEE half (an f32 or bf16 file is rounded to it).
    F16,
}

impl WeightDtype {
    pub const NAMES: &'static [&'static str] = &["stored", "f32", "bf16", "f16"];

    /// The dtype a matrix stored as `stored` is kept in.
    pub fn resident(self, stored: DType) -> DType {
        match self {
            WeightDtype::Stored => stored,
            WeightDtype::F32 => DType::F32,
            WeightDtype::Bf16 => DType::BF16,
            WeightDtype::F16 => DType::F16,
        }
    }
}

impl std::str::FromStr for WeightDtype {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "stored" => Ok(WeightDtype::Stored),
            "f32" => Ok(WeightDtype::F32),
            "bf16" => Ok(WeightDtype::Bf16),
            "f16" => Ok(WeightDtype::F16),
            other => Err(format!("expected one of {}, found {other:?}", Self::NAMES.join(", "))),
        }
    }
}

impl std::fmt::Display for WeightDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            WeightDtype::Stored => "stored",
            WeightDtype::F32 => "f32",
            WeightDtype::Bf16 => "bf16",
            WeightDtype::F16 => "f16",
        })
    }
}

/// Everything about a model but its weights: where it came from, its typed config, its tokenizer
/// and the raw config.json. With weights it is a [`Checkpoint`] ([`ModelSpec::with_weights`]);
/// code that keeps the weights elsewhere (shared, or updated round by round) holds this instead
/// of a checkpoint emptied of them.
#[derive(Clone)]
pub struct ModelSpec {
    pub dir: PathBuf,
    pub arch: Arch,
    pub tokenizer: Option<tokenizers::Tokenizer>,
    pub config_json: Value,
}

impl ModelSpec {
    /// This model with `weights` (canonical names): a clone of the spec and the weights.
    pub fn with_weights(&self, weights: TensorMap) -> Checkpoint {
        Checkpoint { spec: self.clone(), weights }
    }

    pub fn source(&self) -> String {
        self.dir.display().to_string()
    }

    pub fn tokenizer(&self) -> Result<&tokenizers::Tokenizer> {
        self.tokenizer
            .as_ref()
            .ok_or_else(|| Error::msg(format!("{}: expected a tokenizer.json, found none", self.dir.display())))
    }

    /// The tokenizer's identity: a SHA-256 of its vocabulary, merges and added tokens (not of
    /// the file's bytes, so formatting and normaliser metadata do not count). Two models whose
    /// hashes agree map text to the same token ids, which output-level transfer (logit offsets,
    /// distillation) needs.
    pub fn tokenizer_hash(&self) -> Result<String> {
        let tok = self.tokenizer()?;
        let json: Value = serde_json::from_str(
            &tok.to_string(false)
                .map_err(|e| Error::msg(format!("{}: serialising the tokenizer: {e}", self.dir.display())))?,
        )
        .map_err(|e| Error::msg(format!("{}: the tokenizer does not serialise to JSON: {e}", self.dir.display())))?;
        let added: Vec<(Value, Value)> = json["added_tokens"]
            .as_array()
            .map(|v| v.iter().map(|t| (t["id"].clone(), t["content"].clone())).collect())
            .unwrap_or_default();
        // serde_json's maps are ordered by key, so the vocabulary serialises canonically.
        let canonical = serde_json::json!({"type": json["model"]["type"], "vocab": json["model"]["vocab"], "merges": json["model"]["merges"], "added": added});
        Ok(hetfed_core::sha256_hex(canonical.to_string().as_bytes()))
    }

    /// Writes an HF directory with these `weights` (canonical names) that `transformers` loads:
    /// the original config.json, tokenizer.json, and `model.safetensors` in `dtype`.
    pub fn save_as(&self, weights: &TensorMap, out: &Path, dtype: DType) -> Result<()> {
        std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
        let mut meta = BTreeMap::new();
        meta.insert("format".to_string(), "pt".to_string());
        hetfed_core::save_safetensors(weights, dtype, &meta, &out.join("model.safetensors"))?;
        let cfg = serde_json::to_vec_pretty(&self.config_json).expect("json serialises");
        hetfed_core::write_atomic(&out.join("config.json"), &cfg)?;
        for extra in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"] {
            let src = self.dir.join(extra);
            if src.exists() {
                hetfed_core::write_atomic(&out.join(extra), &hetfed_core::read_file(&src)?)?;
            }
        }
        Ok(())
    }
}

/// A loaded checkpoint: its [`ModelSpec`] (typed config, tokenizer, raw config.json, directory)
/// and canonical weights (f32, or frozen half-precision matrices, see [`WeightDtype`]). It derefs
/// to the spec, so `ck.arch`, `ck.dir` and `ck.tokenizer()` read through.
pub struct Checkpoint {
    pub spec: ModelSpec,
    pub weights: TensorMap,
}

impl std::ops::Deref for Checkpoint {
    type Target = ModelSpec;
    fn deref(&self) -> &ModelSpec {
        &self.spec
    }
}

impl Checkpoint {
    /// Loads an HF directory with every weight widened to f32 (stored as f32, f16 or bf16):
    /// [`Checkpoint::load_with`] and [`WeightDtype::F32`]. What training, merging and the federated
    /// runtime use, which read and update the weights in f32.
    pub fn load(dir: &Path) -> Result<Self> {
        Self::load_with(dir, WeightDtype::F32)
    }

    /// Loads an HF directory, keeping weight matrices in `dtype` ([`WeightDtype::Stored`]: as the
    /// file stores them). The files are memory-mapped and converted a tensor at a time, so the
    /// peak while loading is the resident weights plus about one tensor.
    ///
    /// `dir` must be the directory itself: a path to a file in it (`.../config.json`) is refused
    /// with an error that says so and names the directory to pass instead, rather than guessing
    /// which model was meant. Every file is read behind [`hetfed_core::guard::parse`], so a
    /// damaged or truncated file is an error naming it, never a panic.
    pub fn load_with(dir: &Path, dtype: WeightDtype) -> Result<Self> {
        const EXPECTED: &str = "expected a model directory (config.json, model.safetensors, tokenizer.json)";
        if dir.is_file() {
            let parent = dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
            return Err(Error::msg(format!(
                "{}: {EXPECTED}, found a file (pass its directory, {})",
                dir.display(),
                parent.display()
            )));
        }
        if !dir.is_dir() {
            let found = if dir.exists() { "something that is not a directory" } else { "no such directory" };
            return Err(Error::msg(format!("{}: {EXPECTED}, found {found}", dir.display())));
        }
        let cfg_path = dir.join("config.json");
        let bytes = hetfed_core::read_file(&cfg_path)?;
        let (arch, config_json) = Arch::from_config_bytes(&bytes, &cfg_path)?;
        let raw = load_weights(dir, dtype)?;
        let weights = validate_weights(&arch, arch.canonicalize(raw), dir)?;
        let tok_path = dir.join("tokenizer.json");
        let tokenizer = if tok_path.exists() { Some(crate::tokenizer::load(&tok_path)?) } else { None };
        Ok(Self { spec: ModelSpec { dir: dir.to_owned(), arch, tokenizer, config_json }, weights })
    }

    /// The frozen network (no tensor tracked), optionally with LoRA adapters.
    pub fn model(&self, lora: Option<&LoraSet>) -> Result<Box<dyn CausalLm>> {
        self.arch.build(&self.weights, &self.source(), lora)
    }

    pub fn identity(&self) -> Result<ModelIdentity> {
        Ok(ModelIdentity {
            arch: self.arch.model_type().to_string(),
            config_hash: self.arch.config_hash(),
            weights_hash: hetfed_core::tensor_map_hash(&self.weights)?,
        })
    }
}

/// One tensor as loaded: floats of two or more dimensions in `dtype`'s resident dtype, other
/// floats (norms, biases) and f64 in f32, integers unchanged.
fn convert_loaded(t: candle_core::Tensor, dtype: WeightDtype) -> Result<candle_core::Tensor> {
    let target = match t.dtype() {
        DType::F16 | DType::BF16 | DType::F32 if t.rank() >= 2 => dtype.resident(t.dtype()),
        DType::F16 | DType::BF16 | DType::F32 | DType::F64 => DType::F32,
        other => other,
    };
    Ok(t.to_dtype(target)?)
}

fn load_weights(dir: &Path, dtype: WeightDtype) -> Result<TensorMap> {
    let mut convert = |_: &str, t: candle_core::Tensor| convert_loaded(t, dtype);
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(hetfed_core::load_safetensors_mapped(&single, &mut convert)?.0);
    }
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let v: Value = serde_json::from_slice(&hetfed_core::read_file(&index)?)
            .map_err(|e| Error::Format { path: index.clone(), msg: format!("expected JSON: {e}") })?;
        let map = v.get("weight_map").and_then(Value::as_object).ok_or_else(|| Error::Format {
            path: index.clone(),
            msg: "expected an object `weight_map`, found none".into(),
        })?;
        let files: BTreeSet<&str> = map.values().filter_map(Value::as_str).collect();
        let mut out = TensorMap::new();
        for f in files {
            // Shards sit next to the index; a path elsewhere is a damaged (or hostile) index.
            if Path::new(f).file_name() != Some(std::ffi::OsStr::new(f)) {
                return Err(Error::Format {
                    path: index.clone(),
                    msg: format!("expected shard file names in `weight_map`, found {f:?}"),
                });
            }
            out.extend(hetfed_core::load_safetensors_mapped(&dir.join(f), &mut convert)?.0);
        }
        return Ok(out);
    }
    Err(Error::msg(format!(
        "{}: expected model.safetensors or model.safetensors.index.json, found neither",
        dir.display()
    )))
}

/// Checks every expected tensor is present with its shape; drops (with a warning) the ones the
/// architecture does not use, so hashes and task vectors see only real parameters.
fn validate_weights(arch: &Arch, mut weights: TensorMap, dir: &Path) -> Result<TensorMap> {
    let expected = arch.param_shapes();
    for (name, shape) in &expected {
        match weights.get(name) {
            None => {
                return Err(Error::msg(format!(
                    "{}: missing tensor `{name}` (expected shape {shape:?} for this {} config)",
                    dir.display(),
                    arch.model_type()
                )))
            }
            Some(t) if t.dims() != shape.as_slice() => {
                return Err(Error::Shape {
                    name: name.clone(),
                    expected: shape.clone(),
                    found: t.dims().to_vec(),
                    where_: Some(dir.display().to_string()),
                })
            }
            _ => {}
        }
    }
    let known: BTreeSet<&str> = expected.iter().map(|(n, _)| n.as_str()).collect();
    let extra: Vec<String> = weights.keys().filter(|k| !known.contains(k.as_str())).cloned().collect();
    if !extra.is_empty() {
        tracing::warn!(dir = %dir.display(), ?extra, "ignoring tensors this architecture does not use");
        weights.retain(|k, _| known.contains(k.as_str()));
    }
    Ok(weights)
}
