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

With ``--model DIR`` (what ``hetfed bench --model DIR`` runs; needs ``peft`` too) it loads that
Hugging Face directory in float32 instead and measures LoRA training (rank --lora-rank, alpha
twice the rank, dropout 0, on the projections hetfed adapts by default, AdamW lr 1e-4 on the
adapters) and scoring (log-probabilities of each next token under torch.no_grad()) on a random
batch of --batch x --seq ids, plus the process's peak resident memory:
  {"train_tokens_per_s":x,"infer_tokens_per_s":y,"peak_rss_bytes":n}
"""

import argparse
import json
import logging
import time

import torch

VOCAB, HIDDEN, LAYERS, HEADS = 8192, 256, 4, 4
BATCH, SEQ = 8, 128
WARMUP = 2


def tokens_per_s(step, tokens, steps):
    """`step()` WARMUP times, then `steps` timed calls: tokens per second."""
    for _ in range(WARMUP):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return tokens * steps / (time.perf_counter() - t0)


# hetfed's default LoRA targets per model type (`default_lora_targets` in hetfed-model).
LORA_TARGETS = {
    "bloom": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


def bench_model(args):
    import resource

    import transformers
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    transformers.logging.set_verbosity_error()
    logging.disable(logging.WARNING)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(args.model, torch_dtype=torch.float32)
    targets = LORA_TARGETS[model.config.model_type]
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank,
                                             lora_dropout=0.0, target_modules=targets))
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=g)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    tokens = args.batch * args.seq

    def train_step():
        opt.zero_grad(set_to_none=True)
        out = model(input_ids=ids, labels=ids, use_cache=False)
        out.loss.backward()
        opt.step()

    model.train()
    train_tps = tokens_per_s(train_step, tokens, args.steps)
    opt.zero_grad(set_to_none=True)

    def score():
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
        return torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None])

    model.eval()
    with torch.no_grad():
        infer_tps = tokens_per_s(score, tokens, args.steps)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"train_tokens_per_s": round(train_tps, 2), "infer_tokens_per_s": round(infer_tps, 2),
                      "peak_rss_bytes": peak}, separators=(",", ":")))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--model", help="a Hugging Face model directory (LoRA training and scoring)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--lora-rank", type=int, default=8)
    ap.add_argument("--gradient-checkpointing", action="store_true",
                    help="recompute each block's activations in the backward pass (--model only)")
    args = ap.parse_args()
    if args.model:
        torch.set_num_threads(args.threads)
        bench_model(args)
        return

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
    train_tps = tokens_per_s(train_step, tokens, args.steps)

    model.eval()
    with torch.no_grad():
        infer_tps = tokens_per_s(lambda: model(input_ids=ids, use_cache=False), tokens, args.steps)

    print(json.dumps({
        "impl": "pytorch",
        "torch": torch.__version__,
        "threads": args.threads,
        "train_tokens_per_s": round(train_tps, 1),
        "infer_tokens_per_s": round(infer_tps, 1),
    }, separators=(",", ":")))


if __name__ == "__main__":
    main()
