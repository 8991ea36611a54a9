//! V3.2's lightning indexer, the selector of DeepSeek Sparse Attention (spec deepseek-v32-v4.md
//! §2.3–2.5): `index_n_heads` small heads score every position a query sees,
//! `I(t, s) = Σ_h w(t, h)·ReLU(q_I(t, h)·k_I(s)·d_I^-½)`, and MLA attends only to the `index_topk`
//! best. A query that sees at most `index_topk` positions sees them all, so V3.2 equals V3 up to
//! that length. Scores are f32 and there is no Hadamard rotation or FP8 simulation (transformers'
//! numerics); ties at the k-th score go to the lower position.

use crate::config::Config;
use crate::error::Result;
use crate::exec::Exec;
use crate::layers::{LayerNorm, Linear};
use crate::rope::Rope;
use crate::weights::Checkpoint;
use dsv3_kernels::gemm::{gemm_acc, Strided};
use rayon::prelude::*;

#[derive(Clone)]
pub struct Indexer {
    /// `[H_I·d_I, q_lora_rank]`: queries from the normalized q latent MLA also uses.
    pub wq_b: Linear,
    /// `[d_I, D]`: one key per position, shared by the heads.
    pub wk: Linear,
    pub k_norm: LayerNorm,
    /// `[H_I, D]`: each head's weight for the query.
    pub weights_proj: Linear,
    pub(crate) heads: usize,
    pub(crate) dim: usize,
    topk: usize,
    /// MLA's frequencies and positions on the first `qk_rope_head_dim` dims, but in halves
    /// (pairs `(j, j + R/2)`) where MLA interleaves.
    pub(crate) rope: Rope,
}

/// The indexer's view of new rows: queries `[n, H_I, d_I]` and head weights `[n, H_I]` (with
/// `H_I^-½·d_I^-½` folded in: both positive, so they commute with the ReLU), and keys `[n, d_I]`
/// (the latent cache holds these), and the keys before `k_norm` (for training).
pub struct IndexRows {
    pub q: Vec<f32>,
    pub w: Vec<f32>,
    pub k: Vec<f32>,
    pub k_pre: Vec<f32>,
}

/// The positions each query row attends to, ascending; `None`: all it sees.
pub type Selection = Vec<Option<Vec<usize>>>;

impl Indexer {
    /// `p` is the layer's `self_attn` prefix; `None` when the config has no indexer.
    pub fn load(ck: &Checkpoint, p: &str, cfg: &Config, block: [usize; 2]) -> Result<Option<Self>> {
        let (Some(ix), Some(rq)) = (cfg.indexer, cfg.q_lora_rank) else { return Ok(None) };
        let (h, d, dm) = (ix.n_heads, ix.head_dim, cfg.hidden_size);
        let p = format!("{p}.indexer");
        Ok(Some(Indexer {
            wq_b: Linear::load(ck, &format!("{p}.wq_b"), h * d, rq, block)?,
            wk: Linear::load(ck, &format!("{p}.wk"), d, dm, block)?,
            k_norm: LayerNorm::load(ck, &format!("{p}.k_norm"), d, 1e-6)?,
            weights_proj: Linear::load(ck, &format!("{p}.weights_proj"), h, dm, block)?,
            heads: h,
            dim: d,
            topk: ix.topk,
            rope: Rope { interleave: false, ..Rope::new(cfg) },
        }))
    }

    pub fn key_dim(&self) -> usize {
        self.dim
    }

    /// Queries, weights and keys of `n` rows: `x [n, D]` the attention-normed hidden states,
    /// `cq [n, q_lora_rank]` the normalized q latent, row `i` at `positions[i]`.
    pub fn rows(&self, cx: &Exec, x: &[f32], cq: &[f32], n: usize, positions: &[usize]) -> IndexRows {
        let (h, d) = (self.heads, self.dim);
        let mut out = Linear::forward_many(cx, &[(&self.wq_b, cq, n), (&self.wk, x, n), (&self.weights_proj, x, n)]);
        let mut w = out.pop().unwrap_or_default();
        let mut k = out.pop().unwrap_or_default();
        let mut q = out.pop().unwrap_or_default();
        let k_pre = k.clone();
        self.k_norm.forward_in_place(&mut k);
        let r = self.rope.inv_freq.len() * 2;
        let fold = 1.0 / ((h as f32).sqrt() * (d as f32).sqrt());
        for (i, &pos) in positions.iter().enumerate() {
            self.rope.apply(&mut k[i * d..i * d + r], pos);
            for hh in 0..h {
                self.rope.apply(&mut q[(i * h + hh) * d..][..r], pos);
            }
        }
        w.iter_mut().for_each(|v| *v *= fold);
        IndexRows { q, w, k, k_pre }
    }

    /// The selection of `t` query rows (`q [t, H_I, d_I]`, `w [t, H_I]`) over keys held in
    /// `pages` (`[n, d_I]` each, positions in order); row `i` sees positions `0..visible[i]`.
    /// The scan over the keys is the indexer's one cost linear in the context: blocks of queries
    /// against blocks of keys, in parallel, memory bounded by the blocks.
    pub fn select(&self, q: &[f32], w: &[f32], pages: &[&[f32]], visible: &[usize]) -> Selection {
        const QUERY_BLOCK: usize = 32;
        const KEY_BLOCK: usize = crate::paged::BLOCK_TOKENS;
        let (d, t) = (self.dim, visible.len());
        let mut out: Selection = vec![None; t];
        let need: Vec<usize> = (0..t).filter(|&i| visible[i] > self.topk).collect();
        if need.is_empty() {
            return out;
        }
        let seen = visible.iter().copied().max().unwrap_or(0);
        let mut keys = Vec::new();
        let mut at = 0;
        for part in pages.iter().flat_map(|pg| pg.chunks(KEY_BLOCK * d)) {
            if at < seen {
                keys.push((at, &part[..part.len().min((seen - at) * d)]));
            }
            at += part.len() / d;
        }
        let chosen: Vec<(usize, Vec<usize>)> = need
            .par_chunks(QUERY_BLOCK)
            .flat_map_iter(|rows| {
                let scores = self.scores(q, w, rows, &keys, seen);
                let top = |(r, &i): (usize, &usize)| (i, top_k(&scores[r * seen..r * seen + visible[i]], self.topk));
                rows.iter().enumerate().map(top).collect::<Vec<_>>()
            })
            .collect();
        for (i, c) in chosen {
            out[i] = Some(c);
        }
        out
    }

    /// Index scores `[rows, seen]` of the query rows `rows` against the key blocks `(first
    /// position, [n, d_I])`: `scoresᵀ = K·qᵀ` per block (the keys read as they lie), then the
    /// ReLU'd head scores summed with the rows' weights.
    pub(crate) fn scores(
        &self,
        q: &[f32],
        w: &[f32],
        rows: &[usize],
        keys: &[(usize, &[f32])],
        seen: usize,
    ) -> Vec<f32> {
        let (h, d, m) = (self.heads, self.dim, rows.len());
        // qᵀ [d, m·H]
        let mut qt = vec![0f32; d * m * h];
        for (r, &i) in rows.iter().enumerate() {
            for hh in 0..h {
                let row = &q[(i * h + hh) * d..][..d];
                for (j, &v) in row.iter().enumerate() {
                    qt[j * m * h + r * h + hh] = v;
                }
            }
        }
        let blocks: Vec<Vec<f32>> = keys
            .par_iter()
            .map(|&(_, k)| {
                let n = k.len() / d;
                let mut raw = vec![0f32; n * m * h];
                gemm_acc(Strided { a: k, a_s: 1, a_p: d }, &qt, &mut raw, n, m * h, d, false);
                let mut sc = vec![0f32; m * n];
                for (s, per_key) in raw.chunks_exact(m * h).enumerate() {
                    for (r, &i) in rows.iter().enumerate() {
                        let (heads, wi) = (&per_key[r * h..(r + 1) * h], &w[i * h..(i + 1) * h]);
                        sc[r * n + s] = heads.iter().zip(wi).map(|(a, b)| a.max(0.0) * b).sum();
                    }
                }
                sc
            })
            .collect();
        let mut scores = vec![f32::NEG_INFINITY; m * seen];
        for (&(s0, k), sc) in keys.iter().zip(&blocks) {
            let n = k.len() / d;
            for r in 0..m {
                scores[r * seen + s0..][..n].copy_from_slice(&sc[r * n..(r + 1) * n]);
            }
        }
        scores
    }

    /// Weight bytes one decode token reads.
    pub fn bytes(&self) -> usize {
        [&self.wq_b, &self.wk, &self.weights_proj].iter().map(|l| l.weight.view().bytes()).sum()
    }
}

/// The `k` best of `scores` (ties: the lower index first), ascending by index.
pub fn top_k(scores: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    if k < idx.len() {
        let better = |a: &usize, b: &usize| scores[*b].total_cmp(&scores[*a]).then(a.cmp(b));
        idx.select_nth_unstable_by(k, better);
        idx.truncate(k);
    }
    idx.sort_unstable();
    idx
}

#[cfg(test)]
mod tests {
    use super::top_k;

    #[test]
    fn top_k_keeps_the_best_and_breaks_ties_low() {
        assert_eq!(top_k(&[0.1, 0.5, 0.3, 0.5, -1.0], 2), vec![1, 3]);
        assert_eq!(top_k(&[0.2, 0.2, 0.2, 0.2], 3), vec![0, 1, 2]);
        assert_eq!(top_k(&[1.0, f32::NEG_INFINITY, 2.0], 5), vec![0, 1, 2]);
    }
}
