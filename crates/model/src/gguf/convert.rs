//! A Hugging Face folder in any stored format dsv3 reads (the official FP8 release included: no
//! bf16 copy on disk) to one GGUF file in the layout llama.cpp's converter writes for `deepseek2`:
//! the split MLA `attn_k_b`/`attn_v_b`, stacked experts, the tokenizer and chat template, and the
//! MTP layer as `nextn` tensors (llama.cpp loads them as its deepseek2 MTP block; its own converter
//! drops them). Streamed a row at a time: memory is one row plus one `kv_b_proj`.

use super::writer::{GgufWriter, TensorSpec};
use super::{Value, MODULES, TOP};
use crate::error::{ModelError, Result};
use crate::weights::Checkpoint;
use crate::Config;
use dsv3_kernels::codec::{f32_to_bf16, f32_to_f16};
use dsv3_kernels::GgmlType;
use std::path::Path;

/// Where an output tensor's rows come from.
enum Src {
    /// A `[rows, cols]` tensor of the checkpoint (1-D: one row).
    Tensor { name: String, rows: usize, cols: usize },
    /// `n` experts' `[rows, cols]` matrices, stacked.
    Experts { names: Vec<String>, rows: usize, cols: usize },
    /// `attn_k_b` (`k == true`, per head `kv_b`'s nope rows transposed) or `attn_v_b` of a layer.
    SplitKv { kv_b: String, k: bool },
}

struct Out {
    spec: TensorSpec,
    src: Src,
}

/// The type a tensor is written in: `ty` for the Linear weights it can hold, else f32 (norms,
/// the routing bias, the router, which llama.cpp keeps in f32 too).
fn out_type(ty: GgmlType, gguf_name: &str, cols: usize, two_d: bool) -> GgmlType {
    if !two_d || gguf_name.contains("ffn_gate_inp") || !cols.is_multiple_of(ty.block_elems()) {
        GgmlType::F32
    } else {
        ty
    }
}

fn plan(cfg: &Config, ck: &Checkpoint, ty: GgmlType) -> Result<Vec<Out>> {
    let mut outs = vec![];
    let mut push = |name: String, dims: Vec<usize>, src: Src| {
        let cols = dims[0];
        let kind = out_type(ty, &name, cols, dims.len() > 1);
        outs.push(Out { spec: TensorSpec { name, dims, kind }, src });
    };
    let shape2 = |name: &str| -> Option<(usize, usize)> {
        match ck.shape(name)? {
            [r, c] => Some((*r, *c)),
            [c] => Some((1, *c)),
            _ => None,
        }
    };
    for (g, hf) in TOP {
        if let Some((rows, cols)) = shape2(hf) {
            let dims = if ck.shape(hf).is_some_and(|s| s.len() == 1) { vec![cols] } else { vec![cols, rows] };
            push(g.into(), dims, Src::Tensor { name: hf.into(), rows, cols });
        }
    }
    let (h, nope, v, r) = (cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank);
    for l in 0..cfg.num_hidden_layers + cfg.num_nextn_predict_layers {
        let p = format!("model.layers.{l}");
        if l >= cfg.num_hidden_layers && !ck.contains(&format!("{p}.eh_proj.weight")) {
            break; // a folder saved without its MTP layer
        }
        for (g, hf) in MODULES {
            if let Some(proj) = hf.strip_prefix("mlp.experts.") {
                let names: Vec<String> =
                    (0..cfg.n_routed_experts).map(|e| format!("{p}.mlp.experts.{e}.{proj}.weight")).collect();
                if let Some((rows, cols)) = names.first().and_then(|n| shape2(n)) {
                    let dims = vec![cols, rows, cfg.n_routed_experts];
                    push(format!("blk.{l}.{g}.weight"), dims, Src::Experts { names, rows, cols });
                }
                continue;
            }
            if hf == "self_attn.kv_b_proj" {
                let kv_b = format!("{p}.{hf}.weight");
                if ck.contains(&kv_b) {
                    push(
                        format!("blk.{l}.attn_k_b.weight"),
                        vec![nope, r, h],
                        Src::SplitKv { kv_b: kv_b.clone(), k: true },
                    );
                    push(format!("blk.{l}.attn_v_b.weight"), vec![r, v, h], Src::SplitKv { kv_b, k: false });
                }
                continue;
            }
            for suffix in ["weight", "bias"] {
                let name = format!("{p}.{hf}.{suffix}");
                if let Some((rows, cols)) = shape2(&name) {
                    let dims = if rows == 1 && ck.shape(&name).is_some_and(|s| s.len() == 1) {
                        vec![cols]
                    } else {
                        vec![cols, rows]
                    };
                    push(format!("blk.{l}.{g}.{suffix}"), dims, Src::Tensor { name, rows, cols });
                }
            }
        }
        let bias = format!("{p}.mlp.gate.e_score_correction_bias");
        if let Some((_, n)) = shape2(&bias) {
            push(format!("blk.{l}.exp_probs_b.bias"), vec![n], Src::Tensor { name: bias, rows: 1, cols: n });
        }
    }
    Ok(outs)
}

fn encode(kind: GgmlType, row: &[f32], out: &mut Vec<u8>) {
    match kind {
        GgmlType::F32 => out.extend(row.iter().flat_map(|v| v.to_le_bytes())),
        GgmlType::F16 => out.extend(row.iter().flat_map(|&v| f32_to_f16(v).to_le_bytes())),
        GgmlType::Bf16 => out.extend(row.iter().flat_map(|&v| f32_to_bf16(v).to_le_bytes())),
        GgmlType::Q8_0 => dsv3_kernels::ggml::quantize::q8_0(row, out),
        k => unreachable!("{k} is not a GGUF output type of convert"),
    }
}

/// The GGUF metadata of `cfg` (and of the folder's tokenizer, when it has one).
fn metadata(cfg: &Config, from: &Path) -> Result<Vec<(String, Value)>> {
    let a = |k: &str| format!("deepseek2.{k}");
    let u = |x: usize| Value::U32(x as u32);
    let mut m = vec![
        ("general.architecture".to_string(), Value::Str("deepseek2".into())),
        ("general.name".into(), Value::Str(from.file_name().map_or("model".into(), |n| n.to_string_lossy().into()))),
        (a("block_count"), u(cfg.num_hidden_layers + cfg.num_nextn_predict_layers)),
        (a("context_length"), u(cfg.max_position_embeddings)),
        (a("embedding_length"), u(cfg.hidden_size)),
        (a("feed_forward_length"), u(cfg.intermediate_size)),
        (a("attention.head_count"), u(cfg.num_attention_heads)),
        (a("attention.head_count_kv"), u(1)),
        (a("rope.freq_base"), Value::F32(cfg.rope_theta as f32)),
        (a("attention.layer_norm_rms_epsilon"), Value::F32(cfg.rms_norm_eps)),
        (a("vocab_size"), u(cfg.vocab_size)),
        (a("leading_dense_block_count"), u(cfg.first_k_dense_replace)),
        (a("attention.kv_lora_rank"), u(cfg.kv_lora_rank)),
        (a("attention.key_length"), u(cfg.kv_lora_rank + cfg.qk_rope_head_dim)),
        (a("attention.value_length"), u(cfg.kv_lora_rank)),
        (a("attention.key_length_mla"), u(cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)),
        (a("attention.value_length_mla"), u(cfg.v_head_dim)),
        (a("expert_feed_forward_length"), u(cfg.moe_intermediate_size)),
        (a("expert_count"), u(cfg.n_routed_experts)),
        (a("expert_shared_count"), u(cfg.n_shared_experts)),
        (a("expert_used_count"), u(cfg.num_experts_per_tok)),
        (a("expert_weights_scale"), Value::F32(cfg.routed_scaling_factor)),
        (a("expert_weights_norm"), Value::Bool(cfg.norm_topk_prob)),
        (a("expert_group_count"), u(cfg.n_group)),
        (a("expert_group_used_count"), u(cfg.topk_group)),
        (a("expert_gating_func"), u(if cfg.scoring_func == crate::config::ScoringFunc::Sigmoid { 2 } else { 1 })),
        (a("rope.dimension_count"), u(cfg.qk_rope_head_dim)),
        (a("nextn_predict_layers"), u(cfg.num_nextn_predict_layers)),
    ];
    if let Some(q) = cfg.q_lora_rank {
        m.push((a("attention.q_lora_rank"), u(q)));
    }
    if let Some(y) = &cfg.yarn {
        m.extend([
            (a("rope.scaling.type"), Value::Str("yarn".into())),
            (a("rope.scaling.factor"), Value::F32(y.factor as f32)),
            (a("rope.scaling.original_context_length"), u(y.original_max_position_embeddings)),
            (a("rope.scaling.yarn_log_multiplier"), Value::F32((0.1 * y.mscale_all_dim) as f32)),
            (a("rope.scaling.yarn_beta_fast"), Value::F32(y.beta_fast as f32)),
            (a("rope.scaling.yarn_beta_slow"), Value::F32(y.beta_slow as f32)),
        ]);
    }
    if let Some(b) = cfg.bos_token_id {
        m.push(("tokenizer.ggml.bos_token_id".into(), Value::U32(b)));
    }
    if let Some(&e) = cfg.eos_token_ids.first() {
        m.push(("tokenizer.ggml.eos_token_id".into(), Value::U32(e)));
    }
    if from.join("tokenizer.json").exists() {
        m.extend(super::tokenizer::to_metadata(from, cfg.vocab_size)?);
    }
    Ok(m)
}

/// What a conversion wrote.
#[derive(Debug, serde::Serialize)]
pub struct GgufReport {
    pub tensors: usize,
    pub bytes_out: u64,
}

/// Converts the folder `from` to the GGUF file `to` with the Linear weights in `ty` (f32, f16,
/// bf16 or q8_0).
pub fn convert(from: &Path, to: &Path, ty: GgmlType) -> Result<GgufReport> {
    if !matches!(ty, GgmlType::F32 | GgmlType::F16 | GgmlType::Bf16 | GgmlType::Q8_0) {
        return Err(ModelError::Input(format!("GGUF output in {ty}: dsv3 writes f32, f16, bf16 or q8_0")));
    }
    if to.exists() {
        return Err(ModelError::Input(format!("{} exists; convert writes a new file", to.display())));
    }
    let cfg = Config::from_file(&from.join("config.json"))?;
    let ck = Checkpoint::open(from)?;
    let block = cfg.quantization.as_ref().map_or([128, 128], |q| q.weight_block_size);
    let outs = plan(&cfg, &ck, ty)?;
    let specs: Vec<TensorSpec> = outs
        .iter()
        .map(|o| TensorSpec { name: o.spec.name.clone(), dims: o.spec.dims.clone(), kind: o.spec.kind })
        .collect();
    let mut w = GgufWriter::create(to, &metadata(&cfg, from)?, &specs)?;
    let mut bytes_out = 0u64;
    let (mut row, mut buf) = (vec![], vec![]);
    for o in &outs {
        let kind = o.spec.kind;
        let mut emit = |w: &mut GgufWriter, row: &[f32]| -> Result<()> {
            buf.clear();
            encode(kind, row, &mut buf);
            bytes_out += buf.len() as u64;
            w.write_part(&buf)
        };
        match &o.src {
            Src::Tensor { name, cols, .. } if o.spec.dims.len() == 1 => emit(&mut w, &ck.f32s(name, &[*cols])?)?,
            Src::Tensor { name, rows, cols } => {
                let m = ck.matrix(name, *rows, *cols, block)?;
                row.resize(*cols, 0.0);
                for r in 0..*rows {
                    m.view().decode_row(r, 0, &mut row);
                    emit(&mut w, &row)?;
                }
            }
            Src::Experts { names, rows, cols } => {
                row.resize(*cols, 0.0);
                for n in names {
                    let m = ck.matrix(n, *rows, *cols, block)?;
                    for r in 0..*rows {
                        m.view().decode_row(r, 0, &mut row);
                        emit(&mut w, &row)?;
                    }
                }
            }
            Src::SplitKv { kv_b, k } => {
                let (h, nope, v, r) = (cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank);
                let kv = ck.matrix(kv_b, h * (nope + v), r, block)?.view().to_f32();
                for hd in 0..h {
                    let head = &kv[hd * (nope + v) * r..][..(nope + v) * r];
                    if *k {
                        // [kv_lora][nope]: row j holds column j of the head's nope rows.
                        for j in 0..r {
                            row.clear();
                            row.extend((0..nope).map(|i| head[i * r + j]));
                            emit(&mut w, &row)?;
                        }
                    } else {
                        for i in 0..v {
                            emit(&mut w, &head[(nope + i) * r..][..r])?;
                        }
                    }
                }
            }
        }
    }
    w.finish()?;
    Ok(GgufReport { tensors: outs.len(), bytes_out })
}
