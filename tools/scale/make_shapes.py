#!/usr/bin/env python3
"""Writes random-weight checkpoints with the exact configurations of bigscience/bloom-560m and
bigscience/bloom-7b1, in float16, as Hugging Face directories hetfed and transformers load.

The weights are transformers' own initialisation of the config (no download: the configs are
written out below), so the files have the real shapes, dtypes and sizes (bloom-560m: 1.1 GB,
bloom-7b1: 14.1 GB) but no knowledge. They are for measuring speed and memory at real scale
(`hetfed bench --model DIR`, configs/scale/), never for quality. CI does not run this script.

The tokenizer is the project's embedded one (models/base-small/tokenizer.json, 8,192 ids), so
every id it produces is a valid row of the 250,880-row embedding.

    pip install torch transformers safetensors
    python tools/scale/make_shapes.py --out /tmp/shapes            # both
    python tools/scale/make_shapes.py --out /tmp/shapes --shape 560m

bloom-7b1 is built directly in float16 (about 14 GB of memory while it is written).
"""

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

# The published configs (bigscience/bloom-560m, bigscience/bloom-7b1), fields that shape the model.
SHAPES = {
    "560m": dict(vocab_size=250880, hidden_size=1024, n_layer=24, n_head=16),
    "7b1": dict(vocab_size=250880, hidden_size=4096, n_layer=30, n_head=32),
}
COMMON = dict(
    layer_norm_epsilon=1e-5, apply_residual_connection_post_layernorm=False, bos_token_id=1, eos_token_id=2,
    pad_token_id=3, hidden_dropout=0.0, attention_dropout=0.0, initializer_range=0.02, use_cache=True,
    tie_word_embeddings=True,
)


def write(name, out, seed):
    import torch
    from transformers import BloomConfig, BloomForCausalLM

    cfg = BloomConfig(**SHAPES[name], **COMMON)
    t0 = time.time()
    torch.manual_seed(seed)
    # Built in float16 from the start: bloom-7b1 in float32 would need 28 GB.
    torch.set_default_dtype(torch.float16)
    try:
        model = BloomForCausalLM(cfg)
    finally:
        torch.set_default_dtype(torch.float32)
    n = sum(p.numel() for p in model.parameters())
    target = out / f"bloom-{name}"
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target, safe_serialization=True, max_shard_size="5GB")
    shutil.copyfile(REPO / "models" / "base-small" / "tokenizer.json", target / "tokenizer.json")
    size = sum(f.stat().st_size for f in target.glob("*.safetensors"))
    print(json.dumps({"shape": f"bloom-{name}", "dir": str(target), "parameters": n, "bytes": size,
                      "seconds": round(time.time() - t0, 1)}))
    del model


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, type=Path, help="directory to write bloom-560m/ and bloom-7b1/ into")
    ap.add_argument("--shape", choices=["560m", "7b1", "both"], default="both")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    names = ["560m", "7b1"] if args.shape == "both" else [args.shape]
    for name in names:
        write(name, args.out, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
