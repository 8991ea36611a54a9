//! f32 activations against one ggml weight row, a block at a time: each block is decoded into a
//! stack buffer (L1) and dotted with the vector body of [`crate::dot`], so the row is read from
//! memory once and never expanded whole.

use super::{dequantize, GgmlType};

/// Largest block (values).
const MAX_BLOCK: usize = 256;

/// `Σ_i x[i]·W[i]` for the ggml row `w` holding `x.len()` values.
pub fn dot_row(ty: GgmlType, w: &[u8], x: &[f32]) -> f32 {
    match ty {
        GgmlType::F32 => {
            let w: Vec<f32> = w.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
            crate::dot::dot_f32(x, &w)
        }
        GgmlType::Bf16 => crate::dot::dot_bf16(x, w),
        _ => {
            let (be, bb) = (ty.block_elems(), ty.block_bytes());
            let mut buf = [0f32; MAX_BLOCK];
            let mut sum = 0f32;
            // Blocks of 32 values are decoded eight at a time, so one dot covers 256 values.
            let group = MAX_BLOCK / be;
            for (wb, xb) in w.chunks(group * bb).zip(x.chunks(group * be)) {
                let vals = &mut buf[..xb.len()];
                dequantize(ty, wb, vals);
                sum += crate::dot::dot_f32(xb, vals);
            }
            sum
        }
    }
}

/// `y[j] += a·W[c0 + j]` over the ggml row `w`.
pub fn axpy_row(ty: GgmlType, w: &[u8], c0: usize, a: f32, y: &mut [f32]) {
    let mut buf = [0f32; MAX_BLOCK];
    for (i, ys) in y.chunks_mut(MAX_BLOCK).enumerate() {
        let vals = &mut buf[..ys.len()];
        decode_range(ty, w, c0 + i * MAX_BLOCK, vals);
        crate::dot::axpy_f32(ys, a, vals);
    }
}

/// Values `c0..c0 + out.len()` of the ggml row `w`.
pub fn decode_range(ty: GgmlType, w: &[u8], c0: usize, out: &mut [f32]) {
    let (be, bb) = (ty.block_elems(), ty.block_bytes());
    let mut buf = [0f32; MAX_BLOCK];
    let end = c0 + out.len();
    let (mut c, mut blk) = (c0, c0 / be);
    while c < end {
        dequantize(ty, &w[blk * bb..][..bb], &mut buf[..be]);
        let lo = c - blk * be;
        let n = (be - lo).min(end - c);
        out[c - c0..][..n].copy_from_slice(&buf[lo..lo + n]);
        c += n;
        blk += 1;
    }
}

/// `out[j·m + t] = Σ_c x[t·k + c]·W[rows.start + j, c]`: each row decoded a chunk at a time, once
/// for all `m` tokens; every token's sum runs in the same order whatever `m` is.
pub fn rows_dots(
    ty: GgmlType,
    data: &[u8],
    k: usize,
    rows: std::ops::Range<usize>,
    x: &[f32],
    m: usize,
    out: &mut [f32],
) {
    let rb = k / ty.block_elems() * ty.block_bytes();
    let chunk = MAX_BLOCK.max(ty.block_elems());
    let chunk_bytes = chunk / ty.block_elems() * ty.block_bytes();
    let mut buf = [0f32; MAX_BLOCK];
    for (j, r) in rows.enumerate() {
        let o = &mut out[j * m..][..m];
        o.fill(0.0);
        let row = &data[r * rb..][..rb];
        for (ci, wb) in row.chunks(chunk_bytes).enumerate() {
            let n = wb.len() / ty.block_bytes() * ty.block_elems();
            let vals = &mut buf[..n];
            dequantize(ty, wb, vals);
            for (t, o) in o.iter_mut().enumerate() {
                *o += crate::dot::dot_f32(&x[t * k + ci * chunk..][..n], vals);
            }
        }
    }
}

/// IQ4_XS's per-row f32 scales `d·(ls−32)` per 32 values, written to `out` (the register
/// decode where the CPU lacks VNNI). `false` for other formats.
pub fn row_scales(ty: GgmlType, row: &[u8], out: &mut Vec<f32>) -> bool {
    use super::dequant::{f16, iq4_xs_scale};
    let bb = ty.block_bytes();
    match ty {
        GgmlType::Iq4Xs => {
            out.clear();
            for b in row.chunks_exact(bb) {
                let d = f16(b, 0);
                out.extend((0..8).map(|ib| d * iq4_xs_scale(b, ib) as f32));
            }
        }
        _ => return false,
    }
    true
}
