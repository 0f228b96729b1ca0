//! Conversions between candle tensors (row-major) and nalgebra matrices (column-major), and the
//! small checks every public function runs on its inputs before doing any algebra.

use candle_core::{DType, Device, Tensor};
use hetfed_core::{Error, Result};
use nalgebra::{DMatrix, DVector};

/// Reads a rank-2 tensor (any float dtype, any device) into an f32 nalgebra matrix with the same
/// `[rows, cols]`. candle stores row-major and nalgebra column-major; this handles the transpose.
pub fn tensor_to_matrix(t: &Tensor, name: &str) -> Result<DMatrix<f32>> {
    let (rows, cols) = dims2(t, name)?;
    let v = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    Ok(DMatrix::from_row_slice(rows, cols, &v))
}

/// As [`tensor_to_matrix`], widened to f64 for decompositions.
pub fn tensor_to_matrix_f64(t: &Tensor, name: &str) -> Result<DMatrix<f64>> {
    Ok(tensor_to_matrix(t, name)?.map(f64::from))
}

/// Writes an f32 matrix into a `[rows, cols]` f32 tensor on `device`.
pub fn matrix_to_tensor(m: &DMatrix<f32>, device: &Device) -> Result<Tensor> {
    // The transpose's column-major storage is the original's row-major storage.
    let data = m.transpose().as_slice().to_vec();
    Ok(Tensor::from_vec(data, (m.nrows(), m.ncols()), device)?)
}

/// Writes an f64 matrix into a `[rows, cols]` f32 tensor on `device`.
pub fn matrix_f64_to_tensor(m: &DMatrix<f64>, device: &Device) -> Result<Tensor> {
    matrix_to_tensor(&m.map(|x| x as f32), device)
}

/// Reads a rank-1 tensor into an f32 vector.
pub fn tensor_to_vector(t: &Tensor, name: &str) -> Result<DVector<f32>> {
    if t.rank() != 1 {
        return Err(Error::msg(format!("`{name}`: expected a vector (rank 1), found shape {:?}", t.dims())));
    }
    Ok(DVector::from_vec(t.to_dtype(DType::F32)?.to_vec1::<f32>()?))
}

/// The two dimensions of a matrix, or an error naming the tensor and its actual shape.
pub(crate) fn dims2(t: &Tensor, name: &str) -> Result<(usize, usize)> {
    match t.dims() {
        &[r, c] => Ok((r, c)),
        d => Err(Error::msg(format!("`{name}`: expected a matrix (rank 2), found shape {d:?}"))),
    }
}

/// A shape error in hetfed-core's vocabulary.
pub(crate) fn shape_err(name: &str, expected: &[usize], found: &[usize], where_: &str) -> Error {
    Error::Shape {
        name: name.to_owned(),
        expected: expected.to_vec(),
        found: found.to_vec(),
        where_: Some(where_.to_owned()),
    }
}

/// Checks that a tensor is a matrix of exactly `expected`.
pub(crate) fn expect_shape(t: &Tensor, name: &str, expected: &[usize], where_: &str) -> Result<()> {
    if t.dims() != expected {
        return Err(shape_err(name, expected, t.dims(), where_));
    }
    Ok(())
}

/// Refuses NaN and infinities, which would otherwise surface as a panic deep inside an SVD.
pub(crate) fn ensure_finite(m: &DMatrix<f64>, name: &str) -> Result<()> {
    if let Some(pos) = m.iter().position(|x| !x.is_finite()) {
        let (r, c) = (pos % m.nrows(), pos / m.nrows());
        return Err(Error::msg(format!("`{name}`: expected finite values, found {} at [{r}, {c}]", m[pos])));
    }
    Ok(())
}

/// Refuses matrices with a zero dimension: every map here is between non-empty spaces.
pub(crate) fn ensure_nonempty(rows: usize, cols: usize, name: &str) -> Result<()> {
    if rows == 0 || cols == 0 {
        return Err(Error::msg(format!("`{name}`: expected non-zero dimensions, found [{rows}, {cols}]")));
    }
    Ok(())
}

/// Thin SVD with singular values in descending order. Inputs must be finite and non-empty.
pub(crate) fn svd(m: DMatrix<f64>, name: &str) -> Result<nalgebra::SVD<f64, nalgebra::Dyn, nalgebra::Dyn>> {
    ensure_nonempty(m.nrows(), m.ncols(), name)?;
    ensure_finite(&m, name)?;
    nalgebra::SVD::try_new(m, true, true, f64::EPSILON, 0)
        .ok_or_else(|| Error::msg(format!("`{name}`: SVD did not converge")))
}

/// The thin SVD `m = U·diag(S)·V^T` (`U [r, k]`, `S` descending, `V^T [k, c]`, `k = min(r, c)`),
/// computed with faer's blocked, multithreaded divide-and-conquer SVD: at real model widths
/// (`[16384, 4096]` cross products) this takes seconds where nalgebra's unblocked, single-threaded
/// SVD takes a quarter of an hour.
pub(crate) fn thin_svd(m: &DMatrix<f64>, name: &str) -> Result<(DMatrix<f64>, Vec<f64>, DMatrix<f64>)> {
    let (r, c) = m.shape();
    ensure_nonempty(r, c, name)?;
    ensure_finite(m, name)?;
    let f = faer::MatRef::from_column_major_slice(m.as_slice(), r, c);
    let s = f.thin_svd().map_err(|e| Error::msg(format!("`{name}`: SVD did not converge ({e:?})")))?;
    let (u, v) = (s.U(), s.V());
    let sv = s.S().column_vector().iter().copied().collect::<Vec<f64>>();
    let u = DMatrix::from_fn(r, sv.len(), |i, j| u[(i, j)]);
    let v_t = DMatrix::from_fn(sv.len(), c, |i, j| v[(j, i)]);
    Ok((u, sv, v_t))
}

/// Rows of `U` multiplied at a time by [`polar_factor`].
const POLAR_ROWS: usize = 1024;

/// Above this many elements [`polar_factor`] runs its SVD in f32 (a `[4096, 4096]` matrix is at
/// the limit; bloom-7b1's `[16384, 4096]` MLP cross products are above it).
const POLAR_F64_MAX: usize = 1 << 24;

/// The nearest matrix with orthonormal columns (or rows, when wide) to `m`: `U·V^T` of its thin
/// SVD (faer: blocked and multithreaded), as f32, written a block of rows of `U` at a time.
///
/// Up to [`POLAR_F64_MAX`] elements the SVD runs in f64 on `m` itself. Above it, the work is
/// f32 on an f32 copy (`m` is dropped first) and goes through a QR: `m = Q·R`, the SVD of the
/// square `R` only, and `Q·(U_r·V_r^T)` a block of rows at a time. At real widths
/// (`[16384, 4096]`, 512 MiB in f64) this holds about two f32 copies of `m` at once, where faer's
/// thin SVD of `m` held about six (1.6 GiB, measured with heaptrack). The price is precision:
/// f32 rounding of `m` is amplified by its conditioning (measured: 5e-4 relative on an
/// ill-conditioned `[48, 24]` cross product, against 1e-8 in f64), which is far below what
/// separates one map from another but above f32's own resolution. Where `m` is rank-deficient the polar factor is not unique and the SVD's
/// completion of the singular vectors decides it, in any precision.
pub(crate) fn polar_factor(m: DMatrix<f64>, name: &str) -> Result<DMatrix<f32>> {
    polar_factor_limit(m, name, POLAR_F64_MAX)
}

/// [`polar_factor`] with the f64/f32 switch at `f64_max` elements.
fn polar_factor_limit(m: DMatrix<f64>, name: &str, f64_max: usize) -> Result<DMatrix<f32>> {
    let (r, c) = m.shape();
    ensure_nonempty(r, c, name)?;
    ensure_finite(&m, name)?;
    let failed = |e: faer::linalg::svd::SvdError| Error::msg(format!("`{name}`: SVD did not converge ({e:?})"));
    if r * c <= f64_max {
        let s = faer::MatRef::from_column_major_slice(m.as_slice(), r, c).thin_svd().map_err(failed)?;
        let (u, v_t) = (s.U(), s.V().transpose());
        Ok(by_row_blocks(r, c, |start, len| u.subrows(start, len) * v_t, |v| v as f32))
    } else if r < c {
        // Wide: the transpose's polar factor, transposed.
        Ok(polar_factor_limit(m.transpose(), name, f64_max)?.transpose())
    } else {
        // Tall: C = Q·R, R = U_r·S·V_r^T, so polar(C) = Q·(U_r·V_r^T). Only R (`[c, c]`) goes
        // through the SVD; faer's thin SVD of C itself holds about six copies of C.
        let a = faer::Mat::<f32>::from_fn(r, c, |i, j| m[(i, j)] as f32);
        drop(m);
        let qr = a.qr();
        drop(a);
        let core = {
            let s = qr.thin_R().svd().map_err(failed)?;
            s.U() * s.V().transpose()
        };
        let q = qr.compute_thin_Q();
        drop(qr);
        Ok(by_row_blocks(r, c, |start, len| q.subrows(start, len) * &core, |v| v))
    }
}

/// An `[r, c]` f32 matrix filled [`POLAR_ROWS`] rows at a time from `block(start, len)`, the
/// `[len, c]` product for those rows only (so no whole product exists beside the result).
fn by_row_blocks<T: Copy>(
    r: usize,
    c: usize,
    block: impl Fn(usize, usize) -> faer::Mat<T>,
    to_f32: impl Fn(T) -> f32,
) -> DMatrix<f32> {
    let mut out = DMatrix::<f32>::zeros(r, c);
    for start in (0..r).step_by(POLAR_ROWS) {
        let len = POLAR_ROWS.min(r - start);
        let p = block(start, len);
        for j in 0..c {
            for i in 0..len {
                out[(start + i, j)] = to_f32(p[(i, j)]);
            }
        }
    }
    out
}

/// Solves `X·G = C` for `X` with `G` symmetric positive (semi)definite: Cholesky, falling back to
/// the SVD pseudo-inverse when `G` is singular (no ridge and collinear inputs).
pub(crate) fn solve_right_spd(g: DMatrix<f64>, c: &DMatrix<f64>, name: &str) -> Result<DMatrix<f64>> {
    // X·G = C  <=>  G·X^T = C^T (G symmetric).
    let ct = c.transpose();
    if let Some(ch) = nalgebra::Cholesky::new(g.clone()) {
        let xt = ch.solve(&ct);
        if xt.iter().all(|x| x.is_finite()) {
            return Ok(xt.transpose());
        }
    }
    let s = svd(g, name)?;
    let max = s.singular_values.iter().cloned().fold(0.0, f64::max);
    let eps = max * f64::EPSILON * (s.singular_values.len() as f64) * 10.0;
    let xt = s.solve(&ct, eps).map_err(|e| Error::msg(format!("`{name}`: {e}")))?;
    Ok(xt.transpose())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_f32_polar_factor_is_semi_orthogonal_and_agrees_with_the_f64_one() {
        // A well-conditioned tall matrix and its transpose (wide: orthonormal rows).
        let m = DMatrix::<f64>::from_fn(40, 12, |i, j| {
            ((i * 7 + j * 13) % 11) as f64 - 5.0 + if i == j { 9.0 } else { 0.0 }
        });
        for m in [m.clone(), m.transpose()] {
            let p64 = polar_factor_limit(m.clone(), "m", usize::MAX).unwrap();
            let p32 = polar_factor_limit(m.clone(), "m", 0).unwrap();
            let g = if m.nrows() >= m.ncols() { p32.tr_mul(&p32) } else { &p32 * p32.transpose() };
            let n = g.nrows();
            assert!((g - DMatrix::<f32>::identity(n, n)).amax() < 1e-5);
            assert!((&p32 - &p64).amax() < 1e-4, "{}", (&p32 - &p64).amax());
            // Both are the nearest semi-orthogonal matrix: m = P·H with H symmetric.
            let h = p64.map(f64::from).transpose() * &m;
            if m.nrows() >= m.ncols() {
                assert!((&h - h.transpose()).amax() < 1e-4 * h.amax());
            }
        }
        assert!(polar_factor(DMatrix::<f64>::from_element(3, 2, f64::NAN), "m").is_err());
    }

    #[test]
    fn row_major_round_trip_keeps_element_positions() {
        // A non-square matrix whose entries encode their own position.
        let v: Vec<f32> = (0..6).map(|i| i as f32).collect();
        let t = Tensor::from_vec(v.clone(), (2, 3), &Device::Cpu).unwrap();
        let m = tensor_to_matrix(&t, "t").unwrap();
        assert_eq!((m.nrows(), m.ncols()), (2, 3));
        for r in 0..2 {
            for c in 0..3 {
                assert_eq!(m[(r, c)], (r * 3 + c) as f32, "[{r},{c}]");
            }
        }
        let back = matrix_to_tensor(&m, &Device::Cpu).unwrap();
        assert_eq!(back.dims(), &[2, 3]);
        assert_eq!(back.flatten_all().unwrap().to_vec1::<f32>().unwrap(), v);
        // Products agree between the two libraries.
        let tt = t.t().unwrap().contiguous().unwrap();
        let prod = t.matmul(&tt).unwrap();
        let mprod = &m * m.transpose();
        assert_eq!(tensor_to_matrix(&prod, "p").unwrap(), mprod);
    }

    #[test]
    fn rank_and_finiteness_are_checked() {
        let t = Tensor::zeros((2, 3, 4), DType::F32, &Device::Cpu).unwrap();
        let e = tensor_to_matrix(&t, "w").unwrap_err().to_string();
        assert!(e.contains("`w`") && e.contains("[2, 3, 4]"), "{e}");
        let mut m = DMatrix::<f64>::zeros(2, 2);
        m[(1, 0)] = f64::NAN;
        let e = svd(m, "m").unwrap_err().to_string();
        assert!(e.contains("[1, 0]"), "{e}");
    }
}
