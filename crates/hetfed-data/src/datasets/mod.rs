//! Loaders, one module per dataset family, and [`DatasetSpec`]: a dataset with its parameters
//! (languages), named by a short string such as `flores:eng_Latn-hin_Deva`.

pub mod copa;
pub mod ethos;
pub mod mltext;
pub mod summarization;
pub mod translation;

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::dir::{DataDir, Dataset};
use crate::error::{Error, Result};
use crate::examples::Examples;
use crate::lang::{flores_code, iso_code, xlsum_name};
use crate::split::Split;
use crate::task::TaskKind;

pub use copa::{copa_split, load_copa, load_xcopa};
pub use ethos::{load_ethos, ETHOS_LABELS};
pub use mltext::{load_mltext, mltext_files, mltext_split};
pub use summarization::{load_bbc, load_ilsum, load_scitldr, load_xlsum};
pub use translation::{load_flores, load_flores_lines, load_in22, load_tico, tico_split, In22Subset, TICO_DEV_LINES};

/// A dataset and its parameters. The string form (used in TOML and task names):
///
/// | string | dataset |
/// |---|---|
/// | `ethos` | Ethos binary |
/// | `copa` | English COPA + Balanced-COPA mirrors |
/// | `xcopa:<lang>` | XCOPA (`ta`, `et`, ...) |
/// | `flores:<src>-<tgt>` | FLORES-200, any pair (`eng_Latn-hin_Deva`, or ISO `en-hi`) |
/// | `tico:<src>-<tgt>` | TICO-19 (`en-hi`, `hi-en`, ...) |
/// | `in22-gen:<src>-<tgt>`, `in22-conv:<src>-<tgt>` | IN22 |
/// | `xlsum:<lang>` | XL-Sum (`hindi` or `hi`) |
/// | `ilsum` | ILSUM Hindi (extract) |
/// | `scitldr` | SciTLDR-A |
/// | `bbc` | BBC News Summary |
/// | `mltext:<lang>[@<source>,...]` | mltext, all sources or the listed ones |
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum DatasetSpec {
    Ethos,
    Copa,
    Xcopa { lang: String },
    Flores { src: String, tgt: String },
    Tico { src: String, tgt: String },
    In22 { subset: In22Subset, src: String, tgt: String },
    XlSum { lang: String },
    Ilsum,
    SciTldr,
    Bbc,
    Mltext { lang: String, sources: Option<Vec<String>> },
}

impl DatasetSpec {
    /// The ISO 639-1 language of a task's prompt fields (a translation's source, a summarised
    /// document, a comment, a premise); `None` for plain text.
    pub fn prompt_lang(&self) -> Option<String> {
        match self {
            DatasetSpec::Flores { src, .. } | DatasetSpec::Tico { src, .. } | DatasetSpec::In22 { src, .. } => {
                Some(crate::lang::iso_code(src))
            }
            DatasetSpec::XlSum { lang } | DatasetSpec::Xcopa { lang } => Some(crate::lang::iso_code(lang)),
            DatasetSpec::Ilsum => Some("hi".into()),
            DatasetSpec::SciTldr | DatasetSpec::Bbc | DatasetSpec::Ethos | DatasetSpec::Copa => Some("en".into()),
            DatasetSpec::Mltext { .. } => None,
        }
    }

    /// The ISO 639-1 language of a generation task's answers (a translation's target, a
    /// summary's language); `None` for choice tasks and plain text.
    pub fn answer_lang(&self) -> Option<String> {
        match self {
            DatasetSpec::Flores { tgt, .. } | DatasetSpec::Tico { tgt, .. } | DatasetSpec::In22 { tgt, .. } => {
                Some(crate::lang::iso_code(tgt))
            }
            DatasetSpec::XlSum { lang } => Some(crate::lang::iso_code(lang)),
            DatasetSpec::Ilsum => Some("hi".into()),
            DatasetSpec::SciTldr | DatasetSpec::Bbc => Some("en".into()),
            DatasetSpec::Ethos | DatasetSpec::Copa | DatasetSpec::Xcopa { .. } | DatasetSpec::Mltext { .. } => None,
        }
    }

    pub fn dataset(&self) -> Dataset {
        match self {
            DatasetSpec::Ethos => Dataset::Ethos,
            DatasetSpec::Copa => Dataset::Copa,
            DatasetSpec::Xcopa { .. } => Dataset::Xcopa,
            DatasetSpec::Flores { .. } => Dataset::Flores200,
            DatasetSpec::Tico { .. } => Dataset::Tico19,
            DatasetSpec::In22 { .. } => Dataset::In22,
            DatasetSpec::XlSum { .. } => Dataset::XlSum,
            DatasetSpec::Ilsum => Dataset::Ilsum,
            DatasetSpec::SciTldr => Dataset::SciTldr,
            DatasetSpec::Bbc => Dataset::BbcNewsSummary,
            DatasetSpec::Mltext { .. } => Dataset::Mltext,
        }
    }

    /// The kind of task the dataset's examples serve.
    pub fn kind(&self) -> TaskKind {
        match self {
            DatasetSpec::Ethos => TaskKind::Classification,
            DatasetSpec::Copa | DatasetSpec::Xcopa { .. } => TaskKind::Reasoning,
            DatasetSpec::Flores { .. } | DatasetSpec::Tico { .. } | DatasetSpec::In22 { .. } => TaskKind::Translation,
            DatasetSpec::XlSum { .. } | DatasetSpec::Ilsum | DatasetSpec::SciTldr | DatasetSpec::Bbc => {
                TaskKind::Summarization
            }
            DatasetSpec::Mltext { .. } => TaskKind::LanguageModelling,
        }
    }

    /// Class names (index = label) for classification datasets.
    pub fn class_names(&self) -> Option<Vec<String>> {
        match self {
            DatasetSpec::Ethos => Some(ETHOS_LABELS.iter().map(|s| s.to_string()).collect()),
            _ => None,
        }
    }

    /// Number of alternatives per item for choice datasets.
    pub fn n_choices(&self) -> Option<usize> {
        match self {
            DatasetSpec::Copa | DatasetSpec::Xcopa { .. } => Some(2),
            _ => None,
        }
    }

    /// Loads one split.
    pub fn load(&self, dir: &DataDir, split: Split) -> Result<Examples> {
        Ok(match self {
            DatasetSpec::Ethos => Examples::Classification(load_ethos(dir, split)?),
            DatasetSpec::Copa => Examples::Choice(load_copa(dir, split)?),
            DatasetSpec::Xcopa { lang } => Examples::Choice(load_xcopa(dir, lang, split)?),
            DatasetSpec::Flores { src, tgt } => Examples::Translation(load_flores(dir, src, tgt, split)?),
            DatasetSpec::Tico { src, tgt } => Examples::Translation(load_tico(dir, src, tgt, split)?),
            DatasetSpec::In22 { subset, src, tgt } => Examples::Translation(load_in22(dir, *subset, src, tgt, split)?),
            DatasetSpec::XlSum { lang } => Examples::Summary(load_xlsum(dir, lang, split)?),
            DatasetSpec::Ilsum => Examples::Summary(load_ilsum(dir, split)?),
            DatasetSpec::SciTldr => Examples::Summary(load_scitldr(dir, split)?),
            DatasetSpec::Bbc => Examples::Summary(load_bbc(dir, split)?),
            DatasetSpec::Mltext { lang, sources } => Examples::Text(load_mltext(dir, lang, split, sources.as_deref())?),
        })
    }
}

impl fmt::Display for DatasetSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DatasetSpec::Ethos => f.write_str("ethos"),
            DatasetSpec::Copa => f.write_str("copa"),
            DatasetSpec::Xcopa { lang } => write!(f, "xcopa:{lang}"),
            DatasetSpec::Flores { src, tgt } => write!(f, "flores:{src}-{tgt}"),
            DatasetSpec::Tico { src, tgt } => write!(f, "tico:{src}-{tgt}"),
            DatasetSpec::In22 { subset, src, tgt } => write!(f, "in22-{}:{src}-{tgt}", subset.as_str()),
            DatasetSpec::XlSum { lang } => write!(f, "xlsum:{lang}"),
            DatasetSpec::Ilsum => f.write_str("ilsum"),
            DatasetSpec::SciTldr => f.write_str("scitldr"),
            DatasetSpec::Bbc => f.write_str("bbc"),
            DatasetSpec::Mltext { lang, sources: None } => write!(f, "mltext:{lang}"),
            DatasetSpec::Mltext { lang, sources: Some(s) } => write!(f, "mltext:{lang}@{}", s.join(",")),
        }
    }
}

const SPEC_FORMS: &str = "ethos, copa, xcopa:<lang>, flores:<src>-<tgt>, tico:<src>-<tgt>, in22-gen:<src>-<tgt>, \
                          in22-conv:<src>-<tgt>, xlsum:<lang>, ilsum, scitldr, bbc, mltext:<lang>[@<source>,...]";

impl FromStr for DatasetSpec {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let bad = |why: &str| Error::config(format!("bad dataset `{s}`: {why}; expected one of {SPEC_FORMS}"));
        let (head, arg) = match s.trim().split_once(':') {
            Some((h, a)) => (h, Some(a.trim())),
            None => (s.trim(), None),
        };
        let need = |what: &str| -> Result<&str> {
            arg.filter(|a| !a.is_empty()).ok_or_else(|| bad(&format!("`{head}` needs `:{what}`")))
        };
        let pair = |what: &str| -> Result<(String, String)> {
            let a = need(what)?;
            match a.split_once('-') {
                Some((x, y)) if !x.is_empty() && !y.is_empty() && !y.contains('-') => {
                    Ok((x.to_string(), y.to_string()))
                }
                _ => Err(bad(&format!("expected a language pair `<src>-<tgt>`, found `{a}`"))),
            }
        };
        let none = |spec: DatasetSpec| -> Result<DatasetSpec> {
            match arg {
                None => Ok(spec),
                Some(_) => Err(bad(&format!("`{head}` takes no parameter"))),
            }
        };
        match head {
            "ethos" => none(DatasetSpec::Ethos),
            "copa" => none(DatasetSpec::Copa),
            "ilsum" | "ilsum_hindi" => none(DatasetSpec::Ilsum),
            "scitldr" => none(DatasetSpec::SciTldr),
            "bbc" | "bbc_news_summary" => none(DatasetSpec::Bbc),
            "xcopa" => Ok(DatasetSpec::Xcopa { lang: iso_code(need("<lang>")?) }),
            "flores" | "flores200" => {
                let (a, b) = pair("<src>-<tgt>")?;
                Ok(DatasetSpec::Flores { src: flores_code(&a), tgt: flores_code(&b) })
            }
            "tico" | "tico19" => {
                let (a, b) = pair("<src>-<tgt>")?;
                Ok(DatasetSpec::Tico { src: iso_code(&a), tgt: iso_code(&b) })
            }
            "in22-gen" | "in22-conv" => {
                let (a, b) = pair("<src>-<tgt>")?;
                let subset = if head == "in22-gen" { In22Subset::Gen } else { In22Subset::Conv };
                Ok(DatasetSpec::In22 { subset, src: flores_code(&a), tgt: flores_code(&b) })
            }
            "xlsum" => Ok(DatasetSpec::XlSum { lang: xlsum_name(need("<lang>")?) }),
            "mltext" => {
                let a = need("<lang>")?;
                let (lang, sources) = match a.split_once('@') {
                    Some((l, s)) => {
                        let s: Vec<String> =
                            s.split(',').map(|x| x.trim().to_string()).filter(|x| !x.is_empty()).collect();
                        if s.is_empty() {
                            return Err(bad("expected source names after `@`"));
                        }
                        (l, Some(s))
                    }
                    None => (a, None),
                };
                Ok(DatasetSpec::Mltext { lang: iso_code(lang), sources })
            }
            _ => Err(bad("unknown dataset")),
        }
    }
}

impl TryFrom<String> for DatasetSpec {
    type Error = Error;
    fn try_from(s: String) -> Result<Self> {
        s.parse()
    }
}

impl From<DatasetSpec> for String {
    fn from(d: DatasetSpec) -> String {
        d.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_canonicalise_and_print_back() {
        for (s, want) in [
            ("flores:en-hi", "flores:eng_Latn-hin_Deva"),
            ("flores200:eng_Latn-zul_Latn", "flores:eng_Latn-zul_Latn"),
            ("tico:eng_Latn-ta", "tico:en-ta"),
            ("in22-conv:en-mr", "in22-conv:eng_Latn-mar_Deva"),
            ("xlsum:hi", "xlsum:hindi"),
            (
                "mltext:te@commonvoice_cc0, cltk_wikisource/te_siva_puranam_prose",
                "mltext:te@commonvoice_cc0,cltk_wikisource/te_siva_puranam_prose",
            ),
            ("bbc_news_summary", "bbc"),
        ] {
            let d: DatasetSpec = s.parse().unwrap();
            assert_eq!(d.to_string(), want);
            assert_eq!(want.parse::<DatasetSpec>().unwrap(), d);
        }
    }

    #[test]
    fn bad_specs_say_what_is_expected() {
        for (s, msg) in [
            ("flores:eng_Latn", "expected a language pair"),
            ("xlsum", "`xlsum` needs `:<lang>`"),
            ("ethos:x", "takes no parameter"),
            ("imdb", "unknown dataset"),
        ] {
            let e = s.parse::<DatasetSpec>().unwrap_err().to_string();
            assert!(e.contains(msg) && e.contains("expected one of"), "{s}: {e}");
        }
    }
}
