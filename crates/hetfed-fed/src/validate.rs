//! Checks an uploaded update before it may reach aggregation: it decodes as a task vector, and
//! then passes the one validation every task vector passes before it touches a model,
//! [`TaskVector::validate`] (made from the round's model, only parameters of that model with
//! their shapes, finite values, norm under the configured bound), which `hetfed taskvec apply`
//! runs too. Each failure is one sentence naming what was expected and what was found.

use hetfed_core::TensorMap;
use hetfed_model::ModelIdentity;
use hetfed_taskvec::TaskVector;

/// Decodes and validates an update; returns its dense delta and global norm, or the reason it
/// is refused.
pub fn validate_update(
    bytes: &[u8],
    expected_base: &ModelIdentity,
    global: &TensorMap,
    max_norm: f64,
) -> Result<(TaskVector, f64), String> {
    let tv = TaskVector::from_bytes(bytes, std::path::Path::new("<upload>"))
        .map_err(|e| format!("expected a hetfed task vector: {e}"))?;
    let norm = tv.validate_norm(expected_base, global, "the round's model", max_norm).map_err(|e| e.to_string())?;
    Ok((tv, norm))
}
