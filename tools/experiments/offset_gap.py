#!/usr/bin/env python3
"""Where does offset distillation lose its teacher's gain? Per-token target log-probabilities.

For one task of a finished offset-distillation run, scores the task's reference targets token by
token (teacher-forced, exactly the terms of `target_nll`) under:

- L0: the server's starting model (`--large`);
- the teacher: L0 plus the task's specialist offset, `log_softmax(log p_L0 + log p_S+tau - log p_S)`
  (the specialist rebuilt from the client's last adapter in the run directory);
- the student: the run's final server model (`hetfed export`);
- optionally the central model: the final model of a central run (`--central RUN`).

It then splits the reference tokens by how likely the teacher finds them (or, with `--by position`,
by their position in the answer; with `--by kind`, into words' first tokens and their
continuations) and reports, per bucket,
the share of tokens, each model's gain over L0 in nats per token, and the share of the teacher's
gain the student carries. Everything runs through the `hetfed` binary (`hetfed export`,
`hetfed eval --out ... [--offset-base ... --offset-adapter ...]`); no Python ML packages.

    python3 tools/experiments/offset_gap.py RUN [RUN ...] --task tico:en-hi [--client c3] \
        [--central CENTRAL_RUN ...] [--by teacher_p|position|kind] [--limit 24] [--out DIR]

Several runs (one per seed) give mean ± std per bucket. RUN is a run directory (`hetfed simulate --out RUN`, or a row of `hetfed sweep`'s runs/) whose
clients kept their adapters (`client.keep_adapter`, the default run's setting).
"""

import argparse
import json
import math
import os
import struct
import subprocess
import sys
import tempfile

ROOT = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))


def run(cmd):
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd)}: exit {p.returncode}\n{p.stderr}")
    return p.stdout


def first_event(run_dir):
    """The run's first event that carries its config (a resumed run starts with a `resume` event)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    try:
        with open(path) as f:
            for line in f:
                e = json.loads(line)
                if "config" in e:
                    return e
    except (OSError, ValueError) as e:
        sys.exit(f"{path}: expected a run's metrics.jsonl, found {e}")
    sys.exit(f"{path}: expected an event with the run's config, found none")


def peft_from_adapter(adapter, alpha, out_dir):
    """A client's kept adapter (`<module>.lora_A`/`lora_B` factors in safetensors) as a PEFT
    adapter directory: the same bytes under PEFT's names, plus adapter_config.json. The alpha is
    the file's own (`lora_alpha` in its metadata) when it has one, else `alpha` (the run
    config's; adapters written before they described themselves)."""
    with open(adapter, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    meta = header.pop("__metadata__", None)
    if meta and "lora_alpha" in meta:
        alpha = float(meta["lora_alpha"])
    renamed, rank = {}, None
    for key, info in header.items():
        renamed[f"base_model.model.{key}.weight"] = info
        if key.endswith(".lora_A"):
            rank = info["shape"][0]
    if rank is None:
        sys.exit(f"{adapter}: expected LoRA factors (`<module>.lora_A`), found none")
    if meta:
        renamed["__metadata__"] = meta
    head = json.dumps(renamed, separators=(",", ":")).encode()
    head += b" " * ((8 - len(head) % 8) % 8)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "adapter_model.safetensors"), "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head + data)
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "lora_dropout": 0.0, "bias": "none"}, f)


def token_logprobs(a, model, max_len, out, extra=()):
    """Per example, its reference's per-token log-probabilities, and the run's target NLL."""
    cmd = [a.hetfed, "eval", "--model", model, "--task", a.task, "--split", a.split, "--limit", str(a.limit),
           "--max-len", str(max_len), "--max-new-tokens", "1", "--data-dir", a.data_dir, "--offline",
           "--out", out, "--json", *extra]
    metrics = json.loads(run(cmd))["metrics"]
    rows, tokens = [], []
    with open(os.path.join(out, "predictions.jsonl")) as f:
        for line in f:
            p = json.loads(line)
            rows.append(p["target_logprobs"])
            tokens.append(p.get("target_tokens") or [None] * len(p["target_logprobs"]))
    return rows, tokens, metrics["target_nll"]


BUCKETS = [
    (0.0, -0.5, "p ≥ 0.61"),
    (-0.5, -1.0, "0.37–0.61"),
    (-1.0, -2.0, "0.14–0.37"),
    (-2.0, -3.0, "0.05–0.14"),
    (-3.0, -5.0, "0.007–0.05"),
    (-5.0, -8.0, "0.0003–0.007"),
    (-8.0, -math.inf, "< 0.0003"),
    (None, None, "all"),
]

# Answer positions (0 = the reference's first token), for `--by position`.
POSITIONS = [
    (0, 0, "0"),
    (1, 4, "1–4"),
    (5, 14, "5–14"),
    (15, 29, "15–29"),
    (30, 59, "30–59"),
    (60, math.inf, "≥ 60"),
    (None, None, "all"),
]

# Token kinds, for `--by kind`: a word's first token (the answer's first, or one that starts
# with whitespace) or a continuation of the word before it.
KINDS = [(True, None, "word start"), (False, None, "continuation"), (None, None, "all")]


def score_run(a, run_dir, central, work):
    """Per reference token, its log-probability under each model (L0, teacher, student, central)."""
    cfg = first_event(run_dir)["config"]
    rounds = cfg["run"]["rounds"]
    tasks = cfg["data"]["tasks"]
    client = a.client
    if client is None:
        if a.task not in tasks or cfg["data"].get("clients_per_task", 1) != 1:
            sys.exit(f"--client: cannot tell which client of {run_dir} holds {a.task} (data.tasks {tasks}); name it")
        client = f"c{tasks.index(a.task)}"
    adapter = os.path.join(run_dir, "clients", client, f"adapter-round-{rounds}.safetensors")
    if not os.path.isfile(adapter):
        sys.exit(f"{adapter}: expected the client's last adapter (client.keep_adapter), found none")
    max_len = cfg["server"]["eval"]["max_len"]
    os.makedirs(work, exist_ok=True)
    peft = os.path.join(work, "specialist-adapter")
    peft_from_adapter(adapter, cfg["client"]["lora_alpha"], peft)
    models = {"L0": (a.large, ())}
    models["teacher"] = (a.large, ("--offset-base", a.small, "--offset-adapter", peft))
    student = os.path.join(work, "student")
    run([a.hetfed, "export", run_dir, "--out", student])
    models["student"] = (student, ())
    if central:
        path = os.path.join(work, "central")
        run([a.hetfed, "export", central, "--out", path])
        models["central"] = (path, ())
    lp, tokens = {}, None
    for name, (model, extra) in models.items():
        lp[name], toks, nll = token_logprobs(a, model, max_len, os.path.join(work, name), extra)
        tokens = tokens or toks
        print(f"{run_dir}: {name}: target NLL {nll:.4f} over {sum(map(len, lp[name]))} reference tokens", file=sys.stderr)
    if a.by == "kind" and any(t is None for row in tokens for t in row):
        sys.exit(f"--by kind: expected `target_tokens` in {a.hetfed} eval's predictions (a newer hetfed), found none")
    return [
        {**{m: lp[m][i][k] for m in lp}, "pos": k, "start": k == 0 or (tokens[i][k] or "")[:1].isspace()}
        for i in range(len(lp["L0"]))
        for k in range(len(lp["L0"][i]))
    ]


SPLITS = {"teacher_p": BUCKETS, "position": POSITIONS, "kind": KINDS}


def buckets(toks, by):
    """Per bucket (of the teacher's log-probability, or of the answer position): its share of the
    tokens and each model's gain over L0, as the bucket's part of the mean over all tokens (so the
    buckets add up to `all`)."""
    out = {}
    for hi, lo, label in SPLITS[by]:
        if hi is None:
            sel = toks
        elif by == "teacher_p":
            sel = [t for t in toks if lo < t["teacher"] <= hi]
        elif by == "position":
            sel = [t for t in toks if hi <= t["pos"] <= lo]
        else:
            sel = [t for t in toks if t["start"] == hi]
        gain = {m: sum(t[m] - t["L0"] for t in sel) / len(toks) for m in toks[0] if m not in ("L0", "pos", "start")}
        out[label] = (len(sel) / len(toks), gain)
    return out


def mean_std(xs):
    m = sum(xs) / len(xs)
    s = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, s


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="run directories of offset-distillation runs (one per seed)")
    ap.add_argument("--task", required=True, help="a generation task of the run, e.g. tico:en-hi")
    ap.add_argument("--client", help="the client holding the task (default: by the run's data.tasks order)")
    ap.add_argument("--central", nargs="*", default=[], help="run directories of the central row, one per run, in order")
    ap.add_argument("--split", default="dev")
    ap.add_argument("--limit", type=int, default=24, help="evenly spaced examples, as the server's max_examples")
    ap.add_argument("--large", default=os.path.join(ROOT, "models", "base-large"))
    ap.add_argument("--small", default=os.path.join(ROOT, "models", "base-small"))
    ap.add_argument("--hetfed", default=os.path.join(ROOT, "target", "release", "hetfed"))
    ap.add_argument("--data-dir", default=os.environ.get("HETFED_DATA_DIR", os.path.join(ROOT, "..", "shared", "data")))
    ap.add_argument("--by", choices=list(SPLITS), default="teacher_p",
                    help="split the reference tokens by the teacher's probability of each (default), by its position in the answer, "
                         "or by its kind (a word's start or its continuation)")
    ap.add_argument("--out", help="keep the exported models and predictions here (default: a temporary directory)")
    a = ap.parse_args()
    if a.limit < 1:
        sys.exit(f"--limit: expected at least 1, found {a.limit}")
    if a.central and len(a.central) != len(a.runs):
        sys.exit(f"--central: expected one central run per run ({len(a.runs)}), found {len(a.central)}")
    work = a.out or tempfile.mkdtemp(prefix="offset-gap-")
    per_run = []
    for k, r in enumerate(a.runs):
        toks = score_run(a, r, a.central[k] if a.central else None, os.path.join(work, f"run{k}"))
        per_run.append(buckets(toks, a.by))
    models = list(per_run[0]["all"][1])
    n = len(per_run)
    what = {"teacher_p": "the teacher's probability of them", "position": "their position in the answer",
            "kind": "their kind (a word's start or its continuation)"}[a.by]
    print(f"\n{a.task}, {a.split}, {a.limit} examples, {n} run(s); reference tokens split by {what}"
          + (" (mean ± std over runs)" if n > 1 else ""))
    head = "| " + {"teacher_p": "teacher p(token)", "position": "answer position", "kind": "token"}[a.by] + " | tokens | " + " | ".join(f"{m} gain" for m in models) + " | student / teacher |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    fmt = (lambda m, s: f"{m:+.4f} ± {s:.4f}") if n > 1 else (lambda m, s: f"{m:+.4f}")
    pct = (lambda m, s: f"{100 * m:.0f} ± {100 * s:.0f}%") if n > 1 else (lambda m, s: f"{100 * m:.0f}%")
    for _, _, label in SPLITS[a.by]:
        share_tok = mean_std([b[label][0] for b in per_run])
        cells = " | ".join(fmt(*mean_std([b[label][1][m] for b in per_run])) for m in models)
        # A share of a gain under a thousandth of a nat per token is noise: not shown.
        teacher = [b[label][1]["teacher"] for b in per_run]
        ratios = [b[label][1]["student"] / t for b, t in zip(per_run, teacher)]
        ratio = pct(*mean_std(ratios)) if all(abs(t) >= 1e-3 for t in teacher) else "–"
        print(f"| {label} | {100 * share_tok[0]:.0f}% | {cells} | {ratio} |")
    print("\nGains: nats per reference token over L0, each bucket's part of the mean over all tokens (the buckets add up to `all`).")


if __name__ == "__main__":
    main()
