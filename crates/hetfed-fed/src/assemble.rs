//! Building servers and clients from a [`RunConfig`], and the in-process simulation: the server
//! object and N clients in one process, talking through the in-memory transport (the client
//! holds `Arc<dyn FedService>` = the server itself). Deployment builds the same objects and puts
//! gRPC in between.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use hetfed_core::{Error, Result};
use hetfed_data::{partition::entropy_bits, DataDir, Examples, Items, Split};
use hetfed_eval::EvalOptions;
use hetfed_model::Checkpoint;
use hetfed_net::{Caller, DataStats, FedService, Secret};
use hetfed_train::Example;

use crate::client::{run_client, ClientData, ClientOptions, ClientSummary, TrainMemo};
use crate::config::{ClientGroup, EvalSplit, RunConfig};
use crate::hetero::{
    fisher_diagonal, Aggregation, Calibration, Continual, Hetero, OffsetAnswers, OffsetPrompts, OffsetSequences,
    ServerText, SmallBase, TransferConfig,
};
use crate::server::{Auth, EvalTask, RunSummary, Server, ServerEval, ServerOptions};
use hetfed_transfer::PairMaps;

/// Loads the private data of client `c<index>` of the run: the partition of its task's train
/// split, capped, cut into local train and held-out slices, with its statistics. With
/// `data.pooled`, client 0 holds every share of the layout (see [`pooled_data`]); with
/// `data.only_client`, only that client exists.
pub fn client_data(cfg: &RunConfig, dir: &DataDir, index: usize, ck: &Checkpoint) -> Result<ClientData> {
    let ours = cfg.data.run_clients();
    if !ours.contains(&index) {
        let ids = ours.iter().map(|i| format!("c{i}")).collect::<Vec<_>>().join(", ");
        return Err(Error::msg(format!("client index: expected a client of the run ({ids}), found c{index}")));
    }
    if cfg.data.pooled {
        return pooled_data(cfg, dir, ck);
    }
    layout_client_data(cfg, dir, index, ck)
}

/// The one client of a `data.pooled` run: every share the clients of the layout would hold, in
/// client order (training slices after training slices, held-out after held-out), with their
/// statistics summed. Its task is the first client's; it evaluates locally only when every
/// share is of one task (a choice and a generation task have no common evaluation).
pub fn pooled_data(cfg: &RunConfig, dir: &DataDir, ck: &Checkpoint) -> Result<ClientData> {
    let mut acc: Option<ClientData> = None;
    let mut hist: BTreeMap<String, u64> = BTreeMap::new();
    let mut same_task = true;
    for i in 0..cfg.data.num_clients() {
        let d = layout_client_data(cfg, dir, i, ck)?;
        for (w, c) in &d.stats.label_hist {
            *hist.entry(w.clone()).or_default() += c;
        }
        match &mut acc {
            None => acc = Some(d),
            Some(a) => {
                a.train.extend(d.train);
                a.val.extend(d.val);
                same_task &= a.task.name == d.task.name;
                if same_task {
                    extend_items(&mut a.val_items, d.val_items);
                }
                a.stats.n_examples += d.stats.n_examples;
                a.stats.n_tokens += d.stats.n_tokens;
                for t in d.stats.tasks {
                    if !a.stats.tasks.contains(&t) {
                        a.stats.tasks.push(t);
                    }
                }
            }
        }
    }
    let mut data = acc.ok_or_else(|| Error::msg("data.pooled: expected at least one client, found none"))?;
    if !same_task {
        data.val_items = empty_items(&data.val_items);
    }
    let counts: Vec<usize> = hist.values().map(|&c| c as usize).collect();
    data.stats.label_entropy_bits = entropy_bits(&counts);
    data.stats.label_hist = hist;
    Ok(data)
}

fn extend_items(a: &mut Items, b: Items) {
    match (a, b) {
        (Items::Choice(a), Items::Choice(b)) => a.extend(b),
        (Items::Generation(a), Items::Generation(b)) => a.extend(b),
        (Items::Lm(a), Items::Lm(b)) => a.extend(b),
        // One task has one kind of items.
        _ => {}
    }
}

fn empty_items(like: &Items) -> Items {
    match like {
        Items::Choice(_) => Items::Choice(Vec::new()),
        Items::Generation(_) => Items::Generation(Vec::new()),
        Items::Lm(_) => Items::Lm(Vec::new()),
    }
}

/// Client `index` of the layout, whatever the run's `pooled` or `only_client`.
fn layout_client_data(cfg: &RunConfig, dir: &DataDir, index: usize, ck: &Checkpoint) -> Result<ClientData> {
    let d = &cfg.data;
    let (group, in_group) = d
        .assignment(index)
        .ok_or_else(|| Error::msg(format!("client index: expected 0..{}, found {index}", d.num_clients())))?;
    let task = hetfed_data::task::builtin(&group.task)?;
    let examples = task.load(dir, Split::Train)?;
    let labels = examples.labels().unwrap_or_else(|| vec![0; examples.len()]);
    let mine = client_share(cfg, &group, in_group, &labels)?;
    let n_val = ((mine.len() as f64) * d.val_fraction).round() as usize;
    let n_val = n_val.min(mine.len().saturating_sub(1));
    let (train_idx, val_idx) = mine.split_at(mine.len() - n_val);
    let tok = ck.tokenizer()?;
    let counter = |s: &str| tok.encode(s, false).map(|e| e.len()).unwrap_or(0);
    let pairs = |idx: &[usize]| -> Result<Vec<Example>> {
        let sub = examples.subset(idx)?;
        Ok(task
            .to_prompt_target(&sub, Some(&counter))?
            .into_iter()
            .map(|p| Example { prompt: p.prompt, target: p.target })
            .collect())
    };
    let train = pairs(train_idx)?;
    let val = pairs(val_idx)?;
    let val_items = task.to_items(&examples.subset(val_idx)?, Some(&counter))?;
    let mut hist = BTreeMap::new();
    let mut counts = vec![0usize; task.label_words.len()];
    if examples.labels().is_some() {
        for &i in train_idx {
            if let Some(c) = counts.get_mut(labels[i]) {
                *c += 1;
            }
        }
        for (w, c) in task.label_words.iter().zip(&counts) {
            hist.insert(w.trim().to_string(), *c as u64);
        }
    }
    let n_tokens = train.iter().map(|e| counter(&e.prompt) + counter(&e.target)).sum::<usize>() as u64;
    let stats = DataStats {
        tasks: vec![task.name.clone()],
        n_examples: train.len() as u64,
        n_tokens,
        label_hist: hist,
        label_entropy_bits: entropy_bits(&counts),
    };
    Ok(ClientData { task, train, val, val_items, stats })
}

/// The indices of its task's train split that client `in_group` of `group` holds (capped at
/// `max_examples_per_client`; its local held-out slice included), in its seeded order.
fn client_share(cfg: &RunConfig, group: &ClientGroup, in_group: usize, labels: &[usize]) -> Result<Vec<usize>> {
    let d = &cfg.data;
    // Each group partitions its own task; the seed names the group so that two groups of one
    // task do not get the same shares.
    let group_idx = d.groups().iter().position(|g| g == group).unwrap_or(0) as u64;
    let seed = if group_idx == 0 { d.seed } else { hetfed_core::mix_seed(d.seed, group_idx) };
    let parts = group.partition.unwrap_or(d.partition).split(labels, group.clients, seed)?;
    // The share in a seeded random order before the cap and the held-out cut: data files are
    // often sorted (Ethos by label, BBC by topic), so the first N would be one class.
    let mut mine = parts[in_group].clone();
    hetfed_data::partition::SplitMix64::new(hetfed_core::mix_seed(seed, 0x5EED_0000 + in_group as u64))
        .shuffle(&mut mine);
    if d.max_examples_per_client > 0 {
        mine.truncate(d.max_examples_per_client);
    }
    Ok(mine)
}

/// The validation cut of `task`'s train split: the examples no client of the run holds. For
/// choosing settings without touching a dev or test split.
fn validation_cut(cfg: &RunConfig, task: &str, examples: &Examples) -> Result<Vec<usize>> {
    let labels = examples.labels().unwrap_or_else(|| vec![0; examples.len()]);
    let mut held = vec![false; examples.len()];
    for group in cfg.data.groups().iter().filter(|g| g.task == task) {
        for i in 0..group.clients {
            for j in client_share(cfg, group, i, &labels)? {
                held[j] = true;
            }
        }
    }
    Ok((0..examples.len()).filter(|&j| !held[j]).collect())
}

/// The server's evaluation tasks (dev splits): every task of the run's clients, then
/// `server.eval.tasks` (forgetting monitors such as COPA). Evaluation is off when
/// `server.eval.tasks` is empty and `general_lines` is 0.
pub fn server_eval(cfg: &RunConfig, dir: &DataDir, ck: &Checkpoint) -> Result<Option<ServerEval>> {
    let e = &cfg.server.eval;
    if e.tasks.is_empty() && e.general_lines == 0 {
        return Ok(None);
    }
    let mut names = cfg.data.task_names();
    // The validation cut exists only for the clients' tasks (a train split the run partitions).
    if e.split != EvalSplit::Validation {
        for t in &e.tasks {
            if !names.contains(t) {
                names.push(t.clone());
            }
        }
    }
    let tok = ck.tokenizer()?;
    let counter = |s: &str| tok.encode(s, false).map(|e| e.len()).unwrap_or(0);
    let mut tasks = Vec::new();
    for name in &names {
        let spec = hetfed_data::task::builtin(name)?;
        let mut ex = match e.split {
            EvalSplit::Test => spec.load(dir, Split::Test)?,
            EvalSplit::Validation => {
                let train = spec.load(dir, Split::Train)?;
                let cut = validation_cut(cfg, name, &train)?;
                train.subset(&cut)?
            }
            EvalSplit::Dev => spec.load(dir, Split::Dev)?,
        };
        if e.max_examples > 0 && ex.len() > e.max_examples {
            ex = ex.subset(&strided(ex.len(), e.max_examples))?;
        }
        let items = spec.to_items(&ex, Some(&counter))?;
        tasks.push(EvalTask { spec, items });
    }
    let mut general = Vec::new();
    if e.general_lines > 0 {
        let eos = ck.arch.eos_token_id().unwrap_or(0);
        for line in general_text(dir, Split::Dev, e.general_lines)? {
            let mut ids = vec![eos];
            ids.extend(tok.encode(line.as_str(), false).map_err(|e| Error::msg(format!("tokenising: {e}")))?.get_ids());
            ids.truncate(e.max_len.max(2));
            general.push(hetfed_train::Encoded { ids, prompt_len: 1 });
        }
    }
    Ok(Some(ServerEval { tasks, opts: eval_options(cfg), every: e.every, general }))
}

/// `k` of `0..n`, evenly spaced (`i·n/k`): a subset that spans a sorted file, the same for
/// every seed and every row of a sweep.
pub fn strided(n: usize, k: usize) -> Vec<usize> {
    let k = k.min(n);
    (0..k).map(|i| i * n / k).collect()
}

/// Up to `n` lines of the server's general text: `mltext` English, `split`.
pub fn general_text(dir: &DataDir, split: Split, n: usize) -> Result<Vec<String>> {
    let spec: hetfed_data::DatasetSpec = "mltext:en".parse()?;
    let ex = spec.load(dir, split)?;
    let hetfed_data::Examples::Text(v) = ex else {
        return Err(Error::msg("mltext: expected text examples"));
    };
    Ok(v.into_iter().take(n).map(|e| e.text).collect())
}

pub fn eval_options(cfg: &RunConfig) -> EvalOptions {
    EvalOptions {
        batch_size: cfg.server.eval.batch_size,
        max_len: cfg.server.eval.max_len,
        max_new_tokens: cfg.server.eval.max_new_tokens,
        ..Default::default()
    }
}

/// The server of a run.
pub fn build_server(cfg: &RunConfig, dir: &DataDir, run_dir: &Path, auth: Auth, resume: bool) -> Result<Arc<Server>> {
    // A factored server model keeps its base as stored (a 7B model in f16) and never rewrites it.
    let dtype = match &cfg.transfer {
        Some(t) if t.factored => hetfed_model::WeightDtype::Stored,
        _ => hetfed_model::WeightDtype::F32,
    };
    let ck = Checkpoint::load_with(&cfg.path(&cfg.server.model), dtype)?;
    let eval = server_eval(cfg, dir, &ck)?;
    let strategy: Box<dyn crate::Strategy> = match &cfg.transfer {
        Some(t) => Box::new(build_hetero(cfg, t, dir, &ck)?),
        None => cfg.strategy.build(cfg.sampling, cfg.client.clone(), cfg.run.seed),
    };
    let s = &cfg.server;
    let opts = ServerOptions {
        run_dir: run_dir.to_path_buf(),
        rounds: cfg.run.rounds,
        seed: cfg.run.seed,
        min_clients: s.min_clients,
        quorum: s.quorum,
        round_timeout: Duration::from_secs_f64(s.round_timeout_s),
        register_timeout: Duration::from_secs_f64(s.register_timeout_s),
        max_update_norm: s.max_update_norm,
        max_update_bytes: s.max_update_mib << 20,
        max_poll: Duration::from_secs(20),
        auth,
        resume,
        config_json: run_config_json(cfg),
        strategy_name: strategy.name().to_string(),
    };
    Server::new(opts, ck, strategy, eval)
}

/// The run's config as `run_start` records it, with the server model's directory resolved (so
/// that `hetfed export` finds it wherever the run was started from).
fn run_config_json(cfg: &RunConfig) -> serde_json::Value {
    let mut v = serde_json::to_value(cfg).unwrap_or_default();
    let model = cfg.path(&cfg.server.model);
    let model = std::fs::canonicalize(&model).unwrap_or(model);
    v["server"]["model"] = serde_json::Value::String(model.display().to_string());
    v
}

/// The calibration sequences of a heterogeneous run (server-owned: sampled from its model or
/// its own general text; never client data).
pub fn calibration_sequences(t: &TransferConfig, dir: &DataDir, large: &Checkpoint) -> Result<Vec<Vec<u32>>> {
    let eos = large.arch.eos_token_id().unwrap_or(0);
    match t.calibration {
        Calibration::Sample => {
            let model = large.model(None)?;
            hetfed_transfer::sample_sequences(
                model.as_ref(),
                eos,
                t.calibration_sequences,
                t.calibration_len,
                t.maps.seed,
            )
        }
        Calibration::Text => {
            let texts = general_text(dir, Split::Train, 20 * t.calibration_sequences)?;
            hetfed_transfer::text_sequences(large.tokenizer()?, &texts, eos, t.calibration_sequences, t.calibration_len)
        }
    }
}

/// The small base models of a heterogeneous run with their maps (fitted, or from the cache).
pub fn small_bases(cfg: &RunConfig, t: &TransferConfig, dir: &DataDir, large: &Checkpoint) -> Result<Vec<SmallBase>> {
    let cache = t.cache_dir.clone().unwrap_or_else(|| PathBuf::from("runs/maps"));
    let mut calib: Option<Vec<Vec<u32>>> = None;
    let mut out: Vec<SmallBase> = Vec::new();
    // A factored server keeps the small bases as stored too: the maps are fitted on them and
    // their identities do not depend on the resident dtype.
    let dtype = if t.factored { hetfed_model::WeightDtype::Stored } else { hetfed_model::WeightDtype::F32 };
    for m in &t.client_models {
        let small = Checkpoint::load_with(&cfg.path(m), dtype)?;
        let identity = small.identity()?;
        if out.iter().any(|s| s.identity == identity) {
            continue;
        }
        let (maps, cached) =
            PairMaps::load_or_fit(&cache, &small, large, &t.calibration_key(), &t.maps, || match &calib {
                Some(c) => Ok(c.clone()),
                None => {
                    let c = calibration_sequences(t, dir, large)?;
                    calib = Some(c.clone());
                    Ok(c)
                }
            })?;
        tracing::info!(
            "maps {} → {} ({}): {}, mean held-out R² {:.3}, fitted in {:.1} s",
            small.source(),
            large.source(),
            t.maps.method.name(),
            if cached { "from the cache" } else { "fitted" },
            maps.summary.mean_explained_variance,
            maps.summary.seconds
        );
        out.push(SmallBase::new(small, maps)?);
    }
    Ok(out)
}

/// The heterogeneous strategy of a run: its small bases with their maps, and the server model's
/// Fisher information when `transfer.continual = "fisher"`.
pub fn build_hetero(cfg: &RunConfig, t: &TransferConfig, dir: &DataDir, large: &Checkpoint) -> Result<Hetero> {
    let smalls = small_bases(cfg, t, dir, large)?;
    let fisher = if t.continual == Continual::Fisher {
        Some(fisher_diagonal(large, &calibration_sequences(t, dir, large)?)?)
    } else {
        None
    };
    let text = if t.aggregation == Aggregation::OffsetDistillation {
        server_text(cfg, t, dir, large)?
    } else {
        ServerText::default()
    };
    Hetero::new(t.clone(), cfg.sampling, cfg.client.clone(), cfg.run.seed, large, smalls, fisher, text)
}

/// The server's own text for offset distillation: general sequences (`mltext` English train
/// lines, packed into windows of `offset.seq_len` tokens, each after the start token) and each
/// run task's example format (the server defines its tasks' templates).
pub fn server_text(cfg: &RunConfig, t: &TransferConfig, dir: &DataDir, large: &Checkpoint) -> Result<ServerText> {
    let oc = &t.offset;
    let eos = large.arch.eos_token_id().unwrap_or(0);
    let tok = large.tokenizer()?;
    let mut general = Vec::new();
    if matches!(oc.sequences, OffsetSequences::General | OffsetSequences::Mixed) {
        // The training windows, then the held-out ones (the first windows do not depend on how
        // many follow).
        let n = oc.general_sequences + oc.heldout_per_task;
        let texts = general_text(dir, Split::Train, 40 * n)?;
        let windows = hetfed_transfer::text_sequences(tok, &texts, eos, n, oc.seq_len - 1)?;
        general = windows.into_iter().map(|w| std::iter::once(eos).chain(w).collect()).collect();
    }
    let mut templates = BTreeMap::new();
    let mut answers = BTreeMap::new();
    let mut prompts = BTreeMap::new();
    for name in cfg.data.task_names() {
        let spec = hetfed_data::task::builtin(&name)?;
        let mut segments = Vec::new();
        for part in spec.skeleton() {
            segments.push(match part {
                hetfed_data::task::TemplatePart::Text(t) => {
                    let ids = tok
                        .encode(t.as_str(), false)
                        .map_err(|e| Error::msg(format!("tokenising the template of {name}: {e}")))?;
                    hetfed_distill::Segment::Text(ids.get_ids().to_vec())
                }
                hetfed_data::task::TemplatePart::Field(_) => hetfed_distill::Segment::Field,
            });
        }
        templates.insert(spec.name.clone(), segments);
        if oc.answers == OffsetAnswers::Text {
            if let Some(lang) = spec.dataset.answer_lang() {
                answers.insert(spec.name.clone(), text_answers(dir, &lang, tok, Some(eos), oc.seq_len)?);
            }
        }
        let translation = spec.kind == hetfed_data::task::TaskKind::Translation;
        let text_prompts = match oc.prompts {
            OffsetPrompts::Sampled => false,
            OffsetPrompts::Text => true,
            OffsetPrompts::Translation => translation,
            OffsetPrompts::TaskInputs => {
                if translation {
                    let (p, a) = task_inputs(dir, &spec, tok, eos, oc.seq_len)?;
                    prompts.insert(spec.name.clone(), p);
                    if oc.answers == OffsetAnswers::TaskReferences {
                        answers.insert(spec.name.clone(), a);
                    }
                }
                false
            }
        };
        if text_prompts {
            if let Some(lang) = spec.dataset.prompt_lang() {
                prompts.insert(spec.name.clone(), text_answers(dir, &lang, tok, None, oc.seq_len)?);
            }
        }
    }
    Ok(ServerText { general, templates, answers, prompts })
}

/// Teacher-forced fields in language `lang` from the server's own text (`mltext:<lang>` train
/// lines, in file order): each starts at a line and runs over consecutive lines (` line`, then
/// `eos` when given: an answer ends there) until it has `len` tokens; at most
/// [`MAX_TEXT_ANSWERS`] of them.
fn text_answers(
    dir: &DataDir,
    lang: &str,
    tok: &hetfed_model::tokenizers::Tokenizer,
    eos: Option<u32>,
    len: usize,
) -> Result<Vec<Vec<u32>>> {
    let spec: hetfed_data::DatasetSpec = format!("mltext:{lang}").parse()?;
    let hetfed_data::Examples::Text(lines) = spec.load(dir, Split::Train)? else {
        return Err(Error::msg("mltext: expected text examples"));
    };
    let lines: Vec<&str> = lines.iter().map(|l| l.text.as_str()).collect();
    let out = line_windows(&lines, tok, eos, len, &format!("mltext:{lang}"))?;
    if out.is_empty() {
        return Err(Error::msg(format!(
            "offset {} = \"text\": expected mltext:{lang} train text of at least {len} tokens, found {} lines",
            if eos.is_some() { "answers" } else { "prompts" },
            lines.len()
        )));
    }
    Ok(out)
}

/// The diagnostic oracles' fields (`offset.prompts = "task_inputs"`, `answers =
/// "task_references"`): windows of the translation task's own train-split source sentences, as
/// [`text_answers`] makes of the server's text, and the windows of their references (each ended
/// by `eos`), window `i` of both starting at example `i` (as many of each).
fn task_inputs(
    dir: &DataDir,
    spec: &hetfed_data::task::TaskSpec,
    tok: &hetfed_model::tokenizers::Tokenizer,
    eos: u32,
    len: usize,
) -> Result<(Windows, Windows)> {
    let hetfed_data::Examples::Translation(examples) = spec.dataset.load(dir, Split::Train)? else {
        return Err(Error::msg(format!("offset prompts = \"task_inputs\": {} is not a translation task", spec.name)));
    };
    let sources: Vec<&str> = examples.iter().map(|e| e.src.as_str()).collect();
    let references: Vec<&str> = examples.iter().map(|e| e.tgt.as_str()).collect();
    let mut out = line_windows(&sources, tok, None, len, &spec.name)?;
    let mut refs = line_windows(&references, tok, Some(eos), len, &spec.name)?;
    let n = out.len().min(refs.len());
    out.truncate(n);
    refs.truncate(n);
    if out.is_empty() {
        return Err(Error::msg(format!(
            "offset prompts = \"task_inputs\": expected {} train sources of at least {len} tokens, found {} sentences",
            spec.name,
            sources.len()
        )));
    }
    Ok((out, refs))
}

/// Windows of `len` tokens over consecutive `lines` (` line`, then `eos` when given), one
/// starting at each line while enough text follows; at most [`MAX_TEXT_ANSWERS`].
fn line_windows(
    lines: &[&str],
    tok: &hetfed_model::tokenizers::Tokenizer,
    eos: Option<u32>,
    len: usize,
    what: &str,
) -> Result<Vec<Vec<u32>>> {
    let mut ids = Vec::with_capacity(lines.len());
    for l in lines.iter().take(4 * MAX_TEXT_ANSWERS) {
        let e =
            tok.encode(format!(" {}", l.trim()), false).map_err(|e| Error::msg(format!("tokenising {what}: {e}")))?;
        let mut v = e.get_ids().to_vec();
        v.extend(eos);
        ids.push(v);
    }
    let mut out = Vec::new();
    for start in 0..ids.len() {
        let mut a: Vec<u32> = Vec::with_capacity(len);
        for l in &ids[start..] {
            a.extend_from_slice(l);
            if a.len() >= len {
                break;
            }
        }
        if a.len() < len {
            break;
        }
        a.truncate(len);
        out.push(a);
        if out.len() == MAX_TEXT_ANSWERS {
            break;
        }
    }
    Ok(out)
}

/// Token windows, each one field's text.
type Windows = Vec<Vec<u32>>;

/// The most teacher-forced answers kept per task.
const MAX_TEXT_ANSWERS: usize = 2048;

/// The options of client `c<index>`. Its model: `model` when given, else in heterogeneous runs
/// `transfer.client_models[index mod len]`, else the server's model.
pub fn build_client(
    cfg: &RunConfig,
    dir: &DataDir,
    index: usize,
    caller: Caller,
    model: Option<&Path>,
) -> Result<ClientOptions> {
    let default_model = match &cfg.transfer {
        Some(t) if !t.client_models.is_empty() => cfg.path(&t.client_models[index % t.client_models.len()]),
        _ => cfg.path(&cfg.server.model),
    };
    let model_dir: PathBuf = model.map(Path::to_path_buf).unwrap_or(default_model);
    let dtype = match cfg.client.weights {
        crate::strategy::BaseWeights::Stored if cfg.client.lora_rank > 0 => hetfed_model::WeightDtype::Stored,
        _ => hetfed_model::WeightDtype::F32,
    };
    let base = Checkpoint::load_with(&model_dir, dtype)?;
    let data = client_data(cfg, dir, index, &base)?;
    Ok(ClientOptions {
        caller,
        base,
        data,
        eval_opts: eval_options(cfg),
        poll_wait: Duration::from_secs(10),
        backoff: Duration::from_millis(200),
        give_up_after: Duration::from_secs_f64(cfg.deploy.as_ref().map_or(120.0, |d| d.give_up_s)),
        on_round: None,
        state_dir: None,
        memo: None,
    })
}

/// A random token (simulation: the server checks tokens exactly as in deployment).
pub fn random_token() -> String {
    use rand::RngCore;
    let mut b = [0u8; 24];
    rand::rng().fill_bytes(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// What a simulation returns.
pub struct SimOutcome {
    pub summary: RunSummary,
    pub clients: Vec<(String, ClientSummary)>,
    pub server: Arc<Server>,
}

/// Runs the whole federation in this process.
pub async fn simulate(cfg: &RunConfig, dir: &DataDir, run_dir: &Path, resume: bool) -> Result<SimOutcome> {
    simulate_with(cfg, dir, run_dir, resume, None, |_| {}).await
}

/// [`simulate`], its clients reusing the training results in `memo` (and adding theirs), handing
/// the server to `on_server` once built (for progress displays).
pub async fn simulate_with(
    cfg: &RunConfig,
    dir: &DataDir,
    run_dir: &Path,
    resume: bool,
    memo: Option<&TrainMemo>,
    on_server: impl FnOnce(Arc<Server>),
) -> Result<SimOutcome> {
    let ids = cfg.client_ids();
    let mut auth = Auth::default();
    let tokens: Vec<String> = ids.iter().map(|_| random_token()).collect();
    for (id, t) in ids.iter().zip(&tokens) {
        auth.add_token(id, t);
    }
    let server = build_server(cfg, dir, run_dir, auth, resume)?;
    on_server(server.clone());
    let mut handles = Vec::new();
    for (i, (id, t)) in cfg.data.run_clients().into_iter().zip(ids.iter().zip(tokens)) {
        let caller = Caller { client_id: id.clone(), token: Secret::new(t) };
        let mut opts = build_client(cfg, dir, i, caller, None)?;
        opts.state_dir = Some(run_dir.join("clients").join(id));
        opts.memo = memo.cloned();
        let svc: Arc<dyn FedService> = server.clone();
        let id = id.clone();
        handles.push(tokio::spawn(async move { (id, run_client(svc, opts).await) }));
    }
    let summary = server.run().await?;
    let mut clients = Vec::new();
    for h in handles {
        let (id, r) = h.await.map_err(|e| Error::msg(format!("client task failed: {e}")))?;
        clients.push((id.clone(), r.map_err(|e| Error::msg(format!("client {id}: {e}")))?));
    }
    Ok(SimOutcome { summary, clients, server })
}
