//! Integer dot products for decode (llama.cpp's approach): each token's activations are quantized
//! to int8 per 32 values once, and a weight row's 4-6-8-bit codes meet them in `vpdpbusd` (64
//! unsigned × signed byte products per instruction), the block scales applied to the i32 sums.
//!
//! Every format is written as `scale · code + min` per block of 32 values (Q6_K: of 16), with
//! `code` an integer: the raw bits (Q4_1, Q5_1, Q4_K, Q5_K), the bits less a fixed offset (Q4_0,
//! Q5_0, Q6_K; Q8_0's signed byte), a 16-entry level table (IQ4_NL, IQ4_XS, MXFP4), or one of
//! the 1–3-bit formats of [`super::low_bit`] (Q2_K, Q3_K, the i-quants' signed lattice points).
//! [`reference`] is that arithmetic in plain integers, the definition the AVX-512 body is tested
//! against.
//!
//! The body sums each block exactly: a span of sixteen blocks is transposed (weights per row,
//! activations once per token) so that each `vpdpbusd` lane accumulates one block, and the f32
//! work is one multiply-add per block rather than per four values. A token's float operations
//! are the same at every token count, so batching never changes a result.

use super::dequant::{e8m0_half, f16, iq4_xs_scale, k4_scale_min, IQ4NL_LEVELS, MXFP4_LEVELS};
use super::{low_bit, GgmlType};

/// Formats with an integer body.
pub fn handles(kind: GgmlType) -> bool {
    use GgmlType::*;
    matches!(kind, Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0 | Q4K | Q5K | Q6K | Iq4Nl | Iq4Xs | Mxfp4) || low_bit::handles(kind)
}

/// One token's activations as int8 codes with an f32 scale `d` per 32 values, and what the
/// formats' offsets and minimums need: `d` per 16 and the codes' sums per 32 and per 16.
///
/// The vector body sums each block of the weight row exactly in one i32 lane: the codes of a
/// span (16 blocks: 512 values in blocks of 32, 256 in blocks of 16) are transposed so that
/// register `j` holds four values at `4j` of every block. `t32` / `t16` are the activation codes
/// laid out the same way, span after span, zero past the row's end.
pub struct QuantAct {
    pub q: Vec<i8>,
    pub d: Vec<f32>,
    pub sum16: Vec<i32>,
    d16: Vec<f32>,
    pub(crate) sum32f: Vec<f32>,
    sum16f: Vec<f32>,
    t32: Vec<i8>,
    t16: Vec<i8>,
}

/// `q` in the span layout of blocks of `block` (32 or 16) values: byte `b` of dword `j` of block
/// `g` of span `s` at `s·16·block + 64j + 4g + b`.
pub fn span_layout(q: &[i8], block: usize) -> Vec<i8> {
    let span = 16 * block;
    let mut out = vec![0i8; q.len().div_ceil(span) * span];
    for (s, o) in out.chunks_exact_mut(span).enumerate() {
        for (j, g, b) in (0..block / 4).flat_map(|j| (0..16).flat_map(move |g| (0..4).map(move |b| (j, g, b)))) {
            let i = s * span + g * block + 4 * j + b;
            o[64 * j + 4 * g + b] = q.get(i).copied().unwrap_or(0);
        }
    }
    out
}

/// `x` (a multiple of 32 values) quantized: `d = max|x| / 127`, `q = round(x / d)` (ties to
/// even, as the vector conversion rounds), in AVX-512 or AVX2 where the CPU has it; the same
/// values as [`reference::quantize_act`] (the transposed layouts only where the AVX-512 body
/// reads them).
pub fn quantize_act(x: &[f32]) -> QuantAct {
    #[cfg(target_arch = "x86_64")]
    if avx512::available() {
        // SAFETY: the features are checked; `quantize_act` asks only for whole blocks.
        return unsafe { avx512::quantize_act(x) };
    }
    #[cfg(target_arch = "x86_64")]
    if super::avx2::available() {
        // SAFETY: as above.
        return unsafe { super::avx2::quantize_act(x) };
    }
    reference::quantize_act(x)
}

impl QuantAct {
    pub(crate) fn with_capacity(n: usize) -> Self {
        QuantAct {
            q: Vec::with_capacity(n),
            d: Vec::with_capacity(n / 32),
            sum16: Vec::with_capacity(n / 16),
            d16: Vec::with_capacity(n / 16),
            sum32f: Vec::with_capacity(n / 32),
            sum16f: Vec::with_capacity(n / 16),
            t32: Vec::new(),
            t16: Vec::new(),
        }
    }

    /// The codes in the span layouts of blocks of 32 and of 16 ([`span_layout`]).
    pub fn spans(&self) -> [&[i8]; 2] {
        [&self.t32, &self.t16]
    }

    /// Records one block's scale and its halves' code sums.
    pub(crate) fn push_block(&mut self, d: f32, s0: i32, s1: i32) {
        self.d.push(d);
        self.d16.extend([d, d]);
        self.sum16.extend([s0, s1]);
        self.sum16f.extend([s0 as f32, s1 as f32]);
        self.sum32f.push((s0 + s1) as f32);
    }
}

/// Q8_0, Q4_0 and Q5_0 codes' offsets (the code the AVX-512 body multiplies is unsigned).
fn fixed_offset(kind: GgmlType) -> i32 {
    match kind {
        GgmlType::Q8_0 | GgmlType::Iq4Nl | GgmlType::Iq4Xs | GgmlType::Mxfp4 => 128,
        GgmlType::Q4_0 => 8,
        GgmlType::Q5_0 => 16,
        GgmlType::Q6K => 32,
        _ => low_bit::offset(kind),
    }
}

/// The integer definition.
pub mod reference {
    use super::*;

    /// The scalar quantizer.
    pub fn quantize_act(x: &[f32]) -> QuantAct {
        assert!(x.len().is_multiple_of(32), "activations in whole 32-value blocks");
        let mut a = QuantAct::with_capacity(x.len());
        for b in x.chunks_exact(32) {
            let amax = b.iter().fold(0f32, |m, v| m.max(v.abs()));
            let d = amax / 127.0;
            let id = if d > 0.0 { 1.0 / d } else { 0.0 };
            let start = a.q.len();
            a.q.extend(b.iter().map(|&v| (v * id).round_ties_even() as i8));
            let half = |h: usize| a.q[start + 16 * h..][..16].iter().map(|&v| v as i32).sum::<i32>();
            let (s0, s1) = (half(0), half(1));
            a.push_block(d, s0, s1);
        }
        (a.t32, a.t16) = (span_layout(&a.q, 32), span_layout(&a.q, 16));
        a
    }

    /// Σ over the row of weight × activation, with the row's codes and `a`'s int8 codes.
    pub fn row_dot(kind: GgmlType, row: &[u8], a: &QuantAct) -> f32 {
        let mut total = 0f32;
        for h in 0..a.q.len() / 16 {
            let e0 = h * 16;
            let qa: i32 = (0..16).map(|i| code(kind, row, e0 + i) * a.q[e0 + i] as i32).sum();
            let (scale, min) = scale_min(kind, row, e0);
            total += a.d[e0 / 32] * (scale * qa as f32 + min * a.sum16[h] as f32);
        }
        total
    }

    /// Value `e` of the row is `scale · code(e) + min`: the scale and minimum of its block.
    fn scale_min(kind: GgmlType, row: &[u8], e: usize) -> (f32, f32) {
        let bb = kind.block_bytes();
        let b = &row[e / kind.block_elems() * bb..][..bb];
        let j = e % kind.block_elems();
        if low_bit::handles(kind) {
            let (mut sc, mut mn) = ([0f32; 16], [0f32; 16]);
            low_bit::group_scales(kind, b, &mut sc, &mut mn);
            let g = j / if low_bit::per16(kind) { 16 } else { 32 };
            return (sc[g], mn[g]);
        }
        match kind {
            GgmlType::Q8_0 | GgmlType::Q4_0 | GgmlType::Q5_0 | GgmlType::Iq4Nl => (f16(b, 0), 0.0),
            GgmlType::Q4_1 | GgmlType::Q5_1 => (f16(b, 0), f16(b, 2)),
            GgmlType::Mxfp4 => (e8m0_half(b[0]), 0.0),
            GgmlType::Q4K | GgmlType::Q5K => {
                let (sc, m) = k4_scale_min(&b[4..16], j / 32);
                (f16(b, 0) * sc as f32, -f16(b, 2) * m as f32)
            }
            GgmlType::Iq4Xs => (f16(b, 0) * iq4_xs_scale(b, j / 32) as f32, 0.0),
            GgmlType::Q6K => (f16(b, 208) * b[192 + j / 16] as i8 as f32, 0.0),
            _ => unreachable!("{kind} has no integer body"),
        }
    }

    /// Weight code `e` as the integer the scale multiplies.
    fn code(kind: GgmlType, row: &[u8], e: usize) -> i32 {
        let q4 = |b: &[u8], j: usize| ((b[j % 16] >> (4 * (j / 16))) & 0xF) as i32;
        let q5 = |b: &[u8], qh: usize, j: usize| {
            let h = (u32::from_le_bytes([b[qh], b[qh + 1], b[qh + 2], b[qh + 3]]) >> j) & 1;
            q4(&b[qh + 4..], j) | (h as i32) << 4
        };
        let bb = kind.block_bytes();
        let b = &row[e / kind.block_elems() * bb..][..bb];
        let j = e % kind.block_elems();
        let k4 = |qs: &[u8]| ((qs[j / 64 * 32 + j % 32] >> (4 * (j % 64 / 32))) & 0xF) as i32;
        if low_bit::handles(kind) {
            return low_bit::code(kind, b, j);
        }
        match kind {
            GgmlType::Q8_0 => b[2 + j] as i8 as i32,
            GgmlType::Q4_0 => q4(&b[2..], j) - 8,
            GgmlType::Q4_1 => q4(&b[4..], j),
            GgmlType::Q5_0 => q5(b, 2, j) - 16,
            GgmlType::Q5_1 => q5(b, 4, j),
            GgmlType::Iq4Nl => IQ4NL_LEVELS[q4(&b[2..], j) as usize] as i32,
            GgmlType::Mxfp4 => MXFP4_LEVELS[q4(&b[1..], j) as usize] as i32,
            GgmlType::Iq4Xs => IQ4NL_LEVELS[q4(&b[8 + j / 32 * 16..], j % 32) as usize] as i32,
            GgmlType::Q4K => k4(&b[16..]),
            GgmlType::Q5K => k4(&b[48..]) | (((b[16 + j % 32] >> (j / 32)) & 1) as i32) << 4,
            _ => {
                let (half, r) = (j / 128, j % 128);
                let low = (b[half * 64 + r % 64] >> (4 * (r / 64))) & 0xF;
                let high = (b[128 + half * 32 + r % 32] >> (2 * (r / 32))) & 3;
                (low | high << 4) as i32 - 32
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
/// The formats as const parameters of the integer bodies (an enum cannot be one), so each body is
/// compiled per format; shared by the AVX-512 and AVX2 bodies, which add ids of their own from 15.
pub(crate) mod format {
    pub const Q4_0: u8 = 0;
    pub const Q4_1: u8 = 1;
    pub const Q5_0: u8 = 2;
    pub const Q5_1: u8 = 3;
    pub const Q8_0: u8 = 4;
    pub const IQ4_NL: u8 = 5;
    pub const MXFP4: u8 = 6;
    pub const Q4K: u8 = 7;
    pub const Q5K: u8 = 8;
    pub const IQ4_XS: u8 = 9;
    pub const Q6K: u8 = 10;
    /// dsv3's own FP4 ([`crate::MatRef::Fp4`]): E2M1 pairs, low nibble first, scales apart —
    /// MXFP4's UE8M0 per 32, NVFP4's E4M3 per 16 times the tensor scale.
    pub const FP4_MX: u8 = 11;
    pub const FP4_NV: u8 = 12;
    /// The 1–3-bit formats ([`super::low_bit`]) both bodies have.
    pub const Q2K: u8 = 13;
    pub const Q3K: u8 = 14;
}

pub mod avx512 {
    use super::{fixed_offset, low_bit, QuantAct, IQ4NL_LEVELS, MXFP4_LEVELS};
    use crate::ggml::dequant::e8m0_half;
    use crate::ggml::GgmlType;
    use std::arch::x86_64::*;
    use std::ops::Range;

    pub fn available() -> bool {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512dq")
            && std::arch::is_x86_feature_detected!("avx512vnni")
            && std::arch::is_x86_feature_detected!("avx512vbmi")
            && std::arch::is_x86_feature_detected!("avx512vl")
            && std::arch::is_x86_feature_detected!("f16c")
            && std::arch::is_x86_feature_detected!("bmi2")
    }

    use super::format::*;
    // This body's own 1–3-bit ids, after the shared ones.
    const IQ2_XXS: u8 = 15;
    const IQ2_XS: u8 = 16;
    const IQ2_S: u8 = 17;
    const IQ3_XXS: u8 = 18;
    const IQ3_S: u8 = 19;
    const IQ1_S: u8 = 20;
    const IQ1_M: u8 = 21;

    const fn low_bit(f: u8) -> bool {
        f >= Q2K
    }

    /// Scales of 16 values (four i32 lanes each) rather than of 32.
    const fn per16(f: u8) -> bool {
        matches!(f, Q6K | FP4_NV | Q2K | Q3K | IQ2_XS | IQ2_S | IQ1_M)
    }

    /// Where a matrix's rows are: the bytes, and for FP4 its scale codes and tensor scale.
    #[derive(Clone, Copy)]
    struct Src<'a> {
        data: &'a [u8],
        scales: &'a [u8],
        tensor_scale: f32,
    }

    const fn kind_of(f: u8) -> GgmlType {
        match f {
            Q4_0 => GgmlType::Q4_0,
            Q4_1 => GgmlType::Q4_1,
            Q5_0 => GgmlType::Q5_0,
            Q5_1 => GgmlType::Q5_1,
            Q8_0 => GgmlType::Q8_0,
            IQ4_NL => GgmlType::Iq4Nl,
            MXFP4 => GgmlType::Mxfp4,
            Q4K => GgmlType::Q4K,
            Q5K => GgmlType::Q5K,
            IQ4_XS => GgmlType::Iq4Xs,
            Q6K => GgmlType::Q6K,
            Q2K => GgmlType::Q2K,
            Q3K => GgmlType::Q3K,
            IQ2_XXS => GgmlType::Iq2Xxs,
            IQ2_XS => GgmlType::Iq2Xs,
            IQ2_S => GgmlType::Iq2S,
            IQ3_XXS => GgmlType::Iq3Xxs,
            IQ3_S => GgmlType::Iq3S,
            IQ1_S => GgmlType::Iq1S,
            IQ1_M => GgmlType::Iq1M,
            // FP4 rows are 32 values in 16 bytes (the scales apart).
            _ => GgmlType::Q4_0,
        }
    }

    /// Bytes of a `k`-value row.
    fn row_bytes(f: u8, k: usize) -> usize {
        match f {
            FP4_MX | FP4_NV => k / 2,
            _ => k / kind_of(f).block_elems() * kind_of(f).block_bytes(),
        }
    }

    /// [`super::quantize_act`] sixteen values at a time.
    ///
    /// # Safety
    /// The CPU has [`available`]'s features.
    #[target_feature(enable = "avx512f,avx512bw,avx512dq")]
    pub unsafe fn quantize_act(x: &[f32]) -> QuantAct {
        assert!(x.len().is_multiple_of(32), "activations in whole 32-value blocks");
        let mut a = QuantAct::with_capacity(x.len());
        let q = a.q.spare_capacity_mut().as_mut_ptr() as *mut i8;
        for (i, b) in x.chunks_exact(32).enumerate() {
            let (lo, hi) = (_mm512_loadu_ps(b.as_ptr()), _mm512_loadu_ps(b.as_ptr().add(16)));
            let amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
            let d = amax / 127.0;
            let id = _mm512_set1_ps(if d > 0.0 { 1.0 / d } else { 0.0 });
            let (ql, qh) = (_mm512_cvtps_epi32(_mm512_mul_ps(lo, id)), _mm512_cvtps_epi32(_mm512_mul_ps(hi, id)));
            _mm_storeu_si128(q.add(32 * i) as *mut __m128i, _mm512_cvtepi32_epi8(ql));
            _mm_storeu_si128(q.add(32 * i + 16) as *mut __m128i, _mm512_cvtepi32_epi8(qh));
            a.push_block(d, _mm512_reduce_add_epi32(ql), _mm512_reduce_add_epi32(qh));
        }
        // SAFETY: every block's 32 codes were written above.
        a.q.set_len(x.len());
        (a.t32, a.t16) = (spans::<32>(&a.q), spans::<16>(&a.q));
        a
    }

    /// [`super::span_layout`] through the transposes the weights take.
    #[target_feature(enable = "avx512f,avx512bw")]
    unsafe fn spans<const B: usize>(q: &[i8]) -> Vec<i8> {
        let span = 16 * B;
        let n = q.len().div_ceil(span);
        let mut out: Vec<i8> = Vec::with_capacity(n * span);
        let o = out.spare_capacity_mut().as_mut_ptr() as *mut __m512i;
        for s in 0..n {
            let mut z = [_mm512_setzero_si512(); 8];
            for (i, z) in z.iter_mut().enumerate().take(span / 64) {
                let at = s * span + 64 * i;
                let left = q.len().saturating_sub(at).min(64);
                let m = if left == 64 { u64::MAX } else { (1u64 << left) - 1 };
                *z = _mm512_maskz_loadu_epi8(m, q.as_ptr().wrapping_add(at));
            }
            let t = match B {
                32 => transpose32(z),
                _ => {
                    let t = transpose16([z[0], z[1], z[2], z[3]]);
                    [t[0], t[1], t[2], t[3], t[0], t[0], t[0], t[0]]
                }
            };
            for (j, t) in t.iter().take(B / 4).enumerate() {
                _mm512_storeu_si512(o.add(s * B / 4 + j), *t);
            }
        }
        // SAFETY: every span's registers were stored above.
        out.set_len(n * span);
        out
    }

    /// `vpermt2d` indices of the transposes, from where each lane's dword is: lane `L` of the
    /// result takes dword `idx[L]` of the two sources (16 of the first, then 16 of the second).
    const fn perm<const S: u8>(p: usize) -> [i32; 16] {
        let mut t = [0; 16];
        let mut l = 0;
        while l < 16 {
            t[l] = match S {
                // Blocks of 32: two per source register (8 dwords each) → four blocks × dwords
                // 4p..4p + 4, lane 4·dword + block.
                0 => (l % 4 / 2 * 16 + l % 2 * 8 + 4 * p + l / 4) as i32,
                // Four blocks × four dwords (lanes as above) → eight blocks × dwords 2p, 2p + 1,
                // lane 8·dword + block.
                1 => (l % 8 / 4 * 16 + 4 * (2 * p + l / 8) + l % 4) as i32,
                // Blocks of 16: four per source (4 dwords each) → eight blocks × dwords 2p, 2p + 1.
                2 => (l % 8 / 4 * 16 + l % 4 * 4 + 2 * p + l / 8) as i32,
                // Eight blocks × two dwords each → sixteen blocks × dword p.
                _ => (l / 8 * 16 + 8 * p + l % 8) as i32,
            };
            l += 1;
        }
        t
    }
    const T32_A: [[i32; 16]; 2] = [perm::<0>(0), perm::<0>(1)];
    const T32_B: [[i32; 16]; 2] = [perm::<1>(0), perm::<1>(1)];
    const T16_A: [[i32; 16]; 2] = [perm::<2>(0), perm::<2>(1)];
    const MERGE: [[i32; 16]; 2] = [perm::<3>(0), perm::<3>(1)];

    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn p2(a: __m512i, idx: &[i32; 16], b: __m512i) -> __m512i {
        _mm512_permutex2var_epi32(a, _mm512_loadu_si512(idx.as_ptr() as *const __m512i), b)
    }

    /// Sixteen blocks of 32 bytes (two per register, in order) → register `j` = dword `j` of
    /// every block. (Loops, not closures: a closure does not inherit the target features.)
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn transpose32(z: [__m512i; 8]) -> [__m512i; 8] {
        // a[2i + h]: blocks 4i..4i + 4, dwords 4h..4h + 4.
        let mut a = [_mm512_setzero_si512(); 8];
        for i in 0..4 {
            for h in 0..2 {
                a[2 * i + h] = p2(z[2 * i], &T32_A[h], z[2 * i + 1]);
            }
        }
        let mut t = [_mm512_setzero_si512(); 8];
        for h in 0..2 {
            for e in 0..2 {
                // Blocks 0..8 and 8..16, dwords 4h + 2e, 4h + 2e + 1.
                let b0 = p2(a[h], &T32_B[e], a[2 + h]);
                let b1 = p2(a[4 + h], &T32_B[e], a[6 + h]);
                for je in 0..2 {
                    t[4 * h + 2 * e + je] = p2(b0, &MERGE[je], b1);
                }
            }
        }
        t
    }

    /// Sixteen blocks of 16 bytes (four per register) → register `j` = dword `j` of every block.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn transpose16(z: [__m512i; 4]) -> [__m512i; 4] {
        let mut t = [_mm512_setzero_si512(); 4];
        for e in 0..2 {
            let (c0, c1) = (p2(z[0], &T16_A[e], z[1]), p2(z[2], &T16_A[e], z[3]));
            for je in 0..2 {
                t[2 * e + je] = p2(c0, &MERGE[je], c1);
            }
        }
        t
    }

    /// The sum of a vector's lanes in a fixed order (lane i with i + 8, then i + 4, i + 2, i + 1).
    #[inline]
    #[target_feature(enable = "avx512f,avx512dq")]
    unsafe fn hsum(v: __m512) -> f32 {
        let a = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps::<1>(v));
        let b = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps::<1>(a));
        let c = _mm_add_ps(b, _mm_movehl_ps(b, b));
        _mm_cvtss_f32(_mm_add_ss(c, _mm_shuffle_ps::<1>(c, c)))
    }

    /// E4M3's 256 values by code (NVFP4's block scales).
    static E4M3_TABLE: std::sync::LazyLock<[f32; 256]> = std::sync::LazyLock::new(|| crate::formats::E4M3.table());

    /// How far ahead [`body`] prefetches.
    const PREFETCH_BYTES: usize = 3072;

    /// Values per chunk: sixteen scales of 32 (two super-blocks of the K formats).
    const CHUNK: usize = 512;

    /// Two 32-value blocks of packed nibbles (16 bytes each at `a` and `b`) as 64 codes in value order.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn nibble_pairs(a: *const u8, b: *const u8) -> __m512i {
        let m = _mm_set1_epi8(0x0f);
        let (x, y) = (_mm_loadu_si128(a as *const __m128i), _mm_loadu_si128(b as *const __m128i));
        let lo = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(x, 4), m), _mm_and_si128(x, m));
        let hi = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(y, 4), m), _mm_and_si128(y, m));
        _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1)
    }

    /// Q5's fifth bits (one u32 per block at `a` and `b`) as 0x10 in the bytes they belong to.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn fifth_bits(a: *const u8, b: *const u8) -> __m512i {
        let bits = (a as *const u32).read_unaligned() as u64 | ((b as *const u32).read_unaligned() as u64) << 32;
        _mm512_maskz_mov_epi8(bits, _mm512_set1_epi8(0x10))
    }

    /// A 16-level table as unsigned bytes (level + 128) for `vpermb`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
    unsafe fn level_table(levels: &[i8; 16]) -> __m512i {
        let mut t = [0u8; 64];
        for (t, &l) in t.iter_mut().zip(levels) {
            *t = (l as i32 + 128) as u8;
        }
        _mm512_loadu_si512(t.as_ptr() as *const __m512i)
    }

    /// 64 weight codes as unsigned bytes (the fixed offset added), for values `g·64..g·64 + 64`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512vnni,avx512vbmi,bmi2")]
    unsafe fn codes<const F: u8>(row: *const u8, g: usize, table: __m512i) -> __m512i {
        let (b0, b1) = (2 * g, 2 * g + 1);
        let m4 = _mm256_set1_epi8(0x0f);
        let k4 = |qs: *const u8, c: usize| {
            let bytes = _mm256_loadu_si256(qs.add(c * 32) as *const __m256i);
            let lo = _mm256_and_si256(bytes, m4);
            let hi = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), m4);
            _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1)
        };
        if low_bit(F) {
            let kind = kind_of(F);
            return low_bit::avx512::codes(kind, row.add(g / 4 * kind.block_bytes()), g % 4);
        }
        match F {
            Q4_0 => nibble_pairs(row.add(b0 * 18 + 2), row.add(b1 * 18 + 2)),
            Q4_1 => nibble_pairs(row.add(b0 * 20 + 4), row.add(b1 * 20 + 4)),
            Q5_0 => _mm512_or_si512(
                nibble_pairs(row.add(b0 * 22 + 6), row.add(b1 * 22 + 6)),
                fifth_bits(row.add(b0 * 22 + 2), row.add(b1 * 22 + 2)),
            ),
            Q5_1 => _mm512_or_si512(
                nibble_pairs(row.add(b0 * 24 + 8), row.add(b1 * 24 + 8)),
                fifth_bits(row.add(b0 * 24 + 4), row.add(b1 * 24 + 4)),
            ),
            Q8_0 => {
                let lo = _mm256_loadu_si256(row.add(b0 * 34 + 2) as *const __m256i);
                let hi = _mm256_loadu_si256(row.add(b1 * 34 + 2) as *const __m256i);
                let v = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
                _mm512_xor_si512(v, _mm512_set1_epi8(-128))
            }
            IQ4_NL => _mm512_permutexvar_epi8(nibble_pairs(row.add(b0 * 18 + 2), row.add(b1 * 18 + 2)), table),
            MXFP4 => _mm512_permutexvar_epi8(nibble_pairs(row.add(b0 * 17 + 1), row.add(b1 * 17 + 1)), table),
            IQ4_XS => {
                let qs = row.add(g / 4 * 136 + 8 + g % 4 * 32);
                _mm512_permutexvar_epi8(nibble_pairs(qs, qs.add(16)), table)
            }
            FP4_MX | FP4_NV => {
                // Bytes to u16 lanes, each holding its two values (low nibble first) as bytes.
                let t = _mm512_cvtepu8_epi16(_mm256_loadu_si256(row.add(32 * g) as *const __m256i));
                let pairs = _mm512_or_si512(
                    _mm512_and_si512(t, _mm512_set1_epi16(0x000f)),
                    _mm512_and_si512(_mm512_slli_epi16(t, 4), _mm512_set1_epi16(0x0f00)),
                );
                _mm512_permutexvar_epi8(pairs, table)
            }
            Q4K => k4(row.add(g / 4 * 144 + 16), g % 4),
            Q5K => {
                let (b, c) = (row.add(g / 4 * 176), g % 4);
                let qh = _mm256_loadu_si256(b.add(16) as *const __m256i);
                let h0 = _mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * c as i32));
                let h1 = _mm256_srl_epi16(qh, _mm_cvtsi32_si128(2 * c as i32 + 1));
                let h = _mm512_inserti64x4(_mm512_castsi256_si512(h0), h1, 1);
                let high = _mm512_slli_epi16(_mm512_and_si512(h, _mm512_set1_epi8(1)), 4);
                _mm512_or_si512(k4(b.add(48), c), high)
            }
            _ => {
                let (b, j) = (row.add(g / 4 * 210), g % 4);
                let (half, sub) = (j / 2, j % 2);
                let ql = _mm512_loadu_si512(b.add(half * 64) as *const __m512i);
                let low =
                    _mm512_and_si512(if sub == 1 { _mm512_srli_epi16(ql, 4) } else { ql }, _mm512_set1_epi8(0x0f));
                let qh = _mm256_loadu_si256(b.add(128 + half * 32) as *const __m256i);
                let sh = 4 * sub as i32;
                let h0 = _mm256_srl_epi16(qh, _mm_cvtsi32_si128(sh));
                let h1 = _mm256_srl_epi16(qh, _mm_cvtsi32_si128(sh + 2));
                let high = _mm512_and_si512(_mm512_inserti64x4(_mm512_castsi256_si512(h0), h1, 1), _mm512_set1_epi8(3));
                _mm512_or_si512(low, _mm512_slli_epi16(high, 4))
            }
        }
    }

    /// Two f16 values at `p` (a u32) as f32.
    #[inline]
    #[target_feature(enable = "avx512f,f16c")]
    unsafe fn f16_pair(p: *const u8) -> (f32, f32) {
        let v = _mm_cvtph_ps(_mm_cvtsi32_si128((p as *const i32).read_unaligned()));
        (_mm_cvtss_f32(v), _mm_cvtss_f32(_mm_shuffle_ps(v, v, 1)))
    }

    /// The weight scales of one chunk (values `c·512..`, `nb` blocks of 32 in it) as f32 vectors:
    /// `sc[0]` one per 32 values (Q6_K: `sc[0]`, `sc[1]` one per 16 values of each super-block),
    /// and the minimums `mn` per 32 (Q4_1, Q5_1: `+m`; Q4_K, Q5_K: `dmin·m`, subtracted; Q2_K: per
    /// 16 as its scales, added).
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,f16c")]
    unsafe fn chunk_scales<const F: u8>(
        row: *const u8,
        sc: *const u8,
        ts: f32,
        c: usize,
        nb: usize,
    ) -> ([__m512; 2], [__m512; 2]) {
        let zero = _mm512_setzero_ps();
        if low_bit(F) {
            let kind = kind_of(F);
            let (mut sc, mut mn) = ([zero; 2], [zero; 2]);
            for s in 0..nb / 8 {
                (sc[s], mn[s]) = low_bit::avx512::scales(kind, row.add((2 * c + s) * kind.block_bytes()));
            }
            if !per16(F) {
                // Eight scales of 32 per super-block: the chunk's sixteen in one vector.
                let both = _mm512_insertf32x8(sc[0], _mm512_castps512_ps256(sc[1]), 1);
                return ([both, zero], [zero; 2]);
            }
            return (sc, mn);
        }
        let (sc, mn) = chunk_scales_4_8::<F>(row, sc, ts, c, nb);
        (sc, [mn, zero])
    }

    /// [`chunk_scales`] of the 4–8-bit formats.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,f16c")]
    unsafe fn chunk_scales_4_8<const F: u8>(
        row: *const u8,
        sc: *const u8,
        ts: f32,
        c: usize,
        nb: usize,
    ) -> ([__m512; 2], __m512) {
        let zero = _mm512_setzero_ps();
        let mask = ((1u32 << nb) - 1) as __mmask16;
        let f16s = |w: __m512i| _mm512_cvtph_ps(_mm512_cvtepi32_epi16(w));
        let blocks32 = |bb: i32| {
            let idx = _mm512_mullo_epi32(
                _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                _mm512_set1_epi32(bb),
            );
            let base = row.add(c * 16 * bb as usize) as *const i32;
            _mm512_mask_i32gather_epi32::<1>(_mm512_setzero_si512(), mask, idx, base)
        };
        match F {
            Q4_0 | IQ4_NL => ([f16s(blocks32(18)), zero], zero),
            Q5_0 => ([f16s(blocks32(22)), zero], zero),
            Q8_0 => ([f16s(blocks32(34)), zero], zero),
            Q4_1 | Q5_1 => {
                let w = blocks32(if F == Q4_1 { 20 } else { 24 });
                ([f16s(w), zero], f16s(_mm512_srli_epi32(w, 16)))
            }
            FP4_MX => {
                // The levels are twice E2M1's values: half the UE8M0 scale.
                let mut s = [0f32; 16];
                for (i, s) in s.iter_mut().enumerate().take(nb) {
                    *s = e8m0_half(*sc.add(c * 16 + i));
                }
                ([_mm512_loadu_ps(s.as_ptr()), zero], zero)
            }
            FP4_NV => {
                // E4M3 codes through a table, sixteen at a time (a half-filled pair at a row's end).
                let mut out = [zero; 2];
                for (h, o) in out.iter_mut().enumerate().take(nb.div_ceil(8)) {
                    let m16 = ((1u32 << (2 * nb - 16 * h).min(16)) - 1) as __mmask16;
                    let codes = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m16, sc.add(c * 32 + 16 * h) as *const i8));
                    let v = _mm512_i32gather_ps::<4>(codes, E4M3_TABLE.as_ptr());
                    *o = _mm512_mul_ps(v, _mm512_set1_ps(0.5 * ts));
                }
                (out, zero)
            }
            MXFP4 => {
                let mut s = [0f32; 16];
                for (i, s) in s.iter_mut().enumerate().take(nb) {
                    *s = e8m0_half(*row.add((c * 16 + i) * 17));
                }
                ([_mm512_loadu_ps(s.as_ptr()), zero], zero)
            }
            Q4K | Q5K => {
                let bb = if F == Q4K { 144 } else { 176 };
                // Each super-block's twelve scale bytes as three words: the four 6-bit pairs of
                // each half at once (`get_scale_min_k4`, byte-parallel).
                let (mut sc, mut mn, mut d, mut dmin) = ([0u32; 4], [0u32; 4], [0f32; 16], [0f32; 16]);
                for s in 0..nb / 8 {
                    let b = row.add((2 * c + s) * bb);
                    let w = |o: usize| (b.add(4 + o) as *const u32).read_unaligned();
                    let (w0, w1, w2) = (w(0), w(4), w(8));
                    sc[2 * s] = w0 & 0x3f3f_3f3f;
                    sc[2 * s + 1] = (w2 & 0x0f0f_0f0f) | ((w0 >> 2) & 0x3030_3030);
                    mn[2 * s] = w1 & 0x3f3f_3f3f;
                    mn[2 * s + 1] = ((w2 >> 4) & 0x0f0f_0f0f) | ((w1 >> 2) & 0x3030_3030);
                    let (dd, dm) = f16_pair(b);
                    d[8 * s..8 * s + 8].fill(dd);
                    dmin[8 * s..8 * s + 8].fill(dm);
                }
                let bytes = |v: &[u32; 4]| {
                    _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(v.as_ptr() as *const __m128i)))
                };
                let sc = _mm512_mul_ps(bytes(&sc), _mm512_loadu_ps(d.as_ptr()));
                ([sc, zero], _mm512_mul_ps(bytes(&mn), _mm512_loadu_ps(dmin.as_ptr())))
            }
            IQ4_XS => {
                let mut s = [0f32; 16];
                for sb in 0..nb / 8 {
                    let b = std::slice::from_raw_parts(row.add((2 * c + sb) * 136), 136);
                    let d = f16_pair(b.as_ptr()).0;
                    for ib in 0..8 {
                        s[8 * sb + ib] = d * crate::ggml::dequant::iq4_xs_scale(b, ib) as f32;
                    }
                }
                ([_mm512_loadu_ps(s.as_ptr()), zero], zero)
            }
            _ => {
                let mut sc = [zero; 2];
                for (sb, sc) in sc.iter_mut().enumerate().take(nb / 8) {
                    let b = row.add((2 * c + sb) * 210);
                    let q = _mm512_cvtepi8_epi32(_mm_loadu_si128(b.add(192) as *const __m128i));
                    let d = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(
                        (b.add(208) as *const u16).read_unaligned() as i32
                    )));
                    *sc = _mm512_mul_ps(_mm512_cvtepi32_ps(q), _mm512_set1_ps(d));
                }
                (sc, zero)
            }
        }
    }

    /// `out[j·m + t]` for the rows of `rows` against the `m` quantized tokens.
    ///
    /// # Safety
    /// The CPU has AVX-512 F/BW/DQ/VNNI/VBMI and F16C ([`available`]); `data` holds `rows.end`
    /// rows of `k` values of `kind` (validated by the caller), `k` is a multiple of 64 and each
    /// token covers `k` values.
    pub unsafe fn rows_dots(
        kind: GgmlType,
        data: &[u8],
        k: usize,
        rows: Range<usize>,
        acts: &[QuantAct],
        out: &mut [f32],
    ) {
        let src = Src { data, scales: &[], tensor_scale: 1.0 };
        match kind {
            GgmlType::Q4_0 => by_tokens::<Q4_0>(src, k, rows, acts, out),
            GgmlType::Q4_1 => by_tokens::<Q4_1>(src, k, rows, acts, out),
            GgmlType::Q5_0 => by_tokens::<Q5_0>(src, k, rows, acts, out),
            GgmlType::Q5_1 => by_tokens::<Q5_1>(src, k, rows, acts, out),
            GgmlType::Q8_0 => by_tokens::<Q8_0>(src, k, rows, acts, out),
            GgmlType::Iq4Nl => by_tokens::<IQ4_NL>(src, k, rows, acts, out),
            GgmlType::Mxfp4 => by_tokens::<MXFP4>(src, k, rows, acts, out),
            GgmlType::Q4K => by_tokens::<Q4K>(src, k, rows, acts, out),
            GgmlType::Q5K => by_tokens::<Q5K>(src, k, rows, acts, out),
            GgmlType::Iq4Xs => by_tokens::<IQ4_XS>(src, k, rows, acts, out),
            GgmlType::Q6K => by_tokens::<Q6K>(src, k, rows, acts, out),
            GgmlType::Q2K => by_tokens::<Q2K>(src, k, rows, acts, out),
            GgmlType::Q3K => by_tokens::<Q3K>(src, k, rows, acts, out),
            GgmlType::Iq2Xxs => by_tokens::<IQ2_XXS>(src, k, rows, acts, out),
            GgmlType::Iq2Xs => by_tokens::<IQ2_XS>(src, k, rows, acts, out),
            GgmlType::Iq2S => by_tokens::<IQ2_S>(src, k, rows, acts, out),
            GgmlType::Iq3Xxs => by_tokens::<IQ3_XXS>(src, k, rows, acts, out),
            GgmlType::Iq3S => by_tokens::<IQ3_S>(src, k, rows, acts, out),
            GgmlType::Iq1S => by_tokens::<IQ1_S>(src, k, rows, acts, out),
            GgmlType::Iq1M => by_tokens::<IQ1_M>(src, k, rows, acts, out),
            _ => panic!("vnni::rows_dots: {kind} has no integer body"),
        }
    }

    /// [`rows_dots`] for dsv3's FP4 matrices ([`crate::MatRef::Fp4`]).
    ///
    /// # Safety
    /// As [`rows_dots`], with `w` validated.
    pub unsafe fn rows_dots_fp4(w: &crate::MatRef, rows: Range<usize>, acts: &[QuantAct], out: &mut [f32]) {
        let crate::MatRef::Fp4 { data, scales, tensor_scale, cols, kind, .. } = *w else {
            panic!("rows_dots_fp4: not an FP4 matrix")
        };
        let src = Src { data, scales, tensor_scale };
        match kind {
            crate::quant::Fp4Kind::Mx => by_tokens::<FP4_MX>(src, cols, rows, acts, out),
            crate::quant::Fp4Kind::Nv => by_tokens::<FP4_NV>(src, cols, rows, acts, out),
        }
    }

    /// `m` tokens. Bodies for 1, 2, 4 and 8 keep their sums in registers; more tokens run as
    /// groups of those over the rows (their activations stay in L1 from row to row), except for
    /// the lattice formats, whose codes cost more to build than activations to stream: one body
    /// takes all their tokens, each row's codes built once. A token's arithmetic is the same in
    /// every body.
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx512vbmi,f16c,bmi2")]
    unsafe fn by_tokens<const F: u8>(src: Src, k: usize, rows: Range<usize>, acts: &[QuantAct], out: &mut [f32]) {
        let m = acts.len();
        match m {
            1 => return body::<F, 1>(src, k, rows, acts, out),
            2 => return body::<F, 2>(src, k, rows, acts, out),
            4 => return body::<F, 4>(src, k, rows, acts, out),
            8 => return body::<F, 8>(src, k, rows, acts, out),
            _ if F >= IQ2_XXS => return body::<F, 0>(src, k, rows, acts, out),
            _ => {}
        }
        let mut t0 = 0;
        let mut part = vec![0f32; rows.len() * 8];
        while t0 < m {
            let g = [8, 4, 2, 1].into_iter().find(|&g| g <= m - t0).unwrap_or(1);
            let a = &acts[t0..t0 + g];
            let o = &mut part[..rows.len() * g];
            match g {
                8 => body::<F, 8>(src, k, rows.clone(), a, o),
                4 => body::<F, 4>(src, k, rows.clone(), a, o),
                2 => body::<F, 2>(src, k, rows.clone(), a, o),
                _ => body::<F, 1>(src, k, rows.clone(), a, o),
            }
            for (j, p) in o.chunks_exact(g).enumerate() {
                out[j * m + t0..][..g].copy_from_slice(p);
            }
            t0 += g;
        }
    }

    /// One format, `M` tokens (0: `acts.len()`): per chunk of 512 values the weight scales and
    /// the transposed codes once, then per token its scale products, the offset term and the exact
    /// block sums.
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,avx512vbmi,f16c,bmi2")]
    unsafe fn body<const F: u8, const M: usize>(
        src: Src,
        k: usize,
        rows: Range<usize>,
        acts: &[QuantAct],
        out: &mut [f32],
    ) {
        let rb = row_bytes(F, k);
        let table = match F {
            IQ4_NL | IQ4_XS => level_table(&IQ4NL_LEVELS),
            MXFP4 | FP4_MX | FP4_NV => level_table(&MXFP4_LEVELS),
            _ => _mm512_setzero_si512(),
        };
        let off = _mm512_set1_ps(match F {
            FP4_MX | FP4_NV => 128.0,
            _ => fixed_offset(kind_of(F)) as f32,
        });
        let sc_row = k / if F == FP4_NV { 16 } else { 32 };
        let m = if M == 0 { acts.len() } else { M };
        let (mut regs, mut heap) = ([_mm512_setzero_ps(); 8], Vec::new());
        let acc: &mut [__m512] = match M {
            0 => {
                heap.resize(m, _mm512_setzero_ps());
                &mut heap
            }
            _ => &mut regs[..M],
        };
        for (j, r) in rows.enumerate() {
            let row = src.data.as_ptr().add(r * rb);
            let sc_ptr = src.scales.as_ptr().wrapping_add(r * sc_row);
            acc.fill(_mm512_setzero_ps());
            for c in 0..k.div_ceil(CHUNK) {
                // A few chunks ahead (into the next row at the end: rows of a range are
                // contiguous, and a prefetch never faults): one core's hardware prefetch alone
                // streams well below its share of the memory bandwidth.
                let chunk_bytes = row_bytes(F, CHUNK);
                let ahead = row.wrapping_add(c * chunk_bytes + PREFETCH_BYTES);
                for l in (0..chunk_bytes).step_by(64) {
                    _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(l) as *const i8);
                }
                let nb = ((k - c * CHUNK) / 32).min(16);
                let mask = ((1u32 << nb) - 1) as __mmask16;
                let (sc, mn) = chunk_scales::<F>(row, sc_ptr, src.tensor_scale, c, nb);
                // The chunk's codes with each block in one i32 lane.
                let mut z = [_mm512_setzero_si512(); 8];
                for (g, z) in z.iter_mut().enumerate().take(nb / 2) {
                    *z = codes::<F>(row, c * 8 + g, table);
                }
                let spans = match per16(F) {
                    true => {
                        let a = transpose16([z[0], z[1], z[2], z[3]]);
                        let b = transpose16([z[4], z[5], z[6], z[7]]);
                        [a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3]]
                    }
                    false => transpose32(z),
                };
                for (t, a) in acts.iter().enumerate() {
                    let d32 = _mm512_maskz_loadu_ps(mask, a.d.as_ptr().add(c * 16));
                    let s32 = _mm512_maskz_loadu_ps(mask, a.sum32f.as_ptr().add(c * 16));
                    if per16(F) {
                        // A chunk's two spans of sixteen 16-value blocks (the second part-filled
                        // or empty at a row's end).
                        for h in 0..nb.div_ceil(8) {
                            let i = c * 32 + h * 16;
                            let m16 = ((1u32 << (2 * nb - 16 * h).min(16)) - 1) as __mmask16;
                            let d16 = _mm512_maskz_loadu_ps(m16, a.d16.as_ptr().add(i));
                            let p = _mm512_mul_ps(sc[h], d16);
                            let s16 = _mm512_maskz_loadu_ps(m16, a.sum16f.as_ptr().add(i));
                            // −offset·scale·Σx, and Q2_K's minimum (zero for the others).
                            let shift = _mm512_fmsub_ps(p, off, _mm512_mul_ps(mn[h], d16));
                            acc[t] = _mm512_fnmadd_ps(shift, s16, acc[t]);
                            let x = a.t16.as_ptr().add((2 * c + h) * 256) as *const __m512i;
                            let mut q = _mm512_setzero_si512();
                            for jj in 0..4 {
                                q = _mm512_dpbusd_epi32(q, spans[4 * h + jj], _mm512_loadu_si512(x.add(jj)));
                            }
                            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(q), p, acc[t]);
                        }
                    } else {
                        let cs = _mm512_mul_ps(sc[0], d32);
                        acc[t] = match F {
                            Q4_1 | Q5_1 => _mm512_fmadd_ps(_mm512_mul_ps(mn[0], d32), s32, acc[t]),
                            Q4K | Q5K => _mm512_fnmadd_ps(_mm512_mul_ps(mn[0], d32), s32, acc[t]),
                            _ => _mm512_fnmadd_ps(_mm512_mul_ps(cs, off), s32, acc[t]),
                        };
                        let x = a.t32.as_ptr().add(c * 512) as *const __m512i;
                        let mut q = _mm512_setzero_si512();
                        for (jj, w) in spans.iter().enumerate() {
                            q = _mm512_dpbusd_epi32(q, *w, _mm512_loadu_si512(x.add(jj)));
                        }
                        acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(q), cs, acc[t]);
                    }
                }
            }
            for (t, acc) in acc.iter().enumerate() {
                out[j * m + t] = hsum(*acc);
            }
        }
    }
}
