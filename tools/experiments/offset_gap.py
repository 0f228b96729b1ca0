#!/usr/bin/env python3
"""Where does offset distillation lose its teacher's gain? Per-token target log-probabilities.

For one task of a finished offset-distillation run, scores the task's reference targets token by
token (teacher-forced, exactly the terms of `target_nll`) under:

- L0: the server's starting model (`--large`);
- the teacher: L0 plus the task's specialist offset, `log_softmax(log p_L0 + log p_S+tau - log p_S)`
  (the specialist rebuilt from the client's last adapter in the run directory);
- the student: the run's final server model (`hetfed export`);
- optionally the central model: the final model of a central run (`--central RUN`).

It then splits the reference tokens by how likely the teacher finds them and reports, per bucket,
the share of tokens, each model's gain over L0 in nats per token, and the share of the teacher's
gain the student carries. Everything runs through the `hetfed` binary (`hetfed export`,
`hetfed eval --out ... [--offset-base ... --offset-adapter ...]`); no Python ML packages.

    python3 tools/experiments/offset_gap.py RUN --task tico:en-hi [--client c3] \
        [--central CENTRAL_RUN] [--limit 24] [--out DIR]

RUN is a run directory (`hetfed simulate --out RUN`, or a row of `hetfed sweep`'s runs/) whose
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
    path = os.path.join(run_dir, "metrics.jsonl")
    try:
        with open(path) as f:
            return json.loads(f.readline())
    except (OSError, ValueError) as e:
        sys.exit(f"{path}: expected a run's metrics.jsonl, found {e}")


def peft_from_adapter(adapter, alpha, out_dir):
    """A client's kept adapter (`<module>.lora_A`/`lora_B` factors in safetensors) as a PEFT
    adapter directory: the same bytes under PEFT's names, plus adapter_config.json."""
    with open(adapter, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    meta = header.pop("__metadata__", None)
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
    rows = []
    with open(os.path.join(out, "predictions.jsonl")) as f:
        for line in f:
            rows.append(json.loads(line)["target_logprobs"])
    return rows, metrics["target_nll"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", help="run directory of an offset-distillation run")
    ap.add_argument("--task", required=True, help="a generation task of the run, e.g. tico:en-hi")
    ap.add_argument("--client", help="the client holding the task (default: by the run's data.tasks order)")
    ap.add_argument("--central", help="run directory of the central row (its final model is compared too)")
    ap.add_argument("--split", default="dev")
    ap.add_argument("--limit", type=int, default=24, help="evenly spaced examples, as the server's max_examples")
    ap.add_argument("--large", default=os.path.join(ROOT, "models", "base-large"))
    ap.add_argument("--small", default=os.path.join(ROOT, "models", "base-small"))
    ap.add_argument("--hetfed", default=os.path.join(ROOT, "target", "release", "hetfed"))
    ap.add_argument("--data-dir", default=os.environ.get("HETFED_DATA_DIR", os.path.join(ROOT, "..", "shared", "data")))
    ap.add_argument("--out", help="keep the exported models and predictions here (default: a temporary directory)")
    a = ap.parse_args()
    if a.limit < 1:
        sys.exit(f"--limit: expected at least 1, found {a.limit}")

    cfg = first_event(a.run)["config"]
    rounds = cfg["run"]["rounds"]
    tasks = cfg["data"]["tasks"]
    if a.client is None:
        if a.task not in tasks or cfg["data"].get("clients_per_task", 1) != 1:
            sys.exit(f"--client: cannot tell which client holds {a.task} (data.tasks {tasks}); name it")
        a.client = f"c{tasks.index(a.task)}"
    adapter = os.path.join(a.run, "clients", a.client, f"adapter-round-{rounds}.safetensors")
    if not os.path.isfile(adapter):
        sys.exit(f"{adapter}: expected the client's last adapter (client.keep_adapter), found none")
    max_len = cfg["server"]["eval"]["max_len"]

    work = a.out or tempfile.mkdtemp(prefix="offset-gap-")
    os.makedirs(work, exist_ok=True)
    peft = os.path.join(work, "specialist-adapter")
    peft_from_adapter(adapter, cfg["client"]["lora_alpha"], peft)
    models = {"L0": (a.large, ())}
    models["teacher"] = (a.large, ("--offset-base", a.small, "--offset-adapter", peft))
    student = os.path.join(work, "student")
    run([a.hetfed, "export", a.run, "--out", student])
    models["student"] = (student, ())
    if a.central:
        central = os.path.join(work, "central")
        run([a.hetfed, "export", a.central, "--out", central])
        models["central"] = (central, ())
    lp = {}
    for name, (model, extra) in models.items():
        lp[name], nll = token_logprobs(a, model, max_len, os.path.join(work, name), extra)
        print(f"{name}: target NLL {nll:.4f} over {sum(map(len, lp[name]))} reference tokens", file=sys.stderr)

    toks = []  # (teacher log-prob, per-model log-prob)
    for i in range(len(lp["L0"])):
        for k in range(len(lp["L0"][i])):
            toks.append({m: lp[m][i][k] for m in lp})
    edges = [0.0, -0.5, -1.0, -2.0, -3.0, -5.0, -8.0, -math.inf]
    labels = ["p ≥ 0.61", "0.37–0.61", "0.14–0.37", "0.05–0.14", "0.007–0.05", "0.0003–0.007", "< 0.0003"]
    others = [m for m in lp if m != "L0"]
    n_all = len(toks)
    print(f"\n{a.task}, {a.split}, {len(lp['L0'])} examples, {n_all} reference tokens; buckets by the teacher's probability of the reference token")
    head = "| teacher p(token) | tokens | " + " | ".join(f"{m} gain" for m in others) + " | student / teacher |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    rows = list(zip(edges[:-1], edges[1:], labels)) + [(None, None, "all")]
    for hi, lo, label in rows:
        sel = toks if hi is None else [t for t in toks if lo < t["teacher"] <= hi]
        if not sel:
            continue
        # Each bucket's contribution to the mean gain per token over all tokens (so buckets add up).
        gain = {m: sum(t[m] - t["L0"] for t in sel) / n_all for m in others}
        share = gain["student"] / gain["teacher"] if abs(gain["teacher"]) > 1e-9 else float("nan")
        cells = " | ".join(f"{gain[m]:+.4f}" for m in others)
        print(f"| {label} | {len(sel)} ({100 * len(sel) / n_all:.0f}%) | {cells} | {100 * share:.0f}% |")
    print("\nGains are nats per reference token over L0, each bucket's part of the mean over all tokens (the rows add up to `all`).")


if __name__ == "__main__":
    main()
