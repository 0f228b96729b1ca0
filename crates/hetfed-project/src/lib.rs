//! The linear algebra of moving a small model's update into a larger model's weight space.
//!
//! The two models were pretrained separately, so their coordinates do not line up: a map between
//! their spaces has to be fitted before a small client's task vector can be added to the large
//! server model. This crate fits such maps and applies them; it knows nothing about models,
//! layer names or federation, and it does no I/O.
//!
//! # Maps
//!
//! A [`Map`] is a matrix `T` of shape `[d_large, d_small]` with `x_l ≈ T·x_s`: a vector of the
//! small space (a residual-stream state, the input of an MLP down-projection, a query vector...)
//! goes to the corresponding vector of the large space. Maps are fitted per paired layer and per
//! space from *paired activations* `X_s` (`[n, d_small]`) and `X_l` (`[n, d_large]`), the two
//! models run on the same calibration text (the server's own; no client data):
//!
//! | map | formula | when |
//! |---|---|---|
//! | [`fit_ridge`] | `T = X_l^T·X_s·(X_s^T·X_s + λI)^{-1}` | unconstrained least squares; can rescale and shear, so it absorbs different activation scales, but overfits with few samples. R² reported. |
//! | [`fit_procrustes`] | `T = U·V^T`, `X_l^T·X_s = U·S·V^T` | best semi-orthogonal map (`T^T·T = I`): keeps norms and angles, so a transported update keeps its size. The default of Theseus/Ariadne-style transport. |
//! | [`random_orthogonal`] | QR of a Gaussian matrix | the control: same norms as Procrustes, unrelated directions. Every fitted map must beat it on held-out pairs ([`Map::explained_variance`]). |
//! | [`Map::identity`] | `[I; 0]` | the control "coordinates already agree". |
//! | [`fit_weight_space`] | ALS for `A·W_s·B^T ≈ W_l` | data-free (LiGO-style): fits an output map `A` and an input map `B` from the weights alone; exact for grown models, approximate for independent ones. |
//!
//! [`Moments`] accumulates, batch by batch in f64, what the ridge and Procrustes fits need
//! (column sums, the centred cross products `X_l^T·X_s` and Gram matrix `X_s^T·X_s`) and fits
//! the same maps from them (as with [`Centring::Mean`], linear part only), so that activations
//! too large to hold at once can be fitted; R² on the fitted rows comes from the same sums.
//!
//! [`Centring::Mean`] fits the affine map `x_l ≈ T·(x_s - mu_s) + mu_l`; the means matter for
//! [`Map::apply`] and R² only, never for projecting an update (an update is a difference, so
//! constant offsets cancel).
//!
//! # Projecting updates
//!
//! For a linear layer `y = W·x` with output space mapped by `T_out` (`[o_l, o_s]`) and input space
//! by `T_in` (`[i_l, i_s]`):
//!
//! - dense update: [`project_full`], `dW_l = T_out·dW_s·T_in^T`;
//! - LoRA update `B·A`: [`project_lora`], `(T_out·B)·(A·T_in^T)`, still rank `r`, never densified;
//! - bias (and LayerNorm) update: [`project_vector`], `db_l = T_out·db_s`;
//! - a dense result (e.g. from a ridge map) cut back to LoRA rank `r`: [`truncated_svd`];
//! - depth: large layer `j` takes the update of small layer `round(j·(L_s-1)/(L_l-1))`
//!   ([`pair_layers`]).
//!
//! For semi-orthogonal maps projecting and projecting back with the transposes is the identity
//! (`T^T·T = I`), so no information of the small update is lost on the way up.
//!
//! # Fused QKV
//!
//! A fused attention input projection stacks three output spaces (queries, keys, values) that
//! need three different output maps. Split its rows, project Q, K and V separately with their own
//! `T_out` (and the shared `T_in` of the attention input), and join the results:
//! [`split_rows`] / [`split_rows_sizes`] / [`concat_rows`] for the stacked `[Q; K; V]` layout and
//! [`split_rows_interleaved`] / [`concat_rows_interleaved`] for BLOOM's per-head
//! `[head, (q|k|v), head_dim]` row order. For LoRA only `B` (the factor on the output side) is
//! split; `A` is shared by the three parts. Heads cannot be paired by index across models (ALiBi
//! slopes depend on the head count), which is why Q, K and V are each mapped as one space.
//!
//! # Numerics
//!
//! Fits and decompositions run in f64 with nalgebra on the CPU; maps are stored in f32. Updates
//! are projected in f32 with candle on the update's device and returned in its dtype. Bad input
//! (wrong shapes, NaN, empty dimensions) is an [`hetfed_core::Error`] naming what was expected and
//! what was found, never a panic.

mod convert;
mod map;
mod moments;
mod project;
mod rows;
mod weight_space;

#[cfg(test)]
mod tests;

pub use convert::{matrix_f64_to_tensor, matrix_to_tensor, tensor_to_matrix, tensor_to_matrix_f64, tensor_to_vector};
pub use map::{fit_procrustes, fit_ridge, random_orthogonal, Centring, FitReport, Map, MapKind};
pub use moments::Moments;
pub use project::{
    numerical_rank, pair_layers, project_full, project_lora, project_vector, recompress_factors, singular_values,
    truncated_svd,
};
pub use rows::{concat_rows, concat_rows_interleaved, split_rows, split_rows_interleaved, split_rows_sizes};
pub use weight_space::{fit_weight_space, WeightFitInit, WeightFitOptions, WeightFitReport, WeightSpaceFit};

/// Re-exported so that callers can name the matrix type of [`Map::matrix`] without depending on
/// nalgebra themselves.
pub use nalgebra;
