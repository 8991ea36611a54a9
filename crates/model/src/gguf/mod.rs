//! GGUF models: llama.cpp's `deepseek2` files (V2, V2-Lite, V3, R1 and their quantizations) read
//! as a dsv3 checkpoint. Tensors stay in the file in their ggml format ([`dsv3_kernels::ggml`]);
//! names are mapped to the Hugging Face names the model loads; the config is rebuilt from the
//! metadata; split files (`-00001-of-0000N.gguf`) are one model.
//!
//! Both MLA layouts llama.cpp has written load: the legacy `attn_kv_b` and the split `attn_k_b`
//! (per head, transposed) / `attn_v_b`, read in place in their format ([`crate::mla::KvB`]).

pub mod convert;
mod file;
pub mod tokenizer;
pub mod writer;

pub use file::{parse, GgufFile, Parsed, TensorInfo, Value};

use crate::error::{ModelError, Result};
use crate::weights::Checkpoint;
use crate::Config;
use serde_json::json;
use std::path::{Path, PathBuf};

/// A GGUF model: its files (one, or every part of a split).
pub struct Gguf {
    pub files: Vec<GgufFile>,
}

/// Whether `path` names a GGUF file (by its extension).
pub fn is_gguf(path: &Path) -> bool {
    path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

/// The parts of a split GGUF named like `NAME-00001-of-00003.gguf`, in order; else the one path.
fn split_parts(path: &Path) -> Vec<PathBuf> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let stem = name.strip_suffix(".gguf").unwrap_or(name);
    let parts: Vec<&str> = stem.rsplitn(4, '-').collect();
    // rsplitn gives [count, "of", index, base] for `base-index-of-count`.
    if let [count, "of", index, base] = parts[..] {
        if let (Ok(n), Ok(_)) = (count.parse::<usize>(), index.parse::<usize>()) {
            if n >= 1 && count.len() == index.len() {
                let dir = path.parent().unwrap_or(Path::new(""));
                let w = count.len();
                return (1..=n).map(|i| dir.join(format!("{base}-{i:0w$}-of-{count}.gguf"))).collect();
            }
        }
    }
    vec![path.to_path_buf()]
}

impl Gguf {
    /// Opens `path` and, when it is one part of a split, every part.
    pub fn open(path: &Path) -> Result<Self> {
        let files = split_parts(path).iter().map(|p| GgufFile::open(p)).collect::<Result<Vec<_>>>()?;
        let g = Gguf { files };
        if let Some(n) = g.main().uint("split.count")? {
            if n as usize != g.files.len() {
                return Err(g.bad(format!("split.count is {n}, found {} parts", g.files.len())));
            }
        }
        Ok(g)
    }

    /// The file holding the metadata (the first part).
    pub fn main(&self) -> &GgufFile {
        &self.files[0]
    }

    pub fn path(&self) -> &Path {
        &self.main().path
    }

    fn bad(&self, msg: String) -> ModelError {
        ModelError::Gguf { path: self.path().into(), msg }
    }

    fn tensor(&self, name: &str) -> Option<(usize, &TensorInfo)> {
        self.files.iter().enumerate().find_map(|(i, f)| f.tensors.get(name).map(|t| (i, t)))
    }

    /// `general.architecture`.
    pub fn architecture(&self) -> Result<&str> {
        self.main().string("general.architecture")?.ok_or_else(|| self.bad("general.architecture is missing".into()))
    }

    /// The model's config, from the `deepseek2.*` metadata (the shapes a Hugging Face
    /// `config.json` would give), validated like any config.
    pub fn config(&self) -> Result<Config> {
        let arch = self.architecture()?;
        if arch != "deepseek2" && arch != "deepseek32" {
            return Err(self.bad(format!(
                "architecture `{arch}`: dsv3 runs `deepseek2` (DeepSeek V2/V3/R1) and `deepseek32` (V3.2)"
            )));
        }
        let m = self.main();
        let k = |key: &str| format!("{arch}.{key}");
        let need = |key: &str| m.need(&k(key));
        let opt = |key: &str| m.uint(&k(key));
        let n_layers = need("block_count")?;
        let nextn = opt("nextn_predict_layers")?.unwrap_or(0);
        let rope = need("rope.dimension_count")?;
        let key_len = match opt("attention.key_length_mla")? {
            Some(v) => v,
            None => need("attention.key_length")?,
        };
        let v_head = match opt("attention.value_length_mla")? {
            Some(v) => v,
            None => need("attention.value_length")?,
        };
        let embd = self.tensor("token_embd.weight").ok_or_else(|| self.bad("token_embd.weight is missing".into()))?;
        let vocab = match opt("vocab_size")? {
            Some(v) => v,
            None => *embd.1.dims.get(1).unwrap_or(&0) as u64,
        };
        let n_group = opt("expert_group_count")?.unwrap_or(1);
        let has_bias = self.tensor("blk.0.exp_probs_b.bias").is_some()
            || (0..n_layers).any(|l| self.tensor(&format!("blk.{l}.exp_probs_b.bias")).is_some());
        let scoring = match opt("expert_gating_func")? {
            None | Some(1) => "softmax",
            Some(2) => "sigmoid",
            Some(g) => return Err(self.bad(format!("expert_gating_func {g} (1 softmax, 2 sigmoid)"))),
        };
        let topk_method = if has_bias {
            "noaux_tc"
        } else if n_group > 1 {
            "group_limited_greedy"
        } else {
            "greedy"
        };
        let yarn = match m.string(&k("rope.scaling.type"))? {
            Some("yarn") => {
                // llama.cpp keeps 0.1·mscale_all_dim as the log multiplier and drops `mscale`:
                // DeepSeek's releases set the two equal, which is what is assumed here.
                let mscale_all = m.float(&k("rope.scaling.yarn_log_multiplier"))?.unwrap_or(0.0) / 0.1;
                json!({
                    "type": "yarn",
                    "factor": m.float(&k("rope.scaling.factor"))?.unwrap_or(1.0),
                    "original_max_position_embeddings": need("rope.scaling.original_context_length")?,
                    "beta_fast": m.float(&k("rope.scaling.yarn_beta_fast"))?.unwrap_or(32.0),
                    "beta_slow": m.float(&k("rope.scaling.yarn_beta_slow"))?.unwrap_or(1.0),
                    "mscale": mscale_all,
                    "mscale_all_dim": mscale_all,
                })
            }
            None | Some("none") => serde_json::Value::Null,
            Some(t) => return Err(self.bad(format!("rope.scaling.type `{t}`: dsv3 runs yarn or none"))),
        };
        let tok = |key: &str| m.uint(&format!("tokenizer.ggml.{key}"));
        let v32 = arch == "deepseek32";
        let model_type = match () {
            _ if v32 => "deepseek_v32",
            _ if scoring == "sigmoid" => "deepseek_v3",
            _ => "deepseek_v2",
        };
        let indexer = |key: &str| if v32 { need(&format!("attention.indexer.{key}")).map(Some) } else { Ok(None) };
        let mut cfg = json!({
            "model_type": model_type,
            "vocab_size": vocab,
            "hidden_size": need("embedding_length")?,
            "intermediate_size": need("feed_forward_length")?,
            "moe_intermediate_size": opt("expert_feed_forward_length")?.unwrap_or(0),
            "num_hidden_layers": n_layers.checked_sub(nextn).ok_or_else(|| self.bad("nextn_predict_layers exceeds block_count".into()))?,
            "num_nextn_predict_layers": nextn,
            "num_attention_heads": need("attention.head_count")?,
            "num_key_value_heads": need("attention.head_count")?,
            "q_lora_rank": opt("attention.q_lora_rank")?,
            "kv_lora_rank": need("attention.kv_lora_rank")?,
            "qk_rope_head_dim": rope,
            "qk_nope_head_dim": key_len.checked_sub(rope).ok_or_else(|| self.bad("key length below the RoPE dims".into()))?,
            "v_head_dim": v_head,
            "n_routed_experts": opt("expert_count")?,
            "n_shared_experts": opt("expert_shared_count")?,
            "num_experts_per_tok": opt("expert_used_count")?,
            "n_group": n_group,
            "topk_group": opt("expert_group_used_count")?.unwrap_or(1),
            "topk_method": topk_method,
            "scoring_func": scoring,
            "norm_topk_prob": m.get(&k("expert_weights_norm")) == Some(&Value::Bool(true)),
            "routed_scaling_factor": m.float(&k("expert_weights_scale"))?.unwrap_or(1.0),
            "first_k_dense_replace": opt("leading_dense_block_count")?.unwrap_or(0),
            "rms_norm_eps": m.float(&k("attention.layer_norm_rms_epsilon"))?.unwrap_or(1e-6),
            "rope_theta": m.float(&k("rope.freq_base"))?.unwrap_or(10000.0),
            "rope_scaling": yarn,
            "max_position_embeddings": opt("context_length")?.unwrap_or(4096),
            "tie_word_embeddings": self.tensor("output.weight").is_none(),
            "bos_token_id": tok("bos_token_id")?,
            "eos_token_id": tok("eos_token_id")?,
        });
        for (hf, key) in [("index_n_heads", "head_count"), ("index_head_dim", "key_length"), ("index_topk", "top_k")] {
            if let Some(v) = indexer(key)? {
                cfg[hf] = v.into();
            }
        }
        Config::from_json(&cfg).map_err(|e| self.bad(format!("metadata gives an invalid config: {e}")))
    }

    /// The tensors under the Hugging Face names [`crate::DeepseekV3::from_checkpoint`] reads.
    pub fn checkpoint(&self, cfg: &Config) -> Result<Checkpoint> {
        let mut ck = Checkpoint::empty();
        let idx: Vec<usize> = self.files.iter().map(|f| ck.add_mapped(&f.path, f.map.clone())).collect();
        let mut split_kb: Vec<(usize, String)> = vec![];
        for (fi, f) in self.files.iter().enumerate() {
            for (name, t) in &f.tensors {
                let Some(hf) = hf_name(name) else {
                    return Err(self.bad(format!("tensor `{name}` is not one dsv3 knows in deepseek2")));
                };
                match hf {
                    HfName::One(hf) => ck.add_ggml(hf, t.shape(), t.kind, idx[fi], t.start, t.end),
                    HfName::Experts { layer, proj } => {
                        let [cols, rows, n] = t.dims[..] else {
                            return Err(self.bad(format!("`{name}` has dims {:?}, expected 3", t.dims)));
                        };
                        let per = (t.end - t.start) / n.max(1);
                        for e in 0..n {
                            let hf = format!("model.layers.{layer}.mlp.experts.{e}.{proj}.weight");
                            let s = t.start + e * per;
                            ck.add_ggml(hf, vec![rows, cols], t.kind, idx[fi], s, s + per);
                        }
                    }
                    HfName::SplitKb { layer } => split_kb.push((layer, name.clone())),
                    HfName::SplitVb => {}
                }
            }
        }
        for (layer, kb) in split_kb {
            let kv = format!("model.layers.{layer}.self_attn.kv_b_proj.weight");
            if ck.contains(&kv) {
                continue; // both layouts written: the legacy tensor is the one read
            }
            let vb = kb.replace("attn_k_b", "attn_v_b");
            // `attn_k_b [heads][kv_lora][nope]`, `attn_v_b [heads][v][kv_lora]` (ggml dims innermost
            // first), as `k_b [heads·kv_lora, nope]` and `v_b [heads·v, kv_lora]` ([`crate::mla::KvB`]).
            let (h, c, dn, dv) = (cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_nope_head_dim, cfg.v_head_dim);
            for (name, hf, shape, dims) in [
                (&kb, crate::mla::SPLIT_K_B, vec![h * c, dn], [dn, c, h]),
                (&vb, crate::mla::SPLIT_V_B, vec![h * dv, c], [c, dv, h]),
            ] {
                let (fi, t) = self.tensor(name).ok_or_else(|| self.bad(format!("`{name}` is missing")))?;
                if t.dims != dims {
                    return Err(self.bad(format!("`{name}` has dims {:?}, the metadata says {dims:?}", t.dims)));
                }
                ck.add_ggml(
                    format!("model.layers.{layer}.self_attn.{hf}.weight"),
                    shape,
                    t.kind,
                    idx[fi],
                    t.start,
                    t.end,
                );
            }
        }
        Ok(ck)
    }
}

/// A layer's modules: llama.cpp's deepseek2/deepseek32 name (gguf-py `TENSOR_NAMES`) and the
/// Hugging Face checkpoint's. The split `attn_k_b`/`attn_v_b`, the stacked experts and the routing
/// bias are handled apart.
pub(crate) const MODULES: [(&str, &str); 30] = [
    ("attn_norm", "input_layernorm"),
    ("attn_q", "self_attn.q_proj"),
    ("attn_q_a", "self_attn.q_a_proj"),
    ("attn_q_a_norm", "self_attn.q_a_layernorm"),
    ("attn_q_b", "self_attn.q_b_proj"),
    ("attn_kv_a_mqa", "self_attn.kv_a_proj_with_mqa"),
    ("attn_kv_a_norm", "self_attn.kv_a_layernorm"),
    ("attn_kv_b", "self_attn.kv_b_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("ffn_norm", "post_attention_layernorm"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
    ("ffn_gate_inp", "mlp.gate"),
    ("ffn_gate_shexp", "mlp.shared_experts.gate_proj"),
    ("ffn_up_shexp", "mlp.shared_experts.up_proj"),
    ("ffn_down_shexp", "mlp.shared_experts.down_proj"),
    ("nextn.eh_proj", "eh_proj"),
    ("nextn.enorm", "enorm"),
    ("nextn.hnorm", "hnorm"),
    ("nextn.embed_tokens", "embed_tokens"),
    ("nextn.shared_head_head", "shared_head.head"),
    ("nextn.shared_head_norm", "shared_head.norm"),
    // V3.2's lightning indexer (`deepseek32`; k_norm has a bias).
    ("indexer.attn_q_b", "self_attn.indexer.wq_b"),
    ("indexer.attn_k", "self_attn.indexer.wk"),
    ("indexer.k_norm", "self_attn.indexer.k_norm"),
    ("indexer.proj", "self_attn.indexer.weights_proj"),
    ("ffn_gate_exps", "mlp.experts.gate_proj"),
    ("ffn_up_exps", "mlp.experts.up_proj"),
    ("ffn_down_exps", "mlp.experts.down_proj"),
];

/// Top-level tensors: GGUF and Hugging Face names.
pub(crate) const TOP: [(&str, &str); 3] = [
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
];

enum HfName {
    One(String),
    Experts { layer: usize, proj: &'static str },
    SplitKb { layer: usize },
    SplitVb,
}

/// A deepseek2 GGUF tensor name → the Hugging Face checkpoint's.
fn hf_name(name: &str) -> Option<HfName> {
    if let Some((_, hf)) = TOP.iter().find(|(g, _)| *g == name) {
        return Some(HfName::One(hf.to_string()));
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (base, suffix) = rest.rsplit_once('.')?;
    if suffix != "weight" && suffix != "bias" {
        return None;
    }
    match base {
        "attn_k_b" => return Some(HfName::SplitKb { layer }),
        "attn_v_b" => return Some(HfName::SplitVb),
        "exp_probs_b" => return Some(HfName::One(format!("model.layers.{layer}.mlp.gate.e_score_correction_bias"))),
        _ => {}
    }
    let (_, hf) = MODULES.iter().find(|(g, _)| *g == base)?;
    if let Some(proj) = hf.strip_prefix("mlp.experts.") {
        return Some(HfName::Experts { layer, proj });
    }
    Some(HfName::One(format!("model.layers.{layer}.{hf}.{suffix}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_names_expand_to_every_part() {
        let p = split_parts(Path::new("/m/DeepSeek-R1-Q4_K_M-00002-of-00003.gguf"));
        assert_eq!(p.len(), 3);
        assert_eq!(p[0], Path::new("/m/DeepSeek-R1-Q4_K_M-00001-of-00003.gguf"));
        assert_eq!(split_parts(Path::new("model-q8_0.gguf")), vec![PathBuf::from("model-q8_0.gguf")]);
    }

    #[test]
    fn names_map_to_the_checkpoint() {
        let n = |s| match hf_name(s) {
            Some(HfName::One(h)) => h,
            _ => panic!("{s}"),
        };
        assert_eq!(n("blk.3.attn_kv_a_mqa.weight"), "model.layers.3.self_attn.kv_a_proj_with_mqa.weight");
        assert_eq!(n("blk.5.exp_probs_b.bias"), "model.layers.5.mlp.gate.e_score_correction_bias");
        assert_eq!(n("blk.61.nextn.shared_head_norm.weight"), "model.layers.61.shared_head.norm.weight");
        assert_eq!(n("blk.2.indexer.k_norm.bias"), "model.layers.2.self_attn.indexer.k_norm.bias");
        assert_eq!(n("blk.2.indexer.proj.weight"), "model.layers.2.self_attn.indexer.weights_proj.weight");
        assert!(hf_name("blk.x.attn_q.weight").is_none());
        assert!(hf_name("rope_freqs.weight").is_none());
    }
}
