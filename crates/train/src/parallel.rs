//! Data-parallel and pipeline training (`dsv3 train --data-parallel` under `mpirun`): every process holds the
//! whole model, trains on its share of each batch's sequences, and the gradients, losses and
//! expert loads are summed across processes before the update — so every process applies the
//! same update (the aux-free bias included, from the global expert counts) and the run equals one
//! process training on the whole batch up to the order of the sums. The transport is outside
//! this crate (MPI in the CLI).

use crate::optim::Optimizer;
use dsv3_model::grad::moe::{expert_owner, ExpertExchange};
use dsv3_model::layers::Mlp;
use dsv3_model::DeepseekV3;
use std::collections::HashSet;
use std::sync::{Arc, OnceLock};

/// A sum over the data-parallel processes.
pub trait AllReduce: Send + Sync {
    fn rank(&self) -> usize;
    fn size(&self) -> usize;
    /// Element-wise sum of `v` over the processes, in place (the same result everywhere).
    fn sum_f64(&self, v: &mut [f64]);
    /// Every process's `mine`, in rank order (the same everywhere).
    fn all_gather_f32(&self, mine: &[f32]) -> Vec<Vec<f32>>;
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

/// Pipeline training (`dsv3 train --pipeline KIND --pp P --chunks C` under `mpirun -np D·P`): every
/// process holds the model; the processes form D pipelines of P consecutive ranks, each taking
/// 1/D of every batch as C micro-batches through the schedule (each process runs its stages'
/// forwards and backwards, activations and gradients travel point to point), then the stage
/// gradients are summed across all processes as in data parallelism (the two copies of a
/// DualPipe stage, the embedding used by the first and last stages, and the D pipelines add up
/// there).
///
/// With `experts` (an exchange among the processes at the same pipeline rank, and a sum within
/// this process's pipeline) the routed experts are also split, over the D pipelines: pipeline
/// `g` holds the experts [`expert_owner`] gives `g`, its stage at rank `s` computes them for the
/// tokens of every pipeline's rank `s` (those processes run the same ops in the same order),
/// and the expert gradients are summed within the pipeline.
pub fn set_pipeline(dp: Arc<dyn AllReduce>, kind: dsv3_dist::schedule::Kind, chunks: usize, stages: usize, experts: Option<(Arc<dyn ExpertExchange>, Arc<dyn AllReduce>)>) {
    match experts {
        Some((ex, pipe)) => {
            set_expert_parallel(dp, ex);
            let _ = PIPELINE_SUM.set(pipe);
        }
        None => set_data_parallel(dp),
    }
    let _ = PIPELINE.set(Pipeline { kind, chunks, stages });
}

static PIPELINE_SUM: OnceLock<Arc<dyn AllReduce>> = OnceLock::new();

/// The sum within this process's pipeline (expert parallelism across pipelines).
pub(crate) fn pipeline_sum() -> Option<&'static Arc<dyn AllReduce>> {
    PIPELINE_SUM.get()
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

static EP: OnceLock<Arc<dyn ExpertExchange>> = OnceLock::new();

/// Expert-parallel training (`dsv3 train --expert-parallel` under `mpirun`): data parallelism as
/// [`set_data_parallel`] for everything but the routed experts, which are split over the
/// processes ([`expert_owner`]): in each MoE layer every process sends its tokens' rows to the
/// experts' owners through `ex`. An expert's weights, gradient and optimizer moments live on its
/// owner only; its gradient there already sums every process's tokens, so it is not all-reduced.
pub fn set_expert_parallel(dp: Arc<dyn AllReduce>, ex: Arc<dyn ExpertExchange>) {
    set_data_parallel(dp);
    let _ = EP.set(ex);
}

pub(crate) fn experts() -> Option<&'static Arc<dyn ExpertExchange>> {
    EP.get()
}

/// Whether `name` is a routed expert's parameter (`….mlp.experts.{e}.…`), held by its owner only
/// under expert parallelism.
pub(crate) fn is_routed_expert(name: &str) -> bool {
    experts().is_some() && name.contains(".mlp.experts.")
}

/// Drops the optimizer moments this process does not keep: routed experts it does not hold, and
/// under ZeRO-1 the parameters other processes own (after a resume or a checkpoint).
pub(crate) fn drop_foreign_moments(model: &mut DeepseekV3, opt: &mut Optimizer, zero: Option<&Zero1>) {
    let held: HashSet<String> = model.params_mut().into_iter().map(|p| p.name).collect();
    let keep = |name: &String| (!is_routed_expert(name) || held.contains(name)) && zero.is_none_or(|z| z.owns(name));
    opt.m.retain(|k, _| keep(k));
    opt.v.retain(|k, _| keep(k));
}

/// Before rank 0 writes a checkpoint under expert parallelism: every routed expert's weights and
/// moments come to rank 0 from their owners (a sum to which only the owner contributes: exact).
/// Every process calls it; afterwards rank 0 holds the whole model until [`DeepseekV3::set_expert_exchange`]
/// drops the foreign experts again.
pub(crate) fn gather_experts(dp: &dyn AllReduce, model: &mut DeepseekV3, opt: &mut Optimizer) {
    let Some(ex) = experts() else { return };
    // The expert-parallel rank and group size; in a pipeline its first process contributes.
    let (rank, ranks) = (ex.rank(), ex.ranks());
    let contributes = pipeline_sum().is_none_or(|p| p.rank() == 0);
    let writer = dp.rank() == 0;
    let c = &model.config;
    let (d, inter, n) = (c.hidden_size, c.moe_intermediate_size, c.n_routed_experts);
    let size = d * inter;
    let layers: Vec<usize> = model.moe_layers_mut().into_iter().map(|(l, _)| l).collect();
    let adam = !opt.m.is_empty();
    for l in layers {
        for e in (0..n).filter(|&e| expert_owner(e, n, ranks) != 0) {
            let names = ["gate_proj", "up_proj", "down_proj"].map(|p| format!("model.layers.{l}.mlp.experts.{e}.{p}.weight"));
            // [gate, up, down] weights, then their first and second moments.
            let mut buf = vec![0f64; 9 * size];
            if expert_owner(e, n, ranks) == rank && contributes {
                let mut moes = model.moe_layers_mut();
                let m = &mut moes.iter_mut().find(|(ll, _)| *ll == l).expect("MoE layer").1.experts[e];
                for (i, w) in [&mut m.gate_proj, &mut m.up_proj, &mut m.down_proj].into_iter().enumerate() {
                    buf[i * size..(i + 1) * size].iter_mut().zip(w.weight.f32_mut().iter()).for_each(|(b, &v)| *b = v as f64);
                }
                for (i, name) in names.iter().enumerate() {
                    for (slot, moments) in [(3, &opt.m), (6, &opt.v)] {
                        if let Some(v) = moments.get(name) {
                            buf[(slot + i) * size..(slot + i + 1) * size].iter_mut().zip(v).for_each(|(b, &v)| *b = v as f64);
                        }
                    }
                }
            }
            dp.sum_f64(&mut buf);
            if !writer {
                continue;
            }
            let part = |i: usize| buf[i * size..(i + 1) * size].iter().map(|&v| v as f32).collect::<Vec<f32>>();
            let mut moes = model.moe_layers_mut();
            moes.iter_mut().find(|(ll, _)| *ll == l).expect("MoE layer").1.experts[e] = Mlp::from_f32(d, inter, part(0), part(1), part(2));
            if adam {
                for (i, name) in names.iter().enumerate() {
                    opt.m.insert(name.clone(), part(3 + i));
                    opt.v.insert(name.clone(), part(6 + i));
                }
            }
        }
    }
}

static ZERO1: OnceLock<()> = OnceLock::new();

/// ZeRO stage 1 (`dsv3 train --zero1`): the optimizer moments of the replicated parameters are
/// split over the data-parallel processes. Each process updates the parameters it owns
/// ([`Zero1::owners`]) from the all-reduced gradients, then the updated parameters are
/// all-gathered: the same arithmetic as every process updating everything, so the run is
/// bit-identical to plain data parallelism, with 1/N of the moments per process.
pub fn set_zero1() {
    let _ = ZERO1.set(());
}

/// The ZeRO-1 partition of the replicated parameters.
pub(crate) struct Zero1 {
    rank: usize,
    /// Owner of each replicated parameter (routed experts under expert parallelism are not here:
    /// their owner holds their state already).
    owners: std::collections::HashMap<String, usize>,
}

impl Zero1 {
    /// `None` without `--zero1` or data parallelism. Parameters go, largest first, to the
    /// least-loaded process (whole tensors: the update needs no cross-process step), which every
    /// process computes alike.
    pub(crate) fn new(model: &mut DeepseekV3) -> Option<Zero1> {
        ZERO1.get()?;
        let dp = get()?;
        let mut load = vec![0usize; dp.size()];
        let mut owners = std::collections::HashMap::new();
        let mut params: Vec<(usize, String)> = model.params_mut().into_iter().filter(|p| !is_routed_expert(&p.name)).map(|p| (p.data.len(), p.name)).collect();
        params.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
        for (len, name) in params {
            let r = (0..load.len()).min_by_key(|&r| load[r]).expect("a process");
            load[r] += len;
            owners.insert(name, r);
        }
        Some(Zero1 { rank: dp.rank(), owners })
    }

    /// Whether this process updates `name` and keeps its moments.
    pub(crate) fn owns(&self, name: &str) -> bool {
        self.owners.get(name).is_none_or(|&r| r == self.rank)
    }

    /// After the update: each replicated parameter from its owner to every process.
    pub(crate) fn share_params(&self, dp: &dyn AllReduce, model: &mut DeepseekV3) {
        let mut params = model.params_mut();
        params.retain(|p| self.owners.contains_key(&p.name));
        let mine: Vec<f32> = params.iter().filter(|p| self.owns(&p.name)).flat_map(|p| p.data.iter().copied()).collect();
        let blocks = dp.all_gather_f32(&mine);
        let mut at = vec![0usize; blocks.len()];
        for p in params {
            let r = self.owners[&p.name];
            if r != self.rank {
                p.data.copy_from_slice(&blocks[r][at[r]..at[r] + p.data.len()]);
            }
            at[r] += p.data.len();
        }
    }

    /// Before rank 0 writes a checkpoint: the moments the others own come to every process
    /// (only rank 0 keeps them; [`drop_foreign_moments`] drops them again after the save).
    pub(crate) fn gather_moments(&self, dp: &dyn AllReduce, model: &mut DeepseekV3, opt: &mut Optimizer) {
        if opt.m.is_empty() {
            return; // SGD keeps none
        }
        let mut params = model.params_mut();
        params.retain(|p| self.owners.contains_key(&p.name));
        let mine: Vec<f32> = params.iter().filter(|p| self.owns(&p.name)).flat_map(|p| opt.m[&p.name].iter().chain(&opt.v[&p.name]).copied()).collect();
        let blocks = dp.all_gather_f32(&mine);
        if self.rank != 0 {
            return;
        }
        let mut at = vec![0usize; blocks.len()];
        for p in params {
            let (r, n) = (self.owners[&p.name], p.data.len());
            if r != 0 {
                opt.m.insert(p.name.clone(), blocks[r][at[r]..at[r] + n].to_vec());
                opt.v.insert(p.name.clone(), blocks[r][at[r] + n..at[r] + 2 * n].to_vec());
            }
            at[r] += 2 * n;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dsv3_dist::pipeline::calc_diff;
    use dsv3_model::grad::model::{LossWeights, StepReport};
    use dsv3_model::grad::moe::Balance;
    use dsv3_model::grad::Grads;
    use dsv3_model::init::{preset, write_training_init};
    use std::sync::mpsc::{channel, Receiver, Sender};
    use std::sync::Mutex;

    /// An all-to-all among threads: one FIFO channel per (source, destination).
    struct ThreadExchange {
        rank: usize,
        to: Vec<Sender<Vec<f32>>>,
        from: Mutex<Vec<Receiver<Vec<f32>>>>,
    }

    impl ThreadExchange {
        fn group(ranks: usize) -> Vec<ThreadExchange> {
            let mut to: Vec<Vec<Sender<Vec<f32>>>> = (0..ranks).map(|_| vec![]).collect();
            let mut from: Vec<Vec<Receiver<Vec<f32>>>> = (0..ranks).map(|_| vec![]).collect();
            for tx_list in to.iter_mut() {
                for rx_list in from.iter_mut() {
                    let (tx, rx) = channel();
                    tx_list.push(tx);
                    rx_list.push(rx);
                }
            }
            to.into_iter().zip(from).enumerate().map(|(rank, (to, from))| ThreadExchange { rank, to, from: Mutex::new(from) }).collect()
        }
    }

    impl ExpertExchange for ThreadExchange {
        fn rank(&self) -> usize {
            self.rank
        }
        fn ranks(&self) -> usize {
            self.to.len()
        }
        fn all_to_all(&self, send: Vec<Vec<f32>>) -> Vec<Vec<f32>> {
            for (tx, buf) in self.to.iter().zip(send) {
                tx.send(buf).expect("peer alive");
            }
            self.from.lock().unwrap().iter().map(|rx| rx.recv().expect("peer alive")).collect()
        }
    }

    /// Each process runs its share of the sequences with the experts split over the processes:
    /// the data-parallel sum of the dense gradients and each owner's expert gradients equal one
    /// process's, as do the loss and the global expert loads.
    #[test]
    fn expert_parallel_step_equals_one_process() {
        let dir = std::env::temp_dir().join(format!("dsv3-ep-train-{}", std::process::id()));
        let mut cfg = preset("tiny").unwrap();
        cfg["vocab_size"] = serde_json::json!(512);
        write_training_init(&dir, &cfg, 7, None).unwrap();
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
                            let rank = ex.rank;
                            let mut m = DeepseekV3::load(dir).unwrap();
                            m.set_expert_exchange(Arc::new(ex));
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
