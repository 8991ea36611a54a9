//! DeepSeekMoE (spec §1 "FFN, MoE layers", pitfalls 6–9): an f32 router with group-limited top-k,
//! routed SwiGLU experts and the always-on shared expert.

use crate::config::{Config, ScoringFunc, TopkMethod};
use crate::error::Result;
use crate::exec::Exec;
use crate::experts::ExpertCall;
use crate::layers::Mlp;
use crate::weights::{Checkpoint, Matrix};
use dsv3_kernels::matmul::matmul_nt;

/// Top-k experts and their weights for each token.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Routing {
    /// `[tokens, k]`
    pub experts: Vec<usize>,
    /// `[tokens, k]`, unbiased scores (normalized when configured) × `routed_scaling_factor`.
    pub weights: Vec<f32>,
    pub k: usize,
}

#[derive(Clone)]
pub struct Router {
    /// `mlp.gate.weight [E, D]`.
    pub weight: Matrix,
    /// `e_score_correction_bias [E]`: added for selection only (V3).
    pub e_score_correction_bias: Option<Vec<f32>>,
    pub(crate) scoring: ScoringFunc,
    pub(crate) method: TopkMethod,
    pub(crate) top_k: usize,
    pub(crate) n_group: usize,
    pub(crate) topk_group: usize,
    pub(crate) norm_topk_prob: bool,
    pub(crate) scale: f32,
}

impl Router {
    pub fn load(ck: &Checkpoint, p: &str, cfg: &Config, block: [usize; 2]) -> Result<Self> {
        let e = cfg.n_routed_experts;
        let bias_name = format!("{p}.e_score_correction_bias");
        let e_score_correction_bias =
            if cfg.topk_method == TopkMethod::NoauxTc { Some(ck.f32s(&bias_name, &[e])?) } else { None };
        Ok(Router {
            weight: ck.matrix(&format!("{p}.weight"), e, cfg.hidden_size, block)?,
            e_score_correction_bias,
            scoring: cfg.scoring_func,
            method: cfg.topk_method,
            top_k: cfg.num_experts_per_tok,
            n_group: cfg.n_group,
            topk_group: cfg.topk_group,
            norm_topk_prob: cfg.norm_topk_prob,
            scale: cfg.routed_scaling_factor,
        })
    }

    /// `x [t, D]` → the router's scores `[t, E]` (sigmoid or softmax of the logits, f32).
    pub fn scores(&self, cx: &Exec, x: &[f32], t: usize) -> Vec<f32> {
        let e = self.weight.rows;
        let mut scores = vec![0f32; t * e];
        matmul_nt(&self.weight.view(), 0..e, x, t, &mut scores, cx.gemm);
        for row in scores.chunks_exact_mut(e) {
            match self.scoring {
                ScoringFunc::Sigmoid => row.iter_mut().for_each(|v| *v = 1.0 / (1.0 + (-*v).exp())),
                ScoringFunc::Softmax => dsv3_kernels::attention::softmax_in_place(row),
            }
        }
        scores
    }

    /// The experts of each token for scores `[t, E]`.
    pub fn route(&self, scores: &[f32]) -> Routing {
        let e = self.weight.rows;
        let mut r = Routing {
            experts: Vec::with_capacity(scores.len() / e.max(1) * self.top_k),
            weights: vec![],
            k: self.top_k,
        };
        for row in scores.chunks_exact(e) {
            let (idx, w) = self.select(row);
            r.experts.extend(idx);
            r.weights.extend(w);
        }
        r
    }

    /// Group-limited top-k over one token's scores.
    pub(crate) fn select(&self, scores: &[f32]) -> (Vec<usize>, Vec<f32>) {
        let e = scores.len();
        let mut choice: Vec<f32> = match &self.e_score_correction_bias {
            Some(b) => scores.iter().zip(b).map(|(s, b)| s + b).collect(),
            None => scores.to_vec(),
        };
        if self.method != TopkMethod::Greedy && self.n_group > 1 {
            let per = e / self.n_group;
            let group_score: Vec<f32> = choice
                .chunks_exact(per)
                .map(|g| match self.method {
                    // V3: sum of the group's top-2 (biased) scores.
                    TopkMethod::NoauxTc => top_k_indices(g, 2).iter().map(|&i| g[i]).sum(),
                    // V2: the group's best score.
                    _ => g.iter().copied().fold(f32::NEG_INFINITY, f32::max),
                })
                .collect();
            let keep = top_k_indices(&group_score, self.topk_group);
            for (gi, g) in choice.chunks_exact_mut(per).enumerate() {
                if !keep.contains(&gi) {
                    g.fill(f32::NEG_INFINITY);
                }
            }
        }
        let idx = top_k_indices(&choice, self.top_k);
        let mut w: Vec<f32> = idx.iter().map(|&i| scores[i]).collect();
        if self.norm_topk_prob {
            let z: f32 = w.iter().sum::<f32>() + 1e-20;
            w.iter_mut().for_each(|v| *v /= z);
        }
        w.iter_mut().for_each(|v| *v *= self.scale);
        (idx, w)
    }
}

/// Indices of the k largest values, largest first (ties: lower index first).
pub fn top_k_indices(v: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&a, &b| v[b].partial_cmp(&v[a]).unwrap_or(std::cmp::Ordering::Equal).then(a.cmp(&b)));
    idx.truncate(k);
    idx
}

/// A MoE FFN: the router, the routed experts and the always-on shared expert. Where the routed
/// experts run is not the layer's business: its forward hands them to [`Exec::experts`].
#[derive(Clone)]
pub struct Moe {
    pub gate: Router,
    pub experts: Vec<Mlp>,
    pub shared_experts: Option<Mlp>,
    /// This layer's place among the model's MoE layers (main layers first, then MTP blocks):
    /// how a dispatcher names it to other processes.
    pub index: usize,
}

impl Moe {
    pub fn load(ck: &Checkpoint, p: &str, cfg: &Config, block: [usize; 2], index: usize) -> Result<Self> {
        let (d, inter) = (cfg.hidden_size, cfg.moe_intermediate_size);
        let experts = (0..cfg.n_routed_experts)
            .map(|i| Mlp::load(ck, &format!("{p}.experts.{i}"), d, inter, block))
            .collect::<Result<_>>()?;
        let shared_experts = match cfg.n_shared_experts {
            0 => None,
            n => Some(Mlp::load(ck, &format!("{p}.shared_experts"), d, inter * n, block)?),
        };
        Ok(Moe { gate: Router::load(ck, &format!("{p}.gate"), cfg, block)?, experts, shared_experts, index })
    }

    /// `x [t, D]` → `[t, D]`: route, then the routed and shared experts through the dispatcher.
    /// With `tape`, what [`Moe::backward`] needs is kept there.
    pub fn forward(
        &self,
        cx: &Exec,
        x: &[f32],
        t: usize,
        tape: Option<&mut Option<crate::grad::moe::MoeSaved>>,
    ) -> Result<(Vec<f32>, Routing)> {
        let scores = self.gate.scores(cx, x, t);
        let routing = self.gate.route(&scores);
        let call = ExpertCall { moe: self, layer: self.index, x, routing: &routing };
        let out = cx.experts.forward(cx, call, tape.is_some())?;
        if let Some(tape) = tape {
            *tape = Some(crate::grad::moe::MoeSaved::new(x, t, scores, routing.clone(), out.tape));
        }
        Ok((out.out, routing))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router(method: TopkMethod, n_group: usize, topk_group: usize, k: usize, bias: Option<Vec<f32>>) -> Router {
        Router {
            weight: Matrix::from_f32(1, 1, vec![0.0]),
            e_score_correction_bias: bias,
            scoring: ScoringFunc::Sigmoid,
            method,
            top_k: k,
            n_group,
            topk_group,
            norm_topk_prob: true,
            scale: 2.5,
        }
    }

    #[test]
    fn group_limited_selection_uses_top2_sums_and_unbiased_weights() {
        // 4 groups of 2. Biased scores: group sums g0 = .9+.1, g1 = .6+.6, g2 = .95+0, g3 = .2+.2.
        let scores = vec![0.9, 0.1, 0.6, 0.6, 0.95, 0.0, 0.2, 0.2];
        let r = router(TopkMethod::NoauxTc, 4, 2, 3, Some(vec![0.0; 8]));
        let (idx, w) = r.select(&scores);
        // Kept groups: g1 (1.2) and g0 (1.0); g2's single 0.95 loses to both sums.
        assert_eq!(idx, vec![0, 2, 3]);
        let z = 0.9 + 0.6 + 0.6;
        assert!((w[0] - 0.9 / z * 2.5).abs() < 1e-6);

        // A bias changes the selection but not the weights.
        let mut bias = vec![0.0; 8];
        bias[7] = 5.0;
        let r = router(TopkMethod::NoauxTc, 4, 2, 3, Some(bias));
        let (idx, w) = r.select(&scores);
        // Group 3 now leads (0.2 + 5.2) and group 1 (1.2) beats group 0 (1.0).
        assert_eq!(idx, vec![7, 2, 3]);
        let z = 0.2 + 0.6 + 0.6;
        assert!((w[0] - 0.2 / z * 2.5).abs() < 1e-6);
    }

    #[test]
    fn negative_biased_scores_are_masked_with_minus_infinity() {
        // All biased scores negative: a 0 mask would let masked experts win (pitfall 7).
        let scores = vec![0.1, 0.2, 0.3, 0.4];
        let r = router(TopkMethod::NoauxTc, 2, 1, 2, Some(vec![-1.0; 4]));
        let (idx, _) = r.select(&scores);
        assert_eq!(idx, vec![3, 2]);
    }
}
