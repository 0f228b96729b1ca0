//! `hetfed demo`: the foundation end to end on a real pretrained model and real data, in under a
//! minute on a laptop: generate, LoRA fine-tune on the Ethos hate-speech train split, evaluate on
//! its dev split before and after, write the task vector and a PEFT adapter.
//!
//! Until the federated simulation exists this is the job the README's first command runs.

use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::DType;
use clap::Args;

use hetfed_data::Split;
use hetfed_eval::{evaluate, EvalOptions};
use hetfed_model::generate::SamplingConfig;
use hetfed_model::{Checkpoint, LoraConfig};
use hetfed_taskvec::TaskVector;
use hetfed_train::{Example, TrainConfig, Trainer};

#[derive(Args)]
pub struct DemoArgs {
    /// Model directory (default: ../shared/models/tinystories-656k)
    #[arg(long, value_name = "DIR")]
    pub model: Option<PathBuf>,
    /// Data directory with ethos/ (default: $HETFED_DATA_DIR, else ../shared/data if it exists,
    /// else the per-user cache, where Ethos is fetched first)
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Where to write the task vector and adapter
    #[arg(long, value_name = "DIR", default_value = "hetfed-demo")]
    pub out: PathBuf,
    /// Fine-tuning epochs: 1..=100
    #[arg(long, default_value_t = 2)]
    pub epochs: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

pub fn run(a: DemoArgs) -> Result<()> {
    crate::limits::int("--epochs", a.epochs, 1, 100)?;
    let model_dir = a.model.clone().unwrap_or_else(|| PathBuf::from("../shared/models/tinystories-656k"));
    let ck = Checkpoint::load(&model_dir)?;
    let tok = ck.tokenizer()?;
    let n_params: usize = ck.weights.values().map(|t| t.elem_count()).sum();
    println!("model      {} ({}, {} parameters)", model_dir.display(), ck.arch.model_type(), n_params);

    let base = ck.model(None)?;
    let prompt = "Once upon a time";
    let ids = tok.encode(prompt, true).map_err(|e| anyhow::anyhow!("{e}"))?.get_ids().to_vec();
    let new = hetfed_model::generate::generate(
        base.as_ref(),
        &ids,
        &SamplingConfig { max_new_tokens: 40, ..Default::default() },
        ck.arch.eos_token_id(),
    )?;
    println!("generate   {prompt}{}", tok.decode(&new, true).map_err(|e| anyhow::anyhow!("{e}"))?.replace('\n', " "));

    let task = hetfed_data::task::builtin("ethos")?;
    let dir = crate::fed::data_dir_for(a.data_dir.as_deref(), vec![crate::data::need_of(&task.dataset)])?;
    let (train_ex, dev_ex) = (task.load(&dir, Split::Train)?, task.load(&dir, Split::Dev)?);
    let counter = |s: &str| tok.encode(s, false).map(|e| e.len()).unwrap_or(0);
    let max_len = 128;
    let train: Vec<Example> = task
        .to_prompt_target(&train_ex, Some(&counter))?
        .into_iter()
        .map(|p| Example { prompt: p.prompt, target: p.target })
        .collect();
    let dev_items = task.to_items(&dev_ex, Some(&counter))?;
    let cfg = TrainConfig {
        lora: Some(LoraConfig { rank: 8, alpha: 16.0, dropout: 0.05, targets: crate::commands::default_targets(&ck) }),
        lr: 3e-3,
        epochs: a.epochs,
        batch_size: 16,
        warmup_steps: 4,
        max_len,
        seed: a.seed,
        ..Default::default()
    };
    let encoded = hetfed_train::encode(tok, &train, max_len, ck.arch.eos_token_id())?;
    let mut tr = Trainer::new(&ck, cfg, None)?;
    let opts = EvalOptions { max_len, ..Default::default() };
    let eos = ck.arch.eos_token_id();
    let before = evaluate(tr.model(), tok, eos, &task, &dev_items, &opts, |_, _| {})?;
    let pb = crate::commands::progress_bar(tr.total_steps(encoded.len()) as u64, "LoRA fine-tune");
    tr.train(
        &encoded,
        |r, _| {
            pb.set_position(r.step as u64);
            pb.set_message(format!("loss {:.4}  {:.0} tok/s", r.loss, r.tokens_per_s));
            Ok(())
        },
        || false,
    )?;
    pb.finish_and_clear();
    let after = evaluate(tr.model(), tok, eos, &task, &dev_items, &opts, |_, _| {})?;
    let m = |r: &hetfed_eval::EvalReport, k: &str| r.metrics.get(k).copied().unwrap_or(f64::NAN);
    println!(
        "finetune   LoRA r=8, {} steps on {} Ethos train examples; Ethos dev ({} examples): accuracy {:.1} -> {:.1}, macro-F1 {:.1} -> {:.1}",
        tr.step,
        train.len(),
        after.n_examples,
        m(&before, "accuracy"),
        m(&after, "accuracy"),
        m(&before, "macro_f1"),
        m(&after, "macro_f1"),
    );

    let set = tr.lora().context("the demo trains LoRA adapters")?;
    let tv = TaskVector::from_lora(ck.identity()?, set)?;
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let tv_path = a.out.join("taskvec.safetensors");
    tv.save(&tv_path, DType::F32)?;
    hetfed_taskvec::peft::export_peft_factors(
        &set.config,
        &set.to_tensors(),
        &a.out.join("adapter"),
        &model_dir.display().to_string(),
    )?;
    println!(
        "taskvec    {} (lora, {} stored values for {} parameters, norm {:.4}); PEFT adapter in {}",
        tv_path.display(),
        tv.num_stored_values(),
        tv.num_params(),
        tv.global_norm()?,
        a.out.join("adapter").display()
    );
    Ok(())
}
