//! The DeepSeek-V3 model as pipeline stages for `dsv3_dist::pipeline` (1F1B, DualPipe,
//! DualPipeV): position `p` of `P` runs a contiguous share of the decoder layers — the first also
//! the embedding, the last also the final norm, the LM head, the losses and the MTP modules
//! ([`DeepseekV3::stage_forward`]). A micro-batch's loss is the one `train_step` reports for it, and
//! the stages' gradients add up to `train_step`'s over the same micro-batches. A backward computes
//! the input gradient and keeps every weight-gradient GEMM (`dyᵀ·x` of each Linear, the router
//! and the head) for the `W` op the schedule places later: run right away for `B`, deferred for
//! zero-bubble `b`.

use crate::data::Batch;
use crate::holders::positions_of;
use crate::parallel::Pipeline;
use dsv3_dist::comm::Comm;
use dsv3_dist::pipeline::{P2p, StageCompute};
use dsv3_model::grad::model::{LossWeights, Objective, StageSaved, StepReport};
use dsv3_model::grad::{Grads, WeightGrad};
use dsv3_model::model::in_pool;
use dsv3_model::DeepseekV3;
use std::ops::Range;
use std::sync::Mutex;

pub struct DeepSeekStages<'a> {
    pub model: &'a DeepseekV3,
    /// Micro-batch `i`: `[seqs, t + 1]` tokens (and a label mask, if not every label is learned).
    pub micro_batches: &'a [Batch],
    pub seqs: usize,
    pub t: usize,
    pub weights: LossWeights,
    /// The decoder layers of each position ([`crate::holders::stage_split`]).
    split: Vec<Range<usize>>,
    /// The gradients of the stages this process ran.
    pub grads: Mutex<Grads>,
    /// Expert loads and losses of the stages this process ran.
    pub report: Mutex<StepReport>,
    /// Run `(F|B)`'s forward and backward at once: by default when there are expert exchanges to
    /// hide (on separate channels); without them the two would only compete for the cores.
    pub overlap: bool,
}

impl<'a> DeepSeekStages<'a> {
    pub fn new(
        model: &'a DeepseekV3,
        micro_batches: &'a [Batch],
        seqs: usize,
        t: usize,
        weights: LossWeights,
        positions: usize,
        overlap: bool,
    ) -> anyhow::Result<Self> {
        if positions == 0 || positions > model.layers.len() {
            anyhow::bail!("{positions} pipeline stages for {} decoder layers", model.layers.len());
        }
        let split = crate::holders::stage_split(model, positions);
        Ok(DeepSeekStages {
            model,
            micro_batches,
            seqs,
            t,
            weights,
            split,
            grads: Default::default(),
            report: Default::default(),
            overlap,
        })
    }

    /// The decoder layers of position `pos`.
    pub fn layers(&self, pos: usize) -> Range<usize> {
        self.split[pos].clone()
    }

    /// Runs a stage's forward or backward: on a pool thread (cheapest for its many parallel
    /// jobs), or — when a forward and a backward run at once and may wait on expert exchanges —
    /// on the calling thread, so that neither waits while holding one of the pool's threads.
    fn run<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        match self.overlap {
            true => f(),
            false => in_pool(f),
        }
    }
}

fn to_f32(v: Vec<f64>) -> Vec<f32> {
    v.into_iter().map(|x| x as f32).collect()
}

fn to_f64(v: Vec<f32>) -> Vec<f64> {
    v.into_iter().map(f64::from).collect()
}

impl StageCompute for DeepSeekStages<'_> {
    type Saved = StageSaved;
    type Deferred = Vec<WeightGrad>;

    fn forward(&self, pos: usize, bi: usize, input: Option<Vec<f64>>) -> (Vec<f64>, Option<f64>, StageSaved) {
        let mut report = StepReport::default();
        let (model, mb, layers, (seqs, t, w)) =
            (self.model, &self.micro_batches[bi], self.layers(pos), (self.seqs, self.t, self.weights));
        let (tokens, objective) = (&mb.tokens, Objective::CrossEntropy(mb.labels.as_deref()));
        let (y, saved) = self
            .run(|| model.stage_forward(layers, tokens, seqs, t, w, input.map(to_f32), objective, &mut report))
            .expect("micro-batches were checked against the vocabulary");
        let last = pos + 1 == self.split.len();
        // The last stage holds the LM and MTP losses; each stage holds its layers' balance loss.
        let loss = last.then(|| self.weights.prediction(&report, self.model.mtp.len()));
        let mut total = self.report.lock().expect("report");
        total.balance_loss += report.balance_loss;
        total.load.extend(report.load);
        if last {
            total.lm_loss += report.lm_loss;
            if total.mtp_losses.len() < report.mtp_losses.len() {
                total.mtp_losses.resize(report.mtp_losses.len(), 0.0);
            }
            total.mtp_losses.iter_mut().zip(&report.mtp_losses).for_each(|(a, b)| *a += b);
            total.mtp_top1 = Some(total.mtp_top1.unwrap_or(0.0) + report.mtp_top1.unwrap_or(0.0));
        }
        (to_f64(y), loss, saved)
    }

    /// The input gradient now; the weight gradients (every GEMM's `dyᵀ·x`) are kept for `W`.
    fn backward(&self, pos: usize, _bi: usize, saved: StageSaved, dy: Option<Vec<f64>>) -> (Vec<f64>, Vec<WeightGrad>) {
        let mut g = self.grads.lock().expect("gradients");
        let g: &mut Grads = &mut g;
        let (model, layers, seqs, t) = (self.model, self.layers(pos), self.seqs, self.t);
        g.defer_weight_grads();
        let dx = self
            .run(|| model.stage_backward(layers, saved, dy.map(to_f32).unwrap_or_default(), seqs, t, g))
            .expect("the stage's own forward state");
        (to_f64(dx), g.take_deferred())
    }

    fn weight(&self, _pos: usize, work: Vec<WeightGrad>) {
        let mut g = self.grads.lock().expect("gradients");
        let g: &mut Grads = &mut g;
        in_pool(|| g.apply(work));
    }

    fn overlap(&self) -> bool {
        self.overlap
    }
}

/// A forward without backward (validation) through this process's pipeline: position by
/// position, each on the process of the pipeline holding it (activations passed point to point).
/// Returns what this process's positions computed; the losses are at the last position's.
pub(crate) fn forward_only(
    dp: &dyn Comm,
    p: Pipeline,
    model: &DeepseekV3,
    batch: &Batch,
    seqs: usize,
    t: usize,
    w: LossWeights,
) -> anyhow::Result<StepReport> {
    let (tokens, learn) = (&batch.tokens, batch.labels.as_deref());
    let positions = dsv3_dist::pipeline::positions(p.kind, p.stages);
    let split = crate::holders::stage_split(model, positions);
    let holder =
        |pos: usize| (0..p.stages).find(|&s| positions_of(p, s).contains(&pos)).expect("every position is held");
    let mut report = StepReport::default();
    let mut result = Ok(());
    dp.with_peers(&mut |peers| {
        let mut peers = dsv3_dist::pipeline::Group { inner: peers, base: dp.rank() / p.stages * p.stages };
        let me = peers.rank();
        let mut carry = None;
        for pos in (0..positions).filter(|&pos| holder(pos) == me) {
            let input = match pos {
                0 => None,
                _ if holder(pos - 1) == me => carry.take(),
                _ => Some(to_f32(peers.recv(holder(pos - 1), pos as u64, 0))),
            };
            let layers = split[pos].clone();
            let out = in_pool(|| {
                model.stage_forward(layers, tokens, seqs, t, w, input, Objective::CrossEntropy(learn), &mut report)
            });
            let y = match out {
                Ok((y, _)) => y,
                Err(e) => {
                    result = Err(e);
                    return; // (the vocabulary was checked when the data was packed)
                }
            };
            if pos + 1 < positions {
                match holder(pos + 1) {
                    h if h == me => carry = Some(y),
                    h => peers.send(h, pos as u64 + 1, to_f64(y)),
                }
            }
        }
        peers.flush();
    });
    result?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use dsv3_dist::pipeline::{calc_diff, execute, positions, ThreadPeers};
    use dsv3_dist::schedule::{generate, Kind};
    use dsv3_model::grad::moe::Balance;

    /// A backward with weight gradients deferred leaves them out until they are applied, and then
    /// equals the plain backward bit for bit (the same GEMMs into the same slots in the same order).
    #[test]
    fn deferred_weight_gradients_equal_the_plain_backward() {
        let model = crate::testing::tiny_model("defer", 3);
        let (seqs, t) = (2, 16);
        let tokens: Vec<u32> = (0..seqs * (t + 1)).map(|i| ((i * 53) % 509 + 2) as u32).collect();
        let w = LossWeights { mtp_lambda: 0.3, balance: Balance { seq_alpha: 1e-4, batch_alpha: 0.0 } };
        let mut want = Grads::default();
        model.train_step(&tokens, seqs, t, w, Some(&mut want)).unwrap();
        let all = 0..model.layers.len();
        let mut g = Grads::default();
        let jobs = in_pool(|| {
            let (_, saved) = model
                .stage_forward(
                    all.clone(),
                    &tokens,
                    seqs,
                    t,
                    w,
                    None,
                    Objective::CrossEntropy(None),
                    &mut StepReport::default(),
                )
                .unwrap();
            g.defer_weight_grads();
            model.stage_backward(all, saved, vec![], seqs, t, &mut g).unwrap();
            g.take_deferred()
        });
        for name in ["model.layers.0.self_attn.o_proj.weight", "model.layers.1.mlp.gate.weight", "lm_head.weight"] {
            assert!(g.get(name).is_none(), "{name} was computed in the backward");
        }
        assert!(
            g.get("model.layers.0.input_layernorm.weight").is_some(),
            "norm weights are cheap and stay in the backward"
        );
        in_pool(|| g.apply(jobs));
        assert_eq!(g.map, want.map);
    }

    #[test]
    fn pipelined_deepseek_training_equals_train_step() {
        let model = crate::testing::tiny_model("pipe", 4);
        let (seqs, t) = (2, 24);
        // Balance loss off: a micro-batch's loss then lives entirely on the last stage.
        let w = LossWeights { mtp_lambda: 0.3, balance: Balance { seq_alpha: 0.0, batch_alpha: 0.0 } };
        for (kind, ranks, chunks) in [
            (Kind::OneFOneB, 1, 2),
            (Kind::OneFOneB, 2, 4),
            (Kind::DualPipe, 2, 4),
            (Kind::DualPipe, 4, 8),
            (Kind::DualPipeV, 2, 5),
        ] {
            // With label masks (supervised fine-tuning): they reach the last stage's losses.
            let mbs: Vec<Batch> = (0..chunks)
                .map(|c| Batch {
                    tokens: (0..seqs * (t + 1)).map(|i| ((i * 37 + c * 101) % 509 + 2) as u32).collect(),
                    labels: Some((0..seqs * t).map(|i| (i * 7 + c) % 3 != 0).collect()),
                })
                .collect();
            let mut want_g = Grads::default();
            let want: Vec<f64> = mbs
                .iter()
                .map(|m| {
                    model.train_step_masked(&m.tokens, seqs, t, w, m.labels.as_deref(), Some(&mut want_g)).unwrap().loss
                })
                .collect();
            let schedule = generate(kind, ranks, chunks).unwrap();
            let per_rank: Vec<(Vec<(usize, f64)>, Grads)> = std::thread::scope(|s| {
                let handles: Vec<_> = ThreadPeers::group(ranks)
                    .into_iter()
                    .enumerate()
                    .map(|(r, mut peers)| {
                        let (ops, model, mbs) = (&schedule[r], &model, &mbs);
                        s.spawn(move || {
                            // (F|B) on two threads, as with expert exchanges to hide.
                            let stages =
                                DeepSeekStages::new(model, mbs, seqs, t, w, positions(kind, ranks), true).unwrap();
                            let losses = execute(&mut peers, kind, ranks, chunks, ops, &stages);
                            (losses, stages.grads.into_inner().expect("gradients"))
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            let mut got = vec![f64::NAN; chunks];
            let mut g = Grads::default();
            for (losses, grads) in per_rank {
                for (i, l) in losses {
                    got[i] = l;
                }
                for (name, v) in grads.map {
                    let slot = g.slot(&name, v.len());
                    slot.iter_mut().zip(&v).for_each(|(a, b)| *a += b);
                }
            }
            assert_eq!(got, want, "{kind:?} on {ranks}: losses bit for bit");
            for (name, a) in &want_g.map {
                let b = g.get(name).unwrap_or_else(|| panic!("{kind:?}: no gradient for {name}"));
                let a64: Vec<f64> = a.iter().map(|&x| x as f64).collect();
                let b64: Vec<f64> = b.iter().map(|&x| x as f64).collect();
                let d = calc_diff(&a64, &b64);
                assert!(d < 1e-10, "{kind:?} on {ranks}: {name} differs by {d}");
            }
        }
    }
}
