//! `import hetfed`: Python bindings of hetfed's models, scoring, generation, task vectors and
//! metrics (PyO3, stable ABI from Python 3.9). Built by maturin (`pip install ./crates/hetfed-py`).
//!
//! Every Rust error becomes one `hetfed.HetfedError` carrying the same one-line message; a bad
//! argument of the Python API (a negative size, an unknown dtype) is a `ValueError`. Calls that
//! run a model release the GIL.

use std::collections::BTreeMap;
use std::path::PathBuf;

use candle_core::DType;
use pyo3::create_exception;
use pyo3::exceptions::{PyException, PyValueError};
use pyo3::prelude::*;
use pyo3::types::IntoPyDict;

use hetfed_model::generate::{generate, SamplingConfig};
use hetfed_model::{CausalLm, Checkpoint, LoraConfig};
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
#[pyclass(frozen)]
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
}

/// A task vector: the change fine-tuning made to a base model (dense, or LoRA factors kept
/// factored), tied to that base's identity.
#[pyclass(frozen)]
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

    /// `{"kind", "base", "num_params", "stored_values", "norm"}`: dense or LoRA, the base's
    /// identity, the parameters it changes, the numbers it stores, its global L2 norm.
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
/// and returns the task vector: LoRA factors of rank `lora_rank` on the architecture's default
/// modules, or the dense change when `lora_rank` is 0. What `hetfed finetune` does, without files.
#[pyfunction]
#[pyo3(signature = (model, examples, lora_rank = 8, lr = 1e-3, epochs = 1, max_steps = None, batch_size = 8, max_len = 256, seed = 0))]
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
                alpha: 2.0 * lora_rank as f64,
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
    Ok(())
}
