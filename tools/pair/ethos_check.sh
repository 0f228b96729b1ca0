#!/usr/bin/env bash
# Fine-tunes a base model on the Ethos train split with LoRA and evaluates it on the Ethos dev split
# before (zero-shot) and after. Usage: tools/pair/ethos_check.sh MODEL_DIR OUT_DIR [DATA_DIR]
# The numbers in models/*/MODEL_CARD.md come from this script.
set -euo pipefail
model=$1; out=$2; data=${3:-../shared/data}
hetfed=${HETFED:-target/release/hetfed}
mkdir -p "$out"
$hetfed data export --task ethos --split train --data-dir "$data" --out "$out/ethos-train.jsonl"
$hetfed eval --model "$model" --task ethos --split dev --data-dir "$data" --max-len 128 --json > "$out/zero-shot.json"
$hetfed finetune --model "$model" --train "$out/ethos-train.jsonl" --out "$out/ft" \
  --lora-rank 8 --lora-alpha 16 --lr "${LR:-1e-3}" --epochs "${EPOCHS:-6}" --batch-size 16 --warmup-steps 10 --max-len 128 --seed 0 > "$out/finetune.log"
$hetfed eval --model "$model" --adapter "$out/ft/adapter" --task ethos --split dev --data-dir "$data" --max-len 128 --json > "$out/finetuned.json"
python3 - "$out" <<'PY'
import json, sys
out = sys.argv[1]
z, f = (json.load(open(f"{out}/{n}.json")) for n in ("zero-shot", "finetuned"))
print(json.dumps({"zero_shot": z["metrics"], "finetuned": f["metrics"], "n_examples": f["n_examples"]}))
PY
