//! V3.2's lightning indexer, the selector of DeepSeek Sparse Attention (spec deepseek-v32-v4.md
//! §2.3–2.5): `index_n_heads` small heads score every position a query sees,
//! `I(t, s) = Σ_h w(t, h)·ReLU(q_I(t, h)·k_I(s)·d_I^-½)`, and MLA attends only to the `index_topk`
//! best. A query that sees at most `index_topk` positions sees them all, so V3.2 equals V3 up to
//! that length. By default scores are f32 with no Hadamard rotation or FP8 simulation
//! (transformers' numerics); [`Exec::indexer_fp8`] gives the official code's instead (§2.6).
//! Ties at the k-th score go to the lower position.

use crate::config::Config;
use crate::error::Result;
use crate::exec::Exec;
use crate::layers::{LayerNorm, Linear};
use crate::paged::IndexKeys;
use crate::rope::Rope;
use crate::weights::Checkpoint;
use dsv3_kernels::gemm::{gemm_acc, Strided};
use dsv3_kernels::quant::Fp8Blocks;
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
    pub heads: usize,
    pub dim: usize,
    pub topk: usize,
    /// MLA's frequencies and positions on the first `qk_rope_head_dim` dims, but in halves
    /// (pairs `(j, j + R/2)`) where MLA interleaves.
    pub(crate) rope: Rope,
}

/// The indexer's view of new rows: queries `[n, H_I, d_I]` and head weights `[n, H_I]` (with
/// `H_I^-½·d_I^-½` folded in: both positive, so they commute with the ReLU), and keys `[n, d_I]`
/// (the latent cache holds these), and the keys before `k_norm` (for training). With the official
/// numerics `q` and `k` hold the rounded values and `k8` the keys' FP8 form, which the cache keeps.
pub struct IndexRows {
    pub q: Vec<f32>,
    pub w: Vec<f32>,
    pub k: Vec<f32>,
    pub k_pre: Vec<f32>,
    pub k8: Option<Fp8Blocks>,
}

impl IndexRows {
    /// Row `i`'s key (`d` = `index_head_dim` values) as the cache stores it.
    pub fn key(&self, i: usize, d: usize) -> IndexKeys<'_> {
        match &self.k8 {
            None => IndexKeys::F32(&self.k[i * d..(i + 1) * d]),
            Some(k8) => IndexKeys::Fp8 { codes: &k8.codes, scales: &k8.scales }.rows(d, i, i + 1),
        }
    }
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
        let k8 = cx.indexer_fp8.then(|| {
            official_round(cx, &mut q, d);
            official_round(cx, &mut k, d)
        });
        IndexRows { q, w, k, k_pre, k8 }
    }

    /// The selection of `t` query rows (`q [t, H_I, d_I]`, `w [t, H_I]`) over keys held in
    /// `pages` (`[n, d_I]` each, positions in order); row `i` sees positions `0..visible[i]`.
    /// The scan over the keys is the indexer's one cost linear in the context: blocks of queries
    /// against blocks of keys, in parallel, memory bounded by the blocks.
    pub fn select(&self, q: &[f32], w: &[f32], pages: &[IndexKeys], visible: &[usize]) -> Selection {
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
        for page in pages {
            let n = page.len() / d;
            for r0 in (0..n).step_by(KEY_BLOCK) {
                let r1 = (r0 + KEY_BLOCK).min(n);
                if at + r0 < seen {
                    keys.push((at + r0, page.rows(d, r0, r1.min(seen - at))));
                }
            }
            at += n;
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
    /// position, [n, d_I])`: `scoresᵀ = K·qᵀ` per block (f32 keys read as they lie, FP8 ones
    /// decoded a block at a time), then the ReLU'd head scores summed with the rows' weights.
    pub fn scores(&self, q: &[f32], w: &[f32], rows: &[usize], keys: &[(usize, IndexKeys)], seen: usize) -> Vec<f32> {
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
                let k = k.to_f32(d);
                let mut raw = vec![0f32; n * m * h];
                gemm_acc(Strided { a: &k, a_s: 1, a_p: d }, &qt, &mut raw, n, m * h, d, false);
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

/// The official indexer's rounding of queries or keys `x [m, d]` (DeepSeek's `Indexer.forward`:
/// `rotate_activation`, then `act_quant` per 128): each row Hadamard-rotated (orthogonal, so
/// exact scores would not change) and rounded to E4M3 with one scale per 128 values. `x` holds
/// the dequantized values: `q8·k8·q_s·k_s` is then one f32 product, and ReLU commutes with the
/// positive scales, so the scores are those of the FP8 kernel (up to f32 summation order).
fn official_round(cx: &Exec, x: &mut [f32], d: usize) -> Fp8Blocks {
    let scale = (d as f32).powf(-0.5);
    x.chunks_exact_mut(d).for_each(|row| hadamard_in_place(row, scale));
    let q = Fp8Blocks::quantize(x, x.len() / d, d, [1, 128], cx.act_scale_fmt);
    x.copy_from_slice(&q.dequantize());
    q
}

/// Whether the official numerics apply to index keys of `d` dims (the rotation needs a power of
/// two; V3.2 has 128).
pub fn official_numerics_fit(d: usize) -> bool {
    d.is_power_of_two()
}

/// `x ← scale·H·x` for the Sylvester-ordered Walsh–Hadamard matrix `H` (`H₁ = [[1, 1], [1,
/// −1]]`, what `fast_hadamard_transform` computes); `x.len()` a power of two.
pub fn hadamard_in_place(x: &mut [f32], scale: f32) {
    let n = x.len();
    debug_assert!(n.is_power_of_two(), "a Hadamard rotation needs a power-of-two length");
    let mut h = 1;
    while h < n {
        for block in x.chunks_exact_mut(2 * h) {
            let (a, b) = block.split_at_mut(h);
            for (u, v) in a.iter_mut().zip(b) {
                (*u, *v) = (*u + *v, *u - *v);
            }
        }
        h *= 2;
    }
    x.iter_mut().for_each(|v| *v *= scale);
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
    use super::{hadamard_in_place, top_k};

    #[test]
    fn hadamard_is_sylvesters_matrix_and_orthogonal() {
        // H₄ rows: ++++, +-+-, ++--, +--+.
        let mut x = [1.0, 2.0, 3.0, 4.0];
        hadamard_in_place(&mut x, 1.0);
        assert_eq!(x, [10.0, -2.0, -4.0, 0.0]);
        let y: Vec<f32> = (0..128).map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.1).collect();
        let mut z = y.clone();
        hadamard_in_place(&mut z, (128f32).powf(-0.5));
        let norm = |v: &[f32]| v.iter().map(|a| a * a).sum::<f32>();
        assert!((norm(&y) - norm(&z)).abs() < 1e-4 * norm(&y));
        hadamard_in_place(&mut z, (128f32).powf(-0.5));
        y.iter().zip(&z).for_each(|(a, b)| assert!((a - b).abs() < 1e-5));
    }

    #[test]
    fn top_k_keeps_the_best_and_breaks_ties_low() {
        assert_eq!(top_k(&[0.1, 0.5, 0.3, 0.5, -1.0], 2), vec![1, 3]);
        assert_eq!(top_k(&[0.2, 0.2, 0.2, 0.2], 3), vec![0, 1, 2]);
        assert_eq!(top_k(&[1.0, f32::NEG_INFINITY, 2.0], 5), vec![0, 1, 2]);
    }
}
