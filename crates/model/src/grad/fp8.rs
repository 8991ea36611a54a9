//! FP8 mixed-precision training (report §3.3): the three GEMMs of every `Linear` take E4M3 inputs
//! with online max-abs scales and accumulate with promotion every 128 products
//! ([`dsv3_kernels::fp8_gemm`]); everything else — embedding, output head, router, norms,
//! attention, the optimizer's f32 masters — keeps its precision.
//!
//! | GEMM | computes | A (1×128 tiles) | B |
//! |---|---|---|---|
//! | Fprop | `y = x·Wᵀ` | `x [m, in]` | `W [out, in]`, 128×128 |
//! | Dgrad | `dx = dy·W` | `dy [m, out]` | `Wᵀ [in, out]`, 128×128 |
//! | Wgrad | `dW = dyᵀ·x` | `dyᵀ [out, m]` (tiles along tokens) | `xᵀ [in, m]`, 1×128 along tokens |
//!
//! The recipe reaches every `Linear` as a value ([`crate::exec::Exec::fp8`]); inference never
//! has one.

use crate::weights::Matrix;
use dsv3_kernels::fp8_gemm::gemm_nt;
use dsv3_kernels::matmul::transpose;
use dsv3_kernels::quant::{Fp8Blocks, ScaleFmt};
use std::borrow::Cow;

/// Which FP8 training variant runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fp8Recipe {
    /// Tiles of the output gradient `dy` in Dgrad: `[1, 128]` (the report's) or `[128, 128]`, the
    /// block-wise variant the report saw diverge (App. B.2).
    pub dgrad_block: [usize; 2],
    pub scale_fmt: ScaleFmt,
}

impl Default for Fp8Recipe {
    fn default() -> Self {
        Fp8Recipe { dgrad_block: [1, TILE], scale_fmt: ScaleFmt::F32 }
    }
}

const TILE: usize = 128;

fn master(w: &Matrix) -> Cow<'_, [f32]> {
    match w.view() {
        dsv3_kernels::MatRef::F32 { data, .. } => Cow::Borrowed(data),
        v => Cow::Owned(v.to_f32()),
    }
}

/// Fprop: `x [m, in] → [m, out]`.
pub(crate) fn forward(r: Fp8Recipe, w: &Matrix, x: &[f32], m: usize) -> Vec<f32> {
    let xq = Fp8Blocks::quantize(x, m, w.cols, [1, TILE], r.scale_fmt);
    let wq = Fp8Blocks::quantize(&master(w), w.rows, w.cols, [TILE, TILE], r.scale_fmt);
    gemm_nt(&xq, &wq)
}

/// Dgrad: `dx [m, in]` from `dy [m, out]`.
pub(crate) fn dgrad(r: Fp8Recipe, w: &Matrix, dy: &[f32], m: usize) -> Vec<f32> {
    let (out, inp) = (w.rows, w.cols);
    let dyq = Fp8Blocks::quantize(dy, m, out, r.dgrad_block, r.scale_fmt);
    let wtq = Fp8Blocks::quantize(&transpose(&master(w), out, inp), inp, out, [TILE, TILE], r.scale_fmt);
    gemm_nt(&dyq, &wtq)
}

/// Wgrad: `dw [out, in] += dyᵀ·x`.
pub(crate) fn wgrad(r: Fp8Recipe, dy: &[f32], x: &[f32], m: usize, out: usize, inp: usize, dw: &mut [f32]) {
    let dytq = Fp8Blocks::quantize(&transpose(dy, m, out), out, m, [1, TILE], r.scale_fmt);
    let xtq = Fp8Blocks::quantize(&transpose(x, m, inp), inp, m, [1, TILE], r.scale_fmt);
    for (d, g) in dw.iter_mut().zip(gemm_nt(&dytq, &xtq)) {
        *d += g;
    }
}
