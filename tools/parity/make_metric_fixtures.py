#!/usr/bin/env python3
"""Generate the parity fixtures used by the `hetfed-metrics` tests.

Usage (from anywhere; paths are resolved from this file's location)::

    pip install sacrebleu==2.6.0 rouge-score==0.1.2 multilingual-rouge==0.0.1 nltk scikit-learn
    python tools/parity/make_metric_fixtures.py [--shared DIR] [--unicode-table]

``multilingual-rouge`` is the PyPI package of XL-Sum's multilingual ROUGE (the
``multilingual_rouge_scoring`` folder of github.com/csebuetnlp/xl-sum, packaged as
``multilingual_rouge``); it pulls in ``pyonmttok``, whose "aggressive" OpenNMT tokenizer does
the word segmentation for every language without a dedicated segmenter.

Inputs are real text read from ``<shared>/data`` (``--shared`` defaults to ``<repo>/../shared``):
FLORES-200 dev sentences (English, Hindi, Tamil, Bengali), SciTLDR-A dev TLDRs (several
references per paper), XL-Sum summaries and titles (English, Hindi, Bengali, Tamil), ILSUM Hindi
summaries and headings, and Ethos labels. Hypotheses are made by perturbing references
deterministically (fixed seeds: words dropped, replaced, inflected, swapped, truncated) or are
real titles; a few hand-written edge cases are added (empty hypotheses, single words, identical
pairs, punctuation and number handling). Only small derived excerpts are stored.

What it writes (under ``crates/hetfed-metrics/tests/fixtures/``):

* ``mt.json``: sets of hypotheses and reference streams (``refs[k][i]`` is the k-th reference of
  sentence i) with sacrebleu's ``corpus_bleu`` (13a, exp smoothing: score, counts, totals,
  precisions, bp, sys_len, ref_len), chrF (char order 6, word order 0, beta 2) and chrF++ (word
  order 2);
* ``rouge.json``: sets of (hypothesis, list of references) with per-example and mean F1 of
  ROUGE-1/2/L from ``rouge_score.rouge_scorer.RougeScorer`` (with and without the Porter
  stemmer, best reference per type as ``score_multi``) and from ``multilingual_rouge``'s
  ``RougeScorer(lang=..., use_stemmer=False)``;
* ``tokenizers.json``: sacrebleu's 13a tokenizer, rouge-score's tokenizer (with and without
  stemming), the multilingual ROUGE tokenizer, and nltk's ``PorterStemmer()`` (the
  ``NLTK_EXTENSIONS`` mode that rouge-score uses) on a word list;
* ``classification.json``: accuracy and macro-F1 from scikit-learn.

With ``--unicode-table`` it also regenerates ``crates/hetfed-metrics/src/unicode_table.rs``, the
character classes of the multilingual ROUGE tokenizer: what Python's ``unicodedata`` says
(control and format characters are dropped, white space splits, punctuation splits) and, for the
remaining characters, how ``pyonmttok`` (ICU) classifies them (letter, number, combining mark,
other), probed through the tokenizer itself. Without the flag the script only checks that the
committed table still matches the installed packages and warns if not.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import random
import sys
import unicodedata
import warnings

REPO = pathlib.Path(__file__).resolve().parents[2]
CRATE = REPO / "crates" / "hetfed-metrics"
FIXTURES = CRATE / "tests" / "fixtures"
UNICODE_TABLE = CRATE / "src" / "unicode_table.rs"

warnings.filterwarnings("ignore")


# --------------------------------------------------------------------------------------
# reading the shared data


def read_lines(path: pathlib.Path) -> list[str]:
    return path.read_text(encoding="utf-8").split("\n")


def read_jsonl(path: pathlib.Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def evenly(n_total: int, n: int, offset: int = 0) -> list[int]:
    """`n` indices spread over `range(n_total)`, deterministic."""
    step = n_total // n
    return [(offset + i * step) % n_total for i in range(n)]


# --------------------------------------------------------------------------------------
# deterministic perturbation of references into hypotheses


def inflect(w: str, rng: random.Random) -> str:
    """An English-like inflectional variant (lets the stemmer make a difference)."""
    if not w.isascii() or not w.isalpha() or len(w) < 4:
        return w
    if w.endswith("s"):
        return w[:-1]
    if w.endswith("ing"):
        return w[:-3] + "ed"
    if w.endswith("ed"):
        return w[:-2] + "ing"
    return w + rng.choice(["s", "ing", "ed", "ly"])


def perturb(text: str, rng: random.Random, pool: list[str], strength: float) -> str:
    words = text.split()
    out = []
    for w in words:
        r = rng.random()
        if r < 0.25 * strength:
            continue  # drop
        if r < 0.45 * strength:
            out.append(rng.choice(pool))  # replace by a word of another sentence
        elif r < 0.6 * strength:
            out.append(inflect(w, rng))
        else:
            out.append(w)
    for _ in range(int(len(out) * strength * 0.3)):  # local swaps
        if len(out) > 1:
            i = rng.randrange(len(out) - 1)
            out[i], out[i + 1] = out[i + 1], out[i]
    if len(out) > 4 and rng.random() < 0.3 * strength:
        out = out[: rng.randrange(len(out) // 2, len(out))]
    return " ".join(out)


def word_pool(texts: list[str]) -> list[str]:
    return sorted({w for t in texts for w in t.split()})


def perturbed(refs: list[str], seed: int, pool_texts: list[str]) -> list[str]:
    rng = random.Random(seed)
    pool = word_pool(pool_texts)
    return [perturb(r, rng, pool, 0.1 + 0.8 * (i % 5) / 4) for i, r in enumerate(refs)]


# --------------------------------------------------------------------------------------
# MT metrics (sacrebleu)


def mt_expect(hyps: list[str], refs: list[list[str]]) -> dict:
    import sacrebleu

    b = sacrebleu.corpus_bleu(hyps, refs)
    chrf = sacrebleu.corpus_chrf(hyps, refs)
    chrf_pp = sacrebleu.corpus_chrf(hyps, refs, word_order=2)
    return {
        "bleu": {
            "score": b.score,
            "counts": list(b.counts),
            "totals": list(b.totals),
            "precisions": list(b.precisions),
            "bp": b.bp,
            "sys_len": b.sys_len,
            "ref_len": b.ref_len,
        },
        "chrf": chrf.score,
        "chrf_pp": chrf_pp.score,
    }


STRESS_EN = [
    # 13a tokenizer corners: numbers, abbreviations, entities, hyphens, <skipped>, odd spaces.
    "It cost $1,000.50 (about 1.000,5 euros) on 3-4 May, i.e. 2-3 days later.",
    "The U.S. team&amp;co said &quot;no&quot; -- twice &lt;really&gt;.",
    "A line-\nbreak, a <skipped> word and\na newline.",
    "Tabs\tand\u00a0no-break\u2009thin spaces\u3000here;ok?yes!",
    "Odd separators\x1cbetween\x1fwords and a trailing dot .",
    "(Parenthesised) 'quoted' \"double\" [bracketed] {braced} a/b a\\b a|b ~tilde^caret_under`tick",
    "Decimal .5 and 5. and ,5 and 5, and ... ellipsis, , double",
    "trailing spaces   ",
]


def mt_sets(data: pathlib.Path) -> list[dict]:
    flores = {
        lang: read_lines(data / "flores200" / "dev" / f"{lang}.dev")[:997]
        for lang in ("eng_Latn", "hin_Deva", "tam_Taml", "ben_Beng")
    }
    sets = []

    def add(name, hyps, refs):
        assert all(len(s) == len(hyps) for s in refs)
        sets.append({"name": name, "hyps": hyps, "refs": refs, **mt_expect(hyps, refs)})

    for lang, n, seed in (("eng_Latn", 24, 11), ("hin_Deva", 16, 12), ("tam_Taml", 10, 13), ("ben_Beng", 12, 14)):
        idx = evenly(len(flores[lang]), n, offset=seed)
        refs = [flores[lang][i] for i in idx]
        pool = [flores[lang][i + 1] for i in idx]
        add(f"flores_{lang}", perturbed(refs, seed, pool), [refs])

    # Multiple references: SciTLDR dev papers with at least three TLDRs, first three as streams.
    papers = [p for p in read_jsonl(data / "scitldr" / "scitldr_a_dev.jsonl") if len(p["target"]) >= 3]
    papers = [papers[i] for i in evenly(len(papers), 12, offset=5)]
    rng = random.Random(21)
    pool = word_pool([t for p in papers for t in p["target"]])
    hyps = []
    for i, p in enumerate(papers):
        if i % 3 == 2:
            hyps.append(p["title"])
        else:
            hyps.append(perturb(p["target"][rng.randrange(len(p["target"]))], rng, pool, 0.3 + 0.2 * (i % 3)))
    add("scitldr_3ref_en", hyps, [[p["target"][k] for p in papers] for k in range(3)])

    en = [flores["eng_Latn"][i] for i in evenly(997, 8, offset=3)]
    add("identical_en", list(en), [list(en)])
    add("all_empty_hyps_en", ["", "", "", ""], [en[:4]])
    add("single_word_en", [s.split()[2] for s in en[:6]], [en[:6]])
    hi = [flores["hin_Deva"][i] for i in evenly(997, 4, offset=7)]
    mixed_refs = en[:4] + hi[:2] + STRESS_EN + ["", "Short reference."]
    mixed_hyps = (
        ["", en[1].split()[0], perturbed([en[2]], 31, en)[0], en[3]]
        + ["", perturbed([hi[1]], 32, hi)[0]]
        + [perturbed([s], 33 + i, STRESS_EN)[0] if i % 2 else s for i, s in enumerate(STRESS_EN)]
        + ["Something.", ""]
    )
    add("mixed_edge_cases", mixed_hyps, [mixed_refs])
    return sets


# --------------------------------------------------------------------------------------
# ROUGE (rouge-score and XL-Sum's multilingual ROUGE)


def rouge_expect(examples: list[dict], lang: str) -> dict:
    from rouge_score import rouge_scorer
    from multilingual_rouge import rouge_scorer as ml_rouge_scorer

    types = ["rouge1", "rouge2", "rougeL"]
    scorers = {
        "default": rouge_scorer.RougeScorer(types, use_stemmer=False),
        "default_stem": rouge_scorer.RougeScorer(types, use_stemmer=True),
    }
    ml = ml_rouge_scorer.RougeScorer(types, use_stemmer=False, lang=lang)
    out = {}
    for name, scorer in list(scorers.items()) + [("multilingual", ml)]:
        per = []
        for ex in examples:
            if name == "multilingual":
                # multilingual_rouge has no score_multi; take the best reference per type as
                # rouge-score's score_multi does (first maximum on ties, as np.argmax).
                all_s = [ml.score(r, ex["hyp"]) for r in ex["refs"]]
                s = {}
                for t in types:
                    best = max(range(len(all_s)), key=lambda k: (all_s[k][t].fmeasure, -k))
                    s[t] = all_s[best][t]
            else:
                s = scorer.score_multi(ex["refs"], ex["hyp"])
            per.append([s[t].fmeasure for t in types])
        mean = {t: 100.0 * sum(p[k] for p in per) / len(per) for k, t in enumerate(types)}
        out[name] = {"per_example": per, "mean": mean}
    return out


EDGE_SUMM_EN = [
    # (hypothesis, references)
    ("", ["The committee approved the new budget on Tuesday."]),
    ("The committee approved the new budget on Tuesday.", ["The committee approved the new budget on Tuesday."]),
    ("budget", ["The committee approved the new budget on Tuesday."]),
    ("Approving budgets: committees approve; approval approved!", ["The committee approved the new budget on Tuesday."]),
    ("... !!! ???", ["Punctuation only hypotheses score zero."]),
    ("Run 2 of 10 ran; runs 3-4 running in 2019's trials (v2.0).", ["Runs 3 and 4 ran in the 2019 trials, version 2.0."]),
    ("Café naïve résumé — Zürich", ["cafe naive resume zurich"]),
    ("A hypothesis against an empty reference", [""]),
    ("", [""]),
    ("tie break", ["tie", "break", "tie break extra"]),
]

EDGE_SUMM_HI = [
    ("", ["सरकार ने मंगलवार को नए बजट को मंज़ूरी दी।"]),
    ("सरकार ने मंगलवार को नए बजट को मंज़ूरी दी।", ["सरकार ने मंगलवार को नए बजट को मंज़ूरी दी।"]),
    ("बजट", ["सरकार ने मंगलवार को नए बजट को मंज़ूरी दी।"]),
    ("२०२२ में 15 लोग, ₹500 करोड़: \"नया\" बजट!", ["2022 में पंद्रह लोग और ₹ 500 करोड़ का नया बजट"]),
    ("मैं office जा रहा हूँ, meeting दस बजे है।", ["मैं ऑफिस जा रहा हूँ और मीटिंग दस बजे है"]),
]


def rouge_sets(data: pathlib.Path) -> list[dict]:
    sets = []

    def add(name, lang, examples):
        sets.append({"name": name, "lang": lang, "examples": examples, **rouge_expect(examples, lang)})

    # English, several references per example: SciTLDR dev.
    papers = read_jsonl(data / "scitldr" / "scitldr_a_dev.jsonl")
    papers = [papers[i] for i in evenly(len(papers), 18, offset=2)]
    rng = random.Random(41)
    pool = word_pool([t for p in papers for t in p["target"]])
    examples = []
    for i, p in enumerate(papers):
        if i % 3 == 0:
            hyp = p["title"]
        elif i % 3 == 1:
            hyp = perturb(p["target"][-1], rng, pool, 0.5)
        else:
            oracle = [s for s, lab in zip(p["source"], p["source_labels"]) if lab == 1]
            hyp = perturb(oracle[0] if oracle else p["source"][0], rng, pool, 0.2)
        examples.append({"hyp": hyp, "refs": p["target"]})
    add("scitldr_multi_ref_en", "english", examples)

    # XL-Sum (train + val rows) in four languages; ILSUM adds Hindi.
    for lang, seed in (("english", 51), ("hindi", 52), ("bengali", 53), ("tamil", 54)):
        rows = read_jsonl(data / "xlsum" / f"{lang}_train.jsonl") + read_jsonl(data / "xlsum" / f"{lang}_val.jsonl")
        if lang == "hindi":
            ilsum = read_jsonl(data / "ilsum_hindi_extract" / "ilsum_hindi_val_bm25extract.jsonl")
            rows += [{"summary": r["summary"], "title": r["heading"]} for r in (ilsum[i] for i in evenly(len(ilsum), 4))]
        rng = random.Random(seed)
        pool = word_pool([r["summary"] for r in rows])
        examples = []
        for i, r in enumerate(rows):
            hyp = r["title"] if i % 2 == 0 else perturb(r["summary"], rng, pool, 0.2 + 0.15 * (i % 4))
            examples.append({"hyp": hyp, "refs": [r["summary"]]})
        add(f"xlsum_{lang}", lang, examples)

    add("edge_en", "english", [{"hyp": h, "refs": r} for h, r in EDGE_SUMM_EN])
    add("edge_hi", "hindi", [{"hyp": h, "refs": r} for h, r in EDGE_SUMM_HI])
    return sets


# --------------------------------------------------------------------------------------
# tokenizers and stemmer


PORTER_CLASSICS = """
caresses ponies ties caress cats feed agreed plastered bled motoring sing conflated troubled
sized hopping tanned falling hissing fizzed failing filing happy sky skies relational conditional
rational valenci hesitanci digitizer conformabli radicalli differentli vileli analogousli
vietnamization predication operator feudalism decisiveness hopefulness callousness formaliti
sensitiviti sensibiliti triplicate formative formalize electriciti electrical hopeful goodness
revival allowance inference airliner gyroscopic adjustable defensible irritant replacement
adjustment dependent adoption homologou communism activate angulariti homologous effective
bowdlerize probate rate cease controll roll dying lying tying news innings inning outings
outing cannings canning howe proceed exceed succeed spied tried flies died enjoy enjoyment
generously syzygy yyyy yyyyy yay toy toys fully fulli analogi geologi apology archaeology
sky1 2019s 1990s covid19 a1b2c3 ties ies dies lies eed ing ings sses ssed bylaw eyes yoyo
agreement disagreed bleed speed needing plied cried corpora generalization generalizations
""".split()

TOKENIZER_STRINGS = [
    "",
    "   ",
    "Hello, World! It's 2024-05-01; 3.14 > 2.71 (approx.)",
    "naïve café — Zürich İstanbul ΣΊΣΥΦΟΣ Straße ﬁne",
    "क्षेत्र में १२३ लोग, 45 बच्चे; ₹500 करोड़।",
    "हिंदी\u200dशब्द और\u200cयह \ufeffBOM",
    "a \u0301b \u0301\u0302start",
    "\u0301leading mark",
    "x \u0301\u0302",
    "▁sentencepiece ￭joiner ￨bar ％ ＃ ：",
    "中文分词测试 and 日本語のテキスト 한국어 텍스트",
    "emoji 🙂👍🏽 and symbols © ® ™ ± × ÷ ∑",
    "line\u2028separator para\u2029graph tab\tnew\nline",
    "abc123def ١٢٣ ๑๒๓ 12abc34",
    "اردو متن: یہ ایک جملہ ہے۔",
    "மழை பெய்தது, 2023-இல் 10% அதிகம்!",
    "বাংলা লেখা: ১২৩টি বই।",
    "ગુજરાતી લખાણ ૧૨૩",
    "తెలుగు వాక్యం ౧౨౩.",
    "control\x00chars\x07here\x1b[0m \ufffdreplacement",
]


def tokenizer_fixture(data: pathlib.Path) -> dict:
    from nltk.stem import porter
    from rouge_score import tokenizers as rs_tokenizers
    from multilingual_rouge.rouge_scorer import MultiTokenizer
    from multilingual_rouge import tokenization_wrapper
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    flores = {lang: read_lines(data / "flores200" / "dev" / f"{lang}.dev")[:997]
              for lang in ("eng_Latn", "hin_Deva", "ben_Beng", "tam_Taml", "tel_Telu", "guj_Gujr", "mar_Deva")}
    real = []
    for lang, lines in flores.items():
        real += [lines[i] for i in evenly(997, 6 if lang == "eng_Latn" else 2, offset=17)]

    tok13a = Tokenizer13a()
    t13a = [[s, tok13a(s)] for s in STRESS_EN + TOKENIZER_STRINGS + real]

    plain = rs_tokenizers.DefaultTokenizer(use_stemmer=False)
    stem = rs_tokenizers.DefaultTokenizer(use_stemmer=True)
    rouge_default = [[s, plain.tokenize(s), stem.tokenize(s)] for s in STRESS_EN + TOKENIZER_STRINGS + real[:6]]

    ml = MultiTokenizer(lang="hindi")
    multilingual = [[s, tokenization_wrapper.tokenize(s, None, ml)] for s in TOKENIZER_STRINGS + STRESS_EN + real]

    # Porter: the classic examples plus every rouge token (longer than 3 characters, as
    # rouge-score stems) of SciTLDR dev TLDRs, spread evenly, 1200 at most.
    stemmer = porter.PorterStemmer()
    vocab = sorted({w for p in read_jsonl(data / "scitldr" / "scitldr_a_dev.jsonl") for t in p["target"]
                    for w in plain.tokenize(t) if len(w) > 3})
    vocab = [vocab[i] for i in evenly(len(vocab), min(1200, len(vocab)))]
    words = list(dict.fromkeys(PORTER_CLASSICS + vocab))
    porter_pairs = [[w, stemmer.stem(w)] for w in words]
    return {"13a": t13a, "rouge_default": rouge_default, "multilingual": multilingual, "porter": porter_pairs}


# --------------------------------------------------------------------------------------
# classification


def classification_fixture(data: pathlib.Path) -> dict:
    from sklearn.metrics import accuracy_score, f1_score

    rows = [line.rsplit(";", 1) for line in read_lines(data / "ethos" / "Ethos_Dataset_Binary.csv")[1:] if ";" in line]
    scores = [float(v) for _, v in rows]
    cases = []

    def add(name, gold, pred):
        cases.append({"name": name, "gold": gold, "pred": pred,
                      "accuracy": accuracy_score(gold, pred),
                      "macro_f1": f1_score(gold, pred, average="macro")})

    rng = random.Random(61)
    idx = evenly(len(scores), 80, offset=9)
    gold = ["hate" if scores[i] >= 0.5 else "not_hate" for i in idx]
    add("ethos_binary", gold, [g if rng.random() < 0.7 else rng.choice(["hate", "not_hate"]) for g in gold])
    gold3 = ["none" if scores[i] == 0 else ("hate" if scores[i] >= 0.5 else "some") for i in idx]
    # "unsure" is only ever predicted: it is in the label set and scores F1 0.
    add("ethos_three_way_with_pred_only_label", gold3,
        [g if rng.random() < 0.6 else rng.choice(["none", "some", "hate", "unsure"]) for g in gold3])
    add("gold_label_never_predicted", ["a", "b", "c", "c"], ["a", "a", "c", "c"])
    add("all_correct", ["x", "y", "x"], ["x", "y", "x"])
    return {"cases": cases}


# --------------------------------------------------------------------------------------
# Unicode classes of the multilingual ROUGE tokenizer


def _py_is_punctuation(ch: str) -> bool:  # multilingual_rouge.tokenizers._is_punctuation
    cp = ord(ch)
    if 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126:
        return True
    return unicodedata.category(ch).startswith("P")


def unicode_classes() -> list[tuple[int, int, str]]:
    """Ranges (first, last, class) of code points the multilingual tokenizer keeps or splits on.

    Code points in no range are dropped (Python category C*, U+0000, U+FFFD). Classes: `Space`
    (splits words: white space of BasicTokenizer and str.split), `Punct` (splits words and is
    dropped), and, as pyonmttok's aggressive mode sees them, `Letter`, `Number`, `Mark`
    (combining, attaches to the previous character), `Other` (a token of its own).
    """
    import pyonmttok

    tok = pyonmttok.Tokenizer("aggressive")
    subst = {"\u2581": "_", "\uffed": "\u25a0", "\uffe8": "\u2502"}
    cls = {}
    for cp in range(0x110000):
        if 0xD800 <= cp <= 0xDFFF:
            continue
        ch = chr(cp)
        cat = unicodedata.category(ch)
        if ch in "\t\n\r" or cat == "Zs" or cat in ("Zl", "Zp"):
            cls[cp] = "Space"
        elif cp == 0 or cp == 0xFFFD or cat.startswith("C"):
            continue
        elif _py_is_punctuation(ch):
            cls[cp] = "Punct"
        else:
            t1 = tok.tokenize("a" + ch + "a")[0]
            t2 = tok.tokenize("1" + ch + "1")[0]
            s = subst.get(ch, ch)
            if t1 == ["a" + ch + "a"] and t2 == ["1", ch, "1"]:
                cls[cp] = "Letter"
            elif t1 == ["a" + ch + "a"] and t2 == ["1" + ch + "1"]:
                cls[cp] = "Mark"
            elif t1 == ["a", ch, "a"] and t2 == ["1" + ch + "1"]:
                cls[cp] = "Number"
            elif t1 == ["a", s, "a"] and t2 == ["1", s, "1"]:
                cls[cp] = "Other"
            else:
                raise SystemExit(f"U+{cp:04X} ({cat}): unexpected pyonmttok behaviour {t1} {t2}")
    ranges = []
    for cp in sorted(cls):
        if ranges and ranges[-1][1] == cp - 1 and ranges[-1][2] == cls[cp]:
            ranges[-1] = (ranges[-1][0], cp, cls[cp])
        else:
            ranges.append((cp, cp, cls[cp]))
    return ranges


def unicode_table_source() -> str:
    import pyonmttok

    ranges = unicode_classes()
    short = {"Space": "S", "Punct": "P", "Letter": "L", "Number": "N", "Mark": "M", "Other": "O"}
    lines = [
        "// @generated by tools/parity/make_metric_fixtures.py --unicode-table: do not edit.",
        f"// Python {sys.version.split()[0]} unicodedata (Unicode {unicodedata.unidata_version}),"
        f" pyonmttok {pyonmttok.__version__}.",
        "",
        "use crate::rouge::CharClass::{self, Letter as L, Mark as M, Number as N, Other as O, Punct as P, Space as S};",
        "",
        "/// Sorted, disjoint `(first, last, class)` code point ranges; code points in none are dropped.",
        "#[rustfmt::skip]",
        "pub(crate) static RANGES: &[(u32, u32, CharClass)] = &[",
    ]
    row = []
    for a, b, c in ranges:
        row.append(f"(0x{a:x}, 0x{b:x}, {short[c]}),")
        if len(row) == 5:
            lines.append("    " + " ".join(row))
            row = []
    if row:
        lines.append("    " + " ".join(row))
    lines.append("];")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------


def write_json(name: str, obj) -> None:
    path = FIXTURES / name
    text = json.dumps(obj, ensure_ascii=False, indent=1) + "\n"
    path.write_text(text, encoding="utf-8")
    print(f"wrote {path.relative_to(REPO)} ({len(text.encode()) // 1024} KiB)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shared", type=pathlib.Path, default=REPO.parent / "shared",
                    help="shared folder holding data/ (default: <repo>/../shared)")
    ap.add_argument("--unicode-table", action="store_true",
                    help="regenerate crates/hetfed-metrics/src/unicode_table.rs")
    args = ap.parse_args()
    data = args.shared.resolve() / "data"
    if not data.is_dir():
        raise SystemExit(f"{data}: not a directory (pass --shared)")

    import importlib.metadata as md

    versions = {p: md.version(p) for p in ("sacrebleu", "rouge-score", "multilingual-rouge", "pyonmttok", "nltk",
                                           "scikit-learn")}
    versions["python"] = sys.version.split()[0]
    versions["unicodedata"] = unicodedata.unidata_version
    print("versions:", versions)

    FIXTURES.mkdir(parents=True, exist_ok=True)
    write_json("mt.json", {"versions": versions, "sets": mt_sets(data)})
    write_json("rouge.json", {"versions": versions, "sets": rouge_sets(data)})
    write_json("tokenizers.json", {"versions": versions, **tokenizer_fixture(data)})
    write_json("classification.json", {"versions": versions, **classification_fixture(data)})

    source = unicode_table_source()
    if args.unicode_table:
        UNICODE_TABLE.write_text(source, encoding="utf-8")
        print(f"wrote {UNICODE_TABLE.relative_to(REPO)}")
    elif not UNICODE_TABLE.exists() or UNICODE_TABLE.read_text(encoding="utf-8") != source:
        print(f"warning: {UNICODE_TABLE.relative_to(REPO)} differs from what the installed packages give;"
              " rerun with --unicode-table", file=sys.stderr)


if __name__ == "__main__":
    main()
