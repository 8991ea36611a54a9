//! One training step of the whole model: forward over a batch of packed sequences, the LM loss,
//! the MTP losses (spec §4: depth-k labels rolled k more steps, last positions masked,
//! `L_MTP = λ/D·Σ_k L_k`), the balance losses, and the backward into [`Grads`].

use super::layers::{cross_entropy, embedding_backward, MlpSaved};
use super::mla::MlaSaved;
use super::moe::{Balance, MoeSaved};
use super::{add_into, Grads};
use crate::error::{ModelError, Result};
use crate::model::{DecoderLayer, DeepseekV3, Ffn};
use crate::rope::Rope;

/// The loss terms' weights.
#[derive(Clone, Copy, Debug)]
pub struct LossWeights {
    /// λ of `L_MTP = λ/D·Σ_k L_k`.
    pub mtp_lambda: f32,
    pub balance: Balance,
}

/// What one step computed.
#[derive(Clone, Debug, Default)]
pub struct StepReport {
    /// The total loss that was differentiated.
    pub loss: f64,
    /// Main next-token cross-entropy.
    pub lm_loss: f64,
    /// Cross-entropy of each MTP depth (unweighted).
    pub mtp_losses: Vec<f64>,
    pub balance_loss: f64,
    /// Per MoE layer (main layers, then MTP blocks): its layer index and tokens per expert.
    pub load: Vec<(usize, Vec<usize>)>,
    /// Top-1 agreement of MTP depth 1 with the token two ahead (what a speculative decoder accepts).
    pub mtp_top1: Option<f64>,
    pub tokens: usize,
}

#[allow(clippy::large_enum_variant)] // one per layer and step
enum FfnSaved {
    Dense(MlpSaved),
    Moe(MoeSaved),
}

struct LayerSaved {
    h_in: Vec<f32>,
    attn: MlaSaved,
    h_mid: Vec<f32>,
    ffn: FfnSaved,
}

/// What the head's backward needs (the last stage).
struct TailSaved {
    h_last: Vec<f32>,
    hf: Vec<f32>,
    d_logits: Vec<f32>,
    #[allow(clippy::type_complexity)]
    mtp_saved: Vec<(Vec<u32>, Vec<f32>, Vec<f32>, Vec<f32>, LayerSaved, Vec<f32>, Vec<f32>)>,
}

/// What [`DeepseekV3::stage_backward`] needs from [`DeepseekV3::stage_forward`].
pub struct StageSaved {
    inputs: Vec<u32>,
    layers: Vec<LayerSaved>,
    tail: Option<TailSaved>,
}

impl DecoderLayer {
    #[allow(clippy::too_many_arguments)]
    fn forward_train(
        &self,
        h: &mut [f32],
        seqs: usize,
        t: usize,
        rope: &Rope,
        bal: Balance,
        report: &mut StepReport,
        index: usize,
    ) -> LayerSaved {
        let h_in = h.to_vec();
        let (a, attn) = self.self_attn.forward_train(&self.input_layernorm.forward(h), seqs, t, rope);
        add_into(h, &a);
        let h_mid = h.to_vec();
        let x = self.post_attention_layernorm.forward(h);
        let (f, ffn) = match &self.mlp {
            Ffn::Dense(m) => {
                let (f, s) = m.forward_train(&x, seqs * t);
                (f, FfnSaved::Dense(s))
            }
            Ffn::Moe(m) => {
                let (f, s, stats) = m.forward_train(&x, seqs, t, bal);
                report.balance_loss += stats.balance_loss;
                report.load.push((index, stats.load));
                (f, FfnSaved::Moe(s))
            }
        };
        add_into(h, &f);
        LayerSaved { h_in, attn, h_mid, ffn }
    }

    /// `dh` is the gradient of the layer's output; returns that of its input.
    fn backward(&self, name: &str, s: &LayerSaved, dh: &[f32], rope: &Rope, g: &mut Grads) -> Vec<f32> {
        let dx = match (&self.mlp, &s.ffn) {
            (Ffn::Dense(m), FfnSaved::Dense(sv)) => m.backward(&format!("{name}.mlp"), sv, dh, g),
            (Ffn::Moe(m), FfnSaved::Moe(sv)) => m.backward(&format!("{name}.mlp"), sv, dh, g),
            _ => unreachable!("the saved FFN matches the layer"),
        };
        let mut d_mid =
            self.post_attention_layernorm.backward(&format!("{name}.post_attention_layernorm"), &s.h_mid, &dx, g);
        add_into(&mut d_mid, dh);
        let da = self.self_attn.backward(&format!("{name}.self_attn"), &s.attn, &d_mid, rope, g);
        let mut d_in = self.input_layernorm.backward(&format!("{name}.input_layernorm"), &s.h_in, &da, g);
        add_into(&mut d_in, &d_mid);
        d_in
    }
}

impl DeepseekV3 {
    fn head_name(&self) -> &'static str {
        if self.lm_head.is_some() {
            "lm_head"
        } else {
            "model.embed_tokens"
        }
    }

    fn head_backward(&self, hf: &[f32], d_logits: &[f32], n: usize, g: &mut Grads) -> Vec<f32> {
        let head = self.lm_head.as_ref().unwrap_or(&self.embed_tokens);
        let (v, d) = (head.rows, head.cols);
        g.weight_grad(format!("{}.weight", self.head_name()), d_logits, hf, n, v, d, None);
        super::input_grad(head, d_logits, n)
    }

    /// Forward and backward over `tokens [seqs, t + 1]` (inputs `[.., ..t]`, labels shifted by one),
    /// adding every parameter's gradient into `g`. With `g = None` only the losses are computed
    /// (validation).
    pub fn train_step(
        &self,
        tokens: &[u32],
        seqs: usize,
        t: usize,
        w: LossWeights,
        g: Option<&mut Grads>,
    ) -> Result<StepReport> {
        Self::training(|| self.train_step_on_pool(tokens, seqs, t, w, g))
    }

    /// Runs `f` as a training step runs: on a pool worker, with the caller's FP8 recipe and the
    /// many-token GEMM (pipeline stages call [`DeepseekV3::stage_forward`] through this, so a
    /// stage computes exactly what `train_step` does). It matters: `logits` hops onto the pool
    /// itself, and from a thread outside the pool that hop would lose the thread-local GEMM
    /// setting and take the GEMV path for the head (1e-9 apart).
    pub fn training<R: Send>(f: impl FnOnce() -> R + Send) -> R {
        // On a pool worker, which [`crate::model::on_pool`] gives this thread's FP8 recipe.
        crate::model::on_pool(|| dsv3_kernels::matmul::with_many_token_gemm(f))
    }

    /// [`DeepseekV3::training`] on the calling thread, with the FP8 recipe given (a thread may be
    /// new): for work that may wait on other processes (a pipeline stage's expert exchanges),
    /// which must not hold one of the pool's threads while it waits — with a forward and a
    /// backward at once, each waiting on a worker, a one-thread pool would deadlock.
    pub fn training_here<R>(fp8: Option<super::fp8::Fp8Recipe>, f: impl FnOnce() -> R) -> R {
        super::fp8::with_recipe(fp8, || dsv3_kernels::matmul::with_many_token_gemm(f))
    }

    fn train_step_on_pool(
        &self,
        tokens: &[u32],
        seqs: usize,
        t: usize,
        w: LossWeights,
        g: Option<&mut Grads>,
    ) -> Result<StepReport> {
        if seqs == 0 || t == 0 || tokens.len() != seqs * (t + 1) {
            return Err(ModelError::Input(format!("train_step: {} tokens is not {seqs} × ({t} + 1)", tokens.len())));
        }
        self.embed(tokens)?; // vocabulary check
        let mut report = StepReport { tokens: seqs * t, ..Default::default() };
        let all = 0..self.layers.len();
        let (_, saved) = self.stage_forward(all.clone(), tokens, seqs, t, w, None, &mut report)?;
        report.loss = report.lm_loss
            + report.mtp_losses.iter().sum::<f64>() * (w.mtp_lambda / self.mtp.len().max(1) as f32) as f64
            + report.balance_loss;
        let Some(g) = g else { return Ok(report) };
        self.stage_backward(all, saved, vec![], seqs, t, g)?;
        Ok(report)
    }

    /// One pipeline stage's forward: the decoder layers `layers` (after the embedding of the
    /// micro-batch's inputs when the range starts at 0, else on `input`), and when it ends at the
    /// last layer also the head: final norm, LM loss and the MTP modules. Returns the output
    /// hidden states (empty at the last stage) and what [`DeepseekV3::stage_backward`] needs.
    /// Losses and expert loads go into `report`.
    #[allow(clippy::too_many_arguments)]
    pub fn stage_forward(
        &self,
        layers: std::ops::Range<usize>,
        tokens: &[u32],
        seqs: usize,
        t: usize,
        w: LossWeights,
        input: Option<Vec<f32>>,
        report: &mut StepReport,
    ) -> Result<(Vec<f32>, StageSaved)> {
        let (n, d, v) = (seqs * t, self.config.hidden_size, self.config.vocab_size);
        let at = |b: usize, i: usize| tokens[b * (t + 1) + i];
        let inputs: Vec<u32> = (0..seqs).flat_map(|b| (0..t).map(move |i| at(b, i))).collect();
        let mut h = match input {
            Some(h) if layers.start > 0 => h,
            _ => self.embed(&inputs)?,
        };
        let mut saved = Vec::with_capacity(layers.len());
        for l in layers.clone() {
            saved.push(self.layers[l].forward_train(&mut h, seqs, t, &self.rope, w.balance, report, l));
        }
        if layers.end < self.layers.len() {
            return Ok((h, StageSaved { inputs, layers: saved, tail: None }));
        }
        let labels: Vec<u32> = (0..seqs).flat_map(|b| (0..t).map(move |i| at(b, i + 1))).collect();
        let h_last = h;
        let hf = self.norm.forward(&h_last);
        let logits = self.logits(&hf, n);
        let (lm_loss, d_logits) = cross_entropy(&logits, &labels, &vec![true; n], 1.0);
        report.lm_loss = lm_loss;

        // MTP depth k (1-based) at position i reads the token at i + k and predicts i + k + 1.
        let depth = self.mtp.len();
        let mut mtp_saved = vec![];
        let mut h_prev = hf.clone();
        for (j, m) in self.mtp.iter().enumerate() {
            let k = j + 1;
            let ids: Vec<u32> =
                (0..seqs).flat_map(|b| (0..t).map(move |i| if i + k <= t { at(b, i + k) } else { 0 })).collect();
            let lab: Vec<u32> =
                (0..seqs).flat_map(|b| (0..t).map(move |i| if i + k < t { at(b, i + k + 1) } else { 0 })).collect();
            let mask: Vec<bool> = (0..n).map(|r| r % t + k < t).collect();
            let emb = self.embed(&ids)?;
            let e = m.enorm.forward(&emb);
            let hn = m.hnorm.forward(&h_prev);
            let cat: Vec<f32> =
                (0..n).flat_map(|r| e[r * d..(r + 1) * d].iter().chain(&hn[r * d..(r + 1) * d]).copied()).collect();
            let mut z = m.eh_proj.forward(&cat, n);
            let block = m.block.forward_train(&mut z, seqs, t, &self.rope, w.balance, report, self.layers.len() + j);
            let hk = m.shared_head_norm.forward(&z);
            let lk = self.logits(&hk, n);
            let scale = w.mtp_lambda / depth as f32;
            let (loss_k, dl) = cross_entropy(&lk, &lab, &mask, scale);
            report.mtp_losses.push(loss_k);
            if k == 1 {
                let (mut hit, mut cnt) = (0usize, 0usize);
                for r in (0..n).filter(|&r| mask[r]) {
                    let row = &lk[r * v..(r + 1) * v];
                    hit += (crate::sampling::argmax(row) as u32 == lab[r]) as usize;
                    cnt += 1;
                }
                report.mtp_top1 = Some(hit as f64 / cnt.max(1) as f64);
            }
            let next = hk.clone();
            mtp_saved.push((ids, std::mem::replace(&mut h_prev, next), cat, z, block, hk, dl));
        }
        let tail = TailSaved { h_last, hf, d_logits, mtp_saved };
        Ok((vec![], StageSaved { inputs, layers: saved, tail: Some(tail) }))
    }

    /// The backward of [`DeepseekV3::stage_forward`]: `d_out` is the gradient of the stage's
    /// output (ignored at the last stage, whose losses start the backward). Adds the stage's
    /// parameter gradients into `g`; returns the gradient of its input (empty at the first stage).
    pub fn stage_backward(
        &self,
        layers: std::ops::Range<usize>,
        s: StageSaved,
        d_out: Vec<f32>,
        seqs: usize,
        t: usize,
        g: &mut Grads,
    ) -> Result<Vec<f32>> {
        let (n, d) = (seqs * t, self.config.hidden_size);
        let mut dh = match s.tail {
            None => d_out,
            Some(TailSaved { h_last, hf, d_logits, mtp_saved }) => {
                // Backward: MTP modules last to first, each handing a gradient to its h_prev.
                let mut d_next: Option<Vec<f32>> = None;
                for (j, (ids, h_prev, cat, z, block, hk, dl)) in mtp_saved.iter().enumerate().rev() {
                    let m = &self.mtp[j];
                    let name = format!("model.layers.{}", self.layers.len() + j);
                    let mut dhk = self.head_backward(hk, dl, n, g);
                    if let Some(dn) = d_next.take() {
                        add_into(&mut dhk, &dn);
                    }
                    let dz = m.shared_head_norm.backward(&format!("{name}.shared_head.norm"), z, &dhk, g);
                    let dz = m.block.backward(&name, block, &dz, &self.rope, g);
                    let dcat = m.eh_proj.backward(&format!("{name}.eh_proj"), cat, &dz, n, g);
                    let (mut de, mut dhn) = (vec![0f32; n * d], vec![0f32; n * d]);
                    for r in 0..n {
                        de[r * d..(r + 1) * d].copy_from_slice(&dcat[r * 2 * d..r * 2 * d + d]);
                        dhn[r * d..(r + 1) * d].copy_from_slice(&dcat[r * 2 * d + d..(r + 1) * 2 * d]);
                    }
                    let emb = self.embed(ids)?;
                    let demb = m.enorm.backward(&format!("{name}.enorm"), &emb, &de, g);
                    embedding_backward("model.embed_tokens", &self.embed_tokens, ids, &demb, g);
                    d_next = Some(m.hnorm.backward(&format!("{name}.hnorm"), h_prev, &dhn, g));
                }
                let mut dhf = self.head_backward(&hf, &d_logits, n, g);
                if let Some(dn) = d_next {
                    add_into(&mut dhf, &dn);
                }
                self.norm.backward("model.norm", &h_last, &dhf, g)
            }
        };
        for (l, sv) in layers.clone().zip(&s.layers).rev() {
            dh = self.layers[l].backward(&format!("model.layers.{l}"), sv, &dh, &self.rope, g);
        }
        if layers.start > 0 {
            return Ok(dh);
        }
        embedding_backward("model.embed_tokens", &self.embed_tokens, &s.inputs, &dh, g);
        Ok(vec![])
    }
}
