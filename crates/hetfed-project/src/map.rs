//! [`Map`]: a linear map from a small model's space into a large model's space, and the ways to
//! fit one from paired activations (ridge least squares, orthogonal Procrustes) or to draw one at
//! random (the control).

use std::time::Instant;

use candle_core::{Device, Tensor};
use hetfed_core::{Error, Result};
use nalgebra::{DMatrix, DVector};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::convert::{
    dims2, ensure_finite, ensure_nonempty, matrix_to_tensor, polar_factor, shape_err, solve_right_spd,
    tensor_to_matrix, tensor_to_matrix_f64,
};

/// How a map was made; kept for reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MapKind {
    /// `[I; 0]`: coordinate `k` of the small space goes to coordinate `k` of the large one.
    Identity,
    /// Given by the caller.
    Given,
    /// Ridge least squares on paired activations ([`fit_ridge`]).
    Ridge,
    /// Orthogonal Procrustes on paired activations ([`fit_procrustes`]).
    Procrustes,
    /// Haar-random semi-orthogonal ([`random_orthogonal`]).
    RandomOrthogonal,
    /// One factor of a data-free weight-space fit ([`crate::fit_weight_space`]).
    WeightSpace,
    /// The transpose of another map.
    Transposed,
}

/// Whether activations are centred before a fit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Centring {
    /// Fit `x_l ≈ T·x_s` on the raw activations.
    None,
    /// Subtract each side's mean first, so the fit is the affine `x_l ≈ T·(x_s - mu_s) + mu_l`.
    /// Residual streams carry large constant offsets that a purely linear fit would spend its
    /// capacity on.
    Mean,
}

/// What a fit achieved on the data it was fitted on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FitReport {
    /// `R² = 1 - SS_res / SS_tot`, with `SS_tot` the total sum of squares of the centred `X_l`.
    /// 1 is perfect; 0 is no better than predicting the mean; it can be negative. NaN when `X_l`
    /// is constant.
    pub explained_variance: f64,
    /// Number of paired samples (rows).
    pub n_samples: usize,
    /// Wall-clock seconds the fit took.
    pub seconds: f64,
}

/// A linear map `x_l ≈ T·x_s` from a small space (`d_small`) into a large one (`d_large`):
/// `T` is `[d_large, d_small]`. A map fitted with [`Centring::Mean`] also keeps the two means and
/// applies the affine `T·(x_s - mu_s) + mu_l` to activations ([`Map::apply`]); projecting weight
/// updates only ever uses the linear part `T`.
#[derive(Debug, Clone, PartialEq)]
pub struct Map {
    t: DMatrix<f32>,
    means: Option<(DVector<f32>, DVector<f32>)>,
    kind: MapKind,
}

impl Map {
    /// A map with matrix `t` (`[d_large, d_small]`).
    pub fn new(t: DMatrix<f32>) -> Result<Self> {
        Self::with_kind(t, MapKind::Given)
    }

    pub(crate) fn with_kind(t: DMatrix<f32>, kind: MapKind) -> Result<Self> {
        ensure_nonempty(t.nrows(), t.ncols(), "map")?;
        if let Some(pos) = t.iter().position(|x| !x.is_finite()) {
            let (r, c) = (pos % t.nrows(), pos / t.nrows());
            return Err(Error::msg(format!("`map`: expected finite values, found {} at [{r}, {c}]", t[pos])));
        }
        Ok(Self { t, means: None, kind })
    }

    /// A map from a `[d_large, d_small]` tensor.
    pub fn from_tensor(t: &Tensor) -> Result<Self> {
        Self::new(tensor_to_matrix(t, "map")?)
    }

    /// `[I; 0]` (`d_large >= d_small`) or `[I, 0]` (`d_large < d_small`): the map that assumes the
    /// coordinates of the two spaces already line up. `identity(d, d)` is the identity.
    pub fn identity(d_large: usize, d_small: usize) -> Result<Self> {
        Self::with_kind(DMatrix::identity(d_large, d_small), MapKind::Identity)
    }

    /// Dimension of the large space (rows of `T`).
    pub fn d_large(&self) -> usize {
        self.t.nrows()
    }

    /// Dimension of the small space (columns of `T`).
    pub fn d_small(&self) -> usize {
        self.t.ncols()
    }

    /// `T`, `[d_large, d_small]`.
    pub fn matrix(&self) -> &DMatrix<f32> {
        &self.t
    }

    /// How the map was made.
    pub fn kind(&self) -> MapKind {
        self.kind
    }

    /// `(mu_small, mu_large)` when fitted with [`Centring::Mean`].
    pub fn means(&self) -> Option<(&DVector<f32>, &DVector<f32>)> {
        self.means.as_ref().map(|(s, l)| (s, l))
    }

    /// `T` as a `[d_large, d_small]` f32 tensor on `device`.
    pub fn to_tensor(&self, device: &Device) -> Result<Tensor> {
        matrix_to_tensor(&self.t, device)
    }

    /// The map back, `T^T` (`[d_small, d_large]`), with the means swapped. For a semi-orthogonal
    /// `T` with `d_large >= d_small` this is its left inverse: `T^T·T = I`.
    pub fn transpose(&self) -> Map {
        Map {
            t: self.t.transpose(),
            means: self.means.as_ref().map(|(s, l)| (l.clone(), s.clone())),
            kind: MapKind::Transposed,
        }
    }

    /// Largest absolute entry of `T^T·T - I` (when `d_large >= d_small`) or `T·T^T - I`
    /// (otherwise): 0 for a semi-orthogonal map.
    pub fn orthogonality_error(&self) -> f64 {
        let t = self.t.map(f64::from);
        let g = if self.d_large() >= self.d_small() { t.tr_mul(&t) } else { &t * t.transpose() };
        let n = g.nrows();
        (g - DMatrix::<f64>::identity(n, n)).amax()
    }

    /// Maps activations: `xs` is `[n, d_small]`, the result `[n, d_large]` (f32, on `xs`'s device),
    /// rows `T·(x - mu_s) + mu_l` (the means only for a centred fit).
    pub fn apply(&self, xs: &Tensor) -> Result<Tensor> {
        let x = self.check_rows(xs, "xs", self.d_small(), "Map::apply")?;
        let y = self.predict(&x.map(f64::from));
        crate::convert::matrix_f64_to_tensor(&y, xs.device())
    }

    /// R² of this map on paired activations `xs` (`[n, d_small]`) and `xl` (`[n, d_large]`);
    /// use it on held-out pairs to compare maps.
    pub fn explained_variance(&self, xs: &Tensor, xl: &Tensor) -> Result<f64> {
        let (x, y) = paired(xs, xl)?;
        if x.ncols() != self.d_small() || y.ncols() != self.d_large() {
            return Err(shape_err(
                "xs, xl columns",
                &[self.d_small(), self.d_large()],
                &[x.ncols(), y.ncols()],
                "Map::explained_variance",
            ));
        }
        Ok(r_squared(&self.predict(&x), &y))
    }

    fn check_rows(&self, t: &Tensor, name: &str, d: usize, where_: &str) -> Result<DMatrix<f32>> {
        let (n, c) = dims2(t, name)?;
        if c != d {
            return Err(shape_err(name, &[n, d], &[n, c], where_));
        }
        tensor_to_matrix(t, name)
    }

    /// Row-wise prediction `X_s·T^T` (affine when centred), in f64.
    ///
    /// The product is taken in f32 as `(T·X_s^T)^T` with the f32 map as it is: at real widths `T`
    /// is `[16384, 4096]`, and a widened or transposed copy of it would be 256–512 MiB.
    fn predict(&self, x: &DMatrix<f64>) -> DMatrix<f64> {
        let product = |x: &DMatrix<f64>| (&self.t * x.transpose().map(|v| v as f32)).transpose().map(f64::from);
        match &self.means {
            None => product(x),
            Some((mu_s, mu_l)) => {
                let mut xc = x.clone();
                subtract_row(&mut xc, &mu_s.map(f64::from));
                let mut y = product(&xc);
                add_row(&mut y, &mu_l.map(f64::from));
                y
            }
        }
    }
}

/// Ridge least squares: `T = argmin ||X_s·T^T - X_l||² + lambda·||T||²`, i.e.
/// `T = X_l^T·X_s·(X_s^T·X_s + lambda·I)^{-1}`, solved from the normal equations in f64 (Cholesky;
/// SVD pseudo-inverse when `lambda = 0` and `X_s^T·X_s` is singular).
///
/// `xs` is `[n, d_small]`, `xl` is `[n, d_large]`, row `k` of each the same input seen by the two
/// models. `lambda` is in the units of the summed squared error (it grows with `n`); a scale-free
/// choice is `trace(X_s^T X_s)/(n-1)` times a small factor. The map is unconstrained: it can
/// stretch, which suits spaces of different scale but can overfit when `n` is not well above
/// `d_small`.
pub fn fit_ridge(xs: &Tensor, xl: &Tensor, lambda: f64, centring: Centring) -> Result<(Map, FitReport)> {
    if !(lambda.is_finite() && lambda >= 0.0) {
        return Err(Error::msg(format!("fit_ridge: expected a finite lambda >= 0, found {lambda}")));
    }
    let start = Instant::now();
    let (x, y) = paired(xs, xl)?;
    let (x, y, means) = centre(x, y, centring);
    let t = ridge_matrix(x.tr_mul(&x), &y.tr_mul(&x), lambda)?;
    finish(t.map(|v| v as f32), means, MapKind::Ridge, &x, &y, start)
}

/// The ridge solution `T = C·(G + lambda·I)^{-1}` from the Gram matrix `G = X_s^T·X_s`
/// (`[d_s, d_s]`) and the cross products `C = X_l^T·X_s` (`[d_l, d_s]`).
pub(crate) fn ridge_matrix(g: DMatrix<f64>, c: &DMatrix<f64>, lambda: f64) -> Result<DMatrix<f64>> {
    let d_s = g.ncols();
    solve_right_spd(g + DMatrix::<f64>::identity(d_s, d_s) * lambda, c, "X_s^T X_s + lambda I")
}

/// The Procrustes solution `T = U·V^T` from the cross products `X_l^T·X_s = U·S·V^T` (f32; see
/// `polar_factor`).
pub(crate) fn procrustes_matrix(c: DMatrix<f64>) -> Result<DMatrix<f32>> {
    polar_factor(c, "X_l^T X_s")
}

/// Orthogonal Procrustes: `T = argmin ||X_s·T^T - X_l||` over semi-orthogonal `T`, which is
/// `T = U·V^T` from the thin SVD `X_l^T·X_s = U·S·V^T`.
///
/// With `d_large >= d_small`, `T^T·T = I`: the map is an isometric embedding (it keeps lengths and
/// angles, so a transported update keeps its norm), which is the right prior when the two spaces
/// differ by a rotation and a widening. With `d_large < d_small` the rows are orthonormal
/// (`T·T^T = I`) and the map is a projection.
pub fn fit_procrustes(xs: &Tensor, xl: &Tensor, centring: Centring) -> Result<(Map, FitReport)> {
    let start = Instant::now();
    let (x, y) = paired(xs, xl)?;
    let (x, y, means) = centre(x, y, centring);
    let t = procrustes_matrix(y.tr_mul(&x))?;
    finish(t, means, MapKind::Procrustes, &x, &y, start)
}

/// A Haar-random semi-orthogonal `[d_large, d_small]` map (orthonormal columns when
/// `d_large >= d_small`, orthonormal rows otherwise), from the QR of a Gaussian matrix with the
/// signs of `R`'s diagonal folded into `Q`. The control every fitted map must beat: it transports
/// an update with its norm intact but into unrelated directions.
pub fn random_orthogonal(d_large: usize, d_small: usize, seed: u64) -> Result<Map> {
    ensure_nonempty(d_large, d_small, "random_orthogonal")?;
    let (tall, thin) = (d_large.max(d_small), d_large.min(d_small));
    let g = gaussian_f64(tall, thin, seed);
    let qr = g.qr();
    let mut q = qr.q(); // [tall, thin]
    let r = qr.r();
    for j in 0..thin {
        if r[(j, j)] < 0.0 {
            q.column_mut(j).neg_mut();
        }
    }
    let t = if d_large >= d_small { q } else { q.transpose() };
    Map::with_kind(t.map(|v| v as f32), MapKind::RandomOrthogonal)
}

/// Standard normal `[rows, cols]` matrix from a seed (Box–Muller over `StdRng`).
pub(crate) fn gaussian_f64(rows: usize, cols: usize, seed: u64) -> DMatrix<f64> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut next = move || {
        // 1 - u lies in (0, 1], so the log is finite.
        let u1: f64 = 1.0 - rng.random::<f64>();
        let u2: f64 = rng.random::<f64>();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    };
    DMatrix::from_fn(rows, cols, |_, _| next())
}

/// Reads and checks paired activations: both matrices, same number of rows (at least 2), finite.
fn paired(xs: &Tensor, xl: &Tensor) -> Result<(DMatrix<f64>, DMatrix<f64>)> {
    let (n_s, d_s) = dims2(xs, "xs")?;
    let (n_l, d_l) = dims2(xl, "xl")?;
    if n_s != n_l {
        return Err(shape_err("xl", &[n_s, d_l], &[n_l, d_l], "paired activations (one row per sample in both)"));
    }
    if n_s < 2 {
        return Err(Error::msg(format!("paired activations: expected at least 2 samples, found {n_s}")));
    }
    ensure_nonempty(n_s, d_s, "xs")?;
    ensure_nonempty(n_l, d_l, "xl")?;
    let x = tensor_to_matrix_f64(xs, "xs")?;
    let y = tensor_to_matrix_f64(xl, "xl")?;
    ensure_finite(&x, "xs")?;
    ensure_finite(&y, "xl")?;
    Ok((x, y))
}

type Means = Option<(DVector<f64>, DVector<f64>)>;

fn centre(mut x: DMatrix<f64>, mut y: DMatrix<f64>, centring: Centring) -> (DMatrix<f64>, DMatrix<f64>, Means) {
    match centring {
        Centring::None => (x, y, None),
        Centring::Mean => {
            let mu_x = column_means(&x);
            let mu_y = column_means(&y);
            subtract_row(&mut x, &mu_x);
            subtract_row(&mut y, &mu_y);
            (x, y, Some((mu_x, mu_y)))
        }
    }
}

/// Builds the f32 map and its report; R² is measured with the f32 map the caller receives, on
/// the (possibly centred) data it was fitted on.
fn finish(
    t: DMatrix<f32>,
    means: Means,
    kind: MapKind,
    x: &DMatrix<f64>,
    y: &DMatrix<f64>,
    start: Instant,
) -> Result<(Map, FitReport)> {
    let mut map = Map::with_kind(t, kind)?;
    let r2 = r_squared(&map.predict(x), y);
    map.means = means.map(|(s, l)| (s.map(|v| v as f32), l.map(|v| v as f32)));
    let report = FitReport { explained_variance: r2, n_samples: x.nrows(), seconds: start.elapsed().as_secs_f64() };
    Ok((map, report))
}

fn column_means(m: &DMatrix<f64>) -> DVector<f64> {
    let n = m.nrows() as f64;
    DVector::from_iterator(m.ncols(), m.column_iter().map(|c| c.sum() / n))
}

fn subtract_row(m: &mut DMatrix<f64>, mu: &DVector<f64>) {
    for (mut col, &v) in m.column_iter_mut().zip(mu.iter()) {
        col.add_scalar_mut(-v);
    }
}

fn add_row(m: &mut DMatrix<f64>, mu: &DVector<f64>) {
    for (mut col, &v) in m.column_iter_mut().zip(mu.iter()) {
        col.add_scalar_mut(v);
    }
}

/// `1 - SS_res / SS_tot`, `SS_tot` about the column means of `y`.
pub(crate) fn r_squared(pred: &DMatrix<f64>, y: &DMatrix<f64>) -> f64 {
    let ss_res = (pred - y).norm_squared();
    let mut yc = y.clone();
    subtract_row(&mut yc, &column_means(y));
    let ss_tot = yc.norm_squared();
    if ss_tot == 0.0 {
        return f64::NAN;
    }
    1.0 - ss_res / ss_tot
}
