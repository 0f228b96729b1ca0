//! Moving a small BLOOM model's task vector into a larger BLOOM model's weight space.
//!
//! The two models were pretrained separately (the embedded `base-small` / `base-large` pair, or
//! `bloom-560m` / `bloom-7b1`) and share a tokenizer, so their coordinates do not line up but
//! their inputs do. This crate:
//!
//! 1. runs both *base* models on calibration token sequences the server owns or samples from its
//!    own model ([`calibration`]; never client data) and records, per block, the spaces every
//!    linear layer reads and writes ([`hetfed_model::bloom::BlockActivations`]);
//! 2. fits, per large layer `j` paired with small layer `i(j) = round(j·(L_s-1)/(L_l-1))`, linear
//!    maps between those spaces by one [`Method`] (ridge, Procrustes, the data-free weight-space
//!    fit, or the random-orthogonal / identity controls), with explained variance on held-out
//!    calibration tokens and fit time per layer ([`PairMaps::fit`]). Both models are walked one
//!    block at a time and each layer's maps come from f64 sufficient statistics of that layer's
//!    activations ([`hetfed_project::Moments`]), so memory does not grow with depth;
//!    [`PairMaps::fit_in_memory`] computes the same from every block's activations at once
//!    ([`capture`]) and is kept as the reference;
//! 3. caches them on disk keyed by both models' identities and the fit's settings
//!    ([`PairMaps::load_or_fit`]), so they are computed once per pair: one file per large layer,
//!    written as the fit goes and read when that layer is projected, so neither the fit nor a
//!    projection holds more than one layer's maps (at bloom-560m → bloom-7b1 widths all maps
//!    together are ≈ 11 GiB);
//! 4. projects task vectors ([`PairMaps::project`]): a LoRA update stays LoRA with its rank,
//!    `(T_out·B)·(A·T_in^T)`; a dense update becomes `T_out·dW·T_in^T`.
//!
//! # Which map serves which layer
//!
//! | module | reads (`T_in`) | writes (`T_out`) |
//! |---|---|---|
//! | `self_attention.query_key_value` | `input_layernorm` output | queries, keys, values: three maps, split per part from BLOOM's per-head interleaved rows |
//! | `self_attention.dense` | attention context | residual stream |
//! | `mlp.dense_h_to_4h` | `post_attention_layernorm` output | MLP hidden units: the map fitted on the GELU output (elementwise, so the same coordinates), which spans the whole space where pre-activations span at most the hidden size |
//! | `mlp.dense_4h_to_h` | GELU output | residual stream |
//!
//! Spaces that activations do not span leave a map free in the missing directions: LayerNorm
//! outputs, and so queries, keys, values and attention contexts, are centred across
//! coordinates and span one dimension less than their width. A fitted map is exact on what the
//! models compute; an update's component along such a direction is transported arbitrarily.
//!
//! Heads are never paired by index (ALiBi slopes depend on the head count): queries, keys and
//! values are each mapped as one space. Biases go through `T_out`. Embedding rows (the tied LM
//! head too) go through the map of the residual stream entering block 0, which the shared
//! tokenizer makes meaningful. LayerNorm gains and biases are elementwise, which a rotation
//! cannot preserve, so their updates are dropped and the dropped norm is reported
//! ([`ProjectReport::dropped`]). LoRA (hetfed's default) never touches them.
//!
//! Only BLOOM is supported; other architectures get a clear error.

mod calibration;
mod fit;
mod maps;
mod projection;
mod reference;
mod store;

#[cfg(test)]
mod tests;

pub use calibration::{capture, sample_sequences, text_sequences, Activations, Space};
pub use maps::{FitSummary, LayerFit, MapConfig, Method, ModuleMaps, PairMaps, MODULES};
pub use projection::{ProjectReport, ProjectedModule};
pub use store::LayerMaps;
