#!/usr/bin/env python3
"""Writes models/<name>/MODEL_CARD.md from a pretraining run and the Ethos check.

    python3 tools/pair/model_card.py --name base-small --recipe configs/pretrain-small.toml \
        --run runs/base-small --ethos ethos-small.json [--other runs/base-large] --out models/base-small/MODEL_CARD.md

`--run` is the `hetfed pretrain --out` directory (summary.json, metrics.jsonl, model/config.json);
`--ethos` the last line of tools/pair/ethos_check.sh; `--other` the other model's run, for the
side-by-side perplexity table. Standard library only.
"""

import argparse
import re
import json
import pathlib

LANGS = {"en": "English", "hi": "Hindi", "bn": "Bengali", "ta": "Tamil", "te": "Telugu", "mr": "Marathi",
         "ur": "Urdu", "ml": "Malayalam", "as": "Assamese", "or": "Odia"}


def load_run(d: pathlib.Path):
    summary = json.loads((d / "summary.json").read_text())
    lines = [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines() if l.strip()]
    config = json.loads((d / "model" / "config.json").read_text())
    return summary, lines, config


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--name", required=True)
    ap.add_argument("--recipe", required=True, type=pathlib.Path)
    ap.add_argument("--run", required=True, type=pathlib.Path)
    ap.add_argument("--ethos", required=True, type=pathlib.Path)
    ap.add_argument("--other", type=pathlib.Path)
    ap.add_argument("--tokenizer-report", type=pathlib.Path,
                    help="the output of `hetfed tokenizer train --recipe` (its tokens/char table)")
    ap.add_argument("--out", required=True, type=pathlib.Path)
    a = ap.parse_args()
    summary, lines, config = load_run(a.run)
    steps = [l for l in lines if "loss" in l and "step" in l]
    evals = [l for l in lines if "held_out_ppl" in l]
    last = steps[-1]
    final_loss = sum(l["loss"] for l in steps[-50:]) / len(steps[-50:])
    wall = last["elapsed_s"]
    ethos = json.loads(a.ethos.read_text().strip().splitlines()[-1])
    other = None
    if a.other:
        other = load_run(a.other)
    ppl, uni = summary["held_out_ppl"], summary["unigram_ppl"]
    other_name = None
    if other:
        other_name = "base-large" if a.name == "base-small" else "base-small"

    o = []
    w = o.append
    w(f"# hetfed {a.name}\n")
    w(f"A BLOOM-architecture causal language model pretrained from scratch by hetfed's own code: one half of "
      f"hetfed's embedded small/large pair (clients run `base-small`, the server holds `base-large`; they share "
      f"one tokenizer and differ in width, depth and head count, like bloom-560m and bloom-7b1). A research "
      f"artefact for demonstrating federated learning on a laptop, not a useful language model.\n")
    w("| | |\n|---|---|")
    w(f"| architecture | BLOOM (ALiBi, LayerNorm, tanh-GELU MLP, tied embeddings) |")
    w(f"| hidden size / layers / heads | {config['hidden_size']} / {config['n_layer']} / {config['n_head']} |")
    w(f"| parameters | {summary['parameters']:,} |")
    w(f"| vocabulary | {config['vocab_size']} (byte-level BPE trained by `hetfed tokenizer train`, shared by the pair) |")
    w(f"| context | {summary.get('seq_len', 128)} tokens in training (ALiBi extrapolates) |")
    w(f"| weights | `model.safetensors` in float16; hetfed computes in float32 |")
    w(f"| training tokens seen | {summary['tokens_seen']:,} ({summary['steps']:,} steps × 16 sequences × 128 tokens) of a {summary['train_tokens']:,}-token corpus |")
    w(f"| wall time | {wall/60:.1f} min on a 2-core CPU (shared with other work during the run) |")
    w(f"| final training loss | {final_loss:.3f} (mean of the last 50 steps) |")
    w("")
    w("## Reproduce\n")
    w("```sh\ncargo build --release -p hetfed")
    w("target/release/hetfed tokenizer train --recipe configs/pretrain-small.toml --data-dir ../shared/data --vocab-size 8192 --out models/tokenizer.json")
    w(f"target/release/hetfed pretrain --config {a.recipe} --data-dir ../shared/data --out runs/{a.name}")
    w(f"# the model is runs/{a.name}/model/ (config.json, model.safetensors, tokenizer.json)\n```\n")
    w(f"The recipe is [`{a.recipe}`](../../{a.recipe}) (seed 0). The same seed and data give the same weights; "
      f"the loss curve of a re-run matches `runs/{a.name}/metrics.jsonl` step for step. Training: AdamW "
      f"(lr 2e-3, weight decay 0.01), 200 warmup steps then cosine decay, gradient clipping at 1.0, packed "
      f"shuffled sequences of 128 tokens separated by `</s>`.\n")
    w("## Data and licences\n")
    w("The corpus rule, enforced by the recipe code (`hetfed_train::pretrain::training_texts`): **mltext's text "
      "plus the *training* splits of the tasks; never dev or test text of any task.** FLORES-200 and TICO-19 "
      "have only dev/test here, so they are absent. The held-out perplexity below is on 200 lines per "
      "language of mltext that no training line (and not the tokenizer) saw.\n")
    w("| source | sequences of 128 tokens |\n|---|---|")
    for k, v in summary["sources"].items():
        w(f"| {k} | {v:,} |")
    w("")
    w("Licences (see each dataset's PROVENANCE.md in the shared data folder): mltext mixes Common Voice "
      "sentences (CC0), post-2012 Wikipedia (CC BY-SA), UD English-EWT (CC BY-SA 4.0), CLTK Wikisource "
      "(public domain / CC BY-SA) and L3Cube Marathi (CC BY-NC-SA 4.0); Ethos is GPL-3.0, Balanced-COPA MIT, "
      "SciTLDR Apache-2.0, XL-Sum CC BY-NC-SA 4.0, BBC News Summary and ILSUM are research datasets. "
      "Because non-commercial sources are in the mix, treat these weights as **research-only**.\n")
    w("## Held-out perplexity per language\n")
    hdr = f"| language | {a.name} |" + (f" {other_name} |" if other else "") + " unigram model |"
    w(hdr)
    w("|---|---|" + ("---|" if other else "") + "---|")
    for code in summary["held_out_ppl"]:
        row = f"| {LANGS.get(code, code)} ({code}) | {ppl[code]:.1f} |"
        if other:
            row += f" {other[0]['held_out_ppl'][code]:.1f} |"
        row += f" {uni[code]:.0f} |"
        w(row)
    w("\nThe unigram model is the training corpus's token frequencies (add-one smoothed) on the same "
      "held-out tokens. Perplexity is per token of the shared tokenizer, so languages are comparable "
      "across the two models but not with each other.\n")
    if len(evals) > 1:
        w("Held-out perplexity during training (every 250 steps):\n")
        codes = list(summary["held_out_ppl"])
        w("| step | " + " | ".join(codes) + " |")
        w("|---|" + "---|" * len(codes))
        for e in evals:
            w(f"| {e['step']} | " + " | ".join(f"{e['held_out_ppl'][c]:.1f}" for c in codes) + " |")
        w("")
    if a.tokenizer_report:
        rows = []
        for line in a.tokenizer_report.read_text().splitlines():
            m = re.match(r"\S*?([^/\s]+)\.txt\s+([0-9.]+)$", line.strip())
            if m:
                rows.append((m.group(1), m.group(2)))
        if rows:
            w("## Tokenizer coverage\n")
            w("Tokens per character of the shared tokenizer on each training source (lower is better; "
              "byte-level BPE never produces `<unk>`):\n")
            w("| source | tokens/char |\n|---|---|")
            for name, v in rows:
                w(f"| {name} | {v} |")
            w("")
    w("## Fine-tuning check: Ethos hate-speech classification\n")
    z, f = ethos["zero_shot"], ethos["finetuned"]
    w(f"LoRA (rank 8, alpha 16, lr 1e-3, 6 epochs, batch 16, 10 warmup steps, cosine) on the {ethos.get('n_train', 645)} examples of the "
      f"Ethos train split with `hetfed finetune`, evaluated with `hetfed eval` on the {ethos['n_examples']} "
      f"dev examples (label words ` no` / ` yes` scored by log-likelihood; majority class 57.3%):\n")
    w("| | accuracy | macro-F1 |\n|---|---|---|")
    w(f"| zero-shot | {z['accuracy']:.1f} | {z['macro_f1']:.1f} |")
    w(f"| fine-tuned | {f['accuracy']:.1f} | {f['macro_f1']:.1f} |")
    w(f"\nCommand: `tools/pair/ethos_check.sh models/{a.name} OUT_DIR` (needs a release build).\n")
    w("## Loading elsewhere\n")
    w("`transformers.AutoModelForCausalLM.from_pretrained(\"models/" + a.name + "\")` loads it; "
      "`python3 tools/parity/check_export.py --hetfed target/release/hetfed --only-models --model "
      f"{a.name}=models/{a.name}` checks that transformers and hetfed agree on it (log-probs within 1e-4), "
      "also after LoRA and full fine-tuning.\n")
    a.out.write_text("\n".join(o))


if __name__ == "__main__":
    main()
