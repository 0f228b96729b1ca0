//! The federated runtime end to end with real processes on loopback: one `hetfed server` and
//! three `hetfed client`s over gRPC + TLS against the in-process `hetfed simulate`, a client
//! killed mid-round, and a server killed and resumed. Every wait is bounded.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_hetfed"))
}

/// A scratch directory under the system temp dir, removed with everything in it when dropped
/// (a failing test's directory goes too: the assertion message names what went wrong).
fn tempdir(tag: &str) -> tempfile::TempDir {
    tempfile::Builder::new().prefix(&format!("hetfed-fed-{tag}-")).tempdir().unwrap()
}

fn model_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../models/base-small")
        .canonicalize()
        .expect("models/base-small is committed")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A small, fast run: three IID clients with 16 Ethos examples each, a few LoRA steps per round.
fn write_config(dir: &Path, rounds: u64, round_timeout_s: f64, port: u16) -> PathBuf {
    write_config_with(dir, rounds, round_timeout_s, port, &model_dir(), "")
}

/// The same run made heterogeneous: the server holds base-large, clients train base-small.
fn write_hetero_config(dir: &Path, rounds: u64, port: u16) -> PathBuf {
    let small = model_dir();
    let large = small.parent().unwrap().join("base-large");
    let transfer = format!(
        "\n[transfer]\nclient_models = [\"{}\"]\ncalibration_sequences = 16\ncalibration_len = 16\ncache_dir = \"{}\"\nlars = 0.02\n",
        small.display(),
        dir.join("maps").display()
    );
    write_config_with(dir, rounds, 120.0, port, &large, &transfer)
}

fn write_config_with(dir: &Path, rounds: u64, round_timeout_s: f64, port: u16, model: &Path, extra: &str) -> PathBuf {
    let cfg = format!(
        r#"
[run]
rounds = {rounds}
seed = 3

[server]
model = "{model}"
min_clients = 3
quorum = 2
round_timeout_s = {round_timeout_s}
register_timeout_s = 90

[server.eval]
tasks = ["ethos"]
max_examples = 24

[strategy]
name = "fedavg"

[client]
epochs = 1
max_steps = 3
batch_size = 4
lr = 3e-3
max_len = 64
lora_rank = 4
encoding = "f16"

[data]
task = "ethos"
num_clients = 3
partition = {{ scheme = "iid" }}
max_examples_per_client = 16
val_fraction = 0.25

[deploy]
listen = "127.0.0.1:{port}"
server = "https://127.0.0.1:{port}"
domain = "localhost"
ca = "certs/ca.pem"
cert = "certs/server.pem"
key = "certs/server.key"
tokens = "certs/tokens.toml"
{extra}"#,
        model = model.display()
    );
    let p = dir.join("run.toml");
    std::fs::write(&p, cfg).unwrap();
    let out = bin().args(["certs", "--out"]).arg(dir.join("certs")).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    p
}

/// Kills its process when dropped, so a failing test leaves nothing running.
struct Proc(Child, &'static str);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Proc {
    /// Waits for a clean exit, at most `limit`.
    fn finish(&mut self, limit: Duration) {
        let t = Instant::now();
        loop {
            if let Some(st) = self.0.try_wait().unwrap() {
                let mut err = String::new();
                if let Some(mut e) = self.0.stderr.take() {
                    use std::io::Read;
                    let _ = e.read_to_string(&mut err);
                }
                assert!(st.success(), "{} exited with {st}: {err}", self.1);
                return;
            }
            assert!(t.elapsed() < limit, "{} still running after {limit:?}", self.1);
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn server(cfg: &Path, data: &Path, out: &Path, resume: bool) -> Proc {
    let mut c = bin();
    c.arg("server").arg("--config").arg(cfg).arg("--data-dir").arg(data).arg("--out").arg(out);
    if resume {
        c.arg("--resume");
    }
    Proc(c.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap(), "server")
}

fn client(cfg: &Path, data: &Path, id: &str, log: bool) -> Proc {
    let dir = cfg.parent().unwrap();
    let mut c = bin();
    c.arg("client")
        .arg("--config")
        .arg(cfg)
        .arg("--data-dir")
        .arg(data)
        .args(["--id", id])
        .arg("--token-file")
        .arg(dir.join(format!("certs/{id}.token")));
    if log {
        c.env("HETFED_LOG", "info");
    }
    Proc(c.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap(), "client")
}

fn events(run_dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn round_event(run_dir: &Path, round: u64) -> Option<Value> {
    events(run_dir).into_iter().find(|e| e["event"] == "round" && e["round"] == round)
}

fn wait_for(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < limit, "timed out after {limit:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn simulate(cfg: &Path, data: &Path, out: &Path) {
    let o = bin()
        .arg("simulate")
        .arg("--config")
        .arg(cfg)
        .arg("--data-dir")
        .arg(data)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap();
    assert!(o.status.success(), "simulate failed: {}", String::from_utf8_lossy(&o.stderr));
}

const LIMIT: Duration = Duration::from_secs(300);

/// The run simulated in `dir/sim`, then deployed in `dir/srv`: one server and three client
/// processes over gRPC + TLS, each finished within its limit.
fn simulate_then_deploy(cfg: &Path, data: &Path, dir: &Path) {
    simulate(cfg, data, &dir.join("sim"));
    let mut srv = server(cfg, data, &dir.join("srv"), false);
    let mut clients: Vec<Proc> = ["c0", "c1", "c2"].iter().map(|id| client(cfg, data, id, false)).collect();
    srv.finish(LIMIT);
    for c in &mut clients {
        c.finish(Duration::from_secs(60));
    }
}

#[test]
fn grpc_deployment_equals_the_in_memory_simulation() {
    let Some(data) = hetfed_core::testing::shared_path(env!("CARGO_MANIFEST_DIR"), "data/ethos") else { return };
    let data = data.parent().unwrap().to_path_buf();
    let scratch = tempdir("equal");
    let dir = scratch.path();
    let cfg = write_config(dir, 2, 120.0, free_port());
    simulate_then_deploy(&cfg, &data, dir);
    for round in 1..=2 {
        let (a, b) = (round_event(&dir.join("sim"), round).unwrap(), round_event(&dir.join("srv"), round).unwrap());
        assert_eq!(a["ok"], 3, "round {round}: {a}");
        assert_eq!(a["model_version"], b["model_version"], "round {round}: simulation and deployment diverge");
        assert_eq!(a["server_eval"], b["server_eval"]);
        assert_eq!(a["bytes_up"], b["bytes_up"]);
    }
    assert!(dir.join("srv/report.html").exists() && dir.join("sim/report.html").exists());
    // The model moved: round 2's model differs from round 1's.
    assert_ne!(
        round_event(&dir.join("srv"), 1).unwrap()["model_version"],
        round_event(&dir.join("srv"), 2).unwrap()["model_version"]
    );
}

#[test]
fn heterogeneous_grpc_deployment_equals_the_simulation() {
    let Some(data) = hetfed_core::testing::shared_path(env!("CARGO_MANIFEST_DIR"), "data/ethos") else { return };
    let data = data.parent().unwrap().to_path_buf();
    let scratch = tempdir("hetero");
    let dir = scratch.path();
    let cfg = write_hetero_config(dir, 2, free_port());
    // The server process finds the maps the simulation fitted in the shared cache.
    simulate_then_deploy(&cfg, &data, dir);
    for round in 1..=2 {
        let (a, b) = (round_event(&dir.join("sim"), round).unwrap(), round_event(&dir.join("srv"), round).unwrap());
        assert_eq!(a["ok"], 3, "round {round}: {a}");
        assert_eq!(a["model_version"], b["model_version"], "round {round}: simulation and deployment diverge");
        assert_eq!(a["server_eval"], b["server_eval"]);
        // Every client's alpha is logged with its parts; clients never download the large model.
        for id in ["c0", "c1", "c2"] {
            assert!(b["aggregation"]["alpha"][id]["alpha"].as_f64().unwrap() > 0.0, "{b}");
        }
        assert_eq!(b["bytes_down"], 0, "{b}");
    }
    assert_ne!(
        round_event(&dir.join("srv"), 1).unwrap()["model_version"],
        round_event(&dir.join("srv"), 2).unwrap()["model_version"]
    );
    assert_eq!(std::fs::read_dir(dir.join("maps")).unwrap().count(), 1, "one cached map file for the pair");
}

#[test]
fn a_killed_client_fails_its_round_and_rejoins_the_next() {
    let Some(data) = hetfed_core::testing::shared_path(env!("CARGO_MANIFEST_DIR"), "data/ethos") else { return };
    let data = data.parent().unwrap().to_path_buf();
    let scratch = tempdir("kill-client");
    let dir = scratch.path();
    let cfg = write_config(dir, 2, 15.0, free_port());
    let run = dir.join("srv");
    let mut srv = server(&cfg, &data, &run, false);
    let mut c0 = client(&cfg, &data, "c0", false);
    let mut c1 = client(&cfg, &data, "c1", false);
    // c2 dies right after registering: round 1 (which starts once all three are registered) selects it.
    let mut c2 = client(&cfg, &data, "c2", true);
    let mut lines = BufReader::new(c2.0.stderr.take().unwrap()).lines();
    let t = Instant::now();
    loop {
        let line = lines.next().expect("c2 exited before registering").unwrap();
        if line.contains("registered with run") {
            break;
        }
        assert!(t.elapsed() < LIMIT, "c2 never registered");
    }
    drop(c2);
    wait_for(LIMIT, "round 1 to close", || round_event(&run, 1).is_some());
    let mut c2 = client(&cfg, &data, "c2", false);
    srv.finish(LIMIT);
    for c in [&mut c0, &mut c1, &mut c2] {
        c.finish(Duration::from_secs(60));
    }
    let ev = events(&run);
    let status = |round: u64, id: &str| {
        ev.iter().find(|e| e["event"] == "client_round" && e["round"] == round && e["client"] == id).cloned().unwrap()
    };
    let r1 = status(1, "c2");
    assert_eq!(r1["status"], "failed", "{r1}");
    assert!(r1["reason"].as_str().unwrap().contains("deadline"), "{r1}");
    assert_eq!(round_event(&run, 1).unwrap()["ok"], 2, "round 1 aggregates by quorum");
    assert_eq!(round_event(&run, 1).unwrap()["aggregated"], true);
    assert_eq!(status(2, "c2")["status"], "ok", "c2 rejoins in round 2");
    assert_eq!(round_event(&run, 2).unwrap()["ok"], 3);
}

#[test]
fn a_server_killed_after_round_two_resumes_to_the_same_model() {
    let Some(data) = hetfed_core::testing::shared_path(env!("CARGO_MANIFEST_DIR"), "data/ethos") else { return };
    let data = data.parent().unwrap().to_path_buf();
    let scratch = tempdir("resume");
    let dir = scratch.path();
    let cfg = write_config(dir, 3, 120.0, free_port());
    simulate(&cfg, &data, &dir.join("sim"));
    let run = dir.join("srv");
    let srv = server(&cfg, &data, &run, false);
    let mut clients: Vec<Proc> = ["c0", "c1", "c2"].iter().map(|id| client(&cfg, &data, id, false)).collect();
    let latest = run.join("checkpoints/LATEST");
    wait_for(LIMIT, "the round-2 checkpoint", || std::fs::read_to_string(&latest).is_ok_and(|s| s.trim() == "round-2"));
    drop(srv); // SIGKILL
    let mut srv = server(&cfg, &data, &run, true);
    srv.finish(LIMIT);
    for c in &mut clients {
        c.finish(Duration::from_secs(60));
    }
    let (a, b) = (round_event(&dir.join("sim"), 3).unwrap(), round_event(&run, 3).unwrap());
    assert_eq!(a["model_version"], b["model_version"], "resumed run diverges from the uninterrupted one");
    assert_eq!(a["server_eval"], b["server_eval"]);
    let rounds: Vec<u64> =
        events(&run).iter().filter(|e| e["event"] == "round").filter_map(|e| e["round"].as_u64()).collect();
    assert_eq!(rounds, vec![0, 1, 2, 3], "each round logged once");
}

#[test]
fn a_client_with_a_wrong_token_is_refused() {
    let Some(data) = hetfed_core::testing::shared_path(env!("CARGO_MANIFEST_DIR"), "data/ethos") else { return };
    let data = data.parent().unwrap().to_path_buf();
    let scratch = tempdir("auth");
    let dir = scratch.path();
    let cfg = write_config(dir, 1, 30.0, free_port());
    let _srv = server(&cfg, &data, &dir.join("srv"), false);
    std::fs::write(dir.join("bad.token"), "not-the-token").unwrap();
    let out = bin()
        .arg("client")
        .arg("--config")
        .arg(&cfg)
        .arg("--data-dir")
        .arg(&data)
        .args(["--id", "c1", "--token-file"])
        .arg(dir.join("bad.token"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("unauthenticated") && err.contains("wrong token"), "{err}");
    assert!(!err.contains("not-the-token"), "the token leaked into the error: {err}");
}

/// An offset-distillation `[transfer]` section for base-small clients: the given extra
/// `[transfer]`, `[transfer.offset]` and `[transfer.distill]` lines (each ending in a newline),
/// maps cached in `maps`.
fn offset_transfer(maps: &Path, transfer: &str, offset: &str, distill: &str) -> String {
    format!(
        "\n[transfer]\nclient_models = [\"{}\"]\naggregation = \"offset_distillation\"\n{transfer}calibration = \"text\"\ncalibration_sequences = 16\ncalibration_len = 16\ncache_dir = \"{}\"\n[transfer.offset]\nsequences = \"mixed\"\nseq_len = 32\n{offset}[transfer.distill]\nbatch_size = 4\n{distill}",
        model_dir().display(),
        maps.display()
    )
}

/// Logit-offset distillation through the real round loop, deployed over gRPC + TLS exactly as
/// simulated: three Ethos clients on base-small, the server distils their offsets into
/// base-large on synthetic examples in Ethos's format and its general text.
#[test]
fn offset_distillation_deployed_equals_the_simulation_and_lowers_the_kl() {
    let Some(data) = hetfed_core::testing::shared_path(env!("CARGO_MANIFEST_DIR"), "data/ethos") else { return };
    let data = data.parent().unwrap().to_path_buf();
    let scratch = tempdir("offset");
    let dir = scratch.path();
    let large = model_dir().parent().unwrap().join("base-large");
    let transfer = offset_transfer(
        &dir.join("maps"),
        "",
        "sampled_per_task = 6\ngeneral_sequences = 6\nloss = \"answer\"\nheldout_per_task = 2\nscales = [1.0, 2.0]\n",
        "steps = 4\n",
    );
    let cfg = write_config_with(dir, 1, 120.0, free_port(), &large, &transfer);
    simulate_then_deploy(&cfg, &data, dir);
    let (a, b) = (round_event(&dir.join("sim"), 1).unwrap(), round_event(&dir.join("srv"), 1).unwrap());
    assert_eq!(a["model_version"], b["model_version"], "deployment and simulation end on the same model");
    assert_eq!(a["server_eval"], b["server_eval"]);
    let o = &a["aggregation"]["offset"];
    assert_eq!(o["routed"], true, "{o}");
    assert_eq!(o["sequences"], 12, "{o}");
    assert!(o["kl_after"].as_f64().unwrap() < o["kl_before"].as_f64().unwrap(), "{o}");
    // Per task, the student's KL on its examples before and after, each weighing 1 (no balance).
    let t = &o["kl_by_task"]["ethos"];
    assert!(t["kl_before"].as_f64().unwrap() > 0.0 && t["kl_after"].as_f64().unwrap().is_finite(), "{o}");
    assert_eq!(t["weight"], 1.0, "{o}");
    assert!(a["server_eval"]["ethos/target_nll"].is_number(), "{a}");
    // `loss = "answer"`: the sampled examples count only their answers (a label word and eos).
    let answer = o["positions"]["ethos"].as_u64().unwrap();
    assert!((6..=6 * 31).contains(&answer) && answer < o["positions"]["general"].as_u64().unwrap(), "{o}");
    // The held-out diagnostic: the student's KL on unseen examples, before and after.
    let h = &o["heldout_kl"]["ethos"];
    assert_eq!(h["examples"], 2, "{o}");
    assert!(h["before"].as_f64().unwrap() > 0.0 && h["after"].as_f64().unwrap().is_finite(), "{o}");
    // The scale of the distilled change: of the two candidates, the one with the lower mean
    // held-out KL over the sets (Ethos's answers and general text), and `after` is its KL.
    let sets = o["heldout_kl"].as_object().unwrap();
    assert_eq!(sets.keys().collect::<Vec<_>>(), ["(general)", "ethos"], "{o}");
    let mean = |s: &str| sets.values().map(|v| v["by_scale"][s].as_f64().unwrap()).sum::<f64>() / 2.0;
    let (chosen, other) = if mean("1") <= mean("2") { ("1", "2") } else { ("2", "1") };
    assert_eq!(o["scale"].as_f64().unwrap().to_string(), chosen, "{o}");
    assert!(mean(chosen) <= mean(other), "{o}");
    assert_eq!(h["after"], h["by_scale"][chosen], "{o}");
}

/// One student per task (`offset.students = "per_task_local"`): two specialists (Ethos, COPA),
/// each task's student distils its own teacher and keeps the other task's examples where they
/// start; the round reports each student's KL and the summed change's KL over every sequence.
#[test]
fn per_task_students_each_lower_their_own_kl_and_the_sum_lowers_the_whole() {
    let Some(data) = hetfed_core::testing::shared_path(env!("CARGO_MANIFEST_DIR"), "data/ethos") else { return };
    let data = data.parent().unwrap().to_path_buf();
    let scratch = tempdir("per-task");
    let dir = scratch.path();
    let large = model_dir().parent().unwrap().join("base-large");
    let transfer = offset_transfer(
        &dir.join("maps"),
        "",
        "sampled_per_task = 4\ngeneral_sequences = 4\nstudents = \"per_task_local\"\n",
        "steps = 6\nlr = 2e-3\n",
    );
    let cfg = write_config_with(dir, 1, 120.0, free_port(), &large, &transfer);
    let text = std::fs::read_to_string(&cfg).unwrap();
    let text = text
        .replace("task = \"ethos\"\nnum_clients = 3", "tasks = [\"ethos\", \"copa\"]\nclients_per_task = 1")
        .replace("min_clients = 3", "min_clients = 2")
        // Specialists that move: their offsets are what the students learn.
        .replace("max_steps = 3\nbatch_size = 4\nlr = 3e-3", "max_steps = 16\nbatch_size = 4\nlr = 1e-2");
    assert!(text.contains("clients_per_task") && text.contains("max_steps = 16"), "the template changed: {text}");
    std::fs::write(&cfg, text).unwrap();
    simulate(&cfg, &data, &dir.join("sim"));
    let o = &round_event(&dir.join("sim"), 1).unwrap()["aggregation"]["offset"];
    let students = o["students"].as_object().unwrap_or_else(|| panic!("no students: {o}"));
    assert_eq!(students.keys().collect::<Vec<_>>(), ["copa", "ethos"], "{o}");
    for (task, s) in students {
        // Each student sees every sequence: its task's, the general text and the other task's.
        assert_eq!(s["sequences"], 12, "{task}: {o}");
        assert!(s["kl_after"].as_f64().unwrap() < s["kl_before"].as_f64().unwrap(), "{task}: {o}");
    }
    assert!(o["kl_after"].as_f64().unwrap() < o["kl_before"].as_f64().unwrap(), "the summed change: {o}");
    assert_eq!(o["steps"], 12, "two students of 6 steps: {o}");
}

/// Anchored offset distillation (`transfer.anchor = true`): every round's student starts from
/// the server's first model L0, so round 2 starts where round 1 did. Observed on the held-out
/// general windows (the same windows every round, taught by L0): anchored, round 2's KL before
/// distilling is round 1's (L0 against itself); not anchored, it is round 1's KL after (the
/// merged model).
#[test]
fn anchored_offset_distillation_starts_every_round_from_the_first_model() {
    let Some(data) = hetfed_core::testing::shared_path(env!("CARGO_MANIFEST_DIR"), "data/ethos") else { return };
    let data = data.parent().unwrap().to_path_buf();
    let scratch = tempdir("anchored-offset");
    let large = model_dir().parent().unwrap().join("base-large");
    let general = |anchor: bool| -> Vec<(f64, f64)> {
        let dir = scratch.path().join(format!("anchor-{anchor}"));
        std::fs::create_dir_all(&dir).unwrap();
        let transfer = offset_transfer(
            &scratch.path().join("maps"),
            &format!("anchor = {anchor}\n"),
            "sampled_per_task = 4\ngeneral_sequences = 4\nheldout_per_task = 2\n",
            "steps = 4\nlr = 1e-2\n",
        );
        let cfg = write_config_with(&dir, 2, 120.0, free_port(), &large, &transfer);
        simulate(&cfg, &data, &dir.join("sim"));
        (1..=2)
            .map(|r| {
                let h = &round_event(&dir.join("sim"), r).unwrap()["aggregation"]["offset"]["heldout_kl"]["(general)"];
                (h["before"].as_f64().unwrap(), h["after"].as_f64().unwrap())
            })
            .collect()
    };
    let free = general(false);
    let anchored = general(true);
    // Round 1 is the same run either way: the student starts from L0.
    assert_eq!(free[0], anchored[0], "round 1");
    assert!((free[0].1 - free[0].0).abs() > 1e-5, "round 1 moves the model on general text: {free:?}");
    // Round 2 starts from the merged model, or from L0 again.
    assert!((free[1].0 - free[0].1).abs() < 1e-6, "not anchored: round 2 starts after round 1: {free:?}");
    assert!((anchored[1].0 - anchored[0].0).abs() < 1e-6, "anchored: round 2 starts from L0: {anchored:?}");
}

/// The embedded default (`hetfed simulate` with no arguments): six specialists on six tasks,
/// offset distillation into the large model. It finishes within its budget and the server's
/// target NLL improves on the tasks whose specialists improve on unseen text. ILSUM is left out:
/// its specialist does not improve on the dev split (neither does the centrally fine-tuned large
/// model; EXPERIMENTS.md).
///
/// It runs as on a fresh clone (issue 16): a working directory with the repository's `models/`
/// but no `../shared`, a home of its own, no data directory given, and a loopback mirror of
/// `../shared/data` standing in for the internet (`HETFED_MIRROR`): the run fetches what it needs
/// into the per-user cache, then trains on bytes identical to `../shared`'s.
#[test]
fn the_default_run_finishes_and_improves_target_nll() {
    let Some(data) = hetfed_core::testing::shared_path(env!("CARGO_MANIFEST_DIR"), "data/ethos") else { return };
    let data = data.parent().unwrap().to_path_buf();
    let mirror = hetfed_fetch::testing::Mirror::start().unwrap();
    mirror.serve_dir("", &data, |rel| rel.ends_with("PROVENANCE.md")).unwrap();
    let scratch = tempdir("default");
    let dir = scratch.path();
    let work = dir.join("work");
    std::fs::create_dir_all(work.join("configs")).unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap();
    std::os::unix::fs::symlink(root.join("models"), work.join("models")).unwrap();
    assert!(!work.join("../shared").exists(), "a fresh machine has no ../shared");
    let t = Instant::now();
    let o = bin()
        .current_dir(&work)
        .env("HOME", dir.join("home"))
        .env("HETFED_MIRROR", mirror.url())
        .env_remove("XDG_CACHE_HOME")
        .env_remove("HETFED_DATA_DIR")
        .env_remove("HETFED_OFFLINE")
        .arg("simulate")
        .arg("--out")
        .arg(dir.join("run"))
        .output()
        .unwrap();
    assert!(o.status.success(), "simulate failed: {}", String::from_utf8_lossy(&o.stderr));
    let fetched = dir.join("home/.cache/hetfed/data");
    for f in ["copa/copa_en.jsonl", "ethos/Ethos_Dataset_Binary.csv", "flores200/dev/hin_Deva.dev"] {
        assert!(fetched.join(f).is_file(), "{f} was fetched into the per-user cache");
    }
    assert!(!mirror.requests().is_empty() && mirror.count("xlsum/english_train.jsonl") == 0, "only what it needs");
    let secs = t.elapsed().as_secs_f64();
    let run = dir.join("run");
    let (zero, last) = (round_event(&run, 0).unwrap(), round_event(&run, 2).unwrap());
    let nll = |e: &Value, task: &str| {
        e["server_eval"][format!("{task}/target_nll")].as_f64().unwrap_or_else(|| panic!("{task}: {e}"))
    };
    for task in ["bbc", "scitldr", "tico:en-hi", "ethos", "copa"] {
        assert!(nll(&last, task) < nll(&zero, task), "{task}: target NLL {} -> {}", nll(&zero, task), nll(&last, task));
    }
    nll(&last, "ilsum");
    let ppl = |e: &Value| e["server_eval"]["general/ppl"].as_f64().unwrap();
    assert!(ppl(&last) < 1.05 * ppl(&zero), "forgetting: general perplexity {} -> {}", ppl(&zero), ppl(&last));
    eprintln!("the default run took {secs:.0} s");
}

/// The heterogeneous run with a factored server model (`transfer.factored`).
fn write_factored_config(dir: &Path, rounds: u64) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let small = model_dir();
    let large = small.parent().unwrap().join("base-large");
    let transfer = format!(
        "\n[transfer]\nclient_models = [\"{}\"]\ncalibration_sequences = 16\ncalibration_len = 16\ncache_dir = \"{}\"\nfactored = true\n",
        small.display(),
        dir.join("maps").display()
    );
    write_config_with(dir, rounds, 120.0, free_port(), &large, &transfer)
}

#[test]
fn a_factored_server_checkpoints_its_factors_resumes_exactly_and_exports_a_dense_model() {
    let Some(data) = hetfed_core::testing::shared_path(env!("CARGO_MANIFEST_DIR"), "data/ethos") else { return };
    let data = data.parent().unwrap().to_path_buf();
    let scratch = tempdir("factored");
    let dir = scratch.path();
    let two = write_factored_config(&dir.join("cfg2"), 2);
    simulate(&two, &data, &dir.join("a"));
    // The checkpoint is the factors: no base tensor is written.
    let ck = dir.join("a/checkpoints/round-2/model.safetensors");
    let (saved, _) = hetfed_core::load_safetensors(&ck).unwrap();
    assert!(!saved.is_empty() && saved.keys().all(|k| hetfed_model::delta::is_factor(k)), "{:?}", saved.keys());
    let base_bytes =
        std::fs::metadata(model_dir().parent().unwrap().join("base-large/model.safetensors")).unwrap().len();
    let ck_bytes = std::fs::metadata(&ck).unwrap().len();
    assert!(ck_bytes < base_bytes, "checkpoint {ck_bytes} bytes, base {base_bytes}");
    // One round, then resumed to two: the same model as the uninterrupted run.
    let one = write_factored_config(&dir.join("cfg1"), 1);
    simulate(&one, &data, &dir.join("b"));
    let o = bin()
        .args(["simulate", "--resume", "--config"])
        .arg(&two)
        .arg("--data-dir")
        .arg(&data)
        .arg("--out")
        .arg(dir.join("b"))
        .output()
        .unwrap();
    assert!(o.status.success(), "resume failed: {}", String::from_utf8_lossy(&o.stderr));
    let (a, b) = (round_event(&dir.join("a"), 2).unwrap(), round_event(&dir.join("b"), 2).unwrap());
    assert_eq!(a["model_version"], b["model_version"], "resumed run diverges from the uninterrupted one");
    assert_eq!(a["server_eval"], b["server_eval"]);
    assert_ne!(round_event(&dir.join("a"), 1).unwrap()["model_version"], a["model_version"]);
    // Export folds the factors into dense f32 weights (it checks the run's recorded hash first).
    let large = model_dir().parent().unwrap().join("base-large");
    let o = bin()
        .arg("export")
        .arg(dir.join("a"))
        .arg("--out")
        .arg(dir.join("exp"))
        .arg("--model")
        .arg(&large)
        .output()
        .unwrap();
    assert!(o.status.success(), "export failed: {}", String::from_utf8_lossy(&o.stderr));
    let (exported, _) = hetfed_core::load_safetensors(&dir.join("exp/model.safetensors")).unwrap();
    assert!(exported.keys().all(|k| !hetfed_model::delta::is_factor(k)));
    assert!(exported.values().all(|t| t.dtype() == candle_core::DType::F32));
}
