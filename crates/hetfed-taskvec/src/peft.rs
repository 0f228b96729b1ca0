//! Hugging Face PEFT interop: LoRA adapters as `adapter_config.json` + `adapter_model.safetensors`,
//! so that an adapter trained here loads with `PeftModel.from_pretrained` and one trained with
//! PEFT becomes a hetfed task vector.
//!
//! PEFT names a factor `base_model.model.<module>.lora_A.weight`, where `<module>` is the module's
//! path in the `*ForCausalLM` model, which is the canonical name hetfed uses. PEFT's `A` is
//! `[r, in]` and `B` `[out, r]` and its update `B·A·(lora_alpha / r)`, as in hetfed, so the
//! factors carry over unchanged.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::DType;
use hetfed_core::{Error, Result, TensorMap};
use hetfed_model::LoraConfig;
use serde_json::{json, Value};

use crate::{lora, Delta, TaskVector};

/// The adapter's config file in a PEFT directory.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// The adapter's weights file in a PEFT directory.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
const PREFIX: &str = "base_model.model.";

/// Writes a LoRA task vector as a PEFT adapter directory. A Full task vector is an error: PEFT
/// adapters are factored.
pub fn export_peft(tv: &TaskVector, dir: &Path, base_model_name_or_path: &str) -> Result<()> {
    match &tv.kind {
        Delta::Lora { config, factors } => export_peft_factors(config, factors, dir, base_model_name_or_path),
        Delta::Full(_) => Err(Error::msg(format!(
            "expected a LoRA task vector to export as a PEFT adapter to {}, found a full one",
            dir.display()
        ))),
    }
}

/// Writes LoRA factors (hetfed naming, `<module>.lora_A` / `<module>.lora_B`) as a PEFT adapter
/// directory: `adapter_config.json` and `adapter_model.safetensors` (f32). For a `LoraSet` pass
/// `&set.config, &set.to_tensors()`.
///
/// Every adapted module must match one of `config.targets` (PEFT would otherwise ignore its
/// factors when loading); with no targets, the module names themselves are written as targets.
pub fn export_peft_factors(
    config: &LoraConfig,
    factors: &TensorMap,
    dir: &Path,
    base_model_name_or_path: &str,
) -> Result<()> {
    let pairs = lora::pairs(config, factors)?;
    let targets: Vec<String> = if config.targets.is_empty() {
        pairs.iter().map(|p| p.module.to_string()).collect()
    } else {
        if let Some(p) = pairs.iter().find(|p| !config.matches(p.module)) {
            return Err(Error::msg(format!(
                "LoRA module `{}` matches none of the targets {:?}, so PEFT would drop its update",
                p.module, config.targets
            )));
        }
        config.targets.clone()
    };
    let mut weights = TensorMap::new();
    for p in &pairs {
        weights.insert(format!("{PREFIX}{}.lora_A.weight", p.module), p.a.clone());
        weights.insert(format!("{PREFIX}{}.lora_B.weight", p.module), p.b.clone());
    }
    // PEFT writes integral alphas as integers; keep that so the file looks like one of its own.
    let alpha = if config.alpha.fract() == 0.0 && config.alpha.abs() < 1e15 {
        json!(config.alpha as i64)
    } else {
        json!(config.alpha)
    };
    let cfg = json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": config.rank,
        "lora_alpha": alpha,
        "lora_dropout": config.dropout,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": false,
        "inference_mode": true,
        "base_model_name_or_path": base_model_name_or_path,
        "init_lora_weights": true,
        "use_rslora": false,
        "use_dora": false,
    });
    let cfg = serde_json::to_vec_pretty(&cfg).map_err(|e| Error::msg(format!("serialising {CONFIG_FILE}: {e}")))?;
    let mut meta = BTreeMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    hetfed_core::save_safetensors(&weights, DType::F32, &meta, &dir.join(WEIGHTS_FILE))?;
    hetfed_core::write_atomic(&dir.join(CONFIG_FILE), &cfg)
}

/// Reads a PEFT LoRA adapter directory into a config and factors in hetfed naming
/// (`<module>.lora_A` / `<module>.lora_B`, f32).
///
/// Missing `r` and `lora_alpha` take PEFT's defaults (8 and 8). Keys with the adapter name
/// `default` (`...lora_A.default.weight`) are accepted. Options that change the update's math
/// (`use_rslora`, `use_dora`, `fan_in_fan_out`, a `bias` other than "none", `rank_pattern`,
/// `alpha_pattern`) are errors naming the field, as is any tensor that is not a LoRA factor.
/// When `target_modules` is not a list (PEFT also allows a regex or "all-linear"), the targets are
/// the adapted modules' full names, which select exactly the same layers.
pub fn import_peft(dir: &Path) -> Result<(LoraConfig, TensorMap)> {
    let cfg_path = dir.join(CONFIG_FILE);
    let format_err = |msg: String| Error::Format { path: cfg_path.clone(), msg };
    let cfg: Value = serde_json::from_slice(&hetfed_core::read_file(&cfg_path)?)
        .map_err(|e| format_err(format!("expected JSON: {e}")))?;
    let cfg = cfg.as_object().ok_or_else(|| format_err("expected a JSON object".into()))?;
    let field = |k: &str| cfg.get(k).filter(|v| !v.is_null());

    if let Some(t) = field("peft_type") {
        if t.as_str() != Some("LORA") {
            return Err(format_err(format!("expected `peft_type` \"LORA\", found {t}")));
        }
    }
    for (key, why) in [
        ("use_rslora", "rsLoRA scales by alpha/sqrt(r)"),
        ("use_dora", "DoRA rescales the weight's magnitude"),
        ("fan_in_fan_out", "it stores the layers transposed"),
    ] {
        match field(key) {
            None | Some(Value::Bool(false)) => {}
            Some(Value::Bool(true)) => {
                return Err(format_err(format!(
                    "expected `{key}` false, found true: {why}, which hetfed does not support"
                )))
            }
            Some(v) => return Err(format_err(format!("expected `{key}` to be a boolean, found {v}"))),
        }
    }
    if let Some(b) = field("bias") {
        if b.as_str() != Some("none") {
            return Err(format_err(format!(
                "expected `bias` \"none\", found {b}: trained biases are not part of a LoRA task vector"
            )));
        }
    }
    for key in ["rank_pattern", "alpha_pattern"] {
        if let Some(v) = field(key) {
            if v.as_object().is_none_or(|o| !o.is_empty()) {
                return Err(format_err(format!(
                    "expected `{key}` to be empty, found {v}: per-module ranks and alphas are not supported"
                )));
            }
        }
    }
    let rank = match field("r") {
        None => 8,
        Some(v) => v
            .as_u64()
            .filter(|r| *r >= 1)
            .ok_or_else(|| format_err(format!("expected `r` to be a positive integer, found {v}")))?
            as usize,
    };
    let number = |key: &str, default: f64| -> Result<f64> {
        match field(key) {
            None => Ok(default),
            Some(v) => v.as_f64().ok_or_else(|| format_err(format!("expected `{key}` to be a number, found {v}"))),
        }
    };
    let alpha = number("lora_alpha", 8.0)?;
    let dropout = number("lora_dropout", 0.0)?;
    let listed_targets = match field("target_modules") {
        Some(Value::Array(items)) => Some(
            items
                .iter()
                .map(|t| {
                    t.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| format_err(format!("expected `target_modules` to hold strings, found {t}")))
                })
                .collect::<Result<Vec<_>>>()?,
        ),
        _ => None,
    };

    let weights_path = dir.join(WEIGHTS_FILE);
    if !weights_path.exists() && dir.join("adapter_model.bin").exists() {
        return Err(Error::Format {
            path: dir.join("adapter_model.bin"),
            msg: format!("expected {WEIGHTS_FILE}, found a pickled adapter; re-save it with safe_serialization=True"),
        });
    }
    let (raw, _) = hetfed_core::load_safetensors(&weights_path)?;
    let mut factors = TensorMap::new();
    for (key, t) in raw {
        let name = hetfed_name(&key).ok_or_else(|| Error::Format {
            path: weights_path.clone(),
            msg: format!(
                "expected LoRA factors named `base_model.model.<module>.lora_A.weight` or `.lora_B.weight`, found `{key}`"
            ),
        })?;
        if factors.insert(name, t).is_some() {
            return Err(Error::Format {
                path: weights_path.clone(),
                msg: format!("`{key}` duplicates another factor of the same module"),
            });
        }
    }
    let modules = || factors.keys().filter_map(|k| k.strip_suffix(".lora_A")).map(str::to_string);
    let targets = listed_targets.unwrap_or_else(|| modules().collect());
    let config = LoraConfig { rank, alpha, dropout, targets };
    lora::pairs(&config, &factors).map_err(|e| Error::Format { path: weights_path.clone(), msg: e.to_string() })?;
    Ok((config, factors))
}

/// `base_model.model.<m>.lora_A[.default].weight` -> `<m>.lora_A` (and likewise for `B`).
fn hetfed_name(key: &str) -> Option<String> {
    let rest = key.strip_prefix(PREFIX).unwrap_or(key);
    let rest = rest.strip_suffix(".weight")?;
    let rest = rest.strip_suffix(".default").unwrap_or(rest);
    ["lora_A", "lora_B"].iter().find_map(|f| {
        let module = rest.strip_suffix(f)?.strip_suffix('.')?;
        (!module.is_empty()).then(|| format!("{module}.{f}"))
    })
}
