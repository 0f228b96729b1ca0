//! Datasets, prompts, tasks and federated partitions for hetfed. This crate reads data and
//! turns it into model-agnostic items; it never runs a model (no dependency on hetfed-model) and
//! never tokenises (token limits take a [`TokenCounter`] from the caller).
//!
//! # Data location
//! [`DataDir::resolve`]: `--data-dir`, else `$HETFED_DATA_DIR`, else `$XDG_CACHE_HOME/hetfed/data`,
//! else `~/.cache/hetfed/data`. Each dataset is a folder in it, in the dataset's public layout.
//! A missing dataset is one [`Error::MissingDataset`] naming the dataset, the paths looked at, the
//! data directory and where the public copy lives; a missing split is [`Error::MissingSplit`].
//!
//! # Datasets and splits
//! | dataset | folder | train | dev | test |
//! |---|---|---|---|---|
//! | Ethos binary | `ethos/` | hash rule | hash rule | PROVENANCE held-out rule |
//! | COPA (+ Balanced-COPA mirrors) | `copa/` | original id ≤ 400, `% 5 != 0` | original id ≤ 400, `% 5 == 0` | original id > 400 |
//! | XCOPA | `xcopa/<lang>/` | — | `val.<lang>.jsonl` | `test.<lang>.jsonl` |
//! | FLORES-200 | `flores200/` | — | `dev/` | `devtest/` |
//! | TICO-19 | `tico19/en-<lang>/` | sentences 0..1297, `hash_mod(id, 5) != 0` | sentences 0..1297, `hash_mod(id, 5) == 0` | sentences 1297.. |
//! | IN22 | `in22/IN22_testset/{gen,conv}/` | — | — | `test.<code>` |
//! | XL-Sum | `xlsum/` | `<lang>_train` | `<lang>_val` | `<lang>_test` |
//! | ILSUM Hindi (extract) | `ilsum_hindi_extract/` | hash rule on val file | hash rule on val file | test file |
//! | SciTLDR-A | `scitldr/` | `train` | `dev` | `test` |
//! | BBC News Summary | `bbc_news_summary/` | hash rule | hash rule | PROVENANCE held-out rule |
//! | mltext | `mltext/<source>/<lang>*.txt` | hash rule | hash rule (10%) | — |
//!
//! The module docs of [`datasets`] give each layout and rule exactly. "Hash rule" is
//! [`split::hash_split`]: deterministic, reproducible in one line of Python, and chosen so that the
//! rows a dataset's PROVENANCE.md held out of the shared copy are exactly this crate's `test`
//! split when a full upstream copy is used; `dev` is then about a fifth of the rest.
//!
//! # Tasks
//! A [`TaskSpec`] (TOML-deserialisable; built-ins from [`builtin`]) turns [`Examples`] into
//! [`Items`] (choice items with candidates and a gold index, generation items with references,
//! language-modelling items) and into [`PromptTarget`] pairs, whose JSONL is what hetfed-train
//! reads.
//!
//! # Partitions
//! [`partition`]: IID and Dirichlet label-skew splits among clients, deterministic under a seed, with
//! every client non-empty; [`partition_stats`] gives sizes, label histograms and entropies.

pub mod datasets;
pub mod dir;
pub mod error;
pub mod examples;
mod io;
pub mod lang;
pub mod partition;
pub mod split;
pub mod task;
pub mod template;
pub mod truncate;

pub use datasets::DatasetSpec;
pub use dir::{DataDir, DataDirOrigin, Dataset, DATA_DIR_ENV};
pub use error::{Error, Result};
pub use examples::{ChoiceExample, ClassificationExample, Examples, SummaryExample, TextExample, TranslationExample};
pub use partition::{partition_stats, ClientStats, PartitionScheme};
pub use split::Split;
pub use task::{
    builtin, write_prompt_target_jsonl, ChoiceItem, GenerationItem, Items, LmItem, PromptTarget, TaskKind,
    TaskRegistry, TaskSpec, BUILTIN_TASKS,
};
pub use truncate::{keep_end, keep_start, Length, TokenCounter};
