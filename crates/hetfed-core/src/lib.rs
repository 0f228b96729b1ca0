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
    Shape { name: String, expected: Vec<usize>, found: Vec<usize>, where_: Option<String> },
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
        Error::Io { path: path.into(), source }
    }
}

/// Reads a whole file, naming the file in the error.
pub fn read_file(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::io(path, e))
}

/// Parses safetensors bytes into a map of f32 (or integer) CPU tensors. Floating point tensors
/// stored as f16 or bf16 are widened to f32 when `to_f32` is set.
///
/// The bytes come from outside (a file, an upload), so the parse runs behind [`guard::parse`]:
/// whatever they hold, the result is `Ok` or an error naming `path`, never a panic.
pub fn tensors_from_bytes(bytes: &[u8], path: &Path, to_f32: bool) -> Result<(TensorMap, BTreeMap<String, String>)> {
    guard::parse(path, "a safetensors file", || tensors_from_bytes_inner(bytes, path, to_f32))
}

fn tensors_from_bytes_inner(bytes: &[u8], path: &Path, to_f32: bool) -> Result<(TensorMap, BTreeMap<String, String>)> {
    let (_, meta) = safetensors::SafeTensors::read_metadata(bytes)
        .map_err(|e| Error::Safetensors { path: path.to_owned(), msg: e.to_string() })?;
    let st = safetensors::SafeTensors::deserialize(bytes)
        .map_err(|e| Error::Safetensors { path: path.to_owned(), msg: e.to_string() })?;
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
                msg: format!(
                    "tensor `{name}`: expected dtype f32, f16, bf16, f64, i64, i32, u32 or u8, found {other:?}"
                ),
            })
        }
    };
    Ok(t)
}

fn bytemuck_f32(data: &[u8]) -> Vec<f32> {
    data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

/// Loads a safetensors file through a memory map, one tensor at a time: each tensor is copied out
/// of the map, passed to `convert` (by name; e.g. to change its dtype) and kept as `convert`
/// returns it, and the map's pages of that tensor are released (`MADV_DONTNEED` on Unix) before
/// the next. The peak is what is kept plus about one tensor, never the file and the result at
/// once. The file must not be truncated while it loads (as with any memory map).
///
/// Like [`tensors_from_bytes`], any bytes give `Ok` or an error naming `path`, never a panic.
pub fn load_safetensors_mapped(
    path: &Path,
    convert: &mut dyn FnMut(&str, Tensor) -> Result<Tensor>,
) -> Result<(TensorMap, BTreeMap<String, String>)> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: the map is read-only and private; hetfed does not write model files while loading
    // them (a concurrent truncation by another process is the caller's to avoid).
    let map = unsafe { memmap2::MmapOptions::new().map(&file) }.map_err(|e| Error::io(path, e))?;
    guard::parse(path, "a safetensors file", || {
        let bytes: &[u8] = &map;
        let (header_len, meta) = safetensors::SafeTensors::read_metadata(bytes)
            .map_err(|e| Error::Safetensors { path: path.to_owned(), msg: e.to_string() })?;
        let st = safetensors::SafeTensors::deserialize(bytes)
            .map_err(|e| Error::Safetensors { path: path.to_owned(), msg: e.to_string() })?;
        let mut out = TensorMap::new();
        let mut names: Vec<(String, (usize, usize))> =
            meta.tensors().into_iter().map(|(n, info)| (n, info.data_offsets)).collect();
        // In file order: the map is read front to back.
        names.sort_by_key(|(_, off)| *off);
        for (name, (a, b)) in names {
            let view =
                st.tensor(&name).map_err(|e| Error::Safetensors { path: path.to_owned(), msg: e.to_string() })?;
            let t = tensor_from_view(&view, path, &name)?;
            out.insert(name.clone(), convert(&name, t)?);
            #[cfg(unix)]
            {
                // Offsets are relative to the data after the 8-byte length and the header.
                let start = 8 + header_len + a;
                // SAFETY: the map is private and read-only; dropped pages are read again from
                // the file if touched (nothing here touches them again).
                let _ = unsafe { map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, b - a) };
            }
            #[cfg(not(unix))]
            let _ = (a, b, header_len);
        }
        let metadata = meta.metadata().clone().unwrap_or_default().into_iter().collect();
        Ok((out, metadata))
    })
}

/// Loads a safetensors file (floats widened to f32) with its string metadata.
pub fn load_safetensors(path: &Path) -> Result<(TensorMap, BTreeMap<String, String>)> {
    let bytes = read_file(path)?;
    tensors_from_bytes(&bytes, path, true)
}

/// Serialises a tensor map to safetensors bytes, converting floats to `dtype` (f32, f16 or bf16).
///
/// The bytes are a function of the arguments alone: tensors are laid out as the `safetensors`
/// crate lays them out (descending dtype alignment, then name) and the metadata is written in key
/// order. (`safetensors::serialize` takes the metadata as a `HashMap`, whose order changes from
/// run to run, so two identical runs wrote different files.)
pub fn tensors_to_bytes(map: &TensorMap, dtype: DType, metadata: &BTreeMap<String, String>) -> Result<Vec<u8>> {
    let mut views: Vec<(&String, TensorBytes)> = Vec::with_capacity(map.len());
    for (k, t) in map {
        let t = if t.dtype().is_float() { t.to_dtype(dtype)? } else { t.clone() };
        views.push((k, TensorBytes::new(&t.contiguous()?)?));
    }
    views.sort_by(|(ln, l), (rn, r)| r.dtype.cmp(&l.dtype).then(ln.cmp(rn)));
    let json = |e: serde_json::Error| Error::msg(format!("serialising a safetensors header: {e}"));
    let mut header = String::from("{");
    if !metadata.is_empty() {
        // A BTreeMap serialises in key order.
        header.push_str("\"__metadata__\":");
        header.push_str(&serde_json::to_string(metadata).map_err(json)?);
    }
    let mut offset = 0usize;
    for (name, t) in &views {
        let info = safetensors::tensor::TensorInfo {
            dtype: t.dtype,
            shape: t.shape.clone(),
            data_offsets: (offset, offset + t.data.len()),
        };
        offset += t.data.len();
        if header.len() > 1 {
            header.push(',');
        }
        header.push_str(&serde_json::to_string(name).map_err(json)?);
        header.push(':');
        header.push_str(&serde_json::to_string(&info).map_err(json)?);
    }
    header.push('}');
    // The data starts 8-byte aligned, as safetensors writes it.
    while header.len() % 8 != 0 {
        header.push(' ');
    }
    let mut out = Vec::with_capacity(8 + header.len() + offset);
    out.extend_from_slice(&(header.len() as u64).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for (_, t) in &views {
        out.extend_from_slice(&t.data);
    }
    Ok(out)
}

/// Writes a tensor map atomically (temporary file + rename), so an interrupted write never
/// leaves a truncated file in place of a good one.
pub fn save_safetensors(map: &TensorMap, dtype: DType, metadata: &BTreeMap<String, String>, path: &Path) -> Result<()> {
    let bytes = tensors_to_bytes(map, dtype, metadata)?;
    write_atomic(path, &bytes)
}

/// Writes `bytes` to `path` through a temporary file in the same directory and a rename, durably:
/// the temporary file is flushed to disk (`fsync`) before the rename and the directory after it,
/// so after a crash or a power cut `path` holds either its old contents or all of `bytes`, and
/// once this returns `Ok` the new contents survive a power cut.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    if let Some(dir) = dir {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let tmp = path.with_extension(format!("{}.tmp", path.extension().and_then(|e| e.to_str()).unwrap_or("")));
    let written = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(&tmp, e));
    }
    if let Err(e) = std::fs::rename(&tmp, path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    sync_dir(dir.unwrap_or(Path::new(".")))
}

/// Flushes a directory's entries (a rename in it) to disk. Only Unix can open a directory to
/// `fsync` it; file systems that cannot sync a directory (`EINVAL`) are not an error.
fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        let synced = std::fs::File::open(dir).and_then(|d| d.sync_all());
        if let Err(e) = synced {
            if e.kind() != std::io::ErrorKind::InvalidInput {
                return Err(Error::io(dir, e));
            }
        }
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
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
            DType::F32 => {
                (safetensors::Dtype::F32, flat.to_vec1::<f32>()?.iter().flat_map(|x| x.to_le_bytes()).collect())
            }
            DType::F16 => {
                (safetensors::Dtype::F16, flat.to_vec1::<half::f16>()?.iter().flat_map(|x| x.to_le_bytes()).collect())
            }
            DType::BF16 => {
                (safetensors::Dtype::BF16, flat.to_vec1::<half::bf16>()?.iter().flat_map(|x| x.to_le_bytes()).collect())
            }
            DType::F64 => {
                (safetensors::Dtype::F64, flat.to_vec1::<f64>()?.iter().flat_map(|x| x.to_le_bytes()).collect())
            }
            DType::I64 => {
                (safetensors::Dtype::I64, flat.to_vec1::<i64>()?.iter().flat_map(|x| x.to_le_bytes()).collect())
            }
            DType::U32 => {
                (safetensors::Dtype::U32, flat.to_vec1::<u32>()?.iter().flat_map(|x| x.to_le_bytes()).collect())
            }
            DType::U8 => (safetensors::Dtype::U8, flat.to_vec1::<u8>()?),
            other => return Err(Error::msg(format!("cannot serialise dtype {other:?}"))),
        };
        Ok(Self { dtype, shape, data })
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

/// Elements widened and hashed at a time by [`tensor_map_hash`].
const HASH_CHUNK: usize = 1 << 20;

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
        // A chunk at a time: the values are widened to f32 for hashing (so a model hashes the same
        // in any resident dtype), and a 7B model's embedding widened whole would be 4 GB.
        let flat = t.flatten_all()?;
        let n = flat.elem_count();
        let mut bytes = Vec::with_capacity(HASH_CHUNK.min(n) * 4);
        let mut start = 0;
        while start < n {
            let len = HASH_CHUNK.min(n - start);
            let v = flat.narrow(0, start, len)?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
            bytes.clear();
            bytes.extend(v.iter().flat_map(|x| x.to_le_bytes()));
            h.update(&bytes);
            start += len;
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
    fn serialised_bytes_are_deterministic_and_read_by_safetensors() {
        let mut m = TensorMap::new();
        m.insert("z".into(), Tensor::new(&[1.0f32, 2.0], &Device::Cpu).unwrap());
        m.insert("a".into(), Tensor::new(&[3u8, 4, 5], &Device::Cpu).unwrap());
        m.insert("m".into(), Tensor::new(&[[7i64]], &Device::Cpu).unwrap());
        let meta: BTreeMap<String, String> = (0..16).map(|i| (format!("key.{i:02}"), format!("value {i}"))).collect();
        let bytes = tensors_to_bytes(&m, DType::F32, &meta).unwrap();
        // Metadata in key order, so the same map gives the same bytes in every process.
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let header = std::str::from_utf8(&bytes[8..8 + n]).unwrap();
        let positions: Vec<usize> = meta.keys().map(|k| header.find(k.as_str()).unwrap()).collect();
        assert!(positions.windows(2).all(|w| w[0] < w[1]), "{header}");
        assert_eq!(n % 8, 0);
        // With at most one metadata key there is no order to choose: the bytes are safetensors' own.
        let one: BTreeMap<String, String> = [("format".to_string(), "pt".to_string())].into();
        for meta in [BTreeMap::new(), one] {
            let ours = tensors_to_bytes(&m, DType::F16, &meta).unwrap();
            let st = safetensors::SafeTensors::deserialize(&ours).unwrap();
            let theirs =
                safetensors::serialize(st.tensors(), (!meta.is_empty()).then(|| meta.clone().into_iter().collect()))
                    .unwrap();
            assert_eq!(ours, theirs);
        }
        let (back, meta2) = tensors_from_bytes(&bytes, Path::new("mem"), true).unwrap();
        assert_eq!(meta2, meta);
        assert_eq!(tensor_map_hash(&back).unwrap(), tensor_map_hash(&m).unwrap());
    }

    #[test]
    fn write_atomic_replaces_the_file_and_leaves_no_temporary() {
        let dir = std::env::temp_dir().join(format!("hetfed-core-atomic-{}", std::process::id()));
        let path = dir.join("sub/x.json");
        write_atomic(&path, b"old").unwrap();
        write_atomic(&path, b"new contents").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new contents");
        let names: Vec<_> =
            std::fs::read_dir(path.parent().unwrap()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("x.json")]);
        // A failed write leaves the old file and no temporary behind.
        let blocked = dir.join("sub/x.json/inner.bin");
        assert!(write_atomic(&blocked, b"y").is_err());
        assert_eq!(std::fs::read(&path).unwrap(), b"new contents");
        let _ = std::fs::remove_dir_all(&dir);
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

/// The boundary between hetfed and the files it reads from outside (configs, tokenizers,
/// safetensors, task vectors, uploads): a parser of a dependency may panic on bytes it does not
/// expect (the `tokenizers` crate does on a truncated `tokenizer.json`), and a panic must never
/// reach a user. [`guard::parse`] turns it into the same one-line error as any other bad input.
pub mod guard {
    use std::cell::Cell;
    use std::panic::{catch_unwind, AssertUnwindSafe};
    use std::path::Path;
    use std::sync::Once;

    use crate::{Error, Result};

    thread_local! {
        /// How many [`parse`] calls this thread is inside; while positive, panics are not printed.
        static QUIET: Cell<u32> = const { Cell::new(0) };
    }
    static HOOK: Once = Once::new();

    /// Installs (once) a panic hook that stays silent for panics of a thread inside [`parse`]
    /// and hands every other panic to the hook that was there before. (A program that sets its
    /// own hook should do so before the first parse: a hook set later replaces this one, and
    /// caught panics would then be printed, though still caught.)
    fn install_hook() {
        HOOK.call_once(|| {
            let previous = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                if QUIET.with(Cell::get) == 0 {
                    previous(info);
                }
            }));
        });
    }

    struct Quiet;
    impl Quiet {
        fn enter() -> Self {
            QUIET.with(|q| q.set(q.get() + 1));
            Quiet
        }
    }
    impl Drop for Quiet {
        fn drop(&mut self) {
            QUIET.with(|q| q.set(q.get().saturating_sub(1)));
        }
    }

    /// Runs `f`, which parses data from `path` that should be `expected` (e.g. "a Hugging Face
    /// tokenizer"), and returns its result; a panic inside `f` becomes
    /// `<path>: expected <expected>, found data its parser cannot read (<panic message>)`, on one
    /// line, and prints nothing.
    pub fn parse<T>(path: &Path, expected: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
        install_hook();
        let outcome = {
            let _quiet = Quiet::enter();
            catch_unwind(AssertUnwindSafe(f))
        };
        outcome.unwrap_or_else(|payload| {
            let why = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "no message".into());
            Err(Error::Format {
                path: path.to_owned(),
                msg: format!("expected {expected}, found data its parser cannot read ({})", one_line(&why, 300)),
            })
        })
    }

    /// `s` on one line (whitespace runs collapsed), at most `max` characters.
    pub fn one_line(s: &str, max: usize) -> String {
        let joined = s.split_whitespace().collect::<Vec<_>>().join(" ");
        if joined.chars().count() <= max {
            joined
        } else {
            let cut: String = joined.chars().take(max).collect();
            format!("{cut}...")
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn a_panic_becomes_a_one_line_error_naming_the_file() {
            let err = parse::<()>(Path::new("x/tokenizer.json"), "a tokenizer", || panic!("bad\nthing")).unwrap_err();
            assert_eq!(
                err.to_string(),
                "x/tokenizer.json: expected a tokenizer, found data its parser cannot read (bad thing)"
            );
            // Results pass through, and the thread is not left quiet.
            assert_eq!(parse(Path::new("p"), "x", || Ok(3)).unwrap(), 3);
            assert_eq!(QUIET.with(Cell::get), 0);
        }
    }
}

/// Helpers shared by the workspace's tests: locating the read-only `shared/` folder (data,
/// models), comparing tensors, and seeded fuzzing of parsers.
pub mod testing {
    use std::path::{Path, PathBuf};

    use candle_core::{DType, Tensor};

    use crate::TensorMap;

    /// The largest absolute elementwise difference of two tensors of one shape (any float
    /// dtype, compared in f32). Panics on a shape mismatch: for tests.
    pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        assert_eq!(a.dims(), b.dims(), "tensors of different shapes");
        let (a, b) = (a.to_dtype(DType::F32).unwrap(), b.to_dtype(DType::F32).unwrap());
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    /// [`max_abs_diff`] over two tensor maps with the same names (asserted).
    pub fn max_map_diff(a: &TensorMap, b: &TensorMap) -> f32 {
        assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>(), "tensor maps with different names");
        a.iter().map(|(k, t)| max_abs_diff(t, &b[k])).fold(0.0, f32::max)
    }

    /// Seeded mutation of files from outside, for "never panics" tests: every run tries the
    /// same cases, and a failing case prints its seed.
    pub mod fuzz {
        use std::panic::{catch_unwind, AssertUnwindSafe};

        /// A deterministic stream of pseudo-random numbers (SplitMix64 via [`crate::mix_seed`]).
        pub struct Rng(u64, u64);

        impl Rng {
            pub fn new(seed: u64) -> Self {
                Rng(seed, 0)
            }
            pub fn next_u64(&mut self) -> u64 {
                self.1 += 1;
                crate::mix_seed(self.0, self.1)
            }
            /// Uniform in `0..n` (0 when `n` is 0).
            pub fn below(&mut self, n: usize) -> usize {
                (self.next_u64() % n.max(1) as u64) as usize
            }
        }

        /// Bytes that make JSON (and safetensors headers) interesting when inserted.
        const JUNK: &[u8] = b"{}[]\":,0123456789-+.eE \\nul\xff\x00\xc3";

        /// The length of a safetensors file's 8-byte size and JSON header: the part worth
        /// focusing mutations on.
        pub fn header_len(st: &[u8]) -> usize {
            8 + u64::from_le_bytes(st[..8].try_into().unwrap()) as usize
        }

        /// One to three mutations of `orig` (truncation, byte flips, inserted junk, a deleted or
        /// duplicated range, a digit grown into a long number), half of them inside the first
        /// `focus` bytes.
        pub fn mutate(orig: &[u8], rng: &mut Rng, focus: usize) -> Vec<u8> {
            let mut b = orig.to_vec();
            let pos = |rng: &mut Rng, len: usize| {
                if rng.below(2) == 0 {
                    rng.below(focus.min(len).max(1))
                } else {
                    rng.below(len.max(1))
                }
            };
            for _ in 0..1 + rng.below(3) {
                let len = b.len();
                let i = pos(rng, len).min(len);
                let j = (i + 1 + rng.below(64)).min(len);
                match rng.below(6) {
                    0 => b.truncate(i),
                    1 => {
                        for _ in 0..1 + rng.below(4) {
                            if !b.is_empty() {
                                let k = pos(rng, b.len()).min(b.len() - 1);
                                b[k] ^= 1 + rng.below(255) as u8;
                            }
                        }
                    }
                    2 => {
                        let junk: Vec<u8> = (0..1 + rng.below(16)).map(|_| JUNK[rng.below(JUNK.len())]).collect();
                        b.splice(i..i, junk);
                    }
                    3 => {
                        b.drain(i..j);
                    }
                    4 => {
                        let copy = b[i..j].to_vec();
                        b.splice(i..i, copy);
                    }
                    _ => {
                        // A digit becomes a longer number: sizes out of range.
                        if let Some(k) = (0..8).map(|_| pos(rng, len)).find(|&k| k < b.len() && b[k].is_ascii_digit()) {
                            let digits: Vec<u8> = (0..1 + rng.below(12)).map(|_| b'0' + rng.below(10) as u8).collect();
                            b.splice(k..k, digits);
                        }
                    }
                }
            }
            b
        }

        /// Runs `cases` seeded cases (seeds `mix_seed(salt, case)`); each must return `Ok` or an
        /// error of one non-empty line, never panic. Returns the errors' messages of the cases
        /// that failed cleanly, and how many were `Ok`.
        pub fn run<T, E: std::fmt::Display>(
            what: &str,
            salt: u64,
            cases: u64,
            mut case: impl FnMut(&mut Rng) -> Result<T, E>,
        ) -> (usize, Vec<String>) {
            let (mut ok, mut errors) = (0, Vec::new());
            for n in 0..cases {
                let seed = crate::mix_seed(salt, n);
                match catch_unwind(AssertUnwindSafe(|| case(&mut Rng::new(seed)))) {
                    Err(_) => panic!("{what}: case {n} (seed {seed:#x}) panicked"),
                    Ok(Ok(_)) => ok += 1,
                    Ok(Err(e)) => {
                        let msg = e.to_string();
                        assert!(
                            !msg.trim().is_empty() && !msg.contains('\n'),
                            "{what}: case {n} (seed {seed:#x}): expected an error of one non-empty line, found {msg:?}"
                        );
                        errors.push(msg);
                    }
                }
            }
            eprintln!("{what}: {cases} cases, {ok} passed, {} refused", errors.len());
            (ok, errors)
        }
    }

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
