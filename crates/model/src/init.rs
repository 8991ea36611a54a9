//! Random checkpoints in the Hugging Face layout, for `dsv3 demo`, benchmarks and tests: every
//! tensor a config implies, with its checkpoint name and shape, filled from a seeded normal
//! (std 1/sqrt(fan_in) for matrices, 1 ± noise for norms), stored as f32, bf16 or FP8 with
//! 128×128 `weight_scale_inv` blocks like the official release.

use crate::config::Config;
use crate::error::Result;
use crate::weights::SafetensorsWriter;
use dsv3_kernels::codec::{f32_to_bf16, f32_to_fp8_e4m3, FP8_E4M3_MAX};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::path::Path;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreDtype {
    F32,
    Bf16,
    Fp8,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// Attention/FFN linear weight: FP8 in an FP8 checkpoint.
    Linear,
    /// Embedding, head, router, eh_proj: bf16 even in an FP8 checkpoint.
    Dense,
    Norm,
    Bias,
}

/// `(name, shape, kind)` of every tensor the config implies, the MTP layers included.
fn tensors(cfg: &Config) -> Vec<(String, Vec<usize>, Kind)> {
    let (d, v, h) = (cfg.hidden_size, cfg.vocab_size, cfg.num_attention_heads);
    let (dn, dr, dv, c) = (cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank);
    let mut t = vec![("model.embed_tokens.weight".to_string(), vec![v, d], Kind::Dense)];
    let mlp = |t: &mut Vec<_>, p: String, inter: usize| {
        t.push((format!("{p}.gate_proj.weight"), vec![inter, d], Kind::Linear));
        t.push((format!("{p}.up_proj.weight"), vec![inter, d], Kind::Linear));
        t.push((format!("{p}.down_proj.weight"), vec![d, inter], Kind::Linear));
    };
    for l in 0..cfg.num_hidden_layers + cfg.num_nextn_predict_layers {
        let p = format!("model.layers.{l}");
        t.push((format!("{p}.input_layernorm.weight"), vec![d], Kind::Norm));
        t.push((format!("{p}.post_attention_layernorm.weight"), vec![d], Kind::Norm));
        let a = format!("{p}.self_attn");
        match cfg.q_lora_rank {
            Some(rq) => {
                t.push((format!("{a}.q_a_proj.weight"), vec![rq, d], Kind::Linear));
                t.push((format!("{a}.q_a_layernorm.weight"), vec![rq], Kind::Norm));
                t.push((format!("{a}.q_b_proj.weight"), vec![h * (dn + dr), rq], Kind::Linear));
            }
            None => t.push((format!("{a}.q_proj.weight"), vec![h * (dn + dr), d], Kind::Linear)),
        }
        t.push((format!("{a}.kv_a_proj_with_mqa.weight"), vec![c + dr, d], Kind::Linear));
        t.push((format!("{a}.kv_a_layernorm.weight"), vec![c], Kind::Norm));
        t.push((format!("{a}.kv_b_proj.weight"), vec![h * (dn + dv), c], Kind::Linear));
        t.push((format!("{a}.o_proj.weight"), vec![d, h * dv], Kind::Linear));
        if let (Some(ix), Some(rq)) = (cfg.indexer, cfg.q_lora_rank) {
            // As the V3.2 release: wq_b and wk FP8 in an FP8 checkpoint, weights_proj bf16.
            let i = format!("{a}.indexer");
            t.push((format!("{i}.wq_b.weight"), vec![ix.n_heads * ix.head_dim, rq], Kind::Linear));
            t.push((format!("{i}.wk.weight"), vec![ix.head_dim, d], Kind::Linear));
            t.push((format!("{i}.k_norm.weight"), vec![ix.head_dim], Kind::Norm));
            t.push((format!("{i}.k_norm.bias"), vec![ix.head_dim], Kind::Bias));
            t.push((format!("{i}.weights_proj.weight"), vec![ix.n_heads, d], Kind::Dense));
        }
        if cfg.is_moe_layer(l) {
            let e = cfg.n_routed_experts;
            t.push((format!("{p}.mlp.gate.weight"), vec![e, d], Kind::Dense));
            if cfg.topk_method == crate::config::TopkMethod::NoauxTc {
                t.push((format!("{p}.mlp.gate.e_score_correction_bias"), vec![e], Kind::Bias));
            }
            for i in 0..e {
                mlp(&mut t, format!("{p}.mlp.experts.{i}"), cfg.moe_intermediate_size);
            }
            if cfg.n_shared_experts > 0 {
                mlp(&mut t, format!("{p}.mlp.shared_experts"), cfg.moe_intermediate_size * cfg.n_shared_experts);
            }
        } else {
            mlp(&mut t, format!("{p}.mlp"), cfg.intermediate_size);
        }
        if l >= cfg.num_hidden_layers {
            t.push((format!("{p}.enorm.weight"), vec![d], Kind::Norm));
            t.push((format!("{p}.hnorm.weight"), vec![d], Kind::Norm));
            t.push((format!("{p}.eh_proj.weight"), vec![d, 2 * d], Kind::Dense));
            t.push((format!("{p}.shared_head.norm.weight"), vec![d], Kind::Norm));
        }
    }
    t.push(("model.norm.weight".into(), vec![d], Kind::Norm));
    if !cfg.tie_word_embeddings {
        t.push(("lm_head.weight".into(), vec![v, d], Kind::Dense));
    }
    t
}

fn normal(rng: &mut StdRng) -> f32 {
    // Box–Muller.
    let (u1, u2): (f32, f32) = (rng.gen_range(1e-7..1.0), rng.gen());
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
}

/// f32 → E4M3 through a table indexed by the value's bf16 bits (random init only: the double
/// rounding is harmless there and the table makes a 1B-parameter checkpoint quick to write).
fn fp8_table() -> Vec<u8> {
    (0..=u16::MAX).map(|b| f32_to_fp8_e4m3(dsv3_kernels::codec::bf16_to_f32(b))).collect()
}

/// Writes `config.json` and `model.safetensors` of a random model into `dir`.
pub fn write_random_checkpoint(
    dir: &Path,
    config_json: &serde_json::Value,
    dtype: StoreDtype,
    seed: u64,
) -> Result<Config> {
    write_init(dir, config_json, dtype, seed, Init::Bench)
}

/// A training start (f32): matrices N(0, std²) (`None`: 1/√fan_in), norms exactly 1, routing biases
/// 0. The report uses std 0.006 at full width.
pub fn write_training_init(dir: &Path, config_json: &serde_json::Value, seed: u64, std: Option<f32>) -> Result<Config> {
    write_init(dir, config_json, StoreDtype::F32, seed, Init::Train { std })
}

#[derive(Clone, Copy)]
enum Init {
    /// Norms 1 ± 0.1 and biases ±0.1, so every code path sees non-trivial values.
    Bench,
    Train {
        std: Option<f32>,
    },
}

fn write_init(dir: &Path, config_json: &serde_json::Value, dtype: StoreDtype, seed: u64, init: Init) -> Result<Config> {
    let mut cj = crate::config::with_architectures(config_json);
    if dtype == StoreDtype::Fp8 {
        cj["quantization_config"] = serde_json::json!({
            "activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]
        });
    }
    let cfg = Config::from_json(&cj)?;
    std::fs::create_dir_all(dir).map_err(|e| crate::error::ModelError::io(dir, e))?;
    let cpath = dir.join("config.json");
    std::fs::write(&cpath, serde_json::to_string_pretty(&cj).expect("JSON"))
        .map_err(|e| crate::error::ModelError::io(&cpath, e))?;
    let mut rng = StdRng::seed_from_u64(seed);
    let table = if dtype == StoreDtype::Fp8 { fp8_table() } else { vec![] };
    // The header first, then each tensor as it is drawn: one tensor in memory at a time.
    let entries: Vec<(String, &str, Vec<usize>, usize)> =
        tensors(&cfg).into_iter().flat_map(|(name, shape, kind)| stored_as(name, shape, kind, dtype)).collect();
    let mut file = SafetensorsWriter::create(&dir.join("model.safetensors"), &entries)?;
    for (name, shape, kind) in tensors(&cfg) {
        let mut out: Vec<(String, &str, Vec<usize>, Vec<u8>)> = vec![];
        let n: usize = shape.iter().product();
        let fan_in_std = 1.0 / (*shape.last().expect("shape") as f32).sqrt();
        let (std, noise) = match init {
            Init::Bench => (fan_in_std, 0.1),
            Init::Train { std } => (std.unwrap_or(fan_in_std), 0.0),
        };
        let vals: Vec<f32> = match kind {
            Kind::Linear | Kind::Dense => (0..n).map(|_| normal(&mut rng) * std).collect(),
            Kind::Norm => (0..n).map(|_| 1.0 + noise * normal(&mut rng)).collect(),
            Kind::Bias => (0..n).map(|_| noise * normal(&mut rng)).collect(),
        };
        match (dtype, kind) {
            (_, Kind::Bias) | (StoreDtype::F32, _) => {
                out.push((name, "F32", shape, vals.iter().flat_map(|v| v.to_le_bytes()).collect()))
            }
            (StoreDtype::Fp8, Kind::Linear) => {
                let (rows, cols) = (shape[0], shape[1]);
                let (nb0, nb1) = (rows.div_ceil(128), cols.div_ceil(128));
                let mut scale = vec![0f32; nb0 * nb1];
                for r in 0..rows {
                    for c in 0..cols {
                        let s = &mut scale[(r / 128) * nb1 + c / 128];
                        *s = s.max(vals[r * cols + c].abs() / FP8_E4M3_MAX);
                    }
                }
                let q: Vec<u8> = (0..rows * cols)
                    .map(|i| {
                        let s = scale[(i / cols / 128) * nb1 + (i % cols) / 128].max(1e-12);
                        table[f32_to_bf16(vals[i] / s) as usize]
                    })
                    .collect();
                out.push((
                    format!("{name}_scale_inv"),
                    "F32",
                    vec![nb0, nb1],
                    scale.iter().flat_map(|v| v.to_le_bytes()).collect(),
                ));
                out.push((name, "F8_E4M3", shape, q));
            }
            _ => out.push((name, "BF16", shape, vals.iter().flat_map(|&v| f32_to_bf16(v).to_le_bytes()).collect())),
        }
        for (_, _, _, bytes) in out {
            file.write(&bytes)?;
        }
    }
    file.finish()?;
    Ok(cfg)
}

/// The safetensors entries (name, dtype, shape, bytes) `write_init` stores a tensor as.
fn stored_as(
    name: String,
    shape: Vec<usize>,
    kind: Kind,
    dtype: StoreDtype,
) -> Vec<(String, &'static str, Vec<usize>, usize)> {
    let n: usize = shape.iter().product();
    match (dtype, kind) {
        (_, Kind::Bias) | (StoreDtype::F32, _) => vec![(name, "F32", shape, 4 * n)],
        (StoreDtype::Fp8, Kind::Linear) => {
            let scales = vec![shape[0].div_ceil(128), shape[1].div_ceil(128)];
            let s = 4 * scales[0] * scales[1];
            vec![(format!("{name}_scale_inv"), "F32", scales, s), (name, "F8_E4M3", shape, n)]
        }
        _ => vec![(name, "BF16", shape, 2 * n)],
    }
}

/// Named model shapes.
pub fn preset(name: &str) -> Option<serde_json::Value> {
    let base = |hidden: usize, layers: usize, experts: usize, moe_inter: usize, top_k: usize, heads: usize| {
        serde_json::json!({
            "model_type": "deepseek_v3", "vocab_size": 32000, "hidden_size": hidden, "intermediate_size": hidden * 3,
            "moe_intermediate_size": moe_inter, "num_hidden_layers": layers, "num_nextn_predict_layers": 1,
            "num_attention_heads": heads, "num_key_value_heads": heads, "q_lora_rank": hidden * 3 / 8, "kv_lora_rank": hidden / 4,
            "qk_nope_head_dim": 64, "qk_rope_head_dim": 32, "v_head_dim": 64, "n_routed_experts": experts,
            "n_shared_experts": 1, "num_experts_per_tok": top_k, "n_group": 8, "topk_group": 4,
            "topk_method": "noaux_tc", "scoring_func": "sigmoid", "norm_topk_prob": true,
            "routed_scaling_factor": 2.5, "first_k_dense_replace": 1, "moe_layer_freq": 1, "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0, "max_position_embeddings": 4096, "bos_token_id": 0, "eos_token_id": 1,
            "tie_word_embeddings": false
        })
    };
    match name {
        // The bench shape of issue 2: DeepSeek-V3 scaled to ~1B parameters, with the real
        // DeepSeek-V3 vocabulary (129,280 ids; its 1024-wide head and embedding add ~0.26B).
        "bench-1b" => {
            let mut v = base(1024, 12, 64, 512, 6, 16);
            v["vocab_size"] = serde_json::json!(129280);
            Some(v)
        }
        // bench-1b as DeepSeek-V3.2: the lightning indexer in every layer (the release's 64 × 128
        // heads scaled with the width) choosing 2048 positions, and a context for long prompts.
        "bench-1b-v32" => {
            let mut v = preset("bench-1b")?;
            v32(&mut v, 16, 64, 2048);
            v["max_position_embeddings"] = serde_json::json!(32768);
            Some(v)
        }
        // The same with the 32,000-id vocabulary of the first benchmarks (history).
        "bench-1b-32k" => Some(base(1024, 12, 64, 512, 6, 16)),
        "tiny" => {
            let mut v = base(256, 4, 16, 128, 4, 4);
            v["vocab_size"] = serde_json::json!(2048);
            v["q_lora_rank"] = serde_json::json!(96);
            v["kv_lora_rank"] = serde_json::json!(64);
            v["n_group"] = serde_json::json!(4);
            v["num_key_value_heads"] = serde_json::json!(4);
            v["topk_group"] = serde_json::json!(2);
            Some(v)
        }
        // tiny as DeepSeek-V3.2, choosing 64 positions (sparse from the 65th token on).
        "tiny-v32" => {
            let mut v = preset("tiny")?;
            v32(&mut v, 16, 32, 64);
            Some(v)
        }
        _ => None,
    }
}

/// Makes a V3 config V3.2: `model_type deepseek_v32` and an indexer of `heads × dim` choosing
/// `topk` positions.
fn v32(v: &mut serde_json::Value, heads: usize, dim: usize, topk: usize) {
    v["model_type"] = serde_json::json!("deepseek_v32");
    v["index_n_heads"] = serde_json::json!(heads);
    v["index_head_dim"] = serde_json::json!(dim);
    v["index_topk"] = serde_json::json!(topk);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_checkpoints_load_in_every_format() {
        for dtype in [StoreDtype::F32, StoreDtype::Bf16, StoreDtype::Fp8] {
            let dir = std::env::temp_dir().join(format!("dsv3-init-{dtype:?}-{}", std::process::id()));
            let cfg = write_random_checkpoint(&dir, &preset("tiny").unwrap(), dtype, 1).unwrap();
            let m = crate::DeepseekV3::load(&dir).unwrap();
            assert_eq!(m.mtp.len(), cfg.num_nextn_predict_layers);
            let mut cache = m.new_cache();
            let h = m.forward(&[1, 2, 3], &mut cache).unwrap();
            assert!(m.logits(&h, 3).iter().all(|x| x.is_finite()));
            std::fs::remove_dir_all(&dir).unwrap();
        }
    }
}
