#!/usr/bin/env bash
# One heterogeneous round at the proposal's shapes, as a deployment runs it: the server (bloom-7b1
# shape) and two clients (bloom-560m shape) as separate processes over gRPC + TLS on loopback,
# each under `/usr/bin/time -v`, then each process's wall time and peak RSS and the server's time
# per phase. Needs the shapes (`python tools/scale/make_shapes.py --out runs/shapes`) and a
# release build (`cargo build --release -p hetfed`). Never run by CI (it takes about an hour here).
#
#   bash tools/scale/round.sh            # writes runs/scale/
set -euo pipefail
cd "$(dirname "$0")/../.."
bin=${HETFED:-target/release/hetfed}
out=runs/scale
for d in runs/shapes/bloom-560m runs/shapes/bloom-7b1; do
    [ -f "$d/config.json" ] || { echo "missing $d: run python tools/scale/make_shapes.py --out runs/shapes" >&2; exit 2; }
done
[ -x "$bin" ] || { echo "missing $bin: run cargo build --release -p hetfed" >&2; exit 2; }
rm -rf "$out/run" "$out/certs"
mkdir -p "$out"
"$bin" certs --out "$out/certs" --clients c0,c1 > /dev/null
# The config sits at the same depth as configs/scale/round.toml, so its relative paths still hold.
cfg="$out/round.toml"
cp configs/scale/round.toml "$cfg"
cat >> "$cfg" <<'TOML'

[deploy]
listen = "127.0.0.1:50071"
server = "https://127.0.0.1:50071"
domain = "localhost"
ca = "certs/ca.pem"
cert = "certs/server.pem"
key = "certs/server.key"
tokens = "certs/tokens.toml"
# The server evaluates a 7B model before the first round: clients wait for it.
give_up_s = 7200
TOML
/usr/bin/time -v -o "$out/server.time" "$bin" -v server --config "$cfg" --out "$out/run" > "$out/server.log" 2>&1 &
server=$!
# Clients start once the server listens (after it loaded its model and fitted or read its maps).
until grep -q "listening on" "$out/server.log"; do
    kill -0 "$server" 2> /dev/null || { cat "$out/server.log" >&2; exit 1; }
    sleep 5
done
pids=()
for c in c0 c1; do
    /usr/bin/time -v -o "$out/$c.time" "$bin" client --config "$cfg" --id "$c" --token-file "$out/certs/$c.token" \
        > "$out/$c.log" 2>&1 &
    pids+=($!)
done
wait "$server" "${pids[@]}"
for p in server c0 c1; do
    wall=$(grep "Elapsed (wall clock)" "$out/$p.time" | awk '{print $NF}')
    rss=$(grep "Maximum resident set size" "$out/$p.time" | awk '{print $NF}')
    printf '%-7s wall %s  peak RSS %.2f GiB (%s kB)\n' "$p" "$wall" "$(echo "$rss / 1048576" | bc -l)" "$rss"
done
# The server's phases, from its metrics (seconds).
python3 - "$out/run/metrics.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    e = json.loads(line)
    if e.get("event") == "run_start":
        print("maps fit s", round(e["strategy_info"]["maps"][0]["fit_s"], 1))
    elif e.get("event") == "round" and e["round"] == 0:
        print("round 0 evaluation s", round(e["server_eval_s"], 1))
    elif e.get("event") == "round":
        a = e["aggregation"]
        print("round", e["round"], "wall s", round(e["wall_s"], 1), "aggregate s", round(e["aggregate_s"], 1),
              "projection s", {k: round(v["project_s"], 1) for k, v in a["projection"].items()},
              "evaluation s", round(e["server_eval_s"], 1), "peak RSS bytes", e["server_peak_rss_bytes"])
    elif e.get("event") == "client_round":
        print("client", e["client"], "train s", round(e["train_s"], 1), "peak RSS bytes", e["peak_rss_bytes"])
PY
