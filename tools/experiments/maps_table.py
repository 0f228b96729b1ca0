#!/usr/bin/env python3
"""The explained-variance table of EXPERIMENTS.md from the map cache (runs/maps by default).

Each cached file holds one fit (a method, a seed, a calibration); this prints, per method and
calibration, the held-out R² per space averaged over layers, then over the seeds present
(mean ± std), the embedding map's R² and the fit time. Reads only the safetensors header.

    python3 tools/experiments/maps_table.py [runs/maps]
"""
import glob
import json
import statistics
import struct
import sys

SPACES = ["attn_in", "q", "k", "v", "ctx", "mlp_in", "mlp_hidden", "resid"]


def header(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(n))


def main(root):
    groups = {}
    for path in sorted(glob.glob(f"{root}/maps-*.safetensors")):
        meta = json.loads(header(path)["__metadata__"]["hetfed.pair_maps"])
        s = meta["summary"]
        per_space = {sp: statistics.mean(l["explained_variance"][sp] for l in s["layers"]) for sp in SPACES if sp in s["layers"][0]["explained_variance"]}
        key = (s["method"], s["calibration"])
        groups.setdefault(key, []).append((per_space, s["embed_explained_variance"], s["mean_explained_variance"], s["seconds"]))

    def fmt(v):
        return f"{statistics.mean(v):.2f} ± {statistics.stdev(v):.2f}" if len(v) > 1 else f"{v[0]:.2f}"

    print("| method | calibration | fits | " + " | ".join(SPACES) + " | embedding | mean | fit s |")
    print("|---|---|---|" + "---|" * (len(SPACES) + 3))
    for (method, calib), fits in sorted(groups.items()):
        cells = [fmt([f[0][sp] for f in fits if sp in f[0]]) if any(sp in f[0] for f in fits) else "–" for sp in SPACES]
        print(f"| {method} | {calib} | {len(fits)} | " + " | ".join(cells) + f" | {fmt([f[1] for f in fits])} | {fmt([f[2] for f in fits])} | {statistics.mean(f[3] for f in fits):.1f} |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/maps")
