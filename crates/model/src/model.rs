//! The DeepSeek-V3 transformer (spec §1): embedding, decoder layers (MLA + dense or MoE FFN), final
//! norm, LM head, and the MTP modules (layers `num_hidden_layers..`). One definition, loaded from a
//! Hugging Face folder.

use crate::config::Config;
use crate::error::{ModelError, Result};
use crate::exec::Exec;
use crate::experts::ExpertDispatch;
use crate::grad::add_into;
use crate::grad::model::{FfnSaved, LayerSaved, MtpSaved};
use crate::layers::{Mlp, RmsNorm};
use crate::mla::{AttnImpl, LatentCache, Mla, Seqs};
use crate::moe::Moe;
use crate::paged::BlockPool;
use crate::rope::Rope;
use crate::weights::{Checkpoint, Matrix};
use dsv3_kernels::matmul::matmul_nt;
use std::path::Path;
use std::sync::Arc;

#[derive(Clone)]
#[allow(clippy::large_enum_variant)] // one per layer
pub enum Ffn {
    Dense(Mlp),
    Moe(Moe),
}

/// Pre-norm residual block: `h += MLA(norm(h)); h += FFN(norm(h))`.
#[derive(Clone)]
pub struct DecoderLayer {
    pub input_layernorm: RmsNorm,
    pub self_attn: Mla,
    pub post_attention_layernorm: RmsNorm,
    pub mlp: Ffn,
}

impl DecoderLayer {
    pub fn load(ck: &Checkpoint, l: usize, cfg: &Config, block: [usize; 2]) -> Result<Self> {
        let p = format!("model.layers.{l}");
        let (d, eps) = (cfg.hidden_size, cfg.rms_norm_eps);
        let mlp = if cfg.is_moe_layer(l) {
            // Its place among the MoE layers (main layers first, then the MTP blocks).
            let index = (0..l).filter(|&j| cfg.is_moe_layer(j)).count();
            Ffn::Moe(Moe::load(ck, &format!("{p}.mlp"), cfg, block, index)?)
        } else {
            Ffn::Dense(Mlp::load(ck, &format!("{p}.mlp"), d, cfg.intermediate_size, block)?)
        };
        Ok(DecoderLayer {
            input_layernorm: RmsNorm::load(ck, &format!("{p}.input_layernorm"), d, eps)?,
            self_attn: Mla::load(ck, &format!("{p}.self_attn"), cfg, block)?,
            post_attention_layernorm: RmsNorm::load(ck, &format!("{p}.post_attention_layernorm"), d, eps)?,
            mlp,
        })
    }

    /// `h [n, D]` in place for the rows of `seqs`: `h += MLA(norm(h)); h += FFN(norm(h))`. With
    /// `tape` (whole sequences), what [`DecoderLayer::backward`] needs is kept there.
    pub fn forward(
        &self,
        cx: &Exec,
        h: &mut [f32],
        seqs: &mut Seqs,
        rope: &Rope,
        tape: Option<&mut Option<LayerSaved>>,
    ) -> Result<()> {
        let n = seqs.rows();
        let record = tape.is_some();
        let h_in = record.then(|| h.to_vec());
        let mut attn = None;
        let a = self.self_attn.forward(cx, &self.input_layernorm.forward(h), seqs, rope, record.then_some(&mut attn));
        add_into(h, &a);
        let h_mid = record.then(|| h.to_vec());
        let x = self.post_attention_layernorm.forward(h);
        let (f, ffn) = match &self.mlp {
            Ffn::Dense(m) => {
                let mut s = None;
                let f = m.forward(cx, &x, n, record.then_some(&mut s));
                (f, s.map(FfnSaved::Dense))
            }
            Ffn::Moe(m) => {
                let mut s = None;
                let (f, _) = m.forward(cx, &x, n, record.then_some(&mut s))?;
                (f, s.map(FfnSaved::Moe))
            }
        };
        add_into(h, &f);
        if let (Some(tape), Some(h_in), Some(h_mid), Some(attn), Some(ffn)) = (tape, h_in, h_mid, attn, ffn) {
            *tape = Some(LayerSaved { h_in, attn, h_mid, ffn });
        }
        Ok(())
    }

    /// Weight bytes one decode token reads (top-k experts, not all).
    pub fn active_bytes(&self, top_k: usize) -> usize {
        self.self_attn.bytes()
            + match &self.mlp {
                Ffn::Dense(m) => m.bytes(),
                Ffn::Moe(m) => {
                    let per = m.experts.first().map_or(0, |e| e.bytes());
                    per * top_k + m.shared_experts.as_ref().map_or(0, |s| s.bytes()) + m.gate.weight.view().bytes()
                }
            }
    }
}

/// One MTP module (spec §1 "MTP module"): `h' = eh_proj([enorm(emb(t_{i+1})) ; hnorm(h_i)])`, a
/// decoder block, then `shared_head.norm`; the embedding and head are the main model's.
#[derive(Clone)]
pub struct MtpLayer {
    pub enorm: RmsNorm,
    pub hnorm: RmsNorm,
    pub eh_proj: crate::layers::Linear,
    pub block: DecoderLayer,
    pub shared_head_norm: RmsNorm,
}

impl MtpLayer {
    /// `h' = eh_proj([enorm(emb) ; hnorm(h_prev)])` through the block, then `shared_head.norm`:
    /// `emb [n, D]` embeds the tokens one step ahead, `h_prev [n, D]` are the previous depth's
    /// states. With `tape`, what the backward needs is kept there.
    pub fn forward(
        &self,
        cx: &Exec,
        emb: &[f32],
        h_prev: &[f32],
        seqs: &mut Seqs,
        rope: &Rope,
        tape: Option<&mut Option<MtpSaved>>,
    ) -> Result<Vec<f32>> {
        let n = seqs.rows();
        let d = h_prev.len() / n.max(1);
        let e = self.enorm.forward(emb);
        let g = self.hnorm.forward(h_prev);
        // [n, 2D]
        let cat: Vec<f32> =
            (0..n).flat_map(|r| e[r * d..(r + 1) * d].iter().chain(&g[r * d..(r + 1) * d]).copied()).collect();
        let mut z = self.eh_proj.forward(cx, &cat, n);
        let mut block = None;
        let record = tape.is_some();
        self.block.forward(cx, &mut z, seqs, rope, record.then_some(&mut block))?;
        let hk = self.shared_head_norm.forward(&z);
        if let (Some(tape), Some(block)) = (tape, block) {
            *tape = Some(MtpSaved { cat, z, block });
        }
        Ok(hk)
    }
}

/// Latent caches of the main layers and of each MTP module.
#[derive(Clone, Debug, Default)]
pub struct KvCache {
    pub layers: Vec<LatentCache>,
    pub mtp: Vec<LatentCache>,
}

impl KvCache {
    /// Positions held by the main model.
    pub fn len(&self) -> usize {
        self.layers.first().map_or(0, |c| c.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

pub struct DeepseekV3 {
    pub config: Config,
    pub embed_tokens: Matrix,
    pub layers: Vec<DecoderLayer>,
    pub norm: RmsNorm,
    /// `None` when tied to the embedding.
    pub lm_head: Option<Matrix>,
    pub mtp: Vec<MtpLayer>,
    pub rope: Rope,
    pub attn_impl: AttnImpl,
    /// How inference computes (`--act-quant`); training passes its own [`Exec`].
    pub inference: crate::exec::Inference,
    /// How training computes (bf16 compute, the FP8 recipe): set by the trainer.
    pub training: crate::exec::Training,
    /// Where the routed experts run ([`crate::experts::Local`] unless set from outside).
    experts: Arc<dyn ExpertDispatch>,
    /// LoRA adapters served per request ([`Self::serve_adapter`]): slots `1..=served_adapters`.
    pub served_adapters: usize,
}

impl DeepseekV3 {
    /// Loads a Hugging Face folder (`config.json` and safetensors) or a GGUF file (one part of a
    /// split names them all).
    pub fn load(path: &Path) -> Result<Self> {
        let (config, ck) = Self::open(path)?;
        Self::from_checkpoint(config, &ck)
    }

    /// [`DeepseekV3::load`] leaving the weights `skip` names on disk ([`Matrix::absent`]): a process
    /// of a parallel run loads what it holds.
    pub fn load_skipping(path: &Path, skip: impl Fn(&str) -> bool + Send + Sync + 'static) -> Result<Self> {
        let (config, ck) = Self::open(path)?;
        Self::from_checkpoint(config, &ck.skipping(skip))
    }

    /// The config of the model at `path` (folder or GGUF file), without loading weights.
    pub fn config_at(path: &Path) -> Result<Config> {
        if crate::gguf::is_gguf(path) {
            return crate::gguf::Gguf::open(path)?.config();
        }
        Config::from_file(&path.join("config.json"))
    }

    fn open(path: &Path) -> Result<(Config, Checkpoint)> {
        if crate::gguf::is_gguf(path) {
            let g = crate::gguf::Gguf::open(path)?;
            let config = g.config()?;
            let ck = g.checkpoint(&config)?;
            return Ok((config, ck));
        }
        Ok((Config::from_file(&path.join("config.json"))?, Checkpoint::open(path)?))
    }

    pub fn from_checkpoint(config: Config, ck: &Checkpoint) -> Result<Self> {
        let cfg = &config;
        let block = cfg.quantization.as_ref().map_or([128, 128], |q| q.weight_block_size);
        let (v, d, eps) = (cfg.vocab_size, cfg.hidden_size, cfg.rms_norm_eps);
        let embed_tokens = ck.matrix("model.embed_tokens.weight", v, d, block)?;
        let layers =
            (0..cfg.num_hidden_layers).map(|l| DecoderLayer::load(ck, l, cfg, block)).collect::<Result<Vec<_>>>()?;
        let lm_head = if cfg.tie_word_embeddings && !ck.contains("lm_head.weight") {
            None
        } else {
            Some(ck.matrix("lm_head.weight", v, d, block)?)
        };
        let mut mtp = vec![];
        for k in 0..cfg.num_nextn_predict_layers {
            let l = cfg.num_hidden_layers + k;
            let p = format!("model.layers.{l}");
            // transformers drops the MTP layer when it saves; a folder without it still runs,
            // only without `--mtp`.
            if !ck.contains(&format!("{p}.eh_proj.weight")) {
                break;
            }
            mtp.push(MtpLayer {
                enorm: RmsNorm::load(ck, &format!("{p}.enorm"), d, eps)?,
                hnorm: RmsNorm::load(ck, &format!("{p}.hnorm"), d, eps)?,
                eh_proj: crate::layers::Linear::load(ck, &format!("{p}.eh_proj"), d, 2 * d, block)?,
                block: DecoderLayer::load(ck, l, cfg, block)?,
                shared_head_norm: RmsNorm::load(ck, &format!("{p}.shared_head.norm"), d, eps)?,
            });
        }
        let model = DeepseekV3 {
            norm: RmsNorm::load(ck, "model.norm", d, eps)?,
            rope: Rope::new(cfg),
            config: config.clone(),
            embed_tokens,
            layers,
            lm_head,
            mtp,
            attn_impl: AttnImpl::Auto,
            inference: Default::default(),
            training: Default::default(),
            experts: Arc::new(crate::experts::Local),
            served_adapters: 0,
        };
        model.check_unused(ck)?;
        Ok(model)
    }

    /// A tensor in a module dsv3 loaded that it did not read means the config and the checkpoint
    /// disagree (say, a bias the config does not declare): an error, not a silent skip.
    fn check_unused(&self, ck: &Checkpoint) -> Result<()> {
        let n = self.config.num_hidden_layers;
        let mut prefixes: Vec<String> = (0..n).map(|l| format!("model.layers.{l}.")).collect();
        prefixes.extend(["model.embed_tokens.".into(), "model.norm.".into(), "lm_head.".into()]);
        for k in 0..self.mtp.len() {
            prefixes.push(format!("model.layers.{}.", n + k));
        }
        for p in prefixes {
            for name in ck.unused_under(&p) {
                // The MTP module's copies of the shared embedding and head are not read (spec §2).
                let is_mtp_copy = name.ends_with(".embed_tokens.weight") || name.ends_with(".shared_head.head.weight");
                if name.starts_with("model.layers.") && is_mtp_copy || name.ends_with("rotary_emb.inv_freq") {
                    continue;
                }
                let file = ck.file_of(&name).map(Path::to_path_buf);
                return Err(ModelError::Tensor {
                    name,
                    file,
                    msg: "is not used by this config (unexpected tensor)".into(),
                });
            }
        }
        Ok(())
    }

    /// The MoE layers, main model first, then the MTP modules'.
    pub fn moe_layers(&self) -> Vec<&crate::moe::Moe> {
        self.layers
            .iter()
            .chain(self.mtp.iter().map(|m| &m.block))
            .filter_map(|l| match &l.mlp {
                Ffn::Moe(m) => Some(m),
                Ffn::Dense(_) => None,
            })
            .collect()
    }

    /// The MoE layers with their layer index (main layers, then MTP blocks as `L + j`).
    pub fn moe_layers_mut(&mut self) -> Vec<(usize, &mut Moe)> {
        let blocks = self.layers.iter_mut().chain(self.mtp.iter_mut().map(|m| &mut m.block));
        blocks
            .enumerate()
            .filter_map(|(l, ly)| match &mut ly.mlp {
                Ffn::Moe(m) => Some((l, m)),
                Ffn::Dense(_) => None,
            })
            .collect()
    }

    /// Runs the routed experts through `experts` (expert parallelism: a process's share of
    /// them, the rest on other processes); the model itself does not change.
    pub fn set_experts(&mut self, experts: Arc<dyn ExpertDispatch>) {
        self.experts = experts;
    }

    /// The dispatcher in use.
    pub fn experts(&self) -> &dyn ExpertDispatch {
        &*self.experts
    }

    /// How inference runs: the batch-invariant kernels, `self.inference`'s settings.
    pub fn exec(&self) -> Exec<'_> {
        self.with_scale_fmt(Exec::inference(self.inference, &*self.experts))
    }

    /// `cx` with the checkpoint's activation scale format (`quantization_config.scale_fmt`).
    pub fn with_scale_fmt<'a>(&self, mut cx: Exec<'a>) -> Exec<'a> {
        if let Some(q) = &self.config.quantization {
            cx.act_scale_fmt = q.scale_fmt;
        }
        cx
    }

    /// How training runs with `numerics`.
    pub fn training_exec(&self, numerics: crate::exec::Training) -> Exec<'_> {
        Exec::training(numerics, &*self.experts)
    }

    pub fn new_cache(&self) -> KvCache {
        self.new_cache_in(None)
    }

    /// A cache whose blocks count in `pool` (the server's budget).
    pub fn new_cache_in(&self, pool: Option<Arc<BlockPool>>) -> KvCache {
        KvCache {
            layers: vec![LatentCache::in_pool(pool.clone()); self.layers.len()],
            mtp: vec![LatentCache::in_pool(pool); self.mtp.len()],
        }
    }

    fn check_tokens(&self, tokens: &[u32]) -> Result<()> {
        if let Some(&bad) = tokens.iter().find(|&&t| t as usize >= self.config.vocab_size) {
            return Err(ModelError::Input(format!(
                "token id {bad} is outside the vocabulary of {}",
                self.config.vocab_size
            )));
        }
        Ok(())
    }

    /// `tokens [t]` → embeddings `[t, D]`.
    pub fn embed(&self, tokens: &[u32]) -> Result<Vec<f32>> {
        self.check_tokens(tokens)?;
        let d = self.config.hidden_size;
        let mut h = vec![0f32; tokens.len() * d];
        let w = self.embed_tokens.view();
        for (row, &tok) in h.chunks_exact_mut(d).zip(tokens) {
            w.decode_row(tok as usize, 0, row);
        }
        Ok(h)
    }

    /// Runs `tokens` after what the cache holds. Returns the post-final-norm hidden states `[t, D]`.
    pub fn forward(&self, tokens: &[u32], cache: &mut KvCache) -> Result<Vec<f32>> {
        Ok(self.forward_batch(&mut [(tokens, cache)])?.pop().unwrap_or_default())
    }

    /// Several sequences' new tokens in one pass (continuous batching): every weight is read once
    /// for all of them, attention is per sequence over its own cache. Returns each sequence's
    /// post-final-norm states, bit-identical to [`Self::forward`] on it alone (the GEMV kernel's
    /// per-token sums do not depend on the other tokens).
    pub fn forward_batch(&self, seqs: &mut [(&[u32], &mut KvCache)]) -> Result<Vec<Vec<f32>>> {
        self.forward_batch_adapted(seqs, None)
    }

    /// [`Self::forward_batch`] with each sequence's served LoRA adapter (`adapters[i]`: 0 for the
    /// base model, `k` for the one [`Self::serve_adapter`] gave slot `k`): one pass for all.
    pub fn forward_batch_adapted(
        &self,
        seqs: &mut [(&[u32], &mut KvCache)],
        adapters: Option<&[u16]>,
    ) -> Result<Vec<Vec<f32>>> {
        let d = self.config.hidden_size;
        if seqs.iter().any(|(_, c)| c.layers.len() != self.layers.len()) {
            return Err(ModelError::Input("cache was made for another model".into()));
        }
        let lens: Vec<usize> = seqs.iter().map(|(t, _)| t.len()).collect();
        let tokens: Vec<u32> = seqs.iter().flat_map(|(t, _)| t.iter().copied()).collect();
        let mut h = self.embed(&tokens)?;
        let rows: Option<Vec<u16>> = match adapters {
            Some(a) if a.len() != seqs.len() => {
                return Err(ModelError::Input(format!("{} adapters for {} sequences", a.len(), seqs.len())))
            }
            Some(a) if a.iter().any(|&k| k as usize > self.served_adapters) => {
                return Err(ModelError::Input(format!("adapter slots {a:?}: {} are served", self.served_adapters)))
            }
            Some(a) => Some(a.iter().zip(&lens).flat_map(|(&k, &t)| std::iter::repeat_n(k, t)).collect()),
            None => None,
        };
        let cx = Exec { adapters: rows.as_deref(), ..self.exec() };
        in_pool(|| {
            for (l, layer) in self.layers.iter().enumerate() {
                let mut caches: Vec<&mut LatentCache> = seqs.iter_mut().map(|(_, c)| &mut c.layers[l]).collect();
                let mut batch = Seqs::Cached { lens: &lens, caches: &mut caches, imp: self.attn_impl };
                layer.forward(&cx, &mut h, &mut batch, &self.rope, None)?;
            }
            Ok::<_, ModelError>(())
        })?;
        self.norm.forward_in_place(&mut h);
        let mut out = vec![];
        let mut r = 0;
        for &t in &lens {
            out.push(h[r * d..(r + t) * d].to_vec());
            r += t;
        }
        Ok(out)
    }

    /// `h [m, D]` → logits `[m, vocab]` (inference kernels).
    pub fn logits(&self, h: &[f32], m: usize) -> Vec<f32> {
        self.logits_with(&self.exec(), h, m)
    }

    /// `h [m, D]` → logits `[m, vocab]` computed as `cx` says.
    pub fn logits_with(&self, cx: &Exec, h: &[f32], m: usize) -> Vec<f32> {
        let head = self.lm_head.as_ref().unwrap_or(&self.embed_tokens);
        let mut y = vec![0f32; m * head.rows];
        in_pool(|| matmul_nt(&head.view(), 0..head.rows, h, m, &mut y, cx.gemm));
        y
    }

    /// MTP module `k` at positions `cache.mtp[k].len..`: `h_prev [t, D]` are the previous depth's
    /// hidden states (the main model's post-final-norm states for k = 0) and `next_tokens [t]` the
    /// tokens one step ahead. Returns the module's states after `shared_head.norm` `[t, D]`; feed
    /// them to [`Self::logits`].
    pub fn mtp_forward(&self, k: usize, h_prev: &[f32], next_tokens: &[u32], cache: &mut KvCache) -> Result<Vec<f32>> {
        let m = self.mtp.get(k).ok_or_else(|| ModelError::Input(format!("the checkpoint has no MTP module {k}")))?;
        let emb = self.embed(next_tokens)?;
        let cx = self.exec();
        let lens = [next_tokens.len()];
        in_pool(|| {
            let mut caches = [&mut cache.mtp[k]];
            let mut batch = Seqs::Cached { lens: &lens, caches: &mut caches, imp: self.attn_impl };
            m.forward(&cx, &emb, h_prev, &mut batch, &self.rope, None)
        })
    }

    /// Weight bytes one decode token reads: layers with top-k experts, one embedding row, the head.
    pub fn active_weight_bytes(&self) -> usize {
        let k = self.config.num_experts_per_tok;
        let head = self.lm_head.as_ref().unwrap_or(&self.embed_tokens).view().bytes();
        self.layers.iter().map(|l| l.active_bytes(k)).sum::<usize>()
            + head
            + self.embed_tokens.view().bytes() / self.config.vocab_size
    }

    /// Latent-cache bytes per token over the main layers.
    pub fn kv_bytes_per_token(&self) -> usize {
        self.latent_bytes_per_token_layer() * self.layers.len()
    }

    /// Latent-cache bytes one position takes in one layer: f32 latent and rope key, and V3.2's
    /// index key in f32 or, with the official indexer numerics, E4M3 plus a scale per 128.
    pub fn latent_bytes_per_token_layer(&self) -> usize {
        let f = std::mem::size_of::<f32>();
        let index = match self.config.indexer {
            Some(ix) if self.inference.indexer_fp8 => ix.head_dim + ix.head_dim.div_ceil(128) * f,
            Some(ix) => ix.head_dim * f,
            None => 0,
        };
        (self.config.kv_lora_rank + self.config.qk_rope_head_dim) * f + index
    }
}

impl KvCache {
    /// Keeps the first `len` positions of every main layer (a chat turn that shares a prefix with
    /// the last one reuses it; the MTP caches are cleared).
    pub fn truncate(&mut self, len: usize) {
        self.layers.iter_mut().for_each(|l| l.truncate(len));
        self.mtp.iter_mut().for_each(|l| l.truncate(0));
    }

    /// Keeps the first `len` positions of the main layers only (speculative rollback).
    pub fn truncate_main(&mut self, len: usize) {
        self.layers.iter_mut().for_each(|l| l.truncate(len));
    }

    /// Keeps the first `len` positions of every MTP module's cache.
    pub fn truncate_mtp(&mut self, len: usize) {
        self.mtp.iter_mut().for_each(|l| l.truncate(len));
    }

    /// Blocks the main layers hold (one per layer per 64 positions).
    pub fn blocks(&self) -> usize {
        self.layers.iter().chain(&self.mtp).map(|l| l.blocks().len()).sum()
    }
}

/// Runs `f` on a worker of rayon's pool. A decode step's many small parallel jobs are then forked
/// from a worker (cheap local queue) instead of injected from outside the pool, which would wake a
/// sleeping thread and park the caller once per matrix. Scheduling only: every setting `f` needs
/// is in its arguments.
pub fn in_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| f())
}
