//! The DeepSeek-V3 transformer (spec §1): embedding, decoder layers (MLA + dense or MoE FFN), final
//! norm, LM head, and the MTP modules (layers `num_hidden_layers..`). One definition, loaded from a
//! Hugging Face folder.

use crate::config::Config;
use crate::error::{ModelError, Result};
use crate::layers::{Mlp, RmsNorm};
use crate::mla::{AttnImpl, LatentCache, Mla};
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
            Ffn::Moe(Moe::load(ck, &format!("{p}.mlp"), cfg, block)?)
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

    /// `h [t, D]` in place.
    pub fn forward(&self, h: &mut [f32], t: usize, cache: &mut LatentCache, rope: &Rope, imp: AttnImpl) {
        self.forward_segments(h, &[t], &mut [cache], rope, imp);
    }

    /// Several sequences' rows at once (see [`Mla::forward_segments`]); the FFN is per token.
    pub fn forward_segments(
        &self,
        h: &mut [f32],
        lens: &[usize],
        caches: &mut [&mut LatentCache],
        rope: &Rope,
        imp: AttnImpl,
    ) {
        let n: usize = lens.iter().sum();
        let a = self.self_attn.forward_segments(&self.input_layernorm.forward(h), lens, caches, rope, imp);
        h.iter_mut().zip(&a).for_each(|(h, a)| *h += a);
        let x = self.post_attention_layernorm.forward(h);
        let f = match &self.mlp {
            Ffn::Dense(m) => m.forward(&x, n),
            Ffn::Moe(m) => m.forward(&x, n).0,
        };
        h.iter_mut().zip(&f).for_each(|(h, f)| *h += f);
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
}

impl DeepseekV3 {
    /// Loads `config.json` and the safetensors of a Hugging Face folder.
    pub fn load(dir: &Path) -> Result<Self> {
        let config = Config::from_file(&dir.join("config.json"))?;
        let ck = Checkpoint::open(dir)?;
        Self::from_checkpoint(config, &ck)
    }

    /// [`DeepseekV3::load`] leaving the weights `skip` names on disk ([`Matrix::absent`]): a process
    /// of a parallel training run loads what it holds.
    pub fn load_skipping(dir: &Path, skip: impl Fn(&str) -> bool + Send + Sync + 'static) -> Result<Self> {
        let config = Config::from_file(&dir.join("config.json"))?;
        let ck = Checkpoint::open(dir)?.skipping(skip);
        Self::from_checkpoint(config, &ck)
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

    /// Expert-parallel training: every MoE layer exchanges its rows through `ex`; the routed
    /// experts other processes own should then be dropped ([`DeepseekV3::drop_params`]).
    pub fn set_expert_exchange(&mut self, ex: Arc<dyn crate::grad::moe::ExpertExchange>) {
        self.set_expert_exchanges(ex.clone(), ex);
    }

    /// [`DeepseekV3::set_expert_exchange`] with the backward's exchanges on a channel of their
    /// own, so that a forward and a backward may run at the same time ([`DeepseekV3::exchanges_apart`]).
    pub fn set_expert_exchanges(
        &mut self,
        forward: Arc<dyn crate::grad::moe::ExpertExchange>,
        backward: Arc<dyn crate::grad::moe::ExpertExchange>,
    ) {
        for (_, m) in self.moe_layers_mut() {
            m.ep_train = Some(crate::grad::moe::Exchanges { forward: forward.clone(), backward: backward.clone() });
        }
    }

    /// Whether training exchanges expert rows, the forward's and the backward's on different
    /// channels: a forward and a backward may then run at the same time, one's exchanges hidden
    /// behind the other's computation.
    pub fn exchanges_apart(&self) -> bool {
        let moes = self.moe_layers();
        !moes.is_empty()
            && moes.iter().all(|m| m.ep_train.as_ref().is_some_and(|x| !Arc::ptr_eq(&x.forward, &x.backward)))
    }

    /// Computes the routed experts of every MoE layer through `ep` (expert parallelism).
    pub fn set_expert_parallel(&mut self, ep: Arc<dyn crate::moe::ExpertParallel>) {
        for (id, (_, m)) in self.moe_layers_mut().into_iter().enumerate() {
            m.ep = Some((id, ep.clone()));
        }
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
        let t = tokens.len();
        if cache.layers.len() != self.layers.len() {
            return Err(ModelError::Input("cache was made for another model".into()));
        }
        let mut h = self.embed(tokens)?;
        on_pool(|| {
            for (layer, c) in self.layers.iter().zip(cache.layers.iter_mut()) {
                layer.forward(&mut h, t, c, &self.rope, self.attn_impl);
            }
        });
        self.norm.forward_in_place(&mut h);
        Ok(h)
    }

    /// Several sequences' new tokens in one pass (continuous batching): every weight is read once
    /// for all of them, attention is per sequence over its own cache. Returns each sequence's
    /// post-final-norm states, bit-identical to [`Self::forward`] on it alone (the GEMV kernel's
    /// per-token sums do not depend on the other tokens).
    pub fn forward_batch(&self, seqs: &mut [(&[u32], &mut KvCache)]) -> Result<Vec<Vec<f32>>> {
        let d = self.config.hidden_size;
        if seqs.iter().any(|(_, c)| c.layers.len() != self.layers.len()) {
            return Err(ModelError::Input("cache was made for another model".into()));
        }
        let lens: Vec<usize> = seqs.iter().map(|(t, _)| t.len()).collect();
        let tokens: Vec<u32> = seqs.iter().flat_map(|(t, _)| t.iter().copied()).collect();
        let mut h = self.embed(&tokens)?;
        on_pool(|| {
            for (l, layer) in self.layers.iter().enumerate() {
                let mut caches: Vec<&mut LatentCache> = seqs.iter_mut().map(|(_, c)| &mut c.layers[l]).collect();
                layer.forward_segments(&mut h, &lens, &mut caches, &self.rope, self.attn_impl);
            }
        });
        self.norm.forward_in_place(&mut h);
        let mut out = vec![];
        let mut r = 0;
        for &t in &lens {
            out.push(h[r * d..(r + t) * d].to_vec());
            r += t;
        }
        Ok(out)
    }

    /// `h [m, D]` → logits `[m, vocab]`.
    pub fn logits(&self, h: &[f32], m: usize) -> Vec<f32> {
        let head = self.lm_head.as_ref().unwrap_or(&self.embed_tokens);
        let mut y = vec![0f32; m * head.rows];
        on_pool(|| matmul_nt(&head.view(), 0..head.rows, h, m, &mut y));
        y
    }

    /// MTP module `k` at positions `cache.mtp[k].len..`: `h_prev [t, D]` are the previous depth's
    /// hidden states (the main model's post-final-norm states for k = 0) and `next_tokens [t]` the
    /// tokens one step ahead. Returns the module's states after `shared_head.norm` `[t, D]`; feed
    /// them to [`Self::logits`].
    pub fn mtp_forward(&self, k: usize, h_prev: &[f32], next_tokens: &[u32], cache: &mut KvCache) -> Result<Vec<f32>> {
        let m = self.mtp.get(k).ok_or_else(|| ModelError::Input(format!("the checkpoint has no MTP module {k}")))?;
        let (t, d) = (next_tokens.len(), self.config.hidden_size);
        let e = m.enorm.forward(&self.embed(next_tokens)?);
        let g = m.hnorm.forward(h_prev);
        let mut cat = Vec::with_capacity(t * 2 * d);
        for i in 0..t {
            cat.extend_from_slice(&e[i * d..(i + 1) * d]);
            cat.extend_from_slice(&g[i * d..(i + 1) * d]);
        }
        let mut h = m.eh_proj.forward(&cat, t);
        on_pool(|| m.block.forward(&mut h, t, &mut cache.mtp[k], &self.rope, self.attn_impl));
        m.shared_head_norm.forward_in_place(&mut h);
        Ok(h)
    }

    /// Weight bytes one decode token reads: layers with top-k experts, one embedding row, the head.
    pub fn active_weight_bytes(&self) -> usize {
        let k = self.config.num_experts_per_tok;
        let head = self.lm_head.as_ref().unwrap_or(&self.embed_tokens).view().bytes();
        self.layers.iter().map(|l| l.active_bytes(k)).sum::<usize>()
            + head
            + self.embed_tokens.view().bytes() / self.config.vocab_size
    }

    /// Latent-cache bytes per token over the main layers (f32 values).
    pub fn kv_bytes_per_token(&self) -> usize {
        self.config.latent_cache_width() * std::mem::size_of::<f32>() * self.layers.len()
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

/// Runs `f` on a thread of rayon's pool. The many small parallel jobs of a decode step are then
/// forked from a worker (cheap local queue) instead of injected from outside the pool, which
/// would wake a sleeping thread and park the caller once per matrix.
pub fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    // The calling thread's GEMM settings go along (from outside the pool, `f` runs on another
    // thread), so where `f` runs does not change a result.
    let (many, fp8) = (dsv3_kernels::matmul::many_token_gemm(), crate::grad::fp8::recipe());
    let mut out = None;
    rayon::scope(|_| {
        out = Some(crate::grad::fp8::with_recipe(fp8, || dsv3_kernels::matmul::with_many_token_gemm_set(many, f)))
    });
    out.expect("rayon::scope runs its closure")
}
