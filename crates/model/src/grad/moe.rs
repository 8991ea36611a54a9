//! DeepSeekMoE for training: the router's gradient flows through the unbiased gate weights (the
//! correction bias only selects), through the experts' outputs, and through the balance losses.
//!
//! Balance losses (spec §4, parallel §5), both `α·Σ_i f_i·P_i` with `s'_t = s_t / Σ_j s_tj`:
//! - sequence-wise (the report's complementary loss): per sequence, `f_i = N/(K·T)·Σ_t 1[i ∈
//!   TopK(s_t)]` on the plain scores (no bias, no group limit, as Megatron), `P_i = mean_t s'_ti`,
//!   averaged over the sequences;
//! - batch-wise (the classic auxiliary loss, `--balance aux-loss`): the same over all the batch's
//!   tokens, with `f_i` counting the actual selections.
//!
//! Both depend on the forward only, so their score gradients are computed there and kept.

use super::{add_into, Grads};
use crate::config::ScoringFunc;
use crate::exec::Exec;
use crate::experts::{ExpertCall, ExpertTape};
use crate::moe::{top_k_indices, Moe, Routing};

/// Coefficients of the balance losses (0 disables one).
#[derive(Clone, Copy, Debug, Default)]
pub struct Balance {
    pub seq_alpha: f32,
    pub batch_alpha: f32,
}

/// The routed expert a checkpoint tensor belongs to (`…mlp.experts.{e}.…`).
pub fn routed_expert(name: &str) -> Option<usize> {
    name.split(".mlp.experts.").nth(1)?.split('.').next()?.parse().ok()
}

/// The process holding routed expert `e` of `experts` over `ranks`: contiguous blocks, as DeepEP
/// and the static inference placement.
pub fn expert_owner(e: usize, experts: usize, ranks: usize) -> usize {
    dsv3_dist::dispatch::owner(e, experts, ranks)
}

/// What [`Moe::backward`] needs from [`Moe::forward`].
pub struct MoeSaved {
    x: Vec<f32>,
    n: usize,
    /// `[n, E]` router scores (sigmoid or softmax of the logits).
    scores: Vec<f32>,
    routing: Routing,
    /// The dispatcher's own (where the experts ran).
    experts: Option<ExpertTape>,
    /// `[n, E]` gradient of the balance losses with respect to the scores ([`MoeSaved::balance`]).
    d_scores_balance: Vec<f32>,
}

/// What a MoE layer reports per step.
#[derive(Clone, Debug, Default)]
pub struct MoeStats {
    /// Tokens routed to each expert (the actual selections: bias and group limit applied).
    pub load: Vec<usize>,
    /// The balance losses' value (already scaled by their α).
    pub balance_loss: f64,
    /// A digest of every token's experts (changes when any routing does).
    pub digest: u64,
}

impl MoeSaved {
    pub(crate) fn new(x: &[f32], n: usize, scores: Vec<f32>, routing: Routing, experts: Option<ExpertTape>) -> Self {
        let d_scores_balance = vec![0f32; scores.len()];
        MoeSaved { x: x.to_vec(), n, scores, routing, experts, d_scores_balance }
    }

    /// The step's expert loads and balance losses over `seqs` sequences of `t` tokens; the
    /// losses' score gradients are kept for the backward (they depend on the forward only).
    pub fn balance(&mut self, seqs: usize, t: usize, bal: Balance) -> MoeStats {
        let e = self.scores.len() / self.n.max(1);
        let mut load = vec![0usize; e];
        self.routing.experts.iter().for_each(|&i| load[i] += 1);
        let (balance_loss, d, seq_top_k) = balance_losses(&self.scores, &load, seqs, t, self.routing.k, bal);
        self.d_scores_balance = d;
        let digest = self.routing.experts.iter().fold(seq_top_k, |h, &i| h.wrapping_mul(0x100000001b3) ^ i as u64);
        MoeStats { load, balance_loss, digest }
    }
}

impl Moe {
    /// Parameter gradients under `{name}.*` (`gate.weight`, `experts.{i}.*`, `shared_experts.*`);
    /// returns `dx`.
    pub fn backward(&self, cx: &Exec, name: &str, s: &MoeSaved, dy: &[f32], g: &mut Grads) -> crate::Result<Vec<f32>> {
        let (n, e, k) = (s.n, self.experts.len(), s.routing.k);
        let d = dy.len() / n.max(1);
        let r = &self.gate;
        let tape =
            s.experts.as_ref().ok_or_else(|| crate::ModelError::Input("the forward kept no expert tape".into()))?;
        let call = ExpertCall { moe: self, layer: self.index, x: &s.x, routing: &s.routing };
        let grads = cx.experts.backward(cx, call, name, tape, dy, g)?;
        let (mut dx, d_w) = (grads.dx, grads.d_gate);
        // Gate weights → scores: w_k = c·s_k / Z (Z = Σ_selected s when normalized, else 1).
        let mut d_scores = s.d_scores_balance.clone();
        for i in 0..n {
            let sel = &s.routing.experts[i * k..(i + 1) * k];
            let sc = &s.scores[i * e..(i + 1) * e];
            let dwi = &d_w[i * k..(i + 1) * k];
            let ds = &mut d_scores[i * e..(i + 1) * e];
            if r.norm_topk_prob {
                let z: f32 = sel.iter().map(|&j| sc[j]).sum::<f32>() + 1e-20;
                let dot: f32 = sel.iter().zip(dwi).map(|(&j, &dw)| dw * sc[j]).sum();
                for (&j, &dw) in sel.iter().zip(dwi) {
                    ds[j] += r.scale * (dw / z - dot / (z * z));
                }
            } else {
                for (&j, &dw) in sel.iter().zip(dwi) {
                    ds[j] += r.scale * dw;
                }
            }
        }
        // Scores → logits.
        let mut d_logits = d_scores;
        for (dl, sc) in d_logits.chunks_exact_mut(e).zip(s.scores.chunks_exact(e)) {
            match r.scoring {
                ScoringFunc::Sigmoid => dl.iter_mut().zip(sc).for_each(|(g, &p)| *g *= p * (1.0 - p)),
                ScoringFunc::Softmax => {
                    let dot: f32 = dl.iter().zip(sc).map(|(g, p)| g * p).sum();
                    dl.iter_mut().zip(sc).for_each(|(g, &p)| *g = p * (*g - dot));
                }
            }
        }
        g.weight_grad(cx, format!("{name}.gate.weight"), &d_logits, &s.x, n, e, d, None);
        add_into(&mut dx, &super::input_grad(cx, &r.weight, &d_logits, n));
        Ok(dx)
    }
}

/// Value and score gradient of the balance losses, and a digest of the sequence-wise loss's
/// top-k indicators (a choice of its own: top-k of the unbiased scores).
fn balance_losses(
    scores: &[f32],
    load: &[usize],
    seqs: usize,
    t: usize,
    k: usize,
    bal: Balance,
) -> (f64, Vec<f32>, u64) {
    let n = seqs * t;
    let e = scores.len() / n.max(1);
    let mut grad = vec![0f32; scores.len()];
    let (mut loss, mut digest) = (0f64, 0u64);
    // Adds α·Σ_i f_i·P_i over `tokens` (P over normalized scores) to loss and grad, scaled by w.
    let mut add = |tokens: std::ops::Range<usize>, f: &[f32], alpha: f32, w: f32| {
        let tt = tokens.len() as f32;
        let mut p = vec![0f32; e];
        for i in tokens.clone() {
            let row = &scores[i * e..(i + 1) * e];
            let z: f32 = row.iter().sum::<f32>() + 1e-20;
            row.iter().zip(&mut p).for_each(|(s, p)| *p += s / z / tt);
            // d/ds'_j = α·f_j/T; through s' = s/Z: (g_j − Σ_i g_i·s'_i)/Z.
            let dot: f32 = row.iter().zip(f).map(|(s, f)| alpha * f / tt * s / z).sum();
            for (j, gr) in grad[i * e..(i + 1) * e].iter_mut().enumerate() {
                *gr += w * (alpha * f[j] / tt - dot) / z;
            }
        }
        loss += (w * alpha) as f64 * f.iter().zip(&p).map(|(f, p)| (f * p) as f64).sum::<f64>();
    };
    if bal.seq_alpha > 0.0 {
        for b in 0..seqs {
            let mut f = vec![0f32; e];
            for i in b * t..(b + 1) * t {
                for j in top_k_indices(&scores[i * e..(i + 1) * e], k) {
                    f[j] += e as f32 / (k as f32 * t as f32);
                    digest = digest.wrapping_mul(0x100000001b3) ^ j as u64;
                }
            }
            add(b * t..(b + 1) * t, &f, bal.seq_alpha, 1.0 / seqs as f32);
        }
    }
    if bal.batch_alpha > 0.0 {
        let f: Vec<f32> = load.iter().map(|&c| c as f32 * e as f32 / (k as f32 * n as f32)).collect();
        add(0..n, &f, bal.batch_alpha, 1.0);
    }
    (loss, grad, digest)
}
