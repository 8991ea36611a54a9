//! The scalar definition of every ggml block format: bytes → f32, bit for bit as llama.cpp's
//! `dequantize_row_*` (same products in the same order, no fused multiply-adds).

use super::lattice::*;
use super::GgmlType;
use crate::codec::{bf16_to_f32, f16_to_f32};

/// IQ4_NL / IQ4_XS non-linear levels (`kvalues_iq4nl`).
pub const IQ4NL_LEVELS: [i8; 16] = [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113];
/// MXFP4's E2M1 levels, doubled (`kvalues_mxfp4`; the scale is halved to match).
pub const MXFP4_LEVELS: [i8; 16] = [0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12];
/// IQ1_S / IQ1_M shift of every lattice coordinate.
pub const IQ1_DELTA: f32 = 0.125;

/// `dst[i]` = value `i` of the blocks in `src`. Panics unless `src` is exactly the blocks of
/// `dst.len()` values (callers check shapes against the file first).
pub fn dequantize(ty: GgmlType, src: &[u8], dst: &mut [f32]) {
    let (be, bb) = (ty.block_elems(), ty.block_bytes());
    assert!(
        dst.len().is_multiple_of(be) && src.len() == dst.len() / be * bb,
        "dequantize {ty}: {} bytes for {} values",
        src.len(),
        dst.len()
    );
    let block: fn(&[u8], &mut [f32]) = match ty {
        GgmlType::F32 => |b, y| y[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]),
        GgmlType::F16 => |b, y| y[0] = f16(b, 0),
        GgmlType::Bf16 => |b, y| y[0] = bf16_to_f32(u16::from_le_bytes([b[0], b[1]])),
        GgmlType::Q4_0 => q4_0,
        GgmlType::Q4_1 => q4_1,
        GgmlType::Q5_0 => q5_0,
        GgmlType::Q5_1 => q5_1,
        GgmlType::Q8_0 => q8_0,
        GgmlType::Q2K => q2_k,
        GgmlType::Q3K => q3_k,
        GgmlType::Q4K => q4_k,
        GgmlType::Q5K => q5_k,
        GgmlType::Q6K => q6_k,
        GgmlType::Iq4Nl => iq4_nl,
        GgmlType::Iq4Xs => iq4_xs,
        GgmlType::Iq2Xxs => iq2_xxs,
        GgmlType::Iq2Xs => iq2_xs,
        GgmlType::Iq2S => iq2_s,
        GgmlType::Iq3Xxs => iq3_xxs,
        GgmlType::Iq3S => iq3_s,
        GgmlType::Iq1S => iq1_s,
        GgmlType::Iq1M => iq1_m,
        GgmlType::Mxfp4 => mxfp4,
    };
    for (b, y) in src.chunks_exact(bb).zip(dst.chunks_exact_mut(be)) {
        block(b, y);
    }
}

#[inline]
pub(crate) fn f16(b: &[u8], at: usize) -> f32 {
    f16_to_f32(u16_at(b, at))
}

#[inline]
pub(crate) fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

#[inline]
pub(crate) fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

#[inline]
fn sign(bits: u8, j: usize) -> f32 {
    if bits >> j & 1 != 0 {
        -1.0
    } else {
        1.0
    }
}

fn q4_0(b: &[u8], y: &mut [f32]) {
    let d = f16(b, 0);
    for (j, &q) in b[2..18].iter().enumerate() {
        y[j] = ((q & 0xF) as i32 - 8) as f32 * d;
        y[j + 16] = ((q >> 4) as i32 - 8) as f32 * d;
    }
}

fn q4_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (f16(b, 0), f16(b, 2));
    for (j, &q) in b[4..20].iter().enumerate() {
        y[j] = (q & 0xF) as f32 * d + m;
        y[j + 16] = (q >> 4) as f32 * d + m;
    }
}

/// The 5-bit values of a Q5_0/Q5_1 block: low nibbles `qs`, fifth bits `qh` (bit `i` for value `i`).
#[inline]
fn q5_values(qh: u32, qs: &[u8]) -> [u8; 32] {
    let mut v = [0u8; 32];
    for (j, &q) in qs.iter().enumerate() {
        v[j] = (q & 0xF) | (((qh >> j) as u8 & 1) << 4);
        v[j + 16] = (q >> 4) | (((qh >> (j + 16)) as u8 & 1) << 4);
    }
    v
}

fn q5_0(b: &[u8], y: &mut [f32]) {
    let d = f16(b, 0);
    for (y, v) in y.iter_mut().zip(q5_values(u32_at(b, 2), &b[6..22])) {
        *y = (v as i32 - 16) as f32 * d;
    }
}

fn q5_1(b: &[u8], y: &mut [f32]) {
    let (d, m) = (f16(b, 0), f16(b, 2));
    for (y, v) in y.iter_mut().zip(q5_values(u32_at(b, 4), &b[8..24])) {
        *y = v as f32 * d + m;
    }
}

fn q8_0(b: &[u8], y: &mut [f32]) {
    let d = f16(b, 0);
    for (y, &q) in y.iter_mut().zip(&b[2..34]) {
        *y = q as i8 as f32 * d;
    }
}

fn q2_k(b: &[u8], y: &mut [f32]) {
    let (scales, qs) = (&b[0..16], &b[16..80]);
    let (d, dmin) = (f16(b, 80), f16(b, 82));
    for e in 0..256 {
        let sc = scales[e / 16];
        let (dl, ml) = (d * (sc & 0xF) as f32, dmin * (sc >> 4) as f32);
        let q = (qs[e / 128 * 32 + e % 32] >> (2 * (e % 128 / 32))) & 3;
        y[e] = dl * q as f32 - ml;
    }
}

/// Q3_K's sixteen 6-bit scales, each minus 32.
pub(crate) fn q3_k_scales(s: &[u8]) -> [i8; 16] {
    let mut out = [0i8; 16];
    for (i, o) in out.iter_mut().enumerate() {
        let lo = (s[i % 8] >> (4 * (i / 8))) & 0xF;
        let hi = (s[8 + i % 4] >> (2 * (i / 4))) & 3;
        *o = (lo | hi << 4) as i8 - 32;
    }
    out
}

fn q3_k(b: &[u8], y: &mut [f32]) {
    let (hmask, qs) = (&b[0..32], &b[32..96]);
    let scales = q3_k_scales(&b[96..108]);
    let d = f16(b, 108);
    for e in 0..256 {
        let dl = d * scales[e / 16] as f32;
        let l = e % 32;
        let low = (qs[e / 128 * 32 + l] >> (2 * (e % 128 / 32))) & 3;
        let high_clear = (hmask[l] >> (e / 32)) & 1 == 0;
        y[e] = dl * (low as i8 - if high_clear { 4 } else { 0 }) as f32;
    }
}

/// Q4_K/Q5_K's eight 6-bit (scale, min) pairs (`get_scale_min_k4`).
pub(crate) fn k4_scale_min(s: &[u8], j: usize) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        ((s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4), (s[j + 4] >> 4) | ((s[j] >> 6) << 4))
    }
}

fn q4_k(b: &[u8], y: &mut [f32]) {
    let (d, dmin) = (f16(b, 0), f16(b, 2));
    let (scales, qs) = (&b[4..16], &b[16..144]);
    for e in 0..256 {
        let (sc, m) = k4_scale_min(scales, e / 32);
        let q = (qs[e / 64 * 32 + e % 32] >> (4 * (e % 64 / 32))) & 0xF;
        y[e] = d * sc as f32 * q as f32 - dmin * m as f32;
    }
}

fn q5_k(b: &[u8], y: &mut [f32]) {
    let (d, dmin) = (f16(b, 0), f16(b, 2));
    let (scales, qh, qs) = (&b[4..16], &b[16..48], &b[48..176]);
    for e in 0..256 {
        let (sc, m) = k4_scale_min(scales, e / 32);
        let low = (qs[e / 64 * 32 + e % 32] >> (4 * (e % 64 / 32))) & 0xF;
        let q = low | ((qh[e % 32] >> (e / 32)) & 1) << 4;
        y[e] = d * sc as f32 * q as f32 - dmin * m as f32;
    }
}

fn q6_k(b: &[u8], y: &mut [f32]) {
    let (ql, qh, scales) = (&b[0..128], &b[128..192], &b[192..208]);
    let d = f16(b, 208);
    for e in 0..256 {
        let (half, r) = (e / 128, e % 128);
        let low = (ql[half * 64 + r % 64] >> (4 * (r / 64))) & 0xF;
        let high = (qh[half * 32 + r % 32] >> (2 * (r / 32))) & 3;
        let q = (low | high << 4) as i8 - 32;
        y[e] = d * scales[e / 16] as i8 as f32 * q as f32;
    }
}

fn iq4_nl(b: &[u8], y: &mut [f32]) {
    let d = f16(b, 0);
    for (j, &q) in b[2..18].iter().enumerate() {
        y[j] = d * IQ4NL_LEVELS[(q & 0xF) as usize] as f32;
        y[j + 16] = d * IQ4NL_LEVELS[(q >> 4) as usize] as f32;
    }
}

/// IQ4_XS's 6-bit scale of sub-block `ib`, minus 32.
pub(crate) fn iq4_xs_scale(b: &[u8], ib: usize) -> i32 {
    let low = (b[4 + ib / 2] >> (4 * (ib % 2))) & 0xF;
    let high = ((u16_at(b, 2) >> (2 * ib)) & 3) as u8;
    (low | high << 4) as i32 - 32
}

fn iq4_xs(b: &[u8], y: &mut [f32]) {
    let d = f16(b, 0);
    for ib in 0..8 {
        let dl = d * iq4_xs_scale(b, ib) as f32;
        let (qs, y) = (&b[8 + 16 * ib..][..16], &mut y[32 * ib..][..32]);
        for (j, &q) in qs.iter().enumerate() {
            y[j] = dl * IQ4NL_LEVELS[(q & 0xF) as usize] as f32;
            y[j + 16] = dl * IQ4NL_LEVELS[(q >> 4) as usize] as f32;
        }
    }
}

fn iq2_xxs(b: &[u8], y: &mut [f32]) {
    let d = f16(b, 0);
    for ib in 0..8 {
        let (idx, aux) = (u32_at(b, 2 + 8 * ib), u32_at(b, 6 + 8 * ib));
        let db = d * (0.5 + (aux >> 28) as f32) * 0.25;
        for l in 0..4 {
            let grid = IQ2XXS_GRID[(idx >> (8 * l)) as u8 as usize];
            let signs = KSIGNS[((aux >> (7 * l)) & 127) as usize];
            for j in 0..8 {
                y[32 * ib + 8 * l + j] = db * coord8(grid, j) as f32 * sign(signs, j);
            }
        }
    }
}

fn iq2_xs(b: &[u8], y: &mut [f32]) {
    let d = f16(b, 0);
    for ib in 0..8 {
        let s = b[66 + ib];
        let db = [d * (0.5 + (s & 0xF) as f32) * 0.25, d * (0.5 + (s >> 4) as f32) * 0.25];
        for l in 0..4 {
            let q = u16_at(b, 2 + 2 * (4 * ib + l));
            let grid = IQ2XS_GRID[(q & 511) as usize];
            let signs = KSIGNS[(q >> 9) as usize];
            for j in 0..8 {
                y[32 * ib + 8 * l + j] = db[l / 2] * coord8(grid, j) as f32 * sign(signs, j);
            }
        }
    }
}

fn iq2_s(b: &[u8], y: &mut [f32]) {
    let d = f16(b, 0);
    let (qs, signs, qh, scales) = (&b[2..34], &b[34..66], &b[66..74], &b[74..82]);
    for ib in 0..8 {
        let s = scales[ib];
        let db = [d * (0.5 + (s & 0xF) as f32) * 0.25, d * (0.5 + (s >> 4) as f32) * 0.25];
        for l in 0..4 {
            let k = 4 * ib + l;
            let idx = qs[k] as usize | (((qh[ib] >> (2 * l)) & 3) as usize) << 8;
            let grid = IQ2S_GRID[idx];
            for j in 0..8 {
                y[8 * k + j] = db[l / 2] * coord8(grid, j) as f32 * sign(signs[k], j);
            }
        }
    }
}

fn iq3_xxs(b: &[u8], y: &mut [f32]) {
    let d = f16(b, 0);
    let qs = &b[2..66];
    for ib in 0..8 {
        let aux = u32_at(b, 66 + 4 * ib);
        let db = d * (0.5 + (aux >> 28) as f32) * 0.5;
        for l in 0..4 {
            let signs = KSIGNS[((aux >> (7 * l)) & 127) as usize];
            let g = [IQ3XXS_GRID[qs[8 * ib + 2 * l] as usize], IQ3XXS_GRID[qs[8 * ib + 2 * l + 1] as usize]];
            for j in 0..8 {
                y[32 * ib + 8 * l + j] = db * coord4(g[j / 4], j % 4) as f32 * sign(signs, j);
            }
        }
    }
}

fn iq3_s(b: &[u8], y: &mut [f32]) {
    let d = f16(b, 0);
    let (qs, qh, signs, scales) = (&b[2..66], &b[66..74], &b[74..106], &b[106..110]);
    for ib in 0..8 {
        let db = d * (1 + 2 * ((scales[ib / 2] >> (4 * (ib % 2))) & 0xF) as i32) as f32;
        for k in 8 * ib..8 * ib + 8 {
            let idx = qs[k] as usize | (((qh[k / 8] >> (k % 8)) & 1) as usize) << 8;
            let grid = IQ3S_GRID[idx];
            for j in 0..4 {
                let e = 4 * k + j;
                y[e] = db * coord4(grid, j) as f32 * sign(signs[e / 8], e % 8);
            }
        }
    }
}

fn iq1_s(b: &[u8], y: &mut [f32]) {
    let d = f16(b, 0);
    let qs = &b[2..34];
    for ib in 0..8 {
        let qh = u16_at(b, 34 + 2 * ib);
        let dl = d * (2 * ((qh >> 12) & 7) + 1) as f32;
        let delta = if qh & 0x8000 != 0 { -IQ1_DELTA } else { IQ1_DELTA };
        for l in 0..4 {
            let grid = IQ1S_GRID[qs[4 * ib + l] as usize | (((qh >> (3 * l)) & 7) as usize) << 8];
            for j in 0..8 {
                y[32 * ib + 8 * l + j] = dl * (coord8(grid, j) as i8 as f32 + delta);
            }
        }
    }
}

/// IQ1_M's f16 scale, kept in the top nibbles of its four scale words.
pub(crate) fn iq1_m_scale(b: &[u8]) -> f32 {
    let sc: [u16; 4] = std::array::from_fn(|i| u16_at(b, 48 + 2 * i));
    f16_to_f32((sc[0] >> 12) | ((sc[1] >> 8) & 0xF0) | ((sc[2] >> 4) & 0xF00) | (sc[3] & 0xF000))
}

fn iq1_m(b: &[u8], y: &mut [f32]) {
    let d = iq1_m_scale(b);
    let (qs, qh) = (&b[0..32], &b[32..48]);
    for ib in 0..8 {
        let sc = u16_at(b, 48 + 2 * (ib / 2));
        let shift = 6 * (ib % 2);
        let dl = [d * (2 * ((sc >> shift) & 7) + 1) as f32, d * (2 * ((sc >> (shift + 3)) & 7) + 1) as f32];
        for l in 0..4 {
            let h = qh[2 * ib + l / 2] >> (4 * (l % 2));
            let grid = IQ1S_GRID[qs[4 * ib + l] as usize | ((h & 7) as usize) << 8];
            let delta = if h & 8 != 0 { -IQ1_DELTA } else { IQ1_DELTA };
            for j in 0..8 {
                y[32 * ib + 8 * l + j] = dl[l / 2] * (coord8(grid, j) as i8 as f32 + delta);
            }
        }
    }
}

/// E8M0 exponent → f32, halved (`ggml_e8m0_to_fp32_half`: the levels are doubled).
pub(crate) fn e8m0_half(x: u8) -> f32 {
    let bits = if x < 2 { 0x0020_0000u32 << x } else { ((x - 1) as u32) << 23 };
    f32::from_bits(bits)
}

fn mxfp4(b: &[u8], y: &mut [f32]) {
    let d = e8m0_half(b[0]);
    for (j, &q) in b[1..17].iter().enumerate() {
        y[j] = d * MXFP4_LEVELS[(q & 0xF) as usize] as f32;
        y[j + 16] = d * MXFP4_LEVELS[(q >> 4) as usize] as f32;
    }
}
