//! Transporting updates with fitted maps: dense updates, LoRA factors, bias vectors, and the
//! truncated SVD that cuts a dense result back to low rank.

use candle_core::{DType, Tensor};
use hetfed_core::{Error, Result};
use nalgebra::DMatrix;

use crate::convert::{
    dims2, expect_shape, matrix_f64_to_tensor, matrix_to_tensor, tensor_to_matrix, tensor_to_matrix_f64, thin_svd,
};
use crate::map::Map;

/// `dW_l = T_out·dW_s·T_in^T`: a dense update `dw_s` (`[o_s, i_s]`) of a linear layer `y = W·x`
/// of the small model, moved to the large model's layer (`[o_l, i_l]`). `t_out` maps the layer's
/// output space (`[o_l, o_s]`), `t_in` its input space (`[i_l, i_s]`).
///
/// Why: if `x_s ≈ T_in^T·x_l` and `y_l ≈ T_out·y_s` (semi-orthogonal maps), the small layer's
/// change of output `dW_s·x_s` seen in the large space is `T_out·dW_s·T_in^T·x_l`.
///
/// Computed in f32 with candle on `dw_s`'s device, multiplying in whichever order is cheaper;
/// the result has `dw_s`'s dtype. Centring means of the maps play no part.
pub fn project_full(dw_s: &Tensor, t_out: &Map, t_in: &Map) -> Result<Tensor> {
    let where_ = "project_full (dW_s must be [t_out.d_small, t_in.d_small])";
    expect_shape(dw_s, "dW_s", &[t_out.d_small(), t_in.d_small()], where_)?;
    let dev = dw_s.device();
    let dw = dw_s.to_dtype(DType::F32)?;
    let to = t_out.to_tensor(dev)?;
    let ti_t = matrix_to_tensor(&t_in.matrix().transpose(), dev)?;
    let (o_l, o_s, i_s, i_l) = (t_out.d_large(), t_out.d_small(), t_in.d_small(), t_in.d_large());
    // (T_out·dW)·T_in^T costs o_l·o_s·i_s + o_l·i_s·i_l; T_out·(dW·T_in^T) costs o_s·i_s·i_l + o_l·o_s·i_l.
    let left_first = o_l * o_s * i_s + o_l * i_s * i_l <= o_s * i_s * i_l + o_l * o_s * i_l;
    let out = if left_first { to.matmul(&dw)?.matmul(&ti_t)? } else { to.matmul(&dw.matmul(&ti_t)?)? };
    Ok(out.to_dtype(dw_s.dtype())?)
}

/// LoRA factors moved to the large model without ever forming `B·A`: `B' = T_out·B`
/// (`[o_l, r]`) and `A' = A·T_in^T` (`[r, i_l]`), so `B'·A' = T_out·(B·A)·T_in^T` exactly and the
/// rank stays `r` (at most). `b` is `[o_s, r]`, `a` is `[r, i_s]`; the results have their dtypes.
pub fn project_lora(b: &Tensor, a: &Tensor, t_out: &Map, t_in: &Map) -> Result<(Tensor, Tensor)> {
    let (o_s, r) = dims2(b, "lora B")?;
    let (r_a, i_s) = dims2(a, "lora A")?;
    if o_s != t_out.d_small() {
        return Err(crate::convert::shape_err(
            "lora B",
            &[t_out.d_small(), r],
            &[o_s, r],
            "project_lora (B must be [t_out.d_small, r])",
        ));
    }
    if r_a != r || i_s != t_in.d_small() {
        return Err(crate::convert::shape_err(
            "lora A",
            &[r, t_in.d_small()],
            &[r_a, i_s],
            "project_lora (A must be [r, t_in.d_small] with B's r)",
        ));
    }
    // With the maps as they are (no tensor copy of a map, no transpose of one: at real widths a
    // map is up to `[16384, 4096]`): `T_out·B`, and `A·T_in^T = (T_in·A^T)^T` with `A` small.
    let b2 = t_out.matrix() * tensor_to_matrix(b, "lora B")?;
    let a2 = (t_in.matrix() * tensor_to_matrix(a, "lora A")?.transpose()).transpose();
    let b2 = matrix_to_tensor(&b2, b.device())?.to_dtype(b.dtype())?;
    let a2 = matrix_to_tensor(&a2, a.device())?.to_dtype(a.dtype())?;
    Ok((b2, a2))
}

/// A bias update `db` (`[o_s]`) moved to the large model: `T_out·db` (`[o_l]`), with `db`'s
/// dtype. Also right for LayerNorm gains and biases, which live in the residual space.
pub fn project_vector(db: &Tensor, t_out: &Map) -> Result<Tensor> {
    expect_shape(db, "db", &[t_out.d_small()], "project_vector (db must be [t_out.d_small])")?;
    let col = db.to_dtype(DType::F32)?.unsqueeze(1)?;
    let out = t_out.to_tensor(db.device())?.matmul(&col)?.squeeze(1)?;
    Ok(out.to_dtype(db.dtype())?)
}

/// Best rank-`r` approximation of `m` (`[o, i]`, Eckart–Young) as LoRA-shaped factors
/// `(B [o, r], A [r, i])` with `B·A = U_r·S_r·V_r^T`; the singular values are split as `sqrt(S)`
/// into both factors, so the two have equal norms. The Frobenius error is
/// `sqrt(sum of the dropped singular values squared)`. `1 <= r <= min(o, i)`.
///
/// Computed in f64 with faer's SVD on the CPU (cost `O(o·i·min(o, i))`); the factors are f32
/// on `m`'s device.
pub fn truncated_svd(m: &Tensor, r: usize) -> Result<(Tensor, Tensor)> {
    let (o, i) = dims2(m, "m")?;
    if r == 0 || r > o.min(i) {
        return Err(Error::msg(format!(
            "truncated_svd: expected a rank in 1..={} for a [{o}, {i}] matrix, found {r}",
            o.min(i)
        )));
    }
    let (u, sv, v_t) = thin_svd(&tensor_to_matrix_f64(m, "m")?, "m")?;
    let mut b: DMatrix<f64> = u.columns(0, r).into_owned();
    let mut a: DMatrix<f64> = v_t.rows(0, r).into_owned();
    for (k, s) in sv.iter().take(r).enumerate() {
        let root = s.max(0.0).sqrt();
        b.column_mut(k).scale_mut(root);
        a.row_mut(k).scale_mut(root);
    }
    Ok((matrix_f64_to_tensor(&b, m.device())?, matrix_f64_to_tensor(&a, m.device())?))
}

/// The best rank-`k` approximation of a factored matrix `B·A` (`b: [o, r]`, `a: [r, i]`), as
/// factors `(B' [o, k'], A' [k', i])` with `k' = min(k, r)`, and the Frobenius norm of what was
/// dropped, `‖B·A - B'·A'‖`. Never forms `B·A`: `B = Q_b·R_b` and `A^T = Q_a·R_a` (thin QRs),
/// the SVD of the `[r, r]` core `R_b·R_a^T = U·S·V^T`, then `B' = Q_b·U_k·S_k` and
/// `A' = V_k^T·Q_a^T` (rows of `A'` orthonormal). With `k >= r` nothing is dropped and `B'·A'`
/// equals `B·A` up to rounding. f64 on the CPU; the factors come back f32 on `b`'s device.
pub fn recompress_factors(b: &Tensor, a: &Tensor, k: usize) -> Result<(Tensor, Tensor, f64)> {
    let (o, r) = dims2(b, "b")?;
    let (ra, i) = dims2(a, "a")?;
    if ra != r || r == 0 || k == 0 {
        return Err(Error::msg(format!(
            "recompress_factors: expected b [o, r], a [r, i] with r >= 1 and a rank k >= 1, found {:?}, {:?}, k = {k}",
            b.dims(),
            a.dims()
        )));
    }
    let qr_b = tensor_to_matrix_f64(b, "b")?.qr();
    let qr_a = tensor_to_matrix_f64(a, "a")?.transpose().qr();
    let core = qr_b.r() * qr_a.r().transpose();
    let (u, sv, v_t) = thin_svd(&core, "R_b R_a^T")?;
    let keep = k.min(sv.len());
    let dropped = sv[keep..].iter().map(|s| s * s).sum::<f64>().sqrt();
    let mut us = u.columns(0, keep).into_owned();
    for (c, s) in sv.iter().take(keep).enumerate() {
        us.column_mut(c).scale_mut(*s);
    }
    let b2 = qr_b.q() * us;
    let a2 = v_t.rows(0, keep) * qr_a.q().transpose();
    debug_assert_eq!((b2.nrows(), a2.ncols()), (o, i));
    Ok((matrix_f64_to_tensor(&b2, b.device())?, matrix_f64_to_tensor(&a2, b.device())?, dropped))
}

/// Singular values of a matrix, descending (f64 thin SVD on the CPU).
pub fn singular_values(m: &Tensor) -> Result<Vec<f64>> {
    Ok(thin_svd(&tensor_to_matrix_f64(m, "m")?, "m")?.1)
}

/// Numerical rank: the number of singular values above `rel_tol` times the largest.
pub fn numerical_rank(m: &Tensor, rel_tol: f64) -> Result<usize> {
    let sv = singular_values(m)?;
    let max = sv.first().copied().unwrap_or(0.0);
    Ok(sv.iter().filter(|&&s| s > rel_tol * max && s > 0.0).count())
}

/// Depth pairing: for each large layer `j` in `0..l_large`, the small layer
/// `round(j·(l_small-1)/(l_large-1))` (halves round up); `[0]` when `l_large = 1`. First and last
/// layers always pair with each other. Errors when `l_small = 0` and `l_large > 0`.
pub fn pair_layers(l_small: usize, l_large: usize) -> Result<Vec<usize>> {
    if l_large == 0 {
        return Ok(Vec::new());
    }
    if l_small == 0 {
        return Err(Error::msg(format!(
            "pair_layers: expected at least 1 small layer for {l_large} large layers, found 0"
        )));
    }
    if l_large == 1 {
        return Ok(vec![0]);
    }
    // Exact integer rounding: round(p/q) = floor((2p + q) / 2q).
    let q = (l_large - 1) as u128;
    Ok((0..l_large)
        .map(|j| {
            let p = j as u128 * (l_small - 1) as u128;
            ((2 * p + q) / (2 * q)) as usize
        })
        .collect())
}
