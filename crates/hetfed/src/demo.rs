//! `hetfed demo`: the foundation end to end on a real pretrained model and real data, in about
//! a minute on a laptop: generate, score, LoRA fine-tune on Ethos hate-speech examples, measure
//! held-out loss before and after, write the task vector and a PEFT adapter.
//!
//! Until the federated simulation exists this is the job the README's first command runs.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::DType;
use clap::Args;

use hetfed_model::generate::SamplingConfig;
use hetfed_model::{Checkpoint, LoraConfig};
use hetfed_taskvec::TaskVector;
use hetfed_train::{Example, TrainConfig, Trainer};

#[derive(Args)]
pub struct DemoArgs {
    /// Model directory (default: ../shared/models/tinystories-656k)
    #[arg(long, value_name = "DIR")]
    pub model: Option<PathBuf>,
    /// Data directory holding ethos/Ethos_Dataset_Binary.csv (default: $HETFED_DATA_DIR, else ../shared/data)
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Where to write the task vector and adapter
    #[arg(long, value_name = "DIR", default_value = "hetfed-demo")]
    pub out: PathBuf,
    #[arg(long, default_value_t = 3)]
    pub epochs: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

fn data_dir(a: &DemoArgs) -> PathBuf {
    a.data_dir
        .clone()
        .or_else(|| std::env::var_os("HETFED_DATA_DIR").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("../shared/data"))
}

/// Ethos binary rows (`comment;isHate`, hate iff isHate >= 0.5) as prompt/target pairs.
fn ethos(path: &Path) -> Result<Vec<Example>> {
    let text = std::fs::read_to_string(path).with_context(|| {
        format!("reading the Ethos dataset at {} (public copy: github.com/intelligence-csd-auth-gr/Ethos-Hate-Speech-Dataset)", path.display())
    })?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate().skip(1) {
        let Some((comment, score)) = line.rsplit_once(';') else { continue };
        let score: f64 = score.trim().parse().with_context(|| format!("{}: line {}: expected a number after the last ';', found {score:?}", path.display(), i + 1))?;
        out.push(Example {
            prompt: format!("Comment: {}\nIs this comment hateful?", comment.trim()),
            target: if score >= 0.5 { " yes".into() } else { " no".into() },
        });
    }
    if out.len() < 64 {
        bail!("{}: expected at least 64 rows, found {}", path.display(), out.len());
    }
    Ok(out)
}

/// Accuracy of choosing the label word (" yes" / " no") with the higher log-likelihood after
/// the prompt.
fn label_accuracy(model: &dyn hetfed_model::CausalLm, tok: &hetfed_model::tokenizers::Tokenizer, examples: &[Example]) -> Result<f64> {
    let enc = |s: &str, special: bool| -> Result<Vec<u32>> { Ok(tok.encode(s, special).map_err(|e| anyhow::anyhow!("{e}"))?.get_ids().to_vec()) };
    let (yes, no) = (enc(" yes", false)?, enc(" no", false)?);
    let mut pairs = Vec::new();
    for ex in examples {
        let p = enc(&ex.prompt, true)?;
        pairs.push((p.clone(), yes.clone()));
        pairs.push((p, no.clone()));
    }
    let scores = hetfed_model::score::continuation_logprobs(model, &pairs, 16)?;
    let correct = examples
        .iter()
        .zip(scores.chunks(2))
        .filter(|(ex, s)| (s[0].sum > s[1].sum) == (ex.target == " yes"))
        .count();
    Ok(correct as f64 / examples.len() as f64)
}

pub fn run(a: DemoArgs) -> Result<()> {
    let model_dir = a.model.clone().unwrap_or_else(|| PathBuf::from("../shared/models/tinystories-656k"));
    let ck = Checkpoint::load(&model_dir)?;
    let tok = ck.tokenizer()?;
    let n_params: usize = ck.weights.values().map(|t| t.elem_count()).sum();
    println!("model      {} ({}, {} parameters)", model_dir.display(), ck.arch.model_type(), n_params);

    let base = ck.model(None)?;
    let prompt = "Once upon a time";
    let ids = tok.encode(prompt, true).map_err(|e| anyhow::anyhow!("{e}"))?.get_ids().to_vec();
    let new = hetfed_model::generate::generate(base.as_ref(), &ids, &SamplingConfig { max_new_tokens: 40, ..Default::default() }, ck.arch.eos_token_id())?;
    println!("generate   {prompt}{}", tok.decode(&new, true).map_err(|e| anyhow::anyhow!("{e}"))?);

    let examples = ethos(&data_dir(&a).join("ethos/Ethos_Dataset_Binary.csv"))?;
    // The file is sorted by label: draw both (disjoint) splits across all of it so each holds
    // both labels in the file's proportions.
    let pick = |r: usize| -> Vec<Example> { examples.iter().enumerate().filter(|(i, _)| i % 4 == r).map(|(_, e)| e.clone()).collect() };
    let (train, held) = (pick(1), pick(3));
    let majority = {
        let hate = held.iter().filter(|e| e.target == " yes").count() as f64 / held.len() as f64;
        hate.max(1.0 - hate)
    };
    let cfg = TrainConfig {
        lora: Some(LoraConfig {
            rank: 8,
            alpha: 16.0,
            dropout: 0.05,
            targets: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"].map(String::from).to_vec(),
        }),
        lr: 3e-3,
        epochs: a.epochs,
        batch_size: 16,
        warmup_steps: 4,
        max_len: 96,
        seed: a.seed,
        ..Default::default()
    };
    if !matches!(ck.arch, hetfed_model::Arch::Llama(_)) {
        bail!("the demo's LoRA targets are Llama module names; run `hetfed finetune` for other models");
    }
    let eos = ck.arch.eos_token_id();
    let train = hetfed_train::encode(tok, &train, cfg.max_len, eos)?;
    let held_examples = held.clone();
    let held = hetfed_train::encode(tok, &held, cfg.max_len, eos)?;
    let mut tr = Trainer::new(&ck, cfg, None)?;
    let before = tr.eval_loss(&held)?;
    let acc_before = label_accuracy(tr.model(), tok, &held_examples)?;
    let pb = crate::commands::progress_bar(tr.total_steps(train.len()) as u64, "LoRA fine-tune");
    tr.train(
        &train,
        |r, _| {
            pb.set_position(r.step as u64);
            pb.set_message(format!("loss {:.4}  {:.0} tok/s", r.loss, r.tokens_per_s));
            Ok(())
        },
        || false,
    )?;
    pb.finish_and_clear();
    let after = tr.eval_loss(&held)?;
    let acc_after = label_accuracy(tr.model(), tok, &held_examples)?;
    println!(
        "finetune   LoRA r=8 on {} Ethos examples; on {} held-out: loss {before:.4} -> {after:.4}, accuracy {:.1}% -> {:.1}% (majority class {:.1}%)",
        train.len(),
        held.len(),
        100.0 * acc_before,
        100.0 * acc_after,
        100.0 * majority
    );

    let set = tr.lora().expect("LoRA run");
    let tv = TaskVector::from_lora(ck.identity()?, set)?;
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    let tv_path = a.out.join("taskvec.safetensors");
    tv.save(&tv_path, DType::F32)?;
    hetfed_taskvec::peft::export_peft_factors(&set.config, &set.to_tensors(), &a.out.join("adapter"), &model_dir.display().to_string())?;
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
