//! The model's hyper-parameters, read from a Hugging Face `config.json` (`deepseek_v3` or
//! `deepseek_v2`, the hub form with `rope_theta` + `rope_scaling` or the transformers-5 form with
//! `rope_parameters`). Field names are the checkpoint's. Values dsv3 cannot run give an error that
//! names the field.

use crate::error::{ModelError, Result};
use dsv3_kernels::quant::ScaleFmt;
use serde_json::{Map, Value};
use std::path::Path;

/// Which family the config declares; V2 has no correction bias and may use softmax scoring;
/// V3.2 is V3 with DeepSeek Sparse Attention (an [`Indexer`] per layer).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelType {
    DeepseekV2,
    DeepseekV3,
    DeepseekV32,
}

/// V3.2's lightning indexer (spec V3.2 §2.1): `index_n_heads` heads of `index_head_dim` score
/// every past position for each query, and MLA attends to the `index_topk` best.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Indexer {
    pub n_heads: usize,
    pub head_dim: usize,
    pub topk: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScoringFunc {
    Sigmoid,
    Softmax,
}

/// How the router picks experts (spec §1 "FFN, MoE layers"; V2's `topk_method`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TopkMethod {
    /// Plain top-k of the scores.
    Greedy,
    /// V2: group score = max score in the group.
    GroupLimitedGreedy,
    /// V3: scores + `e_score_correction_bias`, group score = sum of the group's top-2.
    NoauxTc,
}

/// YaRN parameters (spec §1 "RoPE / YaRN").
#[derive(Clone, Debug, PartialEq)]
pub struct Yarn {
    pub factor: f64,
    pub original_max_position_embeddings: usize,
    pub beta_fast: f64,
    pub beta_slow: f64,
    pub mscale: f64,
    pub mscale_all_dim: f64,
    /// Explicit cos/sin multiplier; derived from the mscales when absent.
    pub attention_factor: Option<f64>,
    /// transformers' `truncate`: floor/ceil the correction range (default true).
    pub truncate: bool,
}

/// FP8 block quantization of the checkpoint's linear weights.
#[derive(Clone, Debug, PartialEq)]
pub struct Fp8Quant {
    pub weight_block_size: [usize; 2],
    /// How activation scales are rounded when activations are quantized (`--act-quant fp8`):
    /// V3.1 and V3.2 declare `scale_fmt: ue8m0` (powers of two).
    pub scale_fmt: ScaleFmt,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub model_type: ModelType,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub moe_intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_nextn_predict_layers: usize,
    pub num_attention_heads: usize,
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub qk_nope_head_dim: usize,
    pub qk_rope_head_dim: usize,
    pub v_head_dim: usize,
    /// 0 means no MoE layers at all.
    pub n_routed_experts: usize,
    pub n_shared_experts: usize,
    pub num_experts_per_tok: usize,
    pub n_group: usize,
    pub topk_group: usize,
    pub topk_method: TopkMethod,
    pub scoring_func: ScoringFunc,
    pub norm_topk_prob: bool,
    pub routed_scaling_factor: f32,
    pub first_k_dense_replace: usize,
    pub moe_layer_freq: usize,
    pub rms_norm_eps: f32,
    pub rope_theta: f64,
    pub rope_interleave: bool,
    pub yarn: Option<Yarn>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub quantization: Option<Fp8Quant>,
    /// V3.2's sparse attention; `None` for dense MLA.
    pub indexer: Option<Indexer>,
}

impl Config {
    pub fn from_file(path: &Path) -> Result<Self> {
        Self::from_json(&crate::files::read_json(path)?)
    }

    pub fn from_json(v: &Value) -> Result<Self> {
        let o = v.as_object().ok_or_else(|| ModelError::config("(root)", "config.json must be a JSON object"))?;
        let f = Fields(o);
        let model_type = match f.str_or("model_type", "deepseek_v3")? {
            "deepseek_v3" => ModelType::DeepseekV3,
            "deepseek_v2" => ModelType::DeepseekV2,
            "deepseek_v32" => ModelType::DeepseekV32,
            other => {
                return Err(ModelError::config(
                    "model_type",
                    format!("`{other}` is not deepseek_v3, deepseek_v32 or deepseek_v2"),
                ))
            }
        };
        let v3 = model_type != ModelType::DeepseekV2;
        let indexer = match model_type {
            ModelType::DeepseekV32 => Some(Indexer {
                n_heads: f.usize_req("index_n_heads")?,
                head_dim: f.usize_req("index_head_dim")?,
                topk: f.usize_req("index_topk")?,
            }),
            _ => None,
        };
        if f.bool_or("attention_bias", false)? {
            return Err(ModelError::config("attention_bias", "attention biases are not part of DeepSeek-V3"));
        }
        match f.str_or("hidden_act", "silu")? {
            "silu" => {}
            other => return Err(ModelError::config("hidden_act", format!("`{other}` is unsupported (only silu)"))),
        }
        let n_routed_experts = f.usize_opt("n_routed_experts")?.unwrap_or(0);
        let scoring_func = match f.str_or("scoring_func", if v3 { "sigmoid" } else { "softmax" })? {
            "sigmoid" => ScoringFunc::Sigmoid,
            "softmax" => ScoringFunc::Softmax,
            other => return Err(ModelError::config("scoring_func", format!("`{other}` is not sigmoid or softmax"))),
        };
        let topk_method = match f.str_or("topk_method", if v3 { "noaux_tc" } else { "greedy" })? {
            "noaux_tc" => TopkMethod::NoauxTc,
            "greedy" => TopkMethod::Greedy,
            "group_limited_greedy" => TopkMethod::GroupLimitedGreedy,
            other => {
                return Err(ModelError::config(
                    "topk_method",
                    format!("`{other}` is not noaux_tc, greedy or group_limited_greedy"),
                ))
            }
        };
        let (rope_theta, yarn) = rope(&f)?;
        let eos_token_ids = match o.get("eos_token_id") {
            None | Some(Value::Null) => vec![],
            Some(Value::Number(n)) => vec![token_id(n, "eos_token_id")?],
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| {
                    x.as_number()
                        .ok_or_else(|| ModelError::config("eos_token_id", "must hold integers"))
                        .and_then(|n| token_id(n, "eos_token_id"))
                })
                .collect::<Result<_>>()?,
            Some(_) => return Err(ModelError::config("eos_token_id", "must be an integer or a list of integers")),
        };
        let quantization = match o.get("quantization_config") {
            None | Some(Value::Null) => None,
            Some(q) => Some(fp8_quant(q)?),
        };
        let cfg = Config {
            model_type,
            vocab_size: f.usize_req("vocab_size")?,
            hidden_size: f.usize_req("hidden_size")?,
            intermediate_size: f.usize_req("intermediate_size")?,
            moe_intermediate_size: f.usize_opt("moe_intermediate_size")?.unwrap_or(0),
            num_hidden_layers: f.usize_req("num_hidden_layers")?,
            num_nextn_predict_layers: f.usize_opt("num_nextn_predict_layers")?.unwrap_or(0),
            num_attention_heads: f.usize_req("num_attention_heads")?,
            q_lora_rank: f.usize_opt("q_lora_rank")?,
            kv_lora_rank: f.usize_req("kv_lora_rank")?,
            qk_nope_head_dim: f.usize_req("qk_nope_head_dim")?,
            qk_rope_head_dim: f.usize_req("qk_rope_head_dim")?,
            v_head_dim: f.usize_req("v_head_dim")?,
            n_routed_experts,
            n_shared_experts: f.usize_opt("n_shared_experts")?.unwrap_or(0),
            num_experts_per_tok: f.usize_opt("num_experts_per_tok")?.unwrap_or(0),
            n_group: f.usize_opt("n_group")?.unwrap_or(1),
            topk_group: f.usize_opt("topk_group")?.unwrap_or(1),
            topk_method,
            scoring_func,
            norm_topk_prob: f.bool_or("norm_topk_prob", v3)?,
            routed_scaling_factor: f.f64_or("routed_scaling_factor", 1.0)? as f32,
            first_k_dense_replace: f.usize_opt("first_k_dense_replace")?.unwrap_or(0),
            moe_layer_freq: f.usize_opt("moe_layer_freq")?.unwrap_or(1),
            rms_norm_eps: f.f64_or("rms_norm_eps", 1e-6)? as f32,
            rope_theta,
            rope_interleave: f.bool_or("rope_interleave", true)?,
            yarn,
            max_position_embeddings: f.usize_opt("max_position_embeddings")?.unwrap_or(4096),
            tie_word_embeddings: f.bool_or("tie_word_embeddings", false)?,
            bos_token_id: match o.get("bos_token_id") {
                Some(Value::Number(n)) => Some(token_id(n, "bos_token_id")?),
                _ => None,
            },
            eos_token_ids,
            quantization,
            indexer,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Every field in the domain its math needs; each error names the field and its value.
    fn validate(&self) -> Result<()> {
        self.validate_sizes()?;
        self.validate_moe()?;
        self.validate_numbers()?;
        self.validate_indexer()?;
        self.validate_total()
    }

    fn validate_indexer(&self) -> Result<()> {
        let Some(ix) = &self.indexer else { return Ok(()) };
        for (name, v) in [("index_n_heads", ix.n_heads), ("index_head_dim", ix.head_dim), ("index_topk", ix.topk)] {
            if v == 0 {
                return Err(ModelError::config(name, "must be positive, not 0"));
            }
        }
        if ix.head_dim < self.qk_rope_head_dim {
            let msg = format!("{} must hold the {} RoPE dims", ix.head_dim, self.qk_rope_head_dim);
            return Err(ModelError::config("index_head_dim", msg));
        }
        let Some(rq) = self.q_lora_rank else {
            return Err(ModelError::config("q_lora_rank", "must be set: the indexer's queries come from the q latent"));
        };
        // wq_b, wk and weights_proj per layer, in f64 so no product overflows.
        let per_layer = (ix.n_heads as f64 * ix.head_dim as f64) * rq as f64
            + (ix.head_dim as f64 + ix.n_heads as f64) * self.hidden_size as f64;
        let n = per_layer * (self.num_hidden_layers + self.num_nextn_predict_layers) as f64;
        if n > (1u64 << 45) as f64 {
            return Err(ModelError::config("index_n_heads", format!("the indexers would hold {n:.3e} parameters")));
        }
        Ok(())
    }

    fn validate_sizes(&self) -> Result<()> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("kv_lora_rank", self.kv_lora_rank),
            ("qk_nope_head_dim", self.qk_nope_head_dim),
            ("qk_rope_head_dim", self.qk_rope_head_dim),
            ("v_head_dim", self.v_head_dim),
            ("moe_layer_freq", self.moe_layer_freq),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(ModelError::config(name, "must be positive, not 0"));
            }
        }
        if !self.qk_rope_head_dim.is_multiple_of(2) {
            let msg = format!("{} must be even (RoPE rotates pairs)", self.qk_rope_head_dim);
            return Err(ModelError::config("qk_rope_head_dim", msg));
        }
        if self.q_lora_rank == Some(0) {
            return Err(ModelError::config("q_lora_rank", "must be positive or null, not 0"));
        }
        let layers = self.num_hidden_layers.saturating_add(self.num_nextn_predict_layers);
        if self.shape().moe_count(layers) < layers && self.intermediate_size == 0 {
            return Err(ModelError::config("intermediate_size", "must be positive: the model has dense FFN layers"));
        }
        for (field, id) in self
            .bos_token_id
            .iter()
            .map(|&b| ("bos_token_id", b))
            .chain(self.eos_token_ids.iter().map(|&e| ("eos_token_id", e)))
        {
            if id as usize >= self.vocab_size {
                return Err(ModelError::config(
                    field,
                    format!("{id} is outside the vocabulary of {}", self.vocab_size),
                ));
            }
        }
        Ok(())
    }

    fn validate_moe(&self) -> Result<()> {
        if self.n_routed_experts == 0 {
            return Ok(());
        }
        let k = self.num_experts_per_tok;
        if k == 0 || k > self.n_routed_experts {
            return Err(ModelError::config(
                "num_experts_per_tok",
                format!("{k} must be in 1..={}", self.n_routed_experts),
            ));
        }
        if self.moe_intermediate_size == 0 {
            return Err(ModelError::config("moe_intermediate_size", "must be positive when n_routed_experts is set"));
        }
        if self.topk_method == TopkMethod::Greedy {
            return Ok(());
        }
        if self.n_group == 0 || !self.n_routed_experts.is_multiple_of(self.n_group) {
            let msg = format!("{} must divide n_routed_experts {}", self.n_group, self.n_routed_experts);
            return Err(ModelError::config("n_group", msg));
        }
        if self.topk_group == 0 || self.topk_group > self.n_group {
            return Err(ModelError::config(
                "topk_group",
                format!("{} must be in 1..={}", self.topk_group, self.n_group),
            ));
        }
        let per_group = self.n_routed_experts / self.n_group;
        if self.topk_method == TopkMethod::NoauxTc && per_group < 2 {
            let msg = "noaux_tc scores groups by their top-2 experts: each group needs at least 2";
            return Err(ModelError::config("n_group", msg));
        }
        if k > self.topk_group * per_group {
            let msg = format!("{k} exceeds the {} experts of the kept groups", self.topk_group * per_group);
            return Err(ModelError::config("num_experts_per_tok", msg));
        }
        Ok(())
    }

    /// Real-valued fields: finite and where the formulas are defined.
    fn validate_numbers(&self) -> Result<()> {
        fn positive<F: Into<f64> + Copy + std::fmt::Display>(field: &str, v: F) -> Result<()> {
            let x: f64 = v.into();
            if x.is_finite() && x > 0.0 {
                Ok(())
            } else {
                Err(ModelError::config(field, format!("{v} must be a positive finite number")))
            }
        }
        positive("rms_norm_eps", self.rms_norm_eps)?;
        positive("rope_theta", self.rope_theta)?;
        positive("routed_scaling_factor", self.routed_scaling_factor)?;
        let Some(y) = &self.yarn else { return Ok(()) };
        if !(y.factor.is_finite() && y.factor >= 1.0) {
            return Err(ModelError::config("rope_scaling.factor", format!("{} must be at least 1", y.factor)));
        }
        if y.original_max_position_embeddings == 0 {
            return Err(ModelError::config("rope_scaling.original_max_position_embeddings", "must be positive, not 0"));
        }
        positive("rope_scaling.beta_fast", y.beta_fast)?;
        positive("rope_scaling.beta_slow", y.beta_slow)?;
        for (field, v) in [("rope_scaling.mscale", y.mscale), ("rope_scaling.mscale_all_dim", y.mscale_all_dim)] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(ModelError::config(field, format!("{v} must be a finite number ≥ 0")));
            }
        }
        if let Some(a) = y.attention_factor {
            positive("rope_scaling.attention_factor", a)?;
        }
        Ok(())
    }

    /// The parameter count (in f64, so no product of config sizes can overflow it): sizes that
    /// exceed any machine are refused here, before anything is allocated.
    fn validate_total(&self) -> Result<()> {
        const MAX_PARAMS: f64 = (1u64 << 45) as f64; // 35T; DeepSeek-V3 has 0.67T
        let n = self.param_count();
        if n.is_nan() || n > MAX_PARAMS {
            let msg = format!("these sizes make a model of {n:.3e} parameters (at most {MAX_PARAMS:.3e})");
            return Err(ModelError::config("(sizes)", msg));
        }
        Ok(())
    }

    /// Parameters of the model, its MTP modules included.
    pub fn param_count(&self) -> f64 {
        self.shape().params().total
    }

    /// The numbers cost depends on ([`dsv3_dist::plan`]: parameters, FLOPs per token, memory).
    pub fn shape(&self) -> dsv3_dist::plan::ModelShape {
        let moe = self.n_routed_experts > 0;
        dsv3_dist::plan::ModelShape {
            hidden: self.hidden_size,
            layers: self.num_hidden_layers,
            dense_layers: if moe {
                self.first_k_dense_replace.min(self.num_hidden_layers)
            } else {
                self.num_hidden_layers
            },
            moe_layer_freq: self.moe_layer_freq,
            vocab: self.vocab_size,
            heads: self.num_attention_heads,
            q_lora_rank: self.q_lora_rank,
            kv_lora_rank: self.kv_lora_rank,
            qk_nope: self.qk_nope_head_dim,
            qk_rope: self.qk_rope_head_dim,
            v_head: self.v_head_dim,
            intermediate: self.intermediate_size,
            moe_intermediate: self.moe_intermediate_size,
            routed_experts: self.n_routed_experts,
            shared_experts: self.n_shared_experts,
            experts_per_token: self.num_experts_per_tok,
            mtp_layers: self.num_nextn_predict_layers,
        }
    }

    /// `qk_nope_head_dim + qk_rope_head_dim` (192 for V3).
    pub fn qk_head_dim(&self) -> usize {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }

    /// Whether decoder layer `l` (the MTP layers included) has a MoE FFN.
    pub fn is_moe_layer(&self, l: usize) -> bool {
        self.n_routed_experts > 0 && l >= self.first_k_dense_replace && l.is_multiple_of(self.moe_layer_freq)
    }

    /// `qk_head_dim^-0.5`, times `mscale(factor, mscale_all_dim)²` under YaRN (spec §1, pitfall 5).
    pub fn softmax_scale(&self) -> f32 {
        let mut s = (self.qk_head_dim() as f64).powf(-0.5);
        if let Some(y) = &self.yarn {
            if y.mscale_all_dim != 0.0 {
                let m = yarn_get_mscale(y.factor, y.mscale_all_dim);
                s *= m * m;
            }
        }
        s as f32
    }

    /// Values cached per token per layer: the latent plus the shared rope key (576 for V3), plus
    /// the indexer's key with sparse attention (704 for V3.2).
    pub fn latent_cache_width(&self) -> usize {
        self.kv_lora_rank + self.qk_rope_head_dim + self.indexer.map_or(0, |ix| ix.head_dim)
    }
}

/// `config_json` as a Hugging Face folder's `config.json` states it: with the `architectures`
/// entry the official configs carry, which transformers' auto classes and llama.cpp's converter
/// select the model by (kept as it is when present).
pub fn with_architectures(config_json: &serde_json::Value) -> serde_json::Value {
    let mut cj = config_json.clone();
    if cj.get("architectures").is_none() {
        let class = match cj.get("model_type").and_then(|v| v.as_str()) {
            Some("deepseek_v2") => "DeepseekV2ForCausalLM",
            Some("deepseek_v32") => "DeepseekV32ForCausalLM",
            _ => "DeepseekV3ForCausalLM",
        };
        cj["architectures"] = serde_json::json!([class]);
    }
    cj
}

/// YaRN's magnitude correction `0.1·m·ln(s) + 1` (1 for s ≤ 1).
pub fn yarn_get_mscale(scale: f64, mscale: f64) -> f64 {
    if scale <= 1.0 {
        1.0
    } else {
        0.1 * mscale * scale.ln() + 1.0
    }
}

fn token_id(n: &serde_json::Number, field: &str) -> Result<u32> {
    n.as_u64()
        .and_then(|v| u32::try_from(v).ok())
        .ok_or_else(|| ModelError::config(field, "must be a non-negative integer"))
}

fn fp8_quant(q: &Value) -> Result<Fp8Quant> {
    let o = q.as_object().ok_or_else(|| ModelError::config("quantization_config", "must be an object"))?;
    let f = Fields(o);
    match f.str_or("quant_method", "fp8")? {
        "fp8" => {}
        // FP4 checkpoints (`dsv3 convert --format fp4`): the weights say their own layout.
        "mxfp4" => return Ok(Fp8Quant { weight_block_size: [128, 128], scale_fmt: ScaleFmt::F32 }),
        "modelopt" => match f.str_or("quant_algo", "NVFP4")? {
            "NVFP4" => return Ok(Fp8Quant { weight_block_size: [128, 128], scale_fmt: ScaleFmt::F32 }),
            other => {
                return Err(ModelError::config(
                    "quantization_config.quant_algo",
                    format!("`{other}` is unsupported (only NVFP4)"),
                ))
            }
        },
        other => {
            return Err(ModelError::config(
                "quantization_config.quant_method",
                format!("`{other}` is unsupported (fp8, mxfp4, modelopt NVFP4)"),
            ))
        }
    }
    match f.str_or("fmt", "e4m3")? {
        "e4m3" => {}
        other => {
            return Err(ModelError::config("quantization_config.fmt", format!("`{other}` is unsupported (only e4m3)")))
        }
    }
    let block = match o.get("weight_block_size") {
        None | Some(Value::Null) => [128, 128],
        Some(Value::Array(a)) if a.len() == 2 => {
            let mut b = [0usize; 2];
            for (i, x) in a.iter().enumerate() {
                b[i] = x.as_u64().filter(|&v| v > 0).ok_or_else(|| {
                    ModelError::config("quantization_config.weight_block_size", "must be two positive integers")
                })? as usize;
            }
            b
        }
        Some(_) => {
            return Err(ModelError::config("quantization_config.weight_block_size", "must be two positive integers"))
        }
    };
    let scale_fmt = match o.get("scale_fmt") {
        None | Some(Value::Null) => ScaleFmt::F32,
        Some(Value::String(s)) if s == "ue8m0" => ScaleFmt::Ue8m0,
        Some(other) => {
            let msg = format!("{other} is unsupported (ue8m0, or absent for f32 scales)");
            return Err(ModelError::config("quantization_config.scale_fmt", msg));
        }
    };
    Ok(Fp8Quant { weight_block_size: block, scale_fmt })
}

/// Reads `rope_theta` and YaRN from `rope_scaling` (hub) or `rope_parameters` (transformers 5).
fn rope(f: &Fields) -> Result<(f64, Option<Yarn>)> {
    let params = ["rope_parameters", "rope_scaling"]
        .into_iter()
        .find_map(|k| f.0.get(k).filter(|v| !v.is_null()).map(|v| (k, v)));
    let mut theta = f.f64_or("rope_theta", 10000.0)?;
    let Some((key, p)) = params else { return Ok((theta, None)) };
    let po = p.as_object().ok_or_else(|| ModelError::config(key, "must be an object"))?;
    let pf = Fields(po);
    if let Some(t) = po.get("rope_theta").and_then(|v| v.as_f64()) {
        theta = t;
    }
    let kind = po.get("rope_type").or_else(|| po.get("type")).and_then(|v| v.as_str()).unwrap_or("default");
    match kind {
        "default" => Ok((theta, None)),
        "yarn" => {
            let orig = match po.get("original_max_position_embeddings").and_then(|v| v.as_u64()) {
                Some(v) => v as usize,
                None => f.usize_req("max_position_embeddings")?,
            };
            let yarn = Yarn {
                factor: pf.f64_req_in(key, "factor")?,
                original_max_position_embeddings: orig,
                beta_fast: pf.f64_or("beta_fast", 32.0)?,
                beta_slow: pf.f64_or("beta_slow", 1.0)?,
                mscale: pf.f64_or("mscale", 1.0)?,
                mscale_all_dim: pf.f64_or("mscale_all_dim", 0.0)?,
                attention_factor: po.get("attention_factor").and_then(|v| v.as_f64()),
                truncate: pf.bool_or("truncate", true)?,
            };
            Ok((theta, Some(yarn)))
        }
        other => {
            Err(ModelError::config(&format!("{key}.rope_type"), format!("`{other}` is unsupported (default or yarn)")))
        }
    }
}

/// Typed access to a JSON object's fields with errors naming the field.
struct Fields<'a>(&'a Map<String, Value>);

impl Fields<'_> {
    fn get(&self, k: &str) -> Option<&Value> {
        self.0.get(k).filter(|v| !v.is_null())
    }
    fn usize_opt(&self, k: &str) -> Result<Option<usize>> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .map(|x| Some(x as usize))
                .ok_or_else(|| ModelError::config(k, "must be a non-negative integer")),
        }
    }
    fn usize_req(&self, k: &str) -> Result<usize> {
        self.usize_opt(k)?.ok_or_else(|| ModelError::config(k, "is required"))
    }
    fn f64_or(&self, k: &str, d: f64) -> Result<f64> {
        match self.get(k) {
            None => Ok(d),
            Some(v) => v.as_f64().ok_or_else(|| ModelError::config(k, "must be a number")),
        }
    }
    fn f64_req_in(&self, parent: &str, k: &str) -> Result<f64> {
        self.get(k)
            .and_then(|v| v.as_f64())
            .ok_or_else(|| ModelError::config(&format!("{parent}.{k}"), "is required and must be a number"))
    }
    fn bool_or(&self, k: &str, d: bool) -> Result<bool> {
        match self.get(k) {
            None => Ok(d),
            Some(v) => v.as_bool().ok_or_else(|| ModelError::config(k, "must be true or false")),
        }
    }
    fn str_or<'s>(&'s self, k: &str, d: &'s str) -> Result<&'s str> {
        match self.get(k) {
            None => Ok(d),
            Some(v) => v.as_str().ok_or_else(|| ModelError::config(k, "must be a string")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn v3() -> Value {
        json!({
            "model_type": "deepseek_v3", "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432,
            "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_nextn_predict_layers": 1,
            "num_attention_heads": 128, "num_key_value_heads": 128, "q_lora_rank": 1536, "kv_lora_rank": 512,
            "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128, "n_routed_experts": 256,
            "n_shared_experts": 1, "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4, "topk_method": "noaux_tc",
            "scoring_func": "sigmoid", "norm_topk_prob": true, "routed_scaling_factor": 2.5,
            "first_k_dense_replace": 3, "moe_layer_freq": 1, "rms_norm_eps": 1e-6, "rope_theta": 10000,
            "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                             "original_max_position_embeddings": 4096, "type": "yarn"},
            "max_position_embeddings": 163840, "bos_token_id": 0, "eos_token_id": 1,
            "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]}
        })
    }

    #[test]
    fn parses_the_official_config() {
        let c = Config::from_json(&v3()).unwrap();
        assert_eq!(c.qk_head_dim(), 192);
        assert!((c.softmax_scale() - 0.13523378).abs() < 1e-7);
        assert_eq!(c.latent_cache_width(), 576);
        assert!(!c.is_moe_layer(2) && c.is_moe_layer(3) && c.is_moe_layer(61));
        assert_eq!(c.quantization.unwrap().weight_block_size, [128, 128]);
        assert_eq!(c.eos_token_ids, vec![1]);
    }

    #[test]
    fn reads_transformers5_rope_parameters() {
        let mut v = v3();
        let o = v.as_object_mut().unwrap();
        let rs = o.remove("rope_scaling").unwrap();
        o.remove("rope_theta");
        let mut rp = rs.as_object().unwrap().clone();
        rp.remove("type");
        rp.insert("rope_type".into(), json!("yarn"));
        rp.insert("rope_theta".into(), json!(50000.0));
        o.insert("rope_parameters".into(), Value::Object(rp));
        let c = Config::from_json(&v).unwrap();
        assert_eq!(c.rope_theta, 50000.0);
        assert_eq!(c.yarn.unwrap().factor, 40.0);
    }

    #[test]
    fn unsupported_values_name_the_field() {
        for (field, value, want) in [
            ("scoring_func", json!("relu"), "scoring_func"),
            ("topk_method", json!("random"), "topk_method"),
            ("model_type", json!("llama"), "model_type"),
            ("n_group", json!(7), "n_group"),
            ("hidden_size", json!("big"), "hidden_size"),
        ] {
            let mut v = v3();
            v[field] = value;
            let e = Config::from_json(&v).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
        let mut v = v3();
        v["quantization_config"]["fmt"] = json!("e5m2");
        assert!(Config::from_json(&v).unwrap_err().to_string().contains("quantization_config.fmt"));
        let mut v = v3();
        v["rope_scaling"]["type"] = json!("dynamic");
        assert!(Config::from_json(&v).unwrap_err().to_string().contains("rope_scaling.rope_type"));
    }

    #[test]
    fn q_lora_rank_null_and_v2_defaults() {
        let mut v = v3();
        v["q_lora_rank"] = Value::Null;
        v["model_type"] = json!("deepseek_v2");
        v.as_object_mut().unwrap().remove("scoring_func");
        v.as_object_mut().unwrap().remove("topk_method");
        v.as_object_mut().unwrap().remove("norm_topk_prob");
        let c = Config::from_json(&v).unwrap();
        assert_eq!(c.q_lora_rank, None);
        assert_eq!(c.scoring_func, ScoringFunc::Softmax);
        assert_eq!(c.topk_method, TopkMethod::Greedy);
        assert!(!c.norm_topk_prob);
    }

    /// The release's size: 671B in the main model plus the 14B MTP module (the model card's 685B).
    #[test]
    fn counts_the_releases_parameters() {
        let n = Config::from_json(&v3()).unwrap().param_count();
        assert!((n / 685e9 - 1.0).abs() < 0.01, "{n}");
    }

    #[test]
    fn values_outside_their_domain_name_the_field_and_value() {
        let cases = [
            ("rms_norm_eps", json!(0.0), "rms_norm_eps"),
            ("rms_norm_eps", json!(-1e-6), "-0.000001"),
            ("rope_theta", json!(0), "rope_theta"),
            ("routed_scaling_factor", json!(-2.5), "routed_scaling_factor"),
            ("num_hidden_layers", json!(0), "num_hidden_layers"),
            ("max_position_embeddings", json!(0), "max_position_embeddings"),
            ("qk_rope_head_dim", json!(0), "qk_rope_head_dim"),
            ("intermediate_size", json!(0), "intermediate_size"),
            ("topk_group", json!(9), "topk_group"),
            ("num_experts_per_tok", json!(257), "num_experts_per_tok"),
            ("eos_token_id", json!(129280), "eos_token_id"),
            ("vocab_size", json!(1u64 << 40), "parameters"),
            ("hidden_size", json!(u64::MAX), "parameters"),
        ];
        for (field, value, want) in cases {
            let mut v = v3();
            v[field] = value.clone();
            let e = Config::from_json(&v).unwrap_err().to_string();
            assert!(e.contains(want), "{field} = {value}: {e}");
        }
        for (field, value) in [
            ("factor", json!(0.5)),
            ("factor", json!(0)),
            ("beta_fast", json!(0)),
            ("mscale", json!(-1)),
            ("original_max_position_embeddings", json!(0)),
        ] {
            let mut v = v3();
            v["rope_scaling"][field] = value.clone();
            let e = Config::from_json(&v).unwrap_err().to_string();
            assert!(e.contains(&format!("rope_scaling.{field}")), "{field} = {value}: {e}");
        }
    }

    /// V3.2: the release's indexer (64 heads × 128, top 2048) and UE8M0 activation scales; its
    /// fields are checked like every other.
    #[test]
    fn v32_indexer_and_ue8m0_scales() {
        let mut v = v3();
        v["model_type"] = json!("deepseek_v32");
        v["quantization_config"]["scale_fmt"] = json!("ue8m0");
        (v["index_n_heads"], v["index_head_dim"], v["index_topk"]) = (json!(64), json!(128), json!(2048));
        let c = Config::from_json(&v).unwrap();
        assert_eq!(c.indexer, Some(Indexer { n_heads: 64, head_dim: 128, topk: 2048 }));
        assert_eq!(c.quantization.as_ref().map(|q| q.scale_fmt), Some(ScaleFmt::Ue8m0));
        assert_eq!(c.latent_cache_width(), 576 + 128);
        assert!(Config::from_json(&v3()).unwrap().indexer.is_none());
        for (field, value, want) in [
            ("index_topk", json!(0), "index_topk"),
            ("index_head_dim", json!(32), "index_head_dim"),
            ("index_n_heads", json!(1u64 << 40), "index_n_heads"),
            ("q_lora_rank", Value::Null, "q_lora_rank"),
        ] {
            let mut w = v.clone();
            w[field] = value;
            let e = Config::from_json(&w).unwrap_err().to_string();
            assert!(e.contains(want), "{field}: {e}");
        }
        let mut w = v.clone();
        w.as_object_mut().unwrap().remove("index_topk");
        assert!(Config::from_json(&w).unwrap_err().to_string().contains("index_topk"));
        w = v.clone();
        w["quantization_config"]["scale_fmt"] = json!("e8m0fnu");
        assert!(Config::from_json(&w).unwrap_err().to_string().contains("scale_fmt"));
    }
}
