//! The shared vocabulary of hetfed: maps of tensors keyed by parameter name, their safetensors
//! (de)serialisation with metadata, content hashes, and the error type the lower crates share.
//!
//! This crate touches no network. Its only file I/O is reading and writing safetensors files.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use sha2::{Digest, Sha256};

/// A map from parameter name to tensor, ordered by name so every walk over it is deterministic.
pub type TensorMap = BTreeMap<String, Tensor>;

/// Errors shared by hetfed's library crates. Messages say what was expected, what was found and
/// where, and end without a period.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: not a valid safetensors file: {msg}")]
    Safetensors { path: PathBuf, msg: String },
    #[error("{path}: {msg}")]
    Format { path: PathBuf, msg: String },
    #[error("shape mismatch for `{name}`: expected {expected:?}, found {found:?}{}", where_.as_ref().map(|w| format!(" in {w}")).unwrap_or_default())]
    Shape {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
        where_: Option<String>,
    },
    #[error("{0}")]
    Msg(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn msg(m: impl Into<String>) -> Self {
        Error::Msg(m.into())
    }
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            source,
        }
    }
}

/// Reads a whole file, naming the file in the error.
pub fn read_file(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::io(path, e))
}

/// Parses safetensors bytes into a map of f32 (or integer) CPU tensors. Floating point tensors
/// stored as f16 or bf16 are widened to f32 when `to_f32` is set.
pub fn tensors_from_bytes(bytes: &[u8], path: &Path, to_f32: bool) -> Result<(TensorMap, BTreeMap<String, String>)> {
    let (_, meta) = safetensors::SafeTensors::read_metadata(bytes).map_err(|e| Error::Safetensors {
        path: path.to_owned(),
        msg: e.to_string(),
    })?;
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| Error::Safetensors {
        path: path.to_owned(),
        msg: e.to_string(),
    })?;
    let mut out = TensorMap::new();
    for (name, view) in st.tensors() {
        let t = tensor_from_view(&view, path, &name)?;
        let t = if to_f32 && matches!(t.dtype(), DType::F16 | DType::BF16 | DType::F64) {
            t.to_dtype(DType::F32)?
        } else {
            t
        };
        out.insert(name, t);
    }
    let metadata = meta.metadata().clone().unwrap_or_default().into_iter().collect();
    Ok((out, metadata))
}

fn tensor_from_view(view: &safetensors::tensor::TensorView<'_>, path: &Path, name: &str) -> Result<Tensor> {
    use safetensors::Dtype as S;
    let shape: Vec<usize> = view.shape().to_vec();
    let data = view.data();
    let dev = &Device::Cpu;
    let t = match view.dtype() {
        S::F32 => Tensor::from_vec(bytemuck_f32(data), shape, dev)?,
        S::F16 => {
            let v: Vec<half::f16> = data.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]])).collect();
            Tensor::from_vec(v, shape, dev)?
        }
        S::BF16 => {
            let v: Vec<half::bf16> = data.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]])).collect();
            Tensor::from_vec(v, shape, dev)?
        }
        S::F64 => {
            let v: Vec<f64> = data.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap())).collect();
            Tensor::from_vec(v, shape, dev)?
        }
        S::I64 => {
            let v: Vec<i64> = data.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect();
            Tensor::from_vec(v, shape, dev)?
        }
        S::U8 | S::BOOL => Tensor::from_vec(data.to_vec(), shape, dev)?,
        S::U32 | S::I32 => {
            let v: Vec<u32> = data.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().unwrap())).collect();
            Tensor::from_vec(v, shape, dev)?
        }
        other => {
            return Err(Error::Format {
                path: path.to_owned(),
                msg: format!("tensor `{name}`: expected dtype f32, f16, bf16, f64, i64, i32, u32 or u8, found {other:?}"),
            })
        }
    };
    Ok(t)
}

fn bytemuck_f32(data: &[u8]) -> Vec<f32> {
    data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// Loads a safetensors file (floats widened to f32) with its string metadata.
pub fn load_safetensors(path: &Path) -> Result<(TensorMap, BTreeMap<String, String>)> {
    let bytes = read_file(path)?;
    tensors_from_bytes(&bytes, path, true)
}

/// Serialises a tensor map to safetensors bytes, converting floats to `dtype` (f32, f16 or bf16).
pub fn tensors_to_bytes(map: &TensorMap, dtype: DType, metadata: &BTreeMap<String, String>) -> Result<Vec<u8>> {
    let mut owned: Vec<(String, Tensor)> = Vec::with_capacity(map.len());
    for (k, t) in map {
        let t = if t.dtype().is_float() { t.to_dtype(dtype)? } else { t.clone() };
        owned.push((k.clone(), t.contiguous()?));
    }
    let meta: std::collections::HashMap<String, String> = metadata.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    let meta = if meta.is_empty() { None } else { Some(meta) };
    let views: Vec<(String, TensorBytes)> = owned
        .iter()
        .map(|(k, t)| Ok((k.clone(), TensorBytes::new(t)?)))
        .collect::<Result<_>>()?;
    safetensors::tensor::serialize(views, meta).map_err(|e| Error::msg(format!("serialising safetensors: {e}")))
}

/// Writes a tensor map atomically (temporary file + rename), so an interrupted write never
/// leaves a truncated file in place of a good one.
pub fn save_safetensors(map: &TensorMap, dtype: DType, metadata: &BTreeMap<String, String>, path: &Path) -> Result<()> {
    let bytes = tensors_to_bytes(map, dtype, metadata)?;
    write_atomic(path, &bytes)
}

/// Writes `bytes` to `path` through a temporary file in the same directory and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
    }
    let tmp = path.with_extension(format!(
        "{}.tmp",
        path.extension().and_then(|e| e.to_str()).unwrap_or("")
    ));
    std::fs::write(&tmp, bytes).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

struct TensorBytes {
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl TensorBytes {
    fn new(t: &Tensor) -> Result<Self> {
        let shape = t.dims().to_vec();
        let flat = t.flatten_all()?;
        let (dtype, data) = match t.dtype() {
            DType::F32 => (safetensors::Dtype::F32, flat.to_vec1::<f32>()?.iter().flat_map(|x| x.to_le_bytes()).collect()),
            DType::F16 => (safetensors::Dtype::F16, flat.to_vec1::<half::f16>()?.iter().flat_map(|x| x.to_le_bytes()).collect()),
            DType::BF16 => (safetensors::Dtype::BF16, flat.to_vec1::<half::bf16>()?.iter().flat_map(|x| x.to_le_bytes()).collect()),
            DType::F64 => (safetensors::Dtype::F64, flat.to_vec1::<f64>()?.iter().flat_map(|x| x.to_le_bytes()).collect()),
            DType::I64 => (safetensors::Dtype::I64, flat.to_vec1::<i64>()?.iter().flat_map(|x| x.to_le_bytes()).collect()),
            DType::U32 => (safetensors::Dtype::U32, flat.to_vec1::<u32>()?.iter().flat_map(|x| x.to_le_bytes()).collect()),
            DType::U8 => (safetensors::Dtype::U8, flat.to_vec1::<u8>()?),
            other => return Err(Error::msg(format!("cannot serialise dtype {other:?}"))),
        };
        Ok(Self { dtype, shape, data })
    }
}

impl safetensors::View for TensorBytes {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// A derived seed for `(seed, x)`: the SplitMix64 finaliser of `seed ^ x·φ`. Every
/// deterministic per-round, per-client or per-parameter seed in hetfed comes from it.
pub fn mix_seed(seed: u64, x: u64) -> u64 {
    let mut z = seed ^ x.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Hex SHA-256 of some bytes.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(bytes);
    hex(&h.finalize())
}

/// A content hash of a tensor map: names, shapes and f32 values, in name order. Two maps with the
/// same values hash the same whatever dtype they were stored in on disk.
pub fn tensor_map_hash(map: &TensorMap) -> Result<String> {
    let mut h = Sha256::new();
    for (name, t) in map {
        h.update(name.as_bytes());
        h.update([0u8]);
        for d in t.dims() {
            h.update((*d as u64).to_le_bytes());
        }
        let v = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        for x in v {
            h.update(x.to_le_bytes());
        }
    }
    Ok(hex(&h.finalize()))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Sum of squares of every element, as f64.
pub fn sq_norm(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F32)?.sqr()?.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn safetensors_roundtrip_keeps_values_and_metadata() {
        let mut m = TensorMap::new();
        m.insert("a.weight".into(), Tensor::new(&[[1.0f32, -2.5], [3.0, 0.125]], &Device::Cpu).unwrap());
        m.insert("b".into(), Tensor::new(&[7i64, 8], &Device::Cpu).unwrap());
        let mut meta = BTreeMap::new();
        meta.insert("kind".to_string(), "full".to_string());
        let bytes = tensors_to_bytes(&m, DType::F16, &meta).unwrap();
        let (back, meta2) = tensors_from_bytes(&bytes, Path::new("mem"), true).unwrap();
        assert_eq!(meta2, meta);
        assert_eq!(back["a.weight"].to_vec2::<f32>().unwrap(), vec![vec![1.0, -2.5], vec![3.0, 0.125]]);
        assert_eq!(back["b"].to_vec1::<i64>().unwrap(), vec![7, 8]);
        assert_eq!(tensor_map_hash(&m).unwrap(), tensor_map_hash(&back).unwrap());
    }

    #[test]
    fn truncated_safetensors_is_a_clear_error() {
        let mut m = TensorMap::new();
        m.insert("w".into(), Tensor::zeros((4, 4), DType::F32, &Device::Cpu).unwrap());
        let bytes = tensors_to_bytes(&m, DType::F32, &BTreeMap::new()).unwrap();
        let err = tensors_from_bytes(&bytes[..bytes.len() - 7], Path::new("x.safetensors"), true).unwrap_err();
        let s = err.to_string();
        assert!(s.starts_with("x.safetensors: not a valid safetensors file"), "{s}");
    }
}

/// Locating the read-only `shared/` folder (data, models) from tests.
pub mod testing {
    use std::path::{Path, PathBuf};

    /// `<repo>/../shared/<rel>` (or `$HETFED_SHARED/<rel>`), given a crate's `CARGO_MANIFEST_DIR`.
    /// When it is missing: under `CI=true` this panics (a test must not pass silently in CI);
    /// elsewhere it prints a message naming what is missing and returns `None` so the test skips.
    pub fn shared_path(manifest_dir: &str, rel: &str) -> Option<PathBuf> {
        let root = std::env::var_os("HETFED_SHARED")
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(manifest_dir).join("../../../shared"));
        let p = root.join(rel);
        if p.exists() {
            return Some(p);
        }
        let msg = format!("missing {}: the shared data/models folder is needed for this test", p.display());
        if std::env::var("CI").map(|v| v == "true" || v == "1").unwrap_or(false) {
            panic!("{msg}");
        }
        eprintln!("SKIPPED: {msg}");
        None
    }
}
