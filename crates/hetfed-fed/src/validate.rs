//! Checks an uploaded update before it may reach aggregation: it was made from the round's
//! model, names only parameters of that model with their shapes, holds finite values, and its
//! norm is under the configured bound. Each failure is one sentence naming what was expected
//! and what was found.

use hetfed_core::TensorMap;
use hetfed_model::ModelIdentity;
use hetfed_taskvec::TaskVector;

use crate::strategy::all_finite;

/// Decodes and validates an update; returns its dense delta and global norm, or the reason it
/// is refused.
pub fn validate_update(bytes: &[u8], expected_base: &ModelIdentity, global: &TensorMap, max_norm: f64) -> Result<(TaskVector, TensorMap, f64), String> {
    let tv = TaskVector::from_bytes(bytes, std::path::Path::new("<upload>")).map_err(|e| format!("expected a hetfed task vector: {e}"))?;
    if &tv.base != expected_base {
        return Err(format!("expected an update of the round's model {expected_base}, found one of {}", tv.base));
    }
    let delta = tv.materialize().map_err(|e| format!("expected LoRA factors that multiply out: {e}"))?;
    if delta.is_empty() {
        return Err("expected at least one updated parameter, found none".into());
    }
    let mut sq = 0.0;
    for (name, d) in &delta {
        let w = global.get(name).ok_or_else(|| format!("parameter `{name}` is not a parameter of the round's model"))?;
        if w.dims() != d.dims() {
            return Err(format!("parameter `{name}`: expected shape {:?}, found {:?}", w.dims(), d.dims()));
        }
        if !all_finite(d).map_err(|e| e.to_string())? {
            return Err(format!("parameter `{name}`: expected finite values, found NaN or infinity"));
        }
        sq += hetfed_core::sq_norm(d).map_err(|e| e.to_string())?;
    }
    let norm = sq.sqrt();
    if norm > max_norm {
        return Err(format!("expected an update norm <= {max_norm}, found {norm:.4}"));
    }
    Ok((tv, delta, norm))
}
