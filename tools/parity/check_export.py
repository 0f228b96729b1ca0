#!/usr/bin/env python3
"""Check that hetfed's exports load in the reference libraries and give the same log-probs.

Usage (not run by CI; needs torch, transformers, peft, tokenizers)::

    cargo build --release -p hetfed
    python tools/parity/check_export.py --hetfed target/release/hetfed [--shared ../shared] [--keep DIR]

Working in a temporary directory, it writes a small JSONL of prompt/target pairs and, for each
base model (the ``bloom_h3`` and ``llama_gqa`` fixtures of ``crates/hetfed-model/tests/fixtures``
and, if present, ``<shared>/models/tinystories-656k``):

* LoRA: ``hetfed finetune --lora-rank 4 --epochs 2 --lr 1e-2 --seed 1 --export-model`` -> O1;
  * ``lora/peft``: ``hetfed score --model BASE --adapter O1/adapter`` vs
    ``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), O1/adapter)``;
  * ``lora/merged``: ``AutoModelForCausalLM.from_pretrained(O1/model)`` vs the same hetfed score;
  * ``lora/taskvec``: ``hetfed score --taskvec O1/taskvec.safetensors`` vs the PEFT model;
* full: ``hetfed finetune --epochs 1 --lr 1e-3 --seed 1`` -> O2;
  * ``full/hf``: ``hetfed score --model O2/model`` vs ``AutoModelForCausalLM.from_pretrained(O2/model)``.

The reference side runs in float32 on the token ids hetfed reports (which are also checked
against ``tokenizers``' own encoding). Every comparison must stay below ``--tol`` (1e-4), and
every fine-tuned model must move the log-probs away from the base's by more than 1e-3 (else the
check would be vacuous). Loading problems (missing/unexpected keys, adapter tensors that did not
land on a LoRA parameter) fail the check too. Exit status 0 only if everything passed.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer

import transformers
from transformers import AutoModelForCausalLM

REPO = pathlib.Path(__file__).resolve().parents[2]
FIXTURES = REPO / "crates" / "hetfed-model" / "tests" / "fixtures"

MOVE_MIN = 1e-3  # a fine-tuned model must change some log-prob by more than this

STORIES = [
    ("The dog found its lost ball in the garden.", "happy"),
    ("The little bird could not find its nest.", "sad"),
    ("Tom got a new red bike for his birthday.", "happy"),
    ("The ice cream fell on the ground.", "sad"),
    ("Lily and her mom baked cookies together.", "happy"),
    ("The cat was left alone in the rain.", "sad"),
    ("Ben won the race at school.", "happy"),
    ("The toy boat broke into pieces.", "sad"),
    ("The sun came out and everyone played outside.", "happy"),
    ("Sara lost her favourite doll at the park.", "sad"),
    ("Grandpa told a funny story and they laughed.", "happy"),
    ("The flowers died because nobody watered them.", "sad"),
    ("The puppy learned a new trick.", "happy"),
    ("Max was sick and could not go to the party.", "sad"),
    ("They found a shiny shell on the beach.", "happy"),
    ("The kite got stuck in a tall tree.", "sad"),
    ("Mia made a new friend at school.", "happy"),
    ("The rain ruined the picnic.", "sad"),
    ("Dad brought home a big cake.", "happy"),
    ("The old tree fell down in the storm.", "sad"),
    ("The frog jumped into the pond with a splash.", "happy"),
    ("Nobody came to play with the lonely bear.", "sad"),
    ("The kids built a big sandcastle.", "happy"),
    ("The balloon flew away into the sky.", "sad"),
]
TEXTS = [
    "Story: The girl shared her apple with a friend.\nEnding: happy",
    "Once upon a time, there was a little girl named Lily. She loved to play outside.",
]


def run(cmd: list[str], log: pathlib.Path | None = None) -> str:
    p = subprocess.run([str(c) for c in cmd], capture_output=True, text=True)
    if log is not None:
        log.write_text(p.stdout + p.stderr)
    if p.returncode != 0:
        raise RuntimeError(f"command failed ({p.returncode}): {' '.join(map(str, cmd))}\n{p.stderr[-4000:]}")
    return p.stdout


class Checker:
    def __init__(self, hetfed: pathlib.Path, work: pathlib.Path, tol: float):
        self.hetfed, self.work, self.tol = hetfed, work, tol
        self.rows: list[tuple] = []
        self.problems: list[str] = []

    # ---- hetfed side
    def score(self, model: pathlib.Path, text: str, *extra) -> tuple[list[int], torch.Tensor]:
        out = run([self.hetfed, "score", "--model", model, "--text", text, "--json", *extra])
        r = json.loads(out)
        ids, lps = r["tokens"], r["logprobs"]
        if len(lps) != len(ids) - 1:
            self.problems.append(f"hetfed score {model} {extra}: {len(ids)} tokens but {len(lps)} log-probs")
        return ids, torch.tensor(lps, dtype=torch.float64)

    def scores(self, model, *extra):
        return [self.score(model, t, *extra) for t in TEXTS]

    # ---- reference side
    @staticmethod
    def ref_logprobs(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, :-1]
        lp = torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)
        return lp.double()

    def load_hf(self, d: pathlib.Path, what: str) -> torch.nn.Module:
        model, info = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32, output_loading_info=True)
        bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
        if bad:
            self.problems.append(f"{what}: transformers loading {d.name}: {bad}")
        return model.eval()

    def load_peft(self, base: pathlib.Path, adapter: pathlib.Path, what: str) -> torch.nn.Module:
        import peft

        model = peft.PeftModel.from_pretrained(self.load_hf(base, what), str(adapter)).eval()
        # every stored factor must have landed on a LoRA parameter of the model
        sd = model.state_dict()
        saved = load_file(str(adapter / "adapter_model.safetensors"))
        lora_params = {k for k in sd if ".lora_A." in k or ".lora_B." in k}
        landed = set()
        for k, v in saved.items():
            mk = k.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight")
            if mk not in sd:
                self.problems.append(f"{what}: adapter tensor {k} matches no PEFT parameter (looked for {mk})")
            elif not torch.equal(sd[mk].float(), v.float()):
                self.problems.append(f"{what}: adapter tensor {k} was not loaded verbatim")
            else:
                landed.add(mk)
        if lora_params - landed:
            self.problems.append(f"{what}: PEFT LoRA parameters without a stored value: {sorted(lora_params - landed)[:6]}")
        cfg = model.peft_config["default"]
        scale = cfg.lora_alpha / cfg.r
        print(f"    peft: r={cfg.r} alpha={cfg.lora_alpha} (scale {scale:g}) targets={sorted(cfg.target_modules)} "
              f"{len(saved)} tensors")
        return model

    # ---- comparison
    def compare(self, base_name: str, what: str, hetfed_scores, ref_model, tok: Tokenizer | None, base_scores=None):
        diff, moved = 0.0, float("nan")
        for (ids, h), text in zip(hetfed_scores, TEXTS):
            if tok is not None:
                want = tok.encode(text, add_special_tokens=True).ids
                if want != ids:
                    self.problems.append(f"{base_name} {what}: hetfed tokens {ids} != tokenizers {want}")
            diff = max(diff, (h - self.ref_logprobs(ref_model, ids)).abs().max().item())
        if base_scores is not None:
            moved = max((h - b).abs().max().item() for (_, h), (_, b) in zip(hetfed_scores, base_scores))
        ok = diff < self.tol and (base_scores is None or moved > MOVE_MIN)
        if base_scores is not None and not moved > MOVE_MIN:
            self.problems.append(f"{base_name} {what}: fine-tuning moved the log-probs by only {moved:.2e} "
                                 f"(<= {MOVE_MIN:g}): the comparison is vacuous")
        if not diff < self.tol:
            self.problems.append(f"{base_name} {what}: max |hetfed - reference| = {diff:.3e} >= {self.tol:g}")
        self.rows.append((base_name, what, sum(len(i) for i, _ in hetfed_scores), diff, moved, "ok" if ok else "FAIL"))

    def check_base(self, name: str, base: pathlib.Path, train: pathlib.Path):
        print(f"== {name}")
        tokp = base / "tokenizer.json"
        tok = Tokenizer.from_file(str(tokp)) if tokp.exists() else None
        base_scores = self.scores(base)

        # base model itself (sanity: if this fails, nothing below means anything)
        self.compare(name, "base/hf", base_scores, self.load_hf(base, f"{name} base"), tok)

        o1 = self.work / f"{name}_lora"
        run([self.hetfed, "finetune", "--model", base, "--train", train, "--out", o1, "--lora-rank", "4",
             "--epochs", "2", "--lr", "1e-2", "--seed", "1", "--export-model"], self.work / f"{name}_lora.log")
        print(f"    lora files: {sorted(p.name for p in (o1 / 'adapter').iterdir())}, "
              f"model/: {sorted(p.name for p in (o1 / 'model').iterdir()) if (o1 / 'model').exists() else 'MISSING'}")
        adapter_scores = self.scores(base, "--adapter", o1 / "adapter")
        pm = self.load_peft(base, o1 / "adapter", f"{name} lora/peft")
        self.compare(name, "lora/peft", adapter_scores, pm, tok, base_scores)
        self.compare(name, "lora/taskvec", self.scores(base, "--taskvec", o1 / "taskvec.safetensors"), pm, tok,
                     base_scores)
        if (o1 / "model").exists():
            merged = self.load_hf(o1 / "model", f"{name} lora/merged")
            self.compare(name, "lora/merged", adapter_scores, merged, tok, base_scores)
            self.compare(name, "lora/merged-hetfed", self.scores(o1 / "model"), merged, tok, base_scores)
        else:
            self.problems.append(f"{name}: --export-model wrote no {o1 / 'model'}")

        o2 = self.work / f"{name}_full"
        run([self.hetfed, "finetune", "--model", base, "--train", train, "--out", o2, "--epochs", "1",
             "--lr", "1e-3", "--seed", "1"], self.work / f"{name}_full.log")
        if (o2 / "model").exists():
            print(f"    full files: {sorted(p.name for p in (o2 / 'model').iterdir())}")
            self.compare(name, "full/hf", self.scores(o2 / "model"), self.load_hf(o2 / "model", f"{name} full"),
                         tok, base_scores)
        else:
            self.problems.append(f"{name}: full fine-tuning wrote no {o2 / 'model'}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hetfed", type=pathlib.Path, required=True, help="the hetfed binary")
    ap.add_argument("--shared", type=pathlib.Path, default=REPO.parent / "shared",
                    help="shared folder holding models/tinystories-656k (default: <repo>/../shared)")
    ap.add_argument("--keep", type=pathlib.Path, help="work in this directory and keep it (default: a temporary one)")
    ap.add_argument("--tol", type=float, default=1e-4, help="max allowed |log-prob difference| (default 1e-4)")
    ap.add_argument("--model", action="append", default=[], metavar="NAME=DIR",
                    help="check this model directory too (repeatable), e.g. base-small=models/base-small")
    ap.add_argument("--only-models", action="store_true", help="check only the --model directories, not the fixtures")
    args = ap.parse_args()

    torch.manual_seed(0)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    hetfed = args.hetfed.resolve()
    bases = [("bloom_h3", FIXTURES / "bloom_h3"), ("llama_gqa", FIXTURES / "llama_gqa")]
    ts = args.shared.resolve() / "models" / "tinystories-656k"
    if (ts / "model.safetensors").exists():
        bases.append(("tinystories-656k", ts))
    else:
        print(f"[skip] {ts} not found")
    if args.only_models:
        bases = []
    for m in args.model:
        name, _, d = m.partition("=")
        if not d:
            ap.error(f"--model: expected NAME=DIR, found {m!r}")
        bases.append((name, pathlib.Path(d).resolve()))

    with tempfile.TemporaryDirectory(prefix="hetfed-check-export-") as tmp:
        work = args.keep.resolve() if args.keep else pathlib.Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        train = work / "train.jsonl"
        train.write_text("".join(json.dumps({"prompt": f"Story: {s}\nEnding:", "target": f" {e}"}) + "\n"
                                 for s, e in STORIES))
        c = Checker(hetfed, work, args.tol)
        for name, base in bases:
            try:
                c.check_base(name, base, train)
            except Exception as e:  # keep going: report everything at the end
                c.problems.append(f"{name}: {type(e).__name__}: {e}")

    print(f"\n{'base':>17} {'comparison':>19} {'tokens':>6} {'max|dlp|':>10} {'vs base':>10}")
    for r in c.rows:
        print(f"{r[0]:>17} {r[1]:>19} {r[2]:>6} {r[3]:>10.2e} {r[4]:>10.2e} {r[5]:>5}")
    print(f"max|dlp| = max |hetfed score - reference (float32)| over {len(TEXTS)} texts (tolerance {args.tol:g});\n"
          f"vs base = max |hetfed log-prob - base model's| (must exceed {MOVE_MIN:g}).\n"
          "  base/hf: hetfed vs transformers on the base model; lora/peft: hetfed --adapter vs PeftModel;\n"
          "  lora/taskvec: hetfed --taskvec vs PeftModel; lora/merged: hetfed --adapter vs transformers on the\n"
          "  --export-model dir; lora/merged-hetfed: hetfed vs transformers, both on that dir;\n"
          "  full/hf: hetfed vs transformers on the full fine-tune's model dir.")
    if c.problems:
        print("\nPROBLEMS:", *c.problems, sep="\n  ", file=sys.stderr)
        sys.exit(1)
    print("\nall checks passed")


if __name__ == "__main__":
    main()
