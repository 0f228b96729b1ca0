#!/usr/bin/env python3
"""Generate the parity fixtures used by the `hetfed-model` tests.

Usage (from anywhere; paths are resolved from this file's location)::

    pip install torch transformers safetensors tokenizers peft
    python tools/parity/make_fixtures.py [--shared DIR] [--no-verify]

What it writes (under ``crates/hetfed-model/tests/fixtures/``):

* one directory per tiny random model (``bloom_h3``, ``bloom_h6_noprefix``,
  ``bloom_h8_f16``, ``llama_gqa``, ``llama_tied``), each holding
  ``config.json``, ``model.safetensors``, ``tokenizer.json`` and
  ``golden.safetensors`` (inputs, per-token log-probs, loss and the gradient
  of the loss w.r.t. every parameter, all computed by ``transformers`` in
  float64 and stored as float32);
* ``<variant>/score_golden.json``: ``{"text", "tokens", "logprobs"}`` for the fixed mixed
  English/Hindi text ``SCORE_TEXT``: the fixture tokenizer's encoding (special tokens added)
  and ``logprobs[i] = log P(tokens[i+1] | tokens[..=i])`` computed by ``transformers`` in
  float64 from the saved checkpoint (for an end-to-end check of ``hetfed score --json``);
* ``tinystories_golden.safetensors``: the same kind of golden for the real
  pretrained model in ``<shared>/models/tinystories-656k`` (only the derived
  numbers are written; no file of the shared folder is copied). ``--shared``
  defaults to ``<repo>/../shared``; if the model is missing that part is
  skipped with a message.

And under ``crates/hetfed/tests/fixtures/`` (needs ``peft``):

* ``bloom_h3_peft`` and ``llama_gqa_peft``: LoRA adapters made by ``peft`` (r 4, alpha 8,
  dropout 0) for the ``bloom_h3`` / ``llama_gqa`` fixtures, with random non-zero factors,
  written by ``PeftModel.save_pretrained`` (``adapter_config.json``,
  ``adapter_model.safetensors``), plus ``score_golden.json`` for ``SCORE_TEXT`` computed by the
  PEFT model in float64 (for ``hetfed score --model <base> --adapter <dir>``).

Everything is deterministic (fixed seeds). After generating, the script
re-loads every checkpoint with ``AutoModelForCausalLM.from_pretrained`` and
checks it reproduces the goldens, cross-checks the goldens against an
independent float64 re-implementation written in plain torch, and checks that
a float32 forward/backward meets the tolerance contract (see the fixtures
README). ``--no-verify`` skips those checks.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import pathlib
import shutil
import sys

# Nothing here needs the network; this also stops `peft` from looking the (placeholder) base
# model name up on the Hub when saving an adapter.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

import transformers
from transformers import (
    AutoModelForCausalLM,
    BloomConfig,
    LlamaConfig,
)

REPO = pathlib.Path(__file__).resolve().parents[2]
FIXTURES = REPO / "crates" / "hetfed-model" / "tests" / "fixtures"
CLI_FIXTURES = REPO / "crates" / "hetfed" / "tests" / "fixtures"

VOCAB = 300
SEQ_T = 14  # length of the long sequence; the short one has SEQ_T - 5 real tokens
SHORT_BY = 5
# Text of the score goldens (21 tokens with the fixture tokenizer, BOS included).
SCORE_TEXT = "Rain in Delhi: बारिश है।"
TINYSTORIES_TEXT = "Once upon a time, there was a little girl named Lily. She loved to play outside."

# Tolerance contract (also documented in fixtures/README.md).
LOGPROB_ABS_TOL = 1e-4
GRAD_REL_TOL = 1e-3

# Special tokens, in id order: <unk>=0, <s>=1 (BOS), </s>=2 (EOS), <pad>=3.
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]
UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3

SENTENCES = [
    "The farmer checked the weather before sowing the wheat.",
    "किसान ने गेहूं बोने से पहले मौसम देखा।",
    "Rain is expected in the northern districts this week.",
    "इस सप्ताह उत्तरी जिलों में बारिश की संभावना है।",
    "The clinic opens at nine in the morning.",
    "क्लिनिक सुबह नौ बजे खुलता है।",
    "Please drink clean water and wash your hands.",
    "कृपया साफ पानी पिएं और अपने हाथ धोएं।",
    "The teacher read a story to the children.",
    "शिक्षक ने बच्चों को एक कहानी सुनाई।",
    "My phone battery is almost empty.",
    "मेरे फोन की बैटरी लगभग खत्म हो गई है।",
    "The bus to Delhi leaves from platform two.",
    "दिल्ली की बस प्लेटफॉर्म दो से जाती है।",
    "We planted tomatoes, onions and chillies in the garden.",
    "हमने बगीचे में टमाटर, प्याज और मिर्च लगाए।",
    "Market prices for rice went up again today.",
    "आज फिर चावल के बाजार भाव बढ़ गए।",
    "She sends money to her family every month.",
    "वह हर महीने अपने परिवार को पैसे भेजती है।",
    "The river is high after the monsoon rains.",
    "मानसून की बारिश के बाद नदी का पानी बढ़ गया है।",
    "Children should get their vaccines on time.",
    "बच्चों को समय पर टीके लगवाने चाहिए।",
    "Mix English and हिंदी in one sentence, it is common.",
    "मैं office जा रहा हूँ, meeting दस बजे है।",
    "Federated learning keeps the data on the device.",
    "संघीय शिक्षण में डेटा डिवाइस पर ही रहता है।",
    "Small models can still learn useful patterns.",
    "छोटे मॉडल भी उपयोगी पैटर्न सीख सकते हैं।",
    "Numbers like 42, 1000 and 3.14 appear in text too.",
    "नमस्ते! आप कैसे हैं? मैं ठीक हूँ, धन्यवाद।",
]


# --------------------------------------------------------------------------------------
# tokenizer


def build_tokenizer(vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(SENTENCES, trainer=trainer)
    for i, s in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(s) == i, (s, tok.token_to_id(s))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A",
        pair="<s> $A $B:1",
        special_tokens=[("<s>", BOS_ID)],
    )
    assert tok.get_vocab_size() <= vocab_size
    return tok


# --------------------------------------------------------------------------------------
# variants


def bloom_config(hidden: int, n_head: int, n_layer: int) -> BloomConfig:
    cfg = BloomConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        n_head=n_head,
        n_layer=n_layer,
        layer_norm_epsilon=1e-5,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tie_word_embeddings=True,
    )
    cfg.architectures = ["BloomForCausalLM"]
    return cfg


def llama_config(n_kv: int, tied: bool) -> LlamaConfig:
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=n_kv,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        tie_word_embeddings=tied,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        # pad_token_id deliberately left unset: LlamaModel would pass it to nn.Embedding as
        # padding_idx, which zeroes that row's lookup gradient (an HF quirk we don't want to test).
        pad_token_id=None,
    )
    cfg.architectures = ["LlamaForCausalLM"]
    return cfg


VARIANTS = [
    # name, config factory, seed, key prefix stripped?, storage dtype, pad id used in inputs
    dict(name="bloom_h3", cfg=lambda: bloom_config(24, 3, 2), seed=1, strip=False, dtype=torch.float32, pad=PAD_ID),
    dict(name="bloom_h6_noprefix", cfg=lambda: bloom_config(48, 6, 3), seed=2, strip=True, dtype=torch.float32, pad=PAD_ID),
    dict(name="bloom_h8_f16", cfg=lambda: bloom_config(64, 8, 2), seed=3, strip=False, dtype=torch.float16, pad=PAD_ID),
    dict(name="llama_gqa", cfg=lambda: llama_config(2, tied=False), seed=4, strip=False, dtype=torch.float32, pad=0),
    dict(name="llama_tied", cfg=lambda: llama_config(4, tied=True), seed=5, strip=False, dtype=torch.float32, pad=0),
]


def reinit_(model: torch.nn.Module, seed: int) -> None:
    """Re-initialise with large-ish random values so attention/ALiBi/RoPE matter."""
    g = torch.Generator().manual_seed(seed)

    def normal(shape, std, mean=0.0):
        return torch.randn(shape, generator=g, dtype=torch.float64).mul_(std).add_(mean).to(torch.float32)

    with torch.no_grad():
        for name, p in model.named_parameters():  # deduplicated: tied weights appear once
            owner = model.get_submodule(name.rsplit(".", 1)[0])
            leaf = name.rsplit(".", 1)[1]
            is_norm = isinstance(owner, torch.nn.LayerNorm) or type(owner).__name__.endswith("RMSNorm")
            if is_norm and leaf == "weight":
                p.copy_(normal(p.shape, 0.1, 1.0))
            elif leaf == "bias":
                p.copy_(normal(p.shape, 0.1))
            elif leaf == "weight":
                p.copy_(normal(p.shape, 0.3))
            else:
                raise RuntimeError(f"unexpected parameter {name}")


def make_inputs(seed: int, pad_id: int):
    g = torch.Generator().manual_seed(1000 + seed)
    ids = torch.randint(0, VOCAB, (2, SEQ_T), generator=g, dtype=torch.int64)
    mask = torch.ones(2, SEQ_T, dtype=torch.int64)
    mask[1, SEQ_T - SHORT_BY:] = 0
    ids[1, SEQ_T - SHORT_BY:] = pad_id
    return ids, mask


# --------------------------------------------------------------------------------------
# goldens


def logprobs_and_loss(logits: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor):
    lp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    valid = mask[:, 1:].bool()
    lp = torch.where(valid, lp, torch.zeros_like(lp))
    loss = -lp.sum() / valid.sum()
    return lp, loss


def golden_from_model(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor | None):
    """Forward + backward in whatever dtype `model` is in. Returns (logprobs, loss, {name: grad})."""
    model.eval()
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, attention_mask=mask, use_cache=False)
    m = mask if mask is not None else torch.ones_like(ids)
    lp, loss = logprobs_and_loss(out.logits, ids, m)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return lp.detach(), loss.detach(), grads


def golden_tensors(ids, mask, lp, loss, grads):
    t = {"input_ids": ids.contiguous()}
    if mask is not None:
        t["attention_mask"] = mask.contiguous()
    t["logprobs"] = lp.to(torch.float32).contiguous()
    t["loss"] = loss.reshape(1).to(torch.float32)
    for n, gr in grads.items():
        t[f"grad.{n}"] = gr.to(torch.float32).contiguous()
    return t


def meta(**extra):
    d = {
        "generator": "tools/parity/make_fixtures.py",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "compute_dtype": "float64",
    }
    d.update({k: str(v) for k, v in extra.items()})
    # one key only: safetensors writes its metadata map in hash order, which would make the
    # files differ byte-wise between runs
    return {"info": json.dumps(d, sort_keys=True)}


def checkpoint_state_dict(model, cfg, strip_prefix: bool, dtype: torch.dtype):
    sd = model.state_dict()
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    out = {}
    for k, v in sd.items():
        if strip_prefix:
            assert k.startswith("transformer."), k
            k = k[len("transformer."):]
        out[k] = v.detach().to(dtype).contiguous()
    return out


def build_variant(v, tok: Tokenizer):
    name = v["name"]
    d = FIXTURES / name
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)

    cfg = v["cfg"]()
    torch.manual_seed(v["seed"])
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    reinit_(model, v["seed"])
    if cfg.tie_word_embeddings:
        assert model.lm_head.weight is model.get_input_embeddings().weight, "lm_head not tied"
    if v["dtype"] != torch.float32:
        with torch.no_grad():  # round to the storage dtype so goldens use exactly the stored weights
            for p in model.parameters():
                p.copy_(p.to(v["dtype"]).to(torch.float32))

    cfg.dtype = str(v["dtype"]).replace("torch.", "")  # records the storage dtype ("float16"/"float32")
    cfg.save_pretrained(d)
    save_file(checkpoint_state_dict(model, cfg, v["strip"], v["dtype"]), str(d / "model.safetensors"),
              metadata={"format": "pt"})
    tok.save(str(d / "tokenizer.json"))

    ids, mask = make_inputs(v["seed"], v["pad"])
    m64 = copy.deepcopy(model).to(torch.float64)
    lp, loss, grads = golden_from_model(m64, ids, mask)
    save_file(golden_tensors(ids, mask, lp, loss, grads), str(d / "golden.safetensors"),
              metadata=meta(variant=name, pad_id=v["pad"]))
    return model


def build_tinystories(shared: pathlib.Path):
    mdir = shared / "models" / "tinystories-656k"
    out = FIXTURES / "tinystories_golden.safetensors"
    if not (mdir / "model.safetensors").exists():
        print(f"[skip] {mdir} not found: tinystories golden not (re)generated")
        return None
    tok = Tokenizer.from_file(str(mdir / "tokenizer.json"))
    ids = torch.tensor([tok.encode(TINYSTORIES_TEXT, add_special_tokens=True).ids], dtype=torch.int64)
    model, info = AutoModelForCausalLM.from_pretrained(
        str(mdir), attn_implementation="eager", dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    mask = torch.ones_like(ids)
    lp, loss, grads = golden_from_model(model.to(torch.float64), ids, mask)
    save_file(golden_tensors(ids, mask, lp, loss, grads), str(out),
              metadata=meta(variant="tinystories-656k", text=TINYSTORIES_TEXT))
    return mdir


# --------------------------------------------------------------------------------------
# text-level score goldens and PEFT adapters


def score_logprobs(model: torch.nn.Module, ids: list[int]) -> list[float]:
    """log P(ids[i+1] | ids[..=i]) for i in 0..len-1, in float64 (model converted in place)."""
    model.to(torch.float64).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids], dtype=torch.int64), use_cache=False).logits[0]
    lp = torch.log_softmax(logits[:-1].to(torch.float64), dim=-1)
    return lp.gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1).tolist()


def score_tokens(d: pathlib.Path) -> list[int]:
    return Tokenizer.from_file(str(d / "tokenizer.json")).encode(SCORE_TEXT, add_special_tokens=True).ids


def write_score_golden(path: pathlib.Path, ids: list[int], lps: list[float], **extra):
    d = {"text": SCORE_TEXT, **extra, "tokens": ids, "logprobs": [float(x) for x in lps]}
    body = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}" for k, v in d.items())
    path.write_text("{\n" + body + "\n}\n", encoding="utf-8")


def build_score_golden(v):
    d = FIXTURES / v["name"]
    ids = score_tokens(d)
    # default attention implementation (sdpa): unlike "eager", it keeps the softmax in float64
    model = AutoModelForCausalLM.from_pretrained(str(d))
    write_score_golden(d / "score_golden.json", ids, score_logprobs(model, ids))


PEFT_VARIANTS = [
    dict(name="bloom_h3_peft", base="bloom_h3", targets=["query_key_value", "dense_4h_to_h"], seed=21),
    dict(name="llama_gqa_peft", base="llama_gqa", targets=["q_proj", "v_proj", "down_proj"], seed=24),
]
PEFT_RANK, PEFT_ALPHA = 4, 8


def build_peft(v):
    import peft

    d = CLI_FIXTURES / v["name"]
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(parents=True)
    base_dir = FIXTURES / v["base"]
    placeholder = f"hetfed-fixture/{v['base']}"
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    model.config._name_or_path = placeholder  # what peft records as the base model
    cfg = peft.LoraConfig(r=PEFT_RANK, lora_alpha=PEFT_ALPHA, target_modules=v["targets"], lora_dropout=0.0,
                          task_type="CAUSAL_LM")
    torch.manual_seed(v["seed"])
    pm = peft.get_peft_model(model, cfg)
    pm.peft_config["default"].base_model_name_or_path = placeholder

    # Overwrite both factors from our own generator (peft's init of A could change between
    # versions; its B is zero, which would make the adapter a no-op).
    g = torch.Generator().manual_seed(v["seed"])
    n = 0
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if ".lora_A." in name:
                std = 0.3
            elif ".lora_B." in name:
                std = 0.1
            else:
                continue
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64).mul_(std).to(torch.float32))
            n += 1
    assert n == 2 * len(v["targets"]) * model.config.num_hidden_layers, (v["name"], n)

    pm.save_pretrained(str(d))
    # the generated model card is boilerplate (and would record the base model's path): drop it
    (d / "README.md").unlink(missing_ok=True)
    files = sorted(p.name for p in d.iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors"], files
    # peft keeps target_modules as a set and writes it in hash order (varies between runs):
    # sort it, keeping peft's formatting otherwise (json.dumps(indent=2, sort_keys=True))
    cpath = d / "adapter_config.json"
    raw = cpath.read_text()
    acfg = json.loads(raw)
    nl = "\n" if raw.endswith("\n") else ""
    assert json.dumps(acfg, indent=2, sort_keys=True) + nl == raw, "unexpected adapter_config.json layout"
    assert sorted(acfg["target_modules"]) == sorted(v["targets"]), acfg["target_modules"]
    acfg["target_modules"] = sorted(acfg["target_modules"])
    cpath.write_text(json.dumps(acfg, indent=2, sort_keys=True) + nl)
    assert acfg["base_model_name_or_path"] == placeholder, acfg["base_model_name_or_path"]
    assert (acfg["r"], acfg["lora_alpha"], acfg["lora_dropout"]) == (PEFT_RANK, PEFT_ALPHA, 0.0), acfg

    ids = score_tokens(base_dir)
    write_score_golden(d / "score_golden.json", ids, score_logprobs(pm, ids), base_fixture=v["base"])


def verify_scores() -> bool:
    """Reload base fixtures and PEFT adapters, re-score SCORE_TEXT, compare with the JSON goldens."""
    import peft

    ok = True
    rows = []

    def check(name, golden_path, make_model, base_lps=None):
        nonlocal ok
        g = json.loads(golden_path.read_text(encoding="utf-8"))
        ids = g["tokens"]
        good = g["text"] == SCORE_TEXT and len(g["logprobs"]) == len(ids) - 1 and 10 <= len(ids) <= 25
        gl = torch.tensor(g["logprobs"], dtype=torch.float64)
        d64 = (torch.tensor(score_logprobs(make_model(), ids), dtype=torch.float64) - gl).abs().max().item()
        m32 = make_model().to(torch.float32).eval()
        with torch.no_grad():
            logits = m32(input_ids=torch.tensor([ids]), use_cache=False).logits[0, :-1]
        lp32 = torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)
        d32 = (lp32.double() - gl).abs().max().item()
        vs_base = (gl - base_lps).abs().max().item() if base_lps is not None else float("nan")
        good &= d64 < 1e-9 and d32 < LOGPROB_ABS_TOL
        if base_lps is not None:
            good &= vs_base > 1e-2
        ok &= good
        rows.append((name, len(ids), d64, d32, vs_base, "ok" if good else "FAIL"))
        return gl

    base_lps = {}
    for v in VARIANTS:
        d = FIXTURES / v["name"]
        assert json.loads((d / "score_golden.json").read_text())["tokens"] == score_tokens(d)
        base_lps[v["name"]] = check(v["name"], d / "score_golden.json",
                                    lambda d=d: AutoModelForCausalLM.from_pretrained(str(d)))
    for v in PEFT_VARIANTS:
        d = CLI_FIXTURES / v["name"]
        base_dir = FIXTURES / v["base"]

        def make(d=d, base_dir=base_dir):
            base = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
            return peft.PeftModel.from_pretrained(base, str(d))

        check(v["name"], d / "score_golden.json", make, base_lps[v["base"]])

    print(f"\n{'score golden':>18} {'T':>3} {'f64|dlp|':>10} {'f32|dlp|':>10} {'vs base':>10}")
    for r in rows:
        print(f"{r[0]:>18} {r[1]:>3} {r[2]:>10.2e} {r[3]:>10.2e} {r[4]:>10.2e} {r[5]:>5}")
    print(f"text: {SCORE_TEXT!r}; f64 = reload in float64 (adapters via PeftModel.from_pretrained), f32 = the\n"
          f"  same in float32 (contract < {LOGPROB_ABS_TOL:g}); vs base = max |adapter golden - base golden| (> 1e-2).")
    return ok



# --------------------------------------------------------------------------------------
# verification


def alibi_slopes(n: int) -> torch.Tensor:
    """ALiBi slopes (Press et al.), incl. the non-power-of-two interleaving used by BLOOM."""
    def pow2(k):
        start = 2.0 ** (-(2.0 ** -(math.log2(k) - 3)))
        return [start ** (i + 1) for i in range(k)]
    p = 2 ** math.floor(math.log2(n))
    s = pow2(p)
    if p != n:
        s += pow2(2 * p)[0::2][: n - p]
    return torch.tensor(s, dtype=torch.float64)


def ref_forward(cfg, P: dict, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Independent float64 forward pass (no transformers code), HF parameter names in P."""
    B, T = ids.shape
    allowed = torch.ones(T, T, dtype=torch.bool).tril()[None, None] & mask.bool()[:, None, None, :]

    def attend(q, k, v, bias):
        s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + bias
        s = s.masked_fill(~allowed, float("-inf"))
        return (torch.softmax(s, -1) @ v).transpose(1, 2).reshape(B, T, -1)

    if cfg.model_type == "bloom":
        H, nh, L, eps = cfg.hidden_size, cfg.n_head, cfg.n_layer, cfg.layer_norm_epsilon
        hd = H // nh
        ln = lambda x, p: F.layer_norm(x, (H,), P[p + ".weight"], P[p + ".bias"], eps)
        lin = lambda x, p: x @ P[p + ".weight"].T + P[p + ".bias"]
        emb = P["transformer.word_embeddings.weight"]
        x = ln(emb[ids], "transformer.word_embeddings_layernorm")
        pos = ((mask.cumsum(-1) - 1) * mask).to(torch.float64)  # key positions, as HF computes them
        bias = alibi_slopes(nh)[None, :, None, None] * pos[:, None, None, :]
        for l in range(L):
            p = f"transformer.h.{l}."
            qkv = lin(ln(x, p + "input_layernorm"), p + "self_attention.query_key_value")
            qkv = qkv.view(B, T, nh, 3, hd)  # fused layout: per head [q | k | v]
            q, k, v = (qkv[..., i, :].transpose(1, 2) for i in range(3))
            x = x + lin(attend(q, k, v, bias), p + "self_attention.dense")
            h = lin(ln(x, p + "post_attention_layernorm"), p + "mlp.dense_h_to_4h")
            h = h * 0.5 * (1.0 + torch.tanh(0.79788456 * h * (1 + 0.044715 * h * h)))
            x = x + lin(h, p + "mlp.dense_4h_to_h")
        x = ln(x, "transformer.ln_f")
        return x @ P.get("lm_head.weight", emb).T

    H, nh, nkv, L = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_hidden_layers
    hd = H // nh
    eps = cfg.rms_norm_eps
    theta = cfg.rope_parameters["rope_theta"]
    rms = lambda x, p: P[p + ".weight"] * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    lin = lambda x, p: x @ P[p + ".weight"].T
    inv = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv[None]  # positions 0..T-1 (HF default)
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    rot = lambda t: torch.cat([-t[..., hd // 2:], t[..., : hd // 2]], -1)
    rope = lambda t: t * cos + rot(t) * sin
    emb = P["model.embed_tokens.weight"]
    x = emb[ids]
    for l in range(L):
        p = f"model.layers.{l}."
        h = rms(x, p + "input_layernorm")
        q = rope(lin(h, p + "self_attn.q_proj").view(B, T, nh, hd).transpose(1, 2))
        k = rope(lin(h, p + "self_attn.k_proj").view(B, T, nkv, hd).transpose(1, 2))
        v = lin(h, p + "self_attn.v_proj").view(B, T, nkv, hd).transpose(1, 2)
        k, v = k.repeat_interleave(nh // nkv, 1), v.repeat_interleave(nh // nkv, 1)
        x = x + lin(attend(q, k, v, 0.0), p + "self_attn.o_proj")
        h = rms(x, p + "post_attention_layernorm")
        x = x + lin(F.silu(lin(h, p + "mlp.gate_proj")) * lin(h, p + "mlp.up_proj"), p + "mlp.down_proj")
    x = rms(x, "model.norm")
    return x @ P.get("lm_head.weight", emb).T


def grad_rel(a: dict, b: dict) -> float:
    """max over tensors of max|a-b| / max|b|."""
    worst = 0.0
    for n, ref in b.items():
        denom = ref.abs().max().item()
        diff = (a[n].to(torch.float64) - ref.to(torch.float64)).abs().max().item()
        worst = max(worst, diff / denom if denom > 0 else diff)
    return worst


def load_golden(path):
    g = load_file(str(path))
    grads = {k[len("grad."):]: v for k, v in g.items() if k.startswith("grad.")}
    return g, grads


def verify_dir(name, d: pathlib.Path | None, golden_path: pathlib.Path, model_dir: pathlib.Path, rows: list):
    g, ggrads = load_golden(golden_path)
    ids, mask = g["input_ids"], g.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(ids)

    # 1) transformers reload (default attention implementation), float64
    model, info = AutoModelForCausalLM.from_pretrained(str(model_dir), output_loading_info=True)
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    assert not bad, f"{name}: loading problems {bad}"
    if d is not None:  # check every stored tensor landed on the right parameter
        sd_file = load_file(str(d / "model.safetensors"))
        msd = model.state_dict()
        for k, v in sd_file.items():
            hk = k if k in msd else "transformer." + k
            assert torch.equal(msd[hk].to(v.dtype), v), f"{name}: {k} not loaded verbatim"
    load_dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    lp, loss, grads = golden_from_model(model.to(torch.float64), ids, mask)
    hf_lp = (lp - g["logprobs"].double()).abs().max().item()
    hf_gr = grad_rel(grads, ggrads)

    # 2) independent float64 re-implementation
    P = {n: p.detach().clone().requires_grad_(True) for n, p in model.named_parameters()}
    logits = ref_forward(model.config, P, ids, mask)
    rlp, rloss = logprobs_and_loss(logits, ids, mask)
    rloss.backward()
    ref_lp = (rlp.detach() - g["logprobs"].double()).abs().max().item()
    ref_gr = grad_rel({n: p.grad for n, p in P.items()}, ggrads)

    # 3) float32 forward/backward vs the float64 goldens (what the Rust side has to meet)
    lp32, _, grads32 = golden_from_model(model.to(torch.float32), ids, mask)
    f32_lp = (lp32.double() - g["logprobs"].double()).abs().max().item()
    f32_gr = grad_rel(grads32, ggrads)

    ok = all(x < LOGPROB_ABS_TOL for x in (hf_lp, ref_lp, f32_lp)) and all(
        x < GRAD_REL_TOL for x in (hf_gr, ref_gr, f32_gr))
    cfg = model.config
    heads = getattr(cfg, "n_head", None) or cfg.num_attention_heads
    rows.append((name, cfg.model_type, heads, load_dtype, ids.shape[1], float(g["loss"][0]),
                 hf_lp, hf_gr, ref_lp, ref_gr, f32_lp, f32_gr, "ok" if ok else "FAIL"))
    return ok


def verify(shared_model: pathlib.Path | None) -> bool:
    rows = []
    ok = True
    for v in VARIANTS:
        d = FIXTURES / v["name"]
        cfg = json.loads((d / "config.json").read_text())
        if cfg["model_type"] == "bloom":
            for key in ("n_head", "n_layer", "hidden_size", "layer_norm_epsilon", "vocab_size",
                        "bos_token_id", "eos_token_id", "pad_token_id"):
                assert key in cfg, f"{v['name']}: config.json lacks {key}"
        tok = Tokenizer.from_file(str(d / "tokenizer.json"))
        enc = tok.encode("नमस्ते world")
        assert enc.ids[0] == BOS_ID and tok.get_vocab_size() <= cfg["vocab_size"]
        assert tok.decode(enc.ids, skip_special_tokens=True) == "नमस्ते world"
        ok &= verify_dir(v["name"], d, d / "golden.safetensors", d, rows)
    ts = FIXTURES / "tinystories_golden.safetensors"
    if shared_model is not None and ts.exists():
        ok &= verify_dir("tinystories", None, ts, shared_model, rows)

    hdr = ("fixture", "type", "heads", "loads", "T", "loss", "hf|dlp|", "hf grad", "ref|dlp|", "ref grad",
           "f32|dlp|", "f32 grad", "")
    print("\n" + " ".join(f"{h:>10}" for h in hdr))
    for r in rows:
        print(f"{r[0]:>18} {r[1]:>5} {r[2]:>5} {r[3]:>8} {r[4]:>3} {r[5]:>8.4f} "
              + " ".join(f"{x:>10.2e}" for x in r[6:12]) + f" {r[12]:>5}")
    print("columns: max |logprob - golden| and max-over-tensors (max|grad diff| / max|golden grad|) for\n"
          "  hf  = transformers from_pretrained(dir) in float64 (default attention impl),\n"
          "  ref = independent float64 re-implementation in this script,\n"
          f"  f32 = transformers in float32. Contract: |dlp| < {LOGPROB_ABS_TOL:g}, grad < {GRAD_REL_TOL:g}.")
    print("ALiBi slopes:", {n: [round(s, 6) for s in alibi_slopes(n).tolist()] for n in (3, 6, 8)})
    return ok


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shared", type=pathlib.Path, default=REPO.parent / "shared",
                    help="shared folder holding models/tinystories-656k (default: <repo>/../shared)")
    ap.add_argument("--no-verify", action="store_true", help="skip the reload / cross-check pass")
    args = ap.parse_args()

    torch.use_deterministic_algorithms(True)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    FIXTURES.mkdir(parents=True, exist_ok=True)

    tok = build_tokenizer(VOCAB)
    for v in VARIANTS:
        build_variant(v, tok)
        build_score_golden(v)
        print(f"wrote {(FIXTURES / v['name']).relative_to(REPO)}")
    for v in PEFT_VARIANTS:
        build_peft(v)
        print(f"wrote {(CLI_FIXTURES / v['name']).relative_to(REPO)}")
    shared_model = build_tinystories(args.shared.resolve())
    if shared_model is not None:
        print(f"wrote {(FIXTURES / 'tinystories_golden.safetensors').relative_to(REPO)}")

    total = sum(p.stat().st_size for p in FIXTURES.rglob("*") if p.is_file())
    print(f"fixtures total: {total / 1e6:.2f} MB")
    if not args.no_verify and not (verify(shared_model) & verify_scores()):
        print("VERIFICATION FAILED", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
