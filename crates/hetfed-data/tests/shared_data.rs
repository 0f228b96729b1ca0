//! Reads the real datasets in `../shared/data` in place and checks the counts their PROVENANCE.md
//! files state (and the split sizes those imply under this crate's documented rules).

mod common;

use common::shared_data;
use hetfed_data::datasets::*;
use hetfed_data::{Error, Split};

fn missing_split(e: Error, split: &str) {
    match e {
        Error::MissingSplit { split: s, .. } => assert_eq!(s, split),
        other => panic!("expected MissingSplit for `{split}`, found: {other}"),
    }
}

#[test]
fn ethos_809_rows_343_hate_split_by_the_hash_rule() {
    let Some(dir) = shared_data("ethos") else { return };
    let train = load_ethos(&dir, Split::Train).unwrap();
    let dev = load_ethos(&dir, Split::Dev).unwrap();
    let hate = |v: &[hetfed_data::ClassificationExample]| v.iter().filter(|e| e.label == 1).count();
    assert_eq!(train.len() + dev.len(), 809);
    assert_eq!(hate(&train) + hate(&dev), 343);
    // Cross-checked with Python: r = int(sha256(normalize(comment)), 16) % 25, dev iff 1 <= r <= 4.
    assert_eq!((train.len(), hate(&train)), (645, 273));
    assert_eq!((dev.len(), hate(&dev)), (164, 70));
    // Labels agree with the documented threshold, quoting is undone.
    assert!(train.iter().chain(&dev).all(|e| (e.label == 1) == (e.score.unwrap() >= 0.5)));
    assert!(train.iter().chain(&dev).any(|e| e.text.contains("\"Guess That Gender\"")));
    // The shared copy holds none of the held-out rows, so `test` is absent, clearly.
    let e = load_ethos(&dir, Split::Test).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("split `test` is not present") && msg.contains("Ethos_Dataset_Binary.csv"), "{msg}");
    missing_split(e, "test");
}

#[test]
fn copa_800_rows_half_mirrored() {
    let Some(dir) = shared_data("copa") else { return };
    let train = load_copa(&dir, Split::Train).unwrap();
    let dev = load_copa(&dir, Split::Dev).unwrap();
    assert_eq!(train.len() + dev.len(), 800);
    assert_eq!((train.len(), dev.len()), (640, 160));
    assert_eq!(train.iter().chain(&dev).filter(|e| e.mirrored).count(), 400);
    assert_eq!(dev.iter().filter(|e| e.mirrored).count(), 80);
    assert_eq!(dev.iter().map(|e| e.label).sum::<usize>(), 72);
    let first = &train[0];
    assert_eq!((first.id.as_str(), first.question.as_str(), first.label), ("1", "cause", 0));
    assert_eq!(first.choices, ["The sun was rising.", "The grass was cut."]);
    missing_split(load_copa(&dir, Split::Test).unwrap_err(), "test");
}

#[test]
fn flores_997_lines_per_language_any_pair() {
    let Some(dir) = shared_data("flores200/dev") else { return };
    for code in ["eng_Latn", "hin_Deva", "ben_Beng", "tam_Taml", "mar_Deva", "tel_Telu", "guj_Gujr", "fra_Latn"] {
        let (_, lines) = load_flores_lines(&dir, code, Split::Dev).unwrap();
        assert_eq!(lines.len(), 997, "{code}");
        assert!(lines.iter().all(|l| !l.trim().is_empty()), "{code}");
    }
    let pairs = load_flores(&dir, "tam_Taml", "guj_Gujr", Split::Dev).unwrap();
    assert_eq!(pairs.len(), 997);
    let en_hi = load_flores(&dir, "en", "hi", Split::Dev).unwrap();
    assert_eq!(
        (en_hi[0].src_lang.as_str(), en_hi[0].tgt_lang.as_str(), en_hi[0].id.as_str()),
        ("eng_Latn", "hin_Deva", "dev-1")
    );
    assert!(en_hi[0].src.starts_with("On Monday, scientists from the Stanford University School of Medicine"));
    missing_split(load_flores(&dir, "eng_Latn", "hin_Deva", Split::Test).unwrap_err(), "test");
    missing_split(load_flores(&dir, "eng_Latn", "hin_Deva", Split::Train).unwrap_err(), "train");
    match load_flores(&dir, "eng_Latn", "zul_Latn", Split::Dev).unwrap_err() {
        Error::MissingLanguage { lang, available, .. } => {
            assert_eq!(lang, "zul_Latn");
            assert_eq!(available.len(), 8);
            assert!(available.contains(&"mar_Deva".to_string()));
        }
        other => panic!("expected MissingLanguage, found: {other}"),
    }
}

#[test]
fn tico_1297_lines_per_pair_both_directions() {
    let Some(dir) = shared_data("tico19") else { return };
    for lang in ["hi", "bn", "mr", "ta"] {
        // The 1297 shared sentences are cut by sentence id into train and dev.
        let train = load_tico(&dir, "en", lang, Split::Train).unwrap();
        let fwd = load_tico(&dir, "en", lang, Split::Dev).unwrap();
        assert_eq!(train.len() + fwd.len(), 1297, "en-{lang}");
        assert!((200..320).contains(&fwd.len()), "en-{lang}: dev has {}", fwd.len());
        assert!(fwd.iter().all(|e| hetfed_data::datasets::tico_split(&e.id) == Split::Dev));
        let back = load_tico(&dir, lang, "en", Split::Dev).unwrap();
        assert_eq!(back.len(), fwd.len());
        assert_eq!((back[5].src.as_str(), back[5].tgt.as_str()), (fwd[5].tgt.as_str(), fwd[5].src.as_str()));
        missing_split(load_tico(&dir, "en", lang, Split::Test).unwrap_err(), "test");
    }
    let all: Vec<_> = load_tico(&dir, "en", "hin_Deva", Split::Train)
        .unwrap()
        .into_iter()
        .chain(load_tico(&dir, "en", "hin_Deva", Split::Dev).unwrap())
        .collect();
    let first = all.iter().find(|e| e.id == "CMU_1:1").expect("the first sentence is in train or dev");
    assert_eq!(first.tgt, "ये लक्षण लगभग कितने समय से चल रहे हैं?");
    match load_tico(&dir, "en", "fr", Split::Dev).unwrap_err() {
        Error::MissingLanguage { available, .. } => assert_eq!(available, ["bn", "hi", "mr", "ta"]),
        other => panic!("expected MissingLanguage, found: {other}"),
    }
}

#[test]
fn in22_absent_is_a_clear_missing_dataset_error() {
    let Some(dir) = shared_data("in22") else { return };
    let e = load_in22(&dir, In22Subset::Gen, "eng_Latn", "hin_Deva", Split::Test).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, Error::MissingDataset { .. }), "{msg}");
    assert!(
        msg.contains("dataset `in22` not found")
            && msg.contains("IN22_testset")
            && msg.contains("github.com/AI4Bharat/IndicTrans2"),
        "{msg}"
    );
}

#[test]
fn xlsum_5_train_5_val_per_language() {
    let Some(dir) = shared_data("xlsum") else { return };
    for lang in ["hindi", "bengali", "tamil", "marathi", "telugu", "gujarati", "english", "french"] {
        assert_eq!(load_xlsum(&dir, lang, Split::Train).unwrap().len(), 5, "{lang}");
        assert_eq!(load_xlsum(&dir, lang, Split::Dev).unwrap().len(), 5, "{lang}");
        missing_split(load_xlsum(&dir, lang, Split::Test).unwrap_err(), "test");
    }
    let hi = load_xlsum(&dir, "hi", Split::Train).unwrap();
    assert_eq!(hi[0].id, "international-50010000");
    assert_eq!(hi[0].references.len(), 1);
    match load_xlsum(&dir, "swahili", Split::Train).unwrap_err() {
        Error::MissingLanguage { available, .. } => assert_eq!(available.len(), 8),
        other => panic!("expected MissingLanguage, found: {other}"),
    }
}

#[test]
fn ilsum_1061_rows_cut_into_train_and_dev() {
    let Some(dir) = shared_data("ilsum_hindi_extract") else { return };
    let train = load_ilsum(&dir, Split::Train).unwrap();
    let dev = load_ilsum(&dir, Split::Dev).unwrap();
    assert_eq!((train.len(), dev.len()), (851, 210));
    assert!(train.iter().chain(&dev).all(|e| e.title.is_some() && e.references.len() == 1));
    missing_split(load_ilsum(&dir, Split::Test).unwrap_err(), "test");
}

#[test]
fn scitldr_1992_train_619_dev_with_1453_references() {
    let Some(dir) = shared_data("scitldr") else { return };
    let train = load_scitldr(&dir, Split::Train).unwrap();
    let dev = load_scitldr(&dir, Split::Dev).unwrap();
    assert_eq!(train.len(), 1992);
    assert_eq!(train.iter().map(|e| e.references.len()).sum::<usize>(), 1992);
    assert_eq!(dev.len(), 619);
    assert_eq!(dev.iter().map(|e| e.references.len()).sum::<usize>(), 1453);
    assert!(dev.iter().any(|e| e.references.len() > 1));
    missing_split(load_scitldr(&dir, Split::Test).unwrap_err(), "test");
}

#[test]
fn bbc_1993_articles_split_by_the_hash_rule() {
    let Some(dir) = shared_data("bbc_news_summary") else { return };
    let train = load_bbc(&dir, Split::Train).unwrap();
    let dev = load_bbc(&dir, Split::Dev).unwrap();
    // Cross-checked with Python: r = int(sha256(normalize(title + " " + article)), 16) % 50.
    assert_eq!((train.len(), dev.len()), (1593, 400));
    assert!(train.iter().chain(&dev).all(|e| e.title.is_some() && !e.references[0].is_empty()));
    missing_split(load_bbc(&dir, Split::Test).unwrap_err(), "test");
}

#[test]
fn mltext_lines_per_language() {
    let Some(dir) = shared_data("mltext") else { return };
    // (lang, all lines, dev lines): totals are the PROVENANCE line counts summed over sources;
    // dev counts cross-checked with Python (sha256(normalize(line)) % 10 == 0).
    for (lang, total, dev) in
        [("en", 60_795, 6016), ("hi", 8923, 871), ("te", 68_538, 6998), ("mr", 19_561, 1905), ("bn", 3094, 302)]
    {
        let t = load_mltext(&dir, lang, Split::Train, None).unwrap().len();
        let d = load_mltext(&dir, lang, Split::Dev, None).unwrap().len();
        assert_eq!((t + d, d), (total, dev), "{lang}");
    }
    let cv: Vec<String> = vec!["commonvoice_cc0".into()];
    let only_cv = load_mltext(&dir, "hi", Split::Train, Some(&cv)).unwrap();
    assert!(only_cv.iter().all(|e| e.id.starts_with("commonvoice_cc0/hi.txt:")));
    let prose = vec!["cltk_wikisource/te_siva_puranam_prose".to_string()];
    let d = load_mltext(&dir, "te", Split::Dev, Some(&prose)).unwrap().len();
    let t = load_mltext(&dir, "te", Split::Train, Some(&prose)).unwrap().len();
    assert_eq!(d + t, 1705);
    missing_split(load_mltext(&dir, "en", Split::Test, None).unwrap_err(), "test");
    assert!(matches!(load_mltext(&dir, "xx", Split::Train, None).unwrap_err(), Error::MissingLanguage { .. }));
}
