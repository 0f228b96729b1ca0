//! `hetfed metric bleu|chrf|rouge`: corpus scores of a hypothesis file against reference files
//! (one segment per line), as sacrebleu / rouge-score / XL-Sum's multilingual ROUGE compute them.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};

use hetfed_metrics::{bleu, chrf, rouge::Rouge};

#[derive(Clone, Copy, ValueEnum)]
pub enum Metric {
    /// Corpus BLEU (sacrebleu defaults: 13a tokenizer, exp smoothing)
    Bleu,
    /// chrF (char order 6, beta 2); chrF++ with --word-order 2
    Chrf,
    /// ROUGE-1/2/L F1 (rouge-score; multilingual tokenisation with --lang)
    Rouge,
}

#[derive(Args)]
pub struct MetricArgs {
    pub metric: Metric,
    /// System outputs, one per line
    #[arg(long, value_name = "FILE")]
    pub hyp: PathBuf,
    /// References, one per line; repeat for several reference sets
    #[arg(long = "ref", value_name = "FILE", required = true)]
    pub refs: Vec<PathBuf>,
    /// ROUGE: score as XL-Sum's multilingual ROUGE for this language (name or code: hindi, hi,
    /// hin_Deva); without it, as Google's rouge-score
    #[arg(long)]
    pub lang: Option<String>,
    /// ROUGE: Porter-stem English tokens (rouge-score's use_stemmer)
    #[arg(long)]
    pub stem: bool,
    /// chrF: word n-gram order (2 = chrF++): 0..=6
    #[arg(long, default_value_t = 0)]
    pub word_order: usize,
    /// Print exactly one JSON object on the 0-100 scale
    #[arg(long)]
    pub json: bool,
}

fn read_lines(p: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
    // A final newline ends the last line; it does not start an empty one.
    Ok(text.strip_suffix('\n').unwrap_or(&text).split('\n').map(|l| l.trim_end_matches('\r').to_string()).collect())
}

/// XL-Sum's language names for the codes hetfed's tasks use.
fn xlsum_lang(l: &str) -> &str {
    match l {
        "en" | "eng" | "eng_Latn" => "english",
        "hi" | "hin" | "hin_Deva" => "hindi",
        "bn" | "ben" | "ben_Beng" => "bengali",
        "ta" | "tam" | "tam_Taml" => "tamil",
        "te" | "tel" | "tel_Telu" => "telugu",
        "mr" | "mar" | "mar_Deva" => "marathi",
        "gu" | "guj" | "guj_Gujr" => "gujarati",
        "fr" | "fra" | "fra_Latn" => "french",
        other => other,
    }
}

pub fn run(a: MetricArgs) -> Result<()> {
    crate::limits::int("--word-order", a.word_order, 0, 6)?;
    let hyps = read_lines(&a.hyp)?;
    let refs: Vec<Vec<String>> = a.refs.iter().map(|p| read_lines(p)).collect::<Result<_>>()?;
    for (p, r) in a.refs.iter().zip(&refs) {
        if r.len() != hyps.len() {
            bail!("{}: expected {} lines (as many as {}), found {}", p.display(), hyps.len(), a.hyp.display(), r.len());
        }
    }
    match a.metric {
        Metric::Bleu => {
            let s = bleu::corpus_bleu(&hyps, &refs)?;
            if a.json {
                println!("{}", serde_json::json!({ "score": s.score }));
            } else {
                let p = s.precisions;
                println!(
                    "BLEU = {:.2} {:.1}/{:.1}/{:.1}/{:.1} (BP = {:.3} ratio = {:.3} hyp_len = {} ref_len = {})",
                    s.score,
                    p[0],
                    p[1],
                    p[2],
                    p[3],
                    s.bp,
                    s.ratio(),
                    s.sys_len,
                    s.ref_len
                );
            }
        }
        Metric::Chrf => {
            let s = chrf::corpus_chrf(&hyps, &refs, chrf::CHAR_ORDER, a.word_order, chrf::BETA)?;
            if a.json {
                println!("{}", serde_json::json!({ "score": s }));
            } else {
                let name = if a.word_order > 0 { "chrF++" } else { "chrF2" };
                println!("{name} = {s:.2}");
            }
        }
        Metric::Rouge => {
            let scorer = match a.lang.as_deref().map(xlsum_lang) {
                None => Rouge::new(a.stem),
                Some(l) => {
                    if a.stem {
                        bail!("--stem: expected no --lang (stemming is rouge-score's English mode), found --lang {l}");
                    }
                    Rouge::multilingual(l)?
                }
            };
            let s = scorer.corpus(&hyps, &refs)?;
            if a.json {
                println!("{}", serde_json::json!({ "rouge1": s.rouge1, "rouge2": s.rouge2, "rougeL": s.rouge_l }));
            } else {
                println!("ROUGE-1 = {:.2}  ROUGE-2 = {:.2}  ROUGE-L = {:.2}", s.rouge1, s.rouge2, s.rouge_l);
            }
        }
    }
    Ok(())
}
