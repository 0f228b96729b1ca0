//! Task specs: built-ins on the real data, TOML registries, prompt rendering, limits, and the
//! `{prompt, target}` JSONL that hetfed-train reads.

mod common;

use common::{shared_data, TempDir};
use hetfed_data::{
    builtin, write_prompt_target_jsonl, Examples, Items, Length, Split, TaskKind, TaskRegistry, TaskSpec, TokenCounter,
};

#[test]
fn ethos_items_are_label_word_choices() {
    let Some(dir) = shared_data("ethos") else { return };
    let task = builtin("ethos").unwrap();
    let ex = task.load(&dir, Split::Dev).unwrap();
    let labels = ex.labels().unwrap();
    let Items::Choice(items) = task.to_items(&ex, None).unwrap() else { panic!("choice items") };
    assert_eq!(items.len(), 164);
    assert!(items.iter().zip(&labels).all(|(it, &l)| it.gold == l && it.candidates == [" no", " yes"]));
    assert!(items[0].prompt.starts_with("Comment: ") && items[0].prompt.ends_with("\nIs this comment hateful?"));
    let pairs = task.to_prompt_target(&ex, None).unwrap();
    assert_eq!(pairs.iter().filter(|p| p.target == " yes").count(), 70);
}

#[test]
fn copa_items_join_premise_and_alternatives() {
    let Some(dir) = shared_data("copa") else { return };
    let task = builtin("copa").unwrap();
    let ex = task.load(&dir, Split::Train).unwrap();
    let Items::Choice(items) = task.to_items(&ex, None).unwrap() else { panic!("choice items") };
    assert_eq!(items.len(), 640);
    assert_eq!(items[0].prompt, "My body cast a shadow over the grass because");
    assert_eq!(items[0].candidates, [" the sun was rising.", " the grass was cut."]);
    assert_eq!(items[0].gold, 0);
    let effect = items.iter().find(|it| it.prompt.ends_with(" so")).expect("effect items use `so`");
    assert_eq!(effect.candidates.len(), 2);
    let pairs = task.to_prompt_target(&ex, None).unwrap();
    assert_eq!(pairs[0].target, " the sun was rising.");
}

#[test]
fn translation_and_summarization_items_carry_references() {
    let Some(dir) = shared_data("flores200/dev") else { return };
    let task = builtin("flores:eng_Latn-fra_Latn").unwrap();
    let ex = task.load(&dir, Split::Dev).unwrap();
    let Items::Generation(items) = task.to_items(&ex, None).unwrap() else { panic!("generation items") };
    assert_eq!(items.len(), 997);
    assert!(items[0].prompt.starts_with("Translate English to French.\nEnglish: On Monday"));
    assert!(items[0].prompt.ends_with("\nFrench:"));
    let Examples::Translation(v) = &ex else { panic!() };
    assert_eq!(items[3].references, [v[3].tgt.clone()]);
    let pairs = task.to_prompt_target(&ex, None).unwrap();
    assert_eq!(pairs[3].target, format!(" {}", v[3].tgt));

    let Some(dir) = shared_data("scitldr") else { return };
    let task = builtin("scitldr").unwrap();
    let ex = task.load(&dir, Split::Dev).unwrap();
    let Items::Generation(items) = task.to_items(&ex, None).unwrap() else { panic!("generation items") };
    assert_eq!(items.iter().map(|i| i.references.len()).sum::<usize>(), 1453);
    assert!(items.iter().all(|i| i.prompt.starts_with("Abstract: ") && i.prompt.ends_with("\nTL;DR:")));
}

#[test]
fn limits_cut_documents_at_the_start_and_prompts_at_the_end() {
    let Some(dir) = shared_data("bbc_news_summary") else { return };
    let mut task = builtin("bbc").unwrap();
    let ex = task.load(&dir, Split::Dev).unwrap();
    let Items::Generation(items) = task.to_items(&ex, None).unwrap() else { panic!() };
    let Examples::Summary(docs) = &ex else { panic!() };
    // The default keeps the first 3000 chars of each article.
    let long = docs.iter().position(|d| d.document.chars().count() > 3000).expect("some article is long");
    let kept = items[long].prompt.strip_prefix("Article: ").unwrap().strip_suffix("\nSummary:").unwrap();
    assert_eq!(kept.chars().count(), 3000);
    assert!(docs[long].document.starts_with(kept));
    // A prompt limit keeps the end, where the answer goes.
    task.max_prompt = Some(Length::Chars(100));
    let Items::Generation(items) = task.to_items(&ex, None).unwrap() else { panic!() };
    assert!(items.iter().all(|i| i.prompt.chars().count() <= 100 && i.prompt.ends_with("\nSummary:")));
    // In tokens, with the caller's counter (here: whitespace words).
    let words = |s: &str| s.split_whitespace().count();
    let counter: &dyn TokenCounter = &words;
    task.max_prompt = Some(Length::Tokens(20));
    task.max_target = Some(Length::Tokens(5));
    let pairs = task.to_prompt_target(&ex, Some(counter)).unwrap();
    assert!(pairs.iter().all(|p| words(&p.prompt) <= 20 && p.prompt.ends_with("Summary:") && words(&p.target) <= 5));
    assert!(task.to_items(&ex, None).unwrap_err().to_string().contains("token counter"));
}

#[test]
fn mltext_items_score_whole_lines() {
    let Some(dir) = shared_data("mltext") else { return };
    let task = builtin("mltext:hi").unwrap();
    assert_eq!(task.kind, TaskKind::LanguageModelling);
    let ex = task.load(&dir, Split::Dev).unwrap();
    let Items::Lm(items) = task.to_items(&ex, None).unwrap() else { panic!() };
    assert_eq!(items.len(), 871);
    assert!(items.iter().all(|i| i.prompt.is_empty() && !i.text.is_empty()));
}

#[test]
fn prompt_target_jsonl_has_the_finetune_line_format() {
    let Some(dir) = shared_data("ethos") else { return };
    let task = builtin("ethos").unwrap();
    let pairs = task.to_prompt_target(&task.load(&dir, Split::Train).unwrap(), None).unwrap();
    let t = TempDir::new("jsonl");
    let path = t.0.join("out/train.jsonl");
    write_prompt_target_jsonl(&path, &pairs).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    assert_eq!(text.lines().count(), 645);
    for (line, p) in text.lines().zip(&pairs) {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        let obj = v.as_object().unwrap();
        assert_eq!(obj.len(), 2);
        assert_eq!(
            (obj["prompt"].as_str().unwrap(), obj["target"].as_str().unwrap()),
            (p.prompt.as_str(), p.target.as_str())
        );
    }
}

#[test]
fn toml_registry_overrides_and_defines_tasks() {
    let reg = TaskRegistry::from_toml_str(
        r#"
        [tasks.ethos-short]
        base = "ethos"
        max_prompt = { chars = 200 }
        label_words = [" No", " Yes"]

        [tasks.copa-then]
        kind = "reasoning"
        dataset = "copa"
        prompt = "Premise: {premise}\nWhat was the {question}?"
        choices = [" {choice1}", " {choice2}"]
        metrics = ["accuracy"]

        [tasks.hi-ta]
        base = "flores:hin_Deva-tam_Taml"
        prompt = "{src_name}: {src} = {tgt_name}:"
        "#,
    )
    .unwrap();
    let short = reg.get("ethos-short").unwrap();
    assert_eq!(
        (short.name.as_str(), short.max_prompt, short.label_words[1].as_str()),
        ("ethos-short", Some(Length::Chars(200)), " Yes")
    );
    assert_eq!(short.prompt, builtin("ethos").unwrap().prompt);
    assert!(reg.get("copa-then").unwrap().connectors.is_empty());
    assert_eq!(reg.get("hi-ta").unwrap().target.as_deref(), Some(" {tgt}"));
    assert_eq!(reg.get("tico:hi-en").unwrap().name, "tico:hi-en");
    assert!(reg.names().starts_with(&["copa-then".to_string(), "ethos-short".to_string(), "hi-ta".to_string()]));

    let Some(dir) = shared_data("copa") else { return };
    let task = reg.get("copa-then").unwrap();
    let Items::Choice(items) = task.to_items(&task.load(&dir, Split::Dev).unwrap(), None).unwrap() else { panic!() };
    assert!(items[0].prompt.starts_with("Premise: ") && items[0].prompt.contains("What was the "));
}

#[test]
fn bad_task_specs_are_clear_errors() {
    for (toml, msg) in [
        ("[tasks.a]\nbase = \"ethos\"\nprompt = \"{comment}\"", "uses `{comment}`: expected one of {id}, {text}"),
        ("[tasks.a]\nbase = \"ethos\"\nlabel_words = [\" yes\"]", "expected 2 label words"),
        ("[tasks.a]\nbase = \"ethos\"\ndataset = \"copa\"", "kind `classification` does not fit dataset `copa`"),
        ("[tasks.a]\nbase = \"ethos\"\ntarget = \" {text}\"", "`target` is not used by choice tasks"),
        ("[tasks.a]\nbase = \"flores:en-hi\"\nprompt = \"{src} {tgt}\"", "which is the answer"),
        ("[tasks.a]\nbase = \"flores:en-hi\"\nlabelwords = []", "unknown field `labelwords`"),
        ("[tasks.a]\nbase = \"xlsum:hi\"\nfield_limits = { text = { chars = 10 } }", "`field_limits` names `text`"),
        ("[tasks.a]\nbase = \"copa\"\nconnectors = { cause = \"because\" }", "has no `effect`"),
        ("[tasks.a]\nbase = \"nope\"", "unknown task `nope`"),
        ("[tasks.a]\nbase = \"bbc\"\nmax_prompt = { chars = 0 }", "must be positive"),
        ("[tasks.a]\nbase = \"bbc\"\nmax_prompt = { words = 3 }", "unknown variant `words`"),
    ] {
        let e = TaskRegistry::from_toml_str(toml).unwrap_err().to_string();
        assert!(e.contains(msg), "{toml}\n-> {e}");
    }
    // A spec applied to the wrong examples.
    let e = builtin("ethos").unwrap().to_items(&Examples::Text(vec![]), None).unwrap_err().to_string();
    assert!(e.contains("task `ethos` (classification) was given text"), "{e}");
    // A single spec file.
    let s = TaskSpec::from_toml_str("base = \"ilsum\"\nmetrics = [\"rougeL\"]").unwrap();
    assert_eq!((s.name.as_str(), s.metrics.as_slice()), ("ilsum", ["rougeL".to_string()].as_slice()));
}
