//! What the server and the clients of a run are assembled from: the validation cut of the
//! clients' train splits never holds a client's example, and server text answers are in the
//! task's answer language. Reads the shared data and the repository's embedded models.

use std::collections::BTreeMap;
use std::path::Path;

use hetfed_data::{DataDir, Items};
use hetfed_fed::assemble::{client_data, server_eval};
use hetfed_fed::RunConfig;
use hetfed_model::Checkpoint;

fn setup(split: &str) -> Option<(RunConfig, DataDir, Checkpoint)> {
    let data = hetfed_core::testing::shared_path(env!("CARGO_MANIFEST_DIR"), "data")?;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let text = std::fs::read_to_string(root.join("configs/simulate.toml")).unwrap();
    let text = text.replace("max_examples = 24", &format!("max_examples = 0\nsplit = \"{split}\""));
    let cfg = RunConfig::from_toml(&text, root.join("configs"), "simulate.toml").unwrap();
    let ck = Checkpoint::load(&root.join("models/base-small")).unwrap();
    Some((cfg, DataDir::new(data), ck))
}

fn prompts(items: &Items) -> Vec<String> {
    match items {
        Items::Choice(v) => v.iter().map(|i| i.prompt.clone()).collect(),
        Items::Generation(v) => v.iter().map(|i| i.prompt.clone()).collect(),
        Items::Lm(v) => v.iter().map(|i| i.prompt.clone()).collect(),
    }
}

#[test]
fn the_validation_cut_holds_no_client_example_and_only_the_client_tasks() {
    let Some((cfg, dir, ck)) = setup("validation") else { return };
    let eval = server_eval(&cfg, &dir, &ck).unwrap().unwrap();
    let names: Vec<String> = eval.tasks.iter().map(|t| t.spec.name.clone()).collect();
    let clients = cfg.data.task_names().iter().map(|n| hetfed_data::task::builtin(n).unwrap().name).collect::<Vec<_>>();
    assert_eq!(names, clients, "server.eval.tasks beyond the clients' (FLORES) are not evaluated");
    // Per task, the prompts of the cut and of every client's examples together are exactly the
    // train split's prompts, as multisets (a dataset may repeat a prompt: BBC repeats articles).
    let tok = ck.tokenizer().unwrap();
    let counter = |s: &str| tok.encode(s, false).map(|e| e.len()).unwrap_or(0);
    type Counts = BTreeMap<String, i64>;
    let mut left: BTreeMap<String, Counts> = BTreeMap::new();
    for task in &eval.tasks {
        let train = task.spec.load(&dir, hetfed_data::Split::Train).unwrap();
        let counts = left.entry(task.spec.name.clone()).or_default();
        for p in task.spec.to_prompt_target(&train, Some(&counter)).unwrap() {
            *counts.entry(p.prompt).or_default() += 1;
        }
        assert!(prompts(&task.items).len() >= 24, "{}: a cut of at least 24 examples", task.spec.name);
        for p in prompts(&task.items) {
            *counts.entry(p).or_default() -= 1;
        }
    }
    for i in 0..cfg.data.num_clients() {
        let d = client_data(&cfg, &dir, i, &ck).unwrap();
        let counts = left.get_mut(&d.task.name).unwrap();
        for e in d.train.iter().chain(&d.val) {
            *counts.entry(e.prompt.clone()).or_default() -= 1;
        }
    }
    for (task, counts) in &left {
        let off: Vec<_> = counts.iter().filter(|(_, c)| **c != 0).take(3).collect();
        assert!(off.is_empty(), "{task}: the cut and the clients' examples are not the train split: {off:?}");
    }
    // The dev split is another set.
    let (cfg, dir, ck) = setup("dev").unwrap();
    let dev = server_eval(&cfg, &dir, &ck).unwrap().unwrap();
    assert!(dev.tasks.iter().any(|t| t.spec.name.starts_with("flores")));
}

/// The embedded large model (the server's).
fn large_model() -> Checkpoint {
    Checkpoint::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../../models/base-large")).unwrap()
}

#[test]
fn text_answers_are_server_text_in_each_generation_tasks_answer_language() {
    let Some((cfg, dir, _)) = setup("dev") else { return };
    let large = large_model();
    let mut t = cfg.transfer.clone().unwrap();
    t.offset.answers = hetfed_fed::hetero::OffsetAnswers::Text;
    let text = hetfed_fed::assemble::server_text(&cfg, &t, &dir, &large).unwrap();
    let keys: Vec<&str> = text.answers.keys().map(String::as_str).collect();
    assert_eq!(keys, ["bbc", "ilsum", "scitldr", "tico:en-hi"], "choice tasks keep sampled answers");
    let tok = large.tokenizer().unwrap();
    let devanagari = |s: &str| s.chars().filter(|c| ('\u{900}'..='\u{97f}').contains(c)).count();
    for (task, answers) in &text.answers {
        assert!(answers.len() > 100, "{task}: {} answers", answers.len());
        assert!(answers.iter().all(|a| a.len() == t.offset.seq_len), "{task}: every answer fills a sequence");
        let s = tok.decode(&answers[0], true).unwrap();
        let hindi = devanagari(&s) * 2 > s.chars().filter(|c| !c.is_whitespace()).count();
        assert_eq!(hindi, task == "ilsum" || task.starts_with("tico"), "{task}: {s}");
    }
    // The sampled default loads none.
    let none = hetfed_fed::assemble::server_text(&cfg, cfg.transfer.as_ref().unwrap(), &dir, &large).unwrap();
    assert!(none.answers.is_empty());
}

#[test]
fn text_prompts_are_loaded_for_every_task_or_for_translation_only() {
    let Some((cfg, dir, _)) = setup("dev") else { return };
    let large = large_model();
    let with = |p: hetfed_fed::hetero::OffsetPrompts| {
        let mut t = cfg.transfer.clone().unwrap();
        t.offset.prompts = p;
        let text = hetfed_fed::assemble::server_text(&cfg, &t, &dir, &large).unwrap();
        text.prompts.keys().cloned().collect::<Vec<String>>()
    };
    use hetfed_fed::hetero::OffsetPrompts;
    assert_eq!(with(OffsetPrompts::Text), ["bbc", "copa", "ethos", "ilsum", "scitldr", "tico:en-hi"]);
    assert_eq!(with(OffsetPrompts::Translation), ["tico:en-hi"]);
    assert!(with(OffsetPrompts::Sampled).is_empty());
    assert_eq!(with(OffsetPrompts::TaskInputs), ["tico:en-hi"]);
}

/// The diagnostic oracle (`prompts = "task_inputs"`): TICO-19's prompts are windows of its own
/// train-split English sources, in order, and contain neither a Hindi reference nor a dev source.
#[test]
fn the_oracles_prompts_are_the_translation_tasks_train_sources_only() {
    let Some((cfg, dir, _)) = setup("dev") else { return };
    let large = large_model();
    let mut t = cfg.transfer.clone().unwrap();
    t.offset.prompts = hetfed_fed::hetero::OffsetPrompts::TaskInputs;
    let text = hetfed_fed::assemble::server_text(&cfg, &t, &dir, &large).unwrap();
    let prompts = &text.prompts["tico:en-hi"];
    let tok = large.tokenizer().unwrap();
    let spec = hetfed_data::task::builtin("tico:en-hi").unwrap();
    let sources = |split| match spec.dataset.load(&dir, split).unwrap() {
        hetfed_data::Examples::Translation(v) => v,
        _ => panic!("tico is a translation dataset"),
    };
    let (train, dev) = (sources(hetfed_data::Split::Train), sources(hetfed_data::Split::Dev));
    assert!(prompts.len() > 100 && prompts.iter().all(|p| p.len() == t.offset.seq_len), "{}", prompts.len());
    // The first window starts with the first train source.
    let first = tok.decode(&prompts[0], true).unwrap();
    assert!(first.trim_start().starts_with(train[0].src.trim()), "{first:?} / {:?}", train[0].src);
    let all: String = prompts.iter().take(200).map(|p| tok.decode(p, true).unwrap()).collect();
    assert!(!all.chars().any(|c| ('\u{900}'..='\u{97f}').contains(&c)), "no Hindi reaches the prompts");
    let long_dev = dev.iter().filter(|e| e.src.len() > 40 && !train.iter().any(|t| t.src == e.src));
    for e in long_dev.take(50) {
        assert!(!all.contains(e.src.trim()), "a dev source in the prompts: {:?}", e.src);
    }
    assert!(text.answers.is_empty(), "sampled answers: no references loaded");
    // With `answers = "task_references"`, window i of the answers is example i's reference
    // (then eos and the next ones), as many windows as prompts.
    t.offset.answers = hetfed_fed::hetero::OffsetAnswers::TaskReferences;
    let text = hetfed_fed::assemble::server_text(&cfg, &t, &dir, &large).unwrap();
    let (p, a) = (&text.prompts["tico:en-hi"], &text.answers["tico:en-hi"]);
    assert_eq!(p.len(), a.len());
    for i in [0, 1, p.len() / 2] {
        let src = tok.decode(&p[i], true).unwrap();
        let tgt = tok.decode(&a[i], true).unwrap();
        assert!(src.trim_start().starts_with(train[i].src.trim()), "{i}: {src:?}");
        assert!(tgt.trim_start().starts_with(train[i].tgt.trim()), "{i}: {tgt:?} / {:?}", train[i].tgt);
    }
    let eos = large.arch.eos_token_id().unwrap();
    assert!(a[0].contains(&eos), "each reference ends with eos");
    // The oracle's references need the oracle's sources.
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let toml = std::fs::read_to_string(root.join("configs/simulate.toml")).unwrap();
    let bad = toml.replace("prompts = \"translation\"", "prompts = \"translation\"\nanswers = \"task_references\"");
    let e = RunConfig::from_toml(&bad, root.join("configs"), "simulate.toml").unwrap_err().to_string();
    assert!(e.contains("expected prompts = \"task_inputs\""), "{e}");
}

#[test]
fn a_pooled_client_holds_exactly_the_layouts_shares_and_only_client_keeps_its_own() {
    let Some((cfg, dir, ck)) = setup("dev") else { return };
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let text = std::fs::read_to_string(root.join("configs/simulate.toml")).unwrap();
    let with = |key: &str| {
        // One client: the server waits for it alone.
        let t = text.replace("min_clients = 6", "min_clients = 1").replace("quorum = 4", "quorum = 1");
        let t = t.replace("[data]\n", &format!("[data]\n{key}\n"));
        RunConfig::from_toml(&t, root.join("configs"), "simulate.toml").unwrap()
    };
    let clients: Vec<_> = (0..cfg.data.num_clients()).map(|i| client_data(&cfg, &dir, i, &ck).unwrap()).collect();
    let pooled_cfg = with("pooled = true");
    assert_eq!(pooled_cfg.client_ids(), ["c0"]);
    assert_eq!(pooled_cfg.data.task_names(), cfg.data.task_names());
    let pooled = client_data(&pooled_cfg, &dir, 0, &ck).unwrap();
    let train: Vec<_> = clients.iter().flat_map(|d| d.train.clone()).collect();
    let val: Vec<_> = clients.iter().flat_map(|d| d.val.clone()).collect();
    assert!(!train.is_empty() && pooled.train == train, "the pooled training slice is every client's, in order");
    assert!(pooled.val == val);
    assert_eq!(pooled.stats.n_examples, clients.iter().map(|d| d.stats.n_examples).sum::<u64>());
    assert_eq!(
        pooled.stats.tasks,
        cfg.data.task_names().iter().map(|t| hetfed_data::task::builtin(t).unwrap().name).collect::<Vec<_>>()
    );
    assert!(pooled.val_items.is_empty(), "six tasks have no common local evaluation");
    assert!(client_data(&pooled_cfg, &dir, 1, &ck).is_err());

    let only = with("only_client = 3");
    assert_eq!(only.client_ids(), ["c3"]);
    assert_eq!(only.data.task_names(), [cfg.data.assignment(3).unwrap().0.task]);
    let d = client_data(&only, &dir, 3, &ck).unwrap();
    assert!(d.train == clients[3].train && d.val == clients[3].val && d.stats == clients[3].stats);
    let e = client_data(&only, &dir, 0, &ck).err().unwrap().to_string();
    assert!(e.contains("expected a client of the run (c3), found c0"), "{e}");

    let e = RunConfig::from_toml(
        &text.replace("[data]\n", "[data]\npooled = true\nonly_client = 1\n"),
        root.join("configs"),
        "t",
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("at most one of `pooled` and `only_client`"), "{e}");
}
