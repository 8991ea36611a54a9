//! DeepSeekMoE (spec §1 "FFN, MoE layers", pitfalls 6–9): an f32 router with group-limited top-k,
//! routed SwiGLU experts and the always-on shared expert.

use crate::config::{Config, ScoringFunc, TopkMethod};
use crate::error::Result;
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

    /// `x [t, D]` → the experts of each token.
    pub fn route(&self, x: &[f32], t: usize) -> Routing {
        let e = self.weight.rows;
        let mut logits = vec![0f32; t * e];
        matmul_nt(&self.weight.view(), 0..e, x, t, &mut logits);
        let mut r = Routing {
            experts: Vec::with_capacity(t * self.top_k),
            weights: Vec::with_capacity(t * self.top_k),
            k: self.top_k,
        };
        for row in logits.chunks_exact(e) {
            let scores: Vec<f32> = match self.scoring {
                ScoringFunc::Sigmoid => row.iter().map(|&l| 1.0 / (1.0 + (-l).exp())).collect(),
                ScoringFunc::Softmax => {
                    let mut s = row.to_vec();
                    dsv3_kernels::attention::softmax_in_place(&mut s);
                    s
                }
            };
            let (idx, w) = self.select(&scores);
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

/// Routed experts computed across processes (expert parallelism; [`crate::expert_service`] over
/// a transport the CLI supplies). Given this MoE layer's inputs and routing, returns the routed
/// expert's output for every (token, slot) pair, `[t·k, D]` in pair order, running `during`
/// (the shared expert) while they are computed elsewhere. Expert outputs do not depend on which
/// pairs share a call, so the result is the same wherever a pair runs.
pub trait ExpertParallel: Send + Sync {
    fn expert_outputs(
        &self,
        moe: usize,
        x: &[f32],
        d: usize,
        experts: &[usize],
        k: usize,
        during: &mut dyn FnMut(),
    ) -> Vec<f32>;
}

#[derive(Clone)]
pub struct Moe {
    pub gate: Router,
    pub experts: Vec<Mlp>,
    pub shared_experts: Option<Mlp>,
    /// Set for expert-parallel inference (this layer's index among the MoE layers, and the
    /// transport); `None` computes every expert here.
    pub ep: Option<(usize, std::sync::Arc<dyn ExpertParallel>)>,
    /// Set for expert-parallel training: the routed experts this process does not own are not
    /// held ([`crate::grad::moe::expert_owner`]).
    pub ep_train: Option<crate::grad::moe::Exchanges>,
}

impl Moe {
    pub fn load(ck: &Checkpoint, p: &str, cfg: &Config, block: [usize; 2]) -> Result<Self> {
        let (d, inter) = (cfg.hidden_size, cfg.moe_intermediate_size);
        let experts = (0..cfg.n_routed_experts)
            .map(|i| Mlp::load(ck, &format!("{p}.experts.{i}"), d, inter, block))
            .collect::<Result<_>>()?;
        let shared_experts = match cfg.n_shared_experts {
            0 => None,
            n => Some(Mlp::load(ck, &format!("{p}.shared_experts"), d, inter * n, block)?),
        };
        Ok(Moe {
            gate: Router::load(ck, &format!("{p}.gate"), cfg, block)?,
            experts,
            shared_experts,
            ep: None,
            ep_train: None,
        })
    }

    /// `x [t, D]` → `[t, D]`. Tokens are grouped by expert so each expert's weights are read once
    /// for all the tokens routed to it.
    pub fn forward(&self, x: &[f32], t: usize) -> (Vec<f32>, Routing) {
        let d = x.len() / t.max(1);
        let routing = self.gate.route(x, t);
        if let Some((id, ep)) = &self.ep {
            return (self.forward_parallel(*id, ep.as_ref(), x, t, &routing), routing);
        }
        let mut per_expert: Vec<Vec<(usize, f32)>> = vec![vec![]; self.experts.len()];
        for (j, (&e, &w)) in routing.experts.iter().zip(&routing.weights).enumerate() {
            per_expert[e].push((j / routing.k, w));
        }
        let active: Vec<(usize, &Vec<(usize, f32)>)> =
            per_expert.iter().enumerate().filter(|(_, v)| !v.is_empty()).collect();
        let inputs: Vec<Vec<f32>> = active
            .iter()
            .map(|(_, toks)| toks.iter().flat_map(|&(i, _)| x[i * d..(i + 1) * d].iter().copied()).collect())
            .collect();
        let mut calls: Vec<(&Mlp, &[f32], usize)> =
            active.iter().zip(&inputs).map(|(&(e, toks), xe)| (&self.experts[e], xe.as_slice(), toks.len())).collect();
        if let Some(s) = &self.shared_experts {
            calls.push((s, x, t));
        }
        let mut ys = Mlp::forward_many(&calls);
        let mut out = match self.shared_experts {
            Some(_) => ys.pop().unwrap_or_default(),
            None => vec![0f32; t * d],
        };
        for ((_, toks), ye) in active.iter().zip(&ys) {
            for (row, &(i, w)) in ye.chunks_exact(d).zip(toks.iter()) {
                out[i * d..(i + 1) * d].iter_mut().zip(row).for_each(|(o, y)| *o += w * y);
            }
        }
        (out, routing)
    }

    /// The routed experts' outputs for the (token, slot) `pairs` of `experts [t, k]`, in `pairs`
    /// order: each expert runs once over its pairs' tokens.
    pub fn expert_rows(&self, x: &[f32], d: usize, experts: &[usize], k: usize, pairs: &[usize]) -> Vec<f32> {
        let mut per_expert: Vec<Vec<usize>> = vec![vec![]; self.experts.len()];
        for (i, &j) in pairs.iter().enumerate() {
            per_expert[experts[j]].push(i);
        }
        let active: Vec<(usize, &Vec<usize>)> = per_expert.iter().enumerate().filter(|(_, v)| !v.is_empty()).collect();
        let inputs: Vec<Vec<f32>> = active
            .iter()
            .map(|(_, is)| {
                is.iter().flat_map(|&i| x[(pairs[i] / k) * d..(pairs[i] / k + 1) * d].iter().copied()).collect()
            })
            .collect();
        let calls: Vec<(&Mlp, &[f32], usize)> =
            active.iter().zip(&inputs).map(|(&(e, is), xe)| (&self.experts[e], xe.as_slice(), is.len())).collect();
        let ys = Mlp::forward_many(&calls);
        let mut out = vec![0f32; pairs.len() * d];
        for ((_, is), y) in active.iter().zip(&ys) {
            for (&i, row) in is.iter().zip(y.chunks_exact(d)) {
                out[i * d..(i + 1) * d].copy_from_slice(row);
            }
        }
        out
    }

    /// [`Moe::forward`] with the routed experts computed across processes: the same sums in the
    /// same order (shared expert first, then each token's experts by ascending id), so the result
    /// is bit-identical to one process.
    fn forward_parallel(&self, id: usize, ep: &dyn ExpertParallel, x: &[f32], t: usize, routing: &Routing) -> Vec<f32> {
        let d = x.len() / t.max(1);
        let k = routing.k;
        let mut out = vec![0f32; t * d];
        // The shared expert runs while the routed pairs travel.
        let all = ep.expert_outputs(id, x, d, &routing.experts, k, &mut || {
            if let Some(s) = &self.shared_experts {
                out = s.forward(x, t);
            }
        });
        for i in 0..t {
            let mut js: Vec<usize> = (i * k..(i + 1) * k).collect();
            js.sort_by_key(|&j| routing.experts[j]);
            for j in js {
                let w = routing.weights[j];
                out[i * d..(i + 1) * d].iter_mut().zip(&all[j * d..(j + 1) * d]).for_each(|(o, y)| *o += w * y);
            }
        }
        out
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
