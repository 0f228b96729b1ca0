"""The Python bindings against the references hetfed's Rust side is held to: sacrebleu's and
rouge-score's values (the committed fixtures of hetfed-metrics) and the `hetfed` binary itself
(same model, same text: same numbers). Run on the built wheel:

    maturin build --release -m crates/hetfed-py/Cargo.toml -o target/wheels
    pip install --force-reinstall target/wheels/hetfed-*.whl
    pytest crates/hetfed-py/tests
"""

import json
import math
import os
import pathlib
import subprocess

import pytest

import hetfed

ROOT = pathlib.Path(__file__).resolve().parents[3]
FIXTURES = ROOT / "crates" / "hetfed-metrics" / "tests" / "fixtures"
SMALL = ROOT / "models" / "base-small"
LARGE = ROOT / "models" / "base-large"


def hetfed_bin():
    """The `hetfed` binary (`HETFED_BIN`, else target/release/hetfed); under CI=true it must exist."""
    path = pathlib.Path(os.environ.get("HETFED_BIN", ROOT / "target" / "release" / "hetfed"))
    if not path.exists():
        if os.environ.get("CI") in ("true", "1"):
            pytest.fail(f"missing {path}: build it with `cargo build --release -p hetfed`")
        pytest.skip(f"missing {path}: build it with `cargo build --release -p hetfed`")
    return path


def run_json(*args):
    out = subprocess.run([str(hetfed_bin()), *args], check=True, capture_output=True, text=True, timeout=300)
    return json.loads(out.stdout)


def test_bleu_and_chrf_equal_sacrebleu():
    sets = json.loads((FIXTURES / "mt.json").read_text())["sets"]
    assert sets
    for s in sets:
        assert hetfed.bleu(s["hyps"], s["refs"]) == pytest.approx(s["bleu"]["score"], abs=1e-9), s["name"]
        assert hetfed.chrf(s["hyps"], s["refs"]) == pytest.approx(s["chrf"], abs=1e-9), s["name"]
        assert hetfed.chrf(s["hyps"], s["refs"], word_order=2) == pytest.approx(s["chrf_pp"], abs=1e-9), s["name"]


def test_rouge_equals_rouge_score():
    sets = [s for s in json.loads((FIXTURES / "rouge.json").read_text())["sets"] if s["lang"] == "english"]
    assert sets
    for s in sets:
        for key, stem in (("default", False), ("default_stem", True)):
            for ex, want in zip(s["examples"], s[key]["per_example"]):
                got = hetfed.rouge(ex["refs"], ex["hyp"], use_stemmer=stem)
                f = [got[m]["fmeasure"] for m in ("rouge1", "rouge2", "rougeL")]
                assert f == pytest.approx(want, abs=1e-9), (s["name"], key, ex["hyp"])


def test_metric_errors_are_hetfed_errors_of_one_line():
    with pytest.raises(hetfed.HetfedError) as e:
        hetfed.bleu(["a", "b"], [["only one reference"]])
    assert "\n" not in str(e.value) and str(e.value)


def test_score_equals_the_binary():
    text = "The committee met on Tuesday to discuss the new budget."
    model = hetfed.Model(SMALL)
    ids, logprobs = model.score(text)
    cli = run_json("score", "--model", str(SMALL), "--text", text, "--json")
    assert ids == cli["tokens"]
    assert len(logprobs) == len(ids) - 1
    assert logprobs == pytest.approx(cli["logprobs"], abs=1e-5)
    assert all(lp <= 0.0 for lp in logprobs)


def test_generate_equals_the_binary():
    model = hetfed.Model(SMALL)
    cli = run_json("generate", "--model", str(SMALL), "--prompt", "The weather", "--max-new-tokens", "8", "--json")
    assert model.generate("The weather", max_new_tokens=8) == cli["text"]
    with pytest.raises(ValueError):
        model.generate("The weather", max_new_tokens=0)


def test_model_facts_and_a_missing_directory():
    model = hetfed.Model(SMALL)
    assert model.model_type == "bloom"
    assert model.vocab_size == 8192
    assert set(model.identity()) == {"arch", "config_hash", "weights_hash"}
    with pytest.raises(hetfed.HetfedError) as e:
        hetfed.Model(ROOT / "no-such-model")
    assert "no-such-model" in str(e.value) and "\n" not in str(e.value)


@pytest.fixture(scope="module")
def lora_taskvec(tmp_path_factory):
    """A LoRA task vector from two steps of `hetfed finetune` on base-small."""
    d = tmp_path_factory.mktemp("ft")
    train = d / "train.jsonl"
    rows = [
        {"prompt": "Comment: you are great\nIs this comment hateful?", "target": " no"},
        {"prompt": "Comment: I hate them all\nIs this comment hateful?", "target": " yes"},
    ]
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    subprocess.run(
        [str(hetfed_bin()), "finetune", "--model", str(SMALL), "--train", str(train), "--out", str(d / "out"),
         "--lora-rank", "4", "--lr", "0.05", "--max-steps", "2", "--batch-size", "2"],
        check=True, capture_output=True, timeout=300,
    )
    return d / "out" / "taskvec.safetensors"


def test_task_vector_algebra_and_files(lora_taskvec, tmp_path):
    tv = hetfed.TaskVector.load(lora_taskvec)
    info = tv.info()
    assert info["kind"] == "lora"
    assert info["base"] == hetfed.Model(SMALL).identity()
    n = tv.norm()
    assert n > 0 and math.isclose(info["norm"], n)
    assert math.isclose((tv * 2.0).norm(), 2 * n, rel_tol=1e-5)
    assert math.isclose((3.0 * tv).norm(), 3 * n, rel_tol=1e-5)
    assert (tv + (-tv)).norm() == pytest.approx(0.0, abs=1e-4 * n)
    tv.save(tmp_path / "tv.safetensors")
    again = hetfed.TaskVector.load(tmp_path / "tv.safetensors")
    assert again.norm() == pytest.approx(n, rel=1e-6)
    with pytest.raises(ValueError):
        tv.save(tmp_path / "x.safetensors", dtype="f64")


def test_a_task_vector_scores_like_the_binary_and_refuses_another_base(lora_taskvec):
    text = "Comment: I hate them all\nIs this comment hateful? yes"
    tuned = hetfed.Model(SMALL, taskvec=hetfed.TaskVector.load(lora_taskvec))
    _, lp = tuned.score(text)
    cli = run_json("score", "--model", str(SMALL), "--taskvec", str(lora_taskvec), "--text", text, "--json")
    assert lp == pytest.approx(cli["logprobs"], abs=1e-5)
    assert lp != pytest.approx(hetfed.Model(SMALL).score(text)[1], abs=1e-5)
    with pytest.raises(hetfed.HetfedError):
        hetfed.Model(LARGE, taskvec=hetfed.TaskVector.load(lora_taskvec))


def test_finetune_returns_a_task_vector_that_lowers_the_training_loss():
    pairs = [("Comment: you are great\nIs this comment hateful?", " no"),
             ("Comment: I hate them all\nIs this comment hateful?", " yes")] * 4
    tv = hetfed.finetune(SMALL, pairs, lora_rank=4, lr=0.05, epochs=3, batch_size=4, seed=1)
    assert tv.info()["kind"] == "lora" and tv.norm() > 0

    def nll(model):
        total = 0.0
        for prompt, target in pairs[:2]:
            n_prompt = len(model.tokenize(prompt))
            _, lp = model.score(prompt + target)
            total -= sum(lp[n_prompt - 1:])
        return total

    assert nll(hetfed.Model(SMALL, taskvec=tv)) < nll(hetfed.Model(SMALL))
    again = hetfed.finetune(SMALL, pairs, lora_rank=4, lr=0.05, epochs=3, batch_size=4, seed=1)
    assert (tv + (-again)).norm() == pytest.approx(0.0, abs=1e-6), "deterministic under the seed"
    assert hetfed.finetune(SMALL, pairs[:2], lora_rank=0, max_steps=1, batch_size=2).info()["kind"] == "full"
    with pytest.raises(ValueError):
        hetfed.finetune(SMALL, [])
    with pytest.raises(hetfed.HetfedError):
        hetfed.finetune(SMALL, pairs, batch_size=0)


def test_numpy_round_trip_keeps_the_task_vector(lora_taskvec):
    np = pytest.importorskip("numpy") if os.environ.get("CI") not in ("true", "1") else __import__("numpy")
    tv = hetfed.TaskVector.load(lora_taskvec)
    arrays = tv.to_numpy()
    assert arrays and all(a.dtype == np.float32 for a in arrays.values())
    a_names = [k for k in arrays if k.endswith(".lora_A")]
    assert a_names and all(arrays[k].shape[0] == 4 for k in a_names), "rank 4 factors"
    info = tv.info()
    back = hetfed.TaskVector.from_numpy(arrays, info["base"], kind="lora", lora_alpha=8.0)
    assert back.norm() == pytest.approx(tv.norm(), rel=1e-6)
    assert (back + (-tv)).norm() == pytest.approx(0.0, abs=1e-5 * tv.norm())
    # Arrays scaled in NumPy (B only, so the update scales once) come back as the scaled vector.
    scaled = {k: (2.0 * a if k.endswith(".lora_B") else a) for k, a in arrays.items()}
    two = hetfed.TaskVector.from_numpy(scaled, info["base"], kind="lora", lora_alpha=8.0)
    assert two.norm() == pytest.approx(2 * tv.norm(), rel=1e-5)
    dense = hetfed.TaskVector.from_numpy({"x.weight": np.ones((2, 3))}, info["base"])
    assert dense.info()["kind"] == "full" and dense.norm() == pytest.approx(6 ** 0.5)
    with pytest.raises(ValueError):
        hetfed.TaskVector.from_numpy(arrays, {"arch": "bloom"}, kind="lora", lora_alpha=8.0)
    with pytest.raises(ValueError):
        hetfed.TaskVector.from_numpy(arrays, info["base"], kind="lora")


def test_eval_task_equals_the_binary():
    data = pathlib.Path(os.environ.get("HETFED_DATA_DIR") or ROOT.parent / "shared" / "data")
    if not (data / "copa").is_dir() or not (data / "tico19").is_dir():
        if os.environ.get("CI") in ("true", "1"):
            pytest.fail(f"missing hetfed's data (copa, tico19) in {data}")
        pytest.skip(f"missing hetfed's data (copa, tico19) in {data}")
    model = hetfed.Model(SMALL)
    for task, extra in (("copa", []), ("tico:en-hi", ["--max-new-tokens", "8"])):
        cli = run_json("eval", "--model", str(SMALL), "--task", task, "--limit", "6", "--data-dir", str(data),
                       "--offline", "--json", *extra)
        got = model.eval_task(task, limit=6, data_dir=data, max_new_tokens=8 if extra else 64)
        assert set(got) == set(cli["metrics"]) and "target_nll" in got, (task, got)
        assert got == pytest.approx(cli["metrics"], abs=1e-9), task
    with pytest.raises(ValueError):
        model.eval_task("copa", batch_size=0)
    with pytest.raises(hetfed.HetfedError) as e:
        model.eval_task("no-such-task", data_dir=data)
    assert "no-such-task" in str(e.value)


def test_classes_are_named_in_the_hetfed_package():
    for cls in (hetfed.Model, hetfed.TaskVector, hetfed.PairMaps, hetfed.Config, hetfed.Hetero):
        assert cls.__module__ == "hetfed", cls
        assert getattr(hetfed, cls.__name__) is cls
    assert repr(hetfed.Model(SMALL)).startswith("<hetfed.Model object")
