//! Splitting and joining the rows of fused projections (QKV), so that Q, K and V, whose output
//! spaces differ, are each projected with their own output map.

use candle_core::Tensor;
use hetfed_core::{Error, Result};

use crate::convert::shape_err;

/// Splits dimension 0 of `m` (a weight `[rows, in]`, a bias `[rows]`, or a LoRA `B` `[rows, r]`)
/// into `parts` equal contiguous blocks: the stacked `[Q; K; V]` layout (e.g. Phi-3's
/// `qkv_proj` without grouped-query attention). See [`split_rows_sizes`] for unequal blocks and
/// [`split_rows_interleaved`] for BLOOM's per-head layout.
pub fn split_rows(m: &Tensor, parts: usize) -> Result<Vec<Tensor>> {
    let rows = rows_of(m, "m")?;
    if parts == 0 || rows % parts != 0 {
        return Err(Error::msg(format!(
            "split_rows: expected rows divisible into {parts} equal parts, found {rows} rows (shape {:?})",
            m.dims()
        )));
    }
    let n = rows / parts;
    (0..parts).map(|k| Ok(m.narrow(0, k * n, n)?.contiguous()?)).collect()
}

/// Splits dimension 0 of `m` into contiguous blocks of the given row counts, which must add up to
/// the rows of `m`: stacked QKV with grouped-query attention, where K and V are smaller than Q.
pub fn split_rows_sizes(m: &Tensor, sizes: &[usize]) -> Result<Vec<Tensor>> {
    let rows = rows_of(m, "m")?;
    if sizes.is_empty() || sizes.iter().sum::<usize>() != rows {
        return Err(Error::msg(format!(
            "split_rows_sizes: expected block sizes {sizes:?} to add up to the rows of `m`, found {rows} rows (shape {:?})",
            m.dims()
        )));
    }
    let mut start = 0;
    sizes
        .iter()
        .map(|&n| {
            let part = m.narrow(0, start, n)?.contiguous()?;
            start += n;
            Ok(part)
        })
        .collect()
}

/// Joins blocks along dimension 0: the inverse of [`split_rows`] and [`split_rows_sizes`]. The
/// blocks may differ in rows but must agree on their other dimensions.
pub fn concat_rows(parts: &[Tensor]) -> Result<Tensor> {
    let first = parts.first().ok_or_else(|| Error::msg("concat_rows: expected at least one part, found none"))?;
    rows_of(first, "parts[0]")?;
    for (k, p) in parts.iter().enumerate().skip(1) {
        if p.rank() != first.rank() || p.dims()[1..] != first.dims()[1..] {
            let mut expected = first.dims().to_vec();
            if let (Some(e), Some(&r)) = (expected.first_mut(), p.dims().first()) {
                *e = r;
            }
            return Err(shape_err(
                &format!("parts[{k}]"),
                &expected,
                p.dims(),
                "concat_rows (blocks must agree past dimension 0)",
            ));
        }
    }
    Ok(Tensor::cat(parts, 0)?)
}

/// Splits BLOOM's fused `query_key_value` (rows ordered `[head, part, head_dim]`, i.e. for each
/// head its q rows, then its k rows, then its v rows) into `parts` tensors of rows
/// `[head, head_dim]`: Q, K and V each in the ordinary `[n_heads·head_dim, ...]` layout.
pub fn split_rows_interleaved(m: &Tensor, n_heads: usize, parts: usize) -> Result<Vec<Tensor>> {
    let rows = rows_of(m, "m")?;
    if n_heads == 0 || parts == 0 || rows % (n_heads * parts) != 0 {
        return Err(Error::msg(format!(
            "split_rows_interleaved: expected rows divisible by {n_heads} heads × {parts} parts, found {rows} rows (shape {:?})",
            m.dims()
        )));
    }
    let hd = rows / (n_heads * parts);
    let rest = &m.dims()[1..];
    let mut grouped = vec![n_heads, parts, hd];
    grouped.extend_from_slice(rest);
    let mut flat = vec![n_heads * hd];
    flat.extend_from_slice(rest);
    let g = m.reshape(grouped)?;
    (0..parts).map(|k| Ok(g.narrow(1, k, 1)?.contiguous()?.reshape(flat.clone())?)).collect()
}

/// Joins per-part tensors (rows `[head, head_dim]` each) into BLOOM's interleaved
/// `[head, part, head_dim]` row order: the inverse of [`split_rows_interleaved`].
pub fn concat_rows_interleaved(parts: &[Tensor], n_heads: usize) -> Result<Tensor> {
    let rows = check_parts(parts, "concat_rows_interleaved")?;
    if n_heads == 0 || rows % n_heads != 0 {
        return Err(Error::msg(format!(
            "concat_rows_interleaved: expected part rows divisible by {n_heads} heads, found {rows}"
        )));
    }
    let hd = rows / n_heads;
    let rest = &parts[0].dims()[1..];
    let mut grouped = vec![n_heads, 1, hd];
    grouped.extend_from_slice(rest);
    let views = parts.iter().map(|p| p.reshape(grouped.clone())).collect::<candle_core::Result<Vec<_>>>()?;
    let joined = Tensor::cat(&views, 1)?;
    let mut flat = vec![n_heads * parts.len() * hd];
    flat.extend_from_slice(rest);
    Ok(joined.reshape(flat)?)
}

fn rows_of(m: &Tensor, name: &str) -> Result<usize> {
    match m.dims().first() {
        Some(&r) => Ok(r),
        None => Err(Error::msg(format!("`{name}`: expected at least one dimension, found a scalar"))),
    }
}

/// Checks that the parts are non-empty and of one shape each (one block per head and part), and
/// returns the rows of one part.
fn check_parts(parts: &[Tensor], where_: &str) -> Result<usize> {
    let first = parts.first().ok_or_else(|| Error::msg(format!("{where_}: expected at least one part, found none")))?;
    let rows = rows_of(first, "parts[0]")?;
    for (k, p) in parts.iter().enumerate().skip(1) {
        if p.dims() != first.dims() {
            return Err(shape_err(&format!("parts[{k}]"), first.dims(), p.dims(), where_));
        }
    }
    Ok(rows)
}
