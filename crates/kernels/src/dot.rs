//! Dot products and axpy between f32 activations and one weight row in its stored format.
//!
//! Each function dispatches at run time to an AVX2+FMA body when the CPU has it, else to the
//! scalar reference in [`reference`]. FP8 rows are decoded in registers: the E4M3 bits are moved
//! into an f32 and rebiased with one exact multiply by 2¹²⁰, so no table and no
//! temporary row is needed.

/// Plain scalar versions: the definition the SIMD bodies are tested against.
pub mod reference {
    use crate::codec::{bf16_to_f32, fp8_e4m3_to_f32};

    pub fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }

    pub fn dot_bf16(x: &[f32], w: &[u8]) -> f32 {
        x.iter().zip(w.chunks_exact(2)).map(|(x, b)| x * bf16_to_f32(u16::from_le_bytes([b[0], b[1]]))).sum()
    }

    pub fn dot_fp8(x: &[f32], w: &[u8]) -> f32 {
        x.iter().zip(w).map(|(x, &b)| x * fp8_e4m3_to_f32(b)).sum()
    }

    pub fn dot_fp8_scaled(x: &[f32], w: &[u8], scales: &[f32], block: usize) -> f32 {
        x.chunks(block).zip(w.chunks(block)).zip(scales).map(|((x, w), s)| dot_fp8(x, w) * s).sum()
    }

    pub fn axpy_f32(y: &mut [f32], a: f32, w: &[f32]) {
        y.iter_mut().zip(w).for_each(|(y, w)| *y += a * w);
    }

    pub fn axpy_bf16(y: &mut [f32], a: f32, w: &[u8]) {
        y.iter_mut().zip(w.chunks_exact(2)).for_each(|(y, b)| *y += a * bf16_to_f32(u16::from_le_bytes([b[0], b[1]])));
    }

    pub fn axpy_fp8(y: &mut [f32], a: f32, w: &[u8]) {
        y.iter_mut().zip(w).for_each(|(y, &b)| *y += a * fp8_e4m3_to_f32(b));
    }
}

#[cfg(target_arch = "x86_64")]
#[inline]
fn has_avx2() -> bool {
    std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
        && std::arch::is_x86_feature_detected!("f16c")
}

macro_rules! dispatch {
    ($name:ident($($arg:ident : $ty:ty),*) $(-> $ret:ty)?) => {
        #[inline]
        pub fn $name($($arg: $ty),*) $(-> $ret)? {
            #[cfg(target_arch = "x86_64")]
            if has_avx2() {
                // SAFETY: the CPU supports AVX2 and FMA (checked above); the bodies only read
                // within the slices' lengths.
                return unsafe { avx2::$name($($arg),*) };
            }
            reference::$name($($arg),*)
        }
    };
}

dispatch!(dot_f32(a: &[f32], b: &[f32]) -> f32);
dispatch!(dot_bf16(x: &[f32], w: &[u8]) -> f32);
dispatch!(dot_fp8(x: &[f32], w: &[u8]) -> f32);
// `Σ_b scales[b] · (x · w over block b)` for blocks of `block` values: one FP8 row against one
// token with its block scales (the decode of an FP8 Linear).
dispatch!(dot_fp8_scaled(x: &[f32], w: &[u8], scales: &[f32], block: usize) -> f32);
dispatch!(axpy_f32(y: &mut [f32], a: f32, w: &[f32]));
dispatch!(axpy_bf16(y: &mut [f32], a: f32, w: &[u8]));
dispatch!(axpy_fp8(y: &mut [f32], a: f32, w: &[u8]));

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2 {
    use super::reference;
    use std::arch::x86_64::*;

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    pub(crate) unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// 8 bf16 values at `p` → f32.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn bf16x8(p: *const u8) -> __m256 {
        let h = _mm_loadu_si128(p as *const __m128i);
        _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))
    }

    /// 8 E4M3FN bytes at `p` → f32. Sign-extending each byte puts the sign in bit 31 and, after
    /// the shift, the 7 magnitude bits where an f32 keeps its low exponent and top mantissa bits;
    /// the AND clears the sign copies in between. That reads as the value × 2⁻¹²⁰ (subnormal codes
    /// become f32 subnormals, still exact); one multiply by 2¹²⁰ rebiases the exponent exactly.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn fp8x8(p: *const u8) -> __m256 {
        let v = _mm256_slli_epi32(_mm256_cvtepi8_epi32(_mm_loadl_epi64(p as *const __m128i)), 20);
        let bits = _mm256_and_si256(v, _mm256_set1_epi32(0x87F0_0000u32 as i32));
        _mm256_mul_ps(_mm256_castsi256_ps(bits), _mm256_set1_ps(f32::from_bits((127 + 120) << 23)))
    }

    macro_rules! dot_body {
        ($x:ident, $n:expr, $load:expr, $tail:expr) => {{
            let n = $n;
            let xp = $x.as_ptr();
            let (mut a0, mut a1, mut a2, mut a3) =
                (_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps());
            let mut i = 0;
            while i + 32 <= n {
                a0 = _mm256_fmadd_ps(_mm256_loadu_ps(xp.add(i)), $load(i), a0);
                a1 = _mm256_fmadd_ps(_mm256_loadu_ps(xp.add(i + 8)), $load(i + 8), a1);
                a2 = _mm256_fmadd_ps(_mm256_loadu_ps(xp.add(i + 16)), $load(i + 16), a2);
                a3 = _mm256_fmadd_ps(_mm256_loadu_ps(xp.add(i + 24)), $load(i + 24), a3);
                i += 32;
            }
            while i + 8 <= n {
                a0 = _mm256_fmadd_ps(_mm256_loadu_ps(xp.add(i)), $load(i), a0);
                i += 8;
            }
            hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3))) + $tail(i)
        }};
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_f32(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let bp = b.as_ptr();
        dot_body!(a, n, |i| _mm256_loadu_ps(bp.add(i)), |i: usize| reference::dot_f32(&a[i..n], &b[i..n]))
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_bf16(x: &[f32], w: &[u8]) -> f32 {
        let n = x.len().min(w.len() / 2);
        let wp = w.as_ptr();
        dot_body!(x, n, |i| bf16x8(wp.add(2 * i)), |i: usize| reference::dot_bf16(&x[i..n], &w[2 * i..2 * n]))
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_fp8(x: &[f32], w: &[u8]) -> f32 {
        let n = x.len().min(w.len());
        let wp = w.as_ptr();
        dot_body!(x, n, |i| fp8x8(wp.add(i)), |i: usize| reference::dot_fp8(&x[i..n], &w[i..n]))
    }

    /// 16 E4M3FN bytes at `p` as f16, then f32: each byte sign-extended to 16 bits and shifted
    /// left by 7 lands its exponent and mantissa where an f16 keeps them and its sign in bit 15;
    /// clearing the sign copy in bit 14 leaves the value × 2⁻⁸ (E4M3's subnormals are f16
    /// subnormals, converted exactly).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn fp8x16_scaled_down(p: *const u8) -> (__m256, __m256) {
        let v = _mm256_cvtepi8_epi16(_mm_loadu_si128(p as *const __m128i));
        let h = _mm256_and_si256(_mm256_slli_epi16::<7>(v), _mm256_set1_epi16(0xBF80u16 as i16));
        (_mm256_cvtph_ps(_mm256_castsi256_si128(h)), _mm256_cvtph_ps(_mm256_extracti128_si256::<1>(h)))
    }

    /// [`super::dot_fp8_scaled`]: each block's products summed in vector lanes and scaled there
    /// (with the 2⁸ of [`fp8x16_scaled_down`] folded into the scale), one horizontal sum per row.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_fp8_scaled(x: &[f32], w: &[u8], scales: &[f32], block: usize) -> f32 {
        let n = x.len().min(w.len());
        if !block.is_multiple_of(16) || scales.len() < n.div_ceil(block) {
            return reference::dot_fp8_scaled(&x[..n], &w[..n], scales, block);
        }
        let (xp, wp) = (x.as_ptr(), w.as_ptr());
        let mut total = _mm256_setzero_ps();
        let mut tail = 0f32;
        for (b, &s) in scales.iter().enumerate().take(n.div_ceil(block)) {
            let (start, end) = (b * block, ((b + 1) * block).min(n));
            let (mut a0, mut a1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
            let mut i = start;
            while i + 16 <= end {
                let (w0, w1) = fp8x16_scaled_down(wp.add(i));
                a0 = _mm256_fmadd_ps(_mm256_loadu_ps(xp.add(i)), w0, a0);
                a1 = _mm256_fmadd_ps(_mm256_loadu_ps(xp.add(i + 8)), w1, a1);
                i += 16;
            }
            total = _mm256_fmadd_ps(_mm256_add_ps(a0, a1), _mm256_set1_ps(s * 256.0), total);
            if i < end {
                tail += reference::dot_fp8(&x[i..end], &w[i..end]) * s;
            }
        }
        hsum(total) + tail
    }

    macro_rules! axpy_body {
        ($y:ident, $a:ident, $n:expr, $load:expr, $tail:expr) => {{
            let n = $n;
            let yp = $y.as_mut_ptr();
            let av = _mm256_set1_ps($a);
            let mut i = 0;
            while i + 8 <= n {
                let acc = _mm256_fmadd_ps(av, $load(i), _mm256_loadu_ps(yp.add(i)));
                _mm256_storeu_ps(yp.add(i), acc);
                i += 8;
            }
            $tail(i)
        }};
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn axpy_f32(y: &mut [f32], a: f32, w: &[f32]) {
        let n = y.len().min(w.len());
        let wp = w.as_ptr();
        axpy_body!(y, a, n, |i| _mm256_loadu_ps(wp.add(i)), |i: usize| reference::axpy_f32(&mut y[i..n], a, &w[i..n]))
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn axpy_bf16(y: &mut [f32], a: f32, w: &[u8]) {
        let n = y.len().min(w.len() / 2);
        let wp = w.as_ptr();
        axpy_body!(y, a, n, |i| bf16x8(wp.add(2 * i)), |i: usize| reference::axpy_bf16(
            &mut y[i..n],
            a,
            &w[2 * i..2 * n]
        ))
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn axpy_fp8(y: &mut [f32], a: f32, w: &[u8]) {
        let n = y.len().min(w.len());
        let wp = w.as_ptr();
        axpy_body!(y, a, n, |i| fp8x8(wp.add(i)), |i: usize| reference::axpy_fp8(&mut y[i..n], a, &w[i..n]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::f32_to_bf16;
    use rand::{Rng, SeedableRng};

    fn close(a: f32, b: f32, n: usize) -> bool {
        (a - b).abs() <= 1e-5 * (n as f32).sqrt() * (1.0 + a.abs().max(b.abs()))
    }

    #[test]
    fn simd_matches_reference_on_random_rows() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for n in [0usize, 1, 7, 8, 31, 32, 33, 128, 1000] {
            let x: Vec<f32> = (0..n).map(|_| rng.gen_range(-2.0..2.0)).collect();
            let wf: Vec<f32> = (0..n).map(|_| rng.gen_range(-2.0..2.0)).collect();
            let wb: Vec<u8> = wf.iter().flat_map(|&v| f32_to_bf16(v).to_le_bytes()).collect();
            // Every byte value, NaN codes excluded, appears in long rows.
            let w8: Vec<u8> =
                (0..n).map(|_| rng.gen::<u8>()).map(|b| if b & 0x7f == 0x7f { 0x7e } else { b }).collect();
            assert!(close(dot_f32(&x, &wf), reference::dot_f32(&x, &wf), n));
            assert!(close(dot_bf16(&x, &wb), reference::dot_bf16(&x, &wb), n));
            let (d, r) = (dot_fp8(&x, &w8), reference::dot_fp8(&x, &w8));
            assert!((d - r).abs() <= 1e-4 * (1.0 + r.abs()) * (n as f32).sqrt(), "{n}: {d} vs {r}");
            // Block-scaled: whole and ragged blocks, sizes the vector body takes and others.
            for block in [16usize, 48, 128, 7] {
                let scales: Vec<f32> = (0..n.div_ceil(block)).map(|_| rng.gen_range(0.001..3.0)).collect();
                let (d, r) =
                    (dot_fp8_scaled(&x, &w8, &scales, block), reference::dot_fp8_scaled(&x, &w8, &scales, block));
                // Bounded by Σ|x·w|·s: the row's magnitude.
                let mag: f32 = x
                    .iter()
                    .zip(&w8)
                    .enumerate()
                    .map(|(i, (a, &b))| (a * crate::codec::fp8_e4m3_to_f32(b) * scales[i / block]).abs())
                    .sum();
                assert!((d - r).abs() <= 1e-5 * (1.0 + mag), "{n} block {block}: {d} vs {r}");
            }

            let a = rng.gen_range(-1.0..1.0);
            let y0: Vec<f32> = (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect();
            {
                let (simd, refr) =
                    (axpy_f32 as fn(&mut [f32], f32, &[f32]), reference::axpy_f32 as fn(&mut [f32], f32, &[f32]));
                let (mut y1, mut y2) = (y0.clone(), y0.clone());
                simd(&mut y1, a, &wf);
                refr(&mut y2, a, &wf);
                assert!(y1.iter().zip(&y2).all(|(p, q)| (p - q).abs() < 1e-5));
            }
            let (mut y1, mut y2) = (y0.clone(), y0.clone());
            axpy_bf16(&mut y1, a, &wb);
            reference::axpy_bf16(&mut y2, a, &wb);
            assert!(y1.iter().zip(&y2).all(|(p, q)| (p - q).abs() < 1e-5));
            let (mut y1, mut y2) = (y0.clone(), y0);
            axpy_fp8(&mut y1, a, &w8);
            reference::axpy_fp8(&mut y2, a, &w8);
            assert!(y1.iter().zip(&y2).all(|(p, q)| (p - q).abs() <= 1e-5 * (1.0 + q.abs())));
        }
    }

    #[test]
    fn fp8_decode_covers_subnormals_and_sign() {
        // One lane per code class: zero, smallest subnormal, largest subnormal, smallest normal,
        // max, and their negatives.
        let codes = [0x00u8, 0x01, 0x07, 0x08, 0x7e, 0x80, 0x81, 0x87, 0x88, 0xfe, 0x38, 0xb8, 0x10, 0x20, 0x30, 0x40];
        for (k, &c) in codes.iter().enumerate() {
            let mut x = vec![0f32; codes.len()];
            x[k] = 1.0;
            assert_eq!(dot_fp8(&x, &codes), crate::codec::fp8_e4m3_to_f32(c), "code {c:#x}");
        }
    }
}
