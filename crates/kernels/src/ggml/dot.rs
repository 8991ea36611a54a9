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

/// Per-row f32 scales of the formats with a SIMD body, written to `out`: Q8_0, Q4_0 and Q5_0 `d`
/// per 32 values; Q4_1 and Q5_1 `d` per 32 then `m` per 32;
/// Q4_K `d·sc` per 32 then `dmin·m` per 32 (two runs, so each is contiguous); Q6_K `d·sc` per
/// 16; IQ4_XS `d·(ls−32)` per 32. `false` for other formats.
pub fn row_scales(ty: GgmlType, row: &[u8], out: &mut Vec<f32>) -> bool {
    use super::dequant::{f16, iq4_xs_scale};
    let bb = ty.block_bytes();
    let nb = row.len() / bb;
    match ty {
        GgmlType::Q8_0 | GgmlType::Q4_0 | GgmlType::Q5_0 => {
            out.clear();
            out.extend(row.chunks_exact(bb).map(|b| f16(b, 0)));
        }
        GgmlType::Q4_1 | GgmlType::Q5_1 => {
            out.clear();
            out.extend(row.chunks_exact(bb).map(|b| f16(b, 0)));
            out.extend(row.chunks_exact(bb).map(|b| f16(b, 2)));
        }
        GgmlType::Q4K => {
            out.resize(16 * nb, 0.0);
            let (sc, mn) = out.split_at_mut(8 * nb);
            for (i, b) in row.chunks_exact(bb).enumerate() {
                let (d, dmin) = (f16(b, 0), f16(b, 2));
                // The twelve scale bytes as three words: the four 6-bit pairs of each half at once
                // (`get_scale_min_k4`, byte-parallel).
                let w = |o: usize| u32::from_le_bytes([b[4 + o], b[5 + o], b[6 + o], b[7 + o]]);
                let (w0, w1, w2) = (w(0), w(4), w(8));
                let scs = [w0 & 0x3f3f_3f3f, (w2 & 0x0f0f_0f0f) | ((w0 >> 2) & 0x3030_3030)];
                let mns = [w1 & 0x3f3f_3f3f, ((w2 >> 4) & 0x0f0f_0f0f) | ((w1 >> 2) & 0x3030_3030)];
                let (sc, mn) = (&mut sc[8 * i..][..8], &mut mn[8 * i..][..8]);
                for (j, (s4, m4)) in scs.iter().zip(&mns).enumerate() {
                    for (k, (s, m)) in s4.to_le_bytes().iter().zip(m4.to_le_bytes()).enumerate() {
                        sc[4 * j + k] = d * *s as f32;
                        mn[4 * j + k] = dmin * m as f32;
                    }
                }
            }
        }
        GgmlType::Q6K => {
            out.resize(16 * nb, 0.0);
            for (b, o) in row.chunks_exact(bb).zip(out.chunks_exact_mut(16)) {
                let d = f16(b, 208);
                for (o, &s) in o.iter_mut().zip(&b[192..208]) {
                    *o = d * s as i8 as f32;
                }
            }
        }
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
