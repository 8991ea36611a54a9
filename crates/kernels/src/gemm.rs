//! An f32 GEMM for training's many-token products: `C[p, q] += Σ_s A(s, p)·B[s, q]` with `B`
//! row-major and `A` read through two strides, so the weight gradient (`dyᵀ·x`), the input
//! gradient (`dy·W`) and the forward over a transposed weight all run without transposing their
//! activations.
//!
//! AVX-512 body: an 8×32 block of `C` in 16 registers; per `s`, two loads of `B`, eight broadcasts
//! of `A`, sixteen FMAs. Blocks of rows go to the threads.

use rayon::prelude::*;

/// Whether this CPU multiplies bf16 pairs natively (AVX512-BF16): where it does not, a `bf16`
/// request to [`gemm_acc`] runs in f32.
pub fn bf16_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    return std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512bf16");
    #[cfg(not(target_arch = "x86_64"))]
    false
}

/// `A(s, p) = a[s·a_s + p·a_p]`.
#[derive(Clone, Copy, Debug)]
pub struct Strided<'a> {
    pub a: &'a [f32],
    pub a_s: usize,
    pub a_p: usize,
}

/// `c[p, q] += Σ_s A(s, p)·b[s, q]` for `p < rows`, `q < cols`, `s < depth`; `b` is `[depth, cols]`
/// and `c` is `[rows, cols]`, both row-major. `bf16` rounds the inputs to bf16 and multiplies
/// pairs with AVX512-BF16, accumulating in f32 — training's "bf16 compute, f32 masters" (exact
/// for inputs that already are bf16 values, as FP8 codes are); where the CPU lacks it, f32.
pub fn gemm_acc(a: Strided, b: &[f32], c: &mut [f32], rows: usize, cols: usize, depth: usize, bf16: bool) {
    assert!(b.len() >= depth * cols && c.len() >= rows * cols, "gemm_acc shape mismatch");
    if rows == 0 || cols == 0 || depth == 0 {
        return;
    }
    let last = (depth - 1) * a.a_s + (rows - 1) * a.a_p;
    assert!(last < a.a.len(), "gemm_acc: A is too short");
    #[cfg(target_arch = "x86_64")]
    if bf16 && bf16_available() {
        // SAFETY: the CPU has AVX512-BF16 (checked); shapes checked above.
        unsafe { bf16::gemm_acc(a, b, c, rows, cols, depth) };
        return;
    }
    const MR: usize = 8;
    let work = rows * cols * depth;
    // Bands of rows (a multiple of MR) per task, about 4 per thread.
    let per = (rows.div_ceil(4 * rayon::current_num_threads()).div_ceil(MR) * MR).max(MR);
    let band = |(i, cb): (usize, &mut [f32])| {
        let p0 = i * per;
        let n = cb.len() / cols;
        #[cfg(target_arch = "x86_64")]
        if avx512::available() {
            // SAFETY: features checked; A's largest index was checked above, B and C hold their
            // shapes; the body stays within rows p0..p0+n, columns ..cols and depth ..depth.
            unsafe { avx512::band(a, b, cb, p0, n, cols, depth) };
            return;
        }
        reference_band(a, b, cb, p0, n, cols, depth);
    };
    if work >= 1 << 16 {
        c[..rows * cols].par_chunks_mut(per * cols).enumerate().for_each(band);
    } else {
        c[..rows * cols].chunks_mut(per * cols).enumerate().for_each(band);
    }
}

fn reference_band(a: Strided, b: &[f32], c: &mut [f32], p0: usize, n: usize, cols: usize, depth: usize) {
    for r in 0..n {
        let row = &mut c[r * cols..(r + 1) * cols];
        for s in 0..depth {
            let av = a.a[s * a.a_s + (p0 + r) * a.a_p];
            if av != 0.0 {
                row.iter_mut().zip(&b[s * cols..(s + 1) * cols]).for_each(|(c, b)| *c += av * b);
            }
        }
    }
}

/// The plain triple loop in f64, for tests.
pub fn reference(a: Strided, b: &[f32], rows: usize, cols: usize, depth: usize) -> Vec<f32> {
    let mut c = vec![0f32; rows * cols];
    for p in 0..rows {
        for q in 0..cols {
            c[p * cols + q] =
                (0..depth).map(|s| a.a[s * a.a_s + p * a.a_p] as f64 * b[s * cols + q] as f64).sum::<f64>() as f32;
        }
    }
    c
}

/// The 8×32 blocking both AVX-512 bodies share: column panels of 32 outermost, then blocks of up
/// to 8 rows, each dispatched to `$block::<MR>(…, r, q, …)`.
#[cfg(target_arch = "x86_64")]
macro_rules! panels {
    ($n:expr, $cols:expr, |$r:ident, $q:ident| $block:ident($($pre:expr),*; $($post:expr),*)) => {{
        let mut $q = 0;
        while $q < $cols {
            let mut $r = 0;
            while $r < $n {
                let mr = ($n - $r).min(8);
                match mr {
                    8 => $block::<8>($($pre),*, $r, $q, $($post),*),
                    7 => $block::<7>($($pre),*, $r, $q, $($post),*),
                    6 => $block::<6>($($pre),*, $r, $q, $($post),*),
                    5 => $block::<5>($($pre),*, $r, $q, $($post),*),
                    4 => $block::<4>($($pre),*, $r, $q, $($post),*),
                    3 => $block::<3>($($pre),*, $r, $q, $($post),*),
                    2 => $block::<2>($($pre),*, $r, $q, $($post),*),
                    _ => $block::<1>($($pre),*, $r, $q, $($post),*),
                }
                $r += mr;
            }
            $q += 32;
        }
    }};
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::Strided;
    use std::arch::x86_64::*;

    pub fn available() -> bool {
        std::arch::is_x86_feature_detected!("avx512f")
    }

    /// Rows `p0..p0+n` of C (`c` holds exactly them). Column panels outermost, so a panel of B
    /// (`depth × 32`) stays in cache across all the row blocks.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn band(a: Strided, b: &[f32], c: &mut [f32], p0: usize, n: usize, cols: usize, depth: usize) {
        panels!(n, cols, |r, q| block(a, b, c, p0; cols, depth));
    }

    /// `MR` rows (local row `r`) × columns `q..q+32` (masked at the edge).
    #[inline]
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    unsafe fn block<const MR: usize>(
        a: Strided,
        b: &[f32],
        c: &mut [f32],
        p0: usize,
        r: usize,
        q: usize,
        cols: usize,
        depth: usize,
    ) {
        let (ap, bp, cp) = (a.a.as_ptr(), b.as_ptr(), c.as_mut_ptr());
        let w = (cols - q).min(32);
        let m0: u16 = if w >= 16 { 0xffff } else { ((1u32 << w) - 1) as u16 };
        let m1: u16 = if w >= 32 {
            0xffff
        } else if w > 16 {
            ((1u32 << (w - 16)) - 1) as u16
        } else {
            0
        };
        let mut acc = [[_mm512_setzero_ps(); 2]; MR];
        for s in 0..depth {
            let brow = bp.add(s * cols + q);
            let b0 = _mm512_maskz_loadu_ps(m0, brow);
            let b1 = _mm512_maskz_loadu_ps(m1, brow.add(16));
            let arow = ap.add(s * a.a_s + (p0 + r) * a.a_p);
            for (i, acc) in acc.iter_mut().enumerate() {
                let av = _mm512_set1_ps(*arow.add(i * a.a_p));
                acc[0] = _mm512_fmadd_ps(av, b0, acc[0]);
                acc[1] = _mm512_fmadd_ps(av, b1, acc[1]);
            }
        }
        for (i, acc) in acc.iter().enumerate() {
            let crow = cp.add((r + i) * cols + q);
            _mm512_mask_storeu_ps(crow, m0, _mm512_add_ps(_mm512_maskz_loadu_ps(m0, crow), acc[0]));
            _mm512_mask_storeu_ps(crow.add(16), m1, _mm512_add_ps(_mm512_maskz_loadu_ps(m1, crow.add(16)), acc[1]));
        }
    }
}

/// bf16 inputs (round to nearest even), f32 accumulation: B packed as pairs of consecutive depth
/// rows `[depth/2, cols]` of u32 (low half row 2s, high half row 2s+1), A as `[rows, depth/2]`
/// pairs, so one `vdpbf16ps` does two depth steps of 16 columns.
#[cfg(target_arch = "x86_64")]
mod bf16 {
    use super::Strided;
    use crate::codec::f32_to_bf16;
    use rayon::prelude::*;
    use std::arch::x86_64::*;

    fn pair(lo: f32, hi: f32) -> u32 {
        f32_to_bf16(lo) as u32 | (f32_to_bf16(hi) as u32) << 16
    }

    /// Rows `2s` and `2s+1` of `src` (row stride `ld`, `width` values each; rows ≥ `depth` are 0)
    /// interleaved into `out [depth/2, width]` bf16 pairs.
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn pack_row_pairs(src: &[f32], ld: usize, depth: usize, width: usize, out: &mut [u32]) {
        out.par_chunks_mut(width).enumerate().for_each(|(s2, row)| {
            // SAFETY: same features as the caller; reads stay within rows < depth of `src`.
            unsafe {
                let (r0, r1) = (2 * s2, 2 * s2 + 1);
                let mut j = 0;
                while j < width {
                    let n = (width - j).min(16);
                    let m: u16 = if n == 16 { 0xffff } else { ((1u32 << n) - 1) as u16 };
                    let lo = _mm512_maskz_loadu_ps(m, src.as_ptr().add(r0 * ld + j));
                    let hi = if r1 < depth {
                        _mm512_maskz_loadu_ps(m, src.as_ptr().add(r1 * ld + j))
                    } else {
                        _mm512_setzero_ps()
                    };
                    let lo = _mm512_cvtepu16_epi32(std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(lo)));
                    let hi = _mm512_cvtepu16_epi32(std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(hi)));
                    let v = _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16));
                    _mm512_mask_storeu_epi32(row.as_mut_ptr().add(j) as *mut i32, m, v);
                    j += 16;
                }
            }
        });
    }

    /// Rows of `src` (stride `ld`, `depth` values each) to bf16 in order: `out [rows, depth/2]`
    /// pairs (an odd last value pairs with 0).
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn pack_rows(src: &[f32], ld: usize, depth: usize, out: &mut [u32]) {
        let d2 = depth.div_ceil(2);
        out.par_chunks_mut(d2).enumerate().for_each(|(p, row)| {
            // SAFETY: as above; reads stay within `depth` values of row p.
            unsafe {
                let base = src.as_ptr().add(p * ld);
                let mut s = 0;
                while s < depth {
                    let n0 = (depth - s).min(16);
                    let n1 = (depth - s).saturating_sub(16).min(16);
                    let m0: u16 = if n0 == 16 { 0xffff } else { ((1u32 << n0) - 1) as u16 };
                    let m1: u16 = if n1 == 16 { 0xffff } else { ((1u32 << n1) - 1) as u16 };
                    let a = _mm512_maskz_loadu_ps(m0, base.add(s));
                    let b = _mm512_maskz_loadu_ps(m1, base.add(s + 16));
                    let v: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(b, a));
                    let pairs = (n0 + n1).div_ceil(2);
                    let pm: u16 = if pairs == 16 { 0xffff } else { ((1u32 << pairs) - 1) as u16 };
                    _mm512_mask_storeu_epi32(row.as_mut_ptr().add(s / 2) as *mut i32, pm, v);
                    s += 32;
                }
            }
        });
    }

    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn gemm_acc(a: Strided, b: &[f32], c: &mut [f32], rows: usize, cols: usize, depth: usize) {
        let d2 = depth.div_ceil(2);
        let mut bp = vec![0u32; d2 * cols];
        pack_row_pairs(b, cols, depth, cols, &mut bp);
        // A packed so that the pair (p, s2) sits at ap[p·ps + s2·ss].
        let mut ap = vec![0u32; rows * d2];
        let (ps, ss) = if a.a_p == 1 {
            pack_row_pairs(a.a, a.a_s, depth, rows, &mut ap);
            (1, rows)
        } else if a.a_s == 1 {
            pack_rows(a.a, a.a_p, depth, &mut ap);
            (d2, 1)
        } else {
            let at = |s: usize, p: usize| if s < depth { a.a[s * a.a_s + p * a.a_p] } else { 0.0 };
            ap.par_chunks_mut(d2).enumerate().for_each(|(p, row)| {
                for (s2, v) in row.iter_mut().enumerate() {
                    *v = pair(at(2 * s2, p), at(2 * s2 + 1, p));
                }
            });
            (d2, 1)
        };
        const MR: usize = 8;
        let per = (rows.div_ceil(4 * rayon::current_num_threads()).div_ceil(MR) * MR).max(MR);
        let (ap, bp) = (&ap[..], &bp[..]);
        c[..rows * cols].par_chunks_mut(per * cols).enumerate().for_each(|(i, cb)| {
            let n = cb.len() / cols;
            // SAFETY: this thread's features are the caller's (checked by set_bf16); indices stay
            // within the packed arrays and this band of C.
            unsafe { band(ap, (i * per, ps, ss), bp, cb, n, cols, d2) };
        });
    }

    /// `at = (first row, row stride, pair stride)` of the packed A.
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn band(ap: &[u32], at: (usize, usize, usize), bp: &[u32], c: &mut [f32], n: usize, cols: usize, d2: usize) {
        panels!(n, cols, |r, q| block(ap, at, bp, c; cols, d2));
    }

    #[inline]
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn block<const MR: usize>(
        ap: &[u32],
        (p0, ps, ss): (usize, usize, usize),
        bp: &[u32],
        c: &mut [f32],
        r: usize,
        q: usize,
        cols: usize,
        d2: usize,
    ) {
        let (app, bpp, cp) = (ap.as_ptr(), bp.as_ptr(), c.as_mut_ptr());
        let w = (cols - q).min(32);
        let m0: u16 = if w >= 16 { 0xffff } else { ((1u32 << w) - 1) as u16 };
        let m1: u16 = if w >= 32 {
            0xffff
        } else if w > 16 {
            ((1u32 << (w - 16)) - 1) as u16
        } else {
            0
        };
        let mut acc = [[_mm512_setzero_ps(); 2]; MR];
        for s2 in 0..d2 {
            let brow = bpp.add(s2 * cols + q) as *const i32;
            let b0: __m512bh = std::mem::transmute(_mm512_maskz_loadu_epi32(m0, brow));
            let b1: __m512bh = std::mem::transmute(_mm512_maskz_loadu_epi32(m1, brow.add(16)));
            for (i, acc) in acc.iter_mut().enumerate() {
                let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(*app.add((p0 + r + i) * ps + s2 * ss) as i32));
                acc[0] = _mm512_dpbf16_ps(acc[0], av, b0);
                acc[1] = _mm512_dpbf16_ps(acc[1], av, b1);
            }
        }
        for (i, acc) in acc.iter().enumerate() {
            let crow = cp.add((r + i) * cols + q);
            _mm512_mask_storeu_ps(crow, m0, _mm512_add_ps(_mm512_maskz_loadu_ps(m0, crow), acc[0]));
            _mm512_mask_storeu_ps(crow.add(16), m1, _mm512_add_ps(_mm512_maskz_loadu_ps(m1, crow.add(16)), acc[1]));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn matches_reference_for_both_strides_and_ragged_edges() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(21);
        for &(rows, cols, depth) in
            &[(1usize, 1usize, 1usize), (3, 17, 5), (8, 32, 9), (13, 47, 33), (70, 100, 64), (9, 300, 130)]
        {
            let b: Vec<f32> = (0..depth * cols).map(|_| rng.gen_range(-1.0..1.0)).collect();
            // A stored [depth, rows] (a_p = 1) and [rows, depth] (a_s = 1).
            let at: Vec<f32> = (0..depth * rows).map(|_| rng.gen_range(-1.0..1.0)).collect();
            for a in [Strided { a: &at, a_s: rows, a_p: 1 }, Strided { a: &at, a_s: 1, a_p: depth }] {
                let mut c = vec![0.25f32; rows * cols];
                gemm_acc(a, &b, &mut c, rows, cols, depth, false);
                let want = reference(a, &b, rows, cols, depth);
                for (i, (g, w)) in c.iter().zip(&want).enumerate() {
                    assert!(
                        (g - (w + 0.25)).abs() < 1e-4 * (1.0 + w.abs()),
                        "{rows}x{cols}x{depth}[{i}]: {g} vs {}",
                        w + 0.25
                    );
                }
            }
        }
    }
}
