"""Type stubs of `hetfed`, the Python bindings of hetfed (federated learning with heterogeneous
language models). Every error hetfed reports is a `HetfedError` carrying its one-line message; a
bad argument of this API is a `ValueError`. Calls that run a model release the GIL."""

from os import PathLike
from typing import Dict, List, Optional, Tuple, Union

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
) -> "TaskVector":
    """Fine-tunes the model on (prompt, target) pairs (loss on the targets) and returns the task
    vector: LoRA factors (`lora_rank` > 0, default modules) or the dense change (`lora_rank=0`)."""

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
        """`{"kind", "base", "num_params", "stored_values", "norm"}`."""
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
