"""Type stubs of `hetfed`, the Python bindings of hetfed (federated learning with heterogeneous
language models). Every error hetfed reports is a `HetfedError` carrying its one-line message; a
bad argument of this API is a `ValueError`. Calls that run a model release the GIL."""

from os import PathLike
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

__version__: str

_Path = Union[str, PathLike]

class HetfedError(Exception):
    """An error reported by hetfed (one line: what, where, what was found)."""

def bleu(hyps: List[str], refs: List[List[str]]) -> float:
    """Corpus BLEU as sacrebleu computes it; `refs[k][i]` is the k-th reference of `hyps[i]`. 0-100."""

def chrf(
    hyps: List[str], refs: List[List[str]], char_order: int = 6, word_order: int = 0, beta: int = 2
) -> float:
    """Corpus chrF (`word_order=0`) or chrF++ (`word_order=2`) as sacrebleu computes it. 0-100."""

def rouge(references: List[str], hypothesis: str, use_stemmer: bool = False) -> Dict[str, Dict[str, float]]:
    """ROUGE-1/2/L of one hypothesis against its references, as rouge-score computes them:
    `{"rouge1": {"precision", "recall", "fmeasure"}, "rouge2": ..., "rougeL": ...}`."""

def finetune(
    model: _Path,
    examples: List[Tuple[str, str]],
    lora_rank: int = 8,
    lr: float = 1e-3,
    epochs: int = 1,
    max_steps: Optional[int] = None,
    batch_size: int = 8,
    max_len: int = 256,
    seed: int = 0,
    lora_alpha: Optional[float] = None,
) -> "TaskVector":
    """Fine-tunes the model on (prompt, target) pairs (loss on the targets) and returns the task
    vector: LoRA factors (`lora_rank` > 0, default modules, scale `lora_alpha`, default twice the
    rank) or the dense change (`lora_rank=0`)."""

class TaskVector:
    """The change fine-tuning made to a base model (dense, or LoRA factors kept factored), tied to
    that base's identity."""

    @staticmethod
    def load(path: _Path) -> "TaskVector": ...
    @staticmethod
    def diff(base: _Path, finetuned: _Path) -> "TaskVector":
        """The dense task vector of a fine-tuned model directory against its base directory."""
    def save(self, path: _Path, dtype: str = "f32") -> None:
        """`dtype`: "f32", "f16" or "bf16"."""
    def info(self) -> Dict[str, object]:
        """`{"kind", "base", "num_params", "stored_values", "norm", "lora_rank", "lora_alpha"}`
        (the LoRA entries are None for a dense task vector)."""
    def to_numpy(self) -> Dict[str, "numpy.ndarray"]:
        """The stored tensors as float32 arrays (dense: parameter names; LoRA: `<module>.lora_A`
        `[rank, in]` and `<module>.lora_B` `[out, rank]`); `info()` has the base and kind."""
    @staticmethod
    def from_numpy(
        arrays: Dict[str, "numpy.ndarray"], base: Dict[str, str], kind: str = "full", lora_alpha: Optional[float] = None
    ) -> "TaskVector":
        """The inverse of `to_numpy`: `base` is the base's identity, `kind` "full" or "lora"."""
    def norm(self) -> float: ...
    def scale(self, lam: float) -> "TaskVector": ...
    def __add__(self, other: "TaskVector") -> "TaskVector": ...
    def __neg__(self) -> "TaskVector": ...
    def __mul__(self, lam: float) -> "TaskVector": ...
    def __rmul__(self, lam: float) -> "TaskVector": ...

class Model:
    """A Hugging Face causal LM directory (BLOOM or Llama), loaded in f32, optionally with a task
    vector added (`scale` times)."""

    def __init__(self, path: _Path, taskvec: Optional[TaskVector] = None, scale: float = 1.0) -> None: ...
    @property
    def model_type(self) -> str: ...
    @property
    def vocab_size(self) -> int: ...
    @property
    def context_length(self) -> int: ...
    def identity(self) -> Dict[str, str]:
        """`{"arch", "config_hash", "weights_hash"}`: what task vectors are checked against."""
    def tokenize(self, text: str) -> List[int]: ...
    def score(self, text: str) -> Tuple[List[int], List[float]]:
        """Token ids and the log-probability of every token after the first (`hetfed score --json`)."""
    def generate(self, prompt: str, max_new_tokens: int = 32) -> str:
        """Greedy continuation, decoded without special tokens (`hetfed generate`)."""

    def eval_task(
        self,
        task: str,
        split: str = "dev",
        limit: Optional[int] = None,
        data_dir: Optional[_Path] = None,
        batch_size: int = 16,
        max_new_tokens: int = 64,
        num_beams: int = 1,
        max_len: Optional[int] = None,
        length_normalise: Optional[bool] = None,
    ) -> Dict[str, float]:
        """The model on one task's split as `hetfed eval --json` measures it: the task's
        metrics and `target_nll`. `limit`: that many examples evenly spaced over the split."""

class PairMaps:
    """Maps between the hidden spaces of a small and a large model (BLOOM, one tokenizer),
    fitted layer by layer on calibration text; they move task vectors between the two models
    (`hetfed project`)."""

    @staticmethod
    def fit(
        small: _Path,
        large: _Path,
        method: str = "procrustes",
        calibration_sequences: int = 64,
        calibration_len: int = 32,
        seed: int = 0,
        texts: Optional[List[str]] = None,
        cache_dir: Optional[_Path] = None,
    ) -> "PairMaps":
        """Fits the maps `small` → `large`: `method` "procrustes", "ridge", "weight_space",
        "random" or "identity"; calibration sampled from the large model under `seed` (as
        `hetfed project` does: same arguments, same maps) or windows of `texts`. With
        `cache_dir`, reads maps fitted before for these models and settings, and saves new ones."""
    @staticmethod
    def load(path: _Path) -> "PairMaps":
        """Maps written by `save` (or an entry of hetfed's map cache): a directory, whose layers
        are read one at a time when projected."""
    def save(self, path: _Path) -> None:
        """Writes the maps as a directory: `pair.safetensors` and one file per large layer."""
    def project(self, taskvec: TaskVector) -> TaskVector:
        """A task vector of the small model moved into the large model (LoRA factors keep their
        rank)."""
    def project_back(self, taskvec: TaskVector) -> TaskVector:
        """A task vector of the large model moved into the small one (`hetfed project --reverse`)."""
    def info(self) -> Dict[str, Any]:
        """`{"small", "large", "method", "pairing", "summary"}`: identities, settings, fit summary."""

class Config:
    """A hetfed run configuration (the TOML of `hetfed simulate --config`); relative paths
    resolve against its directory (`base_dir`)."""

    @staticmethod
    def load(path: _Path) -> "Config": ...
    @staticmethod
    def from_toml(text: str, base_dir: _Path = ".") -> "Config": ...
    @staticmethod
    def from_dict(config: Dict[str, Any], base_dir: _Path = ".") -> "Config": ...
    @staticmethod
    def embedded_default() -> "Config":
        """`hetfed simulate`'s default run (paths relative to `configs/`)."""
    def to_dict(self) -> Dict[str, Any]: ...
    def client_ids(self) -> List[str]:
        """`["c0", "c1", ...]`."""
    def path(self, p: _Path) -> Path:
        """`p` resolved against the config's directory."""
    @property
    def rounds(self) -> int: ...
    @property
    def seed(self) -> int: ...
    @property
    def server_model(self) -> Path: ...
    def client_model(self, index: int) -> Path:
        """Client `index`'s base model directory."""

def client_data(config: Config, index: int, data_dir: Optional[_Path] = None) -> Dict[str, Any]:
    """Client `index`'s private share, as `hetfed simulate` gives it: `{"client_id", "task",
    "model", "train": [(prompt, target)], "val": [...], "stats"}`. `data_dir`: default
    `$HETFED_DATA_DIR`, else `../shared/data`, else the per-user cache."""

def task_examples(
    task: str, split: str = "dev", max_examples: Optional[int] = None, data_dir: Optional[_Path] = None
) -> List[Tuple[str, str]]:
    """(prompt, target) pairs of a built-in task's split ("train", "dev", "test")."""

def train_round(
    config: Config,
    index: int,
    fit: Dict[str, Any],
    adapter: Optional[Dict[str, "numpy.ndarray"]] = None,
    data_dir: Optional[_Path] = None,
) -> Tuple[TaskVector, int, Dict[str, Any], Optional[Dict[str, "numpy.ndarray"]]]:
    """One round of client `index` exactly as hetfed's own client trains it, under `fit` (from
    `Hetero.configure_fit`), continuing `adapter` when given. Returns the update (as the server
    decodes it after `client.encoding`), the example count, hetfed's fit metrics, and the LoRA
    factors to continue from next round."""

class Hetero:
    """hetfed's heterogeneous strategy (projection, distillation, logit offsets: the config's
    `[transfer]` table), built as `hetfed simulate` builds it, with the server's large model,
    which `aggregate` updates in place."""

    def __init__(self, config: Config, data_dir: Optional[_Path] = None) -> None: ...
    @property
    def name(self) -> str: ...
    def configure_fit(
        self, round: int, clients: List[str], stats: Optional[Dict[str, Dict[str, Any]]] = None
    ) -> List[Tuple[str, Dict[str, Any]]]:
        """The clients that train in `round` and each one's fit configuration (with its seed);
        `stats` (client id → `client_data(...)["stats"]`) feed the aggregation weights."""
    def aggregate(
        self, round: int, updates: List[Tuple[str, TaskVector, int, Optional[Dict[str, Any]]]]
    ) -> Dict[str, Any]:
        """Folds `(client_id, task_vector, n_examples, fit_metrics)` into the server model, in
        client-id order; returns `{"weights", "n_aggregated", "applied_norm", "details"}`."""
    def model(self) -> Model:
        """The server model as it is now."""
    def identity(self) -> Dict[str, str]:
        """The server model's identity now (its `weights_hash` changes with every aggregation)."""
    def save(self, dir: _Path) -> None:
        """Writes the server model as an HF directory (config, tokenizer, f32 weights)."""
    def run_info(self) -> Dict[str, Any]:
        """The fitted maps (method, explained variance, seconds)."""
