"""hetfed's heterogeneous strategy from Python and on Flower, held to hetfed's own paths:

- `PairMaps` projects a task vector as `hetfed project` does (same maps, same numbers);
- `Hetero.aggregate` over `train_round`'s updates gives, round after round, the model `hetfed
  simulate` ends with on the same tiny config;
- a Flower deployment on loopback (SuperLink, three SuperNodes, `flwr run`) of
  `examples/flower-hetero` ends with that same model, bit for bit;
- so does Flower's simulation runtime (`flwr run ... local`, Ray, three virtual SuperNodes).

The Flower tests need flwr 1.42 (`pip install 'flwr[simulation]==1.42.*'`): without it, they
fail under CI=true and are skipped otherwise. The data (../shared/data) likewise.
"""

import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

import hetfed

ROOT = pathlib.Path(__file__).resolve().parents[3]
SMALL = ROOT / "models" / "base-small"
LARGE = ROOT / "models" / "base-large"
APP = ROOT / "examples" / "flower-hetero"
CI = os.environ.get("CI") in ("true", "1")


def need(ok, why):
    if not ok:
        if CI:
            pytest.fail(why)
        pytest.skip(why)


def hetfed_bin():
    path = pathlib.Path(os.environ.get("HETFED_BIN", ROOT / "target" / "release" / "hetfed"))
    need(path.exists(), f"missing {path}: build it with `cargo build --release -p hetfed`")
    return path


def data_dir():
    d = pathlib.Path(os.environ.get("HETFED_DATA_DIR") or ROOT.parent / "shared" / "data")
    need((d / "ethos").is_dir() and (d / "copa").is_dir(), f"missing hetfed's data (ethos, copa) in {d}")
    return d


def numpy():
    try:
        import numpy as np
    except ImportError:
        need(False, "numpy is not installed")
    return np


def read_safetensors(path):
    """The f32 tensors of a safetensors file (name → ndarray), read with NumPy alone."""
    np = numpy()
    raw = pathlib.Path(path).read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    body = raw[8 + n:]
    out = {}
    for name, h in header.items():
        if name == "__metadata__":
            continue
        assert h["dtype"] == "F32", (name, h["dtype"])
        a, b = h["data_offsets"]
        out[name] = np.frombuffer(body[a:b], "<f4").reshape(h["shape"])
    return out


def assert_same_tensors(a, b):
    np = numpy()
    assert sorted(a) == sorted(b)
    differ = [k for k in a if not np.array_equal(a[k], b[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"


@pytest.fixture(scope="module")
def small_taskvec(tmp_path_factory):
    """A LoRA task vector of base-small (two steps of `hetfed.finetune`), saved."""
    pairs = [("Comment: you are great\nIs this comment hateful?", " no"),
             ("Comment: I hate them all\nIs this comment hateful?", " yes")] * 2
    tv = hetfed.finetune(SMALL, pairs, lora_rank=4, lr=0.05, max_steps=2, batch_size=2, seed=3)
    path = tmp_path_factory.mktemp("tv") / "taskvec.safetensors"
    tv.save(path)
    return path


def test_pair_maps_project_like_the_binary(small_taskvec, tmp_path):
    common = ["--small", str(SMALL), "--large", str(LARGE), "--calibration-sequences", "8",
              "--calibration-len", "16", "--seed", "5", "--cache-dir", str(tmp_path / "cache")]
    subprocess.run([str(hetfed_bin()), "project", *common, "--taskvec", str(small_taskvec),
                    "--out", str(tmp_path / "cli.safetensors")], check=True, capture_output=True, timeout=300)
    cli = hetfed.TaskVector.load(tmp_path / "cli.safetensors")
    tv = hetfed.TaskVector.load(small_taskvec)
    maps = hetfed.PairMaps.fit(SMALL, LARGE, calibration_sequences=8, calibration_len=16, seed=5)
    p = maps.project(tv)
    assert p.info()["base"] == hetfed.Model(LARGE).identity()
    assert p.info()["kind"] == "lora" and p.norm() > 0
    assert_same_tensors(p.to_numpy(), cli.to_numpy())
    # The binary's cache entry (a directory, one file per large layer) is the same maps; saved
    # and loaded again, still the same.
    cached = [p for p in (tmp_path / "cache").glob("maps-*") if p.is_dir()]
    assert len(cached) == 1
    assert_same_tensors(hetfed.PairMaps.load(cached[0]).project(tv).to_numpy(), cli.to_numpy())
    maps.save(tmp_path / "m")
    again = hetfed.PairMaps.load(tmp_path / "m")
    assert again.info()["small"] == maps.info()["small"] and again.info()["method"] == "procrustes"
    assert_same_tensors(again.project(tv).to_numpy(), cli.to_numpy())
    # Back into the small model, and refusals.
    back = maps.project_back(p)
    assert back.info()["base"] == hetfed.Model(SMALL).identity() and back.norm() > 0
    subprocess.run([str(hetfed_bin()), "project", *common, "--reverse", "--taskvec", str(tmp_path / "cli.safetensors"),
                    "--out", str(tmp_path / "back.safetensors")], check=True, capture_output=True, timeout=300)
    assert_same_tensors(back.to_numpy(), hetfed.TaskVector.load(tmp_path / "back.safetensors").to_numpy())
    with pytest.raises(hetfed.HetfedError) as e:
        maps.project(p)  # a task vector of the large model
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError):
        hetfed.PairMaps.fit(SMALL, LARGE, method="nonsense")


def tiny_toml(maps_dir):
    """Three specialist clients (two on Ethos, one on COPA) of base-small, the server on
    base-large, projection; tiny sizes (8 examples per client, 2 optimizer steps, short
    sequences), f16 uploads, each client continuing its adapter."""
    return f"""
[run]
rounds = 2
seed = 7

[server]
model = "{LARGE}"
min_clients = 3
quorum = 3
round_timeout_s = 300
register_timeout_s = 120

[server.eval]
max_len = 64
max_new_tokens = 4

[client]
epochs = 1
max_steps = 2
lr = 1e-2
batch_size = 4
max_len = 48
lora_rank = 4
lora_alpha = 8.0
encoding = "f16"
keep_adapter = true

[data]
groups = [{{ task = "ethos", clients = 2 }}, {{ task = "copa", clients = 1 }}]
max_examples_per_client = 8
val_fraction = 0.25
seed = 1

[transfer]
client_models = ["{SMALL}"]
aggregation = "projection"
calibration = "sample"
calibration_sequences = 8
calibration_len = 16
cache_dir = "{maps_dir}"
"""


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    """`hetfed simulate` of the tiny config: its final model (round 2) and the config."""
    d = tmp_path_factory.mktemp("sim")
    data = data_dir()
    (d / "tiny.toml").write_text(tiny_toml(d / "maps-sim"))
    subprocess.run([str(hetfed_bin()), "simulate", "--config", str(d / "tiny.toml"), "--out", str(d / "run"),
                    "--data-dir", str(data), "--offline"], check=True, capture_output=True, timeout=600, cwd=d)
    # The checkpoint holds what differs from the base; `hetfed export` writes the whole model.
    subprocess.run([str(hetfed_bin()), "export", str(d / "run"), "--model", str(LARGE), "--out", str(d / "model")],
                   check=True, capture_output=True, timeout=600, cwd=d)
    model = d / "model" / "model.safetensors"
    assert model.exists(), sorted(p.name for p in (d / "run").rglob("*"))[:20]
    return {"model": read_safetensors(model), "data": data}


def test_hetero_aggregate_equals_hetfed_simulate(simulated, tmp_path):
    """Rounds as hetfed's server runs them: `configure_fit`, each client's `train_round` (its
    adapter kept), `aggregate` in client-id order. Same seeds, same data: same model."""
    (tmp_path / "tiny.toml").write_text(tiny_toml(tmp_path / "maps"))
    cfg = hetfed.Config.load(tmp_path / "tiny.toml")
    assert cfg.client_ids() == ["c0", "c1", "c2"] and cfg.rounds == 2
    data = simulated["data"]
    hetero = hetfed.Hetero(cfg, data_dir=data)
    assert hetero.name == "hetero_projection"
    start = hetero.identity()["weights_hash"]
    shares = [hetfed.client_data(cfg, i, data_dir=data) for i in range(3)]
    assert [s["task"] for s in shares] == ["ethos", "ethos", "copa"]
    assert all(len(s["train"]) == 6 and len(s["val"]) == 2 for s in shares)
    stats = {s["client_id"]: s["stats"] for s in shares}
    adapters = {}
    for rnd in (1, 2):
        plan = hetero.configure_fit(rnd, cfg.client_ids(), stats)
        assert [c for c, _ in plan] == ["c0", "c1", "c2"]
        updates = []
        for cid, fit in plan:
            i = int(cid[1:])
            tv, n, metrics, adapters[cid] = hetfed.train_round(cfg, i, fit, adapter=adapters.get(cid), data_dir=data)
            assert n == 6 and metrics["train_steps"] == 2 and tv.info()["lora_alpha"] == 8.0
            updates.append((cid, tv, n, metrics))
        report = hetero.aggregate(rnd, updates[::-1])  # any order: aggregated in id order
        assert report["n_aggregated"] == 3 and report["applied_norm"] > 0
    assert hetero.identity()["weights_hash"] != start
    hetero.save(tmp_path / "model")
    assert_same_tensors(read_safetensors(tmp_path / "model" / "model.safetensors"), simulated["model"])
    assert hetfed.Model(tmp_path / "model").identity() == hetero.identity()
    with pytest.raises(ValueError):
        hetero.aggregate(3, [updates[0], updates[0]])


def test_config_round_trip_and_errors(tmp_path):
    (tmp_path / "tiny.toml").write_text(tiny_toml(tmp_path / "maps"))
    cfg = hetfed.Config.load(tmp_path / "tiny.toml")
    d = cfg.to_dict()
    assert d["transfer"]["aggregation"] == "projection"
    assert hetfed.Config.from_dict(d).to_dict() == d
    d["client"]["lr"] = -1.0
    with pytest.raises(hetfed.HetfedError) as e:
        hetfed.Config.from_dict(d)
    assert "client.lr" in str(e.value) and "\n" not in str(e.value)
    homogeneous = hetfed.Config.from_toml(f"[server]\nmodel = '{LARGE}'\n[data]\ntask = 'ethos'\nnum_clients = 2\n")
    with pytest.raises(hetfed.HetfedError, match=r"\[transfer\]"):
        hetfed.Hetero(homogeneous)


# ---------------------------------------------------------------------------------------------
# Flower
# ---------------------------------------------------------------------------------------------


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, proc, timeout):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def stop(procs):
    """Ends the processes this test started (each its own process group), SIGTERM then SIGKILL."""
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.time() + 10
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(timeout=10)


def test_flower_deployment_on_loopback_equals_hetfed_simulate(simulated, tmp_path):
    """SuperLink and three SuperNodes on free 127.0.0.1 ports, `flwr run` of
    examples/flower-hetero with the tiny config, 2 rounds. Each SuperNode is client
    `c<partition-id>` with exactly its share of hetfed simulate's data; the clients train with
    hetfed's own round (`train_round`, f16 uploads, kept adapters), the server aggregates in
    client-id order: the final model equals `hetfed simulate`'s bit for bit."""
    try:
        import flwr  # noqa: F401
        import hetfed.flower  # noqa: F401
    except ImportError as e:
        need(False, f"flwr 1.42 is not installed ({e}): pip install 'flwr==1.42.*'")
    bindir = pathlib.Path(sys.executable).parent
    need((bindir / "flower-superlink").exists(), f"missing flower-superlink next to {sys.executable}")
    (tmp_path / "tiny.toml").write_text(tiny_toml(tmp_path / "maps"))
    home = tmp_path / "flwr"
    home.mkdir()
    link = free_port()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\naddress = "127.0.0.1:{link}"\ninsecure = true\n'
    )
    env = dict(os.environ, FLWR_HOME=str(home), PATH=f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}")
    logs = tmp_path / "logs"
    logs.mkdir()
    procs = []

    def start(name, args):
        f = open(logs / f"{name}.log", "w")
        p = subprocess.Popen(args, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=tmp_path, start_new_session=True)
        f.close()
        procs.append(p)
        return p

    out = tmp_path / "out"
    t0 = time.time()
    try:
        sl = start("superlink", [str(bindir / "flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(link),
                                 "--disable-runtime-dependency-installation"])
        wait_port(link, sl, 60)
        for i in range(3):
            start(f"supernode{i}", [str(bindir / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{link}",
                                    "--host", "127.0.0.1", "--port", str(free_port()),
                                    "--node-config", f"partition-id={i} num-partitions=3"])
        rc = (f"hetfed-config='{tmp_path / 'tiny.toml'}' data-dir='{simulated['data']}' out-dir='{out}' "
              "eval-examples=2 rounds=0 wait-nodes-timeout=120.0 round-timeout=300.0")
        run = subprocess.run([str(bindir / "flwr"), "run", str(APP), "loopback", "--run-config", rc, "--stream"],
                             env=env, cwd=tmp_path, capture_output=True, text=True, timeout=200)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        deadline = time.time() + 30
        while not (out / "metrics.json").exists() and time.time() < deadline:
            time.sleep(0.5)
        assert (out / "metrics.json").exists(), run.stdout[-3000:] + "".join(
            (p.read_text()[-1500:] for p in sorted(logs.iterdir())))
    finally:
        stop(procs)
    elapsed = time.time() - t0
    history = json.loads((out / "metrics.json").read_text())
    assert [r["round"] for r in history["rounds"]] == [1, 2]
    assert all(r["clients"] == ["c0", "c1", "c2"] for r in history["rounds"])
    assert all("ethos/nll" in r["eval"] and "copa/nll" in r["eval"] for r in history["rounds"])
    assert_same_tensors(read_safetensors(out / "model" / "model.safetensors"), simulated["model"])
    assert not any(APP.glob(".flwr*")), "flwr run leaves the app directory as it was"
    print(f"flower loopback deployment: {elapsed:.1f} s")


def local_superlinks(home):
    """Pids of running local SuperLinks (`flower-superlink --simulation`) and their SuperExecs:
    those of the Flower home `home` (the SuperLink's log file is under it; its SuperExec names the
    SuperLink's pid), or any when `home` is None."""
    procs = {}
    for d in pathlib.Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            line = " ".join(a.decode(errors="replace") for a in (d / "cmdline").read_bytes().split(b"\0"))
            state = (d / "stat").read_text().split(") ")[-1][:1]
        except OSError:
            continue
        if state != "Z" and "flower-super" in line:
            procs[int(d.name)] = line
    if home is None:
        return sorted(procs)
    links = {pid for pid, line in procs.items() if str(home) in line}
    return sorted(pid for pid, line in procs.items()
                  if pid in links or any(f"--parent-pid {p} " in line + " " for p in links))


def stop_local_superlinks(home):
    """Stops the local SuperLink of the Flower home `home` and its SuperExec."""
    pids = local_superlinks(home)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + 10
        while time.time() < deadline and local_superlinks(home):
            time.sleep(0.2)
        pids = local_superlinks(home)
        if not pids:
            return


def test_flower_simulation_runtime_equals_hetfed_simulate(simulated, tmp_path):
    """`flwr run examples/flower-hetero local` with Flower's simulation runtime (Ray, three
    virtual SuperNodes, each given its `partition-id`): `HeteroStrategy` run by Flower's
    `Strategy.start` ends with `hetfed simulate`'s model, bit for bit, as the deployment does."""
    try:
        import flwr  # noqa: F401
        import ray  # noqa: F401
        import hetfed.flower  # noqa: F401
    except ImportError as e:
        need(False, f"Flower's simulation runtime is not installed ({e}): pip install 'flwr[simulation]==1.42.*'")
    bindir = pathlib.Path(sys.executable).parent
    (tmp_path / "tiny.toml").write_text(tiny_toml(tmp_path / "maps"))
    home = tmp_path / "flwr"
    home.mkdir()
    (home / "config.toml").write_text('[superlink]\ndefault = "local"\n\n[superlink.local]\noptions.num-supernodes = 3\n')
    env = dict(os.environ, FLWR_HOME=str(home), PATH=f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}")
    out = tmp_path / "out"
    rc = (f"hetfed-config='{tmp_path / 'tiny.toml'}' data-dir='{simulated['data']}' out-dir='{out}' "
          "eval-examples=2 rounds=0 wait-nodes-timeout=120.0 round-timeout=300.0")
    # `flwr run ... local` starts a local SuperLink (fixed ports) that outlives the run; one left
    # by anything else would take this run instead.
    need(not local_superlinks(None), "a local Flower SuperLink is already running: stop it first")
    t0 = time.time()
    try:
        run = subprocess.run([str(bindir / "flwr"), "run", str(APP), "local", "--run-config", rc, "--stream"],
                             env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                             start_new_session=True)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        deadline = time.time() + 30
        while not (out / "metrics.json").exists() and time.time() < deadline:
            time.sleep(0.5)
        assert (out / "metrics.json").exists(), run.stdout[-3000:] + run.stderr[-3000:]
    finally:
        stop_local_superlinks(home)
    assert not local_superlinks(home), "the local SuperLink this test started is stopped"
    history = json.loads((out / "metrics.json").read_text())
    assert [r["round"] for r in history["rounds"]] == [1, 2]
    assert all(r["clients"] == ["c0", "c1", "c2"] for r in history["rounds"])
    assert_same_tensors(read_safetensors(out / "model" / "model.safetensors"), simulated["model"])
    print(f"flower simulation runtime: {time.time() - t0:.1f} s")
