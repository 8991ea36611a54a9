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

/// `q_lat [tokens, heads, latent]`, `q_pe [tokens, heads, rope]`, `c_kv [positions, latent]`,
/// `k_pe [positions, rope]`; query token t sees cache positions `0..visible[t]`.
/// Writes `out [tokens, heads, latent]`.
#[allow(clippy::too_many_arguments)]
pub fn latent_attention(
    shape: LatentShape,
    q_lat: &[f32],
    q_pe: &[f32],
    c_kv: &[f32],
    k_pe: &[f32],
    visible: &[usize],
    scale: f32,
    out: &mut [f32],
) {
    let LatentShape { tokens, heads, latent, rope } = shape;
    assert!(
        q_lat.len() == tokens * heads * latent
            && q_pe.len() == tokens * heads * rope
            && out.len() == tokens * heads * latent
            && visible.len() == tokens
            && visible.iter().all(|&v| v * latent <= c_kv.len() && v * rope <= k_pe.len()),
        "latent_attention shape mismatch"
    );
    let body = |(th, o): (usize, &mut [f32])| {
        let t = th / heads;
        let ql = &q_lat[th * latent..(th + 1) * latent];
        let qp = &q_pe[th * rope..(th + 1) * rope];
        let n = visible[t];
        let mut p: Vec<f32> = (0..n)
            .map(|s| {
                (dot_f32(ql, &c_kv[s * latent..(s + 1) * latent]) + dot_f32(qp, &k_pe[s * rope..(s + 1) * rope]))
                    * scale
            })
            .collect();
        softmax_in_place(&mut p);
        o.fill(0.0);
        for (s, &ps) in p.iter().enumerate() {
            axpy_f32(o, ps, &c_kv[s * latent..(s + 1) * latent]);
        }
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
                        let a: f64 = (0..latent).map(|c| q_lat[th * latent + c] as f64 * c_kv[s * latent + c] as f64).sum();
                        let b: f64 = (0..rope).map(|c| q_pe[th * rope + c] as f64 * k_pe[s * rope + c] as f64).sum();
                        (a + b) * scale as f64
                    })
                    .collect();
                let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = scores.iter().map(|s| (s - max).exp()).collect();
                let z: f64 = e.iter().sum();
                for c in 0..latent {
                    out[th * latent + c] = (0..e.len()).map(|s| e[s] / z * c_kv[s * latent + c] as f64).sum::<f64>() as f32;
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
            latent_attention(shape, &q_lat, &q_pe, &c_kv, &k_pe, &visible, 0.3, &mut out);
            let want = reference::latent_attention(shape, &q_lat, &q_pe, &c_kv, &k_pe, &visible, 0.3);
            for (a, b) in out.iter().zip(&want) {
                assert!((a - b).abs() < 1e-5, "{a} vs {b}");
            }
        }
    }
}
