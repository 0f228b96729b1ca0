//! Task vectors as safetensors files. The tensors are the delta (dense parameters, or LoRA
//! factors) and the string metadata says what they are and which base model they belong to:
//!
//! | key | value |
//! |---|---|
//! | `hetfed.format` | `taskvec/1` |
//! | `hetfed.kind` | `full` or `lora` |
//! | `hetfed.base.arch`, `hetfed.base.config_hash`, `hetfed.base.weights_hash` | the base identity |
//! | `hetfed.dtype` | `f32`, `f16`, `bf16` or `int8`: how the values are stored |
//!
//! `int8` is symmetric per-channel quantisation: each tensor `name` is stored as u8 (the int8 value
//! plus 128) with an f32 tensor `name.__scale` holding one scale per row (dim 0; one for a vector),
//! `value = (q - 128) · scale`, `scale = max|row| / 127`. About 4× smaller than f32; the error of
//! each value is at most half a step of its row.
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
        Self::from_bytes(&hetfed_core::read_file(path)?, path)
    }

    /// The bytes [`TaskVector::save`] would write, for sending a task vector without a file.
    pub fn to_bytes(&self, dtype: DType) -> Result<Vec<u8>> {
        let (tensors, meta) = self.to_parts(dtype)?;
        hetfed_core::tensors_to_bytes(tensors, dtype, &meta)
    }

    /// The bytes of the task vector quantised to int8 per channel (see the module docs).
    pub fn to_bytes_int8(&self) -> Result<Vec<u8>> {
        let (tensors, mut meta) = self.to_parts(DType::F32)?;
        meta.insert(META_DTYPE.to_string(), "int8".to_string());
        let mut q = TensorMap::new();
        for (name, t) in tensors {
            let (codes, scale) = quantize_int8(t)?;
            q.insert(name.clone(), codes);
            q.insert(format!("{name}{SCALE_SUFFIX}"), scale);
        }
        hetfed_core::tensors_to_bytes(&q, DType::F32, &meta)
    }

    /// Parses the bytes of a saved task vector; `origin` names their source in errors.
    ///
    /// Any bytes give `Ok` or an error naming `origin`, never a panic. Parsing checks the file is
    /// well formed; whether it fits a model is [`TaskVector::validate`]'s question.
    pub fn from_bytes(bytes: &[u8], origin: &Path) -> Result<Self> {
        hetfed_core::guard::parse(origin, "a hetfed task vector", || {
            let (tensors, meta) = hetfed_core::tensors_from_bytes(bytes, origin, true)?;
            let tensors = if meta.get(META_DTYPE).map(String::as_str) == Some("int8") {
                dequantize_int8(tensors, origin)?
            } else {
                tensors
            };
            Self::from_parts(tensors, &meta, origin)
        })
    }

    fn to_parts(&self, dtype: DType) -> Result<(&TensorMap, BTreeMap<String, String>)> {
        if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16) {
            return Err(Error::msg(format!("task vectors are stored as f32, f16 or bf16, found {}", dtype.as_str())));
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
        let format_err = |msg: String| Error::Format { path: path.to_owned(), msg };
        let get = |key: &str| {
            meta.get(key)
                .map(String::as_str)
                .ok_or_else(|| format_err(format!("expected metadata key `{key}` of a hetfed task vector, found none")))
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
        if !matches!(dtype, "f32" | "f16" | "bf16" | "int8") {
            return Err(format_err(format!("expected `{META_DTYPE}` to be f32, f16, bf16 or int8, found \"{dtype}\"")));
        }
        match get(META_KIND)? {
            "full" => Ok(Self { base, kind: Delta::Full(tensors) }),
            "lora" => {
                let rank = get(META_RANK)?;
                let rank: usize = rank.parse().map_err(|_| {
                    format_err(format!("expected `{META_RANK}` to be a positive integer, found \"{rank}\""))
                })?;
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
                    format_err(format!(
                        "expected `{META_TARGETS}` to be a JSON list of strings, found {targets:?}: {e}"
                    ))
                })?;
                let config = LoraConfig { rank, alpha, dropout, targets };
                Self::from_lora_factors(base, config, tensors).map_err(|e| format_err(e.to_string()))
            }
            other => Err(format_err(format!("expected `{META_KIND}` to be \"full\" or \"lora\", found \"{other}\""))),
        }
    }
}

const SCALE_SUFFIX: &str = ".__scale";

/// Rows of a tensor for per-channel quantisation: dim 0, or one row for a scalar or vector.
fn rows_cols(t: &candle_core::Tensor) -> (usize, usize) {
    let n = t.elem_count();
    let rows = if t.rank() >= 2 { t.dims()[0] } else { 1 };
    (rows, n.checked_div(rows).unwrap_or(0))
}

fn quantize_int8(t: &candle_core::Tensor) -> Result<(candle_core::Tensor, candle_core::Tensor)> {
    let (rows, cols) = rows_cols(t);
    let v: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let mut codes = Vec::with_capacity(v.len());
    let mut scales = Vec::with_capacity(rows);
    for row in v.chunks(cols.max(1)).take(rows) {
        let max = row.iter().fold(0f32, |m, x| m.max(x.abs()));
        let scale = if max > 0.0 { max / 127.0 } else { 1.0 };
        scales.push(scale);
        codes.extend(row.iter().map(|x| ((x / scale).round().clamp(-127.0, 127.0) as i32 + 128) as u8));
    }
    let dev = &candle_core::Device::Cpu;
    Ok((candle_core::Tensor::from_vec(codes, t.dims(), dev)?, candle_core::Tensor::from_vec(scales, rows, dev)?))
}

fn dequantize_int8(mut tensors: TensorMap, origin: &Path) -> Result<TensorMap> {
    let err = |msg: String| Error::Format { path: origin.to_owned(), msg };
    let names: Vec<String> = tensors.keys().filter(|k| !k.ends_with(SCALE_SUFFIX)).cloned().collect();
    let mut out = TensorMap::new();
    for name in names {
        let codes = tensors.remove(&name).ok_or_else(|| err(format!("tensor `{name}` vanished")))?;
        let scale = tensors.remove(&format!("{name}{SCALE_SUFFIX}")).ok_or_else(|| {
            err(format!("int8 tensor `{name}`: expected a `{name}{SCALE_SUFFIX}` tensor, found none"))
        })?;
        if codes.dtype() != DType::U8 {
            return Err(err(format!("int8 tensor `{name}`: expected u8 codes, found {}", codes.dtype().as_str())));
        }
        let (rows, cols) = rows_cols(&codes);
        let scale: Vec<f32> = scale.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        if scale.len() != rows {
            return Err(err(format!("int8 tensor `{name}`: expected {rows} scales, found {}", scale.len())));
        }
        let q: Vec<u8> = codes.flatten_all()?.to_vec1()?;
        let v: Vec<f32> = q.iter().enumerate().map(|(i, &c)| (c as f32 - 128.0) * scale[i / cols.max(1)]).collect();
        out.insert(name, candle_core::Tensor::from_vec(v, codes.dims(), &candle_core::Device::Cpu)?);
    }
    if let Some(extra) = tensors.keys().next() {
        return Err(err(format!("int8 scale `{extra}` has no matching tensor")));
    }
    Ok(out)
}
