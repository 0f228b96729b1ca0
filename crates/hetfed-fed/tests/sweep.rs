//! Every sweep row that trains is a run of the round loop: a `central`, `local_only`,
//! `fedavg_small` or `hetero` cell equals the `hetfed simulate` run (`assemble::simulate`) of the config a
//! user would write for it, with the same seed. Two specialist clients (Ethos, COPA), a few
//! examples and steps, on the repository's embedded models and the shared data.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use hetfed_data::DataDir;
use hetfed_fed::sweep::{read_run, run_sweep, Cell, RowKind};
use hetfed_fed::RunConfig;

const SEED: u64 = 5;
const ROUNDS: u64 = 2;

fn models() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models").canonicalize().expect("models/ is committed")
}

/// A scratch directory under the system temp dir, removed with everything in it when dropped
/// (a failing test's directory goes too: the assertion message names what went wrong).
fn tempdir(tag: &str) -> tempfile::TempDir {
    tempfile::Builder::new().prefix(&format!("hetfed-sweep-{tag}-")).tempdir().unwrap()
}

/// A run of `model` on the two specialists, with `data` added to `[data]` and `extra` at the end.
fn run_toml(model: &str, min_clients: usize, seed: u64, data: &str, extra: &str) -> String {
    format!(
        r#"
[run]
rounds = {ROUNDS}
seed = {seed}

[server]
model = "{model}"
min_clients = {min_clients}
quorum = {min_clients}

[server.eval]
max_examples = 6
general_lines = 4
max_len = 64
batch_size = 8

[client]
epochs = 1
max_steps = 2
lr = 3e-3
batch_size = 4
max_len = 48
lora_rank = 4
lora_alpha = 8.0
encoding = "f16"
keep_adapter = true

[data]
tasks = ["ethos", "copa"]
max_examples_per_client = 8
val_fraction = 0.25
seed = {seed}
{data}
{extra}"#,
        model = models().join(model).display()
    )
}

/// Runs a sweep of one row of `kind` over the heterogeneous base config; its cell for [`SEED`].
fn sweep_cell(dir: &DataDir, tmp: &Path, kind: &str) -> Cell {
    std::fs::write(tmp.join("base.toml"), run_toml("base-large", 2, 0, "", &transfer_toml(""))).unwrap();
    let sweep = tmp.join("sweep.toml");
    std::fs::write(
        &sweep,
        format!("base = \"base.toml\"\nseeds = [{SEED}]\n[[row]]\nname = \"{kind}\"\nkind = \"{kind}\"\n"),
    )
    .unwrap();
    let results = run_sweep(&sweep, dir, &tmp.join("out"), false, |_| {}).unwrap();
    assert_eq!(results.len(), 1);
    results[0].cells[&SEED].clone()
}

/// `hetfed simulate` of `toml` into `tmp/<tag>`: its final server evaluation and record.
fn simulate(dir: &DataDir, tmp: &Path, tag: &str, toml: &str) -> hetfed_fed::sweep::RunRecord {
    let cfg = RunConfig::from_toml(toml, tmp.to_path_buf(), tag).unwrap();
    let run_dir = tmp.join(tag);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().worker_threads(2).build().unwrap();
    let out = rt.block_on(hetfed_fed::assemble::simulate(&cfg, dir, &run_dir, false)).unwrap();
    let rec = read_run(&run_dir, ROUNDS).unwrap();
    assert_eq!(rec.final_eval, out.summary.final_eval, "the record is the run's own final evaluation");
    rec
}

fn setup(tag: &str) -> Option<(DataDir, tempfile::TempDir)> {
    let data = hetfed_core::testing::shared_path(env!("CARGO_MANIFEST_DIR"), "data")?;
    Some((DataDir::new(data), tempdir(tag)))
}

fn assert_metrics(cell: &BTreeMap<String, f64>, run: &BTreeMap<String, f64>) {
    assert!(cell.keys().any(|k| k.ends_with("/target_nll")) && cell.contains_key("general/ppl"), "{cell:?}");
    assert_eq!(cell, run, "the sweep cell must equal the simulate run");
}

#[test]
fn central_row_is_the_pooled_run_of_the_large_model() {
    let Some((dir, scratch)) = setup("central") else { return };
    let tmp = scratch.path();
    let cell = sweep_cell(&dir, tmp, "central");
    let run = simulate(&dir, tmp, "central-run", &run_toml("base-large", 1, SEED, "pooled = true", ""));
    assert_eq!(cell.model, "large");
    assert_metrics(&cell.metrics, &run.final_eval);
    // Both tasks are evaluated (the pooled client holds both).
    assert!(cell.metrics.keys().any(|k| k.starts_with("ethos")) && cell.metrics.keys().any(|k| k.starts_with("copa")));
}

#[test]
fn fedavg_small_row_is_the_fedavg_run_of_the_small_model() {
    let Some((dir, scratch)) = setup("fedavg") else { return };
    let tmp = scratch.path();
    let cell = sweep_cell(&dir, tmp, "fedavg_small");
    let run = simulate(&dir, tmp, "fedavg-run", &run_toml("base-small", 2, SEED, "", ""));
    assert_eq!(cell.model, "small");
    assert_metrics(&cell.metrics, &run.final_eval);
    // Bytes come from the run's events: a LoRA update up and the f32 model down per client-round.
    assert!(cell.bytes_per_client_round > 3.0e6, "{}", cell.bytes_per_client_round);
    assert_eq!(cell.bytes_per_client_round, run.bytes_per_client_round);
    assert!(cell.server_s_per_round > 0.0);
}

#[test]
fn local_only_row_is_one_run_per_client_judged_on_its_own_task() {
    let Some((dir, scratch)) = setup("local") else { return };
    let tmp = scratch.path();
    let cell = sweep_cell(&dir, tmp, "local_only");
    let runs: Vec<BTreeMap<String, f64>> = (0..2)
        .map(|i| {
            let toml = run_toml("base-small", 1, SEED, &format!("only_client = {i}"), "");
            simulate(&dir, tmp, &format!("local-run-c{i}"), &toml).final_eval
        })
        .collect();
    // Each client's run evaluates its own task only (and general text).
    assert!(runs[0].keys().all(|k| !k.starts_with("copa")), "{:?}", runs[0]);
    assert!(runs[1].keys().all(|k| !k.starts_with("ethos")), "{:?}", runs[1]);
    let mut want: BTreeMap<String, f64> = BTreeMap::new();
    for r in &runs {
        want.extend(r.iter().filter(|(k, _)| *k != "general/ppl").map(|(k, v)| (k.clone(), *v)));
    }
    want.insert("general/ppl".into(), (runs[0]["general/ppl"] + runs[1]["general/ppl"]) / 2.0);
    assert_eq!(cell.model, "small");
    assert_metrics(&cell.metrics, &want);
}

/// The `[transfer]` table of the heterogeneous base config, with `extra` lines.
fn transfer_toml(extra: &str) -> String {
    format!(
        "[transfer]\nclient_models = [\"{}\"]\naggregation = \"projection\"\n{extra}",
        models().join("base-small").display()
    )
}

#[test]
fn hetero_rows_are_runs_of_their_config_replaying_the_clients_training() {
    let Some((dir, scratch)) = setup("hetero") else { return };
    let tmp = scratch.path();
    std::fs::write(tmp.join("base.toml"), run_toml("base-large", 2, 0, "", &transfer_toml(""))).unwrap();
    let sweep = tmp.join("sweep.toml");
    std::fs::write(
        &sweep,
        format!(
            "base = \"base.toml\"\nseeds = [{SEED}]\n\
             [[row]]\nname = \"procrustes\"\nkind = \"hetero\"\n\
             [[row]]\nname = \"lars\"\nkind = \"hetero\"\ntransfer = {{ lars = 1e-4 }}\n"
        ),
    )
    .unwrap();
    let out = tmp.join("out");
    let results = run_sweep(&sweep, &dir, &out, false, |_| {}).unwrap();
    // The second row is the config a user would write for it, run by `hetfed simulate`.
    let run = simulate(
        &dir,
        tmp,
        "lars-run",
        &run_toml("base-large", 2, SEED, "", &transfer_toml(&format!("lars = 1e-4\nmaps = {{ seed = {SEED} }}"))),
    );
    let cell = &results[1].cells[&SEED];
    assert_eq!(cell.model, "large");
    assert_metrics(&cell.metrics, &run.final_eval);
    assert_eq!(cell.bytes_per_client_round, run.bytes_per_client_round);
    assert!(cell.bytes_per_client_round > 0.0 && cell.server_s_per_round > 0.0);
    assert_ne!(results[0].cells[&SEED].metrics, cell.metrics, "the rows aggregate differently");
    // The second row's clients replayed the first row's training: the same measured seconds.
    let train_s = |run: &Path| -> Vec<f64> {
        let text = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
        let v: Vec<f64> = text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|e| e["event"] == "client_round")
            .map(|e| e["train_s"].as_f64().unwrap())
            .collect();
        assert_eq!(v.len(), 2 * ROUNDS as usize, "{}", run.display());
        v
    };
    let runs = out.join("runs");
    assert_eq!(train_s(&runs.join(format!("row00-seed{SEED}"))), train_s(&runs.join(format!("row01-seed{SEED}"))));
}

#[test]
fn derived_configs_are_refused_for_rows_that_are_not_runs() {
    let scratch = tempdir("refused");
    let tmp = scratch.path();
    std::fs::write(tmp.join("base.toml"), run_toml("base-large", 2, 0, "", "")).unwrap();
    let base = tmp.join("base.toml");
    let e = hetfed_fed::sweep::derived_config(&base, 1, None, RowKind::FedavgSmall, None).unwrap_err().to_string();
    assert!(e.contains("[transfer]") && e.contains("fedavg_small"), "{e}");
    let e = hetfed_fed::sweep::derived_config(&base, 1, None, RowKind::Hetero, None).unwrap_err().to_string();
    assert!(e.contains("hetero"), "{e}");
    let e = hetfed_fed::sweep::derived_config(&base, 1, None, RowKind::LocalOnly, Some(2)).unwrap_err().to_string();
    assert!(e.contains("local_only") && e.contains("found 2"), "{e}");
    let c = hetfed_fed::sweep::derived_config(&base, 1, None, RowKind::Central, None).unwrap();
    assert!(c.data.pooled && c.transfer.is_none() && c.client_ids() == ["c0"] && c.run.seed == 1 && c.data.seed == 1);
}

/// A sweep's own `transfer` settings apply to every hetero row under the row's own (deep merge:
/// the row wins where both set a key), and every committed sweep config parses into runs of
/// its base: its rows' effective configs are valid run configs.
#[test]
fn a_sweeps_transfer_settings_apply_under_each_rows_own() {
    use hetfed_fed::sweep::{row_transfer, run_config, SweepConfig};
    let v = |s: &str| -> toml::Value { toml::from_str(s).unwrap() };
    let sweep = v("lars = 0.02\ndistill = { lora_rank = 16, lr = 5e-3 }");
    let row = v("aggregation = \"offset_distillation\"\ndistill = { lora_rank = 0 }");
    let t = row_transfer(Some(&sweep), Some(&row)).unwrap();
    assert_eq!(t["distill"]["lora_rank"].as_integer(), Some(0), "{t}");
    assert_eq!(t["distill"]["lr"].as_float(), Some(5e-3), "{t}");
    assert_eq!(t["lars"].as_float(), Some(0.02), "{t}");
    assert_eq!(t["aggregation"].as_str(), Some("offset_distillation"), "{t}");
    assert_eq!(row_transfer(Some(&sweep), None), Some(sweep.clone()));
    assert_eq!(row_transfer(None, Some(&row)), Some(row.clone()));
    assert_eq!(row_transfer(None, None), None);
    let configs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
    let mut n = 0;
    for entry in std::fs::read_dir(&configs).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if !(name.starts_with("sweep") && name.ends_with(".toml")) {
            continue;
        }
        let (sweep, dir) = SweepConfig::from_file(&path).unwrap();
        for r in sweep.rows.iter().filter(|r| r.kind == RowKind::Hetero) {
            let t = row_transfer(sweep.transfer.as_ref(), r.transfer.as_ref());
            let cfg = run_config(&dir.join(&sweep.base), 0, t.as_ref(), sweep.eval_split)
                .unwrap_or_else(|e| panic!("{name}: row {:?}: {e}", r.name));
            if let Some(lr) = t.as_ref().and_then(|t| t.get("distill")).and_then(|d| d.get("lr")) {
                assert_eq!(Some(cfg.transfer.unwrap().distill.lr), lr.as_float(), "{name}: {:?}", r.name);
            }
            n += 1;
        }
    }
    assert!(n > 40, "the committed sweeps' hetero rows: {n}");
}
