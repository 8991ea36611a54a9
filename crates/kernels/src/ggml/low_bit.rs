//! The 1–3-bit formats (Q2_K, Q3_K and the i-quants of the dynamic mixes) as the integer body
//! of [`super::vnni`] takes them: `scale · code + min` per group of 16 or 32 values of a
//! 256-value super-block, with `code` a small signed integer.
//!
//! - Q2_K: the 2-bit code, scale `d·sc`, minimum `−dmin·m` per 16.
//! - Q3_K: the 3-bit code less 4, scale `d·(sc − 32)` per 16.
//! - IQ2_XXS/XS/S, IQ3_XXS/S: a lattice point's coordinate times its sign; the scale per 32
//!   (IQ2_XS, IQ2_S: per 16).
//! - IQ1_S/M: a ternary coordinate `g` shifted by `δ = ±1/8` per group (IQ1_M: per 8 values) is
//!   `(8g ± 1) / 8`: the code `8g ± 1`, and `1/8` goes into the scale (per 32; IQ1_M per 16).
//!
//! [`group_scales`] and [`code`] are the scalar definition; the vector body builds the same codes
//! from the lattice tables with gathers.

use super::dequant::{f16, iq1_m_scale, q3_k_scales, u16_at, u32_at};
use super::lattice::*;
use super::GgmlType;

/// The formats here.
pub fn handles(kind: GgmlType) -> bool {
    use GgmlType::*;
    matches!(kind, Q2K | Q3K | Iq2Xxs | Iq2Xs | Iq2S | Iq3Xxs | Iq3S | Iq1S | Iq1M)
}

/// Scales of 16 values (else of 32).
pub fn per16(kind: GgmlType) -> bool {
    use GgmlType::*;
    matches!(kind, Q2K | Q3K | Iq2Xs | Iq2S | Iq1M)
}

/// What the vector body adds to each signed code so that it is an unsigned byte.
pub fn offset(kind: GgmlType) -> i32 {
    use GgmlType::*;
    match kind {
        Q3K => 4,
        Iq2Xxs | Iq2Xs | Iq2S | Iq3Xxs | Iq3S => 64,
        Iq1S | Iq1M => 9,
        _ => 0,
    }
}

/// `(2s + 1)·d·k` for a 3- or 4-bit scale field `s`.
#[inline]
fn odd(s: u32, d: f32, k: f32) -> f32 {
    d * (2 * s + 1) as f32 * k
}

/// The super-block `b`'s scales and minimums, one per group (16 groups of 16 values, or 8 of 32).
pub fn group_scales(kind: GgmlType, b: &[u8], sc: &mut [f32; 16], mn: &mut [f32; 16]) {
    use GgmlType::*;
    let d = || f16(b, 0);
    match kind {
        Q2K => {
            let (d, dmin) = (f16(b, 80), f16(b, 82));
            for (g, &s) in b[..16].iter().enumerate() {
                sc[g] = d * (s & 0xF) as f32;
                mn[g] = -(dmin * (s >> 4) as f32);
            }
        }
        Q3K => {
            let d = f16(b, 108);
            for (sc, s) in sc.iter_mut().zip(q3_k_scales(&b[96..108])) {
                *sc = d * s as f32;
            }
        }
        Iq2Xxs | Iq3Xxs => {
            let (d, at, k) = if kind == Iq2Xxs { (d(), 6, 0.125) } else { (d(), 66, 0.25) };
            let step = if kind == Iq2Xxs { 8 } else { 4 };
            for (ib, sc) in sc.iter_mut().take(8).enumerate() {
                *sc = odd(u32_at(b, at + step * ib) >> 28, d, k);
            }
        }
        Iq2Xs | Iq2S => {
            let (d, at) = (d(), if kind == Iq2Xs { 66 } else { 74 });
            for (g, sc) in sc.iter_mut().enumerate() {
                *sc = odd(((b[at + g / 2] >> (4 * (g % 2))) & 0xF) as u32, d, 0.125);
            }
        }
        Iq3S => {
            let d = d();
            for (ib, sc) in sc.iter_mut().take(8).enumerate() {
                *sc = odd(((b[106 + ib / 2] >> (4 * (ib % 2))) & 0xF) as u32, d, 1.0);
            }
        }
        Iq1S => {
            let d = d();
            for (ib, sc) in sc.iter_mut().take(8).enumerate() {
                *sc = odd(((u16_at(b, 34 + 2 * ib) >> 12) & 7) as u32, d, 0.125);
            }
        }
        Iq1M => {
            let d = iq1_m_scale(b);
            for (g, sc) in sc.iter_mut().enumerate() {
                let (ib, half) = (g / 2, g % 2);
                let w = u16_at(b, 48 + 2 * (ib / 2));
                *sc = odd(((w >> (6 * (ib % 2) + 3 * half)) & 7) as u32, d, 0.125);
            }
        }
        _ => unreachable!("{kind} is not a low-bit format"),
    }
}

/// Sign bit `j` of the eight in `bits` as ±1.
#[inline]
fn signed(mag: u8, bits: u8, j: usize) -> i32 {
    if bits >> j & 1 != 0 {
        -(mag as i32)
    } else {
        mag as i32
    }
}

/// Code `j` (0..256) of the super-block `b`: the value is `scale · code + min` of its group.
pub fn code(kind: GgmlType, b: &[u8], j: usize) -> i32 {
    use GgmlType::*;
    let (ib, l, e) = (j / 32, j % 32 / 8, j % 8);
    let k = j / 8;
    match kind {
        Q2K => ((b[16 + j / 128 * 32 + j % 32] >> (2 * (j % 128 / 32))) & 3) as i32,
        Q3K => {
            let low = (b[32 + j / 128 * 32 + j % 32] >> (2 * (j % 128 / 32))) & 3;
            low as i32 + 4 * ((b[j % 32] >> (j / 32)) & 1) as i32 - 4
        }
        Iq2Xxs => {
            let (idx, aux) = (u32_at(b, 2 + 8 * ib), u32_at(b, 6 + 8 * ib));
            let grid = IQ2XXS_GRID[(idx >> (8 * l)) as u8 as usize];
            signed(coord8(grid, e), KSIGNS[((aux >> (7 * l)) & 127) as usize], e)
        }
        Iq2Xs => {
            let q = u16_at(b, 2 + 2 * k);
            signed(coord8(IQ2XS_GRID[(q & 511) as usize], e), KSIGNS[(q >> 9) as usize], e)
        }
        Iq2S => {
            let idx = b[2 + k] as usize | (((b[66 + ib] >> (2 * l)) & 3) as usize) << 8;
            signed(coord8(IQ2S_GRID[idx], e), b[34 + k], e)
        }
        Iq3Xxs => {
            let aux = u32_at(b, 66 + 4 * ib);
            let grid = IQ3XXS_GRID[b[2 + j / 4] as usize];
            signed(coord4(grid, j % 4), KSIGNS[((aux >> (7 * l)) & 127) as usize], e)
        }
        Iq3S => {
            let p = j / 4;
            let idx = b[2 + p] as usize | (((b[66 + p / 8] >> (p % 8)) & 1) as usize) << 8;
            signed(coord4(IQ3S_GRID[idx], j % 4), b[74 + k], e)
        }
        Iq1S => {
            let qh = u16_at(b, 34 + 2 * ib);
            let g = coord8(IQ1S_GRID[b[2 + k] as usize | (((qh >> (3 * l)) & 7) as usize) << 8], e) as i8;
            8 * g as i32 + if qh & 0x8000 != 0 { -1 } else { 1 }
        }
        Iq1M => {
            let h = b[32 + 2 * ib + l / 2] >> (4 * (l % 2));
            let g = coord8(IQ1S_GRID[b[k] as usize | ((h & 7) as usize) << 8], e) as i8;
            8 * g as i32 + if h & 8 != 0 { -1 } else { 1 }
        }
        _ => unreachable!("{kind} is not a low-bit format"),
    }
}

/// Block `i` (values `32i..32i + 32`) of a signed-lattice super-block (IQ2_XXS, IQ2_XS, IQ2_S,
/// IQ3_XXS, IQ3_S) as four 8-byte magnitudes and 32 sign bits (bit `j`: value `32i + j` is
/// negative): [`code`]'s values, gathered for a vector body. `None` for the other formats.
#[inline]
pub fn signed_points(kind: GgmlType, b: &[u8], i: usize) -> Option<([u64; 4], u32)> {
    use GgmlType::*;
    let (mut mags, mut signs) = ([0u64; 4], [0u8; 4]);
    let pair = |grid: &[u32], p: [usize; 2]| grid[p[0]] as u64 | (grid[p[1]] as u64) << 32;
    // One loop per format (the format's match outside the loop).
    match kind {
        Iq2Xxs => {
            let (idx, aux) = (u32_at(b, 2 + 8 * i), u32_at(b, 6 + 8 * i));
            for l in 0..4 {
                mags[l] = IQ2XXS_GRID[(idx >> (8 * l)) as u8 as usize];
                signs[l] = KSIGNS[((aux >> (7 * l)) & 127) as usize];
            }
        }
        Iq2Xs => {
            for l in 0..4 {
                let q = u16_at(b, 2 + 2 * (4 * i + l));
                (mags[l], signs[l]) = (IQ2XS_GRID[(q & 511) as usize], KSIGNS[(q >> 9) as usize]);
            }
        }
        Iq2S => {
            for l in 0..4 {
                let k = 4 * i + l;
                let idx = b[2 + k] as usize | (((b[66 + i] >> (2 * l)) & 3) as usize) << 8;
                (mags[l], signs[l]) = (IQ2S_GRID[idx], b[34 + k]);
            }
        }
        Iq3Xxs => {
            let aux = u32_at(b, 66 + 4 * i);
            for l in 0..4 {
                let p = 2 * (4 * i + l);
                mags[l] = pair(&IQ3XXS_GRID, [b[2 + p] as usize, b[3 + p] as usize]);
                signs[l] = KSIGNS[((aux >> (7 * l)) & 127) as usize];
            }
        }
        Iq3S => {
            let idx = |p: usize| b[2 + p] as usize | (((b[66 + p / 8] >> (p % 8)) & 1) as usize) << 8;
            for l in 0..4 {
                let k = 4 * i + l;
                (mags[l], signs[l]) = (pair(&IQ3S_GRID, [idx(2 * k), idx(2 * k + 1)]), b[74 + k]);
            }
        }
        _ => return None,
    }
    Some((mags, u32::from_le_bytes(signs)))
}

/// Block `i` of an IQ1_S / IQ1_M super-block as four 8-byte points of signed coordinates
/// (−1, 0 or 1) and the shift of each point (±1 as bytes): [`code`] is `8·coordinate + shift`.
/// `None` for the other formats.
pub fn ternary_points(kind: GgmlType, b: &[u8], i: usize) -> Option<([u64; 4], [u64; 4])> {
    let (mut pts, mut shift) = ([0u64; 4], [0u64; 4]);
    let bytes = |neg: bool| if neg { 0xFFu64 } else { 1 } * 0x0101_0101_0101_0101;
    for l in 0..4 {
        let k = 4 * i + l;
        (pts[l], shift[l]) = match kind {
            GgmlType::Iq1S => {
                let qh = u16_at(b, 34 + 2 * i);
                (IQ1S_GRID[b[2 + k] as usize | (((qh >> (3 * l)) & 7) as usize) << 8], bytes(qh & 0x8000 != 0))
            }
            GgmlType::Iq1M => {
                let h = b[32 + 2 * i + l / 2] >> (4 * (l % 2));
                (IQ1S_GRID[b[k] as usize | ((h & 7) as usize) << 8], bytes(h & 8 != 0))
            }
            _ => return None,
        };
    }
    Some((pts, shift))
}

/// The codes of 64 values at a time in AVX-512, from the lattice tables by gathers.
#[cfg(target_arch = "x86_64")]
pub(super) mod avx512 {
    use super::*;
    use std::arch::x86_64::*;

    #[inline]
    unsafe fn rd16(p: *const u8) -> u16 {
        (p as *const u16).read_unaligned()
    }

    #[inline]
    unsafe fn rd32(p: *const u8) -> u32 {
        (p as *const u32).read_unaligned()
    }

    /// `ksigns_iq2xs` of eight 7-bit indices, one per byte of `v`: the eighth bit makes each
    /// byte's count of ones even.
    #[inline]
    fn with_parity(v: u64) -> u64 {
        let mut x = v;
        x ^= x >> 4;
        x ^= x >> 2;
        x ^= x >> 1;
        v | (x & 0x0101_0101_0101_0101) << 7
    }

    /// The sign bytes of two groups' words `a0`, `a1` (four 7-bit indices in the low 28 bits each).
    #[inline]
    #[target_feature(enable = "bmi2")]
    unsafe fn ksigns8(a0: u32, a1: u32) -> u64 {
        let bytes = |a: u32| _pdep_u64(a as u64, 0x7f7f_7f7f);
        with_parity(bytes(a0) | bytes(a1) << 32)
    }

    /// Each set bit of `bits` as a byte of ones.
    #[inline]
    #[target_feature(enable = "bmi2")]
    unsafe fn spread8(bits: u32) -> u64 {
        _pdep_u64(bits as u64, 0x0101_0101_0101_0101) * 0xFF
    }

    /// Magnitudes negated where `signs` has a bit, plus `off` (unsigned bytes for `vpdpbusd`).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn with_signs(mag: __m512i, signs: u64, off: i8) -> __m512i {
        let v = _mm512_mask_sub_epi8(mag, signs, _mm512_setzero_si512(), mag);
        _mm512_add_epi8(v, _mm512_set1_epi8(off))
    }

    /// Eight 8-value lattice points by index.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn points8(grid: &[u64], idx: __m512i) -> __m512i {
        _mm512_i64gather_epi64::<8>(idx, grid.as_ptr() as *const i64)
    }

    /// IQ1's codes `8g ± 1 + 9` from ternary points `g` and a mask of the bytes whose δ is −1/8.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn iq1_codes(g: __m512i, neg: u64) -> __m512i {
        // (g + 1)·8 stays within each byte (at most 16).
        let base = _mm512_slli_epi16(_mm512_add_epi8(g, _mm512_set1_epi8(1)), 3);
        _mm512_add_epi8(base, _mm512_mask_blend_epi8(neg, _mm512_set1_epi8(2), _mm512_setzero_si512()))
    }

    /// f16 at `p` through F16C.
    #[inline]
    #[target_feature(enable = "f16c")]
    unsafe fn f16c(p: *const u8) -> f32 {
        _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(rd16(p) as i32)))
    }

    /// Sixteen nibbles of `v` (low nibble of each byte first) as i32 lanes.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn nibbles16(v: u64) -> __m512i {
        let m = 0x0f0f_0f0f_0f0f_0f0fu64;
        let (lo, hi) = (_mm_cvtsi64_si128((v & m) as i64), _mm_cvtsi64_si128(((v >> 4) & m) as i64));
        _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(lo, hi))
    }

    /// `(2s + 1)·d·k` of i32 lanes `s`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn odd(s: __m512i, d: f32, k: f32) -> __m512 {
        let s = _mm512_add_epi32(_mm512_slli_epi32(s, 1), _mm512_set1_epi32(1));
        _mm512_mul_ps(_mm512_cvtepi32_ps(s), _mm512_set1_ps(d * k))
    }

    /// [`group_scales`] of the super-block at `b` in vector lanes (8 of them where the scales
    /// are per 32): the scales, and Q2_K's minimums.
    ///
    /// # Safety
    /// AVX-512 F/BW/VL and F16C; `b` points at a whole super-block of `kind`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,f16c")]
    pub unsafe fn scales(kind: GgmlType, b: *const u8) -> (__m512, __m512) {
        use GgmlType::*;
        let zero = _mm512_setzero_ps();
        let lanes32 = |p: *const u8| _mm512_zextsi256_si512(_mm256_loadu_si256(p as *const __m256i));
        match kind {
            Q2K => {
                let s = _mm512_cvtepu8_epi32(_mm_loadu_si128(b as *const __m128i));
                let sc = _mm512_cvtepi32_ps(_mm512_and_si512(s, _mm512_set1_epi32(0xF)));
                let mn = _mm512_cvtepi32_ps(_mm512_srli_epi32(s, 4));
                (
                    _mm512_mul_ps(sc, _mm512_set1_ps(f16c(b.add(80)))),
                    _mm512_mul_ps(mn, _mm512_set1_ps(-f16c(b.add(82)))),
                )
            }
            Q3K => {
                // The four words of sixteen 6-bit scales (low nibbles, then two high bits each).
                let (a0, a1, t) = (rd32(b.add(96)), rd32(b.add(100)), rd32(b.add(104)));
                let (m4, m2) = (0x0f0f_0f0fu32, 0x0303_0303u32);
                let w = [
                    (a0 & m4) | (t & m2) << 4,
                    (a1 & m4) | ((t >> 2) & m2) << 4,
                    ((a0 >> 4) & m4) | ((t >> 4) & m2) << 4,
                    ((a1 >> 4) & m4) | ((t >> 6) & m2) << 4,
                ];
                let s = _mm512_cvtepu8_epi32(_mm_loadu_si128(w.as_ptr() as *const __m128i));
                let s = _mm512_cvtepi32_ps(_mm512_sub_epi32(s, _mm512_set1_epi32(32)));
                (_mm512_mul_ps(s, _mm512_set1_ps(f16c(b.add(108)))), zero)
            }
            Iq2Xxs => {
                let idx = _mm512_setr_epi32(6, 14, 22, 30, 38, 46, 54, 62, 0, 0, 0, 0, 0, 0, 0, 0);
                let w = _mm512_mask_i32gather_epi32::<1>(_mm512_setzero_si512(), 0xFF, idx, b as *const i32);
                (odd(_mm512_srli_epi32(w, 28), f16c(b), 0.125), zero)
            }
            Iq3Xxs => (odd(_mm512_srli_epi32(lanes32(b.add(66)), 28), f16c(b), 0.25), zero),
            Iq2Xs | Iq2S => {
                let at = if kind == Iq2Xs { 66 } else { 74 };
                (odd(nibbles16((b.add(at) as *const u64).read_unaligned()), f16c(b), 0.125), zero)
            }
            Iq3S => (odd(nibbles16(rd32(b.add(106)) as u64), f16c(b), 1.0), zero),
            Iq1S => {
                let qh = _mm512_zextsi256_si512(_mm256_cvtepu16_epi32(_mm_loadu_si128(b.add(34) as *const __m128i)));
                let s = _mm512_and_si512(_mm512_srli_epi32(qh, 12), _mm512_set1_epi32(7));
                (odd(s, f16c(b), 0.125), zero)
            }
            Iq1M => {
                // Scale g is bits 3·(g % 4).. of word g / 4.
                let w = _mm512_zextsi256_si512(_mm256_cvtepu16_epi32(_mm_loadl_epi64(b.add(48) as *const __m128i)));
                let w = _mm512_permutexvar_epi32(_mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3), w);
                let sh = _mm512_setr_epi32(0, 3, 6, 9, 0, 3, 6, 9, 0, 3, 6, 9, 0, 3, 6, 9);
                let s = _mm512_and_si512(_mm512_srlv_epi32(w, sh), _mm512_set1_epi32(7));
                let d = iq1_m_scale(std::slice::from_raw_parts(b, 56));
                (odd(s, d, 0.125), zero)
            }
            _ => unreachable!("{kind} is not a low-bit format"),
        }
    }

    /// IQ1's 11-bit lattice indices: the low bytes `qs` and three bits of `qh` at `sh` per lane.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn high_index_bits(qs: __m512i, qh: u32, sh: __m512i) -> __m512i {
        let hi = _mm512_and_si512(_mm512_srlv_epi64(_mm512_set1_epi64(qh as i64), sh), _mm512_set1_epi64(7));
        _mm512_or_si512(qs, _mm512_slli_epi64(hi, 8))
    }

    /// The unsigned codes of values `64·q..64·q + 64` of the super-block at `b`.
    ///
    /// # Safety
    /// AVX-512 F/BW/VL and BMI2; `b` points at a whole super-block of `kind`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,bmi2")]
    pub unsafe fn codes(kind: GgmlType, b: *const u8, q: usize) -> __m512i {
        use GgmlType::*;
        let ib = 2 * q;
        match kind {
            Q2K | Q3K => {
                // Two 32-value runs: the pairs of bits at shifts 4q' and 4q' + 2 of 32 bytes.
                let qs = b.add(if kind == Q2K { 16 } else { 32 } + q / 2 * 32);
                let bytes = _mm256_loadu_si256(qs as *const __m256i);
                let sh = 4 * (q % 2) as i32;
                let lo = _mm256_srl_epi16(bytes, _mm_cvtsi32_si128(sh));
                let hi = _mm256_srl_epi16(bytes, _mm_cvtsi32_si128(sh + 2));
                let v = _mm512_and_si512(_mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1), _mm512_set1_epi8(3));
                if kind == Q2K {
                    return v;
                }
                // Q3_K: bit `j/32` of hmask[j % 32] adds 4 (the code less 4 is signed).
                let hm = _mm256_loadu_si256(b as *const __m256i);
                let h0 = _mm256_srl_epi16(hm, _mm_cvtsi32_si128(ib as i32));
                let h1 = _mm256_srl_epi16(hm, _mm_cvtsi32_si128(ib as i32 + 1));
                let h = _mm512_and_si512(_mm512_inserti64x4(_mm512_castsi256_si512(h0), h1, 1), _mm512_set1_epi8(1));
                _mm512_or_si512(v, _mm512_slli_epi16(h, 2))
            }
            Iq2Xxs => {
                let (a0, a1) = (rd32(b.add(6 + 8 * ib)), rd32(b.add(14 + 8 * ib)));
                let idx = rd32(b.add(2 + 8 * ib)) as u64 | (rd32(b.add(10 + 8 * ib)) as u64) << 32;
                let mag = points8(&IQ2XXS_GRID, _mm512_cvtepu8_epi64(_mm_cvtsi64_si128(idx as i64)));
                with_signs(mag, ksigns8(a0, a1), 64)
            }
            Iq2Xs => {
                let qv = _mm_loadu_si128(b.add(2 + 16 * q) as *const __m128i);
                let idx = _mm512_cvtepu16_epi64(_mm_and_si128(qv, _mm_set1_epi16(511)));
                let s = _mm_packus_epi16(_mm_srli_epi16(qv, 9), _mm_setzero_si128());
                with_signs(points8(&IQ2XS_GRID, idx), with_parity(_mm_cvtsi128_si64(s) as u64), 64)
            }
            Iq2S => {
                let qs = _mm512_cvtepu8_epi64(_mm_loadl_epi64(b.add(2 + 8 * q) as *const __m128i));
                // Two high bits per point: qh[ib] for points 0..4, qh[ib + 1] for 4..8.
                let qh = _mm512_set1_epi64(rd16(b.add(66 + ib)) as i64);
                let hi = _mm512_srlv_epi64(qh, _mm512_setr_epi64(0, 2, 4, 6, 8, 10, 12, 14));
                let hi = _mm512_slli_epi64(_mm512_and_si512(hi, _mm512_set1_epi64(3)), 8);
                let idx = _mm512_or_si512(qs, hi);
                let signs = (b.add(34 + 8 * q) as *const u64).read_unaligned();
                with_signs(points8(&IQ2S_GRID, idx), signs, 64)
            }
            Iq3Xxs => {
                let idx = _mm512_cvtepu8_epi32(_mm_loadu_si128(b.add(2 + 16 * q) as *const __m128i));
                let mag = _mm512_i32gather_epi32::<4>(idx, IQ3XXS_GRID.as_ptr() as *const i32);
                with_signs(mag, ksigns8(rd32(b.add(66 + 4 * ib)), rd32(b.add(70 + 4 * ib))), 64)
            }
            Iq3S => {
                let lo = _mm512_cvtepu8_epi32(_mm_loadu_si128(b.add(2 + 16 * q) as *const __m128i));
                let idx = _mm512_mask_or_epi32(lo, rd16(b.add(66 + 2 * q)), lo, _mm512_set1_epi32(256));
                let mag = _mm512_i32gather_epi32::<4>(idx, IQ3S_GRID.as_ptr() as *const i32);
                with_signs(mag, (b.add(74 + 8 * q) as *const u64).read_unaligned(), 64)
            }
            Iq1S => {
                // Three high index bits per point from qh[ib] (points 0..4) and qh[ib + 1].
                let qh = rd32(b.add(34 + 2 * ib));
                let qs = _mm512_cvtepu8_epi64(_mm_loadl_epi64(b.add(2 + 4 * ib) as *const __m128i));
                let sh = _mm512_setr_epi64(0, 3, 6, 9, 16, 19, 22, 25);
                let g = points8(&IQ1S_GRID, high_index_bits(qs, qh, sh));
                // δ's sign per 32 values: bit 15 of each word.
                let neg = (((qh >> 15) & 1) as u64 * 0xFFFF_FFFF) | ((((qh >> 31) as u64) * 0xFFFF_FFFF) << 32);
                iq1_codes(g, neg)
            }
            Iq1M => {
                // One nibble per point: three index bits and δ's sign.
                let qh = rd32(b.add(32 + 2 * ib));
                let qs = _mm512_cvtepu8_epi64(_mm_loadl_epi64(b.add(4 * ib) as *const __m128i));
                let sh = _mm512_setr_epi64(0, 4, 8, 12, 16, 20, 24, 28);
                let g = points8(&IQ1S_GRID, high_index_bits(qs, qh, sh));
                let neg = _pext_u32(qh, 0x8888_8888);
                iq1_codes(g, spread8(neg))
            }
            _ => unreachable!("{kind} is not a low-bit format"),
        }
    }
}
