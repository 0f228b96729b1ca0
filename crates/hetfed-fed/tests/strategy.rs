//! Algebra of the strategies: property tests on small random updates.

use std::collections::BTreeMap;

use candle_core::{Device, Tensor};
use hetfed_core::{Result, TensorMap};
use hetfed_fed::strategy::{sample_clients, FedOptParams, FitResult, Sampling, StrategyConfig};
use hetfed_fed::FitConfig;
use hetfed_net::ClientInfo;
use proptest::prelude::*;

fn tmap(vals: &[(String, Vec<f32>)]) -> TensorMap {
    vals.iter().map(|(k, v)| (k.clone(), Tensor::from_vec(v.clone(), v.len(), &Device::Cpu).unwrap())).collect()
}

fn vals(m: &TensorMap) -> BTreeMap<String, Vec<f32>> {
    m.iter().map(|(k, t)| (k.clone(), t.to_vec1::<f32>().unwrap())).collect()
}

fn result(id: &str, n: u64, delta: TensorMap) -> FitResult {
    let base =
        hetfed_model::ModelIdentity { arch: "bloom".into(), config_hash: String::new(), weights_hash: String::new() };
    FitResult::new(
        id,
        n,
        hetfed_net::FitMetrics::default(),
        hetfed_taskvec::TaskVector { base, kind: hetfed_taskvec::Delta::Full(delta) },
    )
    .unwrap()
}

fn aggregate(cfg: &StrategyConfig, global: &TensorMap, results: Vec<FitResult>) -> TensorMap {
    let mut s = cfg.build(Sampling::default(), FitConfig::default(), 0);
    let mut g = global.clone();
    let mut it = results.into_iter().map(Result::Ok);
    s.aggregate_fit(1, &mut g, &mut it, &[]).unwrap();
    g
}

fn close(a: &TensorMap, b: &TensorMap, tol: f32) -> std::result::Result<(), TestCaseError> {
    let (a, b) = (vals(a), vals(b));
    prop_assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (k, x) in &a {
        for (u, v) in x.iter().zip(&b[k]) {
            prop_assert!((u - v).abs() <= tol * (1.0 + v.abs()), "{}: {} vs {}", k, u, v);
        }
    }
    Ok(())
}

/// A global model of two parameters and `n` client deltas of the same shapes, with weights.
fn setup(n: usize) -> impl Strategy<Value = (TensorMap, Vec<(TensorMap, u64)>)> {
    let param = |len: usize| prop::collection::vec(-1.0f32..1.0, len);
    (param(5), param(3), prop::collection::vec((param(5), param(3), 1u64..50), 1..=n)).prop_map(|(a, b, ds)| {
        let g = tmap(&[("a".into(), a), ("b".into(), b)]);
        let ds = ds.into_iter().map(|(x, y, w)| (tmap(&[("a".into(), x), ("b".into(), y)]), w)).collect();
        (g, ds)
    })
}

fn fedavg() -> StrategyConfig {
    StrategyConfig::Fedavg { server_lr: 1.0 }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn fedavg_is_the_example_weighted_mean((g, ds) in setup(5)) {
        let results = ds.iter().enumerate().map(|(i, (d, w))| result(&format!("c{i}"), *w, d.clone())).collect();
        let got = aggregate(&fedavg(), &g, results);
        let total: u64 = ds.iter().map(|(_, w)| w).sum();
        let mut want = vals(&g);
        for (d, w) in &ds {
            for (k, v) in vals(d) {
                for (x, y) in want.get_mut(&k).unwrap().iter_mut().zip(v) {
                    *x += y * *w as f32 / total as f32;
                }
            }
        }
        close(&got, &tmap(&want.into_iter().collect::<Vec<_>>()), 1e-5)?;
    }

    #[test]
    fn fedavg_does_not_depend_on_order((g, ds) in setup(5)) {
        let fwd: Vec<FitResult> = ds.iter().enumerate().map(|(i, (d, w))| result(&format!("c{i}"), *w, d.clone())).collect();
        let rev: Vec<FitResult> = fwd.iter().rev().cloned().collect();
        close(&aggregate(&fedavg(), &g, fwd), &aggregate(&fedavg(), &g, rev), 1e-5)?;
    }

    #[test]
    fn identical_updates_average_to_themselves((g, ds) in setup(1), k in 1usize..6) {
        let (d, _) = &ds[0];
        let results = (0..k).map(|i| result(&format!("c{i}"), 1 + i as u64, d.clone())).collect();
        let got = aggregate(&fedavg(), &g, results);
        let want = aggregate(&fedavg(), &g, vec![result("c0", 1, d.clone())]);
        close(&got, &want, 1e-5)?;
    }

    #[test]
    fn zero_weight_clients_change_nothing((g, ds) in setup(4)) {
        let mut results: Vec<FitResult> = ds.iter().enumerate().map(|(i, (d, w))| result(&format!("c{i}"), *w, d.clone())).collect();
        let base = aggregate(&fedavg(), &g, results.clone());
        let wild = tmap(&[("a".into(), vec![1e3; 5]), ("b".into(), vec![-1e3; 3])]);
        results.push(result("zz", 0, wild));
        close(&aggregate(&fedavg(), &g, results), &base, 1e-5)?;
    }

    #[test]
    fn task_arithmetic_is_the_scaled_sum((g, ds) in setup(4), scale in 0.1f64..1.0) {
        let results = ds.iter().enumerate().map(|(i, (d, w))| result(&format!("c{i}"), *w, d.clone())).collect();
        let got = aggregate(&StrategyConfig::TaskArithmetic { scale }, &g, results);
        let mut want = vals(&g);
        for (d, _) in &ds {
            for (k, v) in vals(d) {
                for (x, y) in want.get_mut(&k).unwrap().iter_mut().zip(v) {
                    *x += y * scale as f32;
                }
            }
        }
        close(&got, &tmap(&want.into_iter().collect::<Vec<_>>()), 1e-5)?;
    }

    #[test]
    fn fedopt_moves_each_coordinate_in_the_direction_of_the_mean_update((g, ds) in setup(3)) {
        let results: Vec<FitResult> = ds.iter().enumerate().map(|(i, (d, w))| result(&format!("c{i}"), *w, d.clone())).collect();
        let mean = vals(&aggregate(&fedavg(), &tmap(&vals(&g).into_iter().map(|(k, v)| (k, vec![0.0; v.len()])).collect::<Vec<_>>()), results.clone()));
        for cfg in [StrategyConfig::Fedadam(FedOptParams::default()), StrategyConfig::Fedyogi(FedOptParams::default()), StrategyConfig::Fedadagrad(FedOptParams::default())] {
            let got = vals(&aggregate(&cfg, &g, results.clone()));
            for (k, before) in vals(&g) {
                for ((b, a), m) in before.iter().zip(&got[&k]).zip(&mean[&k]) {
                    let step = a - b;
                    // First round: m = (1-β1)Δ, v ≈ (1-β2)Δ² (+τ²): the step has Δ's sign and magnitude ≤ η·(1-β1)/√(1-β2).
                    prop_assert!(step * m >= 0.0, "{:?} {}: step {} against mean {}", cfg, k, step, m);
                    prop_assert!(step.abs() <= 1e-3 * 1.01 + 1e-7, "{:?} {}: step {}", cfg, k, step);
                }
            }
        }
    }
}

#[test]
fn fedadam_state_round_trips() {
    let g = tmap(&[("a".into(), vec![0.5, -0.5]), ("b".into(), vec![1.0])]);
    let d = tmap(&[("a".into(), vec![0.1, -0.2]), ("b".into(), vec![0.3])]);
    let cfg = StrategyConfig::Fedadam(FedOptParams::default());
    let run = |restore: bool| {
        let mut s = cfg.build(Sampling::default(), FitConfig::default(), 0);
        let mut global = g.clone();
        for round in 1..=3 {
            if restore {
                let (j, t) = s.state();
                s = cfg.build(Sampling::default(), FitConfig::default(), 0);
                s.load_state(j, t).unwrap();
            }
            let mut it = vec![Ok(result("c0", 1, d.clone()))].into_iter();
            s.aggregate_fit(round, &mut global, &mut it, &[]).unwrap();
        }
        vals(&global)
    };
    assert_eq!(run(false), run(true));
}

#[test]
fn sampling_is_deterministic_bounded_and_sorted() {
    let clients: Vec<ClientInfo> =
        (0..10).map(|i| ClientInfo { client_id: format!("c{i}"), ..Default::default() }).collect();
    let s = Sampling { fraction_fit: 0.3, min_fit_clients: 2 };
    let a = sample_clients(&clients, s, 7, 1);
    assert_eq!(a.len(), 3);
    assert_eq!(a, sample_clients(&clients, s, 7, 1));
    let mut sorted = a.clone();
    sorted.sort();
    assert_eq!(a, sorted);
    // Different rounds draw different subsets (with overwhelming probability over 10 rounds).
    assert!((2..12).any(|r| sample_clients(&clients, s, 7, r) != a));
    assert_eq!(sample_clients(&clients[..1], s, 7, 1).len(), 1, "never more than registered");
    assert_eq!(sample_clients(&clients, Sampling { fraction_fit: 0.01, min_fit_clients: 4 }, 7, 1).len(), 4);
}

#[test]
fn config_errors_name_the_key() {
    let bad = StrategyConfig::Fedadam(FedOptParams { beta1: 1.5, ..Default::default() });
    assert!(bad.validate().unwrap_err().contains("strategy.beta1"));
    let e = hetfed_fed::RunConfig::from_toml(
        "[server]\nmodel = \"m\"\n[client]\nencoding = \"int4\"\n[data]\ntask = \"ethos\"\nnum_clients = 3\n",
        ".".into(),
        "t.toml",
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("encoding") && e.contains("int4") && e.contains("int8"), "{e}");
    let e = hetfed_fed::RunConfig::from_toml(
        "[server]\nmodel = \"m\"\nquorum = 9\n[data]\ntask = \"ethos\"\nnum_clients = 3\n",
        ".".into(),
        "t.toml",
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("server.quorum") && e.contains('9') && e.contains("t.toml"), "{e}");
    let e = hetfed_fed::RunConfig::from_toml(
        "[server]\nmodel = \"m\"\nbogus = 1\n[data]\ntask = \"ethos\"\nnum_clients = 3\n",
        ".".into(),
        "t.toml",
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("bogus"), "{e}");
    let cfg = hetfed_fed::RunConfig::embedded_default().unwrap();
    assert!(cfg.transfer.is_some(), "the embedded default is heterogeneous");
    let t = "[server]\nmodel = \"m\"\n[data]\ntask = \"ethos\"\nnum_clients = 3\n[transfer]\nclient_models = [\"s\"]\n";
    let e =
        hetfed_fed::RunConfig::from_toml(&format!("{t}lars = -1.0\n"), ".".into(), "t.toml").unwrap_err().to_string();
    assert!(e.contains("transfer.lars") && e.contains("-1"), "{e}");
    let e =
        hetfed_fed::RunConfig::from_toml(&format!("{t}[transfer.maps]\nmethod = \"magic\"\n"), ".".into(), "t.toml")
            .unwrap_err()
            .to_string();
    assert!(e.contains("magic"), "{e}");
    let e = hetfed_fed::RunConfig::from_toml(
        "[server]\nmodel = \"m\"\n[data]\ntask = \"ethos\"\nnum_clients = 3\n[transfer]\n",
        ".".into(),
        "t.toml",
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("transfer.client_models"), "{e}");
    let e = hetfed_fed::RunConfig::from_toml(
        "[server]\nmodel = \"m\"\n[server.eval]\nsplit = \"holdout\"\n[data]\ntask = \"ethos\"\nnum_clients = 3\n",
        ".".into(),
        "t.toml",
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("t.toml") && e.contains("line 4") && e.contains("holdout") && e.contains("validation"), "{e}");
    // The committed configs parse.
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
    hetfed_fed::RunConfig::from_file(&root.join("fedavg-small.toml")).unwrap();
    hetfed_fed::RunConfig::from_file(&root.join("ethos-projection.toml")).unwrap();
    for name in ["sweep.toml", "sweep-ethos.toml"] {
        let (sweep, dir) = hetfed_fed::sweep::SweepConfig::from_file(&root.join(name)).unwrap();
        assert!(sweep.rows.len() >= 10 && sweep.seeds.len() >= 3, "{name}");
        hetfed_fed::RunConfig::from_file(&dir.join(&sweep.base)).unwrap();
    }
    let (sweep, _) = hetfed_fed::sweep::SweepConfig::from_file(&root.join("sweep.toml")).unwrap();
    assert_eq!(sweep.rows.iter().filter(|r| r.control).count(), 1, "one control row");
    // The one-seed probe of the student's budget.
    let (budget, dir) = hetfed_fed::sweep::SweepConfig::from_file(&root.join("sweep-budget.toml")).unwrap();
    assert_eq!(budget.rows.iter().filter(|r| r.control).count(), 1, "one control row");
    hetfed_fed::RunConfig::from_file(&dir.join(&budget.base)).unwrap();
    // Every committed sweep: each hetero row's run is a valid config (a typo in a row fails here,
    // not an hour into the sweep).
    let mut sweeps = 0;
    for entry in std::fs::read_dir(&root).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        if !(name.starts_with("sweep") && name.ends_with(".toml")) {
            continue;
        }
        sweeps += 1;
        let (sweep, dir) = hetfed_fed::sweep::SweepConfig::from_file(&path).unwrap();
        for row in sweep.rows.iter().filter(|r| r.kind == hetfed_fed::sweep::RowKind::Hetero) {
            hetfed_fed::sweep::run_config(&dir.join(&sweep.base), 0, row.transfer.as_ref(), sweep.eval_split)
                .unwrap_or_else(|e| panic!("{name}: row {:?}: {e}", row.name));
        }
    }
    assert!(sweeps >= 6, "{sweeps} sweep configs");
}

fn run_config(data: &str) -> std::result::Result<hetfed_fed::RunConfig, String> {
    hetfed_fed::RunConfig::from_toml(&format!("[server]\nmodel = \"m\"\n[data]\n{data}"), ".".into(), "t.toml")
        .map_err(|e| e.to_string())
}

#[test]
fn multi_task_configs_assign_each_task_to_its_clients_deterministically() {
    // One task per client, in the order given.
    let c = run_config("tasks = [\"bbc\", \"tico:en-hi\", \"ethos\"]\n").unwrap();
    assert_eq!(c.data.num_clients(), 3);
    assert_eq!(c.client_ids(), ["c0", "c1", "c2"]);
    let tasks: Vec<(String, usize)> = (0..3).map(|i| c.data.assignment(i).map(|(g, k)| (g.task, k)).unwrap()).collect();
    assert_eq!(tasks, [("bbc".to_string(), 0), ("tico:en-hi".to_string(), 0), ("ethos".to_string(), 0)]);
    assert!(c.data.assignment(3).is_none());
    assert_eq!(c.data.task_names(), ["bbc", "tico:en-hi", "ethos"]);
    // Several clients per task.
    let c = run_config("tasks = [\"bbc\", \"ethos\"]\nclients_per_task = 2\n").unwrap();
    let tasks: Vec<(String, usize)> = (0..4).map(|i| c.data.assignment(i).map(|(g, k)| (g.task, k)).unwrap()).collect();
    assert_eq!(tasks, [("bbc".into(), 0), ("bbc".into(), 1), ("ethos".into(), 0), ("ethos".into(), 1)]);
    // Explicit groups with their own partitions; the same config gives the same assignment.
    let text = "[[data.groups]]\ntask = \"ethos\"\nclients = 3\npartition = { scheme = \"dirichlet\", alpha = 0.5 }\n[[data.groups]]\ntask = \"copa\"\n";
    let (a, b) = (run_config(text).unwrap(), run_config(text).unwrap());
    assert_eq!(a.data.num_clients(), 4);
    for i in 0..4 {
        assert_eq!(a.data.assignment(i), b.data.assignment(i));
    }
    let (g, k) = a.data.assignment(2).unwrap();
    assert_eq!(
        (g.task.as_str(), k, g.partition),
        ("ethos", 2, Some(hetfed_data::PartitionScheme::Dirichlet { alpha: 0.5 }))
    );
    let (g, k) = a.data.assignment(3).unwrap();
    assert_eq!((g.task.as_str(), k, g.partition), ("copa", 0, Some(hetfed_data::PartitionScheme::Iid)));
    // Errors name the key.
    let e = run_config("task = \"ethos\"\nnum_clients = 2\ntasks = [\"bbc\"]\n").unwrap_err();
    assert!(e.contains("exactly one of"), "{e}");
    let e = run_config("tasks = [\"bbc\", \"nope\"]\n").unwrap_err();
    assert!(e.contains("nope"), "{e}");
    let e = run_config("tasks = [\"bbc\"]\nnum_clients = 5\n").unwrap_err();
    assert!(e.contains("data.num_clients") && e.contains('5'), "{e}");
    let e = run_config("task = \"ethos\"\n").unwrap_err();
    assert!(e.contains("data.num_clients"), "{e}");
    // The embedded default is the proposal's scenario: specialists on different tasks.
    let d = hetfed_fed::RunConfig::embedded_default().unwrap();
    assert!(d.data.task_names().len() >= 6);
}
