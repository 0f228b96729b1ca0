#!/usr/bin/env python3
"""PyTorch reference throughput for the BLOOM benchmark shape.

Usage::

    pip install torch transformers
    python benches/torch_reference.py [--threads 2] [--steps 10]

Model: `transformers.BloomForCausalLM`, vocab 8192, hidden 256, 4 layers, 4 heads,
float32, random init (seed 0), on CPU. Batch 8 x sequence 128 of random token ids
(fixed seed).

After 2 warm-up steps it measures
  (a) training tokens/s: forward + LM loss (labels=input_ids) + backward + AdamW step
      (lr 1e-4), over --steps steps;
  (b) inference tokens/s: forward only under torch.no_grad() on the same batch,
      over --steps iterations.

Prints exactly one JSON line:
  {"impl":"pytorch","torch":...,"threads":2,"train_tokens_per_s":x,"infer_tokens_per_s":y}
"""

import argparse
import json
import logging
import time

import torch

VOCAB, HIDDEN, LAYERS, HEADS = 8192, 256, 4, 4
BATCH, SEQ = 8, 128
WARMUP = 2


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    import transformers
    from transformers import BloomConfig, BloomForCausalLM

    transformers.logging.set_verbosity_error()
    logging.disable(logging.WARNING)

    torch.manual_seed(0)
    cfg = BloomConfig(vocab_size=VOCAB, hidden_size=HIDDEN, n_layer=LAYERS, n_head=HEADS,
                      hidden_dropout=0.0, attention_dropout=0.0, use_cache=False)
    model = BloomForCausalLM(cfg).to(torch.float32)
    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = BATCH * SEQ

    def train_step():
        opt.zero_grad(set_to_none=True)
        out = model(input_ids=ids, labels=ids, use_cache=False)
        out.loss.backward()
        opt.step()

    model.train()
    for _ in range(WARMUP):
        train_step()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        train_step()
    train_tps = tokens * args.steps / (time.perf_counter() - t0)

    model.eval()
    with torch.no_grad():
        for _ in range(WARMUP):
            model(input_ids=ids, use_cache=False)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            model(input_ids=ids, use_cache=False)
        infer_tps = tokens * args.steps / (time.perf_counter() - t0)

    print(json.dumps({
        "impl": "pytorch",
        "torch": torch.__version__,
        "threads": args.threads,
        "train_tokens_per_s": round(train_tps, 1),
        "infer_tokens_per_s": round(infer_tps, 1),
    }, separators=(",", ":")))


if __name__ == "__main__":
    main()
