//! [`Moments`]: the sufficient statistics of paired activations, accumulated batch by batch, and
//! the fits [`fit_ridge`](crate::fit_ridge) and [`fit_procrustes`](crate::fit_procrustes) compute
//! from them, so that a fit never holds all its activations at once.

use candle_core::{DType, Tensor};
use hetfed_core::{Error, Result};
use nalgebra::{DMatrix, DVector};

use crate::convert::{dims2, ensure_finite, shape_err};
use crate::map::{procrustes_matrix, ridge_matrix, Map, MapKind};

/// Sums over the rows of paired activations `X_s` (`[n, d_small]`) and `X_l` (`[n, d_large]`),
/// in f64: column sums, `Σ|x_l|²`, and, when asked for, the cross products `X_l^T·X_s` (what
/// Procrustes and ridge need) and `X_s^T·X_s` (ridge, and R² on the fitted rows).
///
/// Rows are shifted by the first batch's column means before they are multiplied, so that the
/// centred products come out without the cancellation that large constant offsets (residual
/// streams) would cause. The centred statistics equal those of the stacked, mean-centred
/// activations up to rounding.
#[derive(Debug, Clone)]
pub struct Moments {
    d_small: usize,
    d_large: usize,
    n: usize,
    /// Shifts `(s, t)`, `[1, d]` f64, from the first batch.
    shift: Option<(Tensor, Tensor)>,
    /// `Σ (x_s - s)`, `Σ (x_l - t)`: `[1, d]` f64.
    sum_s: Option<Tensor>,
    sum_l: Option<Tensor>,
    /// `Σ |x_s - s|²`, `Σ |x_l - t|²`.
    sq_s: f64,
    sq_l: f64,
    /// `Σ (x_l - t)(x_s - s)^T`, `[d_large, d_small]`.
    cross: Option<DMatrix<f64>>,
    /// `Σ (x_s - s)(x_s - s)^T`, `[d_small, d_small]`.
    gram: Option<DMatrix<f64>>,
    want_cross: bool,
    want_gram: bool,
}

fn add_into(acc: &mut Option<Tensor>, t: Tensor) -> Result<()> {
    *acc = Some(match acc.take() {
        None => t,
        Some(a) => (a + t)?,
    });
    Ok(())
}

/// Rows added at a time by [`Moments::add`].
const ADD_ROWS: usize = 256;

/// Elements of one block of a product added by [`add_product`] (32 MiB of f64).
const PRODUCT_BLOCK: usize = 1 << 22;

/// `acc += a^T·b` for f64 `a: [n, r]` and `b: [n, c]`, a block of `a`'s columns at a time, so the
/// product never exists whole beside the sum (at bloom-7b1's MLP width the sum alone is
/// 512 MiB).
fn add_product(acc: &mut Option<DMatrix<f64>>, a: &Tensor, b: &Tensor) -> Result<()> {
    let ((_, r), (_, c)) = (a.dims2()?, b.dims2()?);
    let acc = acc.get_or_insert_with(|| DMatrix::zeros(r, c));
    let rows = (PRODUCT_BLOCK / c.max(1)).max(1);
    let mut start = 0;
    while start < r {
        let len = rows.min(r - start);
        let p = a.narrow(1, start, len)?.contiguous()?.t()?.matmul(b)?.flatten_all()?.to_vec1::<f64>()?;
        for (k, v) in p.into_iter().enumerate() {
            acc[(start + k / c, k % c)] += v;
        }
        start += len;
    }
    Ok(())
}

fn to_vector(t: &Tensor) -> Result<DVector<f64>> {
    Ok(DVector::from_vec(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?))
}

impl Moments {
    /// Empty statistics for a small space of `d_small` and a large one of `d_large` columns;
    /// `cross` and `gram` say whether `X_l^T·X_s` and `X_s^T·X_s` are accumulated (they cost
    /// `d_large·d_small` and `d_small²` f64 each).
    pub fn new(d_small: usize, d_large: usize, cross: bool, gram: bool) -> Self {
        Self {
            d_small,
            d_large,
            n: 0,
            shift: None,
            sum_s: None,
            sum_l: None,
            sq_s: 0.0,
            sq_l: 0.0,
            cross: None,
            gram: None,
            want_cross: cross,
            want_gram: gram,
        }
    }

    /// `(d_small, d_large)`.
    pub fn dims(&self) -> (usize, usize) {
        (self.d_small, self.d_large)
    }

    /// Number of rows added so far.
    pub fn n(&self) -> usize {
        self.n
    }

    /// Adds paired rows: `xs` is `[b, d_small]`, `xl` is `[b, d_large]` (any float dtype).
    pub fn add(&mut self, xs: &Tensor, xl: &Tensor) -> Result<()> {
        let (b, d_s) = dims2(xs, "xs")?;
        let (b_l, d_l) = dims2(xl, "xl")?;
        if d_s != self.d_small || d_l != self.d_large || b_l != b {
            return Err(shape_err("xs, xl", &[b, self.d_small, b, self.d_large], &[b, d_s, b_l, d_l], "Moments::add"));
        }
        if b == 0 {
            return Ok(());
        }
        let (s, t) = match &self.shift {
            Some(st) => st.clone(),
            None => {
                // Any shift keeps the statistics exact; the first batch's f32 means make it small.
                let mean = |x: &Tensor| -> Result<Tensor> {
                    Ok(x.to_dtype(DType::F32)?.mean_keepdim(0)?.to_dtype(DType::F64)?)
                };
                let st = (mean(xs)?, mean(xl)?);
                self.shift = Some(st.clone());
                st
            }
        };
        // A block of rows at a time: the rows widened to f64 and shifted exist for one block only
        // (a whole batch of bloom-7b1's MLP activations would be 134 MiB per copy).
        let mut start = 0;
        while start < b {
            let len = ADD_ROWS.min(b - start);
            let xs = xs.narrow(0, start, len)?.to_dtype(DType::F64)?.broadcast_sub(&s)?;
            let xl = xl.narrow(0, start, len)?.to_dtype(DType::F64)?.broadcast_sub(&t)?;
            add_into(&mut self.sum_s, xs.sum_keepdim(0)?)?;
            add_into(&mut self.sum_l, xl.sum_keepdim(0)?)?;
            self.sq_s += xs.sqr()?.sum_all()?.to_scalar::<f64>()?;
            self.sq_l += xl.sqr()?.sum_all()?.to_scalar::<f64>()?;
            if self.want_cross {
                add_product(&mut self.cross, &xl, &xs)?;
            }
            if self.want_gram {
                add_product(&mut self.gram, &xs, &xs)?;
            }
            start += len;
        }
        self.n += b;
        Ok(())
    }

    fn ensure_samples(&self, what: &str) -> Result<()> {
        if self.n < 2 {
            return Err(Error::msg(format!("{what}: expected at least 2 samples, found {}", self.n)));
        }
        Ok(())
    }

    /// Shifted means `(mean_s - s, mean_l - t)`.
    fn offsets(&self) -> Result<(DVector<f64>, DVector<f64>)> {
        self.ensure_samples("Moments")?;
        let n = self.n as f64;
        let (Some(sum_s), Some(sum_l)) = (&self.sum_s, &self.sum_l) else {
            return Err(Error::msg("Moments: no rows added"));
        };
        let (ds, dl) = (to_vector(sum_s)? / n, to_vector(sum_l)? / n);
        ensure_finite(&DMatrix::from_column_slice(ds.len(), 1, ds.as_slice()), "xs")?;
        ensure_finite(&DMatrix::from_column_slice(dl.len(), 1, dl.as_slice()), "xl")?;
        Ok((ds, dl))
    }

    /// Column means of both sides, `(mu_small, mu_large)`.
    pub fn means(&self) -> Result<(DVector<f64>, DVector<f64>)> {
        let (ds, dl) = self.offsets()?;
        let (s, t) = self.shift.as_ref().ok_or_else(|| Error::msg("Moments: no rows added"))?;
        Ok((to_vector(s)? + ds, to_vector(t)? + dl))
    }

    /// `acc - n·a·b^T`, in place.
    fn centred(
        &self,
        acc: Option<DMatrix<f64>>,
        name: &str,
        a: &DVector<f64>,
        b: &DVector<f64>,
    ) -> Result<DMatrix<f64>> {
        let mut m = acc.ok_or_else(|| Error::msg(format!("Moments: {name} was not accumulated (see Moments::new)")))?;
        let n = self.n as f64;
        for (j, mut col) in m.column_iter_mut().enumerate() {
            let bj = n * b[j];
            for (v, ai) in col.iter_mut().zip(a.iter()) {
                *v -= ai * bj;
            }
        }
        ensure_finite(&m, name)?;
        Ok(m)
    }

    /// Centred cross products `X_lc^T·X_sc`, `[d_large, d_small]`.
    pub fn cross(&self) -> Result<DMatrix<f64>> {
        let (ds, dl) = self.offsets()?;
        self.centred(self.cross.clone(), "X_l^T X_s", &dl, &ds)
    }

    /// [`Moments::cross`], moved out of the statistics instead of copied (they keep the means and
    /// sums of squares; what needs the cross products afterwards is an error).
    pub fn take_cross(&mut self) -> Result<DMatrix<f64>> {
        let (ds, dl) = self.offsets()?;
        let acc = self.cross.take();
        self.centred(acc, "X_l^T X_s", &dl, &ds)
    }

    /// Centred Gram matrix `X_sc^T·X_sc`, `[d_small, d_small]`.
    pub fn gram(&self) -> Result<DMatrix<f64>> {
        let (ds, _) = self.offsets()?;
        self.centred(self.gram.clone(), "X_s^T X_s", &ds, &ds)
    }

    /// `Σ|x_s - mu_s|²`, the trace of the centred Gram matrix (kept whether or not the matrix is).
    pub fn total_sq_small(&self) -> Result<f64> {
        let (ds, _) = self.offsets()?;
        Ok(self.sq_s - self.n as f64 * ds.norm_squared())
    }

    /// `Σ|x_l - mu_l|²`: the total sum of squares of R².
    pub fn total_sq_large(&self) -> Result<f64> {
        let (_, dl) = self.offsets()?;
        Ok(self.sq_l - self.n as f64 * dl.norm_squared())
    }

    /// [`crate::fit_procrustes`] with [`crate::Centring::Mean`] from the statistics, returning the
    /// linear part only: `T = U·V^T` of `X_lc^T·X_sc = U·S·V^T`.
    pub fn fit_procrustes(&self) -> Result<Map> {
        Map::with_kind(procrustes_matrix(self.cross()?)?, MapKind::Procrustes)
    }

    /// [`Moments::fit_procrustes`] from the cross products moved out of the statistics
    /// ([`Moments::take_cross`]): no copy of them, for fits at real widths.
    pub fn take_procrustes(&mut self) -> Result<Map> {
        Map::with_kind(procrustes_matrix(self.take_cross()?)?, MapKind::Procrustes)
    }

    /// [`crate::fit_ridge`] with [`crate::Centring::Mean`] from the statistics, returning the
    /// linear part only: `T = X_lc^T·X_sc·(X_sc^T·X_sc + lambda·I)^{-1}`.
    pub fn fit_ridge(&self, lambda: f64) -> Result<Map> {
        if !(lambda.is_finite() && lambda >= 0.0) {
            return Err(Error::msg(format!("Moments::fit_ridge: expected a finite lambda >= 0, found {lambda}")));
        }
        let t = ridge_matrix(self.gram()?, &self.cross()?, lambda)?;
        Map::with_kind(t.map(|v| v as f32), MapKind::Ridge)
    }

    /// R² of `map`'s linear part on the centred rows: `1 - SS_res/SS_tot` with
    /// `SS_res = tr(T·G·T^T) - 2·Σ T∘C + SS_tot` (`G` the Gram matrix, `C` the cross products).
    /// Needs both accumulated. NaN when the large side is constant.
    pub fn explained_variance(&self, map: &Map) -> Result<f64> {
        if map.d_small() != self.d_small || map.d_large() != self.d_large {
            return Err(shape_err(
                "map",
                &[self.d_large, self.d_small],
                &[map.d_large(), map.d_small()],
                "Moments::explained_variance",
            ));
        }
        let t = map.matrix().map(f64::from);
        let (g, c) = (self.gram()?, self.cross()?);
        let ss_tot = self.total_sq_large()?;
        let tg = &t * g;
        let ss_res = (tg.component_mul(&t).sum() - 2.0 * t.component_mul(&c).sum() + ss_tot).max(0.0);
        if ss_tot == 0.0 {
            return Ok(f64::NAN);
        }
        Ok(1.0 - ss_res / ss_tot)
    }
}
