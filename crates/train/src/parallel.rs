//! Parallel training under `mpirun` (`dsv3 train --data-parallel | --expert-parallel |
//! --pipeline KIND [--pp P] [--zero1]`): how the processes are arranged. Every process trains on
//! its share of each batch; gradients are summed over the processes holding each parameter
//! ([`crate::placement`]), losses and expert loads over all of them, so every holder applies the
//! same update (the aux-free bias included, from the global expert counts) and the run equals
//! one process training on the whole batch up to the order of the sums. The transport is
//! outside this crate (MPI in the CLI).

use dsv3_model::grad::moe::{Exchanges, ExpertExchange};
use std::sync::{Arc, OnceLock};

/// A sum over the data-parallel processes.
pub trait AllReduce: Send + Sync {
    fn rank(&self) -> usize;
    fn size(&self) -> usize;
    /// Element-wise sum of `v` over the processes, in place (the same result everywhere).
    fn sum_f64(&self, v: &mut [f64]);
    /// Runs `f` with point-to-point messages among the processes (pipeline training).
    fn with_peers(&self, f: &mut dyn FnMut(&mut dyn dsv3_dist::pipeline::P2p));
}

static DP: OnceLock<Arc<dyn AllReduce>> = OnceLock::new();
static PIPELINE: OnceLock<Pipeline> = OnceLock::new();

/// Pipeline training: the schedule, its micro-batches per batch, and the processes per pipeline.
#[derive(Clone, Copy, Debug)]
pub struct Pipeline {
    pub kind: dsv3_dist::schedule::Kind,
    pub chunks: usize,
    pub stages: usize,
}

/// Pipeline training (`dsv3 train --pipeline KIND --pp P --chunks C` under `mpirun -np D·P`): the
/// processes form D pipelines of P consecutive ranks, each taking 1/D of every batch as C
/// micro-batches through the schedule (each process runs its stages' forwards and backwards and
/// holds only their parameters; activations and gradients travel point to point). A parameter's
/// gradient is summed over its holders: the D pipelines, the two copies of a DualPipe stage, the
/// embedding at the first and last positions.
///
/// With `experts` (an exchange among the processes at the same pipeline rank) the routed experts
/// are also split, over the D pipelines: pipeline `g` holds the experts
/// [`dsv3_model::grad::moe::expert_owner`] gives `g`, and its stage at rank `s` computes them for
/// the tokens of every pipeline's rank `s` (those processes run the same ops in the same order).
/// A backward exchange apart from the forward's lets DualPipe's `(F|B)` run both at once.
pub fn set_pipeline(
    dp: Arc<dyn AllReduce>,
    kind: dsv3_dist::schedule::Kind,
    chunks: usize,
    stages: usize,
    experts: Option<Exchanges>,
) {
    set_data_parallel(dp);
    if let Some(x) = experts {
        let _ = EP.set(x);
    }
    let _ = PIPELINE.set(Pipeline { kind, chunks, stages });
}

pub(crate) fn pipeline() -> Option<Pipeline> {
    PIPELINE.get().copied()
}

/// Makes this process one of `dp.size()` data-parallel trainers.
pub fn set_data_parallel(dp: Arc<dyn AllReduce>) {
    let _ = DP.set(dp);
}

/// Processes training together (1 without data or pipeline parallelism).
pub fn processes() -> usize {
    DP.get().map_or(1, |d| d.size())
}

/// This process's rank among them (0 alone).
pub fn rank() -> usize {
    DP.get().map_or(0, |d| d.rank())
}

pub(crate) fn get() -> Option<&'static Arc<dyn AllReduce>> {
    DP.get()
}

static EP: OnceLock<Exchanges> = OnceLock::new();

/// Expert-parallel training (`dsv3 train --expert-parallel` under `mpirun`): data parallelism as
/// [`set_data_parallel`] for everything but the routed experts, which are split over the
/// processes ([`dsv3_model::grad::moe::expert_owner`]): in each MoE layer every process sends its
/// tokens' rows to the experts' owners through `ex`. An expert's weights, gradient and optimizer
/// moments live on its owner only; its gradient there already sums every process's tokens.
pub fn set_expert_parallel(dp: Arc<dyn AllReduce>, ex: Arc<dyn ExpertExchange>) {
    set_data_parallel(dp);
    let _ = EP.set(Exchanges { forward: ex.clone(), backward: ex });
}

pub(crate) fn experts() -> Option<&'static Exchanges> {
    EP.get()
}

static ZERO1: OnceLock<()> = OnceLock::new();

/// ZeRO stage 1 (`dsv3 train --zero1`): of the processes holding a parameter, one updates it and
/// keeps its optimizer moments, then sends it to the others: the same arithmetic as every holder
/// updating, so the run is bit-identical to plain data parallelism, with 1/N of the moments.
pub fn set_zero1() {
    let _ = ZERO1.set(());
}

pub(crate) fn zero1() -> bool {
    ZERO1.get().is_some()
}

#[cfg(test)]
mod tests {
    use super::*;
    use dsv3_dist::pipeline::calc_diff;
    use dsv3_model::grad::model::{LossWeights, StepReport};
    use dsv3_model::grad::moe::{expert_owner, Balance, ThreadExchange};
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
                let handles: Vec<_> = ThreadExchange::group(ranks)
                    .into_iter()
                    .map(|ex| {
                        let (dir, tokens) = (&dir, &tokens);
                        s.spawn(move || {
                            let rank = ex.rank();
                            let mut m = DeepseekV3::load(dir).unwrap();
                            m.set_expert_exchange(Arc::new(ex));
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
