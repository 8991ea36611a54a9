//! Training V3.2's lightning indexer (DSA; spec deepseek-v32-v4.md §2, the V3.2 report §2.1):
//! the softmax of its scores is pulled towards the main attention's distribution (the heads'
//! probabilities summed and L1-normalized) by `L_I = Σ_t KL(p_t ‖ softmax(I_t)) / tokens`, over
//! every position a query sees in the dense warm-up and over the chosen ones in sparse training.
//! The indexer's inputs are detached from the main model: `L_I` trains only the indexer, and the
//! language-model loss never reaches it (the choice is a hard top-k).

use super::Grads;
use crate::exec::Exec;
use crate::indexer::{IndexRows, Indexer, Selection};
use crate::layers::LayerNorm;
use crate::paged::IndexKeys;
use dsv3_kernels::gemm::{gemm_acc, Strided};
use rayon::prelude::*;

/// What [`Indexer::backward`] needs from the training forward.
pub struct IndexSaved {
    pub(crate) rows: IndexRows,
    /// `[seqs, t, t]`: `∂L_I/∂I`, zero outside each query's set.
    pub(crate) d_scores: Vec<f32>,
    /// This layer's `L_I`.
    pub(crate) loss: f64,
    /// A digest of the positions chosen (changes when any choice does).
    pub(crate) digest: u64,
}

impl Indexer {
    /// `L_I` and its gradient over `seqs` whole sequences of `t` rows: `probs [seqs, H, t, t]`
    /// are the main attention's, `sel[sq]` the choices per row (empty or `None`: every visible
    /// position), `tokens` what the loss is averaged over.
    pub(crate) fn train_loss(
        &self,
        rows: IndexRows,
        probs: &[f32],
        heads: usize,
        (seqs, t): (usize, usize),
        sel: &[Selection],
        tokens: usize,
    ) -> IndexSaved {
        let (hi, d) = (self.heads, self.dim);
        let per: Vec<(f64, Vec<f32>, u64)> = (0..seqs)
            .into_par_iter()
            .map(|sq| {
                let (q, w) = (&rows.q[sq * t * hi * d..(sq + 1) * t * hi * d], &rows.w[sq * t * hi..(sq + 1) * t * hi]);
                let all: Vec<usize> = (0..t).collect();
                let keys = [(0, IndexKeys::F32(&rows.k[sq * t * d..(sq + 1) * t * d]))];
                let sc = self.scores(q, w, &all, &keys, t);
                let (mut ds, mut loss, mut digest) = (vec![0f32; t * t], 0f64, 0u64);
                for i in 0..t {
                    let set: Vec<usize> = match sel.get(sq).and_then(|s| s.get(i)) {
                        Some(Some(chosen)) => chosen.clone(),
                        _ => (0..=i).collect(),
                    };
                    let p: Vec<f64> = set
                        .iter()
                        .map(|&s| (0..heads).map(|h| probs[((sq * heads + h) * t + i) * t + s] as f64).sum())
                        .collect();
                    let total: f64 = p.iter().sum();
                    let m = set.iter().map(|&s| sc[i * t + s] as f64).fold(f64::NEG_INFINITY, f64::max);
                    let log_z = set.iter().map(|&s| (sc[i * t + s] as f64 - m).exp()).sum::<f64>().ln() + m;
                    for (&s, &pj) in set.iter().zip(&p) {
                        let (pj, log_q) = (pj / total.max(f64::MIN_POSITIVE), sc[i * t + s] as f64 - log_z);
                        if pj > 0.0 {
                            loss += pj * (pj.ln() - log_q);
                        }
                        ds[i * t + s] = ((log_q.exp() - pj) / tokens as f64) as f32;
                        digest = digest.wrapping_mul(0x100000001b3).wrapping_add((i * t + s) as u64);
                    }
                }
                (loss / tokens as f64, ds, digest)
            })
            .collect();
        let (mut loss, mut d_scores, mut digest) = (0.0, Vec::with_capacity(seqs * t * t), 0u64);
        for (l, ds, dg) in per {
            loss += l;
            d_scores.extend(ds);
            digest = digest.rotate_left(7) ^ dg;
        }
        IndexSaved { rows, d_scores, loss, digest }
    }

    /// Parameter gradients under `{name}.*` from `L_I` (the inputs are detached: nothing is
    /// returned). `x [n, D]` and `cq [n, q_lora_rank]` are the forward's inputs, sequences of `t`
    /// rows at positions `0..t`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn backward(
        &self,
        cx: &Exec,
        name: &str,
        s: &IndexSaved,
        x: &[f32],
        cq: &[f32],
        (seqs, t): (usize, usize),
        g: &mut Grads,
    ) {
        let (hi, d, n) = (self.heads, self.dim, seqs * t);
        let (q_all, w_all, k_all) = (&s.rows.q, &s.rows.w, &s.rows.k);
        // Per sequence: ∂q [t, H_I, d_I], ∂w [t, H_I], ∂k [t, d_I] of I = Σ_h w_h·ReLU(q_h·k).
        let per: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = (0..seqs)
            .into_par_iter()
            .map(|sq| {
                let q = &q_all[sq * t * hi * d..(sq + 1) * t * hi * d];
                let (w, k) = (&w_all[sq * t * hi..(sq + 1) * t * hi], &k_all[sq * t * d..(sq + 1) * t * d]);
                let ds = &s.d_scores[sq * t * t..(sq + 1) * t * t];
                let mut kt = vec![0f32; d * t];
                for (j, row) in k.chunks_exact(d).enumerate() {
                    row.iter().enumerate().for_each(|(c, &v)| kt[c * t + j] = v);
                }
                let (mut dq, mut dw, mut dk) = (vec![0f32; t * hi * d], vec![0f32; t * hi], vec![0f32; t * d]);
                for h in 0..hi {
                    let mut a = vec![0f32; t * t];
                    gemm_acc(Strided { a: &q[h * d..], a_s: 1, a_p: hi * d }, &kt, &mut a, t, t, d, false);
                    let mut da = vec![0f32; t * t];
                    for i in 0..t {
                        for j in 0..=i {
                            let (gs, av) = (ds[i * t + j], a[i * t + j]);
                            if av > 0.0 {
                                dw[i * hi + h] += gs * av;
                                da[i * t + j] = gs * w[i * hi + h];
                            }
                        }
                    }
                    let mut dqh = vec![0f32; t * d];
                    gemm_acc(Strided { a: &da, a_s: 1, a_p: t }, k, &mut dqh, t, d, t, false);
                    for i in 0..t {
                        dq[(i * hi + h) * d..][..d].copy_from_slice(&dqh[i * d..(i + 1) * d]);
                    }
                    let qh: Vec<f32> = (0..t).flat_map(|i| q[(i * hi + h) * d..][..d].iter().copied()).collect();
                    gemm_acc(Strided { a: &da, a_s: t, a_p: 1 }, &qh, &mut dk, t, d, t, false);
                }
                (dq, dw, dk)
            })
            .collect();
        let (mut dq, mut dw, mut dk) =
            (Vec::with_capacity(n * hi * d), Vec::with_capacity(n * hi), Vec::with_capacity(n * d));
        for (a, b, c) in per {
            dq.extend(a);
            dw.extend(b);
            dk.extend(c);
        }
        // Back through the half-split RoPE on the first dims, and the folded head scale.
        let r = self.rope.inv_freq.len() * 2;
        for i in 0..n {
            let pos = i % t;
            self.rope.apply_transpose(&mut dk[i * d..i * d + r], pos);
            for h in 0..hi {
                self.rope.apply_transpose(&mut dq[(i * hi + h) * d..][..r], pos);
            }
        }
        let fold = 1.0 / ((hi as f32).sqrt() * (d as f32).sqrt());
        dw.iter_mut().for_each(|v| *v *= fold);
        let dm = self.wk.weight.cols;
        g.weight_grad(cx, format!("{name}.weights_proj.weight"), &dw, x, n, hi, dm, cx.fp8);
        g.weight_grad(cx, format!("{name}.wq_b.weight"), &dq, cq, n, hi * d, self.wq_b.weight.cols, cx.fp8);
        let dkp = self.k_norm.backward(&format!("{name}.k_norm"), &s.rows.k_pre, &dk, g);
        g.weight_grad(cx, format!("{name}.wk.weight"), &dkp, x, n, d, dm, cx.fp8);
    }
}

impl LayerNorm {
    /// For `y = w ⊙ x̂ + b`, `x̂ = (x − μ)·r`, rows of `x`: adds to `{name}.weight` and `.bias`'s
    /// gradients and returns `dx = r·(ĝ − mean(ĝ) − x̂·mean(ĝ ⊙ x̂))` with `ĝ = w ⊙ dy`.
    pub fn backward(&self, name: &str, x: &[f32], dy: &[f32], g: &mut Grads) -> Vec<f32> {
        let d = self.weight.len();
        let mut dw = vec![0f32; d];
        let mut db = vec![0f32; d];
        let mut dx = vec![0f32; x.len()];
        for ((xr, dyr), dxr) in x.chunks_exact(d).zip(dy.chunks_exact(d)).zip(dx.chunks_exact_mut(d)) {
            let mean = xr.iter().sum::<f32>() / d as f32;
            let var = xr.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / d as f32;
            let r = 1.0 / (var + self.eps).sqrt();
            let (mut m1, mut m2) = (0f32, 0f32);
            for j in 0..d {
                let xh = (xr[j] - mean) * r;
                dw[j] += dyr[j] * xh;
                db[j] += dyr[j];
                let gh = self.weight[j] * dyr[j];
                m1 += gh;
                m2 += gh * xh;
            }
            let (m1, m2) = (m1 / d as f32, m2 / d as f32);
            for j in 0..d {
                let xh = (xr[j] - mean) * r;
                dxr[j] = r * (self.weight[j] * dyr[j] - m1 - xh * m2);
            }
        }
        for (n, v) in [(format!("{name}.weight"), dw), (format!("{name}.bias"), db)] {
            if g.wants(&n) {
                super::add_into(g.slot(&n, d), &v);
            }
        }
        dx
    }
}
