//! Fused CPU kernels with hand-written backward passes.
//!
//! candle's own fused `softmax_last_dim`, `layer_norm` and `rms_norm` have no backward: gradients
//! through them silently vanish. Every op here is a candle custom op whose `bwd` is exact, so the
//! models can be trained through them. The kernels are row-parallel with rayon and allocate only
//! their outputs. All ops compute in f32 on CPU. The weight operand of [`linear`] and of the fused
//! head [`linear_token_logprobs`] may also be a frozen f16 or bf16 matrix ("half-resident"): it is
//! widened a block of at most [`HALF_BLOCK_BYTES`] at a time, inside the op, forward and backward,
//! so neither the op nor the autograd graph ever holds a widened copy of the whole matrix. A half
//! matrix that fits in one block is widened whole and goes through exactly the f32 kernel (results
//! bit-identical to widening at load); larger ones are multiplied block by block (the head with an
//! online log-sum-exp over vocabulary blocks), which changes only the order of summation.

use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Storage, Tensor, D};
use rayon::prelude::*;

/// Rows smaller than this are processed without spawning rayon tasks per row.
const PAR_MIN_ELEMS: usize = 1 << 14;

fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    let data = match s {
        CpuStorage::F32(d) => d.as_slice(),
        _ => bail!("{op}: expected an f32 tensor"),
    };
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => bail!("{op}: expected a contiguous tensor"),
    }
}

/// Runs `f` on the contiguous f32 data of a CPU tensor without copying it (unless it is strided).
fn with_f32<R>(t: &Tensor, op: &str, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let t = t.contiguous()?;
    let (st, l) = t.storage_and_layout();
    match &*st {
        Storage::Cpu(c) => Ok(f(f32_slice(c, l, op)?)),
        _ => bail!("{op}: only CPU tensors are supported"),
    }
}

/// Bound on the f32 bytes of one widened block of a half-precision weight (see the module docs):
/// 64 MiB, e.g. 16,384 rows of a 1024-wide matrix. A matrix within it is widened whole.
pub const HALF_BLOCK_BYTES: usize = 64 << 20;

/// Rows of a `[_, cols]` half-precision matrix per widened block: [`HALF_BLOCK_BYTES`] worth, at
/// least one.
pub fn half_block_rows(cols: usize) -> usize {
    (HALF_BLOCK_BYTES / cols.max(1).saturating_mul(4)).max(1)
}

/// A weight matrix's contiguous data as it is resident: f32, or half precision to widen by blocks.
#[derive(Clone, Copy)]
enum WeightData<'a> {
    F32(&'a [f32]),
    F16(&'a [half::f16]),
    Bf16(&'a [half::bf16]),
}

impl<'a> WeightData<'a> {
    fn from_storage(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<Self> {
        let Some((a, b)) = l.contiguous_offsets() else { bail!("{op}: expected a contiguous tensor") };
        Ok(match s {
            CpuStorage::F32(d) => WeightData::F32(&d[a..b]),
            CpuStorage::F16(d) => WeightData::F16(&d[a..b]),
            CpuStorage::BF16(d) => WeightData::Bf16(&d[a..b]),
            _ => bail!("{op}: expected an f32, f16 or bf16 weight"),
        })
    }

    fn is_f32(&self) -> bool {
        matches!(self, WeightData::F32(_))
    }

    /// Elements `a..b` widened into `buf` (resized), or borrowed when already f32.
    fn range<'b>(&'b self, a: usize, b: usize, buf: &'b mut Vec<f32>) -> &'b [f32] {
        use half::slice::HalfFloatSliceExt;
        const PAR: usize = 1 << 16;
        if let WeightData::F32(d) = self {
            return &d[a..b];
        }
        buf.clear();
        buf.resize(b - a, 0.0);
        match self {
            WeightData::F16(d) => {
                buf.par_chunks_mut(PAR).zip(d[a..b].par_chunks(PAR)).for_each(|(o, i)| i.convert_to_f32_slice(o))
            }
            WeightData::Bf16(d) => {
                buf.par_chunks_mut(PAR).zip(d[a..b].par_chunks(PAR)).for_each(|(o, i)| i.convert_to_f32_slice(o))
            }
            WeightData::F32(_) => unreachable!("handled above"),
        }
        buf
    }

    /// Calls `f(r0, rows)` for consecutive blocks of at most `block_rows` rows of this
    /// `[rows, cols]` matrix, widened to f32. An f32 matrix, or one that fits in one block, is a
    /// single call with the whole matrix.
    fn for_each_block(
        &self,
        rows: usize,
        cols: usize,
        block_rows: usize,
        mut f: impl FnMut(usize, &[f32]) -> Result<()>,
    ) -> Result<()> {
        let mut buf = Vec::new();
        let step = if self.is_f32() { rows.max(1) } else { block_rows.max(1) };
        let mut r0 = 0;
        while r0 < rows {
            let r1 = (r0 + step).min(rows);
            f(r0, self.range(r0 * cols, r1 * cols, &mut buf))?;
            r0 = r1;
        }
        Ok(())
    }
}

/// Runs `f` on the contiguous data of a CPU weight tensor (f32, f16 or bf16) without copying it.
fn with_weight<R>(t: &Tensor, op: &str, f: impl FnOnce(WeightData<'_>) -> R) -> Result<R> {
    let t = t.contiguous()?;
    let (st, l) = t.storage_and_layout();
    match &*st {
        Storage::Cpu(c) => Ok(f(WeightData::from_storage(c, l, op)?)),
        _ => bail!("{op}: only CPU tensors are supported"),
    }
}

fn last_dim(shape: &Shape) -> Result<usize> {
    match shape.dims().last() {
        Some(&d) if d > 0 => Ok(d),
        _ => bail!("expected a tensor with a non-empty last dimension, found shape {shape:?}"),
    }
}

fn par_rows_mut(out: &mut [f32], d: usize, f: impl Fn(usize, &mut [f32]) + Sync + Send) {
    if out.len() >= PAR_MIN_ELEMS {
        out.par_chunks_mut(d).enumerate().for_each(|(i, r)| f(i, r));
    } else {
        out.chunks_mut(d).enumerate().for_each(|(i, r)| f(i, r));
    }
}

// ---------------------------------------------------------------------------------------------
// Branch-free exp and tanh that LLVM vectorises (libm's are scalar calls): Cody-Waite range
// reduction and a degree-6 polynomial, within 2 ulp of `f32::exp` over the range that matters.

#[inline(always)]
pub(crate) fn fast_exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let x = x.clamp(-87.0, 88.0);
    // Round to nearest by the 1.5·2²³ trick: plain adds, so the loop still vectorises
    // (`f32::round` is a libm call).
    const SHIFT: f32 = 12_582_912.0;
    let n = (x * LOG2E + SHIFT) - SHIFT;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    // exp(r) on |r| <= ln2/2: Taylor coefficients to r^7 (error < 2e-8 relative).
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0 + r * (1.0 / 5040.0)))))));
    let bits = ((n as i32 + 127) as u32) << 23;
    p * f32::from_bits(bits)
}

/// `tanh(x) = sign(x)·(1 - e)/(1 + e)` with `e = exp(-2|x|)`; absolute error below 1e-7.
#[inline(always)]
pub(crate) fn fast_tanh(x: f32) -> f32 {
    let e = fast_exp(-2.0 * x.abs());
    ((1.0 - e) / (1.0 + e)).copysign(x)
}

// Slice kernels compiled for several SIMD levels (AVX-512, AVX2+FMA, SSE) and picked at run time.
// Sums use independent lane accumulators so the compiler may vectorise them (a plain `sum()`
// fixes the order of additions and stays scalar).

const LANES: usize = 16;

#[multiversion::multiversion(targets = "simd")]
fn max_f32(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for k in 0..LANES {
            acc[k] = acc[k].max(c[k]);
        }
    }
    let mut m = chunks.remainder().iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for a in acc {
        m = m.max(a);
    }
    m
}

/// `o = exp(x - m)`, returning the sum of `o`.
#[multiversion::multiversion(targets = "simd")]
fn exp_sub_store(x: &[f32], m: f32, o: &mut [f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let n = x.len() / LANES * LANES;
    for (xc, oc) in x[..n].chunks_exact(LANES).zip(o[..n].chunks_exact_mut(LANES)) {
        for k in 0..LANES {
            let e = fast_exp(xc[k] - m);
            oc[k] = e;
            acc[k] += e;
        }
    }
    let mut s = 0.0;
    for j in n..x.len() {
        let e = fast_exp(x[j] - m);
        o[j] = e;
        s += e;
    }
    s + acc.iter().sum::<f32>()
}

/// `o = exp(o - m)`, returning the sum.
#[multiversion::multiversion(targets = "simd")]
fn exp_sub_in_place(o: &mut [f32], m: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = o.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for k in 0..LANES {
            c[k] = fast_exp(c[k] - m);
            acc[k] += c[k];
        }
    }
    let mut s = 0.0;
    for v in chunks.into_remainder() {
        *v = fast_exp(*v - m);
        s += *v;
    }
    s + acc.iter().sum::<f32>()
}

/// `sum(exp(x - m))`.
#[multiversion::multiversion(targets = "simd")]
fn exp_sub_sum(x: &[f32], m: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = x.chunks_exact(LANES);
    for c in &mut chunks {
        for k in 0..LANES {
            acc[k] += fast_exp(c[k] - m);
        }
    }
    chunks.remainder().iter().map(|&v| fast_exp(v - m)).sum::<f32>() + acc.iter().sum::<f32>()
}

#[multiversion::multiversion(targets = "simd")]
fn scale_in_place(o: &mut [f32], s: f32) {
    for v in o {
        *v *= s;
    }
}

#[multiversion::multiversion(targets = "simd")]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let n = a.len().min(b.len()) / LANES * LANES;
    for (ac, bc) in a[..n].chunks_exact(LANES).zip(b[..n].chunks_exact(LANES)) {
        for k in 0..LANES {
            acc[k] += ac[k] * bc[k];
        }
    }
    a[n..].iter().zip(&b[n..]).map(|(x, y)| x * y).sum::<f32>() + acc.iter().sum::<f32>()
}

/// `o = y·(g - dot(g, y))`: softmax backward of one row.
#[multiversion::multiversion(targets = "simd")]
fn softmax_bwd_row(y: &[f32], g: &[f32], o: &mut [f32]) {
    let d = dot(y, g);
    for ((oi, &yi), &gi) in o.iter_mut().zip(y).zip(g) {
        *oi = yi * (gi - d);
    }
}

/// `o = -g·exp(x - lse)`: the softmax part of the log-prob backward.
#[multiversion::multiversion(targets = "simd")]
fn neg_scaled_softmax(x: &[f32], lse: f32, g: f32, o: &mut [f32]) {
    for (oi, &xi) in o.iter_mut().zip(x) {
        *oi = -g * fast_exp(xi - lse);
    }
}

/// `o = -g·exp(o - lse)` in place: [`neg_scaled_softmax`] over a buffer of logits.
#[multiversion::multiversion(targets = "simd")]
fn neg_scaled_softmax_in_place(o: &mut [f32], lse: f32, g: f32) {
    for v in o {
        *v = -g * fast_exp(*v - lse);
    }
}

#[multiversion::multiversion(targets = "simd")]
fn gelu_fwd_slice(x: &[f32], o: &mut [f32]) {
    for (oi, &v) in o.iter_mut().zip(x) {
        *oi = v * 0.5 * (1.0 + fast_tanh(GELU_C * v * (1.0 + GELU_C3 * v * v)));
    }
}

#[multiversion::multiversion(targets = "simd")]
fn gelu_bwd_slice(x: &[f32], g: &[f32], o: &mut [f32]) {
    for ((oi, &v), &gv) in o.iter_mut().zip(x).zip(g) {
        let t = fast_tanh(GELU_C * v * (1.0 + GELU_C3 * v * v));
        let ff = 0.5 * v * ((1.0 - t * t) * (GELU_C + 0.107_032_22 * v * v)) + 0.5 * (1.0 + t);
        *oi = ff * gv;
    }
}

// ---------------------------------------------------------------------------------------------
// softmax over the last dimension

struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "hetfed-softmax"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "softmax")?;
        let d = last_dim(l.shape())?;
        let mut out = vec![0f32; x.len()];
        par_rows_mut(&mut out, d, |i, o| softmax_row(&x[i * d..(i + 1) * d], o));
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }
    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(res.apply_op2_no_bwd(&grad.contiguous()?, &SoftmaxBwd)?))
    }
}

#[inline]
fn softmax_row(x: &[f32], o: &mut [f32]) {
    let m = max_f32(x);
    let z = exp_sub_store(x, m, o);
    scale_in_place(o, 1.0 / z);
}

struct SoftmaxBwd;

impl CustomOp2 for SoftmaxBwd {
    fn name(&self) -> &'static str {
        "hetfed-softmax-bwd"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let y = f32_slice(s1, l1, "softmax-bwd")?;
        let g = f32_slice(s2, l2, "softmax-bwd")?;
        let d = last_dim(l1.shape())?;
        let mut out = vec![0f32; y.len()];
        par_rows_mut(&mut out, d, |i, o| softmax_bwd_row(&y[i * d..(i + 1) * d], &g[i * d..(i + 1) * d], o));
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// Softmax over the last dimension, with a backward pass.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Softmax)
}

// ---------------------------------------------------------------------------------------------
// causal attention softmax: softmax_j(scale·s_ij + slope_h·j), keys j > past + i masked out

struct CausalSoftmax {
    scale: f32,
    /// Per-head ALiBi slopes (BLOOM); empty for none (Llama).
    slopes: Vec<f32>,
    past: usize,
    /// Per batch row, the number of leading padding keys to mask (left-padded batches); empty
    /// for none.
    left_pad: Vec<usize>,
}

impl CausalSoftmax {
    /// (head, query position) of row `r` of a `[b, h, t, s]` tensor.
    #[inline]
    fn row_info(&self, r: usize, heads: usize, t: usize) -> (usize, usize) {
        ((r / t) % heads, r % t)
    }
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "hetfed-causal-softmax"
    }
    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(st, l, "causal_softmax")?;
        let (_, h, t, s) = l.shape().dims4()?;
        let b = l.shape().dims()[0];
        if s != self.past + t
            || (!self.slopes.is_empty() && self.slopes.len() != h)
            || (!self.left_pad.is_empty() && self.left_pad.len() != b)
        {
            bail!(
                "causal_softmax: expected {} keys, {h} slopes and {b} padding counts, found {s}, {} and {}",
                self.past + t,
                self.slopes.len(),
                self.left_pad.len()
            );
        }
        let mut out = vec![0f32; x.len()];
        par_rows_mut(&mut out, s, |r, o| {
            let (head, i) = self.row_info(r, h, t);
            let lo = self.left_pad.get(r / (h * t)).copied().unwrap_or(0);
            let n = self.past + i + 1; // keys up to and including this position
            if lo >= n {
                return; // a padding query sees no real key: its output stays 0
            }
            let xr = &x[r * s + lo..r * s + n];
            let slope = self.slopes.get(head).copied().unwrap_or(0.0);
            for (j, (oj, &xj)) in o[lo..n].iter_mut().zip(xr).enumerate() {
                *oj = self.scale * xj + slope * (lo + j) as f32;
            }
            let vis = &mut o[lo..n];
            let m = max_f32(vis);
            let z = exp_sub_in_place(vis, m);
            scale_in_place(vis, 1.0 / z);
        });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }
    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        // Masked entries have y = 0, so softmax's backward already gives them zero gradient.
        let dx = res.apply_op2_no_bwd(&grad.contiguous()?, &SoftmaxBwd)?;
        Ok(Some((dx * self.scale as f64)?))
    }
}

/// Causal attention probabilities from raw scores `[b, h, t, past + t]`: query `i` sees keys
/// `left_pad[b]..=past + i`; `slopes` (one per head) add BLOOM's ALiBi bias `slope·j`, which
/// equals `slope·(j - i)` (and `slope·(j - left_pad)`) after normalisation. With a backward pass.
pub fn causal_softmax(
    scores: &Tensor,
    scale: f64,
    slopes: Option<&[f32]>,
    past: usize,
    left_pad: Option<&[usize]>,
) -> Result<Tensor> {
    scores.contiguous()?.apply_op1(CausalSoftmax {
        scale: scale as f32,
        slopes: slopes.map(<[f32]>::to_vec).unwrap_or_default(),
        past,
        left_pad: left_pad.map(<[usize]>::to_vec).unwrap_or_default(),
    })
}

// ---------------------------------------------------------------------------------------------
// linear layer y = x·Wᵀ + b, with a backward that writes dx, dW and db directly

/// `dst[m×n] (+)= lhs[m×k]·rhs[k×n]` on row-major buffers given as (row stride, col stride).
#[allow(clippy::too_many_arguments)]
fn gemm_f32(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    accumulate: bool,
    lhs: &[f32],
    lhs_strides: (usize, usize),
    rhs: &[f32],
    rhs_strides: (usize, usize),
) {
    gemm_f32_strided(m, n, k, dst, n, accumulate, lhs, lhs_strides, rhs, rhs_strides)
}

/// [`gemm_f32`] into a destination whose rows are `dst_rs` apart (a block of its columns).
#[allow(clippy::too_many_arguments)]
fn gemm_f32_strided(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    accumulate: bool,
    lhs: &[f32],
    (lhs_rs, lhs_cs): (usize, usize),
    rhs: &[f32],
    (rhs_rs, rhs_cs): (usize, usize),
) {
    if m == 0 || n == 0 {
        return;
    }
    assert!(dst_rs >= n && dst.len() >= (m - 1) * dst_rs + n, "gemm: destination out of bounds");
    let threads = rayon::current_num_threads();
    let par =
        if threads > 1 && m * n * k > 1 << 15 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
    // SAFETY: the strides describe in-bounds views of the slices (checked by the callers'
    // shape validation), and dst does not alias lhs or rhs.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            lhs.as_ptr(),
            lhs_cs as isize,
            lhs_rs as isize,
            rhs.as_ptr(),
            rhs_cs as isize,
            rhs_rs as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        )
    }
}

struct LinearOp {
    bias: bool,
    /// Rows of a half-precision weight widened per block (see [`half_block_rows`]).
    block_rows: usize,
}

impl LinearOp {
    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        x: &[f32],
        w: WeightData<'_>,
        b: Option<&[f32]>,
        rows: usize,
        din: usize,
        dout: usize,
    ) -> Result<Vec<f32>> {
        let mut y = vec![0f32; rows * dout];
        if let Some(b) = b {
            y.chunks_mut(dout).for_each(|r| r.copy_from_slice(b));
        }
        // lhs x: [rows × din]; rhs Wᵀ: element (i, j) = W[j, i] → strides (1, din). A block of W's
        // rows is a block of y's columns.
        w.for_each_block(dout, din, self.block_rows, |r0, wb| {
            let n = wb.len() / din;
            if rows > 0 {
                gemm_f32_strided(rows, n, din, &mut y[r0..], dout, b.is_some(), x, (din, 1), wb, (1, din));
            }
            Ok(())
        })?;
        Ok(y)
    }

    fn dims(l1: &Layout, l2: &Layout) -> Result<(usize, usize, usize)> {
        let (rows, din) = l1.shape().dims2()?;
        let (dout, din2) = l2.shape().dims2()?;
        if din != din2 {
            bail!("linear: input has {din} features but the weight expects {din2}");
        }
        Ok((rows, din, dout))
    }

    fn backward(
        &self,
        x: &Tensor,
        w: &Tensor,
        grad: &Tensor,
        need_w: bool,
    ) -> Result<(Tensor, Option<Tensor>, Option<Tensor>)> {
        let (rows, din) = x.dims2()?;
        let dout = w.dim(0)?;
        let dev = x.device();
        let (dx, dw, db) = with_f32(x, "linear-bwd", |xs| {
            with_weight(w, "linear-bwd", |ws| {
                with_f32(grad, "linear-bwd", |g| -> Result<_> {
                    if need_w && !ws.is_f32() {
                        bail!("linear: a half-precision weight is frozen; widen it to f32 to train it");
                    }
                    // dx = g·W: [rows × dout]·[dout × din], a block of W's rows (g's columns) at a time.
                    let mut dx = vec![0f32; rows * din];
                    ws.for_each_block(dout, din, self.block_rows, |r0, wb| {
                        let n = wb.len() / din;
                        if rows > 0 {
                            gemm_f32(rows, din, n, &mut dx, r0 > 0, &g[r0..], (dout, 1), wb, (din, 1));
                        }
                        Ok(())
                    })?;
                    // dW = gᵀ·x: [dout × rows]·[rows × din]
                    let dw = match (need_w, ws) {
                        (true, WeightData::F32(_)) => {
                            let mut dw = vec![0f32; dout * din];
                            gemm_f32(dout, din, rows, &mut dw, false, g, (1, dout), xs, (din, 1));
                            Some(dw)
                        }
                        _ => None,
                    };
                    let db = (self.bias && need_w).then(|| {
                        let mut db = vec![0f32; dout];
                        for r in g.chunks(dout) {
                            db.iter_mut().zip(r).for_each(|(a, b)| *a += b);
                        }
                        db
                    });
                    Ok((dx, dw, db))
                })
            })
        })????;
        Ok((
            Tensor::from_vec(dx, (rows, din), dev)?,
            dw.map(|v| Tensor::from_vec(v, (dout, din), dev)).transpose()?,
            db.map(|v| Tensor::from_vec(v, dout, dev)).transpose()?,
        ))
    }
}

impl CustomOp2 for LinearOp {
    fn name(&self) -> &'static str {
        "hetfed-linear"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (rows, din, dout) = Self::dims(l1, l2)?;
        let w = WeightData::from_storage(s2, l2, "linear")?;
        let y = self.forward(f32_slice(s1, l1, "linear")?, w, None, rows, din, dout)?;
        Ok((CpuStorage::F32(y), Shape::from((rows, dout))))
    }
    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = self.backward(x, w, grad, w.track_op())?;
        Ok((x.track_op().then_some(dx), dw))
    }
}

impl CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "hetfed-linear-bias"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (rows, din, dout) = Self::dims(l1, l2)?;
        let b = f32_slice(s3, l3, "linear")?;
        if b.len() != dout {
            bail!("linear: expected a bias of size {dout}, found {}", b.len());
        }
        let w = WeightData::from_storage(s2, l2, "linear")?;
        let y = self.forward(f32_slice(s1, l1, "linear")?, w, Some(b), rows, din, dout)?;
        Ok((CpuStorage::F32(y), Shape::from((rows, dout))))
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // A frozen layer (LoRA, inference) skips dW and db: only dx is needed.
        let need_w = w.track_op() || b.track_op();
        let (dx, dw, db) = self.backward(x, w, grad, need_w)?;
        Ok((x.track_op().then_some(dx), dw.filter(|_| w.track_op()), db.filter(|_| b.track_op())))
    }
}

/// `x·Wᵀ + b` for `x: [rows, in]`, `W: [out, in]`, optional `b: [out]`, computed by one gemm
/// call straight into the output, with a backward pass that writes dx, dW and db directly and
/// skips dW/db for frozen weights.
///
/// `W` may be a frozen f16 or bf16 matrix: it is widened [`half_block_rows`] rows at a time inside
/// the op (forward and backward, which then computes dx only), never whole unless it fits in one
/// block. Training such a weight is an error: widen it to f32 first.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    linear_blocked(x, w, b, half_block_rows(w.dim(1)?))
}

/// [`linear`] with an explicit number of rows per widened block of a half-precision weight.
pub fn linear_blocked(x: &Tensor, w: &Tensor, b: Option<&Tensor>, block_rows: usize) -> Result<Tensor> {
    let (x, w) = (x.contiguous()?, w.contiguous()?);
    let block_rows = block_rows.max(1);
    match b {
        Some(b) => {
            // Biases are small: one kept in half precision is widened here (a no-op for f32).
            let b = b.to_dtype(candle_core::DType::F32)?.contiguous()?;
            x.apply_op3(&w, &b, LinearOp { bias: true, block_rows })
        }
        None => x.apply_op2(&w, LinearOp { bias: false, block_rows }),
    }
}

// ---------------------------------------------------------------------------------------------
// LayerNorm

struct LayerNorm {
    eps: f32,
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "hetfed-layer-norm"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "layer_norm")?;
        let w = f32_slice(s2, l2, "layer_norm")?;
        let b = f32_slice(s3, l3, "layer_norm")?;
        let d = last_dim(l1.shape())?;
        if w.len() != d || b.len() != d {
            bail!("layer_norm: expected weight and bias of size {d}, found {} and {}", w.len(), b.len());
        }
        let eps = self.eps;
        let mut out = vec![0f32; x.len()];
        par_rows_mut(&mut out, d, |i, o| {
            let xr = &x[i * d..(i + 1) * d];
            let (mean, rstd) = mean_rstd(xr, eps);
            for j in 0..d {
                o[j] = (xr[j] - mean) * rstd * w[j] + b[j];
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = x.dim(D::Minus1)?;
        let eps = self.eps;
        let (dx, dw, db) = with_f32(x, "layer_norm-bwd", |x| {
            with_f32(w, "layer_norm-bwd", |w| {
                with_f32(grad, "layer_norm-bwd", |g| norm_bwd(x, w, g, d, |xr| mean_rstd(xr, eps), true))
            })
        })????;
        let dx = Tensor::from_vec(dx, x.shape(), x.device())?;
        let dw = Tensor::from_vec(dw, d, x.device())?;
        let db = Tensor::from_vec(db.unwrap_or_default(), d, x.device())?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

#[inline]
fn mean_rstd(x: &[f32], eps: f32) -> (f32, f32) {
    let n = x.len() as f32;
    let mean = x.iter().sum::<f32>() / n;
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    (mean, 1.0 / (var + eps).sqrt())
}

#[inline]
fn rms_rstd(x: &[f32], eps: f32) -> (f32, f32) {
    let n = x.len() as f32;
    let ms = x.iter().map(|v| v * v).sum::<f32>() / n;
    (0.0, 1.0 / (ms + eps).sqrt())
}

type NormGrads = (Vec<f32>, Vec<f32>, Option<Vec<f32>>);

/// Backward of `y = (x - mean)·rstd·w (+ b)` over rows of length `d`; `stats` gives (mean, rstd)
/// of a row (mean 0 for RMSNorm). Returns dx, dw and (when `with_bias`) db.
fn norm_bwd(
    x: &[f32],
    w: &[f32],
    g: &[f32],
    d: usize,
    stats: impl Fn(&[f32]) -> (f32, f32) + Sync,
    with_bias: bool,
) -> Result<NormGrads> {
    if w.len() != d || x.len() != g.len() {
        bail!("norm backward: expected weight of size {d} and matching grad, found {} and {}", w.len(), g.len());
    }
    let rows = x.len() / d;
    let center = with_bias; // LayerNorm subtracts the mean; RMSNorm does not.
    let mut dx = vec![0f32; x.len()];
    // Per-chunk partial sums of dw/db, reduced afterwards: deterministic for a fixed thread count
    // of chunks since chunking does not depend on scheduling.
    let chunk_rows = rows.div_ceil(rayon::current_num_threads().max(1) * 4).max(1);
    let partials: Vec<(Vec<f32>, Vec<f32>)> = dx
        .par_chunks_mut(chunk_rows * d)
        .enumerate()
        .map(|(c, dxc)| {
            let mut dw = vec![0f32; d];
            let mut db = vec![0f32; if with_bias { d } else { 0 }];
            let mut xhat = vec![0f32; d];
            for (r, dxr) in dxc.chunks_mut(d).enumerate() {
                let i = c * chunk_rows + r;
                let xr = &x[i * d..(i + 1) * d];
                let gr = &g[i * d..(i + 1) * d];
                let (mean, rstd) = stats(xr);
                let mut s1 = 0f32; // mean(dxhat)
                let mut s2 = 0f32; // mean(dxhat * xhat)
                for j in 0..d {
                    xhat[j] = (xr[j] - mean) * rstd;
                    let dxh = gr[j] * w[j];
                    s1 += dxh;
                    s2 += dxh * xhat[j];
                    dw[j] += gr[j] * xhat[j];
                    if with_bias {
                        db[j] += gr[j];
                    }
                }
                let n = d as f32;
                let (s1, s2) = (if center { s1 / n } else { 0.0 }, s2 / n);
                for j in 0..d {
                    dxr[j] = rstd * (gr[j] * w[j] - s1 - xhat[j] * s2);
                }
            }
            (dw, db)
        })
        .collect();
    let mut dw = vec![0f32; d];
    let mut db = vec![0f32; d];
    for (pw, pb) in partials {
        dw.iter_mut().zip(&pw).for_each(|(a, b)| *a += b);
        db.iter_mut().zip(&pb).for_each(|(a, b)| *a += b);
    }
    Ok((dx, dw, with_bias.then_some(db)))
}

/// LayerNorm over the last dimension (biased variance, as PyTorch), with a backward pass for the
/// input, the gain and the bias.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?.apply_op3(&w.contiguous()?, &b.contiguous()?, LayerNorm { eps: eps as f32 })
}

// ---------------------------------------------------------------------------------------------
// RMSNorm

struct RmsNorm {
    eps: f32,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "hetfed-rms-norm"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "rms_norm")?;
        let w = f32_slice(s2, l2, "rms_norm")?;
        let d = last_dim(l1.shape())?;
        if w.len() != d {
            bail!("rms_norm: expected a weight of size {d}, found {}", w.len());
        }
        let eps = self.eps;
        let mut out = vec![0f32; x.len()];
        par_rows_mut(&mut out, d, |i, o| {
            let xr = &x[i * d..(i + 1) * d];
            let (_, rstd) = rms_rstd(xr, eps);
            for j in 0..d {
                o[j] = xr[j] * rstd * w[j];
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let d = x.dim(D::Minus1)?;
        let eps = self.eps;
        let (dx, dw, _) = with_f32(x, "rms_norm-bwd", |x| {
            with_f32(w, "rms_norm-bwd", |w| {
                with_f32(grad, "rms_norm-bwd", |g| norm_bwd(x, w, g, d, |xr| rms_rstd(xr, eps), false))
            })
        })????;
        Ok((Some(Tensor::from_vec(dx, x.shape(), x.device())?), Some(Tensor::from_vec(dw, d, x.device())?)))
    }
}

/// RMSNorm over the last dimension (`x / sqrt(mean(x²) + eps) · w`), with a backward pass.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?.apply_op2(&w.contiguous()?, RmsNorm { eps: eps as f32 })
}

// ---------------------------------------------------------------------------------------------
// BLOOM's tanh-GELU

// BLOOM's own constants (modeling_bloom.py), not sqrt(2/pi) to more digits: parity needs these.
#[allow(clippy::excessive_precision)]
const GELU_C: f32 = 0.797_884_56;
const GELU_C3: f32 = 0.044_715;

struct Gelu;

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "hetfed-gelu-tanh"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "gelu")?;
        let mut out = vec![0f32; x.len()];
        const CHUNK: usize = 1 << 13;
        out.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(o, x)| gelu_fwd_slice(x, o));
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }
    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(arg.contiguous()?.apply_op2_no_bwd(&grad.contiguous()?, &GeluBwd)?))
    }
}

struct GeluBwd;

impl CustomOp2 for GeluBwd {
    fn name(&self) -> &'static str {
        "hetfed-gelu-tanh-bwd"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s1, l1, "gelu-bwd")?;
        let g = f32_slice(s2, l2, "gelu-bwd")?;
        let mut out = vec![0f32; x.len()];
        const CHUNK: usize = 1 << 13;
        out.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK))
            .zip(g.par_chunks(CHUNK))
            .for_each(|((o, x), g)| gelu_bwd_slice(x, g, o));
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// BLOOM's GELU: `x·0.5·(1 + tanh(0.79788456·x·(1 + 0.044715·x²)))`, with a backward pass.
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Gelu)
}

// ---------------------------------------------------------------------------------------------
// log-probability of target tokens (the LM loss, fused)

struct TokenLogProb {
    targets: Vec<u32>,
}

impl CustomOp1 for TokenLogProb {
    fn name(&self) -> &'static str {
        "hetfed-token-logprob"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "token_logprob")?;
        let v = last_dim(l.shape())?;
        let n = x.len() / v;
        if n != self.targets.len() {
            bail!("token_logprob: expected {n} targets, found {}", self.targets.len());
        }
        if let Some(&t) = self.targets.iter().find(|&&t| t as usize >= v) {
            bail!("token_logprob: target id {t} is outside the vocabulary of {v}");
        }
        let out: Vec<f32> = (0..n)
            .into_par_iter()
            .map(|i| {
                let r = &x[i * v..(i + 1) * v];
                r[self.targets[i] as usize] - logsumexp(r)
            })
            .collect();
        let dims = l.shape().dims();
        Ok((CpuStorage::F32(out), Shape::from(&dims[..dims.len() - 1])))
    }
    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let v = arg.dim(D::Minus1)?;
        let targets = &self.targets;
        let dx = with_f32(arg, "token_logprob-bwd", |x| {
            with_f32(grad, "token_logprob-bwd", |g| {
                let mut dx = vec![0f32; x.len()];
                dx.par_chunks_mut(v).enumerate().for_each(|(i, o)| {
                    let gi = g[i];
                    if gi == 0.0 {
                        return; // masked position: no gradient, skip the exp work
                    }
                    let r = &x[i * v..(i + 1) * v];
                    neg_scaled_softmax(r, logsumexp(r), gi, o);
                    o[targets[i] as usize] += gi;
                });
                dx
            })
        })??;
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}

#[inline]
fn logsumexp(r: &[f32]) -> f32 {
    let m = max_f32(r);
    m + exp_sub_sum(r, m).ln()
}

/// `out[.., i] = log_softmax(logits[.., i, :])[targets[i]]` over the flattened leading dims:
/// the log-probability of each target token, with a backward pass. `targets` has one id per row.
pub fn token_logprobs(logits: &Tensor, targets: &[u32]) -> Result<Tensor> {
    logits.contiguous()?.apply_op1(TokenLogProb { targets: targets.to_vec() })
}

// ---------------------------------------------------------------------------------------------
// LM head and target log-probability fused, in chunks of rows: the logits are never whole
//
// For a row x with logits l = W·x, p = softmax(l) and target t, the output is l[t] − lse(l) and
// its gradient, for an incoming scalar g, is
//     dx = g·(W[t] − pᵀW)          dW = g·(onehot(t) − p)·xᵀ.
// The direction q = W[t] − pᵀW does not depend on g, so the forward computes it per chunk while
// that chunk's softmax is at hand (one [rows × vocab]·[vocab × h] product, what the unfused
// backward spends on dx anyway) and keeps only q ([n, h]); the backward's dx is then g·q. The
// head's gradient needs g inside the outer product: the backward recomputes each chunk's logits
// for it (as Liger Kernel's fused linear cross-entropy does), and only when the head is tracked.

/// Bound on the logits one chunk of [`linear_token_logprobs`] holds at a time: 64 MiB of f32,
/// i.e. 66 rows at BLOOM's vocabulary of 250,880 (the whole `[rows, vocab]` logits of a batch of
/// 8 × 128 tokens would be 1 GiB, and their gradient another).
pub const HEAD_CHUNK_BYTES: usize = 64 << 20;

/// Rows per chunk for a vocabulary of `vocab`: as many as keep one chunk's logits within
/// [`HEAD_CHUNK_BYTES`], at least one.
pub fn head_chunk_rows(vocab: usize) -> usize {
    (HEAD_CHUNK_BYTES / vocab.max(1).saturating_mul(4)).max(1)
}

#[cfg(test)]
thread_local! {
    /// Chunks whose head gradient this thread computed: lets a test see that a frozen head
    /// costs no gradient work.
    static HEAD_GRAD_CHUNKS: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

struct LinearTokenLogProb {
    targets: Vec<u32>,
    chunk_rows: usize,
    /// Vocabulary rows of a half-precision head widened per block (see [`half_block_rows`]).
    block_rows: usize,
    /// The hidden states are tracked: the forward computes `q` (see above) for the backward.
    with_dx: bool,
    /// The head is tracked: when every row fits in one chunk, the forward keeps that chunk's
    /// softmax for the head's gradient instead of having the backward recompute the product
    /// (what keeps full fine-tuning at small vocabularies, e.g. the pretraining recipes' 8192, as
    /// fast as the unfused head). Bounded by [`HEAD_CHUNK_BYTES`] like any chunk.
    with_dw: bool,
    /// `[n, h]`: per row `W[t] − pᵀW`, written by the forward when `with_dx`.
    q: std::sync::Mutex<Option<Vec<f32>>>,
    /// `[n, vocab]`: the softmax of all rows, when `with_dw` and `n` rows are one chunk.
    probs: std::sync::Mutex<Option<Vec<f32>>>,
}

impl LinearTokenLogProb {
    fn dims(&self, l1: &Layout, l2: &Layout) -> Result<(usize, usize, usize)> {
        let (n, h) = l1.shape().dims2()?;
        let (v, h2) = l2.shape().dims2()?;
        if h != h2 {
            bail!("linear_token_logprobs: hidden states have {h} features but the head expects {h2}");
        }
        if n != self.targets.len() {
            bail!("linear_token_logprobs: expected {n} targets, found {}", self.targets.len());
        }
        if let Some(&t) = self.targets.iter().find(|&&t| t as usize >= v) {
            bail!("linear_token_logprobs: target id {t} is outside the vocabulary of {v}");
        }
        Ok((n, h, v))
    }

    /// The head's gradient `Σ_i g_i·(onehot(t_i) − p_i)·x_iᵀ` over the rows whose incoming
    /// gradient is not zero (masked targets and padding contribute nothing, so their logits are
    /// not even recomputed), a chunk at a time: the chunk's softmax (kept by the forward, or its
    /// logits again), turned in place into `dL`, then `dW += dLᵀ·x`.
    fn head_grad(&self, x: &[f32], w: &[f32], g: &[f32], (n, h, v): (usize, usize, usize)) -> Vec<f32> {
        let active: Vec<usize> = (0..n).filter(|&i| g[i] != 0.0).collect();
        let mut dw = vec![0f32; v * h];
        let c = self.chunk_rows.min(active.len()).max(1);
        // Kept softmax of all n rows (one chunk): its active rows, moved to the front, are this
        // single chunk's. Taken, so a second backward through the same graph recomputes.
        let kept = self.probs.lock().map(|mut s| s.take()).unwrap_or(None).filter(|p| p.len() == n * v);
        let reuse = kept.is_some();
        let mut buf = match kept {
            Some(mut p) => {
                for (k, &i) in active.iter().enumerate() {
                    if k != i {
                        p.copy_within(i * v..(i + 1) * v, k * v);
                    }
                }
                p
            }
            None => vec![0f32; c * v],
        };
        let mut xc = vec![0f32; c * h];
        let targets = &self.targets;
        for rows in active.chunks(c) {
            let m = rows.len();
            for (k, &i) in rows.iter().enumerate() {
                xc[k * h..(k + 1) * h].copy_from_slice(&x[i * h..(i + 1) * h]);
            }
            let (xc, lg) = (&xc[..m * h], &mut buf[..m * v]);
            if !reuse {
                head_logits(xc, w, h, v, lg);
            }
            lg.par_chunks_mut(v).zip(rows.par_iter()).for_each(|(r, &i)| {
                if reuse {
                    scale_in_place(r, -g[i]);
                } else {
                    let lse = logsumexp(r);
                    neg_scaled_softmax_in_place(r, lse, g[i]);
                }
                r[targets[i] as usize] += g[i];
            });
            // dW += dLᵀ·x: [v × m]·[m × h]
            gemm_f32(v, h, m, &mut dw, true, lg, (1, v), xc, (h, 1));
            #[cfg(test)]
            HEAD_GRAD_CHUNKS.with(|c| c.set(c.get() + 1));
        }
        dw
    }
}

/// `out[m × v] = x[m × h]·Wᵀ` for a head `W: [v × h]`.
fn head_logits(x: &[f32], w: &[f32], h: usize, v: usize, out: &mut [f32]) {
    let m = x.len() / h;
    gemm_f32(m, v, h, out, false, x, (h, 1), w, (1, h));
}

impl CustomOp2 for LinearTokenLogProb {
    fn name(&self) -> &'static str {
        "hetfed-linear-token-logprob"
    }
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, h, v) = self.dims(l1, l2)?;
        let x = f32_slice(s1, l1, "linear_token_logprobs")?;
        let wd = WeightData::from_storage(s2, l2, "linear_token_logprobs")?;
        let out = match wd {
            WeightData::F32(w) => self.fwd_f32(x, w, (n, h, v))?,
            _ if self.with_dw => {
                bail!("linear_token_logprobs: a half-precision head is frozen; widen it to f32 to train it")
            }
            // A head within one block: widened whole, then exactly the f32 kernel.
            _ if self.block_rows >= v => {
                let mut buf = Vec::new();
                self.fwd_f32(x, wd.range(0, v * h, &mut buf), (n, h, v))?
            }
            _ => self.fwd_blocked(x, wd, (n, h, v))?,
        };
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }
    fn bwd(&self, x: &Tensor, w: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        self.backward(x, w, grad)
    }
}

impl LinearTokenLogProb {
    fn fwd_f32(&self, x: &[f32], w: &[f32], (n, h, v): (usize, usize, usize)) -> Result<Vec<f32>> {
        let mut out = vec![0f32; n];
        let mut q = vec![0f32; if self.with_dx { n * h } else { 0 }];
        let c = self.chunk_rows.min(n).max(1);
        let keep_probs = self.with_dw && n <= c;
        let softmax = self.with_dx || keep_probs;
        let mut buf = vec![0f32; c * v];
        for (ci, oc) in out.chunks_mut(c).enumerate() {
            let (r0, m) = (ci * c, oc.len());
            let lg = &mut buf[..m * v];
            head_logits(&x[r0 * h..(r0 + m) * h], w, h, v, lg);
            let t = &self.targets[r0..r0 + m];
            oc.par_iter_mut().zip(lg.par_chunks_mut(v)).zip(t.par_iter()).for_each(|((o, r), &t)| {
                let lse = logsumexp(r);
                *o = r[t as usize] - lse;
                if softmax {
                    exp_sub_in_place(r, lse);
                }
            });
            if self.with_dx {
                // q = W[t] − pᵀW: [m × v]·[v × h], then the target rows of W.
                let qc = &mut q[r0 * h..(r0 + m) * h];
                gemm_f32(m, h, v, qc, false, lg, (v, 1), w, (h, 1));
                qc.par_chunks_mut(h).zip(t.par_iter()).for_each(|(qr, &t)| {
                    let wt = &w[t as usize * h..(t as usize + 1) * h];
                    qr.iter_mut().zip(wt).for_each(|(a, b)| *a = b - *a);
                });
            }
        }
        if self.with_dx {
            *self.q.lock().map_err(|_| candle_core::Error::Msg("linear_token_logprobs: poisoned lock".into()))? =
                Some(q);
        }
        if keep_probs {
            buf.truncate(n * v);
            *self.probs.lock().map_err(|_| candle_core::Error::Msg("linear_token_logprobs: poisoned lock".into()))? =
                Some(buf);
        }
        Ok(out)
    }

    /// The forward for a half-precision head larger than one block: the vocabulary is walked a
    /// widened block of [`LinearTokenLogProb::block_rows`] rows at a time for a group of rows,
    /// keeping per row a running maximum `m`, the sum `s = Σ exp(l − m)` and, for the hidden
    /// states' gradient, `Σ exp(l − m)·W[v]`, all rescaled when `m` grows (an online log-sum-exp).
    /// A group's logits for one block stay within [`HEAD_CHUNK_BYTES`].
    fn fwd_blocked(&self, x: &[f32], w: WeightData<'_>, (n, h, v): (usize, usize, usize)) -> Result<Vec<f32>> {
        let vb = self.block_rows.clamp(1, v);
        let group = (HEAD_CHUNK_BYTES / (vb * 4)).max(1);
        let mut out = vec![0f32; n];
        let mut q = vec![0f32; if self.with_dx { n * h } else { 0 }];
        let mut wbuf = Vec::new();
        let mut lg = vec![0f32; group.min(n) * vb];
        let mut row_buf = Vec::new();
        for g0 in (0..n).step_by(group) {
            let m = group.min(n - g0);
            let xg = &x[g0 * h..(g0 + m) * h];
            let t = &self.targets[g0..g0 + m];
            // Per row: (running max, running sum, target logit).
            let mut st = vec![(f32::NEG_INFINITY, 0f32, 0f32); m];
            let mut acc = vec![0f32; if self.with_dx { m * h } else { 0 }];
            let mut v0 = 0;
            while v0 < v {
                let nb = vb.min(v - v0);
                let wb = w.range(v0 * h, (v0 + nb) * h, &mut wbuf);
                let lgb = &mut lg[..m * nb];
                head_logits(xg, wb, h, nb, lgb);
                let with_dx = self.with_dx;
                let rescale: Vec<f32> = lgb
                    .par_chunks_mut(nb)
                    .zip(st.par_iter_mut())
                    .zip(t.par_iter())
                    .map(|((r, s), &ti)| {
                        let ti = ti as usize;
                        if (v0..v0 + nb).contains(&ti) {
                            s.2 = r[ti - v0];
                        }
                        let new_m = s.0.max(max_f32(r));
                        let scale = if s.0 == f32::NEG_INFINITY { 0.0 } else { (s.0 - new_m).exp() };
                        let sum = if with_dx { exp_sub_in_place(r, new_m) } else { exp_sub_sum(r, new_m) };
                        s.1 = s.1 * scale + sum;
                        s.0 = new_m;
                        scale
                    })
                    .collect();
                if self.with_dx {
                    acc.par_chunks_mut(h).zip(rescale.par_iter()).for_each(|(a, &c)| scale_in_place(a, c));
                    // acc += exp(l − m)·W_block: [m × nb]·[nb × h]
                    gemm_f32(m, h, nb, &mut acc, true, lgb, (nb, 1), wb, (h, 1));
                }
                v0 += nb;
            }
            for (o, s) in out[g0..g0 + m].iter_mut().zip(&st) {
                *o = s.2 - (s.0 + s.1.ln());
            }
            if self.with_dx {
                // q = W[t] − pᵀW = W[t] − acc / s.
                for (k, &ti) in t.iter().enumerate() {
                    let ti = ti as usize;
                    let wt = w.range(ti * h, (ti + 1) * h, &mut row_buf);
                    let inv = 1.0 / st[k].1;
                    let qr = &mut q[(g0 + k) * h..(g0 + k + 1) * h];
                    qr.iter_mut().zip(&acc[k * h..(k + 1) * h]).zip(wt).for_each(|((o, a), b)| *o = b - a * inv);
                }
            }
        }
        if self.with_dx {
            *self.q.lock().map_err(|_| candle_core::Error::Msg("linear_token_logprobs: poisoned lock".into()))? =
                Some(q);
        }
        Ok(out)
    }

    fn backward(&self, x: &Tensor, w: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // A frozen head (LoRA, inference) is a plain tensor, not tracked: no dW work at all.
        let (need_x, need_w) = (x.track_op(), w.track_op());
        let (n, h) = x.dims2()?;
        let v = w.dim(0)?;
        let dev = x.device();
        let g = grad.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let dx = if need_x {
            let q =
                self.q.lock().map_err(|_| candle_core::Error::Msg("linear_token_logprobs: poisoned lock".into()))?;
            let Some(q) = q.as_ref().filter(|q| q.len() == n * h) else {
                bail!("linear_token_logprobs: the hidden states were not tracked when the forward ran");
            };
            let mut dx = vec![0f32; n * h];
            par_rows_mut(&mut dx, h, |i, o| {
                if g[i] != 0.0 {
                    o.iter_mut().zip(&q[i * h..(i + 1) * h]).for_each(|(a, b)| *a = g[i] * b);
                }
            });
            Some(Tensor::from_vec(dx, (n, h), dev)?)
        } else {
            None
        };
        let dw = if need_w {
            let dw = with_f32(x, "linear_token_logprobs-bwd", |xs| {
                with_f32(w, "linear_token_logprobs-bwd", |ws| self.head_grad(xs, ws, &g, (n, h, v)))
            })??;
            Some(Tensor::from_vec(dw, (v, h), dev)?)
        } else {
            None
        };
        Ok((dx, dw))
    }
}

/// `out[i] = log_softmax(hidden[i]·headᵀ)[targets[i]]` for `hidden: [n, h]` and a head
/// `[vocab, h]`: [`linear`] and [`token_logprobs`] in one op that never holds more than one chunk
/// of [`head_chunk_rows`] rows of logits, forward and backward alike. The hidden states' gradient
/// direction is computed by the forward (an `[n, h]` buffer, only when `hidden` is tracked); the
/// head's gradient, only when `head` is tracked (a `Var` or computed from one), recomputes each
/// chunk's logits in the backward: a frozen head costs no gradient work at all.
///
/// The head may be a frozen f16 or bf16 matrix: one within [`HALF_BLOCK_BYTES`] is widened whole
/// for the op's duration; a larger one is walked a widened vocabulary block at a time with an
/// online log-sum-exp, so the whole head is never widened (the bloom-7b1 head would be 4 GB).
pub fn linear_token_logprobs(hidden: &Tensor, head: &Tensor, targets: &[u32]) -> Result<Tensor> {
    linear_token_logprobs_blocked(hidden, head, targets, head_chunk_rows(head.dim(0)?), half_block_rows(head.dim(1)?))
}

/// [`linear_token_logprobs`] with an explicit number of rows per chunk (at least 1).
pub fn linear_token_logprobs_chunked(
    hidden: &Tensor,
    head: &Tensor,
    targets: &[u32],
    chunk_rows: usize,
) -> Result<Tensor> {
    linear_token_logprobs_blocked(hidden, head, targets, chunk_rows, half_block_rows(head.dim(1)?))
}

/// [`linear_token_logprobs_chunked`] with an explicit number of vocabulary rows per widened block
/// of a half-precision head (at least 1; ignored for an f32 head).
pub fn linear_token_logprobs_blocked(
    hidden: &Tensor,
    head: &Tensor,
    targets: &[u32],
    chunk_rows: usize,
    block_rows: usize,
) -> Result<Tensor> {
    if chunk_rows == 0 || block_rows == 0 {
        bail!("linear_token_logprobs: expected at least one row per chunk and per block, found 0");
    }
    let op = LinearTokenLogProb {
        targets: targets.to_vec(),
        chunk_rows,
        block_rows,
        with_dx: hidden.track_op(),
        with_dw: head.track_op(),
        q: Default::default(),
        probs: Default::default(),
    };
    hidden.contiguous()?.apply_op2(&head.contiguous()?, op)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn rand(shape: &[usize], seed: u64) -> Tensor {
        use rand::{Rng, SeedableRng};
        let mut r = rand::rngs::StdRng::seed_from_u64(seed);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| r.random_range(-2.0f32..2.0)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    use hetfed_core::testing::max_abs_diff;

    /// Reference compositions built only from candle ops that have a backward.
    fn ref_layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Tensor {
        let mean = x.mean_keepdim(D::Minus1).unwrap();
        let xc = x.broadcast_sub(&mean).unwrap();
        let var = xc.sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
        let xn = xc.broadcast_div(&(var + eps).unwrap().sqrt().unwrap()).unwrap();
        xn.broadcast_mul(w).unwrap().broadcast_add(b).unwrap()
    }

    fn check_grads(f_ours: impl Fn(&[Tensor]) -> Tensor, f_ref: impl Fn(&[Tensor]) -> Tensor, inputs: &[Tensor]) {
        let vars: Vec<Var> = inputs.iter().map(|t| Var::from_tensor(t).unwrap()).collect();
        let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
        let weights = rand(f_ours(&ts).dims(), 99);
        let y1 = f_ours(&ts);
        let y2 = f_ref(&ts);
        assert!(max_abs_diff(&y1, &y2) < 1e-4, "forward differs");
        let g1 = (y1 * &weights).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (y2 * &weights).unwrap().sum_all().unwrap().backward().unwrap();
        for v in &ts {
            let a = g1.get(v).expect("our op dropped a gradient");
            let b = g2.get(v).expect("reference dropped a gradient");
            let d = max_abs_diff(a, b);
            assert!(d < 1e-3, "gradient differs by {d}");
        }
    }

    #[test]
    fn layer_norm_matches_composition_forward_and_backward() {
        let (x, w, b) = (rand(&[3, 5, 64], 1), rand(&[64], 2), rand(&[64], 3));
        check_grads(
            |t| layer_norm(&t[0], &t[1], &t[2], 1e-5).unwrap(),
            |t| ref_layer_norm(&t[0], &t[1], &t[2], 1e-5),
            &[x, w, b],
        );
    }

    #[test]
    fn rms_norm_matches_composition() {
        let (x, w) = (rand(&[4, 7, 32], 4), rand(&[32], 5));
        check_grads(
            |t| rms_norm(&t[0], &t[1], 1e-6).unwrap(),
            |t| {
                let ms = t[0].sqr().unwrap().mean_keepdim(D::Minus1).unwrap();
                t[0].broadcast_div(&(ms + 1e-6).unwrap().sqrt().unwrap()).unwrap().broadcast_mul(&t[1]).unwrap()
            },
            &[x, w],
        );
    }

    #[test]
    fn softmax_matches_composition() {
        let x = rand(&[2, 3, 9, 17], 6);
        check_grads(
            |t| softmax_last_dim(&t[0]).unwrap(),
            |t| {
                let e = t[0].broadcast_sub(&t[0].max_keepdim(D::Minus1).unwrap()).unwrap().exp().unwrap();
                e.broadcast_div(&e.sum_keepdim(D::Minus1).unwrap()).unwrap()
            },
            &[x],
        );
    }

    #[test]
    fn gelu_matches_composition() {
        let x = rand(&[5, 300], 7);
        check_grads(
            |t| gelu_tanh(&t[0]).unwrap(),
            |t| {
                let x = &t[0];
                let inner = ((x.sqr().unwrap() * 0.044715).unwrap() + 1.0).unwrap().mul(x).unwrap();
                let th = (inner * GELU_C as f64).unwrap().tanh().unwrap();
                ((th + 1.0).unwrap() * x).unwrap().affine(0.5, 0.0).unwrap()
            },
            &[x],
        );
    }

    #[test]
    fn token_logprobs_match_log_softmax_gather() {
        let x = rand(&[6, 11], 8);
        let targets = vec![0u32, 3, 10, 5, 5, 1];
        let tid = Tensor::new(targets.as_slice(), &Device::Cpu).unwrap();
        let tt = targets.clone();
        check_grads(
            move |t| token_logprobs(&t[0], &tt).unwrap(),
            move |t| {
                let ls = candle_nn::ops::log_softmax(&t[0], D::Minus1).unwrap();
                ls.gather(&tid.unsqueeze(1).unwrap(), 1).unwrap().squeeze(1).unwrap()
            },
            &[x],
        );
    }

    #[test]
    fn fast_exp_and_tanh_are_accurate() {
        let mut worst_exp = 0f32;
        let mut worst_tanh = 0f32;
        for i in -20000..20000 {
            let x = i as f32 * 0.004;
            worst_exp = worst_exp.max((fast_exp(x) - x.exp()).abs() / x.exp());
            worst_tanh = worst_tanh.max((fast_tanh(x) - x.tanh()).abs());
        }
        assert!(worst_exp < 3e-7, "exp relative error {worst_exp}");
        assert!(worst_tanh < 2e-7, "tanh absolute error {worst_tanh}");
        assert_eq!(fast_exp(-1000.0), fast_exp(-87.0));
        assert!(fast_exp(-87.0) > 0.0 && fast_exp(-87.0) < 1e-37);
    }

    #[test]
    fn causal_softmax_matches_masked_composition() {
        let (b, h, t, past) = (2, 3, 5, 2);
        let x = rand(&[b, h, t, past + t], 10);
        let slopes = [0.5f32, 0.25, 0.125];
        let scale = 0.3;
        check_grads(
            |ts| causal_softmax(&ts[0], scale, Some(&slopes), past, None).unwrap(),
            |ts| {
                let s = past + t;
                let mask: Vec<f32> =
                    (0..t).flat_map(|i| (0..s).map(move |j| if j <= past + i { 0.0 } else { -1e30 })).collect();
                let mask = Tensor::from_vec(mask, (t, s), &Device::Cpu).unwrap();
                let pos = Tensor::arange(0f32, s as f32, &Device::Cpu).unwrap().reshape((1, 1, s)).unwrap();
                let alibi = Tensor::new(&slopes, &Device::Cpu)
                    .unwrap()
                    .reshape((h, 1, 1))
                    .unwrap()
                    .broadcast_mul(&pos)
                    .unwrap();
                let z = (&ts[0] * scale).unwrap().broadcast_add(&alibi).unwrap().broadcast_add(&mask).unwrap();
                let e = z.broadcast_sub(&z.max_keepdim(D::Minus1).unwrap()).unwrap().exp().unwrap();
                e.broadcast_div(&e.sum_keepdim(D::Minus1).unwrap()).unwrap()
            },
            &[x],
        );
    }

    #[test]
    fn linear_matches_matmul_forward_and_backward() {
        let (x, w, b) = (rand(&[7, 5], 11), rand(&[3, 5], 12), rand(&[3], 13));
        check_grads(
            |t| linear(&t[0], &t[1], Some(&t[2])).unwrap(),
            |t| t[0].matmul(&t[1].t().unwrap()).unwrap().broadcast_add(&t[2]).unwrap(),
            &[x.clone(), w.clone(), b],
        );
        check_grads(|t| linear(&t[0], &t[1], None).unwrap(), |t| t[0].matmul(&t[1].t().unwrap()).unwrap(), &[x, w]);
    }

    /// Values, grad wrt hidden and grad wrt head of the fused head against `matmul` +
    /// `token_logprobs`, with an upstream gradient that is zero on some rows (masked targets).
    fn check_fused_head(n: usize, h: usize, v: usize, chunk: usize, seed: u64) {
        use rand::{Rng, SeedableRng};
        let mut r = rand::rngs::StdRng::seed_from_u64(seed);
        let targets: Vec<u32> = (0..n).map(|_| r.random_range(0..v as u32)).collect();
        let up: Vec<f32> = (0..n).map(|i| if i % 3 == 1 { 0.0 } else { r.random_range(-1.5f32..1.5) }).collect();
        let up = Tensor::from_vec(up, n, &Device::Cpu).unwrap();
        let x = Var::from_tensor(&rand(&[n, h], seed + 1)).unwrap();
        let w = Var::from_tensor(&rand(&[v, h], seed + 2)).unwrap();
        let fused = linear_token_logprobs_chunked(x.as_tensor(), w.as_tensor(), &targets, chunk).unwrap();
        let logits = x.as_tensor().matmul(&w.as_tensor().t().unwrap()).unwrap();
        let unfused = token_logprobs(&logits, &targets).unwrap();
        assert_eq!(fused.dims(), &[n]);
        let d = max_abs_diff(&fused, &unfused);
        assert!(d < 1e-4, "n {n}, chunk {chunk}: log-probs differ by {d}");
        let g1 = (&fused * &up).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (&unfused * &up).unwrap().sum_all().unwrap().backward().unwrap();
        for (what, t) in [("hidden", x.as_tensor()), ("head", w.as_tensor())] {
            let (a, b) = (g1.get(t).expect("fused op dropped a gradient"), g2.get(t).unwrap());
            let d = max_abs_diff(a, b);
            assert!(d < 1e-4, "n {n}, chunk {chunk}: gradient wrt {what} differs by {d}");
        }
        // Rows with a zero upstream gradient get exactly zero.
        let dx = g1.get(x.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
        assert!(dx[1].iter().all(|&v| v == 0.0));
        // A second backward through the same graph (the kept softmax is used up by the first)
        // gives the same gradients.
        let g3 = (&fused * &up).unwrap().sum_all().unwrap().backward().unwrap();
        for t in [x.as_tensor(), w.as_tensor()] {
            assert!(max_abs_diff(g1.get(t).unwrap(), g3.get(t).unwrap()) < 1e-5);
        }
    }

    #[test]
    fn linear_token_logprobs_match_matmul_then_token_logprobs() {
        // Chunks that divide n, that do not, of one row, and larger than n.
        for (chunk, seed) in [(1, 20), (4, 21), (5, 22), (13, 23), (64, 24)] {
            check_fused_head(13, 8, 37, chunk, seed);
        }
        // A vocabulary large enough for the parallel gemm and row kernels; the default chunking.
        check_fused_head(9, 48, 3001, 2, 25);
        check_fused_head(9, 48, 3001, head_chunk_rows(3001), 26);
    }

    #[test]
    fn head_chunks_bound_the_logits() {
        assert_eq!(head_chunk_rows(250_880), 66);
        assert!(head_chunk_rows(250_880) * 250_880 * 4 <= HEAD_CHUNK_BYTES);
        assert_eq!(head_chunk_rows(usize::MAX / 2), 1);
        assert_eq!(head_chunk_rows(8192), 2048);
    }

    #[test]
    fn frozen_head_gets_no_gradient_work() {
        let (n, h, v, chunk) = (10, 6, 23, 3);
        let targets: Vec<u32> = (0..n as u32).map(|i| (i * 7) % v as u32).collect();
        let x = Var::from_tensor(&rand(&[n, h], 30)).unwrap();
        let head = rand(&[v, h], 31);
        let grad_chunks = || HEAD_GRAD_CHUNKS.with(|c| c.get());
        let before = grad_chunks();
        let lp = linear_token_logprobs_chunked(x.as_tensor(), &head, &targets, chunk).unwrap();
        let g = lp.sum_all().unwrap().backward().unwrap();
        assert!(g.get(&head).is_none(), "a frozen head got a gradient");
        assert_eq!(grad_chunks(), before, "a frozen head's gradient was computed");
        let want = token_logprobs(&x.as_tensor().matmul(&head.t().unwrap()).unwrap(), &targets).unwrap();
        let gw = want.sum_all().unwrap().backward().unwrap();
        assert!(max_abs_diff(g.get(x.as_tensor()).unwrap(), gw.get(x.as_tensor()).unwrap()) < 1e-4);
        // The same head as a variable: one head-gradient product per chunk.
        let head = Var::from_tensor(&head).unwrap();
        let lp = linear_token_logprobs_chunked(x.as_tensor(), head.as_tensor(), &targets, chunk).unwrap();
        let g = lp.sum_all().unwrap().backward().unwrap();
        assert!(g.get(head.as_tensor()).is_some());
        assert_eq!(grad_chunks(), before + n.div_ceil(chunk));
    }

    #[test]
    fn linear_token_logprobs_refuse_bad_input() {
        let (x, w) = (rand(&[2, 4], 40), rand(&[5, 4], 41));
        let e = linear_token_logprobs(&x, &w, &[1, 5]).unwrap_err().to_string();
        assert!(e.contains("outside the vocabulary"), "{e}");
        let e = linear_token_logprobs(&x, &w, &[1]).unwrap_err().to_string();
        assert!(e.contains("expected 2 targets"), "{e}");
        let e = linear_token_logprobs(&x, &rand(&[5, 3], 42), &[1, 2]).unwrap_err().to_string();
        assert!(e.contains("4 features"), "{e}");
        assert!(linear_token_logprobs_chunked(&x, &w, &[1, 2], 0).is_err());
    }

    /// An f16 copy of `t` and that copy widened back (the exact values the half path reads).
    fn f16_pair(t: &Tensor) -> (Tensor, Tensor) {
        let h = t.to_dtype(candle_core::DType::F16).unwrap();
        let w = h.to_dtype(candle_core::DType::F32).unwrap();
        (h, w)
    }

    #[test]
    fn half_linear_equals_widened_linear_forward_and_input_gradient() {
        let (rows, din, dout) = (7, 12, 29);
        let (wh, wf) = f16_pair(&rand(&[dout, din], 50));
        let bias = rand(&[dout], 51);
        let bf = bias.to_dtype(candle_core::DType::BF16).unwrap();
        let up = rand(&[rows, dout], 52);
        // One block (widened whole: bit-identical), blocks that divide dout, that do not, of one row.
        for block in [dout, 1, 4, 10, 1000] {
            for b in [None, Some(&bias)] {
                let x = Var::from_tensor(&rand(&[rows, din], 53)).unwrap();
                let y = linear_blocked(x.as_tensor(), &wh, b, block).unwrap();
                let want = linear(x.as_tensor(), &wf, b).unwrap();
                let d = max_abs_diff(&y, &want);
                if block >= dout {
                    assert_eq!(d, 0.0, "block {block}: one block is the f32 kernel");
                }
                assert!(d < 1e-5, "block {block}: forward differs by {d}");
                let g1 = (&y * &up).unwrap().sum_all().unwrap().backward().unwrap();
                let g2 = (&want * &up).unwrap().sum_all().unwrap().backward().unwrap();
                let d = max_abs_diff(g1.get(x.as_tensor()).unwrap(), g2.get(x.as_tensor()).unwrap());
                assert!(d < 1e-5, "block {block}: input gradient differs by {d}");
                assert!(g1.get(&wh).is_none(), "a frozen half weight got a gradient");
            }
        }
        // bf16 weight and bias too.
        let (wb, wbf) = (
            wf.to_dtype(candle_core::DType::BF16).unwrap(),
            wf.to_dtype(candle_core::DType::BF16).unwrap().to_dtype(candle_core::DType::F32).unwrap(),
        );
        let x = rand(&[rows, din], 54);
        let d = max_abs_diff(
            &linear_blocked(&x, &wb, Some(&bf), 3).unwrap(),
            &linear(&x, &wbf, Some(&bf.to_dtype(candle_core::DType::F32).unwrap())).unwrap(),
        );
        assert!(d < 1e-5, "bf16: {d}");
        // Training a half weight is refused, not silently frozen.
        let wv = Var::from_tensor(&wh).unwrap();
        let y = linear(&x, wv.as_tensor(), None).unwrap();
        let e = y.sum_all().unwrap().backward().unwrap_err().to_string();
        assert!(e.contains("half-precision weight is frozen"), "{e}");
    }

    /// The fused head with an f16 head (widened whole, or by vocabulary blocks with the online
    /// log-sum-exp) against the unfused path on the widened head: values and hidden gradient.
    fn check_half_head(n: usize, h: usize, v: usize, chunk: usize, block: usize, seed: u64) {
        use rand::{Rng, SeedableRng};
        let mut r = rand::rngs::StdRng::seed_from_u64(seed);
        let targets: Vec<u32> = (0..n).map(|_| r.random_range(0..v as u32)).collect();
        let up: Vec<f32> = (0..n).map(|i| if i % 3 == 1 { 0.0 } else { r.random_range(-1.5f32..1.5) }).collect();
        let up = Tensor::from_vec(up, n, &Device::Cpu).unwrap();
        let (wh, wf) = f16_pair(&(rand(&[v, h], seed + 2) * 4.0).unwrap());
        let x = Var::from_tensor(&rand(&[n, h], seed + 1)).unwrap();
        let fused = linear_token_logprobs_blocked(x.as_tensor(), &wh, &targets, chunk, block).unwrap();
        let unfused = token_logprobs(&linear(x.as_tensor(), &wf, None).unwrap(), &targets).unwrap();
        let d = max_abs_diff(&fused, &unfused);
        assert!(d < 1e-4, "n {n}, v {v}, block {block}: log-probs differ by {d}");
        let g1 = (&fused * &up).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (&unfused * &up).unwrap().sum_all().unwrap().backward().unwrap();
        let d = max_abs_diff(g1.get(x.as_tensor()).unwrap(), g2.get(x.as_tensor()).unwrap());
        assert!(d < 1e-4, "n {n}, v {v}, block {block}: hidden gradient differs by {d}");
        // Untracked hidden states (scoring): the same values.
        let plain = linear_token_logprobs_blocked(&x.as_tensor().detach(), &wh, &targets, chunk, block).unwrap();
        assert!(max_abs_diff(&plain, &fused) < 1e-6);
    }

    #[test]
    fn half_head_equals_the_unfused_widened_head() {
        // Whole head in one block, blocks that divide the vocabulary, that do not, of one row.
        for (block, seed) in [(1000, 60), (37, 61), (5, 62), (8, 63), (1, 64)] {
            check_half_head(13, 8, 37, 4, block, seed);
        }
        // A vocabulary large enough for the parallel kernels.
        check_half_head(9, 48, 3001, 2, 256, 65);
        // The head widened whole is exactly the f32 kernel on the widened head.
        let (wh, wf) = f16_pair(&rand(&[37, 8], 66));
        let x = rand(&[5, 8], 67);
        let t = [1u32, 36, 0, 5, 9];
        let a = linear_token_logprobs_blocked(&x, &wh, &t, 2, 37).unwrap();
        let b = linear_token_logprobs_chunked(&x, &wf, &t, 2).unwrap();
        assert_eq!(max_abs_diff(&a, &b), 0.0);
        // A half head cannot be trained.
        let wv = Var::from_tensor(&wh).unwrap();
        let e = linear_token_logprobs(&x, wv.as_tensor(), &t).unwrap_err().to_string();
        assert!(e.contains("half-precision head is frozen"), "{e}");
        assert!(linear_token_logprobs_blocked(&x, &wh, &t, 2, 0).is_err());
    }

    #[test]
    fn half_blocks_bound_the_widened_copy() {
        assert_eq!(half_block_rows(1024), 16_384);
        assert!(half_block_rows(4096) * 4096 * 4 <= HALF_BLOCK_BYTES);
        assert_eq!(half_block_rows(usize::MAX / 2), 1);
    }

    #[test]
    fn out_of_vocab_target_is_an_error_not_a_panic() {
        let x = rand(&[2, 4], 9);
        let e = token_logprobs(&x, &[1, 4]).unwrap_err().to_string();
        assert!(e.contains("outside the vocabulary"), "{e}");
    }
}
