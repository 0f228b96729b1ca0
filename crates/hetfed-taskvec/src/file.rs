//! Task vectors as safetensors files. The tensors are the delta (dense parameters, or LoRA
//! factors) and the string metadata says what they are and which base model they belong to:
//!
//! | key | value |
//! |---|---|
//! | `hetfed.format` | `taskvec/1` |
//! | `hetfed.kind` | `full` or `lora` |
//! | `hetfed.base.arch`, `hetfed.base.config_hash`, `hetfed.base.weights_hash` | the base identity |
//! | `hetfed.dtype` | `f32`, `f16` or `bf16`: how the values are stored |
//! | `hetfed.lora.rank`, `hetfed.lora.alpha`, `hetfed.lora.dropout` | LoRA only |
//! | `hetfed.lora.targets` | LoRA only, a JSON list of strings |

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::DType;
use hetfed_core::{Error, Result, TensorMap};
use hetfed_model::{LoraConfig, ModelIdentity};

use crate::{Delta, TaskVector};

/// The value of [`META_FORMAT`] in files this version writes and reads.
pub const FORMAT: &str = "taskvec/1";
/// The metadata key that marks a safetensors file as a hetfed task vector.
pub const META_FORMAT: &str = "hetfed.format";
const META_KIND: &str = "hetfed.kind";
const META_ARCH: &str = "hetfed.base.arch";
const META_CONFIG_HASH: &str = "hetfed.base.config_hash";
const META_WEIGHTS_HASH: &str = "hetfed.base.weights_hash";
const META_DTYPE: &str = "hetfed.dtype";
const META_RANK: &str = "hetfed.lora.rank";
const META_ALPHA: &str = "hetfed.lora.alpha";
const META_DROPOUT: &str = "hetfed.lora.dropout";
const META_TARGETS: &str = "hetfed.lora.targets";

impl TaskVector {
    /// Writes the task vector atomically as safetensors, values in `dtype` (f32, f16 or bf16).
    pub fn save(&self, path: &Path, dtype: DType) -> Result<()> {
        let (tensors, meta) = self.to_parts(dtype)?;
        hetfed_core::save_safetensors(tensors, dtype, &meta, path)
    }

    /// Reads a task vector written by [`TaskVector::save`]; values come back as f32.
    pub fn load(path: &Path) -> Result<Self> {
        let (tensors, meta) = hetfed_core::load_safetensors(path)?;
        Self::from_parts(tensors, &meta, path)
    }

    /// The bytes [`TaskVector::save`] would write, for sending a task vector without a file.
    pub fn to_bytes(&self, dtype: DType) -> Result<Vec<u8>> {
        let (tensors, meta) = self.to_parts(dtype)?;
        hetfed_core::tensors_to_bytes(tensors, dtype, &meta)
    }

    /// Parses the bytes of a saved task vector; `origin` names their source in errors.
    pub fn from_bytes(bytes: &[u8], origin: &Path) -> Result<Self> {
        let (tensors, meta) = hetfed_core::tensors_from_bytes(bytes, origin, true)?;
        Self::from_parts(tensors, &meta, origin)
    }

    fn to_parts(&self, dtype: DType) -> Result<(&TensorMap, BTreeMap<String, String>)> {
        if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
            return Err(Error::msg(format!(
                "task vectors are stored as f32, f16 or bf16, found {}",
                dtype.as_str()
            )));
        }
        let mut meta = BTreeMap::new();
        let mut put = |k: &str, v: String| meta.insert(k.to_string(), v);
        put(META_FORMAT, FORMAT.into());
        put(META_KIND, self.kind.name().into());
        put(META_ARCH, self.base.arch.clone());
        put(META_CONFIG_HASH, self.base.config_hash.clone());
        put(META_WEIGHTS_HASH, self.base.weights_hash.clone());
        put(META_DTYPE, dtype.as_str().into());
        let tensors = match &self.kind {
            Delta::Full(map) => map,
            Delta::Lora { config, factors } => {
                // Refuse to write what could not be read back.
                crate::lora::pairs(config, factors)?;
                put(META_RANK, config.rank.to_string());
                // `Display` of f64 is the shortest string that parses back to the same value.
                put(META_ALPHA, config.alpha.to_string());
                put(META_DROPOUT, config.dropout.to_string());
                put(
                    META_TARGETS,
                    serde_json::to_string(&config.targets)
                        .map_err(|e| Error::msg(format!("serialising LoRA targets: {e}")))?,
                );
                factors
            }
        };
        Ok((tensors, meta))
    }

    fn from_parts(tensors: TensorMap, meta: &BTreeMap<String, String>, path: &Path) -> Result<Self> {
        let format_err = |msg: String| Error::Format {
            path: path.to_owned(),
            msg,
        };
        let get = |key: &str| {
            meta.get(key).map(String::as_str).ok_or_else(|| {
                format_err(format!("expected metadata key `{key}` of a hetfed task vector, found none"))
            })
        };
        let format = get(META_FORMAT)?;
        if format != FORMAT {
            return Err(format_err(format!("expected `{META_FORMAT}` = \"{FORMAT}\", found \"{format}\"")));
        }
        let ident = |key: &str| -> Result<String> {
            let v = get(key)?;
            // Hashes and architecture names are ASCII; anything else is a damaged file (and would
            // trip the abbreviation in `ModelIdentity`'s `Display`).
            if v.is_empty() || !v.is_ascii() {
                return Err(format_err(format!("expected `{key}` to be a non-empty ASCII string, found {v:?}")));
            }
            Ok(v.to_string())
        };
        let base = ModelIdentity {
            arch: ident(META_ARCH)?,
            config_hash: ident(META_CONFIG_HASH)?,
            weights_hash: ident(META_WEIGHTS_HASH)?,
        };
        let dtype = get(META_DTYPE)?;
        if !matches!(dtype, "f32" | "f16" | "bf16") {
            return Err(format_err(format!("expected `{META_DTYPE}` to be f32, f16 or bf16, found \"{dtype}\"")));
        }
        match get(META_KIND)? {
            "full" => Ok(Self {
                base,
                kind: Delta::Full(tensors),
            }),
            "lora" => {
                let rank = get(META_RANK)?;
                let rank: usize = rank
                    .parse()
                    .map_err(|_| format_err(format!("expected `{META_RANK}` to be a positive integer, found \"{rank}\"")))?;
                let alpha = get(META_ALPHA)?;
                let alpha: f64 = alpha
                    .parse()
                    .map_err(|_| format_err(format!("expected `{META_ALPHA}` to be a number, found \"{alpha}\"")))?;
                // Dropout plays no part in the update, so older or foreign files may omit it.
                let dropout = match meta.get(META_DROPOUT) {
                    None => 0.0,
                    Some(d) => d
                        .parse()
                        .map_err(|_| format_err(format!("expected `{META_DROPOUT}` to be a number, found \"{d}\"")))?,
                };
                let targets = get(META_TARGETS)?;
                let targets: Vec<String> = serde_json::from_str(targets).map_err(|e| {
                    format_err(format!("expected `{META_TARGETS}` to be a JSON list of strings, found {targets:?}: {e}"))
                })?;
                let config = LoraConfig {
                    rank,
                    alpha,
                    dropout,
                    targets,
                };
                Self::from_lora_factors(base, config, tensors).map_err(|e| format_err(e.to_string()))
            }
            other => Err(format_err(format!("expected `{META_KIND}` to be \"full\" or \"lora\", found \"{other}\""))),
        }
    }
}
