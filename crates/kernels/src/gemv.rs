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
use crate::matrix::MatRef;
use crate::quant::fp4_decode_range;
use std::ops::Range;

/// Most tokens one call handles (the register budget of the AVX-512 body).
pub const MAX_TOKENS: usize = 8;

/// `out[j·m + t] = Σ_c x[t·k + c]·W[rows.start + j, c]` for `t < m ≤ MAX_TOKENS`, `k = W.cols()`:
/// a range of weight rows, each against every token (output row-major by weight row).
pub fn rows_dots(w: &MatRef, rows: Range<usize>, x: &[f32], m: usize, out: &mut [f32]) {
    let k = w.cols();
    assert!(
        m <= MAX_TOKENS && rows.end <= w.rows() && x.len() >= m * k && out.len() >= rows.len() * m,
        "rows_dots shape mismatch"
    );
    if let Err(e) = w.validate() {
        panic!("rows_dots: {e}");
    }
    #[cfg(target_arch = "x86_64")]
    if avx512::available() {
        // SAFETY: the CPU has the features (checked); shapes and the matrix's slices were checked
        // above, and the body reads only x[..m·k], rows `rows` of W and their scales, with masked
        // loads at the ragged ends.
        unsafe { avx512::rows_dots(w, rows, x, m, out) };
        return;
    }
    // AVX2: ggml matrices through the integer body where it takes them (as the AVX-512 body
    // does; FP4 stays in f32 here, and takes the integer body through [`quantized_acts`]).
    if let Some(acts) = matches!(w, MatRef::Ggml { .. }).then(|| quantized_acts(w, x, m)).flatten() {
        return rows_dots_quantized(w, rows, &acts, out);
    }
    let mut fp4_row = Vec::new();
    for (j, r) in rows.enumerate() {
        for t in 0..m {
            let xt = &x[t * k..(t + 1) * k];
            out[j * m + t] = match *w {
                MatRef::F32 { data, .. } => dot::dot_f32(xt, &data[r * k..][..k]),
                MatRef::Bf16 { data, .. } => dot::dot_bf16(xt, &data[r * k * 2..][..k * 2]),
                MatRef::Fp8 { data, scale_inv, block, .. } => {
                    let nb = k.div_ceil(block[1]);
                    let scales = &scale_inv[(r / block[0]) * nb..][..nb];
                    dot::dot_fp8_scaled(xt, &data[r * k..][..k], scales, block[1])
                }
                MatRef::Fp4 { data, scales, tensor_scale, kind, .. } => {
                    if t == 0 {
                        let nb = k.div_ceil(kind.block());
                        fp4_row.resize(k, 0.0);
                        let (codes, srow) = (&data[r * k.div_ceil(2)..][..k.div_ceil(2)], &scales[r * nb..][..nb]);
                        fp4_decode_range(codes, srow, tensor_scale, kind, 0, &mut fp4_row);
                    }
                    dot::dot_f32(xt, &fp4_row)
                }
                MatRef::Ggml { data, kind, .. } => {
                    let rb = k / kind.block_elems() * kind.block_bytes();
                    crate::ggml::dot::dot_row(kind, &data[r * rb..][..rb], xt)
                }
            };
        }
    }
}

/// The tokens `x [m, k]` as int8 activations, when `w` takes the integer body (the ggml formats
/// of [`crate::ggml::vnni::handles`] and FP4, on a CPU with AVX-512 VNNI and VBMI, or AVX2): a caller
/// running many row ranges quantizes them once.
pub fn quantized_acts(w: &MatRef, x: &[f32], m: usize) -> Option<Vec<crate::ggml::vnni::QuantAct>> {
    use crate::ggml::vnni;
    let (integer, cols) = match *w {
        MatRef::Ggml { kind, cols, .. } => (vnni::handles(kind), cols),
        MatRef::Fp4 { cols, .. } => (true, cols),
        _ => return None,
    };
    #[cfg(target_arch = "x86_64")]
    if integer && cols > 0 && cols.is_multiple_of(64) && (vnni::avx512::available() || crate::ggml::avx2::available()) {
        use rayon::prelude::*;
        // Prefill's many tokens in parallel: the caller would run them on one thread.
        return Some(match m * cols >= 1 << 16 {
            true => x[..m * cols].par_chunks(cols).map(vnni::quantize_act).collect(),
            false => x[..m * cols].chunks(cols).map(vnni::quantize_act).collect(),
        });
    }
    let _ = (integer, cols);
    None
}

/// [`rows_dots`] with the tokens [`quantized_acts`] made (any number of them).
pub fn rows_dots_quantized(w: &MatRef, rows: Range<usize>, acts: &[crate::ggml::vnni::QuantAct], out: &mut [f32]) {
    let cols = w.cols();
    assert!(
        rows.end <= w.rows() && acts.iter().all(|a| a.q.len() == cols) && out.len() >= rows.len() * acts.len(),
        "rows_dots_quantized shape mismatch"
    );
    if let Err(e) = w.validate() {
        panic!("rows_dots_quantized: {e}");
    }
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `acts` exist only where the CPU has VNNI or AVX2 ([`quantized_acts`]); shapes
    // checked above.
    unsafe {
        use crate::ggml::{avx2, vnni::avx512};
        if avx512::available() {
            match *w {
                MatRef::Ggml { data, kind, .. } => avx512::rows_dots(kind, data, cols, rows, acts, out),
                MatRef::Fp4 { .. } => avx512::rows_dots_fp4(w, rows, acts, out),
                _ => panic!("rows_dots_quantized: not a ggml or FP4 matrix"),
            }
            return;
        }
        let src = match *w {
            MatRef::Ggml { data, kind, .. } => avx2::Src::Ggml { data, kind },
            MatRef::Fp4 { data, scales, tensor_scale, kind, .. } => avx2::Src::Fp4 { data, scales, tensor_scale, kind },
            _ => panic!("rows_dots_quantized: not a ggml or FP4 matrix"),
        };
        avx2::rows_dots(src, cols, rows, acts, out)
    }
}

/// The definition the fast bodies are tested against: decode each weight, multiply in f64.
pub mod reference {
    use crate::matrix::MatRef;
    use std::ops::Range;

    pub fn rows_dots(w: &MatRef, rows: Range<usize>, x: &[f32], m: usize, out: &mut [f32]) {
        let k = w.cols();
        let mut row = vec![0f32; k];
        for (j, r) in rows.enumerate() {
            w.decode_row(r, 0, &mut row);
            for t in 0..m {
                out[j * m + t] =
                    x[t * k..(t + 1) * k].iter().zip(&row).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>() as f32;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use crate::matrix::MatRef;
    use std::arch::x86_64::*;
    use std::ops::Range;

    pub fn available() -> bool {
        std::arch::is_x86_feature_detected!("avx512f")
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512vl")
    }

    /// 16 weights from column `i` on (`n < 16` of them, zeros after, for the ragged end).
    trait Load16 {
        unsafe fn load(&self, i: usize) -> __m512;
        unsafe fn load_tail(&self, i: usize, n: usize) -> __m512;
        /// The address of column `i`'s weight (for prefetching; may lie past the row).
        fn at(&self, i: usize) -> *const u8;
    }

    /// How far ahead of the columns being read [`dots`] prefetches: one core's hardware
    /// prefetch alone streams well below its share of the bandwidth.
    const PREFETCH_BYTES: usize = 3072;

    struct F32s(*const f32);
    struct Bf16s(*const u8);
    struct Fp8s(*const u8);
    /// Packed E2M1 codes, the 16 values they stand for, and the row's block scales (as f32; a
    /// 16-column load lies inside one block, whose index is the column >> `shift`). The scale is
    /// applied to the decoded weights, so blocks of 16 need no partial sums of their own.
    struct Fp4s {
        codes: *const u8,
        lut: __m512,
        scales: *const f32,
        shift: u32,
    }

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

        fn at(&self, i: usize) -> *const u8 {
            self.0.wrapping_add(i) as *const u8
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

        fn at(&self, i: usize) -> *const u8 {
            self.0.wrapping_add(2 * i)
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

        fn at(&self, i: usize) -> *const u8 {
            self.0.wrapping_add(i)
        }
    }

    /// 8 bytes of E2M1 pairs → 16 values: bytes widened to u16 lanes `lo | hi << 8` are the 16
    /// nibbles in order, which index the value table with one permute.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn widen_fp4(b: __m128i, lut: __m512) -> __m512 {
        let w = _mm_cvtepu8_epi16(b);
        let lo = _mm_and_si128(w, _mm_set1_epi16(0x0f));
        let hi = _mm_slli_epi16(_mm_srli_epi16(w, 4), 8);
        _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_or_si128(lo, hi)), lut)
    }

    impl Load16 for Fp4s {
        // Columns `i` are multiples of 16 (blocks are 16 or 32 wide), so byte `i/2` starts a pair.
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
        unsafe fn load(&self, i: usize) -> __m512 {
            let v = widen_fp4(_mm_loadl_epi64(self.codes.add(i / 2) as *const __m128i), self.lut);
            _mm512_mul_ps(v, _mm512_set1_ps(*self.scales.add(i >> self.shift)))
        }
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
        unsafe fn load_tail(&self, i: usize, n: usize) -> __m512 {
            let b = _mm_maskz_loadu_epi8(mask(n.div_ceil(2)), self.codes.add(i / 2) as *const i8);
            let v = _mm512_maskz_mov_ps(mask(n), widen_fp4(b, self.lut));
            _mm512_mul_ps(v, _mm512_set1_ps(*self.scales.add(i >> self.shift)))
        }

        fn at(&self, i: usize) -> *const u8 {
            self.codes.wrapping_add(i / 2)
        }
    }

    /// ggml rows decoded 16 values at a time, the row's scales precomputed ([`row_scales`]);
    /// columns `i` are multiples of 16 and blocks are whole, so every load stays in the row.
    ///
    /// [`row_scales`]: crate::ggml::dot::row_scales
    struct GgmlRow {
        row: *const u8,
        scales: *const f32,
    }
    struct Iq4Xss(GgmlRow, __m512);

    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn nibbles(bytes: __m128i, high: bool) -> __m128i {
        let v = if high { _mm_srli_epi16(bytes, 4) } else { bytes };
        _mm_and_si128(v, _mm_set1_epi8(0x0f))
    }

    macro_rules! masked_tail {
        () => {
            #[inline]
            #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
            unsafe fn load_tail(&self, i: usize, n: usize) -> __m512 {
                _mm512_maskz_mov_ps(mask(n), self.load(i))
            }
        };
    }

    impl Load16 for Iq4Xss {
        #[inline]
        #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
        unsafe fn load(&self, i: usize) -> __m512 {
            let j = i & 255;
            let p = self.0.row.add((i >> 8) * 136 + 8 + (j >> 5) * 16);
            let idx = nibbles(_mm_loadu_si128(p as *const __m128i), j & 16 != 0);
            let v = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(idx), self.1);
            _mm512_mul_ps(v, _mm512_set1_ps(*self.0.scales.add(i >> 5)))
        }
        masked_tail!();

        fn at(&self, i: usize) -> *const u8 {
            self.0.row.wrapping_add(i / 256 * 136)
        }
    }

    /// Rows of a ggml matrix: integer dot products with int8 activations where the format and CPU
    /// allow ([`crate::ggml::vnni`]), else IQ4_XS decoded in registers and the others through the
    /// chunked path.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn ggml_rows<const M: usize>(
        data: &[u8],
        kind: crate::GgmlType,
        rows: Range<usize>,
        k: usize,
        x: &[f32],
        out: &mut [f32],
    ) {
        use crate::ggml::dot::row_scales;
        use crate::ggml::vnni;
        if vnni::handles(kind) && k.is_multiple_of(64) && vnni::avx512::available() {
            let acts: Vec<_> = x[..M * k].chunks(k).map(vnni::quantize_act).collect();
            // SAFETY: VNNI checked; the matrix was validated by `rows_dots`, every token has k values.
            return unsafe { vnni::avx512::rows_dots(kind, data, k, rows, &acts, out) };
        }
        if kind != crate::GgmlType::Iq4Xs {
            return crate::ggml::dot::rows_dots(kind, data, k, rows, x, M, out);
        }
        let rb = k / kind.block_elems() * kind.block_bytes();
        let mut scales = Vec::new();
        let lut = {
            let levels = crate::ggml::dequant::IQ4NL_LEVELS.map(|v| v as f32);
            _mm512_loadu_ps(levels.as_ptr())
        };
        for (j, r) in rows.enumerate() {
            let row = &data[r * rb..][..rb];
            row_scales(kind, row, &mut scales);
            let g = GgmlRow { row: row.as_ptr(), scales: scales.as_ptr() };
            let o = &mut out[j * M..][..M];
            let xp = x.as_ptr();
            dots::<_, M>(&Iq4Xss(g, lut), k, k.max(1), None, xp, o);
        }
    }

    /// Independent accumulator chains per token. The same at every token count, so a token's sums
    /// run in the same order alone or beside others: batching (MTP verification, continuous
    /// batching in a server, prefill chunks) never changes a result. Two chains keep 8 tokens'
    /// sums and block totals in registers, so each weight is decoded once per 8 tokens.
    const U: usize = 2;

    /// One row against `M` tokens; `out[t]`. Blocks of `block` columns; with `scales`, each
    /// block's sum is multiplied by its scale as it joins the total.
    #[inline]
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn dots<L: Load16, const M: usize>(
        w: &L,
        k: usize,
        block: usize,
        scales: Option<&[f32]>,
        x: *const f32,
        out: &mut [f32],
    ) {
        debug_assert_eq!(out.len(), M);
        let mut total = [_mm512_setzero_ps(); M];
        let (mut c0, mut b) = (0, 0);
        while c0 < k {
            let c1 = (c0 + block).min(k);
            let mut acc = [[_mm512_setzero_ps(); M]; U];
            let mut i = c0;
            while i + 16 * U <= c1 {
                _mm_prefetch::<_MM_HINT_T0>(w.at(i).wrapping_add(PREFETCH_BYTES) as *const i8);
                for (u, acc) in acc.iter_mut().enumerate() {
                    let wv = w.load(i + 16 * u);
                    for (t, a) in acc.iter_mut().enumerate() {
                        *a = _mm512_fmadd_ps(_mm512_loadu_ps(x.add(t * k + i + 16 * u)), wv, *a);
                    }
                }
                i += 16 * U;
            }
            while i < c1 {
                let n = (c1 - i).min(16);
                let wv = if n == 16 { w.load(i) } else { w.load_tail(i, n) };
                for (t, a) in acc[0].iter_mut().enumerate() {
                    *a = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mask(n), x.add(t * k + i)), wv, *a);
                }
                i += n;
            }
            for (t, tot) in total.iter_mut().enumerate() {
                let s = acc[1..].iter().fold(acc[0][t], |s, a| _mm512_add_ps(s, a[t]));
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

    /// Every row of `rows` against `M` tokens.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    unsafe fn rows_m<const M: usize>(w: &MatRef, rows: Range<usize>, x: &[f32], out: &mut [f32]) {
        let (k, xp) = (w.cols(), x.as_ptr());
        let outs = out.chunks_exact_mut(M);
        match *w {
            MatRef::F32 { data, .. } => {
                for (r, o) in rows.zip(outs) {
                    dots::<_, M>(&F32s(data.as_ptr().add(r * k)), k, k.max(1), None, xp, o);
                }
            }
            MatRef::Bf16 { data, .. } => {
                for (r, o) in rows.zip(outs) {
                    dots::<_, M>(&Bf16s(data.as_ptr().add(2 * r * k)), k, k.max(1), None, xp, o);
                }
            }
            MatRef::Fp8 { data, scale_inv, block, .. } => {
                let nb = k.div_ceil(block[1]);
                for (r, o) in rows.zip(outs) {
                    let scales = &scale_inv[(r / block[0]) * nb..][..nb];
                    dots::<_, M>(&Fp8s(data.as_ptr().add(r * k)), k, block[1], Some(scales), xp, o);
                }
            }
            MatRef::Fp4 { data, scales, tensor_scale, kind, .. } => {
                let (bs, nb) = (kind.block(), k.div_ceil(kind.block()));
                debug_assert!(bs.is_power_of_two() && bs >= 16);
                let table = crate::formats::E2M1.table();
                let lut = _mm512_loadu_ps(table.as_ptr());
                let mut row_scales = vec![0f32; nb];
                for (r, o) in rows.zip(outs) {
                    for (s, &c) in row_scales.iter_mut().zip(&scales[r * nb..(r + 1) * nb]) {
                        *s = kind.scale(c, tensor_scale);
                    }
                    let w = Fp4s {
                        codes: data.as_ptr().add(r * k.div_ceil(2)),
                        lut,
                        scales: row_scales.as_ptr(),
                        shift: bs.trailing_zeros(),
                    };
                    dots::<_, M>(&w, k, k.max(1), None, xp, o);
                }
            }
            MatRef::Ggml { data, kind, .. } => ggml_rows::<M>(data, kind, rows, k, x, out),
        }
    }

    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub unsafe fn rows_dots(w: &MatRef, rows: Range<usize>, x: &[f32], m: usize, out: &mut [f32]) {
        match m {
            1 => rows_m::<1>(w, rows, x, out),
            2 => rows_m::<2>(w, rows, x, out),
            3 => rows_m::<3>(w, rows, x, out),
            4 => rows_m::<4>(w, rows, x, out),
            5 => rows_m::<5>(w, rows, x, out),
            6 => rows_m::<6>(w, rows, x, out),
            7 => rows_m::<7>(w, rows, x, out),
            8 => rows_m::<8>(w, rows, x, out),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::f32_to_bf16;
    use crate::quant::{Fp4Blocks, Fp4Kind};
    use rand::{Rng, SeedableRng};

    #[test]
    fn rows_dots_match_reference_for_every_format_token_count_and_ragged_block() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let rows = 5;
        for k in [0usize, 1, 15, 16, 17, 64, 100, 128, 129, 300, 1024] {
            let n = rows * k;
            let wf: Vec<f32> = (0..n).map(|_| rng.gen_range(-2.0..2.0)).collect();
            let wb: Vec<u8> = wf.iter().flat_map(|&v| f32_to_bf16(v).to_le_bytes()).collect();
            // Every byte value but the NaN codes, subnormals included.
            let w8: Vec<u8> =
                (0..n).map(|_| rng.gen::<u8>()).map(|b| if b & 0x7f == 0x7f { 0x7e } else { b }).collect();
            // The same rows with every weight's sign cleared: Σ|x·w| bounds the rounding error.
            let wf_abs: Vec<f32> = wf.iter().map(|v| v.abs()).collect();
            let wb_abs: Vec<u8> = wb.iter().enumerate().map(|(i, &b)| if i % 2 == 1 { b & 0x7f } else { b }).collect();
            let w8_abs: Vec<u8> = w8.iter().map(|&b| b & 0x7f).collect();
            for block in [[128usize, 128usize], [2, 48], [3, 7]] {
                let ns = rows.div_ceil(block[0]) * k.div_ceil(block[1]);
                let scale_inv: Vec<f32> = (0..ns).map(|_| rng.gen_range(0.001..2.0)).collect();
                let fp8 = |data| MatRef::Fp8 { data, scale_inv: &scale_inv, rows, cols: k, block };
                let (nv, nv_abs) = (
                    Fp4Blocks::quantize(&wf, rows, k, Fp4Kind::Nv),
                    Fp4Blocks::quantize(&wf_abs, rows, k, Fp4Kind::Nv),
                );
                let (mx, mx_abs) = (
                    Fp4Blocks::quantize(&wf, rows, k, Fp4Kind::Mx),
                    Fp4Blocks::quantize(&wf_abs, rows, k, Fp4Kind::Mx),
                );
                let mats = [
                    (nv.view(), nv_abs.view()),
                    (mx.view(), mx_abs.view()),
                    (MatRef::F32 { data: &wf, rows, cols: k }, MatRef::F32 { data: &wf_abs, rows, cols: k }),
                    (MatRef::Bf16 { data: &wb, rows, cols: k }, MatRef::Bf16 { data: &wb_abs, rows, cols: k }),
                    (fp8(&w8), fp8(&w8_abs)),
                ];
                for m in 0..=MAX_TOKENS {
                    let x: Vec<f32> = (0..m * k).map(|_| rng.gen_range(-2.0..2.0)).collect();
                    let x_abs: Vec<f32> = x.iter().map(|v| v.abs()).collect();
                    for (w, w_abs) in &mats {
                        for range in [0..rows, 1..4] {
                            let len = range.len() * m;
                            let (mut got, mut want, mut mag) = (vec![0f32; len], vec![0f32; len], vec![0f32; len]);
                            rows_dots(w, range.clone(), &x, m, &mut got);
                            reference::rows_dots(w, range.clone(), &x, m, &mut want);
                            reference::rows_dots(w_abs, range.clone(), &x_abs, m, &mut mag);
                            for ((g, v), a) in got.iter().zip(&want).zip(&mag) {
                                assert!(
                                    (g - v).abs() <= 4e-6 * a,
                                    "k={k} block={block:?} m={m} {:?}: {g} vs {v}",
                                    w.format()
                                );
                            }
                        }
                    }
                }
            }
        }
    }
}
