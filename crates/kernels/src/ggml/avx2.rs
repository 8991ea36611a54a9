//! The integer body on CPUs with AVX2 but not AVX-512 VNNI (Zen 1–3, Haswell to Raptor Lake):
//! the arithmetic of [`super::vnni::reference`] — `scale · code + min` per block, int8
//! activations per 32 values — with 32 codes per register as signed bytes.
//!
//! A block of 32 meets a token's codes in `vpmaddubsw` on |code| and the activation carrying the
//! code's sign, then `vpmaddwd` by ones: i32 sums of four products per lane, exact (|code| ≤ 128
//! and |activation| ≤ 127, so a pair is at most 32,512, inside i16). Lanes 0–3 hold the block's
//! first 16 values, so the scales of 16-value formats sit in lanes; one f32 multiply-add per
//! eight lanes applies them. A block's codes are decoded once and met by up to eight tokens.
//! The i-quants' lattice points (and signs) are gathered as scalars ([`low_bit::signed_points`],
//! [`low_bit::ternary_points`]) and combined in vector lanes.

use super::dequant::{iq4_xs_scale, k4_scale_min, IQ4NL_LEVELS, MXFP4_LEVELS};
use super::vnni::QuantAct;
use super::{low_bit, GgmlType};
use crate::dot::avx2::hsum;
use crate::quant::Fp4Kind;
use std::arch::x86_64::*;
use std::ops::Range;

pub fn available() -> bool {
    std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
        && std::arch::is_x86_feature_detected!("f16c")
}

/// Where a matrix's rows are: a ggml matrix, or dsv3's FP4 (E2M1 pairs, low nibble first, with
/// its block scale codes apart and NVFP4's tensor scale).
#[derive(Clone, Copy)]
pub enum Src<'a> {
    Ggml { data: &'a [u8], kind: GgmlType },
    Fp4 { data: &'a [u8], scales: &'a [u8], tensor_scale: f32, kind: Fp4Kind },
}

/// The rows as the bodies read them (the format is their const parameter).
#[derive(Clone, Copy)]
struct Rows<'a> {
    data: &'a [u8],
    scales: &'a [u8],
    tensor_scale: f32,
}

use super::vnni::format::*;
/// This body's own ids for the 1–3-bit formats ([`low_bit`]): the signed lattices, the ternary ones.
const LATTICE: u8 = 15;
const TERNARY: u8 = 16;

/// [`super::quantize_act`] eight values at a time (the transposed layouts of the AVX-512 body
/// are left empty: nothing here reads them).
///
/// # Safety
/// The CPU has [`available`]'s features.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn quantize_act(x: &[f32]) -> QuantAct {
    assert!(x.len().is_multiple_of(32), "activations in whole 32-value blocks");
    let mut a = QuantAct::with_capacity(x.len());
    let q = a.q.spare_capacity_mut().as_mut_ptr() as *mut i8;
    let abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFF_FFFF));
    for (i, b) in x.chunks_exact(32).enumerate() {
        let p = b.as_ptr();
        let v = [_mm256_loadu_ps(p), _mm256_loadu_ps(p.add(8)), _mm256_loadu_ps(p.add(16)), _mm256_loadu_ps(p.add(24))];
        let m = _mm256_max_ps(
            _mm256_max_ps(_mm256_and_ps(v[0], abs), _mm256_and_ps(v[1], abs)),
            _mm256_max_ps(_mm256_and_ps(v[2], abs), _mm256_and_ps(v[3], abs)),
        );
        let amax = hmax(m);
        let d = amax / 127.0;
        let id = _mm256_set1_ps(if d > 0.0 { 1.0 / d } else { 0.0 });
        // Rounded to nearest, ties to even (the default rounding), as the scalar quantizer.
        let mut c = [_mm256_setzero_si256(); 4];
        for (c, v) in c.iter_mut().zip(v) {
            *c = _mm256_cvtps_epi32(_mm256_mul_ps(v, id));
        }
        let s16 = _mm256_packs_epi32(c[0], c[1]);
        let s16b = _mm256_packs_epi32(c[2], c[3]);
        let bytes = _mm256_packs_epi16(s16, s16b);
        // The packs interleave 128-bit lanes: dwords 0,4,1,5,2,6,3,7 are in order.
        let bytes = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256(q.add(32 * i) as *mut __m256i, bytes);
        a.push_block(d, hsum_i32(_mm256_add_epi32(c[0], c[1])), hsum_i32(_mm256_add_epi32(c[2], c[3])));
    }
    // SAFETY: every block's 32 codes were written above.
    a.q.set_len(x.len());
    a
}

/// `out[j·m + t]` = row `rows.start + j` of `src` (rows of `k` values) against token `t`.
///
/// # Safety
/// The CPU has [`available`]'s features; `src` holds the rows (the caller checked the matrix),
/// `k` is a multiple of 32 and of the format's block, every `acts[t]` has `k` codes and `out` is
/// `rows.len() · acts.len()` long.
#[target_feature(enable = "avx2,fma,f16c")]
pub unsafe fn rows_dots(src: Src, k: usize, rows: Range<usize>, acts: &[QuantAct], out: &mut [f32]) {
    let (data, scales, tensor_scale, low) = match src {
        Src::Ggml { data, kind } => (data, &[][..], 1.0, kind),
        Src::Fp4 { data, scales, tensor_scale, .. } => (data, scales, tensor_scale, GgmlType::Q4_0),
    };
    let w = Rows { data, scales, tensor_scale };
    use GgmlType::*;
    match src {
        Src::Fp4 { kind: Fp4Kind::Mx, .. } => by_tokens::<FP4_MX>(w, low, k, rows, acts, out),
        Src::Fp4 { kind: Fp4Kind::Nv, .. } => by_tokens::<FP4_NV>(w, low, k, rows, acts, out),
        Src::Ggml { kind, .. } => match kind {
            Q4_0 => by_tokens::<{ self::Q4_0 }>(w, kind, k, rows, acts, out),
            Q4_1 => by_tokens::<{ self::Q4_1 }>(w, kind, k, rows, acts, out),
            Q5_0 => by_tokens::<{ self::Q5_0 }>(w, kind, k, rows, acts, out),
            Q5_1 => by_tokens::<{ self::Q5_1 }>(w, kind, k, rows, acts, out),
            Q8_0 => by_tokens::<{ self::Q8_0 }>(w, kind, k, rows, acts, out),
            Iq4Nl => by_tokens::<IQ4_NL>(w, kind, k, rows, acts, out),
            Mxfp4 => by_tokens::<MXFP4>(w, kind, k, rows, acts, out),
            Q4K => by_tokens::<{ self::Q4K }>(w, kind, k, rows, acts, out),
            Q5K => by_tokens::<{ self::Q5K }>(w, kind, k, rows, acts, out),
            Iq4Xs => by_tokens::<IQ4_XS>(w, kind, k, rows, acts, out),
            Q6K => by_tokens::<{ self::Q6K }>(w, kind, k, rows, acts, out),
            Q2K => by_tokens::<{ self::Q2K }>(w, kind, k, rows, acts, out),
            Q3K => by_tokens::<{ self::Q3K }>(w, kind, k, rows, acts, out),
            Iq1S | Iq1M => by_tokens::<TERNARY>(w, kind, k, rows, acts, out),
            _ if low_bit::handles(kind) => by_tokens::<LATTICE>(w, kind, k, rows, acts, out),
            _ => panic!("avx2::rows_dots: {kind} has no integer body"),
        },
    }
}

/// `m` tokens in groups of 8, 4, 2 and 1 (sums in registers).
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn by_tokens<const F: u8>(
    w: Rows,
    kind: GgmlType,
    k: usize,
    rows: Range<usize>,
    acts: &[QuantAct],
    out: &mut [f32],
) {
    let m = acts.len();
    let mut part = if matches!(m, 1 | 2 | 4 | 8) { vec![] } else { vec![0f32; rows.len() * 8] };
    let mut t0 = 0;
    while t0 < m {
        let g = [8, 4, 2, 1].into_iter().find(|&g| g <= m - t0).unwrap_or(1);
        let a = &acts[t0..t0 + g];
        let o = if g == m { &mut out[..rows.len() * g] } else { &mut part[..rows.len() * g] };
        match g {
            8 => body::<F, 8>(w, kind, k, rows.clone(), a, o),
            4 => body::<F, 4>(w, kind, k, rows.clone(), a, o),
            2 => body::<F, 2>(w, kind, k, rows.clone(), a, o),
            _ => body::<F, 1>(w, kind, k, rows.clone(), a, o),
        }
        if g != m {
            for (j, p) in part[..rows.len() * g].chunks_exact(g).enumerate() {
                out[j * m + t0..][..g].copy_from_slice(p);
            }
        }
        t0 += g;
    }
}

/// `M` tokens, their sums in registers. Per eight blocks of 32: the codes and scales once; then
/// per token eight exact integer sums, gathered into one vector of block sums by horizontal adds,
/// and one or two float multiply-adds with the eight blocks' scales. The blocks past the last
/// eight take one multiply-add each.
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn body<const F: u8, const M: usize>(
    w: Rows,
    kind: GgmlType,
    k: usize,
    rows: Range<usize>,
    acts: &[QuantAct],
    out: &mut [f32],
) {
    let has_min = matches!(F, Q4_1 | Q5_1 | Q4K | Q5K | Q2K);
    let per16 = matches!(F, Q6K | FP4_NV) || (F >= Q2K && low_bit::per16(kind));
    // Bytes of a row, and of a block of `be` values.
    let (bb, be) = match F {
        FP4_MX | FP4_NV => (16, 32),
        _ => (kind.block_bytes(), kind.block_elems()),
    };
    let (rb, blocks) = (k / be * bb, k / 32);
    let ones = _mm256_set1_epi16(1);
    for (j, r) in rows.enumerate() {
        let mut acc = [_mm256_setzero_ps(); M];
        let mut tmin = [0f32; M];
        let row = &w.data[r * rb..][..rb];
        let block = |g: usize| &row[g / (be / 32) * bb..][..bb];
        let mut g = 0;
        while g + 8 <= blocks {
            let (mut codes, mut mags) = ([_mm256_setzero_si256(); 8], [_mm256_setzero_si256(); 8]);
            for i in 0..8 {
                codes[i] = decode::<F>(w, kind, block(g + i), k, r, g + i);
                mags[i] = _mm256_sign_epi8(codes[i], codes[i]);
            }
            let (mut sc, mut mn) = ([[0f32; 8]; 2], [[0f32; 2]; 8]);
            scales::<F>(w, kind, row, k, r, g, 8, &mut sc, &mut mn);
            let (sc0, sc1) = (_mm256_loadu_ps(sc[0].as_ptr()), _mm256_loadu_ps(sc[1].as_ptr()));
            let mn8 = _mm256_setr_ps(mn[0][0], mn[1][0], mn[2][0], mn[3][0], mn[4][0], mn[5][0], mn[6][0], mn[7][0]);
            for t in 0..M {
                let a = &acts[t];
                let mut s = [_mm256_setzero_si256(); 8];
                for i in 0..8 {
                    let av = _mm256_loadu_si256(a.q.as_ptr().add(32 * (g + i)) as *const __m256i);
                    s[i] = _mm256_madd_epi16(_mm256_maddubs_epi16(mags[i], _mm256_sign_epi8(av, codes[i])), ones);
                }
                // Lanes 0–3 of each sum cover a block's first 16 values: after two rounds of
                // horizontal adds the low half of h0 holds blocks 0–3's first-half sums, its high
                // half their second-half sums (h1: blocks 4–7).
                let h0 = _mm256_hadd_epi32(_mm256_hadd_epi32(s[0], s[1]), _mm256_hadd_epi32(s[2], s[3]));
                let h1 = _mm256_hadd_epi32(_mm256_hadd_epi32(s[4], s[5]), _mm256_hadd_epi32(s[6], s[7]));
                let first = _mm256_permute2x128_si256::<0x20>(h0, h1);
                let second = _mm256_permute2x128_si256::<0x31>(h0, h1);
                let d8 = _mm256_loadu_ps(a.d.as_ptr().add(g));
                acc[t] = if per16 {
                    let x = _mm256_fmadd_ps(_mm256_cvtepi32_ps(first), _mm256_mul_ps(sc0, d8), acc[t]);
                    _mm256_fmadd_ps(_mm256_cvtepi32_ps(second), _mm256_mul_ps(sc1, d8), x)
                } else {
                    let both = _mm256_cvtepi32_ps(_mm256_add_epi32(first, second));
                    _mm256_fmadd_ps(both, _mm256_mul_ps(sc0, d8), acc[t])
                };
                if has_min && !per16 {
                    // One minimum per block: Σ d·min·(the block's code sum), eight at a time.
                    let s32 = _mm256_loadu_ps(a.sum32f.as_ptr().add(g));
                    acc[t] = _mm256_fmadd_ps(_mm256_mul_ps(mn8, d8), s32, acc[t]);
                } else if has_min {
                    for (i, mn) in mn.iter().enumerate() {
                        let (s0, s1) = (*a.sum16.get_unchecked(2 * (g + i)), *a.sum16.get_unchecked(2 * (g + i) + 1));
                        tmin[t] += a.d[g + i] * (mn[0] * s0 as f32 + mn[1] * s1 as f32);
                    }
                }
            }
            g += 8;
        }
        while g < blocks {
            let codes = decode::<F>(w, kind, block(g), k, r, g);
            let mags = _mm256_sign_epi8(codes, codes);
            let (mut sc, mut mn) = ([[0f32; 8]; 2], [[0f32; 2]; 8]);
            scales::<F>(w, kind, row, k, r, g, 1, &mut sc, &mut mn);
            let scale = halves(sc[0][0], sc[1][0]);
            for t in 0..M {
                let a = &acts[t];
                let av = _mm256_loadu_si256(a.q.as_ptr().add(32 * g) as *const __m256i);
                let p = _mm256_maddubs_epi16(mags, _mm256_sign_epi8(av, codes));
                let s = _mm256_cvtepi32_ps(_mm256_madd_epi16(p, ones));
                let d = *a.d.get_unchecked(g);
                acc[t] = _mm256_fmadd_ps(s, _mm256_mul_ps(scale, _mm256_set1_ps(d)), acc[t]);
                if has_min {
                    let (s0, s1) = (*a.sum16.get_unchecked(2 * g), *a.sum16.get_unchecked(2 * g + 1));
                    tmin[t] += d * (mn[0][0] * s0 as f32 + mn[0][1] * s1 as f32);
                }
            }
            g += 1;
        }
        for t in 0..M {
            out[j * M + t] = hsum(acc[t]) + tmin[t];
        }
    }
}

/// The codes of block `g` (32 values) of row `r`, whose block of the format is `b`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn decode<const F: u8>(src: Rows, kind: GgmlType, b: &[u8], k: usize, r: usize, g: usize) -> __m256i {
    let (p, i) = (b.as_ptr(), g % (kind.block_elems() / 32).max(1));
    let low = _mm256_set1_epi8(0xF);
    match F {
        FP4_MX | FP4_NV => {
            let _ = (src, k, r);
            _mm256_shuffle_epi8(levels(&MXFP4_LEVELS), pairs32(p))
        }
        Q8_0 => _mm256_loadu_si256(p.add(2) as *const __m256i),
        Q4_0 => _mm256_sub_epi8(nibbles32(p.add(2)), _mm256_set1_epi8(8)),
        Q4_1 => nibbles32(p.add(4)),
        Q5_0 => {
            let hi = _mm256_and_si256(bits32(b, 2), _mm256_set1_epi8(16));
            _mm256_sub_epi8(_mm256_or_si256(nibbles32(p.add(6)), hi), _mm256_set1_epi8(16))
        }
        Q5_1 => _mm256_or_si256(nibbles32(p.add(8)), _mm256_and_si256(bits32(b, 4), _mm256_set1_epi8(16))),
        IQ4_NL => _mm256_shuffle_epi8(levels(&IQ4NL_LEVELS), nibbles32(p.add(2))),
        MXFP4 => _mm256_shuffle_epi8(levels(&MXFP4_LEVELS), nibbles32(p.add(1))),
        IQ4_XS => _mm256_shuffle_epi8(levels(&IQ4NL_LEVELS), nibbles32(p.add(8 + 16 * i))),
        Q4K | Q5K => {
            // Pairs of blocks share 32 bytes: the low nibbles, then the high.
            let qs = if F == Q4K { 16 } else { 48 };
            let q = _mm256_loadu_si256(p.add(qs + 32 * (i / 2)) as *const __m256i);
            let v = _mm256_and_si256(_mm256_srl_epi16(q, _mm_cvtsi32_si128(4 * (i % 2) as i32)), low);
            if F == Q4K {
                return v;
            }
            // Bit i of each of the 32 high-bit bytes, as 16.
            let qh = _mm256_loadu_si256(p.add(16) as *const __m256i);
            let bit = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(i as i32)), _mm256_set1_epi8(1));
            _mm256_or_si256(v, _mm256_slli_epi16::<4>(bit))
        }
        Q6K => {
            let (half, q) = (i / 4, i % 4);
            let ql = _mm256_loadu_si256(p.add(half * 64 + q % 2 * 32) as *const __m256i);
            let qh = _mm256_loadu_si256(p.add(128 + half * 32) as *const __m256i);
            let l = _mm256_and_si256(_mm256_srl_epi16(ql, _mm_cvtsi32_si128(4 * (q / 2) as i32)), low);
            let h = _mm256_and_si256(_mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * q as i32)), _mm256_set1_epi8(3));
            _mm256_sub_epi8(_mm256_or_si256(l, _mm256_slli_epi16::<4>(h)), _mm256_set1_epi8(32))
        }
        Q2K => {
            let q = _mm256_loadu_si256(p.add(16 + i / 4 * 32) as *const __m256i);
            _mm256_and_si256(_mm256_srl_epi16(q, _mm_cvtsi32_si128(2 * (i % 4) as i32)), _mm256_set1_epi8(3))
        }
        Q3K => {
            // Two low bits, and a high bit that is set for the upper half: low + 4·high − 4.
            let q = _mm256_loadu_si256(p.add(32 + i / 4 * 32) as *const __m256i);
            let l = _mm256_and_si256(_mm256_srl_epi16(q, _mm_cvtsi32_si128(2 * (i % 4) as i32)), _mm256_set1_epi8(3));
            let hm = _mm256_loadu_si256(p as *const __m256i);
            let h = _mm256_and_si256(_mm256_srl_epi16(hm, _mm_cvtsi32_si128(i as i32)), _mm256_set1_epi8(1));
            _mm256_sub_epi8(_mm256_or_si256(l, _mm256_slli_epi16::<2>(h)), _mm256_set1_epi8(4))
        }
        LATTICE => {
            let (m, signs) = low_bit::signed_points(kind, b, i).unwrap_or_default();
            let v = _mm256_setr_epi64x(m[0] as i64, m[1] as i64, m[2] as i64, m[3] as i64);
            let neg = bits32(&signs.to_le_bytes(), 0);
            _mm256_sub_epi8(_mm256_xor_si256(v, neg), neg)
        }
        _ => {
            // IQ1_S / IQ1_M: 8·coordinate (three doublings: a shift would cross bytes) + shift.
            let (c, d) = low_bit::ternary_points(kind, b, i).unwrap_or_default();
            let v = _mm256_setr_epi64x(c[0] as i64, c[1] as i64, c[2] as i64, c[3] as i64);
            let v2 = _mm256_add_epi8(v, v);
            let v4 = _mm256_add_epi8(v2, v2);
            let shift = _mm256_setr_epi64x(d[0] as i64, d[1] as i64, d[2] as i64, d[3] as i64);
            _mm256_add_epi8(_mm256_add_epi8(v4, v4), shift)
        }
    }
}

/// f16 at `b[at..]` by F16C.
#[inline]
#[target_feature(enable = "avx2,f16c")]
unsafe fn h(b: &[u8], at: usize) -> f32 {
    let bits = u16::from_le_bytes([b[at], b[at + 1]]);
    _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(bits as i32)))
}

/// The scales (`sc[half][i]`) and minimums (`mn[i][half]`) of blocks `g..g + n` of row `r`
/// (`n` ≤ 8; a super-block format's eight blocks are one super-block: its scales decode once).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
#[allow(clippy::too_many_arguments, clippy::needless_range_loop)]
unsafe fn scales<const F: u8>(
    src: Rows,
    kind: GgmlType,
    row: &[u8],
    k: usize,
    r: usize,
    g: usize,
    n: usize,
    sc: &mut [[f32; 8]; 2],
    mn: &mut [[f32; 2]; 8],
) {
    let bb = kind.block_bytes();
    let one = |sc: &mut [[f32; 8]; 2], i: usize, s: f32| {
        sc[0][i] = s;
        sc[1][i] = s;
    };
    match F {
        FP4_MX => {
            for i in 0..n {
                // The levels are doubled: half the scale.
                one(sc, i, 0.5 * Fp4Kind::Mx.scale(src.scales[r * (k / 32) + g + i], src.tensor_scale));
            }
        }
        FP4_NV => {
            for i in 0..n {
                let s = &src.scales[r * (k / 16) + 2 * (g + i)..][..2];
                for half in 0..2 {
                    sc[half][i] = 0.5 * Fp4Kind::Nv.scale(s[half], src.tensor_scale);
                }
            }
        }
        Q8_0 | Q4_0 | Q5_0 | IQ4_NL | Q4_1 | Q5_1 | MXFP4 => {
            for i in 0..n {
                let b = &row[(g + i) * bb..][..bb];
                if F == MXFP4 {
                    one(sc, i, super::dequant::e8m0_half(b[0]));
                } else {
                    one(sc, i, h(b, 0));
                }
                if matches!(F, Q4_1 | Q5_1) {
                    mn[i] = [h(b, 2); 2];
                }
            }
        }
        _ => {
            // A super-block: blocks g..g + 8 are all of it.
            let b = &row[g / 8 * bb..][..bb];
            match F {
                IQ4_XS => {
                    let d = h(b, 0);
                    for i in 0..8 {
                        one(sc, i, d * iq4_xs_scale(b, i) as f32);
                    }
                }
                Q4K | Q5K => {
                    let (d, dmin) = (h(b, 0), h(b, 2));
                    for i in 0..8 {
                        let (s, m) = k4_scale_min(&b[4..16], i);
                        one(sc, i, d * s as f32);
                        mn[i] = [-dmin * m as f32; 2];
                    }
                }
                Q6K => {
                    let d = h(b, 208);
                    for i in 0..8 {
                        for half in 0..2 {
                            sc[half][i] = d * b[192 + 2 * i + half] as i8 as f32;
                        }
                    }
                }
                _ => {
                    let (mut s, mut m) = ([0f32; 16], [0f32; 16]);
                    low_bit::group_scales(kind, b, &mut s, &mut m);
                    for i in 0..8 {
                        if low_bit::per16(kind) {
                            (sc[0][i], sc[1][i]) = (s[2 * i], s[2 * i + 1]);
                            mn[i] = [m[2 * i], m[2 * i + 1]];
                        } else {
                            one(sc, i, s[i]);
                            mn[i] = [m[i]; 2];
                        }
                    }
                }
            }
        }
    }
}

/// One scale for each 16 values of a block of 32 (lanes 0–3 sum its first half).
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn halves(a: f32, b: f32) -> __m256 {
    _mm256_setr_ps(a, a, a, a, b, b, b, b)
}

/// A 16-entry table of signed levels in both 128-bit lanes (for `vpshufb`).
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn levels(t: &[i8; 16]) -> __m256i {
    _mm256_broadcastsi128_si256(_mm_loadu_si128(t.as_ptr() as *const __m128i))
}

/// ggml's nibble order: 16 bytes → values 0..16 from the low nibbles, 16..32 from the high.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn nibbles32(p: *const u8) -> __m256i {
    let q = _mm_loadu_si128(p as *const __m128i);
    let low = _mm_set1_epi8(0xF);
    _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16::<4>(q), low), _mm_and_si128(q, low))
}

/// dsv3's FP4 order: value 2i in the low nibble of byte i, 2i + 1 in the high.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn pairs32(p: *const u8) -> __m256i {
    let q = _mm_loadu_si128(p as *const __m128i);
    let low = _mm_set1_epi8(0xF);
    let (l, h) = (_mm_and_si128(q, low), _mm_and_si128(_mm_srli_epi16::<4>(q), low));
    _mm256_set_m128i(_mm_unpackhi_epi8(l, h), _mm_unpacklo_epi8(l, h))
}

/// The 32 bits of the little-endian word at `b[at..]` as bytes: 0xFF where bit i is set.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn bits32(b: &[u8], at: usize) -> __m256i {
    let w = u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
    // Byte i of the result takes byte i / 8 of the word (each 128-bit lane holds all four).
    let spread = _mm256_shuffle_epi8(
        _mm256_set1_epi32(w as i32),
        _mm256_setr_epi8(
            0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3,
        ),
    );
    let bit = _mm256_set1_epi64x(0x8040_2010_0804_0201u64 as i64);
    _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit)
}

#[inline]
#[target_feature(enable = "avx2")]
unsafe fn hmax(v: __m256) -> f32 {
    let b = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let c = _mm_max_ps(b, _mm_movehl_ps(b, b));
    _mm_cvtss_f32(_mm_max_ss(c, _mm_shuffle_ps::<1>(c, c)))
}

#[inline]
#[target_feature(enable = "avx2")]
unsafe fn hsum_i32(v: __m256i) -> i32 {
    let b = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256::<1>(v));
    let c = _mm_add_epi32(b, _mm_unpackhi_epi64(b, b));
    _mm_cvtsi128_si32(_mm_add_epi32(c, _mm_shuffle_epi32::<1>(c)))
}
