"""hetfed's heterogeneous federation on Flower (flwr 1.42, Message API).

The server (`HeteroStrategy`, a Flower `Strategy` run by `Strategy.start` over the ServerApp's
Grid; `server_main` is a ServerApp main that runs it) holds the *large* model, which never leaves
it; each client (`client_app`) fine-tunes its own *small* model on its private share of a
task and replies with its LoRA factors, the identity of the base they were made from, its example
count and aggregate statistics (never examples). The server folds the round's updates into its
model with hetfed's heterogeneous strategy (`hetfed.Hetero`: projection, distillation or logit
offsets, as configured), evaluates it on its own dev data, and reports the metrics through
Flower's log and its output directory.

Both sides read one hetfed run config (the TOML of `hetfed simulate --config`): the server its
`[server]`, `[client]` and `[transfer]` tables; the client with `partition-id` i (the SuperNode's
`--node-config`, or Flower's simulation) is hetfed's client `c<i>`, with exactly the share of
`[data]` and the training round (`hetfed.train_round`) hetfed's own client has. With the same
config and seed, a Flower run therefore ends with the model `hetfed simulate` ends with.

Run config keys (`[tool.flwr.app.config]` of the app, or `flwr run --run-config`):

- `hetfed-config`: the hetfed TOML (relative paths resolve against `base-dir`, else the TOML's
  directory);
- `base-dir`: the directory the TOML's relative paths refer to ("" = the TOML's directory);
- `data-dir`: hetfed's data directory ("" = `$HETFED_DATA_DIR`, else `../shared/data`, else the
  per-user cache);
- `rounds`: rounds (0 = the TOML's `run.rounds`);
- `eval-examples`: server evaluation examples per task after every round (0 = none);
- `out-dir`: where the server writes its final model (`model/`) and `metrics.json` ("" = none);
- `round-timeout`, `wait-nodes-timeout`: seconds.
"""

from __future__ import annotations

import json
import math
import pathlib
import time
from logging import INFO, WARNING
from typing import Any, Callable, Dict, List, Optional, Tuple

import hetfed

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import Strategy
from flwr.common.logger import log

__all__ = [
    "load_config",
    "client_app",
    "HeteroStrategy",
    "server_main",
    "run_rounds",
    "update_to_records",
    "records_to_update",
    "evaluate",
]


def load_config(run_config: Dict[str, Any]) -> hetfed.Config:
    """The hetfed run config named by `run_config["hetfed-config"]` (see the module docs)."""
    path = str(run_config.get("hetfed-config", "") or "")
    if not path:
        raise ValueError("run config: expected `hetfed-config`, the path of a hetfed TOML, found none")
    p = pathlib.Path(path).expanduser()
    base = str(run_config.get("base-dir", "") or "")
    if not p.is_absolute() and base:
        p = pathlib.Path(base).expanduser() / p
    text = p.read_text(encoding="utf-8")
    return hetfed.Config.from_toml(text, base_dir=pathlib.Path(base).expanduser() if base else p.parent)


def _data_dir(run_config: Dict[str, Any]) -> Optional[str]:
    d = str(run_config.get("data-dir", "") or "")
    return d or None


# ---------------------------------------------------------------------------------------------
# What travels: an update as records
# ---------------------------------------------------------------------------------------------


def update_to_records(
    tv: hetfed.TaskVector,
    n_examples: int,
    stats: Dict[str, Any],
    client_id: str,
    metrics: Optional[Dict[str, Any]] = None,
    encoding: str = "f32",
) -> RecordDict:
    """A client's reply: `update` (ArrayRecord of the LoRA factors, float16 arrays when the
    round's `encoding` is "f16", else float32), `meta` (ConfigRecord: client id, kind, LoRA
    alpha, the base's identity, the task, label histogram, hetfed's fit metrics as JSON) and
    `metrics` (MetricRecord: `num-examples`, `num-tokens`, `label-entropy-bits`, losses). Only
    the update and aggregate statistics: never examples."""
    info = tv.info()
    arrays = tv.to_numpy()
    if encoding == "f16":  # the values already are f16 (hetfed decoded the f16 upload)
        arrays = {k: a.astype("<f2") for k, a in arrays.items()}
    base = info["base"]
    meta = ConfigRecord(
        {
            "client-id": client_id,
            "kind": str(info["kind"]),
            "lora-alpha": float(info["lora_alpha"] or 0.0),
            "base-arch": base["arch"],
            "base-config-hash": base["config_hash"],
            "base-weights-hash": base["weights_hash"],
            "task": ",".join(stats.get("tasks", [])),
            "label-hist": json.dumps(stats.get("label_hist", {}), sort_keys=True),
            "fit-metrics": json.dumps(metrics or {}, sort_keys=True),
        }
    )
    entropy = stats.get("label_entropy_bits", 0.0)
    numbers: Dict[str, Any] = {
        "num-examples": int(n_examples),
        "num-tokens": int(stats.get("n_tokens", 0)),
        "label-entropy-bits": float(entropy) if entropy is not None and math.isfinite(entropy) else 0.0,
    }
    for k in ("train_loss", "val_loss_before", "val_loss_after", "val_gain", "train_s"):
        v = (metrics or {}).get(k)
        if isinstance(v, (int, float)) and math.isfinite(v):
            numbers[k.replace("_", "-")] = float(v)
    rec = ArrayRecord({k: Array(a) for k, a in arrays.items()})
    return RecordDict({"update": rec, "meta": meta, "metrics": MetricRecord(numbers)})


def records_to_update(content: RecordDict) -> Tuple[str, hetfed.TaskVector, int, Dict[str, Any]]:
    """The inverse of `update_to_records`: `(client_id, task vector, n_examples, fit metrics)`."""
    meta = content["meta"]
    arrays = {k: v.numpy() for k, v in content["update"].items()}
    base = {
        "arch": str(meta["base-arch"]),
        "config_hash": str(meta["base-config-hash"]),
        "weights_hash": str(meta["base-weights-hash"]),
    }
    kind = str(meta["kind"])
    alpha = float(meta["lora-alpha"]) if kind == "lora" else None
    tv = hetfed.TaskVector.from_numpy(arrays, base, kind=kind, lora_alpha=alpha)
    n = int(content["metrics"]["num-examples"])
    return str(meta["client-id"]), tv, n, json.loads(str(meta["fit-metrics"]))


# ---------------------------------------------------------------------------------------------
# Client side
# ---------------------------------------------------------------------------------------------


def _partition(context: Context) -> int:
    if "partition-id" not in context.node_config:
        raise ValueError("node config: expected `partition-id` (flower-supernode --node-config 'partition-id=0')")
    return int(context.node_config["partition-id"])


def client_app() -> ClientApp:
    """A ClientApp. `query` answers with the client's id and its data statistics; `train` runs
    one round as hetfed's own client does (`hetfed.train_round` on its share of the data, under
    the server's fit configuration from the message's `fit` ConfigRecord, continuing its own
    adapter across rounds when `keep_adapter` is set: the adapter stays in the node's
    `context.state`) and answers with `update_to_records`."""
    app = ClientApp()

    @app.query()
    def _query(msg: Message, context: Context) -> Message:
        cfg = load_config(context.run_config)
        index = _partition(context)
        data = hetfed.client_data(cfg, index, data_dir=_data_dir(context.run_config))
        meta = ConfigRecord({"client-id": str(data["client_id"]), "stats": json.dumps(data["stats"], sort_keys=True)})
        return Message(RecordDict({"meta": meta}), reply_to=msg)

    @app.train()
    def _train(msg: Message, context: Context) -> Message:
        cfg = load_config(context.run_config)
        index = _partition(context)
        data_dir = _data_dir(context.run_config)
        fit = json.loads(str(msg.content["fit"]["json"]))
        rnd = int(msg.content["fit"]["round"])
        if fit.get("encoding", "f32") not in ("f32", "f16"):
            raise ValueError(f"client.encoding: hetfed.flower sends \"f32\" or \"f16\", found {fit.get('encoding')!r}")
        adapter = None
        if fit.get("keep_adapter") and "hetfed-adapter" in context.state:
            kept_round = int(context.state["hetfed-adapter-round"]["round"])
            if kept_round < rnd:
                adapter = {k: v.numpy() for k, v in context.state["hetfed-adapter"].items()}
        tv, n, metrics, trained = hetfed.train_round(cfg, index, fit, adapter=adapter, data_dir=data_dir)
        if fit.get("keep_adapter") and trained is not None:
            context.state["hetfed-adapter"] = ArrayRecord({k: Array(a) for k, a in trained.items()})
            context.state["hetfed-adapter-round"] = ConfigRecord({"round": rnd})
        stats = hetfed.client_data(cfg, index, data_dir=data_dir)
        content = update_to_records(tv, n, stats["stats"], str(stats["client_id"]), metrics, fit.get("encoding", "f32"))
        return Message(content, reply_to=msg)

    return app


# ---------------------------------------------------------------------------------------------
# Server side
# ---------------------------------------------------------------------------------------------


def evaluate(model: hetfed.Model, examples: Dict[str, List[Tuple[str, str]]]) -> Dict[str, float]:
    """Mean target negative log-likelihood per token of `model` on each task's `(prompt,
    target)` pairs (the server's own dev data), `"<task>/nll"` → value."""
    out = {}
    for task, pairs in examples.items():
        total, count = 0.0, 0
        for prompt, target in pairs:
            n_prompt = len(model.tokenize(prompt))
            ids, lp = model.score(prompt + target)
            tail = lp[n_prompt - 1:]
            total -= sum(tail)
            count += len(tail)
        if count:
            out[f"{task}/nll"] = total / count
    return out


def _wait_nodes(grid: Any, n: int, timeout: float) -> List[int]:
    deadline = time.time() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= n:
            return nodes
        if time.time() > deadline:
            raise TimeoutError(f"expected {n} SuperNodes within {timeout:.0f} s, found {len(nodes)}")
        time.sleep(0.5)


def _replies(replies: Any, what: str) -> List[Message]:
    ok = []
    for r in replies:
        if r.has_error():
            log(WARNING, "hetfed: a %s reply failed: %s", what, r.error.reason)
        else:
            ok.append(r)
    return ok


class HeteroStrategy(Strategy):
    """hetfed's heterogeneous aggregation as a Flower Message-API `Strategy`.

    The server's *large* model and the maps live in this object (`hetfed.Hetero` built from
    the hetfed config), never in Flower's `ArrayRecord`: clients train their own small models and
    nothing they need comes from the server's weights. So `start(grid, ArrayRecord(), ...)` is
    called with an empty record, `aggregate_train` returns no arrays (Flower keeps the empty
    one) and the model is read with `model()`, saved with `save(dir)`.

    `configure_train` first asks every SuperNode (`query` messages) for its hetfed client id and
    data statistics, once, then sends the fit instruction to the clients
    `Hetero.configure_fit` selects. `aggregate_train` folds the replies into the large model in
    client-id order (`Hetero.aggregate`), refusing an update whose client id is not its node's.
    There is no client-side evaluation round; `evaluate_fn(examples)` gives the server-side
    evaluation for `start(..., evaluate_fn=...)`. `history` keeps, per round, the clients, the
    aggregation weights, the applied norm and the evaluation."""

    def __init__(self, cfg: hetfed.Config, *, data_dir: Optional[str] = None, wait_nodes_timeout: float = 120.0) -> None:
        self.cfg = cfg
        self.hetero = hetfed.Hetero(cfg, data_dir=data_dir)
        self.wait_nodes_timeout = wait_nodes_timeout
        self.node_of: Dict[str, int] = {}
        self.stats: Dict[str, Dict[str, Any]] = {}
        self.history: Dict[str, Any] = {"strategy": self.hetero.name, "clients": [], "rounds": []}
        self._t0 = time.time()

    def summary(self) -> None:
        maps = json.dumps(self.hetero.run_info().get("maps", []))[:400]
        log(INFO, "\t├── hetfed strategy %s over the server's large model (kept server-side)", self.hetero.name)
        log(INFO, "\t└── maps %s", maps)

    def model(self) -> hetfed.Model:
        """The server's current large model."""
        return self.hetero.model()

    def save(self, directory: Any) -> None:
        """Writes the server's model as a Hugging Face directory."""
        self.hetero.save(directory)

    def discover(self, grid: Any) -> None:
        """Waits for a SuperNode per client of the config and learns which client each is."""
        n_clients = len(self.cfg.client_ids())
        nodes = _wait_nodes(grid, n_clients, self.wait_nodes_timeout)
        queries = [Message(RecordDict({"q": ConfigRecord({"what": "client"})}), node, "query") for node in nodes]
        for r in _replies(grid.send_and_receive(queries, timeout=self.wait_nodes_timeout), "query"):
            meta = r.content["meta"]
            cid = str(meta["client-id"])
            if cid in self.node_of:
                raise ValueError(f"two SuperNodes say they are client {cid}: give each its own partition-id")
            self.node_of[cid] = r.metadata.src_node_id
            self.stats[cid] = json.loads(str(meta["stats"]))
        self.history["clients"] = sorted(self.node_of)
        log(INFO, "hetfed: clients %s", sorted(self.node_of))

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Any) -> List[Message]:
        if not self.node_of:
            self.discover(grid)
        self._t0 = time.time()
        plan = self.hetero.configure_fit(server_round, sorted(self.node_of), self.stats)
        msgs = []
        for cid, fit in plan:
            rd = RecordDict({"fit": ConfigRecord({"json": json.dumps(fit, sort_keys=True), "round": server_round})})
            msgs.append(Message(rd, self.node_of[cid], "train", group_id=str(server_round)))
        return msgs

    def aggregate_train(self, server_round: int, replies: Any) -> Tuple[Optional[ArrayRecord], Optional[MetricRecord]]:
        updates = []
        for r in _replies(replies, "train"):
            cid, tv, n, fit_metrics = records_to_update(r.content)
            if self.node_of.get(cid) != r.metadata.src_node_id:
                log(WARNING, "hetfed: refused an update for %s from node %s", cid, r.metadata.src_node_id)
                continue
            updates.append((cid, tv, n, fit_metrics))
        if not updates:
            raise RuntimeError(f"round {server_round}: no client update arrived before the timeout")
        report = self.hetero.aggregate(server_round, updates)
        self.history["rounds"].append(
            {
                "round": server_round,
                "clients": sorted(u[0] for u in updates),
                "weights": report["weights"],
                "applied_norm": report["applied_norm"],
                "eval": {},
                "seconds": time.time() - self._t0,
            }
        )
        metrics = {"num-updates": len(updates), "applied-norm": float(report["applied_norm"])}
        metrics.update({f"weight-{cid}": float(w) for cid, w in report["weights"].items()})
        return None, MetricRecord(metrics)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Any) -> List[Message]:
        return []

    def aggregate_evaluate(self, server_round: int, replies: Any) -> Optional[MetricRecord]:
        return None

    def evaluate_fn(self, examples: Dict[str, List[Tuple[str, str]]]) -> Callable[[int, ArrayRecord], Optional[MetricRecord]]:
        """Server-side evaluation for `start`: `evaluate(model(), examples)` before the first
        round and after each, recorded in `history` too."""

        def fn(server_round: int, arrays: ArrayRecord) -> Optional[MetricRecord]:
            if not examples:
                return None
            metrics = evaluate(self.model(), examples)
            if server_round > 0 and self.history["rounds"] and self.history["rounds"][-1]["round"] == server_round:
                self.history["rounds"][-1]["eval"] = metrics
            return MetricRecord(metrics)

        return fn


def run_rounds(
    grid: Any,
    cfg: hetfed.Config,
    *,
    rounds: int,
    data_dir: Optional[str] = None,
    eval_examples: int = 0,
    round_timeout: float = 600.0,
    wait_nodes_timeout: float = 120.0,
    out_dir: Optional[str] = None,
) -> Dict[str, Any]:
    """`HeteroStrategy(cfg).start(grid, ...)` for `rounds` rounds, with server-side evaluation on
    `eval_examples` dev examples of each client task; writes the final model (`model/`) and the
    history (`metrics.json`) to `out_dir`. Returns the history."""
    strategy = HeteroStrategy(cfg, data_dir=data_dir, wait_nodes_timeout=wait_nodes_timeout)
    strategy.discover(grid)
    examples: Dict[str, List[Tuple[str, str]]] = {}
    if eval_examples > 0:
        tasks = sorted({t for s in strategy.stats.values() for t in s.get("tasks", [])})
        for t in tasks:
            examples[t] = hetfed.task_examples(t, "dev", max_examples=eval_examples, data_dir=data_dir)
    strategy.start(grid, ArrayRecord(), num_rounds=rounds, timeout=round_timeout, evaluate_fn=strategy.evaluate_fn(examples))
    history = strategy.history
    history["weights_hash"] = strategy.hetero.identity()["weights_hash"]
    if out_dir:
        out = pathlib.Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        strategy.save(out / "model")
        (out / "metrics.json").write_text(json.dumps(history, indent=1, sort_keys=True), encoding="utf-8")
    return history


def server_main(grid: Any, context: Context) -> Dict[str, Any]:
    """A ServerApp's main: `run_rounds` with the settings of the run config (module docs)."""
    rc = context.run_config
    cfg = load_config(rc)
    rounds = int(rc.get("rounds", 0)) or cfg.rounds
    return run_rounds(
        grid,
        cfg,
        rounds=rounds,
        data_dir=_data_dir(rc),
        eval_examples=int(rc.get("eval-examples", 0)),
        round_timeout=float(rc.get("round-timeout", 600.0)),
        wait_nodes_timeout=float(rc.get("wait-nodes-timeout", 120.0)),
        out_dir=str(rc.get("out-dir", "") or "") or None,
    )
