//! Parallel training under `mpirun` (`dsv3 train --data-parallel | --expert-parallel |
//! --pipeline KIND [--pp P] [--zero1]`): how the processes are arranged. Every process trains on
//! its share of each batch; gradients are summed over the processes holding each parameter
//! ([`crate::holders`]), losses and expert loads over all of them, so every holder applies the
//! same update (the aux-free bias included, from the global expert counts) and the run equals
//! one process training on the whole batch up to the order of the sums. The transport is
//! a [`Comm`] (threads, or MPI in `dsv3_dist::transport`).

use crate::holders::Holders;
use anyhow::Result;
use dsv3_dist::comm::Comm;
use dsv3_model::grad::exchange::ExchangeExperts;
use dsv3_model::grad::model::{LossWeights, StepReport};
use dsv3_model::grad::Grads;
use dsv3_model::DeepseekV3;
use std::sync::Arc;

/// Pipeline training: the schedule, its micro-batches per batch, and the processes per pipeline.
#[derive(Clone, Copy, Debug)]
pub struct Pipeline {
    pub kind: dsv3_dist::schedule::Kind,
    pub chunks: usize,
    pub stages: usize,
}

/// How the processes of a run are arranged: a value the trainer is given (one process when
/// [`Layout::single`]), never a process-wide setting.
#[derive(Clone, Default)]
pub struct Layout {
    /// The processes training together (absent: this one alone).
    pub dp: Option<Arc<dyn Comm>>,
    /// Pipeline training (`--pipeline KIND --pp P --chunks C` under `mpirun -np D·P`): the
    /// processes form D pipelines of P consecutive ranks, each taking 1/D of every batch as C
    /// micro-batches through the schedule (each process runs its stages' forwards and backwards
    /// and holds only their parameters; activations and gradients travel point to point). A
    /// parameter's gradient is summed over its holders: the D pipelines, the two copies of a
    /// DualPipe stage, the embedding at the first and last positions.
    pub pipeline: Option<Pipeline>,
    /// Expert parallelism: the routed experts split over the processes (with a pipeline, over the
    /// D pipelines: the processes at one pipeline rank exchange expert rows). An expert's
    /// weights, gradient and optimizer moments live on its owner only; its gradient there
    /// already sums every process's tokens.
    pub experts: Option<ExchangeExperts>,
    /// ZeRO stage 1: of the processes holding a parameter, one updates it and keeps its
    /// optimizer moments, then sends it to the others: the same arithmetic as every holder
    /// updating, so the run is bit-identical to plain data parallelism, with 1/N of the moments.
    pub zero1: bool,
}

impl Layout {
    /// One process.
    pub fn single() -> Self {
        Layout::default()
    }

    /// Each of `dp.size()` processes trains on its share of every batch.
    pub fn data_parallel(dp: Arc<dyn Comm>) -> Self {
        Layout { dp: Some(dp), ..Layout::default() }
    }

    /// Data parallelism for everything but the routed experts, which are split over the
    /// processes: in each MoE layer every process sends its tokens' rows to the experts' owners
    /// through `ex`.
    pub fn expert_parallel(dp: Arc<dyn Comm>, ex: Arc<dyn Comm>) -> Self {
        Layout { dp: Some(dp), experts: Some(ExchangeExperts::new(ex)), ..Layout::default() }
    }

    /// Pipelines of `stages` processes running `kind` with `chunks` micro-batches per batch, data
    /// parallel among themselves, optionally splitting the routed experts among the pipelines.
    pub fn pipelined(
        dp: Arc<dyn Comm>,
        kind: dsv3_dist::schedule::Kind,
        chunks: usize,
        stages: usize,
        experts: Option<ExchangeExperts>,
    ) -> Self {
        Layout { dp: Some(dp), pipeline: Some(Pipeline { kind, chunks, stages }), experts, zero1: false }
    }

    /// Processes training together (1 alone).
    pub fn processes(&self) -> usize {
        self.dp.as_ref().map_or(1, |d| d.size())
    }

    /// This process's rank among them (0 alone).
    pub fn rank(&self) -> usize {
        self.dp.as_ref().map_or(0, |d| d.rank())
    }
}

/// One pipelined step: this process's pipeline takes its share of the batch as `p.chunks`
/// micro-batches through the schedule; this process keeps the gradients of the stages it ran, and
/// its report holds what they computed (summed over micro-batches; [`all_reduce_step`] turns them
/// into the batch's means).
pub(crate) fn pipeline_step(
    layout: &Layout,
    model: &DeepseekV3,
    batch: &crate::data::Batch,
    args: &crate::TrainArgs,
    w: LossWeights,
    grads: &mut Grads,
) -> Result<StepReport> {
    let (Some(dp), Some(p)) = (&layout.dp, layout.pipeline) else {
        anyhow::bail!("a pipeline step without a pipeline")
    };
    let overlap = layout.experts.as_ref().is_some_and(|x| x.apart());
    let (kind, chunks, stages) = (p.kind, p.chunks, p.stages);
    let (group, rank) = (dp.rank() / stages, dp.rank() % stages);
    let shard = args.batch_size / (dp.size() / stages);
    let per = shard / chunks;
    let row = args.seq_len + 1;
    let mine = &batch.tokens[group * shard * row..(group + 1) * shard * row];
    let t = args.seq_len;
    let labels = batch.labels.as_ref().map(|l| &l[group * shard * t..(group + 1) * shard * t]);
    let mbs: Vec<crate::data::Batch> = mine
        .chunks(per * row)
        .enumerate()
        .map(|(i, c)| crate::data::Batch {
            tokens: c.to_vec(),
            labels: labels.map(|l| l[i * per * t..(i + 1) * per * t].to_vec()),
        })
        .collect();
    let model_stages = crate::pipeline::DeepSeekStages::new(
        model,
        &mbs,
        per,
        args.seq_len,
        w,
        dsv3_dist::pipeline::positions(kind, stages),
        overlap,
    )?;
    let ops = dsv3_dist::schedule::generate(kind, stages, chunks).map_err(|e| anyhow::anyhow!("{e}"))?;
    dp.with_peers(&mut |peers| {
        let mut peers = dsv3_dist::pipeline::Group { inner: peers, base: group * stages };
        dsv3_dist::pipeline::execute(&mut peers, kind, stages, chunks, &ops[rank], &model_stages);
    });
    let mut report = model_stages.report.into_inner().expect("report");
    // Expert loads per MoE layer (summed over the micro-batches this process ran), in layer order
    // with zeros for the layers it does not hold, so the sums line up across processes.
    let moe_layers: Vec<usize> =
        (0..model.layers.len() + model.mtp.len()).filter(|&l| model.config.is_moe_layer(l)).collect();
    let experts = model.config.n_routed_experts;
    let mut load: Vec<(usize, Vec<usize>)> = moe_layers.iter().map(|&l| (l, vec![0; experts])).collect();
    for (l, c) in &report.load {
        if let Some(slot) = load.iter_mut().find(|(ll, _)| ll == l) {
            slot.1.iter_mut().zip(c).for_each(|(a, b)| *a += b);
        }
    }
    report.load = load;
    report.mtp_losses.resize(model.mtp.len(), 0.0);
    if !model.mtp.is_empty() && report.mtp_top1.is_none() {
        report.mtp_top1 = Some(0.0);
    }
    report.loss = w.total(&report, model.mtp.len());
    report.tokens = args.batch_size * args.seq_len / dp.size();
    *grads = model_stages.grads.into_inner().expect("gradients");
    Ok(report)
}

/// Data parallelism: the mean gradient over every process's shard (each shard's gradient is of its
/// mean loss, and the shards are equal), the mean losses, and the summed expert loads. Pipelined
/// (`micro_batches`, over all pipelines): every process holds sums over micro-batches of the
/// stages it ran, so the sums are divided by the micro-batch count instead.
///
/// Returns the global gradient norm. Each gradient is summed over the processes holding its
/// parameter (all of them in plain data parallelism; a routed expert's owner alone, whose
/// gradient already sums every process's tokens).
pub(crate) fn all_reduce_step(
    dp: &dyn Comm,
    holders: &Holders,
    grads: &mut Grads,
    report: &mut StepReport,
    micro_batches: Option<usize>,
) -> f64 {
    let scale = 1.0 / micro_batches.unwrap_or(dp.size()) as f64;
    let norm_sq = holders.reduce_grads(dp, grads, scale);
    let n_mtp = report.mtp_losses.len();
    let mut flat = vec![norm_sq, report.loss, report.lm_loss, report.balance_loss, report.mtp_top1.unwrap_or(0.0)];
    flat.extend(&report.mtp_losses);
    flat.extend(report.load.iter().flat_map(|(_, c)| c.iter().map(|&v| v as f64)));
    dp.all_reduce_sum(&mut flat);
    report.loss = flat[1] * scale;
    report.lm_loss = flat[2] * scale;
    report.balance_loss = flat[3] * scale;
    report.mtp_top1 = report.mtp_top1.map(|_| flat[4] * scale);
    let mut at = 5;
    for l in report.mtp_losses.iter_mut().take(n_mtp) {
        *l = flat[at] * scale;
        at += 1;
    }
    for (_, c) in report.load.iter_mut() {
        for v in c.iter_mut() {
            *v = flat[at] as usize;
            at += 1;
        }
    }
    report.tokens *= dp.size();
    flat[0].sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;
    use dsv3_dist::comm::ThreadComm;
    use dsv3_dist::pipeline::calc_diff;
    use dsv3_model::grad::exchange::ExchangeExperts;
    use dsv3_model::grad::model::{LossWeights, StepReport};
    use dsv3_model::grad::moe::{expert_owner, Balance};
    use dsv3_model::grad::Grads;
    use dsv3_model::DeepseekV3;

    /// Each process runs its share of the sequences with the experts split over the processes:
    /// the data-parallel sum of the dense gradients and each owner's expert gradients equal one
    /// process's, as do the loss and the global expert loads.
    #[test]
    fn expert_parallel_step_equals_one_process() {
        let dir = crate::testing::tiny_init("ep-train", 7);
        let (seqs, t) = (4, 24);
        let tokens: Vec<u32> = (0..seqs * (t + 1)).map(|i| ((i * 37) % 509 + 2) as u32).collect();
        let w = LossWeights { mtp_lambda: 0.3, balance: Balance { seq_alpha: 1e-4, batch_alpha: 0.0 } };
        let one = DeepseekV3::load(&dir).unwrap();
        let mut want = Grads::default();
        let r1 = one.train_step(&tokens, seqs, t, w, Some(&mut want)).unwrap();
        for ranks in [2, 4] {
            let per_rank: Vec<(StepReport, Grads)> = std::thread::scope(|s| {
                let handles: Vec<_> = ThreadComm::group(ranks)
                    .into_iter()
                    .map(|ex| {
                        let (dir, tokens) = (&dir, &tokens);
                        s.spawn(move || {
                            let rank = ex.rank();
                            let mut m = DeepseekV3::load(dir).unwrap();
                            m.set_experts(Arc::new(ExchangeExperts::new(Arc::new(ex))));
                            m.drop_params(|n| {
                                n.split(".mlp.experts.").nth(1).is_none_or(|e| {
                                    expert_owner(e.split('.').next().unwrap().parse().unwrap(), 16, ranks) == rank
                                })
                            });
                            let shard = seqs / ranks;
                            let mine = &tokens[rank * shard * (t + 1)..(rank + 1) * shard * (t + 1)];
                            let mut g = Grads::default();
                            // A pool per process: a rank blocked in the exchange must not hold a
                            // worker another rank's step waits for.
                            let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
                            let r = pool.install(|| m.train_step(mine, shard, t, w, Some(&mut g))).unwrap();
                            (r, g)
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            let loss = per_rank.iter().map(|r| r.0.loss).sum::<f64>() / ranks as f64;
            assert!((loss - r1.loss).abs() < 1e-6 * r1.loss, "{ranks}: loss {loss} vs {}", r1.loss);
            let mut load = per_rank[0].0.load.clone();
            for (r, _) in &per_rank[1..] {
                for ((_, a), (_, b)) in load.iter_mut().zip(&r.load) {
                    a.iter_mut().zip(b).for_each(|(a, b)| *a += b);
                }
            }
            assert_eq!(load, r1.load, "{ranks}: global expert loads");
            let mut got = Grads::default();
            for (rank, (_, g)) in per_rank.iter().enumerate() {
                for (name, v) in &g.map {
                    if let Some(e) = name.split(".mlp.experts.").nth(1) {
                        let e: usize = e.split('.').next().unwrap().parse().unwrap();
                        assert_eq!(expert_owner(e, 16, ranks), rank, "{ranks}: {name} on rank {rank}");
                    }
                    let slot = got.slot(name, v.len());
                    slot.iter_mut().zip(v).for_each(|(a, b)| *a += b / ranks as f32);
                }
            }
            for (name, a) in &want.map {
                let b = got.get(name).unwrap_or_else(|| panic!("{ranks}: no gradient for {name}"));
                let a64: Vec<f64> = a.iter().map(|&x| x as f64).collect();
                let b64: Vec<f64> = b.iter().map(|&x| x as f64).collect();
                let d = calc_diff(&a64, &b64);
                assert!(d < 1e-9, "{ranks}: {name} differs by {d}");
            }
            assert_eq!(got.map.len(), want.map.len());
        }
        std::fs::remove_dir_all(&dir).ok();
    }
}
