//! One training step of the whole model: forward over a batch of packed sequences, the LM loss,
//! the MTP losses (spec §4: depth-k labels rolled k more steps, last positions masked,
//! `L_MTP = λ/D·Σ_k L_k`), the balance losses, and the backward into [`Grads`].

use super::layers::{cross_entropy, embedding_backward, label_log_probs, log_prob_backward, MlpSaved};
use super::mla::MlaSaved;
use super::moe::{Balance, MoeSaved};
use super::{add_into, Grads};
use crate::error::{ModelError, Result};
use crate::exec::Exec;
use crate::mla::Seqs;
use crate::model::{DecoderLayer, DeepseekV3, Ffn};
use crate::rope::Rope;

/// The loss terms' weights.
#[derive(Clone, Copy, Debug)]
pub struct LossWeights {
    /// λ of `L_MTP = λ/D·Σ_k L_k`.
    pub mtp_lambda: f32,
    pub balance: Balance,
}

/// A loss of the labels' log-probabilities: its value and its gradient towards each.
pub type LogProbLoss<'a> = dyn Fn(&[f32]) -> (f64, Vec<f32>) + Sync + 'a;

/// What the main head's predictions are trained towards.
#[derive(Clone, Copy)]
pub enum Objective<'a> {
    /// The mean next-token cross-entropy over the labels a mask learns (`None`: every label),
    /// and the MTP losses under the same mask: pre-training and supervised fine-tuning.
    /// `mask[b * t + i]` says whether the token at `i + 1` of sequence `b` is learned.
    CrossEntropy(Option<&'a [bool]>),
    /// A loss of the labels' log-probabilities `log π(label)` (one per label, `[seqs, t]`): the
    /// function returns its value and `∂loss/∂log π` per label (policy gradients: GRPO). The
    /// log-probabilities are reported ([`StepReport::label_logprobs`]); the MTP modules do not run.
    LogProb(&'a LogProbLoss<'a>),
}

impl Objective<'_> {
    fn mask(&self) -> Option<&[bool]> {
        match self {
            Objective::CrossEntropy(m) => *m,
            Objective::LogProb(_) => None,
        }
    }
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
    /// V3.2's indexer loss `L_I`, summed over the layers (it trains only the indexers).
    pub indexer_loss: f64,
    /// A digest of the step's discrete choices, the experts each token went to and the positions
    /// each indexer chose: the loss is differentiable only where it stays fixed (finite-difference
    /// checks compare it).
    pub choice_digest: u64,
    /// Per MoE layer (main layers, then MTP blocks): its layer index and tokens per expert.
    pub load: Vec<(usize, Vec<usize>)>,
    /// Top-1 agreement of MTP depth 1 with the token two ahead (what a speculative decoder accepts).
    pub mtp_top1: Option<f64>,
    pub tokens: usize,
    /// Under [`Objective::LogProb`]: `log π(label)` per label, `[seqs, t]`.
    pub label_logprobs: Vec<f32>,
}

/// What a layer's FFN saved.
#[allow(clippy::large_enum_variant)] // one per layer and step
pub enum FfnSaved {
    Dense(MlpSaved),
    Moe(MoeSaved),
}

/// What [`DecoderLayer::backward`] needs from [`DecoderLayer::forward`].
pub struct LayerSaved {
    pub(crate) h_in: Vec<f32>,
    pub(crate) attn: MlaSaved,
    pub(crate) h_mid: Vec<f32>,
    pub(crate) ffn: FfnSaved,
}

/// What an MTP module's backward needs from [`crate::model::MtpLayer::forward`].
pub struct MtpSaved {
    pub(crate) cat: Vec<f32>,
    pub(crate) z: Vec<f32>,
    pub(crate) block: LayerSaved,
}

/// One MTP depth at the last stage: its input ids and previous states, its saved forward, its
/// output states and the gradient of its logits.
struct MtpStep {
    ids: Vec<u32>,
    h_prev: Vec<f32>,
    saved: MtpSaved,
    hk: Vec<f32>,
    d_logits: Vec<f32>,
}

/// What the head's backward needs (the last stage).
struct TailSaved {
    h_last: Vec<f32>,
    hf: Vec<f32>,
    d_logits: Vec<f32>,
    mtp: Vec<MtpStep>,
}

/// What [`DeepseekV3::stage_backward`] needs from [`DeepseekV3::stage_forward`].
pub struct StageSaved {
    inputs: Vec<u32>,
    layers: Vec<LayerSaved>,
    tail: Option<TailSaved>,
}

impl LossWeights {
    /// The prediction losses: `L_LM + λ/D·Σ_k L_k` over `depth` MTP modules (spec §4).
    pub fn prediction(&self, r: &StepReport, depth: usize) -> f64 {
        r.lm_loss + r.mtp_losses.iter().sum::<f64>() * (self.mtp_lambda / depth.max(1) as f32) as f64
    }

    /// The loss a step differentiates: the prediction losses, the balance losses and the
    /// indexers' (whose gradients reach only the indexers).
    pub fn total(&self, r: &StepReport, depth: usize) -> f64 {
        self.prediction(r, depth) + r.balance_loss + r.indexer_loss
    }
}

impl LayerSaved {
    /// The layer's indexer loss and choices into `report`.
    fn index_report(&self, report: &mut StepReport) {
        if let Some(i) = &self.attn.index {
            report.indexer_loss += i.loss;
            report.choice_digest = report.choice_digest.rotate_left(5) ^ i.digest;
        }
    }
}

impl FfnSaved {
    /// Expert loads and balance losses of a MoE layer's step, into `report` under layer `index`.
    fn balance(&mut self, seqs: usize, t: usize, bal: Balance, index: usize, report: &mut StepReport) {
        if let FfnSaved::Moe(m) = self {
            let stats = m.balance(seqs, t, bal);
            report.balance_loss += stats.balance_loss;
            report.choice_digest = report.choice_digest.rotate_left(5) ^ stats.digest;
            report.load.push((index, stats.load));
        }
    }
}

impl DecoderLayer {
    /// The training forward of layer `index` over whole sequences: [`DecoderLayer::forward`] with
    /// its tape, and the MoE's loads and balance losses into `report`.
    #[allow(clippy::too_many_arguments)]
    fn forward_saved(
        &self,
        cx: &Exec,
        h: &mut [f32],
        seqs: usize,
        t: usize,
        rope: &Rope,
        bal: Balance,
        report: &mut StepReport,
        index: usize,
    ) -> Result<LayerSaved> {
        let mut tape = None;
        self.forward(cx, h, &mut Seqs::Fresh { seqs, t }, rope, Some(&mut tape))?;
        let mut saved = tape.ok_or_else(|| ModelError::Input("the layer kept no tape".into()))?;
        saved.ffn.balance(seqs, t, bal, index, report);
        saved.index_report(report);
        Ok(saved)
    }

    /// `dh` is the gradient of the layer's output; returns that of its input.
    fn backward(
        &self,
        cx: &Exec,
        name: &str,
        s: &LayerSaved,
        dh: &[f32],
        rope: &Rope,
        g: &mut Grads,
    ) -> Result<Vec<f32>> {
        let dx = match (&self.mlp, &s.ffn) {
            (Ffn::Dense(m), FfnSaved::Dense(sv)) => m.backward(cx, &format!("{name}.mlp"), sv, dh, g),
            (Ffn::Moe(m), FfnSaved::Moe(sv)) => m.backward(cx, &format!("{name}.mlp"), sv, dh, g)?,
            _ => unreachable!("the saved FFN matches the layer"),
        };
        let mut d_mid =
            self.post_attention_layernorm.backward(&format!("{name}.post_attention_layernorm"), &s.h_mid, &dx, g);
        add_into(&mut d_mid, dh);
        let da = self.self_attn.backward(cx, &format!("{name}.self_attn"), &s.attn, &d_mid, rope, g);
        let mut d_in = self.input_layernorm.backward(&format!("{name}.input_layernorm"), &s.h_in, &da, g);
        add_into(&mut d_in, &d_mid);
        Ok(d_in)
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

    fn head_backward(&self, cx: &Exec, hf: &[f32], d_logits: &[f32], n: usize, g: &mut Grads) -> Vec<f32> {
        let head = self.lm_head.as_ref().unwrap_or(&self.embed_tokens);
        let (v, d) = (head.rows, head.cols);
        g.weight_grad(cx, format!("{}.weight", self.head_name()), d_logits, hf, n, v, d, None);
        super::input_grad(cx, head, d_logits, n)
    }

    /// Forward and backward over `tokens [seqs, t + 1]` (inputs `[.., ..t]`, labels shifted by one),
    /// adding every parameter's gradient into `g`, with the numerics of `self.training`. With
    /// `g = None` only the losses are computed (validation).
    pub fn train_step(
        &self,
        tokens: &[u32],
        seqs: usize,
        t: usize,
        w: LossWeights,
        g: Option<&mut Grads>,
    ) -> Result<StepReport> {
        self.train_step_masked(tokens, seqs, t, w, None, g)
    }

    /// [`Self::train_step`] with the losses on some labels only: `labels[b * t + i]` says whether
    /// the token at `i + 1` of sequence `b` is learned (supervised fine-tuning: the assistant's
    /// tokens; right-padding: not the pads). The MTP depth-k loss at `i` learns the token at
    /// `i + k + 1` under the same mask; the balance losses see every position.
    pub fn train_step_masked(
        &self,
        tokens: &[u32],
        seqs: usize,
        t: usize,
        w: LossWeights,
        labels: Option<&[bool]>,
        g: Option<&mut Grads>,
    ) -> Result<StepReport> {
        self.train_step_for(tokens, seqs, t, w, Objective::CrossEntropy(labels), g)
    }

    /// [`Self::train_step`] towards `objective`.
    pub fn train_step_for(
        &self,
        tokens: &[u32],
        seqs: usize,
        t: usize,
        w: LossWeights,
        objective: Objective,
        g: Option<&mut Grads>,
    ) -> Result<StepReport> {
        if seqs == 0 || t == 0 || tokens.len() != seqs * (t + 1) {
            return Err(ModelError::Input(format!("train_step: {} tokens is not {seqs} × ({t} + 1)", tokens.len())));
        }
        if let Some(m) = objective.mask().filter(|m| m.len() != seqs * t) {
            return Err(ModelError::Input(format!("train_step: a label mask of {} for {seqs} × {t} labels", m.len())));
        }
        self.embed(tokens)?; // vocabulary check
        crate::model::in_pool(|| {
            let mut report = StepReport { tokens: seqs * t, ..Default::default() };
            let all = 0..self.layers.len();
            let (_, saved) = self.stage_forward(all.clone(), tokens, seqs, t, w, None, objective, &mut report)?;
            report.loss = match objective {
                Objective::CrossEntropy(_) => w.total(&report, self.mtp.len()),
                Objective::LogProb(_) => report.lm_loss + report.balance_loss + report.indexer_loss,
            };
            let Some(g) = g else { return Ok(report) };
            self.stage_backward(all, saved, vec![], seqs, t, g)?;
            Ok(report)
        })
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
        objective: Objective,
        report: &mut StepReport,
    ) -> Result<(Vec<f32>, StageSaved)> {
        let cx = self.training_exec(self.training);
        let (n, v) = (seqs * t, self.config.vocab_size);
        let at = |b: usize, i: usize| tokens[b * (t + 1) + i];
        let inputs: Vec<u32> = (0..seqs).flat_map(|b| (0..t).map(move |i| at(b, i))).collect();
        let mut h = match input {
            Some(h) if layers.start > 0 => h,
            _ => self.embed(&inputs)?,
        };
        let mut saved = Vec::with_capacity(layers.len());
        for l in layers.clone() {
            saved.push(self.layers[l].forward_saved(&cx, &mut h, seqs, t, &self.rope, w.balance, report, l)?);
        }
        if layers.end < self.layers.len() {
            return Ok((h, StageSaved { inputs, layers: saved, tail: None }));
        }
        let labels: Vec<u32> = (0..seqs).flat_map(|b| (0..t).map(move |i| at(b, i + 1))).collect();
        let h_last = h;
        let hf = self.norm.forward(&h_last);
        let logits = self.logits_with(&cx, &hf, n);
        let learn = objective.mask();
        let learned = |r: usize| learn.is_none_or(|m| m[r]);
        let (lm_loss, d_logits) = match objective {
            Objective::CrossEntropy(_) => {
                cross_entropy(&logits, &labels, &(0..n).map(learned).collect::<Vec<_>>(), 1.0)
            }
            Objective::LogProb(f) => {
                let logp = label_log_probs(&logits, &labels);
                let (loss, d_logp) = f(&logp);
                if d_logp.len() != n {
                    return Err(ModelError::Input(format!(
                        "an objective's gradient of {} for {n} labels",
                        d_logp.len()
                    )));
                }
                report.label_logprobs = logp;
                (loss, log_prob_backward(&logits, &labels, &d_logp))
            }
        };
        report.lm_loss = lm_loss;

        // MTP depth k (1-based) at position i reads the token at i + k and predicts i + k + 1.
        let depth = self.mtp.len();
        let mut mtp = vec![];
        let mut h_prev = hf.clone();
        let mtp_modules = match objective {
            Objective::CrossEntropy(_) => &self.mtp[..],
            Objective::LogProb(_) => &[],
        };
        for (j, m) in mtp_modules.iter().enumerate() {
            let k = j + 1;
            let ids: Vec<u32> =
                (0..seqs).flat_map(|b| (0..t).map(move |i| if i + k <= t { at(b, i + k) } else { 0 })).collect();
            let lab: Vec<u32> =
                (0..seqs).flat_map(|b| (0..t).map(move |i| if i + k < t { at(b, i + k + 1) } else { 0 })).collect();
            let mask: Vec<bool> = (0..n).map(|r| r % t + k < t && learned(r + k)).collect();
            let emb = self.embed(&ids)?;
            let mut tape = None;
            let hk = m.forward(&cx, &emb, &h_prev, &mut Seqs::Fresh { seqs, t }, &self.rope, Some(&mut tape))?;
            let mut saved = tape.ok_or_else(|| ModelError::Input("the MTP module kept no tape".into()))?;
            saved.block.ffn.balance(seqs, t, w.balance, self.layers.len() + j, report);
            saved.block.index_report(report);
            let lk = self.logits_with(&cx, &hk, n);
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
            mtp.push(MtpStep { ids, h_prev: std::mem::replace(&mut h_prev, next), saved, hk, d_logits: dl });
        }
        let tail = TailSaved { h_last, hf, d_logits, mtp };
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
        let cx = self.training_exec(self.training);
        let (n, d) = (seqs * t, self.config.hidden_size);
        let mut dh = match s.tail {
            None => d_out,
            Some(TailSaved { h_last, hf, d_logits, mtp }) => {
                // Backward: MTP modules last to first, each handing a gradient to its h_prev.
                let mut d_next: Option<Vec<f32>> = None;
                for (j, st) in mtp.iter().enumerate().rev() {
                    let m = &self.mtp[j];
                    let name = format!("model.layers.{}", self.layers.len() + j);
                    let mut dhk = self.head_backward(&cx, &st.hk, &st.d_logits, n, g);
                    if let Some(dn) = d_next.take() {
                        add_into(&mut dhk, &dn);
                    }
                    let dz = m.shared_head_norm.backward(&format!("{name}.shared_head.norm"), &st.saved.z, &dhk, g);
                    let dz = m.block.backward(&cx, &name, &st.saved.block, &dz, &self.rope, g)?;
                    let dcat = m.eh_proj.backward(&cx, &format!("{name}.eh_proj"), &st.saved.cat, &dz, n, g);
                    let (mut de, mut dhn) = (vec![0f32; n * d], vec![0f32; n * d]);
                    for r in 0..n {
                        de[r * d..(r + 1) * d].copy_from_slice(&dcat[r * 2 * d..r * 2 * d + d]);
                        dhn[r * d..(r + 1) * d].copy_from_slice(&dcat[r * 2 * d + d..(r + 1) * 2 * d]);
                    }
                    let emb = self.embed(&st.ids)?;
                    let demb = m.enorm.backward(&format!("{name}.enorm"), &emb, &de, g);
                    embedding_backward("model.embed_tokens", &self.embed_tokens, &st.ids, &demb, g);
                    d_next = Some(m.hnorm.backward(&format!("{name}.hnorm"), &st.h_prev, &dhn, g));
                }
                let mut dhf = self.head_backward(&cx, &hf, &d_logits, n, g);
                if let Some(dn) = d_next {
                    add_into(&mut dhf, &dn);
                }
                self.norm.backward("model.norm", &h_last, &dhf, g)
            }
        };
        for (l, sv) in layers.clone().zip(&s.layers).rev() {
            dh = self.layers[l].backward(&cx, &format!("model.layers.{l}"), sv, &dh, &self.rope, g)?;
        }
        if layers.start > 0 {
            return Ok(dh);
        }
        embedding_backward("model.embed_tokens", &self.embed_tokens, &s.inputs, &dh, g);
        Ok(vec![])
    }
}
