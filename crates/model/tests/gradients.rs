//! Finite-difference checks of every parameter's gradient (training, issue 3): central differences
//! of the whole loss (LM + MTP + both balance losses) against `train_step`'s backward, on tiny
//! models covering q-LoRA and direct queries, dense and MoE layers, YaRN, shared experts, MTP.

use dsv3_model::exec::Training;
use dsv3_model::grad::model::{LossWeights, Objective};
use dsv3_model::grad::moe::Balance;
use dsv3_model::grad::Grads;
use dsv3_model::init::{write_random_checkpoint, StoreDtype};
use dsv3_model::DeepseekV3;
use rand::{Rng, SeedableRng};
use serde_json::json;

fn tiny(extra: serde_json::Value) -> serde_json::Value {
    let mut c = json!({
        "model_type": "deepseek_v3", "vocab_size": 23, "hidden_size": 16, "intermediate_size": 20,
        "moe_intermediate_size": 6, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 2, "n_shared_experts": 1, "n_routed_experts": 8, "num_experts_per_tok": 2,
        "n_group": 4, "topk_group": 2, "first_k_dense_replace": 1, "moe_layer_freq": 1,
        "q_lora_rank": 8, "kv_lora_rank": 8, "qk_nope_head_dim": 4, "qk_rope_head_dim": 4, "v_head_dim": 6,
        "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid",
        "topk_method": "noaux_tc", "norm_topk_prob": true, "num_nextn_predict_layers": 1,
        "max_position_embeddings": 64, "tie_word_embeddings": false
    });
    for (k, v) in extra.as_object().unwrap() {
        c[k] = v.clone();
    }
    c
}

fn check(case: &str, cfg: serde_json::Value, seqs: usize, t: usize) {
    check_with(case, cfg, seqs, t, Training::default());
}

fn check_with(case: &str, cfg: serde_json::Value, seqs: usize, t: usize, training: Training) {
    check_objective(case, cfg, seqs, t, training, Objective::CrossEntropy(None));
}

/// The losses of [`DeepseekV3::train_step_for`] towards `objective`: a label mask (supervised
/// fine-tuning) or a loss of the labels' log-probabilities (policy gradients).
fn check_objective(
    case: &str,
    cfg: serde_json::Value,
    seqs: usize,
    t: usize,
    training: Training,
    objective: Objective,
) {
    let dir = std::env::temp_dir().join(format!("dsv3-gradcheck-{case}-{}", std::process::id()));
    write_random_checkpoint(&dir, &cfg, StoreDtype::F32, 1).unwrap();
    let mut model = DeepseekV3::load(&dir).unwrap();
    std::fs::remove_dir_all(&dir).ok();
    model.training = training;
    let v = model.config.vocab_size as u32;
    let mut rng = rand::rngs::StdRng::seed_from_u64(2);
    let tokens: Vec<u32> = (0..seqs * (t + 1)).map(|_| rng.gen_range(0..v)).collect();
    let w = LossWeights { mtp_lambda: 0.3, balance: Balance { seq_alpha: 0.05, batch_alpha: 0.05 } };

    let mut g = Grads::default();
    let base = model.train_step_for(&tokens, seqs, t, w, objective, Some(&mut g)).unwrap();
    let cross_entropy = matches!(objective, Objective::CrossEntropy(_));
    assert!(base.balance_loss > 0.0 && base.mtp_losses.is_empty() != cross_entropy, "{case}: every loss term is on");
    assert_eq!(base.indexer_loss > 0.0, model.config.indexer.is_some(), "{case}: the indexer loss is on iff V3.2");
    let names: Vec<(String, usize)> = model.params_mut().into_iter().map(|p| (p.name, p.data.len())).collect();
    let (mut checked, mut skipped) = (0, 0);
    for (name, len) in names {
        // An expert no token reached has no gradient entry: zero.
        let grad = g.get(&name).map_or_else(|| vec![0f32; len], |s| s.to_vec());
        for _ in 0..3 {
            let i = rng.gen_range(0..len);
            // The indexer's head scores pass a ReLU whose kinks a 3e-3 step crosses often.
            let eps = if name.contains(".indexer.") { 3e-4f32 } else { 3e-3 };
            let at = |delta: f32, model: &mut DeepseekV3| {
                let mut ps = model.params_mut();
                ps.iter_mut().find(|p| p.name == name).unwrap().data[i] += delta;
            };
            at(eps, &mut model);
            let plus = model.train_step_for(&tokens, seqs, t, w, objective, None).unwrap();
            at(-2.0 * eps, &mut model);
            let minus = model.train_step_for(&tokens, seqs, t, w, objective, None).unwrap();
            at(eps, &mut model);
            let same = |r: &dsv3_model::grad::model::StepReport| r.choice_digest == base.choice_digest;
            if !same(&plus) || !same(&minus) {
                // The perturbation changed an expert or indexer choice: the loss is not smooth here.
                skipped += 1;
                continue;
            }
            // The indexer's inputs are detached: its loss trains only the indexer, so the main
            // parameters' gradients are those of the rest.
            let objective = |r: &dsv3_model::grad::model::StepReport| match name.contains(".indexer.") {
                true => r.loss,
                false => r.loss - r.indexer_loss,
            };
            let num = (objective(&plus) - objective(&minus)) / (2.0 * eps as f64);
            let ana = grad[i] as f64;
            assert!(
                (num - ana).abs() <= 3e-4 + 3e-2 * ana.abs().max(num.abs()),
                "{case}: d loss / d {name}[{i}]: finite difference {num:.6} vs backward {ana:.6}"
            );
            checked += 1;
        }
    }
    assert!(checked > 10 * skipped.max(1), "{case}: {checked} checked, {skipped} skipped");
}

#[test]
fn gradients_match_finite_differences_q_lora_moe_mtp() {
    check("qlora", tiny(json!({})), 2, 6);
}

#[test]
fn gradients_match_finite_differences_direct_q_yarn_tied() {
    check(
        "direct",
        tiny(json!({
            "q_lora_rank": null, "tie_word_embeddings": true, "n_shared_experts": 0,
            "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4,
                             "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.8}
        })),
        2,
        6,
    );
}

#[test]
fn gradients_match_finite_differences_with_enough_tokens_for_the_gemm_paths() {
    // 2 × 24 tokens: the forward and both backward products of every linear take the GEMM path.
    check("gemm", tiny(json!({})), 2, 24);
}

/// V3.2: the indexer in every layer (MTP included) choosing 3 of up to 8 positions.
fn tiny_v32() -> serde_json::Value {
    tiny(json!({"model_type": "deepseek_v32", "index_n_heads": 4, "index_head_dim": 8, "index_topk": 3}))
}

#[test]
fn gradients_match_finite_differences_v32_sparse_attention_and_indexer_loss() {
    // Sparse training: attention over the chosen positions, the indexer's KL on them.
    check("v32", tiny_v32(), 2, 8);
}

#[test]
fn gradients_match_finite_differences_v32_dense_warmup() {
    // The dense warm-up: attention over every position, the indexer's KL to it.
    check_with("v32-warmup", tiny_v32(), 2, 8, Training { dsa_warmup: true, ..Training::default() });
}

#[test]
fn gradients_match_finite_differences_with_a_label_mask() {
    // Supervised fine-tuning: only some labels are learned (an assistant turn in each sequence).
    let (seqs, t) = (2, 8);
    let labels: Vec<bool> = (0..seqs * t).map(|r| (3..6).contains(&(r % t)) || r % t == 7).collect();
    check_objective("sft-mask", tiny(json!({})), seqs, t, Training::default(), Objective::CrossEntropy(Some(&labels)));
}

#[test]
fn gradients_match_finite_differences_for_a_loss_of_label_log_probs() {
    // Nonlinear in log π, with some labels left out (as GRPO leaves out prompt tokens and pads).
    let (seqs, t) = (2, 6);
    let f = |lp: &[f32]| {
        let c = |r: usize| if r % 4 == 1 { 0.0 } else { 0.3 - 0.1 * (r % 5) as f64 };
        let loss = lp.iter().enumerate().map(|(r, &l)| c(r) * l as f64 + 0.05 * c(r).abs() * (l as f64).powi(2)).sum();
        let d = lp.iter().enumerate().map(|(r, &l)| (c(r) + 0.1 * c(r).abs() * l as f64) as f32).collect();
        (loss, d)
    };
    check_objective("logprob", tiny(json!({})), seqs, t, Training::default(), Objective::LogProb(&f));
}
