//! Data-free fit of a pair of maps from paired weight matrices, in the spirit of LiGO
//! (2303.00980): find `A` (`[o_l, o_s]`, the output map) and `B` (`[i_l, i_s]`, the input map) so
//! that `A·W_s·B^T ≈ W_l` for every pair, by alternating ridge least squares.

use std::time::Instant;

use candle_core::Tensor;
use hetfed_core::{Error, Result};
use nalgebra::DMatrix;
use serde::{Deserialize, Serialize};

use crate::convert::{
    dims2, ensure_finite, ensure_nonempty, polar_factor, shape_err, solve_right_spd, svd, tensor_to_matrix_f64,
};
use crate::map::{Map, MapKind};

/// Settings of [`fit_weight_space`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct WeightFitOptions {
    /// Alternating iterations; each updates `A` then `B`.
    pub iterations: usize,
    /// Ridge on both maps, in the units of the summed squared error. Besides conditioning the
    /// solves, it settles the scale ambiguity `A·c, B/c`.
    pub lambda: f64,
    /// Where the alternation starts.
    pub init: WeightFitInit,
}

impl Default for WeightFitOptions {
    fn default() -> Self {
        Self { iterations: 50, lambda: 1e-6, init: WeightFitInit::Spectral }
    }
}

/// Starting point of [`fit_weight_space`]. The problem is bilinear, so alternation finds a local
/// minimum only: where it starts matters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WeightFitInit {
    /// Matches principal directions, Procrustes-like: `A = U_l·diag(a)·U_s^T` with `U_s`, `U_l`
    /// the leading left singular vectors of the side-by-side weights `[W^1, W^2, ...]` of each
    /// model (eigenvectors of `sum W·W^T`), `B` likewise from `sum W^T·W`, and the signs `a`, `b`
    /// chosen to agree best with the pairs. Exact when `W_l = A0·W_s·B0^T` with semi-orthogonal
    /// `A0`, `B0` and distinct singular values.
    Spectral,
    /// `B = [I; 0]` (identity-padded) and `A` the orthogonal Procrustes solution given that `B`
    /// (polar factor of `sum W_l·B·W_s^T`): assumes input coordinates already line up.
    IdentityPadded,
}

/// What [`fit_weight_space`] achieved.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WeightFitReport {
    /// Relative error `sqrt(sum ||A·W_s·B^T - W_l||² / sum ||W_l||²)` of the initial maps.
    pub initial_error: f64,
    /// Relative error after each iteration. The ridge objective never increases from one
    /// iteration to the next, so with a small `lambda` neither does this.
    pub errors: Vec<f64>,
    /// Number of weight pairs.
    pub n_pairs: usize,
    /// Wall-clock seconds.
    pub seconds: f64,
}

/// The two maps of a weight-space fit.
#[derive(Debug, Clone)]
pub struct WeightSpaceFit {
    /// `A`, `[o_l, o_s]`: maps the small output space into the large one (`T_out`).
    pub out_map: Map,
    /// `B`, `[i_l, i_s]`: maps the small input space into the large one (`T_in`).
    pub in_map: Map,
    pub report: WeightFitReport,
}

/// Fits `A`, `B` with `A·W_s^k·B^T ≈ W_l^k` for every pair `k` (`ws[k]` is `[o_s, i_s]`, `wl[k]`
/// is `[o_l, i_l]`, all pairs alike) by minimising
/// `sum_k ||A·W_s^k·B^T - W_l^k||² + lambda·(||A||² + ||B||²)` alternately:
///
/// - `A = (sum W_l·P^T)·(sum P·P^T + lambda·I)^{-1}` with `P = W_s·B^T`,
/// - `B = (sum W_l^T·Q)·(sum Q^T·Q + lambda·I)^{-1}` with `Q = A·W_s`.
///
/// Each step solves its half exactly, so the objective never increases. The start is chosen by
/// [`WeightFitOptions::init`]; from a poor start (e.g. [`WeightFitInit::IdentityPadded`] when the
/// input coordinates are in fact rotated) the alternation can stall in a local minimum.
///
/// Data-free (weights only), so it needs no calibration text, but it assumes the two models'
/// weights are related by one pair of maps for all the pairs given, which holds for a grown model
/// (LiGO, bert2BERT) and only loosely for independently pretrained ones.
pub fn fit_weight_space(ws: &[Tensor], wl: &[Tensor], opts: &WeightFitOptions) -> Result<WeightSpaceFit> {
    let start = Instant::now();
    if ws.is_empty() || ws.len() != wl.len() {
        return Err(Error::msg(format!(
            "fit_weight_space: expected equally many small and large weights (at least 1), found {} and {}",
            ws.len(),
            wl.len()
        )));
    }
    if !(opts.lambda.is_finite() && opts.lambda >= 0.0) {
        return Err(Error::msg(format!("fit_weight_space: expected a finite lambda >= 0, found {}", opts.lambda)));
    }
    let (o_s, i_s) = dims2(&ws[0], "ws[0]")?;
    let (o_l, i_l) = dims2(&wl[0], "wl[0]")?;
    ensure_nonempty(o_s, i_s, "ws[0]")?;
    ensure_nonempty(o_l, i_l, "wl[0]")?;
    let read = |t: &Tensor, name: String, shape: [usize; 2]| -> Result<DMatrix<f64>> {
        if t.dims() != shape {
            return Err(shape_err(&name, &shape, t.dims(), "fit_weight_space (all pairs must have one shape)"));
        }
        let m = tensor_to_matrix_f64(t, &name)?;
        ensure_finite(&m, &name)?;
        Ok(m)
    };
    let small: Vec<DMatrix<f64>> =
        ws.iter().enumerate().map(|(k, t)| read(t, format!("ws[{k}]"), [o_s, i_s])).collect::<Result<_>>()?;
    let large: Vec<DMatrix<f64>> =
        wl.iter().enumerate().map(|(k, t)| read(t, format!("wl[{k}]"), [o_l, i_l])).collect::<Result<_>>()?;
    let total: f64 = large.iter().map(|w| w.norm_squared()).sum();
    let rel_err = |a: &DMatrix<f64>, b: &DMatrix<f64>| -> f64 {
        let res: f64 = small.iter().zip(&large).map(|(s, l)| (a * s * b.transpose() - l).norm_squared()).sum();
        if total == 0.0 {
            if res == 0.0 {
                0.0
            } else {
                f64::INFINITY
            }
        } else {
            (res / total).sqrt()
        }
    };

    let (mut a, mut b) = match opts.init {
        WeightFitInit::Spectral => spectral_init(&small, &large)?,
        WeightFitInit::IdentityPadded => {
            let b = DMatrix::<f64>::identity(i_l, i_s);
            let m: DMatrix<f64> = small.iter().zip(&large).map(|(s, l)| l * &b * s.transpose()).sum();
            (polar_factor(m, "sum W_l B W_s^T")?.map(f64::from), b)
        }
    };
    let initial_error = rel_err(&a, &b);

    let lambda = opts.lambda;
    let mut errors = Vec::with_capacity(opts.iterations);
    for _ in 0..opts.iterations {
        // A-step: P_k = W_s B^T.
        let mut num = DMatrix::<f64>::zeros(o_l, o_s);
        let mut gram = DMatrix::<f64>::identity(o_s, o_s) * lambda;
        for (s, l) in small.iter().zip(&large) {
            let p = s * b.transpose();
            num += l * p.transpose();
            gram += &p * p.transpose();
        }
        a = solve_right_spd(gram, &num, "sum P P^T + lambda I")?;
        // B-step: Q_k = A W_s.
        let mut num = DMatrix::<f64>::zeros(i_l, i_s);
        let mut gram = DMatrix::<f64>::identity(i_s, i_s) * lambda;
        for (s, l) in small.iter().zip(&large) {
            let q = &a * s;
            num += l.tr_mul(&q);
            gram += q.tr_mul(&q);
        }
        b = solve_right_spd(gram, &num, "sum Q^T Q + lambda I")?;
        errors.push(rel_err(&a, &b));
    }

    Ok(WeightSpaceFit {
        out_map: Map::with_kind(a.map(|v| v as f32), MapKind::WeightSpace)?,
        in_map: Map::with_kind(b.map(|v| v as f32), MapKind::WeightSpace)?,
        report: WeightFitReport { initial_error, errors, n_pairs: ws.len(), seconds: start.elapsed().as_secs_f64() },
    })
}

/// The [`WeightFitInit::Spectral`] start: semi-orthogonal `A`, `B` matching the principal output
/// and input directions of the two models, with signs fitted to the pairs.
fn spectral_init(small: &[DMatrix<f64>], large: &[DMatrix<f64>]) -> Result<(DMatrix<f64>, DMatrix<f64>)> {
    let (o_s, i_s) = small[0].shape();
    let (o_l, i_l) = large[0].shape();
    let us = left_basis(small, false)?;
    let ul = left_basis(large, false)?;
    let vs = left_basis(small, true)?;
    let vl = left_basis(large, true)?;
    let m_o = us.ncols().min(ul.ncols());
    let m_i = vs.ncols().min(vl.ncols());
    let (us, ul) = (us.columns(0, m_o), ul.columns(0, m_o));
    let (vs, vl) = (vs.columns(0, m_i), vl.columns(0, m_i));
    // In the matched bases W_l ≈ diag(a)·W_s·diag(b) entrywise: score each sign pattern by the
    // agreement C = sum_k (U_l^T W_l V_l) ∘ (U_s^T W_s V_s), maximise a^T·C·b.
    let mut c = DMatrix::<f64>::zeros(m_o, m_i);
    for (s, l) in small.iter().zip(large) {
        let ms = us.transpose() * s * vs;
        let ml = ul.transpose() * l * vl;
        c += ms.component_mul(&ml);
    }
    let sign = |x: f64| if x < 0.0 { -1.0 } else { 1.0 };
    let first = svd(c.clone(), "sign agreement")?;
    let u0 = first.u.as_ref().ok_or_else(|| Error::msg("SVD returned no U"))?;
    let mut a_sign = u0.column(0).map(sign);
    let mut b_sign = (c.transpose() * &a_sign).map(sign);
    for _ in 0..20 {
        let a_new = (&c * &b_sign).map(sign);
        let b_new = (c.transpose() * &a_new).map(sign);
        let done = a_new == a_sign && b_new == b_sign;
        (a_sign, b_sign) = (a_new, b_new);
        if done {
            break;
        }
    }
    let a = ul * DMatrix::from_diagonal(&a_sign) * us.transpose();
    let b = vl * DMatrix::from_diagonal(&b_sign) * vs.transpose();
    debug_assert_eq!((a.shape(), b.shape()), ((o_l, o_s), (i_l, i_s)));
    Ok((a, b))
}

/// Left singular vectors, by decreasing singular value, of the matrices side by side
/// (`[W^1, W^2, ...]`), or of their transposes side by side when `transposed`.
fn left_basis(mats: &[DMatrix<f64>], transposed: bool) -> Result<DMatrix<f64>> {
    let blocks: Vec<DMatrix<f64>> = mats.iter().map(|m| if transposed { m.transpose() } else { m.clone() }).collect();
    let rows = blocks[0].nrows();
    let cols = blocks[0].ncols();
    let mut side = DMatrix::<f64>::zeros(rows, cols * blocks.len());
    for (k, b) in blocks.iter().enumerate() {
        side.columns_mut(k * cols, cols).copy_from(b);
    }
    let s = svd(side, "stacked weights")?;
    s.u.ok_or_else(|| Error::msg("SVD returned no U"))
}
