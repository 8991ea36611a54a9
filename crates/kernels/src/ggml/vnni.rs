//! Integer dot products for decode (llama.cpp's approach): each token's activations are quantized
//! to int8 per 32 values once, and a weight row's 4-6-8-bit codes meet them in `vpdpbusd` (64
//! unsigned × signed byte products per instruction), the block scales applied to the i32 sums.
//! Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K and Q6_K; [`reference`] is the same arithmetic in plain integers, the definition
//! the AVX-512 body is tested against.

use super::GgmlType;

/// Formats with an integer body.
pub fn handles(kind: GgmlType) -> bool {
    use GgmlType::*;
    matches!(kind, Q4_0 | Q4_1 | Q5_0 | Q5_1 | Q8_0 | Q4K | Q6K)
}

/// One token's activations as int8 codes with an f32 scale per 32 values and the codes' sums
/// per 16 (for the formats' offsets and minimums).
pub struct QuantAct {
    pub q: Vec<i8>,
    pub d: Vec<f32>,
    pub sum16: Vec<i32>,
    /// `d` per i32 lane of `vpdpbusd` (4 values), and `d · Σq` per 16 and per 32 values.
    lane_d: Vec<f32>,
    d_sum16: Vec<f32>,
    d_sum32: Vec<f32>,
}

/// `x` (a multiple of 32 values) quantized: `d = max|x| / 127`, `q = round(x / d)`.
pub fn quantize_act(x: &[f32]) -> QuantAct {
    let mut a = QuantAct {
        q: Vec::with_capacity(x.len()),
        d: Vec::with_capacity(x.len() / 32),
        sum16: vec![],
        lane_d: vec![],
        d_sum16: vec![],
        d_sum32: vec![],
    };
    for b in x.chunks(32) {
        let amax = b.iter().fold(0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d > 0.0 { 1.0 / d } else { 0.0 };
        a.d.push(d);
        let start = a.q.len();
        a.q.extend(b.iter().map(|&v| (v * id).round() as i8));
        for h in a.q[start..].chunks(16) {
            a.sum16.push(h.iter().map(|&v| v as i32).sum());
        }
    }
    a.lane_d = (0..x.len() / 4).map(|l| a.d[l / 8]).collect();
    a.d_sum16 = a.sum16.iter().enumerate().map(|(i, &s)| a.d[i / 2] * s as f32).collect();
    a.d_sum32 = a.d_sum16.chunks(2).map(|p| p.iter().sum()).collect();
    a
}

/// A row's offset term against one token: Q4_K's minimums, Q8_0's +128 and Q6_K's −32 codes,
/// times their scales and the token's `d · Σq` ([`crate::ggml::dot::row_scales`]'s `s`).
fn row_offset(kind: GgmlType, s: &[f32], a: &QuantAct) -> f32 {
    use crate::dot::dot_f32;
    match kind {
        GgmlType::Q8_0 => 128.0 * dot_f32(s, &a.d_sum32),
        GgmlType::Q4_0 => 8.0 * dot_f32(s, &a.d_sum32),
        GgmlType::Q5_0 => 16.0 * dot_f32(s, &a.d_sum32),
        // `+ m` per value: a negative offset.
        GgmlType::Q4_1 | GgmlType::Q5_1 => -dot_f32(&s[s.len() / 2..], &a.d_sum32),
        GgmlType::Q4K => dot_f32(&s[s.len() / 2..], &a.d_sum32),
        _ => 32.0 * dot_f32(s, &a.d_sum16),
    }
}

/// The integer definition.
pub mod reference {
    use super::QuantAct;
    use crate::ggml::dot::row_scales;
    use crate::ggml::GgmlType;

    /// Σ over the row of weight × activation, with the row's codes and `a`'s int8 codes.
    pub fn row_dot(kind: GgmlType, row: &[u8], a: &QuantAct) -> f32 {
        let mut s = vec![];
        assert!(row_scales(kind, row, &mut s));
        let k = a.q.len();
        let mut total = 0f32;
        for b32 in 0..k / 32 {
            let xs = &a.q[b32 * 32..][..32];
            let dx = a.d[b32];
            for h in 0..2 {
                let e0 = b32 * 32 + h * 16;
                let qa: i32 = (0..16).map(|i| code(kind, row, e0 + i) * xs[h * 16 + i] as i32).sum();
                let (scale, min) = match kind {
                    GgmlType::Q8_0 | GgmlType::Q4_0 | GgmlType::Q5_0 => (s[e0 / 32], 0.0),
                    GgmlType::Q4_1 | GgmlType::Q5_1 => (s[e0 / 32], -s[s.len() / 2 + e0 / 32]),
                    GgmlType::Q4K => (s[e0 / 32], s[s.len() / 2 + e0 / 32]),
                    _ => (s[e0 / 16], 0.0),
                };
                total += dx * (scale * qa as f32 - min * a.sum16[e0 / 16] as f32);
            }
        }
        total
    }

    /// Weight code `e` as the integer the scale multiplies (Q4_K's minimum apart).
    fn code(kind: GgmlType, row: &[u8], e: usize) -> i32 {
        let q4 = |b: &[u8], j: usize| ((b[j % 16] >> (4 * (j / 16))) & 0xF) as i32;
        let q5 = |b: &[u8], qh: usize, j: usize| {
            let h = (u32::from_le_bytes([b[qh], b[qh + 1], b[qh + 2], b[qh + 3]]) >> j) & 1;
            q4(&b[qh + 4..], j) | (h as i32) << 4
        };
        match kind {
            GgmlType::Q8_0 => row[e / 32 * 34 + 2 + e % 32] as i8 as i32,
            GgmlType::Q4_0 => q4(&row[e / 32 * 18 + 2..], e % 32) - 8,
            GgmlType::Q4_1 => q4(&row[e / 32 * 20 + 4..], e % 32),
            GgmlType::Q5_0 => q5(&row[e / 32 * 22..], 2, e % 32) - 16,
            GgmlType::Q5_1 => q5(&row[e / 32 * 24..], 4, e % 32),
            GgmlType::Q4K => {
                let j = e % 256;
                ((row[e / 256 * 144 + 16 + j / 64 * 32 + j % 32] >> (4 * (j % 64 / 32))) & 0xF) as i32
            }
            _ => {
                let (b, j) = (&row[e / 256 * 210..], e % 256);
                let (half, r) = (j / 128, j % 128);
                let low = (b[half * 64 + r % 64] >> (4 * (r / 64))) & 0xF;
                let high = (b[128 + half * 32 + r % 32] >> (2 * (r / 32))) & 3;
                (low | high << 4) as i32 - 32
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub mod avx512 {
    use super::{row_offset, QuantAct};
    use crate::ggml::dot::row_scales;
    use crate::ggml::GgmlType;
    use std::arch::x86_64::*;
    use std::ops::Range;

    pub fn available() -> bool {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512dq")
            && std::arch::is_x86_feature_detected!("avx512vnni")
    }

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

    /// 64 weight codes as unsigned bytes (Q8_0: offset by 128), for values `g·64..g·64 + 64`.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
    unsafe fn codes(kind: GgmlType, row: *const u8, g: usize) -> __m512i {
        let (b0, b1) = (2 * g, 2 * g + 1);
        match kind {
            GgmlType::Q4_0 => nibble_pairs(row.add(b0 * 18 + 2), row.add(b1 * 18 + 2)),
            GgmlType::Q4_1 => nibble_pairs(row.add(b0 * 20 + 4), row.add(b1 * 20 + 4)),
            GgmlType::Q5_0 => _mm512_or_si512(
                nibble_pairs(row.add(b0 * 22 + 6), row.add(b1 * 22 + 6)),
                fifth_bits(row.add(b0 * 22 + 2), row.add(b1 * 22 + 2)),
            ),
            GgmlType::Q5_1 => _mm512_or_si512(
                nibble_pairs(row.add(b0 * 24 + 8), row.add(b1 * 24 + 8)),
                fifth_bits(row.add(b0 * 24 + 4), row.add(b1 * 24 + 4)),
            ),
            GgmlType::Q8_0 => {
                let lo = _mm256_loadu_si256(row.add(2 * g * 34 + 2) as *const __m256i);
                let hi = _mm256_loadu_si256(row.add((2 * g + 1) * 34 + 2) as *const __m256i);
                let v = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
                _mm512_xor_si512(v, _mm512_set1_epi8(-128))
            }
            GgmlType::Q4K => {
                let (b, c) = (g / 4, g % 4);
                let bytes = _mm256_loadu_si256(row.add(b * 144 + 16 + c * 32) as *const __m256i);
                let m = _mm256_set1_epi8(0x0f);
                let lo = _mm256_and_si256(bytes, m);
                let hi = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), m);
                _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1)
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

    /// `out[j·m + t]` for the rows of `rows` against the `m` quantized tokens.
    ///
    /// # Safety
    /// The CPU has AVX-512 F/BW/VNNI ([`available`]); `data` holds `rows.end` rows of `k` values
    /// of `kind` (validated by the caller) and each token covers `k` values.
    #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vnni")]
    pub unsafe fn rows_dots(
        kind: GgmlType,
        data: &[u8],
        k: usize,
        rows: Range<usize>,
        acts: &[QuantAct],
        out: &mut [f32],
    ) {
        let m = acts.len();
        let rb = k / kind.block_elems() * kind.block_bytes();
        let mut s = vec![];
        let quads = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
        for (j, r) in rows.enumerate() {
            let row = &data[r * rb..][..rb];
            row_scales(kind, row, &mut s);
            let mut acc = [_mm512_setzero_ps(); 8];
            for g in 0..k / 64 {
                let q = codes(kind, row.as_ptr(), g);
                // The weight scale of each i32 lane (4 values).
                let halves = |a: f32, b: f32| _mm512_insertf32x8(_mm512_set1_ps(a), _mm256_set1_ps(b), 1);
                let w = match kind {
                    GgmlType::Q8_0 | GgmlType::Q4_0 | GgmlType::Q4_1 | GgmlType::Q5_0 | GgmlType::Q5_1 => {
                        halves(s[2 * g], s[2 * g + 1])
                    }
                    GgmlType::Q4K => halves(s[2 * g], s[2 * g + 1]),
                    _ => _mm512_permutexvar_ps(quads, _mm512_castps128_ps512(_mm_loadu_ps(s.as_ptr().add(4 * g)))),
                };
                for (t, a) in acts.iter().enumerate() {
                    let x = _mm512_loadu_si512(a.q.as_ptr().add(g * 64) as *const __m512i);
                    let p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q, x);
                    let scale = _mm512_mul_ps(w, _mm512_loadu_ps(a.lane_d.as_ptr().add(16 * g)));
                    acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), scale, acc[t]);
                }
            }
            for (t, a) in acts.iter().enumerate() {
                out[j * m + t] = _mm512_reduce_add_ps(acc[t]) - row_offset(kind, &s, a);
            }
        }
    }
}
