//! Parity with the reference implementations on the fixtures written by
//! `tools/parity/make_metric_fixtures.py` (sacrebleu, rouge-score, XL-Sum's multilingual ROUGE,
//! nltk, scikit-learn) from real text. Scores must agree within 0.01 on the 0–100 scale, n-gram
//! statistics, tokens and stems exactly. Run with `--nocapture` to see the largest differences.

use std::path::PathBuf;

use hetfed_metrics::{bleu, chrf, classification, porter, rouge::Rouge};
use serde::Deserialize;

/// Largest accepted difference on the 0–100 scale.
const TOL: f64 = 0.01;

fn load<T: for<'de> Deserialize<'de>>(name: &str) -> T {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Tracks the largest difference seen and fails on one above the tolerance.
struct MaxDiff {
    what: &'static str,
    max: f64,
    at: String,
}

impl MaxDiff {
    fn new(what: &'static str) -> Self {
        MaxDiff { what, max: 0.0, at: String::new() }
    }

    fn check(&mut self, ours: f64, reference: f64, tol: f64, at: impl Fn() -> String) {
        let d = (ours - reference).abs();
        assert!(d <= tol, "{} {}: ours {ours}, reference {reference} (difference {d} > {tol})", self.what, at());
        if d > self.max || self.at.is_empty() {
            self.max = self.max.max(d);
            self.at = at();
        }
    }

    fn report(&self) {
        eprintln!("{}: max |ours - reference| = {:e} ({})", self.what, self.max, self.at);
    }
}

#[derive(Deserialize)]
struct MtFile {
    sets: Vec<MtSet>,
}

#[derive(Deserialize)]
struct MtSet {
    name: String,
    hyps: Vec<String>,
    refs: Vec<Vec<String>>,
    bleu: BleuExpected,
    chrf: f64,
    chrf_pp: f64,
}

#[derive(Deserialize)]
struct BleuExpected {
    score: f64,
    counts: [u64; 4],
    totals: [u64; 4],
    precisions: [f64; 4],
    bp: f64,
    sys_len: u64,
    ref_len: u64,
}

#[test]
fn bleu_matches_sacrebleu() {
    let file: MtFile = load("mt.json");
    let mut score = MaxDiff::new("BLEU score");
    let mut prec = MaxDiff::new("BLEU precisions");
    let mut bp = MaxDiff::new("BLEU brevity penalty (x100)");
    for set in &file.sets {
        let ours = bleu::corpus_bleu(&set.hyps, &set.refs).unwrap();
        let want = &set.bleu;
        assert_eq!(ours.counts, want.counts, "{}: counts", set.name);
        assert_eq!(ours.totals, want.totals, "{}: totals", set.name);
        assert_eq!((ours.sys_len, ours.ref_len), (want.sys_len, want.ref_len), "{}: lengths", set.name);
        score.check(ours.score, want.score, TOL, || set.name.clone());
        for n in 0..4 {
            prec.check(ours.precisions[n], want.precisions[n], TOL, || format!("{} order {}", set.name, n + 1));
        }
        bp.check(100.0 * ours.bp, 100.0 * want.bp, TOL, || set.name.clone());
    }
    for m in [&score, &prec, &bp] {
        m.report();
    }
}

#[test]
fn chrf_and_chrf_pp_match_sacrebleu() {
    let file: MtFile = load("mt.json");
    let mut chrf_diff = MaxDiff::new("chrF");
    let mut chrf_pp_diff = MaxDiff::new("chrF++");
    for set in &file.sets {
        let ours = chrf::corpus_chrf(&set.hyps, &set.refs, chrf::CHAR_ORDER, 0, chrf::BETA).unwrap();
        chrf_diff.check(ours, set.chrf, TOL, || set.name.clone());
        let ours =
            chrf::corpus_chrf(&set.hyps, &set.refs, chrf::CHAR_ORDER, chrf::CHRF_PP_WORD_ORDER, chrf::BETA).unwrap();
        chrf_pp_diff.check(ours, set.chrf_pp, TOL, || set.name.clone());
    }
    chrf_diff.report();
    chrf_pp_diff.report();
}

#[derive(Deserialize)]
struct RougeFile {
    sets: Vec<RougeSet>,
}

#[derive(Deserialize)]
struct RougeSet {
    name: String,
    lang: String,
    examples: Vec<Example>,
    default: RougeExpected,
    default_stem: RougeExpected,
    multilingual: RougeExpected,
}

#[derive(Deserialize)]
struct Example {
    hyp: String,
    refs: Vec<String>,
}

#[derive(Deserialize)]
struct RougeExpected {
    /// `[rouge1, rouge2, rougeL]` F1 per example, 0–1.
    per_example: Vec<[f64; 3]>,
    mean: RougeMean,
}

#[derive(Deserialize)]
#[allow(non_snake_case)]
struct RougeMean {
    rouge1: f64,
    rouge2: f64,
    rougeL: f64,
}

#[test]
fn rouge_matches_rouge_score_and_multilingual_rouge() {
    let file: RougeFile = load("rouge.json");
    let mut example_diff = MaxDiff::new("ROUGE per-example F1 (x100)");
    let mut mean_diff = MaxDiff::new("ROUGE corpus mean F1");
    let mut scorers_seen = 0;
    for set in &file.sets {
        let scorers = [
            ("default", Rouge::new(false), &set.default),
            ("default_stem", Rouge::new(true), &set.default_stem),
            ("multilingual", Rouge::multilingual(&set.lang).unwrap(), &set.multilingual),
        ];
        let hyps: Vec<&str> = set.examples.iter().map(|e| e.hyp.as_str()).collect();
        let refs: Vec<Vec<String>> = set.examples.iter().map(|e| e.refs.clone()).collect();
        for (kind, scorer, want) in &scorers {
            scorers_seen += 1;
            for (i, (ex, want)) in set.examples.iter().zip(&want.per_example).enumerate() {
                let s = scorer.score_multi(&ex.refs, &ex.hyp).unwrap();
                let ours = [s.rouge1.fmeasure, s.rouge2.fmeasure, s.rouge_l.fmeasure];
                for (t, name) in ["rouge1", "rouge2", "rougeL"].iter().enumerate() {
                    example_diff.check(100.0 * ours[t], 100.0 * want[t], TOL, || {
                        format!("{} {kind} example {i} {name}", set.name)
                    });
                }
            }
            let mut check_mean = |f: hetfed_metrics::rouge::RougeF1, how: &str| {
                for (ours, reference, name) in [
                    (f.rouge1, want.mean.rouge1, "rouge1"),
                    (f.rouge2, want.mean.rouge2, "rouge2"),
                    (f.rouge_l, want.mean.rougeL, "rougeL"),
                ] {
                    mean_diff.check(ours, reference, TOL, || format!("{} {kind} {how} {name}", set.name));
                }
            };
            check_mean(scorer.corpus_per_example(&hyps, &refs).unwrap(), "per-example refs");
            // With the same number of references everywhere, the stream layout gives the same.
            let n_refs = refs[0].len();
            if refs.iter().all(|r| r.len() == n_refs) {
                let streams: Vec<Vec<&str>> =
                    (0..n_refs).map(|k| refs.iter().map(|r| r[k].as_str()).collect()).collect();
                check_mean(scorer.corpus(&hyps, &streams).unwrap(), "streams");
            }
        }
    }
    assert!(scorers_seen >= 3 * 7, "expected every fixture set, found {scorers_seen} scorer runs");
    example_diff.report();
    mean_diff.report();
}

#[derive(Deserialize)]
struct Tokenizers {
    #[serde(rename = "13a")]
    t13a: Vec<(String, String)>,
    rouge_default: Vec<(String, Vec<String>, Vec<String>)>,
    multilingual: Vec<(String, Vec<String>)>,
    porter: Vec<(String, String)>,
}

#[test]
fn tokenizers_and_stemmer_match_exactly() {
    let t: Tokenizers = load("tokenizers.json");
    for (input, want) in &t.t13a {
        assert_eq!(&bleu::tokenize_13a(input), want, "13a of {input:?}");
    }
    let (plain, stem) = (Rouge::new(false), Rouge::new(true));
    for (input, want_plain, want_stem) in &t.rouge_default {
        assert_eq!(&plain.tokenize(input), want_plain, "rouge-score tokens of {input:?}");
        assert_eq!(&stem.tokenize(input), want_stem, "rouge-score stemmed tokens of {input:?}");
    }
    let ml = Rouge::multilingual("hindi").unwrap();
    for (input, want) in &t.multilingual {
        assert_eq!(&ml.tokenize(input), want, "multilingual tokens of {input:?}");
    }
    assert!(t.porter.len() > 1000, "expected the full word list, found {}", t.porter.len());
    for (word, want) in &t.porter {
        assert_eq!(&porter::stem(word), want, "Porter stem of {word:?}");
    }
}

#[derive(Deserialize)]
struct ClassificationFile {
    cases: Vec<ClassificationCase>,
}

#[derive(Deserialize)]
struct ClassificationCase {
    name: String,
    gold: Vec<String>,
    pred: Vec<String>,
    accuracy: f64,
    macro_f1: f64,
}

#[test]
fn classification_matches_scikit_learn() {
    let file: ClassificationFile = load("classification.json");
    for case in &file.cases {
        let acc = classification::accuracy(&case.gold, &case.pred).unwrap();
        assert!((acc - case.accuracy).abs() < 1e-12, "{}: accuracy {acc} vs {}", case.name, case.accuracy);
        let f1 = classification::macro_f1(&case.gold, &case.pred).unwrap();
        assert!((f1 - case.macro_f1).abs() < 1e-12, "{}: macro-F1 {f1} vs {}", case.name, case.macro_f1);
    }
}
