//! Limits as data: every numeric key of a run configuration has a documented range, checked when
//! the file is parsed; a value outside it is one error naming the key, the value and the range.
//! The property tests feed random values (and random TOML-ish junk) to the parser: it never
//! panics, and it either accepts a value inside the documented range or names the key.

use std::path::{Path, PathBuf};

use hetfed_fed::config::{max_lora_rank, Interval, MAX_LORA_RANK, MAX_SEQ_LEN};
use hetfed_fed::RunConfig;
use proptest::prelude::*;

/// A valid homogeneous run of three clients (no `max_steps`, LoRA rank 8).
const HOMOGENEOUS: &str = r#"
[run]
rounds = 2
seed = 0

[server]
model = "m"
min_clients = 1
quorum = 1

[server.eval]
tasks = ["ethos"]

[sampling]
fraction_fit = 1.0

[client]
epochs = 1
lr = 1e-3
batch_size = 8
max_len = 128
lora_rank = 8

[data]
task = "ethos"
num_clients = 3
"#;

/// A valid heterogeneous run (projection: no distillation token budget applies).
const HETEROGENEOUS: &str = r#"
[server]
model = "m"

[data]
task = "ethos"
num_clients = 3

[transfer]
client_models = ["s"]
aggregation = "projection"
"#;

/// A `[deploy]` section (appended to a run).
const DEPLOY: &str = r#"
[deploy]
listen = "127.0.0.1:50051"
server = "https://127.0.0.1:50051"
ca = "ca.pem"
cert = "server.pem"
key = "server.key"
tokens = "tokens.toml"
"#;

/// A valid FedAdam run.
const FEDADAM: &str = r#"
[server]
model = "m"

[strategy]
name = "fedadam"

[data]
task = "ethos"
num_clients = 3
"#;

#[derive(Debug, Clone, Copy)]
enum Range {
    /// Integers `lo..=hi` (TOML integers are i64).
    Int(i64, i64),
    /// Finite reals in an interval.
    Real(Interval),
    /// Checked only where another setting makes the key matter: the property is then only
    /// "no panic, and an error names the key".
    Unchecked,
}

/// (base config, TOML table, key, the range the base config leaves for it).
fn keys() -> Vec<(&'static str, &'static str, &'static str, Range)> {
    use Range::*;
    let pos = Interval::POSITIVE;
    let (h, t, a) = (HOMOGENEOUS, HETEROGENEOUS, FEDADAM);
    let d: &'static str = Box::leak(format!("{HOMOGENEOUS}{DEPLOY}").into_boxed_str());
    vec![
        (d, "deploy", "give_up_s", Real(Interval::left_open(0.0, 86_400.0))),
        (h, "run", "rounds", Int(1, 100_000)),
        (h, "run", "seed", Int(0, i64::MAX)),
        (h, "server", "min_clients", Int(1, 3)),
        (h, "server", "quorum", Int(1, 3)),
        (h, "server", "round_timeout_s", Real(Interval::left_open(0.0, 1e6))),
        (h, "server", "register_timeout_s", Real(Interval::left_open(0.0, 1e6))),
        (h, "server", "max_update_norm", Real(pos)),
        (h, "server", "max_update_mib", Int(1, 8192)),
        (h, "server.eval", "max_examples", Int(0, 1_000_000)),
        (h, "server.eval", "every", Int(1, 100_000)),
        (h, "server.eval", "batch_size", Int(1, 4096)),
        (h, "server.eval", "max_len", Int(2, MAX_SEQ_LEN as i64)),
        (h, "server.eval", "general_lines", Int(0, 100_000)),
        (h, "server.eval", "max_new_tokens", Int(1, 4096)),
        (h, "sampling", "fraction_fit", Real(Interval::left_open(0.0, 1.0))),
        (h, "sampling", "min_fit_clients", Int(0, 3)),
        (h, "client", "epochs", Int(1, 1000)),
        (h, "client", "max_steps", Int(1, 1_000_000)),
        (h, "client", "lr", Real(Interval::left_open(0.0, 10.0))),
        (h, "client", "batch_size", Int(1, 4096)),
        (h, "client", "max_len", Int(2, MAX_SEQ_LEN as i64)),
        (h, "client", "lora_rank", Int(0, MAX_LORA_RANK as i64)),
        (h, "client", "lora_alpha", Real(pos)),
        (h, "client", "proximal_mu", Real(Interval::closed(0.0, 1e6))),
        (h, "client", "seed", Int(0, i64::MAX)),
        (h, "data", "num_clients", Int(1, 1024)),
        (h, "data", "max_examples_per_client", Int(0, 10_000_000)),
        (h, "data", "val_fraction", Real(Interval::right_open(0.0, 0.9))),
        (h, "data", "seed", Int(0, i64::MAX)),
        (h, "data", "only_client", Int(0, 2)),
        (a, "strategy", "eta", Real(Interval::left_open(0.0, 1000.0))),
        (a, "strategy", "tau", Real(Interval::left_open(0.0, 1000.0))),
        (a, "strategy", "beta1", Real(Interval::right_open(0.0, 1.0))),
        (a, "strategy", "beta2", Real(Interval::right_open(0.0, 1.0))),
        // With the default 32-token calibration sequences, 65536 tokens allow 2048 of them;
        // with the default 64 sequences, 1024 tokens each.
        (t, "transfer", "calibration_sequences", Int(2, 2048)),
        (t, "transfer", "calibration_len", Int(4, 1024)),
        (t, "transfer", "eta", Real(Interval::left_open(0.0, 1000.0))),
        (t, "transfer", "lars", Real(Interval::left_open(0.0, 1000.0))),
        (t, "transfer", "ties_top_k", Real(Interval::left_open(0.0, 1.0))),
        (t, "transfer", "dare_drop", Real(Interval::right_open(0.0, 1.0))),
        (t, "transfer", "fisher_strength", Real(Interval::closed(0.0, 1e6))),
        (t, "transfer", "ortho_memory", Int(0, 64)),
        (t, "transfer.maps", "ridge", Real(Interval::closed(0.0, 1e6))),
        (t, "transfer.maps", "held_out", Real(Interval::right_open(0.0, 0.9))),
        (t, "transfer.maps", "seed", Int(0, i64::MAX)),
        (t, "transfer.alpha", "quality", Real(Interval::closed(0.0, 1000.0))),
        (t, "transfer.alpha", "size", Real(Interval::closed(0.0, 1000.0))),
        (t, "transfer.alpha", "entropy", Real(Interval::closed(0.0, 1000.0))),
        (t, "transfer.alpha", "min_quality", Real(Interval::left_open(0.0, 1.0))),
        (t, "transfer.distill", "lora_rank", Int(0, MAX_LORA_RANK as i64)),
        (t, "transfer.distill", "lora_alpha", Real(pos)),
        (t, "transfer.distill", "lr", Real(Interval::left_open(0.0, 10.0))),
        (t, "transfer.distill", "steps", Int(1, 100_000)),
        (t, "transfer.distill", "batch_size", Int(1, 4096)),
        (t, "transfer.distill", "temperature", Real(Interval::left_open(0.0, 100.0))),
        (t, "transfer.distill", "n_prompts", Int(1, 100_000)),
        (t, "transfer.distill", "seq_len", Int(2, 4096)),
        (t, "transfer.offset", "lambda", Real(Interval::left_open(0.0, 100.0))),
        (t, "transfer.offset", "seq_len", Int(4, 4096)),
        (t, "transfer.offset", "sampled_per_task", Int(1, 100_000)),
        (t, "transfer.offset", "heldout_per_task", Int(0, 10_000)),
        (t, "transfer.offset", "general_sequences", Unchecked),
    ]
}

/// `base` with `key = value` set in `[table]` (the table is added when the base lacks it; a key
/// the base already sets is replaced).
fn with_value(base: &str, table: &str, key: &str, value: &str) -> String {
    let header = format!("[{table}]");
    let mut out = Vec::new();
    let mut in_table = false;
    let mut done = false;
    for line in base.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('[') {
            if in_table && !done {
                out.push(format!("{key} = {value}"));
                done = true;
            }
            in_table = trimmed == header;
            out.push(line.to_string());
            if in_table {
                // Insert right after the header; drop the base's own line for the key below.
                out.push(format!("{key} = {value}"));
                done = true;
            }
            continue;
        }
        if in_table && trimmed.split('=').next().map(str::trim) == Some(key) {
            continue;
        }
        out.push(line.to_string());
    }
    if !done {
        out.push(header);
        out.push(format!("{key} = {value}"));
    }
    out.join("\n") + "\n"
}

fn parse(text: &str) -> Result<RunConfig, String> {
    RunConfig::from_toml(text, PathBuf::from("."), "t.toml").map_err(|e| e.to_string())
}

/// A float as TOML writes it.
fn toml_float(v: f64) -> String {
    if v.is_nan() {
        "nan".into()
    } else if v.is_infinite() {
        if v > 0.0 { "inf" } else { "-inf" }.into()
    } else {
        format!("{v:?}")
    }
}

/// A refusal is one message that names the file and the key.
fn check_error(msg: &str, key: &str) {
    assert!(msg.starts_with("t.toml: "), "the error names the file: {msg}");
    assert!(msg.contains(key), "the error names the key {key}: {msg}");
}

/// Integers around the ends of every range, and anywhere.
fn int_value() -> impl Strategy<Value = i64> {
    prop_oneof![
        -3i64..=3,
        prop::sample::select(vec![
            1023,
            1024,
            1025,
            2047,
            2048,
            2049,
            4095,
            4096,
            4097,
            8191,
            8192,
            8193,
            65_535,
            65_536,
            65_537,
            100_000,
            100_001,
            1_000_000,
            1_000_001,
            10_000_000,
            10_000_001,
            i64::MAX
        ]),
        0i64..200_000,
        any::<i64>(),
    ]
}

fn real_value() -> impl Strategy<Value = f64> {
    prop_oneof![
        prop::sample::select(vec![
            0.0,
            -0.0,
            1e-300,
            0.5,
            0.9,
            1.0,
            10.0,
            10.000001,
            100.0,
            1000.0,
            1e6,
            1.000001e6,
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
            f64::MAX,
            -1.0
        ]),
        -2.0f64..2.0,
        any::<f64>(),
    ]
}

/// TOML values of every kind, well-formed or not.
fn junk_value() -> impl Strategy<Value = String> {
    prop_oneof![
        "[-+0-9eE._]{1,12}",
        "\"[a-z0-9 ]{0,8}\"",
        Just("true".to_string()),
        Just("[1, 2]".to_string()),
        Just("{ a = 1 }".to_string()),
        Just("nan".to_string()),
        Just("-inf".to_string()),
        Just("99999999999999999999999".to_string()),
        Just("".to_string()),
        "[\\[\\]{}=\",.a-z0-9 ]{0,16}",
    ]
}

fn key_strategy() -> impl Strategy<Value = usize> {
    0..keys().len()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, failure_persistence: None, ..ProptestConfig::default() })]

    /// An integer for an integer key, a real for a real key: accepted exactly when inside the
    /// documented range, else one error naming the key.
    #[test]
    fn numeric_values_are_accepted_exactly_inside_their_range(k in key_strategy(), i in int_value(), r in real_value()) {
        let (base, table, key, range) = keys()[k];
        let value = match range {
            Range::Int(..) | Range::Unchecked => i.to_string(),
            Range::Real(_) => toml_float(r),
        };
        let result = parse(&with_value(base, table, key, &value));
        let inside = match range {
            Range::Int(lo, hi) => (lo..=hi).contains(&i),
            Range::Real(iv) => iv.contains(r),
            Range::Unchecked => {
                if let Err(e) = &result {
                    check_error(e, key);
                }
                return Ok(());
            }
        };
        match &result {
            Ok(_) => prop_assert!(inside, "{table}.{key} = {value} is outside the documented range {range:?}, yet accepted"),
            Err(e) => {
                prop_assert!(!inside, "{table}.{key} = {value} is inside the documented range {range:?}, yet refused: {e}");
                check_error(e, key);
            }
        }
    }

    /// Any TOML-ish value for any numeric key: no panic; a refusal of a well-formed value (of
    /// the wrong type or out of range) names the key, one of malformed TOML (an unclosed `[`
    /// runs into the next lines) names the line where the syntax broke.
    #[test]
    fn junk_values_never_panic_and_errors_name_the_key(k in key_strategy(), value in junk_value()) {
        let (base, table, key, _) = keys()[k];
        if let Err(e) = parse(&with_value(base, table, key, &value)) {
            let well_formed = toml::from_str::<toml::Table>(&format!("{key} = {value}")).is_ok();
            if well_formed {
                check_error(&e, key);
            } else {
                prop_assert!(e.starts_with("t.toml: ") && e.contains("line "), "{e}");
            }
        }
    }

    /// Random lines of TOML-ish junk anywhere in a config: no panic, and one error naming the
    /// file when refused.
    #[test]
    fn junk_text_never_panics(lines in prop::collection::vec("[\\[\\]{}=\",.a-z_0-9 \\n-]{0,40}", 0..6), at in 0usize..40) {
        let base: Vec<&str> = HOMOGENEOUS.lines().collect();
        let at = at.min(base.len());
        let mut text: Vec<String> = base[..at].iter().map(|s| s.to_string()).collect();
        text.extend(lines);
        text.extend(base[at..].iter().map(|s| s.to_string()));
        if let Err(e) = parse(&text.join("\n")) {
            prop_assert!(e.starts_with("t.toml: ") && e.len() > "t.toml: ".len(), "{e}");
        }
    }
}

/// The settings the hostile-user test found accepted but never valid.
#[test]
fn settings_that_could_never_work_are_refused_with_key_value_and_range() {
    for (table, key, value, want) in [
        ("client", "max_len", "0", "client.max_len: expected 2..=65536, found 0"),
        ("server", "max_update_mib", "0", "server.max_update_mib: expected 1..=8192, found 0"),
        ("server.eval", "max_len", "0", "server.eval.max_len: expected 2..=65536, found 0"),
        ("server.eval", "batch_size", "0", "server.eval.batch_size: expected 1..=4096, found 0"),
        ("server.eval", "every", "0", "server.eval.every: expected 1..=100000, found 0"),
        ("client", "lora_rank", "100000", "client.lora_rank: expected 0 (full fine-tuning) or 1..=65536, found 100000"),
        ("client", "lr", "nan", "client.lr: expected a number in (0, 10], found NaN"),
        ("server", "round_timeout_s", "1e300", "server.round_timeout_s: expected a number in (0, 1000000], found"),
        ("data", "num_clients", "100000", "data.num_clients: expected 1..=1024, found 100000"),
        ("data", "only_client", "3", "data.only_client: expected 0..=2 (a client of the layout), found 3"),
    ] {
        let e = parse(&with_value(HOMOGENEOUS, table, key, value)).unwrap_err();
        assert!(e.contains(want), "{table}.{key} = {value}: expected {want:?} in {e:?}");
        assert_eq!(e.lines().count(), 1, "one line: {e}");
    }
    // Distillation keeps a distribution over the vocabulary per token: its tokens are bounded.
    let distill = with_value(HETEROGENEOUS, "transfer", "aggregation", "\"distillation\"");
    let e = parse(&with_value(&distill, "transfer.distill", "n_prompts", "100000")).unwrap_err();
    assert!(e.contains("transfer.distill.n_prompts") && e.contains("65536"), "{e}");
    parse(&with_value(&distill, "transfer.distill", "n_prompts", "1000")).unwrap();
    // The scales of the distilled change: a short list of positive numbers; choosing among
    // several needs held-out sequences to choose on.
    let offset = with_value(HETEROGENEOUS, "transfer", "aggregation", "\"offset_distillation\"");
    for (scales, heldout, want) in [
        ("[]", 0, "transfer.offset.scales: expected 1 to 16 scales, found 0"),
        ("[1.0, 0.0]", 4, "transfer.offset.scales: expected each scale in (0, 10], found 0"),
        ("[1.0, nan]", 4, "transfer.offset.scales: expected each scale in (0, 10], found NaN"),
        ("[1.0, 11.0]", 4, "transfer.offset.scales: expected each scale in (0, 10], found 11"),
        ("[1.0, 2.0]", 0, "transfer.offset.scales: choosing among 2 scales needs held-out sequences"),
    ] {
        let text = with_value(&offset, "transfer.offset", "scales", scales);
        let e = parse(&with_value(&text, "transfer.offset", "heldout_per_task", &heldout.to_string())).unwrap_err();
        assert!(e.contains(want), "scales = {scales}: expected {want:?} in {e:?}");
        assert_eq!(e.lines().count(), 1, "one line: {e}");
    }
    let ok = with_value(&offset, "transfer.offset", "scales", "[1.0, 2.0]");
    let cfg = parse(&with_value(&ok, "transfer.offset", "heldout_per_task", "4")).unwrap();
    assert_eq!(cfg.transfer.unwrap().offset.scales, vec![1.0, 2.0]);
    // One student per task needs task examples to give each student.
    let per_task = with_value(&offset, "transfer.offset", "students", "\"per_task\"");
    let e = parse(&with_value(&per_task, "transfer.offset", "sequences", "\"general\"")).unwrap_err();
    assert!(e.contains("transfer.offset.students") && e.contains("general text only"), "{e}");
    let cfg = parse(&with_value(&per_task, "transfer.offset", "sequences", "\"mixed\"")).unwrap();
    assert_eq!(cfg.transfer.unwrap().offset.students, hetfed_fed::hetero::OffsetStudents::PerTask);
    let local = with_value(&offset, "transfer.offset", "students", "\"per_task_local\"");
    let e = parse(&with_value(&local, "transfer.offset", "sequences", "\"general\"")).unwrap_err();
    assert!(e.contains("transfer.offset.students = \"per_task_local\""), "{e}");
    let e = parse(&with_value(&offset, "transfer.offset", "students", "\"each\"")).unwrap_err();
    assert!(e.contains("students") && e.contains("per_task"), "{e}");
    // Balancing tasks weighs one student's loss; per-task students are refused with it.
    let balanced = with_value(&offset, "transfer.offset", "balance", "true");
    let mixed = with_value(&balanced, "transfer.offset", "sequences", "\"mixed\"");
    assert!(parse(&mixed).unwrap().transfer.unwrap().offset.balance);
    let e = parse(&with_value(&mixed, "transfer.offset", "students", "\"per_task\"")).unwrap_err();
    assert!(e.contains("transfer.offset.balance") && e.contains("per_task"), "{e}");
    // How a client holds its base's frozen weights: two names, anything else refused by name.
    let stored = parse(&with_value(HOMOGENEOUS, "client", "weights", "\"stored\"")).unwrap();
    assert_eq!(stored.client.weights, hetfed_fed::strategy::BaseWeights::Stored);
    let e = parse(&with_value(HOMOGENEOUS, "client", "weights", "\"f16\"")).unwrap_err();
    assert!(e.contains("weights") && e.contains("stored"), "{e}");
}

fn models() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models")
}

fn with_models(text: &str) -> String {
    text.replace("model = \"m\"", &format!("model = {:?}", models().join("base-large").display().to_string())).replace(
        "client_models = [\"s\"]",
        &format!("client_models = [{:?}]", models().join("base-small").display().to_string()),
    )
}

/// What depends on the model is checked against the models' config.json before anything loads.
#[test]
fn lora_rank_and_lengths_are_checked_against_the_models() {
    let small = read_arch(&models().join("base-small"));
    let large = read_arch(&models().join("base-large"));
    let targets = small.default_lora_targets();
    assert_eq!(max_lora_rank(&small, &targets), Some(128), "base-small is 128 wide");
    assert_eq!(max_lora_rank(&large, &targets), Some(256), "base-large is 256 wide");
    assert_eq!(max_lora_rank(&small, &["no_such_module".to_string()]), None);

    // Homogeneous: the clients train the server's model (base-large, 256 wide, context 2048).
    let home = with_models(HOMOGENEOUS);
    let cfg = parse(&with_value(&home, "client", "lora_rank", "256")).unwrap();
    cfg.check_models(None).unwrap();
    let cfg = parse(&with_value(&home, "client", "lora_rank", "257")).unwrap();
    let e = cfg.check_models(None).unwrap_err().to_string();
    assert!(
        e.contains("client.lora_rank") && e.contains("1..=256") && e.contains("257") && e.contains("base-large"),
        "{e}"
    );
    // `hetfed client --model` replaces the client's model: base-small is 128 wide.
    let cfg = parse(&with_value(&home, "client", "lora_rank", "200")).unwrap();
    let e = cfg.check_models(Some(&models().join("base-small"))).unwrap_err().to_string();
    assert!(e.contains("client.lora_rank") && e.contains("1..=128") && e.contains("200"), "{e}");

    let cfg = parse(&with_value(&home, "client", "max_len", "4096")).unwrap();
    let e = cfg.check_models(None).unwrap_err().to_string();
    assert!(e.contains("client.max_len") && e.contains("2..=2048") && e.contains("4096"), "{e}");
    let cfg = parse(&with_value(&home, "server.eval", "max_new_tokens", "2048")).unwrap();
    let e = cfg.check_models(None).unwrap_err().to_string();
    assert!(e.contains("server.eval.max_new_tokens") && e.contains("1..=2047"), "{e}");

    // Heterogeneous: the clients' rank is bounded by base-small, the distilled one by base-large.
    let het = with_models(HETEROGENEOUS);
    let cfg = parse(&with_value(&het, "client", "lora_rank", "1000")).unwrap();
    let e = cfg.check_models(None).unwrap_err().to_string();
    assert!(e.contains("client.lora_rank") && e.contains("1..=128") && e.contains("base-small"), "{e}");
    let distill = with_value(&het, "transfer", "aggregation", "\"distillation\"");
    let cfg = parse(&with_value(&distill, "transfer.distill", "lora_rank", "300")).unwrap();
    let e = cfg.check_models(None).unwrap_err().to_string();
    assert!(e.contains("transfer.distill.lora_rank") && e.contains("1..=256"), "{e}");
    parse(&with_value(&distill, "transfer.distill", "lora_rank", "256")).unwrap().check_models(None).unwrap();

    // The committed default run is within every limit of its models.
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
    for name in ["simulate.toml", "fedavg-small.toml", "ethos-projection.toml"] {
        RunConfig::from_file(&root.join(name)).unwrap().check_models(None).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    // A model directory that cannot be read is left to the loader to report.
    parse(&with_value(HOMOGENEOUS, "client", "lora_rank", "1000")).unwrap().check_models(None).unwrap();
}

fn read_arch(dir: &Path) -> hetfed_model::Arch {
    let path = dir.join("config.json");
    let json: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    hetfed_model::Arch::from_config(&json, &path).unwrap()
}
