//! `import hetfed`: Python bindings of hetfed's models, scoring, generation, task vectors and
//! metrics (PyO3, stable ABI from Python 3.9). Built by maturin (`pip install ./crates/hetfed-py`).
//!
//! Every Rust error becomes one `hetfed.HetfedError` carrying the same one-line message; a bad
//! argument of the Python API (a negative size, an unknown dtype) is a `ValueError`. Calls that
//! run a model release the GIL.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use candle_core::DType;
use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyValueError};
use pyo3::prelude::*;
use pyo3::types::IntoPyDict;

use hetfed_fed::strategy::{FitResult, Strategy};
use hetfed_fed::RunConfig;
use hetfed_model::generate::{generate, SamplingConfig};
use hetfed_model::{CausalLm, Checkpoint, LoraConfig, ModelSpec};
use hetfed_train::{Example, TrainConfig, Trainer};

create_exception!(
    hetfed,
    HetfedError,
    PyException,
    "An error reported by hetfed (one line: what, where, what was found)."
);

fn err(e: impl std::fmt::Display) -> PyErr {
    HetfedError::new_err(e.to_string())
}

/// A Python object (dict, list, numbers, strings) as JSON text, through Python's `json`.
fn to_json(py: Python<'_>, obj: &Bound<'_, PyAny>) -> PyResult<String> {
    py.import("json")?.call_method1("dumps", (obj,))?.extract()
}

/// A serialisable Rust value as the Python object `json.loads` makes of it.
fn from_json<'py>(py: Python<'py>, v: &impl serde::Serialize) -> PyResult<Bound<'py, PyAny>> {
    let text = serde_json::to_string(v).map_err(err)?;
    py.import("json")?.call_method1("loads", (text,))
}

/// Corpus BLEU as sacrebleu computes it with its defaults (13a tokenisation): `refs` are
/// reference streams, `refs[k][i]` the k-th reference of `hyps[i]`. 0–100.
#[pyfunction]
fn bleu(hyps: Vec<String>, refs: Vec<Vec<String>>) -> PyResult<f64> {
    Ok(hetfed_metrics::bleu::corpus_bleu(&hyps, &refs).map_err(err)?.score)
}

/// Corpus chrF (`word_order = 0`) or chrF++ (`word_order = 2`) as sacrebleu computes it, 0–100.
#[pyfunction]
#[pyo3(signature = (hyps, refs, char_order = 6, word_order = 0, beta = 2))]
fn chrf(hyps: Vec<String>, refs: Vec<Vec<String>>, char_order: usize, word_order: usize, beta: u32) -> PyResult<f64> {
    hetfed_metrics::chrf::corpus_chrf(&hyps, &refs, char_order, word_order, beta).map_err(err)
}

/// ROUGE-1, ROUGE-2 and ROUGE-L of one hypothesis against its references (the best reference
/// per measure), as rouge-score computes them: `{"rouge1": {"precision", "recall",
/// "fmeasure"}, ...}`.
#[pyfunction]
#[pyo3(signature = (references, hypothesis, use_stemmer = false))]
fn rouge(
    references: Vec<String>,
    hypothesis: &str,
    use_stemmer: bool,
) -> PyResult<BTreeMap<&'static str, BTreeMap<&'static str, f64>>> {
    let s = hetfed_metrics::rouge::Rouge::new(use_stemmer).score_multi(&references, hypothesis).map_err(err)?;
    let one = |x: &hetfed_metrics::rouge::Score| {
        BTreeMap::from([("precision", x.precision), ("recall", x.recall), ("fmeasure", x.fmeasure)])
    };
    Ok(BTreeMap::from([("rouge1", one(&s.rouge1)), ("rouge2", one(&s.rouge2)), ("rougeL", one(&s.rouge_l))]))
}

/// A Hugging Face causal LM directory (`config.json`, `model.safetensors`, `tokenizer.json`),
/// BLOOM or Llama, loaded in f32, optionally with a hetfed task vector added.
#[pyclass(frozen, module = "hetfed")]
struct Model {
    ck: Checkpoint,
    model: Box<dyn CausalLm>,
}

impl Model {
    fn encode(&self, text: &str) -> PyResult<Vec<u32>> {
        let tok = self.ck.tokenizer().map_err(err)?;
        let ids = tok.encode(text, true).map_err(|e| err(format!("tokenising: {e}")))?.get_ids().to_vec();
        if ids.is_empty() {
            return Err(PyValueError::new_err("expected text that encodes to at least one token, found none"));
        }
        Ok(ids)
    }

    fn context(&self) -> usize {
        self.ck.arch.max_positions(&self.ck.config_json).max(2)
    }

    fn from_checkpoint(ck: Checkpoint) -> PyResult<Self> {
        let model = ck.model(None).map_err(err)?;
        Ok(Self { ck, model })
    }
}

#[pymethods]
impl Model {
    #[new]
    #[pyo3(signature = (path, taskvec = None, scale = 1.0))]
    fn new(py: Python<'_>, path: PathBuf, taskvec: Option<&TaskVector>, scale: f64) -> PyResult<Self> {
        let tv = taskvec.map(|t| t.tv.clone());
        py.detach(move || {
            let mut ck = Checkpoint::load(&path).map_err(err)?;
            if let Some(tv) = tv {
                ck.weights = tv.apply(&ck.identity().map_err(err)?, &ck.weights, scale).map_err(err)?;
            }
            let model = ck.model(None).map_err(err)?;
            Ok(Self { ck, model })
        })
    }

    /// `"bloom"` or `"llama"`.
    #[getter]
    fn model_type(&self) -> &'static str {
        self.ck.arch.model_type()
    }

    #[getter]
    fn vocab_size(&self) -> usize {
        self.ck.arch.vocab_size()
    }

    /// The longest sequence the model takes, in tokens.
    #[getter]
    fn context_length(&self) -> usize {
        self.context()
    }

    /// Who the model is (what task vectors are checked against): `{"arch", "config_hash",
    /// "weights_hash"}`.
    fn identity(&self) -> PyResult<BTreeMap<&'static str, String>> {
        let id = self.ck.identity().map_err(err)?;
        Ok(BTreeMap::from([("arch", id.arch), ("config_hash", id.config_hash), ("weights_hash", id.weights_hash)]))
    }

    /// Token ids of `text`, with the tokenizer's special tokens.
    fn tokenize(&self, text: &str) -> PyResult<Vec<u32>> {
        self.encode(text)
    }

    /// Per-token log-probabilities of `text` (what `hetfed score --json` prints): its token ids
    /// and, for every token after the first, its log-probability given the ones before. Tokens
    /// beyond the model's context are dropped.
    fn score(&self, py: Python<'_>, text: &str) -> PyResult<(Vec<u32>, Vec<f32>)> {
        let mut ids = self.encode(text)?;
        ids.truncate(self.context());
        let model = self.model.as_ref();
        let lp = py.detach(|| hetfed_model::score::sequence_logprobs(model, std::slice::from_ref(&ids), 1));
        Ok((ids.clone(), lp.map_err(err)?.pop().unwrap_or_default()))
    }

    /// Greedy continuation of `prompt` (at most `max_new_tokens`, stopping at end of sequence),
    /// decoded without special tokens.
    #[pyo3(signature = (prompt, max_new_tokens = 32))]
    fn generate(&self, py: Python<'_>, prompt: &str, max_new_tokens: usize) -> PyResult<String> {
        let ids = self.encode(prompt)?;
        if max_new_tokens == 0 || ids.len() + max_new_tokens > self.context() {
            return Err(PyValueError::new_err(format!(
                "max_new_tokens: expected 1..={} (the context less the prompt's {} tokens), found {max_new_tokens}",
                self.context().saturating_sub(ids.len()),
                ids.len()
            )));
        }
        let cfg = SamplingConfig { max_new_tokens, ..Default::default() };
        let eos = self.ck.arch.eos_token_id();
        let model = self.model.as_ref();
        let new = py.detach(|| generate(model, &ids, &cfg, eos)).map_err(err)?;
        let tok = self.ck.tokenizer().map_err(err)?;
        tok.decode(&new, true).map_err(|e| err(format!("decoding: {e}")))
    }

    /// The model on one task's split, as `hetfed eval --json` measures it: the task's metrics
    /// (ROUGE, BLEU/chrF, accuracy/macro-F1) and `target_nll`, `"<metric>"` → value. `limit`
    /// takes that many examples evenly spaced over the split (as `--limit`); the other
    /// arguments are `hetfed eval`'s, with the same ranges and defaults.
    #[pyo3(signature = (task, split = "dev", limit = None, data_dir = None, batch_size = 16, max_new_tokens = 64,
        num_beams = 1, max_len = None, length_normalise = None))]
    #[allow(clippy::too_many_arguments)]
    fn eval_task(
        &self,
        py: Python<'_>,
        task: &str,
        split: &str,
        limit: Option<usize>,
        data_dir: Option<PathBuf>,
        batch_size: usize,
        max_new_tokens: usize,
        num_beams: usize,
        max_len: Option<usize>,
        length_normalise: Option<bool>,
    ) -> PyResult<BTreeMap<String, f64>> {
        let context = self.context();
        let range = |name: &str, v: usize, lo: usize, hi: usize| -> PyResult<()> {
            if (lo..=hi).contains(&v) {
                Ok(())
            } else {
                Err(PyValueError::new_err(format!("{name}: expected {lo}..={hi}, found {v}")))
            }
        };
        range("batch_size", batch_size, 1, hetfed_fed::config::MAX_BATCH)?;
        range("max_new_tokens", max_new_tokens, 1, context - 1)?;
        range("num_beams", num_beams, 1, 64.min(self.ck.arch.vocab_size()))?;
        if let Some(n) = limit {
            range("limit", n, 1, usize::MAX)?;
        }
        if let Some(n) = max_len {
            range("max_len", n, 2, context)?;
        }
        let split: hetfed_data::Split = split.parse().map_err(|e| PyValueError::new_err(format!("split: {e}")))?;
        let opts = hetfed_eval::EvalOptions {
            batch_size,
            max_new_tokens,
            max_len: max_len.unwrap_or(context),
            num_beams,
            length_normalise,
            token_logprobs: false,
        };
        let (ck, model) = (&self.ck, self.model.as_ref());
        py.detach(|| -> hetfed_core::Result<_> {
            let spec = hetfed_data::task::builtin(task)?;
            let mut examples = spec.load(&self::data_dir(data_dir.as_deref())?, split)?;
            if let Some(n) = limit {
                examples = examples.subset(&hetfed_fed::assemble::strided(examples.len(), n))?;
            }
            let tok = ck.tokenizer()?;
            let counter = |s: &str| tok.encode(s, false).map(|e| e.len()).unwrap_or(0);
            let items = spec.to_items(&examples, Some(&counter))?;
            let report = hetfed_eval::evaluate(model, tok, ck.arch.eos_token_id(), &spec, &items, &opts, |_, _| {})
                .map_err(|e| hetfed_core::Error::msg(e.to_string()))?;
            Ok(report.metrics)
        })
        .map_err(err)
    }
}

/// A task vector: the change fine-tuning made to a base model (dense, or LoRA factors kept
/// factored), tied to that base's identity.
#[pyclass(frozen, module = "hetfed")]
struct TaskVector {
    tv: hetfed_taskvec::TaskVector,
}

#[pymethods]
impl TaskVector {
    /// Loads a task vector file (`hetfed finetune --out`, `hetfed taskvec`).
    #[staticmethod]
    fn load(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        py.detach(|| hetfed_taskvec::TaskVector::load(&path)).map(|tv| Self { tv }).map_err(err)
    }

    /// The task vector of a fine-tuned model directory against its base directory (same
    /// architecture and shapes).
    #[staticmethod]
    fn diff(py: Python<'_>, base: PathBuf, finetuned: PathBuf) -> PyResult<Self> {
        py.detach(|| {
            let b = Checkpoint::load(&base)?;
            let f = Checkpoint::load(&finetuned)?;
            hetfed_taskvec::TaskVector::full_diff(b.identity()?, &b.weights, &f.weights)
        })
        .map(|tv| Self { tv })
        .map_err(err)
    }

    /// Saves it; `dtype` is `"f32"`, `"f16"` or `"bf16"`.
    #[pyo3(signature = (path, dtype = "f32"))]
    fn save(&self, py: Python<'_>, path: PathBuf, dtype: &str) -> PyResult<()> {
        let dt = match dtype {
            "f32" => DType::F32,
            "f16" => DType::F16,
            "bf16" => DType::BF16,
            other => {
                return Err(PyValueError::new_err(format!(
                    "dtype: expected \"f32\", \"f16\" or \"bf16\", found {other:?}"
                )))
            }
        };
        py.detach(|| self.tv.save(&path, dt)).map_err(err)
    }

    /// `{"kind", "base", "num_params", "stored_values", "norm", "lora_rank", "lora_alpha"}`:
    /// dense or LoRA, the base's identity, the parameters it changes, the numbers it stores, its
    /// global L2 norm, the LoRA rank and alpha (None for dense).
    fn info(&self) -> PyResult<BTreeMap<&'static str, Py<PyAny>>> {
        Python::attach(|py| {
            let b = &self.tv.base;
            let base = BTreeMap::from([
                ("arch", b.arch.clone()),
                ("config_hash", b.config_hash.clone()),
                ("weights_hash", b.weights_hash.clone()),
            ]);
            Ok(BTreeMap::from([
                ("kind", self.tv.kind.name().into_pyobject(py)?.into_any().unbind()),
                ("base", base.into_pyobject(py)?.into_any().unbind()),
                ("num_params", self.tv.num_params().into_pyobject(py)?.into_any().unbind()),
                ("stored_values", self.tv.num_stored_values().into_pyobject(py)?.into_any().unbind()),
                ("norm", self.tv.global_norm().map_err(err)?.into_pyobject(py)?.into_any().unbind()),
                ("lora_rank", self.tv.lora_config().map(|c| c.rank).into_pyobject(py)?.into_any().unbind()),
                ("lora_alpha", self.tv.lora_config().map(|c| c.alpha).into_pyobject(py)?.into_any().unbind()),
            ]))
        })
    }

    /// The stored tensors as NumPy float32 arrays keyed by name (dense: parameter names; LoRA:
    /// `<module>.lora_A` `[rank, in]` and `<module>.lora_B` `[out, rank]`). `info()` gives the
    /// base identity and kind that [`TaskVector.from_numpy`] needs back.
    fn to_numpy<'py>(&self, py: Python<'py>) -> PyResult<BTreeMap<String, Bound<'py, PyAny>>> {
        let np = py.import("numpy")?;
        let tensors = match &self.tv.kind {
            hetfed_taskvec::Delta::Full(m) => m,
            hetfed_taskvec::Delta::Lora { factors, .. } => factors,
        };
        let mut out = BTreeMap::new();
        for (name, t) in tensors {
            let v: Vec<f32> = t.flatten_all().and_then(|f| f.to_vec1::<f32>()).map_err(err)?;
            let le: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            let bytes = pyo3::types::PyBytes::new(py, &le);
            let arr = np.call_method1("frombuffer", (bytes, "<f4"))?.call_method1("reshape", (t.dims().to_vec(),))?;
            out.insert(name.clone(), arr.call_method0("copy")?);
        }
        Ok(out)
    }

    /// A task vector from NumPy arrays (any float dtype; stored as f32): `kind = "full"` takes
    /// parameter names, `kind = "lora"` takes `<module>.lora_A`/`lora_B` factors and `lora_alpha`.
    /// `base` is the base model's identity (`Model.identity()` or `info()["base"]`).
    #[staticmethod]
    #[pyo3(signature = (arrays, base, kind = "full", lora_alpha = None))]
    fn from_numpy(
        py: Python<'_>,
        arrays: BTreeMap<String, Bound<'_, PyAny>>,
        base: BTreeMap<String, String>,
        kind: &str,
        lora_alpha: Option<f64>,
    ) -> PyResult<Self> {
        let np = py.import("numpy")?;
        let field = |k: &str| {
            base.get(k)
                .cloned()
                .ok_or_else(|| PyValueError::new_err(format!("base: expected a `{k}` entry, found none")))
        };
        let id = hetfed_model::ModelIdentity {
            arch: field("arch")?,
            config_hash: field("config_hash")?,
            weights_hash: field("weights_hash")?,
        };
        let mut map = hetfed_core::TensorMap::new();
        for (name, a) in arrays {
            let a = np.call_method("ascontiguousarray", (a,), Some(&[("dtype", "<f4")].into_py_dict(py)?))?;
            let shape: Vec<usize> = a.getattr("shape")?.extract()?;
            let bytes: Vec<u8> = a.call_method0("tobytes")?.extract()?;
            let v: Vec<f32> = bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
            map.insert(name, candle_core::Tensor::from_vec(v, shape, &candle_core::Device::Cpu).map_err(err)?);
        }
        let tv = match kind {
            "full" => hetfed_taskvec::TaskVector { base: id, kind: hetfed_taskvec::Delta::Full(map) },
            "lora" => {
                let alpha = lora_alpha.ok_or_else(|| {
                    PyValueError::new_err("lora_alpha: expected a number for kind=\"lora\", found None")
                })?;
                let rank =
                    map.iter().find(|(k, _)| k.ends_with(".lora_A")).map(|(_, t)| t.dims()[0]).ok_or_else(|| {
                        PyValueError::new_err("arrays: expected `<module>.lora_A` factors, found none")
                    })?;
                let targets = map.keys().filter_map(|k| k.strip_suffix(".lora_A")).map(String::from).collect();
                let config = LoraConfig { rank, alpha, dropout: 0.0, targets };
                hetfed_taskvec::TaskVector::from_lora_factors(id, config, map).map_err(err)?
            }
            other => {
                return Err(PyValueError::new_err(format!("kind: expected \"full\" or \"lora\", found {other:?}")))
            }
        };
        Ok(Self { tv })
    }

    /// Global L2 norm of the change.
    fn norm(&self) -> PyResult<f64> {
        self.tv.global_norm().map_err(err)
    }

    /// `lambda · self`.
    fn scale(&self, lam: f64) -> PyResult<Self> {
        self.tv.scale(lam).map(|tv| Self { tv }).map_err(err)
    }

    fn __add__(&self, other: &TaskVector) -> PyResult<Self> {
        self.tv.add(&other.tv).map(|tv| Self { tv }).map_err(err)
    }

    fn __neg__(&self) -> PyResult<Self> {
        self.tv.negate().map(|tv| Self { tv }).map_err(err)
    }

    fn __mul__(&self, lam: f64) -> PyResult<Self> {
        self.scale(lam)
    }

    fn __rmul__(&self, lam: f64) -> PyResult<Self> {
        self.scale(lam)
    }

    fn __repr__(&self) -> String {
        format!("TaskVector({}, base {})", self.tv.kind.name(), self.tv.base)
    }
}

/// Fine-tunes the model at `model` on `(prompt, target)` pairs (the loss covers the targets)
/// and returns the task vector: LoRA factors of rank `lora_rank` (scale `lora_alpha`, default
/// twice the rank) on the architecture's default modules, or the dense change when `lora_rank`
/// is 0. What `hetfed finetune` does, without files.
#[pyfunction]
#[pyo3(signature = (model, examples, lora_rank = 8, lr = 1e-3, epochs = 1, max_steps = None, batch_size = 8, max_len = 256, seed = 0, lora_alpha = None))]
#[allow(clippy::too_many_arguments)]
fn finetune(
    py: Python<'_>,
    model: PathBuf,
    examples: Vec<(String, String)>,
    lora_rank: usize,
    lr: f64,
    epochs: usize,
    max_steps: Option<usize>,
    batch_size: usize,
    max_len: usize,
    seed: u64,
    lora_alpha: Option<f64>,
) -> PyResult<TaskVector> {
    if examples.is_empty() {
        return Err(PyValueError::new_err("examples: expected at least one (prompt, target) pair, found none"));
    }
    if !(lr.is_finite() && lr > 0.0) {
        return Err(PyValueError::new_err(format!("lr: expected a positive finite number, found {lr}")));
    }
    if max_len < 2 {
        return Err(PyValueError::new_err(format!("max_len: expected at least 2 tokens, found {max_len}")));
    }
    py.detach(|| -> hetfed_core::Result<TaskVector> {
        let ck = Checkpoint::load(&model)?;
        let mut cfg = TrainConfig { lr, epochs, max_steps, batch_size, seed, ..Default::default() };
        cfg.max_len = max_len.min(ck.arch.max_positions(&ck.config_json).max(2));
        if lora_rank > 0 {
            cfg.lora = Some(LoraConfig {
                rank: lora_rank,
                alpha: lora_alpha.unwrap_or(2.0 * lora_rank as f64),
                targets: ck.arch.default_lora_targets(),
                ..Default::default()
            });
        }
        cfg.validate().map_err(hetfed_core::Error::msg)?;
        let examples: Vec<Example> = examples.into_iter().map(|(prompt, target)| Example { prompt, target }).collect();
        let data = hetfed_train::encode(ck.tokenizer()?, &examples, cfg.max_len, ck.arch.eos_token_id())?;
        let mut tr = Trainer::new(&ck, cfg, None)?;
        tr.train(&data, |_, _| Ok(()), || false)?;
        let id = ck.identity()?;
        let tv = match (tr.lora(), tr.weights()) {
            (Some(set), _) => hetfed_taskvec::TaskVector::from_lora(id, set)?,
            (None, Some(w)) => hetfed_taskvec::TaskVector::full_diff(id, &ck.weights, &w)?,
            (None, None) => return Err(hetfed_core::Error::msg("a trainer is either LoRA or full")),
        };
        Ok(TaskVector { tv })
    })
    .map_err(err)
}

/// Maps between the hidden spaces of a small and a large model (BLOOM, one tokenizer), fitted
/// layer by layer on calibration text: they move a small model's task vector into the large
/// model (`project`) and back (`project_back`), as `hetfed project` does.
#[pyclass(frozen, module = "hetfed")]
struct PairMaps {
    maps: hetfed_transfer::PairMaps,
}

fn map_method(method: &str) -> PyResult<hetfed_transfer::Method> {
    serde_json::from_value(serde_json::Value::String(method.to_string())).map_err(|_| {
        PyValueError::new_err(format!(
            "method: expected \"procrustes\", \"ridge\", \"weight_space\", \"random\" or \"identity\", found {method:?}"
        ))
    })
}

#[pymethods]
impl PairMaps {
    /// Fits the maps of `small` → `large`. Calibration: `calibration_sequences` sequences of
    /// `calibration_len` tokens sampled from the large model under `seed` (what `hetfed project`
    /// does), or windows of `texts` (the server's own text) when given. With `cache_dir`, maps
    /// fitted before for exactly these models and settings are read from it (the cache of
    /// `hetfed project --cache-dir`), and new ones are written there.
    #[staticmethod]
    #[pyo3(signature = (small, large, method = "procrustes", calibration_sequences = 64, calibration_len = 32, seed = 0, texts = None, cache_dir = None))]
    #[allow(clippy::too_many_arguments)]
    fn fit(
        py: Python<'_>,
        small: PathBuf,
        large: PathBuf,
        method: &str,
        calibration_sequences: usize,
        calibration_len: usize,
        seed: u64,
        texts: Option<Vec<String>>,
        cache_dir: Option<PathBuf>,
    ) -> PyResult<Self> {
        let method = map_method(method)?;
        if calibration_sequences < 2 || calibration_len < 4 {
            return Err(PyValueError::new_err(format!(
                "calibration: expected at least 2 sequences of 4 tokens, found {calibration_sequences} of {calibration_len}"
            )));
        }
        py.detach(move || -> hetfed_core::Result<Self> {
            let small = Checkpoint::load(&small)?;
            let large = Checkpoint::load(&large)?;
            let cfg = hetfed_transfer::MapConfig { method, seed, ..Default::default() };
            let kind = if texts.is_some() { "text" } else { "sample" };
            let key = format!("{kind}:n={calibration_sequences}:len={calibration_len}");
            let eos = large.arch.eos_token_id().unwrap_or(0);
            let seqs = || match &texts {
                Some(t) => {
                    hetfed_transfer::text_sequences(large.tokenizer()?, t, eos, calibration_sequences, calibration_len)
                }
                None => {
                    let model = large.model(None)?;
                    hetfed_transfer::sample_sequences(model.as_ref(), eos, calibration_sequences, calibration_len, seed)
                }
            };
            let maps = match &cache_dir {
                Some(dir) => hetfed_transfer::PairMaps::load_or_fit(dir, &small, &large, &key, &cfg, seqs)?.0,
                None => hetfed_transfer::PairMaps::fit(&small, &large, &seqs()?, &key, &cfg)?,
            };
            Ok(Self { maps })
        })
        .map_err(err)
    }

    /// Reads maps written by `save` (or an entry of hetfed's map cache): a directory, whose
    /// layers are read one at a time when projected.
    #[staticmethod]
    fn load(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        py.detach(|| hetfed_transfer::PairMaps::load(&path)).map(|maps| Self { maps }).map_err(err)
    }

    /// Writes the maps as a directory: `pair.safetensors` and one file per large layer.
    fn save(&self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        py.detach(|| self.maps.save(&path)).map_err(err)
    }

    /// A task vector of the small model moved into the large model's space (LoRA factors
    /// factor by factor, rank kept; dense updates module by module).
    fn project(&self, py: Python<'_>, taskvec: &TaskVector) -> PyResult<TaskVector> {
        py.detach(|| self.maps.project(&taskvec.tv)).map(|(tv, _)| TaskVector { tv }).map_err(err)
    }

    /// A task vector of the large model moved into the small one (the transposed maps).
    fn project_back(&self, py: Python<'_>, taskvec: &TaskVector) -> PyResult<TaskVector> {
        py.detach(|| self.maps.project_back(&taskvec.tv)).map(|(tv, _)| TaskVector { tv }).map_err(err)
    }

    /// `{"small", "large", "method", "pairing", "summary"}`: both identities, the settings and
    /// the fit's summary (held-out explained variance per layer, calibration, seconds).
    fn info<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let m = &self.maps;
        let v = serde_json::json!({"small": m.small, "large": m.large, "method": m.config.method,
            "pairing": m.pairing, "summary": m.summary});
        from_json(py, &v)
    }
}

/// A run configuration (the TOML of `hetfed simulate --config`): server, clients, data, and the
/// `[transfer]` table of a heterogeneous run. Relative paths resolve against `base_dir`.
#[pyclass(frozen, module = "hetfed")]
struct Config {
    cfg: RunConfig,
}

#[pymethods]
impl Config {
    /// Reads a TOML file; its paths are relative to its directory.
    #[staticmethod]
    fn load(path: PathBuf) -> PyResult<Self> {
        RunConfig::from_file(&path).map(|cfg| Self { cfg }).map_err(err)
    }

    #[staticmethod]
    #[pyo3(signature = (text, base_dir = PathBuf::from(".")))]
    fn from_toml(text: &str, base_dir: PathBuf) -> PyResult<Self> {
        RunConfig::from_toml(text, base_dir, "the config").map(|cfg| Self { cfg }).map_err(err)
    }

    /// The same tables as a dict (what `to_dict` returns, or parsed TOML).
    #[staticmethod]
    #[pyo3(signature = (config, base_dir = PathBuf::from(".")))]
    fn from_dict(py: Python<'_>, config: &Bound<'_, PyAny>, base_dir: PathBuf) -> PyResult<Self> {
        let text = to_json(py, config)?;
        let mut cfg: RunConfig =
            serde_json::from_str(&text).map_err(|e| err(format!("the config: {}", e.to_string().trim())))?;
        cfg.base_dir = base_dir;
        cfg.validate().map_err(|e| err(format!("the config: {e}")))?;
        Ok(Self { cfg })
    }

    /// `hetfed simulate`'s embedded default (`configs/simulate.toml`; paths relative to
    /// `configs/` of the working directory).
    #[staticmethod]
    fn embedded_default() -> PyResult<Self> {
        RunConfig::embedded_default().map(|cfg| Self { cfg }).map_err(err)
    }

    fn to_dict<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        from_json(py, &self.cfg)
    }

    /// The client ids of the run, `c0`, `c1`, ...
    fn client_ids(&self) -> Vec<String> {
        self.cfg.client_ids()
    }

    /// `p` resolved against the config's directory.
    fn path(&self, p: PathBuf) -> PathBuf {
        self.cfg.path(&p)
    }

    #[getter]
    fn rounds(&self) -> u64 {
        self.cfg.run.rounds
    }

    #[getter]
    fn seed(&self) -> u64 {
        self.cfg.run.seed
    }

    /// The server's model directory (resolved).
    #[getter]
    fn server_model(&self) -> PathBuf {
        self.cfg.path(&self.cfg.server.model)
    }

    /// Client `index`'s model directory (resolved): `transfer.client_models[index mod len]` in
    /// heterogeneous runs, else the server's.
    fn client_model(&self, index: usize) -> PathBuf {
        match &self.cfg.transfer {
            Some(t) if !t.client_models.is_empty() => self.cfg.path(&t.client_models[index % t.client_models.len()]),
            _ => self.cfg.path(&self.cfg.server.model),
        }
    }
}

/// The data directory as the federated commands resolve it: `data_dir`, else
/// `$HETFED_DATA_DIR`, else `../shared/data` when it exists, else the per-user cache.
fn data_dir(given: Option<&Path>) -> hetfed_core::Result<hetfed_data::DataDir> {
    let env_set = std::env::var_os(hetfed_data::DATA_DIR_ENV).is_some_and(|v| !v.is_empty());
    let shared = Path::new("../shared/data");
    if given.is_none() && !env_set && shared.is_dir() {
        return Ok(hetfed_data::DataDir::new(shared));
    }
    Ok(hetfed_data::DataDir::resolve(given)?)
}

/// Client `index`'s private share of its task, exactly as `hetfed simulate` gives it to that
/// client: `{"client_id", "task", "model", "train": [(prompt, target)], "val": [...], "stats"}`
/// (`stats`: example and token counts, label histogram and entropy: what may leave the client).
#[pyfunction]
#[pyo3(signature = (config, index, data_dir = None))]
fn client_data<'py>(
    py: Python<'py>,
    config: &Config,
    index: usize,
    data_dir: Option<PathBuf>,
) -> PyResult<Bound<'py, PyAny>> {
    let cfg = &config.cfg;
    let model = config.client_model(index);
    let (data, ids) = py
        .detach(|| -> hetfed_core::Result<_> {
            let dir = self::data_dir(data_dir.as_deref())?;
            let ck = Checkpoint::load(&model)?;
            Ok((hetfed_fed::assemble::client_data(cfg, &dir, index, &ck)?, cfg.client_ids()))
        })
        .map_err(err)?;
    let pairs = |v: &[Example]| v.iter().map(|e| (e.prompt.clone(), e.target.clone())).collect::<Vec<_>>();
    let v = serde_json::json!({
        "client_id": ids.get(index), "task": data.task.name, "model": model,
        "train": pairs(&data.train), "val": pairs(&data.val), "stats": data.stats,
    });
    from_json(py, &v)
}

/// NumPy arrays (name → array) as f32 tensors.
fn tensors_from_numpy(py: Python<'_>, arrays: BTreeMap<String, Bound<'_, PyAny>>) -> PyResult<hetfed_core::TensorMap> {
    let np = py.import("numpy")?;
    let mut map = hetfed_core::TensorMap::new();
    for (name, a) in arrays {
        let a = np.call_method("ascontiguousarray", (a,), Some(&[("dtype", "<f4")].into_py_dict(py)?))?;
        let shape: Vec<usize> = a.getattr("shape")?.extract()?;
        let bytes: Vec<u8> = a.call_method0("tobytes")?.extract()?;
        let v: Vec<f32> = bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        map.insert(name, candle_core::Tensor::from_vec(v, shape, &candle_core::Device::Cpu).map_err(err)?);
    }
    Ok(map)
}

/// f32 tensors as NumPy arrays (name → array).
fn tensors_to_numpy<'py>(
    py: Python<'py>,
    tensors: &hetfed_core::TensorMap,
) -> PyResult<BTreeMap<String, Bound<'py, PyAny>>> {
    let np = py.import("numpy")?;
    let mut out = BTreeMap::new();
    for (name, t) in tensors {
        let v: Vec<f32> =
            t.to_dtype(DType::F32).and_then(|t| t.flatten_all()).and_then(|f| f.to_vec1::<f32>()).map_err(err)?;
        let le: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        let bytes = pyo3::types::PyBytes::new(py, &le);
        let arr = np.call_method1("frombuffer", (bytes, "<f4"))?.call_method1("reshape", (t.dims().to_vec(),))?;
        out.insert(name.clone(), arr.call_method0("copy")?);
    }
    Ok(out)
}

/// One round of client `index` of a run, exactly as hetfed's own client trains it
/// (`hetfed_fed::client::train_round` on `client_data`'s share, from the client's base model):
/// `fit` is the round's configuration (`Hetero.configure_fit`), `adapter` the LoRA factors to
/// continue from (`client.keep_adapter`: the previous round's, as returned here). Returns
/// `(task_vector, n_examples, metrics, adapter)`: the update as the server decodes it (after
/// `client.encoding`), hetfed's fit metrics (losses, `val_gain`, timings, local evaluation),
/// the trained factors to keep (None for full fine-tuning).
#[pyfunction]
#[pyo3(signature = (config, index, fit, adapter = None, data_dir = None))]
#[allow(clippy::type_complexity)]
fn train_round<'py>(
    py: Python<'py>,
    config: &Config,
    index: usize,
    fit: &Bound<'py, PyAny>,
    adapter: Option<BTreeMap<String, Bound<'py, PyAny>>>,
    data_dir: Option<PathBuf>,
) -> PyResult<(TaskVector, u64, Bound<'py, PyAny>, Option<BTreeMap<String, Bound<'py, PyAny>>>)> {
    let fit: hetfed_fed::FitConfig =
        serde_json::from_str(&to_json(py, fit)?).map_err(|e| PyValueError::new_err(format!("fit: {e}")))?;
    fit.validate().map_err(|e| PyValueError::new_err(format!("fit: {e}")))?;
    let adapter = adapter.map(|a| tensors_from_numpy(py, a)).transpose()?;
    let cfg = &config.cfg;
    let model = config.client_model(index);
    let (tv, upd) = py
        .detach(|| -> hetfed_core::Result<_> {
            let dir = self::data_dir(data_dir.as_deref())?;
            let base = Checkpoint::load(&model)?;
            let data = hetfed_fed::assemble::client_data(cfg, &dir, index, &base)?;
            let identity = base.identity()?;
            let opts = hetfed_fed::assemble::eval_options(cfg);
            let w = base.weights.clone();
            let upd = hetfed_fed::client::train_round(&base, w, &identity, &fit, &data, &opts, adapter.as_ref())?;
            let tv = hetfed_taskvec::TaskVector::from_bytes(&upd.bytes, Path::new("<update>"))?;
            let tv = FitResult::new("", upd.n_examples, Default::default(), tv)?.update;
            Ok((tv, upd))
        })
        .map_err(err)?;
    let adapter = upd.adapter.as_ref().map(|a| tensors_to_numpy(py, a)).transpose()?;
    Ok((TaskVector { tv }, upd.n_examples, from_json(py, &upd.metrics)?, adapter))
}

/// `(prompt, target)` pairs of a built-in task's split (`"train"`, `"dev"`, `"test"`), at most
/// `max_examples` of them (in file order): what the server may evaluate on with its own data.
#[pyfunction]
#[pyo3(signature = (task, split = "dev", max_examples = None, data_dir = None))]
fn task_examples(
    py: Python<'_>,
    task: &str,
    split: &str,
    max_examples: Option<usize>,
    data_dir: Option<PathBuf>,
) -> PyResult<Vec<(String, String)>> {
    let split: hetfed_data::Split =
        serde_json::from_value(serde_json::Value::String(split.to_string())).map_err(|_| {
            PyValueError::new_err(format!("split: expected \"train\", \"dev\" or \"test\", found {split:?}"))
        })?;
    py.detach(|| -> hetfed_core::Result<_> {
        let spec = hetfed_data::task::builtin(task)?;
        let mut examples = spec.load(&self::data_dir(data_dir.as_deref())?, split)?;
        if let Some(n) = max_examples.filter(|&n| n < examples.len()) {
            examples = examples.subset(&(0..n).collect::<Vec<_>>())?;
        }
        Ok(spec.to_prompt_target(&examples, None)?.into_iter().map(|p| (p.prompt, p.target)).collect())
    })
    .map_err(err)
}

/// One update handed to `Hetero.aggregate`: `(client_id, task vector, n_examples, metrics)`.
type Update<'py> = (String, PyRef<'py, TaskVector>, u64, Option<Bound<'py, PyAny>>);

struct HeteroState {
    strategy: hetfed_fed::hetero::Hetero,
    /// The server model's directory, architecture, tokenizer and config (its weights: `global`).
    large: ModelSpec,
    global: hetfed_core::TensorMap,
}

/// The heterogeneous strategy of a run (`hetfed_fed::hetero::Hetero`, as `hetfed simulate`
/// builds it from the config's `[transfer]` table: maps fitted or read from the cache, server
/// text for offset distillation) with the server's large model, which it updates in place.
#[pyclass(frozen, module = "hetfed")]
struct Hetero {
    state: Mutex<HeteroState>,
}

impl Hetero {
    fn lock(&self) -> std::sync::MutexGuard<'_, HeteroState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[pymethods]
impl Hetero {
    #[new]
    #[pyo3(signature = (config, data_dir = None))]
    fn new(py: Python<'_>, config: &Config, data_dir: Option<PathBuf>) -> PyResult<Self> {
        let cfg = &config.cfg;
        let t = cfg
            .transfer
            .as_ref()
            .ok_or_else(|| err("the config: expected a [transfer] table (a heterogeneous run), found none"))?;
        py.detach(|| -> hetfed_core::Result<Self> {
            let dir = self::data_dir(data_dir.as_deref())?;
            let large = Checkpoint::load(&cfg.path(&cfg.server.model))?;
            let strategy = hetfed_fed::assemble::build_hetero(cfg, t, &dir, &large)?;
            let Checkpoint { spec: large, weights: global } = large;
            Ok(Self { state: Mutex::new(HeteroState { strategy, large, global }) })
        })
        .map_err(err)
    }

    /// The aggregation's name (e.g. `"hetero_projection"`).
    #[getter]
    fn name(&self) -> &'static str {
        self.lock().strategy.name()
    }

    /// The clients that train in `round` (of `clients`, by id) and each one's training
    /// configuration (`epochs`, `lr`, `lora_rank`, `seed`, ...: the `[client]` table with the
    /// client's seed of this round). `stats` (client id → `client_data(...)["stats"]`) feed the
    /// aggregation weights (label entropy) as registration does in hetfed's own server.
    #[pyo3(signature = (round, clients, stats = None))]
    fn configure_fit<'py>(
        &self,
        py: Python<'py>,
        round: u64,
        clients: Vec<String>,
        stats: Option<BTreeMap<String, Bound<'py, PyAny>>>,
    ) -> PyResult<Vec<(String, Bound<'py, PyAny>)>> {
        let mut stats = stats.unwrap_or_default();
        let mut infos = Vec::with_capacity(clients.len());
        for id in clients {
            let st = match stats.remove(&id) {
                Some(s) => serde_json::from_str(&to_json(py, &s)?)
                    .map_err(|e| PyValueError::new_err(format!("stats[{id:?}]: {e}")))?,
                None => hetfed_net::DataStats::default(),
            };
            infos.push(hetfed_net::ClientInfo { client_id: id, stats: st, ..Default::default() });
        }
        let plan = self.lock().strategy.configure_fit(round, &infos);
        plan.into_iter().map(|(id, c)| Ok((id, from_json(py, &c)?))).collect()
    }

    /// Folds one round's updates into the server model: `updates` are `(client_id, task
    /// vector, n_examples, metrics)` (`metrics`: a dict of hetfed's fit metrics such as
    /// `val_gain`, or None), each task vector made from one of the config's small models.
    /// They are aggregated in client-id order, as hetfed's server reads them from its spool.
    /// Returns the report: `{"weights", "n_aggregated", "applied_norm", "details"}`.
    fn aggregate<'py>(&self, py: Python<'py>, round: u64, updates: Vec<Update<'py>>) -> PyResult<Bound<'py, PyAny>> {
        let mut results = Vec::with_capacity(updates.len());
        for (id, tv, n, metrics) in updates {
            let metrics: hetfed_net::FitMetrics = match metrics {
                Some(m) if !m.is_none() => serde_json::from_str(&to_json(py, &m)?)
                    .map_err(|e| PyValueError::new_err(format!("metrics of {id:?}: {e}")))?,
                _ => Default::default(),
            };
            results.push((id, n, metrics, tv.tv.clone()));
        }
        results.sort_by(|a, b| a.0.cmp(&b.0));
        if let Some(w) = results.windows(2).find(|w| w[0].0 == w[1].0) {
            return Err(PyValueError::new_err(format!("updates: expected one per client, found two of {:?}", w[0].0)));
        }
        let report = py
            .detach(|| {
                let mut st = self.lock();
                let HeteroState { strategy, global, .. } = &mut *st;
                let mut it = results.into_iter().map(|(id, n, m, tv)| FitResult::new(id, n, m, tv));
                strategy.aggregate_fit(round, global, &mut it, &[])
            })
            .map_err(err)?;
        from_json(py, &report)
    }

    /// The server model as it is now.
    fn model(&self, py: Python<'_>) -> PyResult<Model> {
        py.detach(|| {
            let st = self.lock();
            Model::from_checkpoint(st.large.with_weights(st.global.clone()))
        })
    }

    /// The server model's identity now (`weights_hash` changes with every aggregation).
    fn identity(&self, py: Python<'_>) -> PyResult<BTreeMap<&'static str, String>> {
        py.detach(|| {
            let st = self.lock();
            Ok(BTreeMap::from([
                ("arch", st.large.arch.model_type().to_string()),
                ("config_hash", st.large.arch.config_hash()),
                ("weights_hash", hetfed_core::tensor_map_hash(&st.global)?),
            ]))
        })
        .map_err(|e: hetfed_core::Error| err(e))
    }

    /// Writes the server model as an HF directory (config, tokenizer, f32 `model.safetensors`;
    /// a factored change is folded into its layers).
    fn save(&self, py: Python<'_>, dir: PathBuf) -> PyResult<()> {
        py.detach(|| {
            let st = self.lock();
            st.large.save_as(&hetfed_model::delta::merge(&st.global)?, &dir, DType::F32)
        })
        .map_err(err)
    }

    /// What the strategy records at the start of a run (its fitted maps: method, explained
    /// variance, seconds).
    fn run_info<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyAny>> {
        let v = self.lock().strategy.run_info();
        from_json(py, &v)
    }
}

#[pymodule]
fn hetfed(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("HetfedError", m.py().get_type::<HetfedError>())?;
    m.add_function(wrap_pyfunction!(bleu, m)?)?;
    m.add_function(wrap_pyfunction!(chrf, m)?)?;
    m.add_function(wrap_pyfunction!(rouge, m)?)?;
    m.add_function(wrap_pyfunction!(finetune, m)?)?;
    m.add_class::<Model>()?;
    m.add_class::<TaskVector>()?;
    m.add_class::<PairMaps>()?;
    m.add_class::<Config>()?;
    m.add_class::<Hetero>()?;
    m.add_function(wrap_pyfunction!(client_data, m)?)?;
    m.add_function(wrap_pyfunction!(task_examples, m)?)?;
    m.add_function(wrap_pyfunction!(train_round, m)?)?;
    Ok(())
}
