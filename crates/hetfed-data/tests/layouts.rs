//! Public layouts with no data in `../shared` (XCOPA, IN22, FLORES devtest, upstream TICO-19,
//! SciTLDR and BBC folders, the full Ethos file), built in temporary folders; and the errors for a
//! missing dataset, split or language.

mod common;

use common::TempDir;
use hetfed_data::datasets::*;
use hetfed_data::split::hash_split;
use hetfed_data::{DataDir, Error, Split};

fn copa_row(idx: u32, label: u8) -> String {
    format!(
        r#"{{"premise": "Premise {idx}.", "choice1": "One {idx}.", "choice2": "Two {idx}.", "question": "effect", "label": {label}, "idx": {idx}, "changed": false}}"#
    )
}

#[test]
fn missing_dataset_names_dataset_path_and_public_copy() {
    let t = TempDir::new("missing");
    let e = load_ethos(&t.data_dir(), Split::Train).unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, Error::MissingDataset { .. }));
    assert!(msg.starts_with("dataset `ethos` not found: looked for "), "{msg}");
    assert!(msg.contains(&t.0.join("ethos").join("Ethos_Dataset_Binary.csv").display().to_string()), "{msg}");
    assert!(msg.contains("https://github.com/intelligence-csd-auth-gr/Ethos-Hate-Speech-Dataset"), "{msg}");
    for d in hetfed_data::Dataset::ALL {
        assert!(d.source_url().starts_with("https://"), "{d}");
    }
    // Every loader reports a missing dataset the same way.
    let dir = t.data_dir();
    let errs = [
        load_copa(&dir, Split::Train).map(|_| ()),
        load_xcopa(&dir, "ta", Split::Dev).map(|_| ()),
        load_flores(&dir, "en", "hi", Split::Dev).map(|_| ()),
        load_tico(&dir, "en", "hi", Split::Dev).map(|_| ()),
        load_in22(&dir, In22Subset::Conv, "en", "hi", Split::Test).map(|_| ()),
        load_xlsum(&dir, "hindi", Split::Train).map(|_| ()),
        load_ilsum(&dir, Split::Train).map(|_| ()),
        load_scitldr(&dir, Split::Train).map(|_| ()),
        load_bbc(&dir, Split::Train).map(|_| ()),
        load_mltext(&dir, "hi", Split::Train, None).map(|_| ()),
    ];
    for e in errs {
        let e = e.unwrap_err();
        assert!(matches!(e, Error::MissingDataset { .. }), "{e}");
        assert!(e.to_string().contains("the public copy is at https://"), "{e}");
    }
}

#[test]
fn xcopa_layout_dev_and_test_no_train() {
    let t = TempDir::new("xcopa");
    t.write("xcopa/ta/val.ta.jsonl", format!("{}\n{}\n", copa_row(1, 0), copa_row(2, 1)));
    t.write("xcopa/ta/test.ta.jsonl", format!("{}\n", copa_row(3, 1)));
    t.write("xcopa/data/et/val.et.jsonl", format!("{}\n", copa_row(9, 0)));
    let dir = t.data_dir();
    let dev = load_xcopa(&dir, "ta", Split::Dev).unwrap();
    assert_eq!(dev.len(), 2);
    assert_eq!((dev[1].id.as_str(), dev[1].label, dev[1].question.as_str()), ("2", 1, "effect"));
    assert_eq!(dev[1].choices, ["One 2.", "Two 2."]);
    assert_eq!(load_xcopa(&dir, "ta", Split::Test).unwrap().len(), 1);
    assert_eq!(load_xcopa(&dir, "et", Split::Dev).unwrap()[0].id, "9");
    let e = load_xcopa(&dir, "ta", Split::Train).unwrap_err();
    assert!(matches!(e, Error::MissingSplit { .. }) && e.to_string().contains("train on English COPA"), "{e}");
    assert!(matches!(load_xcopa(&dir, "et", Split::Test).unwrap_err(), Error::MissingSplit { .. }));
    match load_xcopa(&dir, "zh", Split::Dev).unwrap_err() {
        Error::MissingLanguage { available, .. } => assert_eq!(available, ["et", "ta"]),
        other => panic!("expected MissingLanguage, found: {other}"),
    }
    t.write("xcopa/ta/val.ta.jsonl", format!("{}\n{}\n", copa_row(1, 0), copa_row(2, 2)));
    let e = load_xcopa(&dir, "ta", Split::Dev).unwrap_err().to_string();
    assert!(e.ends_with("val.ta.jsonl:2: expected label 0 or 1, found 2"), "{e}");
}

#[test]
fn in22_zip_layout_any_pair_test_only() {
    let t = TempDir::new("in22");
    t.write("in22/IN22_testset/gen/test.eng_Latn", "Hello.\nGood day.\n");
    t.write("in22/IN22_testset/gen/test.hin_Deva", "नमस्ते।\nशुभ दिन।\n");
    t.write("in22/IN22_testset/gen/test.tam_Taml", "வணக்கம்.\n");
    t.write("in22/conv/test.eng_Latn", "Hi\n");
    t.write("in22/conv/test.mar_Deva", "नमस्कार\n");
    let dir = t.data_dir();
    let gen = load_in22(&dir, In22Subset::Gen, "en", "hi", Split::Test).unwrap();
    assert_eq!(gen.len(), 2);
    assert_eq!((gen[1].id.as_str(), gen[1].src.as_str(), gen[1].tgt.as_str()), ("gen-2", "Good day.", "शुभ दिन।"));
    assert_eq!((gen[0].src_lang.as_str(), gen[0].tgt_lang.as_str()), ("eng_Latn", "hin_Deva"));
    let conv = load_in22(&dir, In22Subset::Conv, "mar_Deva", "eng_Latn", Split::Test).unwrap();
    assert_eq!((conv[0].src.as_str(), conv[0].tgt.as_str()), ("नमस्कार", "Hi"));
    let e = load_in22(&dir, In22Subset::Gen, "en", "hi", Split::Dev).unwrap_err();
    assert!(matches!(e, Error::MissingSplit { .. }) && e.to_string().contains("FLORES-200 dev"), "{e}");
    // Misaligned files are a format error naming both.
    let e = load_in22(&dir, In22Subset::Gen, "en", "ta", Split::Test).unwrap_err().to_string();
    assert!(e.contains("test.tam_Taml") && e.contains("expected 2 lines") && e.contains("found 1"), "{e}");
    match load_in22(&dir, In22Subset::Gen, "en", "guj_Gujr", Split::Test).unwrap_err() {
        Error::MissingLanguage { available, .. } => assert_eq!(available, ["eng_Latn", "hin_Deva", "tam_Taml"]),
        other => panic!("expected MissingLanguage, found: {other}"),
    }
}

#[test]
fn flores_release_layout_with_devtest() {
    let t = TempDir::new("flores");
    t.write("flores200/flores200_dataset/dev/eng_Latn.dev", "a\nb\n");
    t.write("flores200/flores200_dataset/dev/fra_Latn.dev", "A\nB\n");
    t.write("flores200/flores200_dataset/devtest/eng_Latn.devtest", "c\r\nd\r\ne\r\n");
    t.write("flores200/flores200_dataset/devtest/fra_Latn.devtest", "C\nD\nE");
    let dir = t.data_dir();
    let dev = load_flores(&dir, "en", "fr", Split::Dev).unwrap();
    assert_eq!(dev.len(), 2);
    let test = load_flores(&dir, "fra_Latn", "eng_Latn", "devtest".parse().unwrap()).unwrap();
    assert_eq!(test.len(), 3);
    assert_eq!((test[2].id.as_str(), test[2].src.as_str(), test[2].tgt.as_str()), ("devtest-3", "E", "e"));
}

#[test]
fn tico_upstream_files_are_cut_into_train_dev_and_test() {
    let t = TempDir::new("tico");
    let n = TICO_DEV_LINES + 3;
    let en: String = (0..n).map(|i| format!("en {i}\n")).collect();
    let hi: String = (0..n).map(|i| format!("hi {i}\n")).collect();
    let info: String = (0..n).map(|i| format!("DOC_{}:{i}\turl\tlicense\n", i / 100)).collect();
    t.write("tico19/en-hi/tico19-test.en", en);
    t.write("tico19/en-hi/tico19-test.hi", hi);
    t.write("tico19/en-hi/tico19-test.en.info", info);
    let dir = t.data_dir();
    let train = load_tico(&dir, "en", "hi", Split::Train).unwrap();
    let dev = load_tico(&dir, "en", "hi", Split::Dev).unwrap();
    let test = load_tico(&dir, "hi", "en", Split::Test).unwrap();
    assert_eq!((train.len() + dev.len(), test.len()), (TICO_DEV_LINES, 3));
    // About a fifth of the first part is dev, chosen by sentence id, and the parts are disjoint.
    assert!((200..320).contains(&dev.len()), "dev has {} sentences", dev.len());
    assert!(dev.iter().all(|e| hetfed_data::datasets::tico_split(&e.id) == Split::Dev));
    assert!(train.iter().all(|e| !dev.iter().any(|d| d.id == e.id)));
    assert_eq!(
        (test[0].id.as_str(), test[0].src.as_str(), test[0].tgt.as_str()),
        ("DOC_12:1297", "hi 1297", "en 1297")
    );
    assert!(load_tico(&dir, "hi", "ta", Split::Dev)
        .unwrap_err()
        .to_string()
        .contains("expected en-<lang> or <lang>-en"));
}

#[test]
fn scitldr_upstream_layout_and_missing_split() {
    let t = TempDir::new("scitldr");
    t.write(
        "scitldr/SciTLDR-Data/SciTLDR-A/dev.jsonl",
        r#"{"source": ["We study X.", "It works."], "source_labels": [0, 1], "rouge_scores": [0.1, 0.2], "paper_id": "p1", "target": ["X works.", "We show X works."], "title": "On X"}"#,
    );
    let dir = t.data_dir();
    let dev = load_scitldr(&dir, Split::Dev).unwrap();
    assert_eq!(dev[0].document, "We study X. It works.");
    assert_eq!(dev[0].references, ["X works.", "We show X works."]);
    let e = load_scitldr(&dir, Split::Train).unwrap_err();
    assert!(matches!(e, Error::MissingSplit { .. }), "{e}");
}

#[test]
fn bbc_kaggle_folders_with_a_cp1252_file() {
    let t = TempDir::new("bbc");
    let root = "bbc_news_summary/BBC News Summary";
    let mut n = 0;
    for i in 0..40 {
        let cat = if i % 2 == 0 { "sport" } else { "tech" };
        let title = format!("Title {i}");
        t.write(
            &format!("{root}/News Articles/{cat}/{i:03}.txt"),
            format!("{title}\n\nBody of article {i}. More text.\n"),
        );
        t.write(&format!("{root}/Summaries/{cat}/{i:03}.txt"), format!("Body of article {i}."));
        n += 1;
    }
    t.write(&format!("{root}/News Articles/sport/999.txt"), b"Caf\xe9 title\n\nIt cost \x80 5.\n");
    t.write(&format!("{root}/Summaries/sport/999.txt"), b"It cost \x80 5.");
    n += 1;
    let dir = t.data_dir();
    let by_split: Vec<usize> = Split::ALL.iter().map(|&s| load_bbc(&dir, s).map_or(0, |v| v.len())).collect();
    assert_eq!(by_split.iter().sum::<usize>(), n, "{by_split:?}");
    let all: Vec<_> = Split::ALL.iter().flat_map(|&s| load_bbc(&dir, s).unwrap_or_default()).collect();
    let cafe = all.iter().find(|e| e.id == "sport/999").unwrap();
    assert_eq!(
        (cafe.title.as_deref(), cafe.document.as_str(), cafe.references[0].as_str()),
        (Some("Café title"), "It cost € 5.", "It cost € 5.")
    );
    for e in &all {
        let want = hash_split(&format!("{} {}", e.title.as_deref().unwrap(), e.document), 10);
        assert!(load_bbc(&dir, want).unwrap().iter().any(|x| x.id == e.id));
    }
}

#[test]
fn full_upstream_ethos_gets_the_held_out_rows_as_test() {
    let t = TempDir::new("ethos");
    let mut csv = String::from("comment;isHate\n");
    for i in 0..200 {
        csv.push_str(&format!(
            "\"comment number {i}; with a semicolon\";{}\n",
            if i % 3 == 0 { "0.6666666666666666" } else { "0.0" }
        ));
    }
    t.write("ethos/ethos_data/Ethos_Dataset_Binary.csv", csv);
    let dir = t.data_dir();
    let parts: Vec<_> = Split::ALL.iter().map(|&s| load_ethos(&dir, s).unwrap()).collect();
    assert_eq!(parts.iter().map(Vec::len).sum::<usize>(), 200);
    for (s, part) in Split::ALL.iter().zip(&parts) {
        assert!(!part.is_empty());
        assert!(part.iter().all(|e| hash_split(&e.text, 5) == *s && e.text.contains("; with")));
    }
    // Roughly 20% test, 16% dev, 64% train.
    assert!((25..=55).contains(&parts[2].len()), "{}", parts[2].len());
    assert_eq!(parts.iter().flatten().filter(|e| e.label == 1).count(), 67);
    t.write("ethos/ethos_data/Ethos_Dataset_Binary.csv", "comment;isHate\nfine;1.5\n");
    let e = load_ethos(&dir, Split::Train).unwrap_err().to_string();
    assert!(e.ends_with("Ethos_Dataset_Binary.csv:2: expected isHate in [0, 1], found `1.5`"), "{e}");
}

#[test]
fn data_dir_resolution_prefers_the_flag() {
    let d = DataDir::resolve(Some(std::path::Path::new("/some/where"))).unwrap();
    assert_eq!(d.root(), std::path::Path::new("/some/where"));
}
