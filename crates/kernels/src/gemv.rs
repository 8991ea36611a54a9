//! One weight row against a few activation rows: the inner loop of every decode-time `Linear`.
//!
//! The row is decoded in registers once and dotted with every token, so a matrix is read from
//! memory once per step whatever the token count (MTP verification runs two or more). FP8 rows keep
//! one vector partial sum per scale block and fold it into the f32 total with the block's scale at
//! the block's end: the report's promotion every 128 products.
//!
//! AVX-512 (chosen at run time) decodes 16 weights per step; elsewhere the AVX2/scalar dot products
//! of [`crate::dot`] run once per token.

use crate::dot;

/// Most tokens one call handles (the register budget of the AVX-512 body).
pub const MAX_TOKENS: usize = 8;

/// One stored weight row.
#[derive(Clone, Copy, Debug)]
pub enum Row<'a> {
    F32(&'a [f32]),
    /// Little-endian bf16 bytes.
    Bf16(&'a [u8]),
    /// E4M3FN bytes with one multiplier per `block` columns (`scales[c / block]`).
    Fp8 { data: &'a [u8], scales: &'a [f32], block: usize },
}

impl Row<'_> {
    pub fn len(&self) -> usize {
        match *self {
            Row::F32(w) => w.len(),
            Row::Bf16(w) => w.len() / 2,
            Row::Fp8 { data, .. } => data.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn check(&self) {
        if let Row::Fp8 { data, scales, block } = *self {
            assert!(block > 0 && scales.len() >= data.len().div_ceil(block), "FP8 row scales too short");
        }
    }
}

/// `out[t] = Σ_c x[t·k + c]·row[c]` for `t < out.len() ≤ MAX_TOKENS`, `k = row.len()`.
pub fn row_dots(row: Row, x: &[f32], out: &mut [f32]) {
    let (k, m) = (row.len(), out.len());
    assert!(m <= MAX_TOKENS && x.len() >= m * k, "row_dots shape mismatch");
    row.check();
    #[cfg(target_arch = "x86_64")]
    if avx512::available() {
        // SAFETY: the CPU has the features (checked); shapes were checked above and the body reads
        // only x[..m·k], the row's k values and its ceil(k / block) scales, using masked loads at
        // the ragged ends.
        unsafe { avx512::row_dots(row, x, out) };
        return;
    }
    for (t, o) in out.iter_mut().enumerate() {
        let xt = &x[t * k..(t + 1) * k];
        *o = match row {
            Row::F32(w) => dot::dot_f32(xt, w),
            Row::Bf16(w) => dot::dot_bf16(xt, w),
            Row::Fp8 { data, scales, block } => {
                xt.chunks(block).zip(data.chunks(block)).zip(scales).map(|((xb, wb), s)| dot::dot_fp8(xb, wb) * s).sum()
            }
        };
    }
}

/// The definition the fast bodies are tested against: decode each weight, multiply in f64.
pub mod reference {
    use super::Row;
    use crate::codec::{bf16_to_f32, fp8_e4m3_to_f32};

    pub fn row_dots(row: Row, x: &[f32], out: &mut [f32]) {
        let k = row.len();
        let w: Vec<f32> = match row {
            Row::F32(w) => w.to_vec(),
            Row::Bf16(w) => w.chunks_exact(2).map(|b| bf16_to_f32(u16::from_le_bytes([b[0], b[1]]))).collect(),
            Row::Fp8 { data, scales, block } => {
                data.iter().enumerate().map(|(c, &b)| fp8_e4m3_to_f32(b) * scales[c / block]).collect()
            }
        };
        for (t, o) in out.iter_mut().enumerate() {
            *o = x[t * k..(t + 1) * k].iter().zip(&w).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>() as f32;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::Row;
    use std::arch::x86_64::*;

    pub fn available() -> bool {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl")
    }

    /// 16 weights from column `i` on (`n < 16` of them, zeros after, for the ragged end).
    trait Load16 {
        unsafe fn load(&self, i: usize) -> __m512;
        unsafe fn load_tail(&self, i: usize, n: usize) -> __m512;
    }

    struct F32s(*const f32);
    struct Bf16s(*const u8);
    struct Fp8s(*const u8);

    #[inline]
    fn mask(n: usize) -> u16 {
        ((1u32 << n) - 1) as u16
    }

    impl Load16 for F32s {
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
        unsafe fn load(&self, i: usize) -> __m512 {
            _mm512_loadu_ps(self.0.add(i))
        }
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
        unsafe fn load_tail(&self, i: usize, n: usize) -> __m512 {
            _mm512_maskz_loadu_ps(mask(n), self.0.add(i))
        }
    }

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn widen_bf16(h: __m256i) -> __m512 {
        _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))
    }

    impl Load16 for Bf16s {
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
        unsafe fn load(&self, i: usize) -> __m512 {
            widen_bf16(_mm256_loadu_si256(self.0.add(2 * i) as *const __m256i))
        }
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
        unsafe fn load_tail(&self, i: usize, n: usize) -> __m512 {
            widen_bf16(_mm256_maskz_loadu_epi16(mask(n), self.0.add(2 * i) as *const i16))
        }
    }

    /// E4M3FN → f32: sign-extending each byte puts the sign in bit 31 and (after the shift) the 7
    /// magnitude bits where an f32 keeps its low exponent and top mantissa bits; the AND clears the
    /// sign copies in between. That reads as the value × 2⁻¹²⁰ (subnormal codes become f32
    /// subnormals, still exact), and one multiply by 2¹²⁰ rebiases the exponent (127 − 7) exactly.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn widen_fp8(b: __m128i) -> __m512 {
        let v = _mm512_slli_epi32(_mm512_cvtepi8_epi32(b), 20);
        let bits = _mm512_and_si512(v, _mm512_set1_epi32(0x87F0_0000u32 as i32));
        _mm512_mul_ps(_mm512_castsi512_ps(bits), _mm512_set1_ps(f32::from_bits((127 + 120) << 23)))
    }

    impl Load16 for Fp8s {
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
        unsafe fn load(&self, i: usize) -> __m512 {
            widen_fp8(_mm_loadu_si128(self.0.add(i) as *const __m128i))
        }
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
        unsafe fn load_tail(&self, i: usize, n: usize) -> __m512 {
            widen_fp8(_mm_maskz_loadu_epi8(mask(n), self.0.add(i) as *const i8))
        }
    }

    /// `M` tokens, `U` independent accumulator chains per token. Blocks of `block` columns; with
    /// `scales`, each block's sum is multiplied by its scale as it joins the total.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn dots<L: Load16, const M: usize, const U: usize>(
        w: &L,
        k: usize,
        block: usize,
        scales: Option<&[f32]>,
        x: *const f32,
        out: &mut [f32],
    ) {
        let mut total = [_mm512_setzero_ps(); M];
        let (mut c0, mut b) = (0, 0);
        while c0 < k {
            let c1 = (c0 + block).min(k);
            let mut acc = [[_mm512_setzero_ps(); M]; U];
            let mut i = c0;
            while i + 16 * U <= c1 {
                for (u, acc) in acc.iter_mut().enumerate() {
                    let wv = w.load(i + 16 * u);
                    for (t, a) in acc.iter_mut().enumerate() {
                        *a = _mm512_fmadd_ps(_mm512_loadu_ps(x.add(t * k + i + 16 * u)), wv, *a);
                    }
                }
                i += 16 * U;
            }
            while i + 16 <= c1 {
                let wv = w.load(i);
                for (t, a) in acc[0].iter_mut().enumerate() {
                    *a = _mm512_fmadd_ps(_mm512_loadu_ps(x.add(t * k + i)), wv, *a);
                }
                i += 16;
            }
            if i < c1 {
                let n = c1 - i;
                let wv = w.load_tail(i, n);
                for (t, a) in acc[0].iter_mut().enumerate() {
                    *a = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask(n), x.add(t * k + i)), wv, *a);
                }
            }
            for (t, tot) in total.iter_mut().enumerate() {
                let mut s = acc[0][t];
                for a in &acc[1..] {
                    s = _mm512_add_ps(s, a[t]);
                }
                *tot = match scales {
                    Some(sc) => _mm512_fmadd_ps(s, _mm512_set1_ps(sc[b]), *tot),
                    None => _mm512_add_ps(*tot, s),
                };
            }
            c0 = c1;
            b += 1;
        }
        for (o, t) in out.iter_mut().zip(total) {
            *o = _mm512_reduce_add_ps(t);
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn by_tokens<L: Load16>(w: &L, k: usize, block: usize, scales: Option<&[f32]>, x: &[f32], out: &mut [f32]) {
        let x = x.as_ptr();
        // Fewer tokens get more chains so the FMA latency stays hidden.
        match out.len() {
            1 => dots::<L, 1, 4>(w, k, block, scales, x, out),
            2 => dots::<L, 2, 4>(w, k, block, scales, x, out),
            3 => dots::<L, 3, 2>(w, k, block, scales, x, out),
            4 => dots::<L, 4, 2>(w, k, block, scales, x, out),
            5 => dots::<L, 5, 2>(w, k, block, scales, x, out),
            6 => dots::<L, 6, 2>(w, k, block, scales, x, out),
            7 => dots::<L, 7, 2>(w, k, block, scales, x, out),
            8 => dots::<L, 8, 2>(w, k, block, scales, x, out),
            _ => {}
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub unsafe fn row_dots(row: Row, x: &[f32], out: &mut [f32]) {
        let k = row.len();
        match row {
            Row::F32(w) => by_tokens(&F32s(w.as_ptr()), k, k.max(1), None, x, out),
            Row::Bf16(w) => by_tokens(&Bf16s(w.as_ptr()), k, k.max(1), None, x, out),
            Row::Fp8 { data, scales, block } => by_tokens(&Fp8s(data.as_ptr()), k, block, Some(scales), x, out),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::f32_to_bf16;
    use rand::{Rng, SeedableRng};

    #[test]
    fn row_dots_match_reference_for_every_format_token_count_and_ragged_block() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        for k in [0usize, 1, 15, 16, 17, 64, 100, 128, 129, 300, 1024] {
            let wf: Vec<f32> = (0..k).map(|_| rng.gen_range(-2.0..2.0)).collect();
            let wb: Vec<u8> = wf.iter().flat_map(|&v| f32_to_bf16(v).to_le_bytes()).collect();
            // Every byte value but the NaN codes, subnormals included.
            let w8: Vec<u8> = (0..k).map(|_| rng.gen::<u8>()).map(|b| if b & 0x7f == 0x7f { 0x7e } else { b }).collect();
            for block in [128usize, 48, 7] {
                let scales: Vec<f32> = (0..k.div_ceil(block)).map(|_| rng.gen_range(0.001..2.0)).collect();
                let rows = [Row::F32(&wf), Row::Bf16(&wb), Row::Fp8 { data: &w8, scales: &scales, block }];
                // The same rows with every weight's sign cleared: Σ|x·w| bounds the rounding error.
                let wf_abs: Vec<f32> = wf.iter().map(|v| v.abs()).collect();
                let wb_abs: Vec<u8> = wb.iter().enumerate().map(|(i, &b)| if i % 2 == 1 { b & 0x7f } else { b }).collect();
                let w8_abs: Vec<u8> = w8.iter().map(|&b| b & 0x7f).collect();
                let rows_abs = [Row::F32(&wf_abs), Row::Bf16(&wb_abs), Row::Fp8 { data: &w8_abs, scales: &scales, block }];
                for m in 0..=MAX_TOKENS {
                    let x: Vec<f32> = (0..m * k).map(|_| rng.gen_range(-2.0..2.0)).collect();
                    let x_abs: Vec<f32> = x.iter().map(|v| v.abs()).collect();
                    for (row, row_abs) in rows.into_iter().zip(rows_abs) {
                        let (mut got, mut want, mut mag) = (vec![0f32; m], vec![0f32; m], vec![0f32; m]);
                        row_dots(row, &x, &mut got);
                        reference::row_dots(row, &x, &mut want);
                        reference::row_dots(row_abs, &x_abs, &mut mag);
                        for ((g, w), a) in got.iter().zip(&want).zip(&mag) {
                            assert!((g - w).abs() <= 4e-6 * a, "k={k} block={block} m={m} {row:?}: {g} vs {w}");
                        }
                    }
                }
            }
        }
    }
}
