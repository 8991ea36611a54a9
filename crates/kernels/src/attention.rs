//! Absorbed multi-head latent attention over the latent cache (spec §3): every head attends to the
//! same cached `[c_kv ; k_pe]` rows, 576 values per token for V3, with its query already projected
//! into the latent space (`q_lat = q_nope · W_UK`).
//!
//! `score(h, s) = (q_lat[h]·c_kv[s] + q_pe[h]·k_pe[s]) · scale`, softmax in f32 over the visible
//! positions, `o_lat[h] = Σ_s p(h, s)·c_kv[s]`.

use crate::dot::{axpy_f32, dot_f32};
use rayon::prelude::*;

/// Sizes of one call.
#[derive(Clone, Copy, Debug)]
pub struct LatentShape {
    /// Query tokens.
    pub tokens: usize,
    pub heads: usize,
    /// `kv_lora_rank` (512 for V3).
    pub latent: usize,
    /// `qk_rope_head_dim` (64 for V3).
    pub rope: usize,
}

/// The latent cache as pages of `block` positions each (the last may hold fewer): page `i` holds
/// positions `i·block..`, `c_kv[i]` their `[n, latent]` rows and `k_pe[i]` their `[n, rope]`
/// rows. A contiguous cache is one page with `block = usize::MAX`.
#[derive(Clone, Copy, Debug)]
pub struct Pages<'a> {
    pub c_kv: &'a [&'a [f32]],
    pub k_pe: &'a [&'a [f32]],
    pub block: usize,
}

impl Pages<'_> {
    /// Calls `f(c_kv row, k_pe row)` for positions `0..n` in order, page by page.
    #[inline]
    fn for_rows(&self, n: usize, latent: usize, rope: usize, mut f: impl FnMut(&[f32], &[f32])) {
        let mut left = n;
        for (c, k) in self.c_kv.iter().zip(self.k_pe.iter()) {
            let m = left.min(c.len() / latent.max(1));
            for i in 0..m {
                f(&c[i * latent..(i + 1) * latent], &k[i * rope..(i + 1) * rope]);
            }
            left -= m;
            if left == 0 {
                break;
            }
        }
    }

    fn positions(&self, latent: usize) -> usize {
        match self.c_kv.split_last() {
            None => 0,
            Some((last, full)) => full.len().saturating_mul(self.block).saturating_add(last.len() / latent.max(1)),
        }
    }
}

/// `q_lat [tokens, heads, latent]`, `q_pe [tokens, heads, rope]`, the cache in `pages`; query token
/// t sees cache positions `0..visible[t]`. Writes `out [tokens, heads, latent]`. Positions are
/// summed in order whatever the paging, so a paged and a contiguous cache give the same bits.
pub fn latent_attention(
    shape: LatentShape,
    q_lat: &[f32],
    q_pe: &[f32],
    pages: Pages,
    visible: &[usize],
    scale: f32,
    out: &mut [f32],
) {
    let LatentShape { tokens, heads, latent, rope } = shape;
    let full_pages_ok = pages.c_kv.len() <= 1
        || pages.c_kv[..pages.c_kv.len() - 1]
            .iter()
            .zip(pages.k_pe.iter())
            .all(|(c, k)| c.len() == pages.block * latent && k.len() == pages.block * rope);
    let held = pages.positions(latent);
    assert!(
        q_lat.len() == tokens * heads * latent
            && q_pe.len() == tokens * heads * rope
            && out.len() == tokens * heads * latent
            && visible.len() == tokens
            && pages.c_kv.len() == pages.k_pe.len()
            && full_pages_ok
            && visible.iter().all(|&v| v <= held),
        "latent_attention shape mismatch"
    );
    let body = |(th, o): (usize, &mut [f32])| {
        let t = th / heads;
        let ql = &q_lat[th * latent..(th + 1) * latent];
        let qp = &q_pe[th * rope..(th + 1) * rope];
        let n = visible[t];
        let mut p: Vec<f32> = Vec::with_capacity(n);
        pages.for_rows(n, latent, rope, |c, k| p.push((dot_f32(ql, c) + dot_f32(qp, k)) * scale));
        softmax_in_place(&mut p);
        o.fill(0.0);
        let mut s = 0;
        pages.for_rows(n, latent, rope, |c, _| {
            axpy_f32(o, p[s], c);
            s += 1;
        });
    };
    if tokens * heads > 1 && visible.iter().sum::<usize>() * heads * latent > 1 << 14 {
        out.par_chunks_mut(latent).enumerate().for_each(body);
    } else {
        out.chunks_mut(latent).enumerate().for_each(body);
    }
}

/// Numerically stable softmax (max subtracted first); an empty slice stays empty.
pub fn softmax_in_place(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        return;
    }
    let mut sum = 0f32;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    x.iter_mut().for_each(|v| *v /= sum);
}

/// Scalar reference in f64.
pub mod reference {
    use super::LatentShape;

    #[allow(clippy::too_many_arguments)]
    pub fn latent_attention(
        shape: LatentShape,
        q_lat: &[f32],
        q_pe: &[f32],
        c_kv: &[f32],
        k_pe: &[f32],
        visible: &[usize],
        scale: f32,
    ) -> Vec<f32> {
        let LatentShape { tokens, heads, latent, rope } = shape;
        let mut out = vec![0f32; tokens * heads * latent];
        for (t, &vis) in visible.iter().enumerate().take(tokens) {
            for h in 0..heads {
                let th = t * heads + h;
                let scores: Vec<f64> = (0..vis)
                    .map(|s| {
                        let a: f64 =
                            (0..latent).map(|c| q_lat[th * latent + c] as f64 * c_kv[s * latent + c] as f64).sum();
                        let b: f64 = (0..rope).map(|c| q_pe[th * rope + c] as f64 * k_pe[s * rope + c] as f64).sum();
                        (a + b) * scale as f64
                    })
                    .collect();
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let z: f64 = e.iter().sum();
                for c in 0..latent {
                    out[th * latent + c] =
                        (0..e.len()).map(|s| e[s] / z * c_kv[s * latent + c] as f64).sum::<f64>() as f32;
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn matches_reference_with_causal_visibility() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        for (tokens, heads, latent, rope, positions) in [(1, 4, 32, 8, 1), (3, 2, 40, 16, 9), (2, 16, 512, 64, 70)] {
            let shape = LatentShape { tokens, heads, latent, rope };
            let mut r = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.gen_range(-1.0..1.0)).collect() };
            let (q_lat, q_pe) = (r(tokens * heads * latent), r(tokens * heads * rope));
            let (c_kv, k_pe) = (r(positions * latent), r(positions * rope));
            let visible: Vec<usize> = (0..tokens).map(|t| positions - (tokens - 1 - t)).collect();
            let mut out = vec![0f32; tokens * heads * latent];
            let whole = Pages { c_kv: &[&c_kv], k_pe: &[&k_pe], block: usize::MAX };
            latent_attention(shape, &q_lat, &q_pe, whole, &visible, 0.3, &mut out);
            let want = reference::latent_attention(shape, &q_lat, &q_pe, &c_kv, &k_pe, &visible, 0.3);
            for (a, b) in out.iter().zip(&want) {
                assert!((a - b).abs() < 1e-5, "{a} vs {b}");
            }
            // The same cache in pages of 4 positions: the same bits.
            let ck: Vec<&[f32]> = c_kv.chunks(4 * latent).collect();
            let kp: Vec<&[f32]> = k_pe.chunks(4 * rope).collect();
            let mut paged = vec![0f32; out.len()];
            latent_attention(shape, &q_lat, &q_pe, Pages { c_kv: &ck, k_pe: &kp, block: 4 }, &visible, 0.3, &mut paged);
            assert_eq!(paged, out);
        }
    }
}
