//! Where a pair's per-layer maps live: in memory, or one safetensors file per large layer in a
//! directory, read when that layer is projected.
//!
//! At real widths the maps do not fit beside the large model: bloom-560m → bloom-7b1 has, per
//! large layer, a `[16384, 4096]` map of the MLP's hidden units and seven `[4096, 1024]` ones
//! (≈ 384 MiB in f32), ≈ 11 GiB over 30 layers. On disk only the layer being projected is
//! resident ([`Layers::get`] keeps the last layer read and drops it when another is asked for),
//! and a fit with a cache writes each layer's file as soon as it is fitted
//! ([`crate::PairMaps::load_or_fit`]), so the fit never holds more than one layer's maps either.
//!
//! A layer's file holds each distinct map once: a map several modules share (the residual stream
//! written by the attention output and read by nothing else, the MLP's hidden units written by
//! `dense_h_to_4h` and read by `dense_4h_to_h`) is stored under the first module that uses it,
//! and the others name it in the file's `hetfed.aliases` metadata.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use hetfed_core::{Error, Result};
use hetfed_project::nalgebra::DMatrix;
use hetfed_project::Map;

use crate::maps::{ModuleMaps, MODULES};

/// One large layer's maps: module (see [`MODULES`]) → maps.
pub type LayerMaps = BTreeMap<String, ModuleMaps>;

/// Every large layer's maps, in memory or in per-layer files.
pub(crate) enum Layers {
    Memory(Vec<Arc<LayerMaps>>),
    Disk {
        dir: PathBuf,
        n: usize,
        /// The last layer read, kept until another one is asked for.
        resident: Mutex<Option<(usize, Arc<LayerMaps>)>>,
    },
}

impl Clone for Layers {
    fn clone(&self) -> Self {
        match self {
            Layers::Memory(v) => Layers::Memory(v.clone()),
            Layers::Disk { dir, n, .. } => Layers::Disk { dir: dir.clone(), n: *n, resident: Mutex::new(None) },
        }
    }
}

impl std::fmt::Debug for Layers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Layers::Memory(v) => write!(f, "Layers::Memory({} layers)", v.len()),
            Layers::Disk { dir, n, .. } => write!(f, "Layers::Disk({n} layers in {})", dir.display()),
        }
    }
}

/// The file of large layer `j`'s maps in a maps directory.
pub(crate) fn layer_file(dir: &Path, j: usize) -> PathBuf {
    dir.join(format!("layer-{j}.safetensors"))
}

impl Layers {
    pub fn len(&self) -> usize {
        match self {
            Layers::Memory(v) => v.len(),
            Layers::Disk { n, .. } => *n,
        }
    }

    /// Layer `j`'s maps, read from its file when on disk (the previous resident layer is dropped
    /// first, so at most one layer is held).
    pub fn get(&self, j: usize) -> Result<Arc<LayerMaps>> {
        if j >= self.len() {
            return Err(Error::msg(format!("maps: expected a large layer below {}, found {j}", self.len())));
        }
        match self {
            Layers::Memory(v) => Ok(v[j].clone()),
            Layers::Disk { dir, resident, .. } => {
                let mut slot = resident.lock().map_err(|_| Error::msg("maps: a thread panicked while reading maps"))?;
                if let Some((k, maps)) = slot.as_ref() {
                    if *k == j {
                        return Ok(maps.clone());
                    }
                }
                *slot = None;
                let maps = Arc::new(read_layer(&layer_file(dir, j))?);
                *slot = Some((j, maps.clone()));
                Ok(maps)
            }
        }
    }
}

/// Writes one layer's maps, each distinct map once (see the module docs).
pub(crate) fn write_layer(path: &Path, layer: &LayerMaps) -> Result<()> {
    let mut written: Vec<(String, &Arc<Map>)> = Vec::new();
    let mut aliases = BTreeMap::new();
    for (m, mm) in layer {
        let parts = mm.out.iter().enumerate().map(|(p, o)| (format!("{m}.out{p}"), o));
        for (name, map) in parts.chain(std::iter::once((format!("{m}.in"), &mm.input))) {
            match written.iter().find(|(_, w)| Arc::ptr_eq(w, map)) {
                Some((first, _)) => {
                    aliases.insert(name, first.clone());
                }
                None => written.push((name, map)),
            }
        }
    }
    let mut md = BTreeMap::new();
    md.insert("hetfed.aliases".to_string(), serde_json::to_string(&aliases).map_err(|e| Error::msg(e.to_string()))?);
    write_matrices(path, &written, &md)
}

/// Writes maps as an f32 safetensors file, each matrix streamed row by row from its own storage
/// (no tensor copy, no whole-file buffer: a layer of bloom-560m → bloom-7b1 maps is 384 MiB),
/// through a temporary file renamed into place.
fn write_matrices(path: &Path, maps: &[(String, &Arc<Map>)], metadata: &BTreeMap<String, String>) -> Result<()> {
    use std::io::Write;
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, m) in maps {
        let (r, c) = (m.d_large(), m.d_small());
        let end = offset + r * c * 4;
        header
            .insert(name.clone(), serde_json::json!({"dtype": "F32", "shape": [r, c], "data_offsets": [offset, end]}));
        offset = end;
    }
    header.insert("__metadata__".into(), serde_json::json!(metadata));
    let mut head = serde_json::to_vec(&header).map_err(|e| Error::msg(e.to_string()))?;
    while head.len() % 8 != 0 {
        head.push(b' ');
    }
    let tmp = path.with_extension("safetensors.partial");
    let io = |e| Error::io(&tmp, e);
    let file = std::fs::File::create(&tmp).map_err(io)?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
    w.write_all(&(head.len() as u64).to_le_bytes()).map_err(io)?;
    w.write_all(&head).map_err(io)?;
    let mut row = Vec::new();
    for (_, m) in maps {
        let t = m.matrix();
        for i in 0..t.nrows() {
            row.clear();
            row.extend(t.row(i).iter().flat_map(|v| v.to_le_bytes()));
            w.write_all(&row).map_err(io)?;
        }
    }
    let file = w.into_inner().map_err(|e| io(e.into_error()))?;
    file.sync_all().map_err(io)?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// Reads one layer's maps written by [`write_layer`]; maps stored once are shared again.
pub(crate) fn read_layer(path: &Path) -> Result<LayerMaps> {
    let (mut matrices, md) = read_matrices(path)?;
    let bad = |msg: String| Error::Format { path: path.to_path_buf(), msg };
    let aliases: BTreeMap<String, String> = match md.get("hetfed.aliases") {
        Some(s) => serde_json::from_str(s).map_err(|e| bad(format!("expected JSON aliases: {e}")))?,
        None => BTreeMap::new(),
    };
    let mut read: BTreeMap<String, Arc<Map>> = BTreeMap::new();
    let mut take = |name: &str| -> Result<Arc<Map>> {
        let key = aliases.get(name).map(String::as_str).unwrap_or(name);
        if let Some(m) = read.get(key) {
            return Ok(m.clone());
        }
        let t = matrices.remove(key).ok_or_else(|| bad(format!("expected tensor `{key}`, found none")))?;
        let m = Arc::new(Map::new(t)?);
        read.insert(key.to_string(), m.clone());
        Ok(m)
    };
    let mut layer = LayerMaps::new();
    for m in MODULES {
        let parts = if m == MODULES[0] { 3 } else { 1 };
        let out = (0..parts).map(|p| take(&format!("{m}.out{p}"))).collect::<Result<_>>()?;
        let input = take(&format!("{m}.in"))?;
        layer.insert(m.to_string(), ModuleMaps { out, input });
    }
    Ok(layer)
}

/// A safetensors file's `__metadata__`.
type Metadata = BTreeMap<String, String>;

/// The f32 matrices of a file written by [`write_matrices`] and its metadata, each matrix read
/// row by row straight into its nalgebra storage: no mapping of the file (whose pages would
/// count as resident while mapped) and no tensor copy, so reading a layer holds its maps only.
fn read_matrices(path: &Path) -> Result<(BTreeMap<String, DMatrix<f32>>, Metadata)> {
    use std::io::{Read, Seek, SeekFrom};
    let bad = |msg: String| Error::Format { path: path.to_path_buf(), msg };
    let io = |e| Error::io(path, e);
    let mut file = std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(path).map_err(io)?);
    let size = file.get_ref().metadata().map_err(io)?.len();
    let mut len = [0u8; 8];
    file.read_exact(&mut len).map_err(|_| bad("expected a safetensors file, found fewer than 8 bytes".into()))?;
    let n = u64::from_le_bytes(len);
    if n > size.saturating_sub(8) || n > 1 << 26 {
        return Err(bad(format!("expected a safetensors header within the file's {size} bytes, found one of {n}")));
    }
    let mut head = vec![0u8; n as usize];
    file.read_exact(&mut head).map_err(io)?;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&head).map_err(|e| bad(format!("expected a JSON safetensors header: {e}")))?;
    let mut metadata = BTreeMap::new();
    let mut out = BTreeMap::new();
    for (name, info) in &header {
        if name == "__metadata__" {
            for (k, v) in info.as_object().into_iter().flatten() {
                metadata.insert(k.clone(), v.as_str().unwrap_or_default().to_string());
            }
            continue;
        }
        let dims: Vec<u64> = info["shape"].as_array().into_iter().flatten().filter_map(|d| d.as_u64()).collect();
        let offs: Vec<u64> = info["data_offsets"].as_array().into_iter().flatten().filter_map(|d| d.as_u64()).collect();
        let (&[r, c], &[start, end], Some("F32")) = (dims.as_slice(), offs.as_slice(), info["dtype"].as_str()) else {
            return Err(bad(format!("`{name}`: expected an F32 matrix with data offsets, found {info}")));
        };
        if end.checked_sub(start) != Some(r * c * 4) || 8 + n + end > size {
            return Err(bad(format!(
                "`{name}`: expected {} bytes of [{r}, {c}] f32 within the file, found offsets {start}..{end}",
                r * c * 4
            )));
        }
        let (r, c) = (r as usize, c as usize);
        file.seek(SeekFrom::Start(8 + n + start)).map_err(io)?;
        let mut m = DMatrix::<f32>::zeros(r, c);
        let mut row = vec![0u8; c * 4];
        for i in 0..r {
            file.read_exact(&mut row).map_err(io)?;
            for (j, v) in row.chunks_exact(4).enumerate() {
                m[(i, j)] = f32::from_le_bytes([v[0], v[1], v[2], v[3]]);
            }
        }
        out.insert(name.clone(), m);
    }
    Ok((out, metadata))
}
