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

/// The nearest matrix with orthonormal columns (or rows, when wide) to `m`: `U·V^T` of its SVD.
pub(crate) fn polar_factor(m: DMatrix<f64>, name: &str) -> Result<DMatrix<f64>> {
    let s = svd(m, name)?;
    let u = s.u.as_ref().ok_or_else(|| Error::msg("SVD returned no U"))?;
    let v_t = s.v_t.as_ref().ok_or_else(|| Error::msg("SVD returned no V^T"))?;
    Ok(u * v_t)
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
