//! A Hugging Face folder in any stored format dsv3 reads (the official FP8 release included: no
//! bf16 copy on disk) to one GGUF file in the layout llama.cpp's converter writes for `deepseek2`:
//! the split MLA `attn_k_b`/`attn_v_b`, stacked experts, the tokenizer and chat template, V3.2's
//! indexer as `deepseek32`'s `indexer.*` tensors, and the MTP layer as `nextn` tensors (llama.cpp loads them as its deepseek2 MTP block; its own converter
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

/// What `convert --to FILE.gguf --format F` writes: one type for every Linear weight, or a mix
/// that chooses per tensor as llama-quantize's `_M` types do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GgufFormat {
    Uniform(GgmlType),
    /// `base` everywhere; Q6_K for the output head and, in the layers llama.cpp's
    /// `use_more_bits` picks (the first and last eighth, every third between), the FFN downs.
    Mix {
        base: GgmlType,
    },
}

impl GgufFormat {
    /// `f32`, `f16`, `bf16`, `q8_0`, `q6_k`, `q5_k_m`, `q4_k_m`.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "f32" => Self::Uniform(GgmlType::F32),
            "f16" => Self::Uniform(GgmlType::F16),
            "bf16" => Self::Uniform(GgmlType::Bf16),
            "q8_0" => Self::Uniform(GgmlType::Q8_0),
            "q6_k" => Self::Uniform(GgmlType::Q6K),
            "q5_k_m" => Self::Mix { base: GgmlType::Q5K },
            "q4_k_m" => Self::Mix { base: GgmlType::Q4K },
            _ => return None,
        })
    }

    /// The type of the tensor `gguf_name` (`[.., cols]`; `n_layer` blocks, the `nextn` ones counted):
    /// f32 for the norms, the routing bias and the router (llama.cpp keeps them so too);
    /// where the rows are not whole blocks, llama.cpp's fallback (Q4_K → Q5_0, Q5_K → Q5_1,
    /// Q6_K → Q8_0, else f32).
    pub fn tensor_type(&self, gguf_name: &str, cols: usize, two_d: bool, n_layer: usize) -> GgmlType {
        if !two_d || gguf_name.contains("ffn_gate_inp") {
            return GgmlType::F32;
        }
        let layer = gguf_name.strip_prefix("blk.").and_then(|r| r.split('.').next()).and_then(|i| i.parse().ok());
        let more_bits = |i: usize| i < n_layer / 8 || i >= 7 * n_layer / 8 || (i - n_layer / 8) % 3 == 2;
        let ty = match *self {
            Self::Uniform(t) => t,
            Self::Mix { .. } if gguf_name == "output.weight" => GgmlType::Q6K,
            Self::Mix { .. } if gguf_name.contains("ffn_down") && layer.is_some_and(more_bits) => GgmlType::Q6K,
            Self::Mix { base } => base,
        };
        if cols.is_multiple_of(ty.block_elems()) {
            return ty;
        }
        let fallback = match ty {
            GgmlType::Q4K => GgmlType::Q5_0,
            GgmlType::Q5K => GgmlType::Q5_1,
            GgmlType::Q6K => GgmlType::Q8_0,
            _ => GgmlType::F32,
        };
        if cols.is_multiple_of(fallback.block_elems()) {
            fallback
        } else {
            GgmlType::F32
        }
    }
}

/// The MTP layers the folder holds (a folder may be saved without them).
fn mtp_layers(cfg: &Config, ck: &Checkpoint) -> usize {
    let n = cfg.num_hidden_layers;
    (n..n + cfg.num_nextn_predict_layers)
        .take_while(|l| ck.contains(&format!("model.layers.{l}.eh_proj.weight")))
        .count()
}

fn plan(cfg: &Config, ck: &Checkpoint, format: GgufFormat) -> Result<Vec<Out>> {
    // llama-quantize counts the `nextn` blocks among the layers when it picks the mix's layers.
    let n_blocks = cfg.num_hidden_layers + mtp_layers(cfg, ck);
    let mut outs = vec![];
    let mut push = |name: String, dims: Vec<usize>, src: Src| {
        let cols = dims[0];
        let kind = format.tensor_type(&name, cols, dims.len() > 1, n_blocks);
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
    for l in 0..n_blocks {
        let p = format!("model.layers.{l}");
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
    use dsv3_kernels::ggml::quantize;
    match kind {
        GgmlType::F32 => out.extend(row.iter().flat_map(|v| v.to_le_bytes())),
        GgmlType::F16 => out.extend(row.iter().flat_map(|&v| f32_to_f16(v).to_le_bytes())),
        GgmlType::Bf16 => out.extend(row.iter().flat_map(|&v| f32_to_bf16(v).to_le_bytes())),
        GgmlType::Q8_0 => quantize::q8_0(row, out),
        GgmlType::Q5_0 => quantize::q5_0(row, out),
        GgmlType::Q5_1 => quantize::q5_1(row, out),
        GgmlType::Q4K => quantize::q4_k(row, out),
        GgmlType::Q5K => quantize::q5_k(row, out),
        GgmlType::Q6K => quantize::q6_k(row, out),
        k => unreachable!("{k} is not a GGUF output type of convert"),
    }
}

/// The GGUF metadata of `cfg` (and of the folder's tokenizer, when it has one).
fn metadata(cfg: &Config, mtp: usize, from: &Path) -> Result<Vec<(String, Value)>> {
    // V3.2 is llama.cpp's `deepseek32`: deepseek2's keys and tensors plus the indexer's.
    let arch = if cfg.indexer.is_some() { "deepseek32" } else { "deepseek2" };
    let a = |k: &str| format!("{arch}.{k}");
    let u = |x: usize| Value::U32(x as u32);
    let mut m = vec![
        ("general.architecture".to_string(), Value::Str(arch.into())),
        ("general.name".into(), Value::Str(from.file_name().map_or("model".into(), |n| n.to_string_lossy().into()))),
        (a("block_count"), u(cfg.num_hidden_layers + mtp)),
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
        (a("nextn_predict_layers"), u(mtp)),
    ];
    if let Some(q) = cfg.q_lora_rank {
        m.push((a("attention.q_lora_rank"), u(q)));
    }
    if let Some(ix) = cfg.indexer {
        m.extend([
            (a("attention.indexer.head_count"), u(ix.n_heads)),
            (a("attention.indexer.key_length"), u(ix.head_dim)),
            (a("attention.indexer.top_k"), u(ix.topk)),
        ]);
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
    } else {
        // llama.cpp's marker for a model without a vocabulary (it needs the key to load the file).
        m.push(("tokenizer.ggml.model".into(), Value::Str("none".into())));
    }
    Ok(m)
}

/// What a conversion wrote.
#[derive(Debug, serde::Serialize)]
pub struct GgufReport {
    pub tensors: usize,
    pub bytes_out: u64,
}

/// Rows on their way to the file: gathered up to the memory budget, then encoded in parallel
/// (the k-quant searches are the slow part of a conversion) and written in order.
struct Rows {
    vals: Vec<f32>,
    cols: usize,
    cap: usize,
    bytes_out: u64,
}

impl Rows {
    fn push(&mut self, w: &mut GgufWriter, kind: GgmlType, row: &[f32]) -> Result<()> {
        if self.cols != row.len() || self.vals.len() + row.len() > self.cap.max(row.len()) {
            self.flush(w, kind)?;
            self.cols = row.len();
        }
        self.vals.extend_from_slice(row);
        Ok(())
    }

    fn flush(&mut self, w: &mut GgufWriter, kind: GgmlType) -> Result<()> {
        use rayon::prelude::*;
        if self.vals.is_empty() {
            return Ok(());
        }
        let enc: Vec<Vec<u8>> = self
            .vals
            .par_chunks(self.cols)
            .map(|r| {
                let mut b = Vec::new();
                encode(kind, r, &mut b);
                b
            })
            .collect();
        for b in &enc {
            self.bytes_out += b.len() as u64;
            w.write_part(b)?;
        }
        self.vals.clear();
        Ok(())
    }
}

/// Converts the folder `from` to the GGUF file `to` in `format`, the row buffers within about
/// `budget` bytes (at least one row, and one attention head's `kv_b_proj`).
pub fn convert(from: &Path, to: &Path, format: GgufFormat, budget: usize) -> Result<GgufReport> {
    if to.exists() {
        return Err(ModelError::Input(format!("{} exists; convert writes a new file", to.display())));
    }
    let cfg = Config::from_file(&from.join("config.json"))?;
    let ck = Checkpoint::open(from)?;
    let block = cfg.quantization.as_ref().map_or([128, 128], |q| q.weight_block_size);
    let outs = plan(&cfg, &ck, format)?;
    let specs: Vec<TensorSpec> = outs
        .iter()
        .map(|o| TensorSpec { name: o.spec.name.clone(), dims: o.spec.dims.clone(), kind: o.spec.kind })
        .collect();
    let mut w = GgufWriter::create(to, &metadata(&cfg, mtp_layers(&cfg, &ck), from)?, &specs)?;
    // f32 rows and their encoding (at most 4 bytes a value) share the budget.
    let mut rows = Rows { vals: vec![], cols: 0, cap: budget / 8, bytes_out: 0 };
    let mut row = vec![];
    for o in &outs {
        let kind = o.spec.kind;
        match &o.src {
            Src::Tensor { name, cols, .. } if o.spec.dims.len() == 1 => {
                rows.push(&mut w, kind, &ck.f32s(name, &[*cols])?)?
            }
            Src::Tensor { name, rows: n, cols } => {
                let m = ck.matrix(name, *n, *cols, block)?;
                row.resize(*cols, 0.0);
                for r in 0..*n {
                    m.view().decode_row(r, 0, &mut row);
                    rows.push(&mut w, kind, &row)?;
                }
            }
            Src::Experts { names, rows: n, cols } => {
                row.resize(*cols, 0.0);
                for name in names {
                    let m = ck.matrix(name, *n, *cols, block)?;
                    for r in 0..*n {
                        m.view().decode_row(r, 0, &mut row);
                        rows.push(&mut w, kind, &row)?;
                    }
                }
            }
            Src::SplitKv { kv_b, k } => {
                let (h, nope, v, r) = (cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank);
                let kv = ck.matrix(kv_b, h * (nope + v), r, block)?;
                let mut head = vec![0f32; (nope + v) * r];
                for hd in 0..h {
                    for (i, dst) in head.chunks_exact_mut(r).enumerate() {
                        kv.view().decode_row(hd * (nope + v) + i, 0, dst);
                    }
                    if *k {
                        // [kv_lora][nope]: row j holds column j of the head's nope rows.
                        for j in 0..r {
                            row.clear();
                            row.extend((0..nope).map(|i| head[i * r + j]));
                            rows.push(&mut w, kind, &row)?;
                        }
                    } else {
                        for i in 0..v {
                            rows.push(&mut w, kind, &head[(nope + i) * r..][..r])?;
                        }
                    }
                }
            }
        }
        rows.flush(&mut w, kind)?;
    }
    w.finish()?;
    Ok(GgufReport { tensors: outs.len(), bytes_out: rows.bytes_out })
}
