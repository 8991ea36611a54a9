//! An f32 GEMM for training's many-token products: `C[p, q] += Σ_s A(s, p)·B[s, q]` with `B`
//! row-major and `A` read through two strides, so the weight gradient (`dyᵀ·x`), the input
//! gradient (`dy·W`) and the forward over a transposed weight all run without transposing their
//! activations.
//!
//! AVX-512 body: an 8×32 block of `C` in 16 registers; per `s`, two loads of `B`, eight broadcasts
//! of `A`, sixteen FMAs. Blocks of rows go to the threads.

use rayon::prelude::*;

/// `A(s, p) = a[s·a_s + p·a_p]`.
#[derive(Clone, Copy, Debug)]
pub struct Strided<'a> {
    pub a: &'a [f32],
    pub a_s: usize,
    pub a_p: usize,
}

/// `c[p, q] += Σ_s A(s, p)·b[s, q]` for `p < rows`, `q < cols`, `s < depth`; `b` is `[depth, cols]`
/// and `c` is `[rows, cols]`, both row-major.
pub fn gemm_acc(a: Strided, b: &[f32], c: &mut [f32], rows: usize, cols: usize, depth: usize) {
    assert!(b.len() >= depth * cols && c.len() >= rows * cols, "gemm_acc shape mismatch");
    if rows == 0 || cols == 0 || depth == 0 {
        return;
    }
    let last = (depth - 1) * a.a_s + (rows - 1) * a.a_p;
    assert!(last < a.a.len(), "gemm_acc: A is too short");
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
            c[p * cols + q] = (0..depth).map(|s| a.a[s * a.a_s + p * a.a_p] as f64 * b[s * cols + q] as f64).sum::<f64>() as f32;
        }
    }
    c
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
        let mut q = 0;
        while q < cols {
            let mut r = 0;
            while r < n {
                let mr = (n - r).min(8);
                match mr {
                    8 => block::<8>(a, b, c, p0, r, q, cols, depth),
                    7 => block::<7>(a, b, c, p0, r, q, cols, depth),
                    6 => block::<6>(a, b, c, p0, r, q, cols, depth),
                    5 => block::<5>(a, b, c, p0, r, q, cols, depth),
                    4 => block::<4>(a, b, c, p0, r, q, cols, depth),
                    3 => block::<3>(a, b, c, p0, r, q, cols, depth),
                    2 => block::<2>(a, b, c, p0, r, q, cols, depth),
                    _ => block::<1>(a, b, c, p0, r, q, cols, depth),
                }
                r += mr;
            }
            q += 32;
        }
    }

    /// `MR` rows (local row `r`) × columns `q..q+32` (masked at the edge).
    #[inline]
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f")]
    unsafe fn block<const MR: usize>(a: Strided, b: &[f32], c: &mut [f32], p0: usize, r: usize, q: usize, cols: usize, depth: usize) {
        let (ap, bp, cp) = (a.a.as_ptr(), b.as_ptr(), c.as_mut_ptr());
        let w = (cols - q).min(32);
        let m0: u16 = if w >= 16 { 0xffff } else { ((1u32 << w) - 1) as u16 };
        let m1: u16 = if w >= 32 { 0xffff } else if w > 16 { ((1u32 << (w - 16)) - 1) as u16 } else { 0 };
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

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn matches_reference_for_both_strides_and_ragged_edges() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(21);
        for &(rows, cols, depth) in &[(1usize, 1usize, 1usize), (3, 17, 5), (8, 32, 9), (13, 47, 33), (70, 100, 64), (9, 300, 130)] {
            let b: Vec<f32> = (0..depth * cols).map(|_| rng.gen_range(-1.0..1.0)).collect();
            // A stored [depth, rows] (a_p = 1) and [rows, depth] (a_s = 1).
            let at: Vec<f32> = (0..depth * rows).map(|_| rng.gen_range(-1.0..1.0)).collect();
            for a in [Strided { a: &at, a_s: rows, a_p: 1 }, Strided { a: &at, a_s: 1, a_p: depth }] {
                let mut c = vec![0.25f32; rows * cols];
                gemm_acc(a, &b, &mut c, rows, cols, depth);
                let want = reference(a, &b, rows, cols, depth);
                for (i, (g, w)) in c.iter().zip(&want).enumerate() {
                    assert!((g - (w + 0.25)).abs() < 1e-4 * (1.0 + w.abs()), "{rows}x{cols}x{depth}[{i}]: {g} vs {}", w + 0.25);
                }
            }
        }
    }
}
