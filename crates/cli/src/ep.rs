//! `--expert-parallel` (feature `mpi`): under `mpirun -np N`, rank 0 runs the command (generate,
//! score, bench, serve) and everything but the routed experts; ranks 1..N serve experts. In each
//! MoE layer rank 0 broadcasts the layer's inputs and routing, every rank computes the (token,
//! slot) pairs placed on it, and rank 0 gathers them (an all-gather). Placement starts static (expert `e` on rank
//! `e·N/E`) and, with `--rebalance-every B`, is redone every B batches per layer by EPLB from the
//! routing counts, with `--redundant-experts R` extra replicas whose pairs are split by token.
//! Every rank observes the same routing, so all agree on the placement without exchanging it.
//! Expert outputs do not depend on where they run, so results equal one process's bit for bit.

use dsv3_dist::eplb::LiveBalancer;
use dsv3_dist::transport::MpiExchange;
use dsv3_model::moe::ExpertParallel;
use dsv3_model::DeepseekV3;
use mpi::traits::*;
use std::sync::{Arc, Mutex, OnceLock};

/// Placement options from the command line.
#[derive(Clone, Copy, Debug, Default)]
pub struct Options {
    pub redundant: usize,
    pub rebalance_every: usize,
}

struct Ep {
    /// Dropped by [`finish`] (MPI_Finalize) before the process exits.
    universe: Mutex<Option<mpi::environment::Universe>>,
    rank: usize,
    ranks: usize,
    exchange: Mutex<Option<MpiExchange>>,
    options: Options,
    /// Rank 0's expert transport, to stop the workers at the end.
    leader: Mutex<Option<Arc<Leader>>>,
}

// SAFETY: MPI is initialized for serialized multi-threaded use, and every MPI call goes through
// a mutex-guarded communicator; the universe is only kept alive and dropped at the end.
unsafe impl Send for Ep {}
unsafe impl Sync for Ep {}

static EP: OnceLock<Ep> = OnceLock::new();

const RUN: u64 = 1;
const STOP: u64 = 2;

/// Per MoE layer placement, identical on every rank.
struct Placements {
    layers: Vec<LiveBalancer>,
}

impl Placements {
    fn new(layers: usize, experts: usize, ranks: usize, o: Options) -> anyhow::Result<Self> {
        let slots = (experts + o.redundant).next_multiple_of(ranks);
        let b = LiveBalancer::new(experts, ranks, slots, o.rebalance_every).map_err(|e| anyhow::anyhow!("--expert-parallel: {e}"))?;
        Ok(Placements { layers: vec![b; layers] })
    }

    /// The pairs of `experts [t, k]` this rank computes.
    fn mine(&self, moe: usize, experts: &[usize], k: usize, rank: usize) -> Vec<usize> {
        (0..experts.len()).filter(|&j| self.layers[moe].rank_of(experts[j], j / k) == rank).collect()
    }
}

/// The MoE header and payload rank 0 broadcasts: (op, layer, d, k) then x and the experts.
fn encode(moe: usize, x: &[f32], d: usize, experts: &[usize], k: usize) -> Vec<u8> {
    let mut b = Vec::with_capacity(32 + 4 * x.len() + 4 * experts.len());
    for v in [RUN, moe as u64, d as u64, k as u64, x.len() as u64] {
        b.extend(v.to_le_bytes());
    }
    b.extend(x.iter().flat_map(|v| v.to_le_bytes()));
    b.extend(experts.iter().flat_map(|&e| (e as u32).to_le_bytes()));
    b
}

fn records(pairs: &[usize], rows: &[f32], d: usize) -> Vec<u8> {
    let mut b = Vec::with_capacity(pairs.len() * (8 + 4 * d));
    for (i, &j) in pairs.iter().enumerate() {
        b.extend((j as u64).to_le_bytes());
        b.extend(rows[i * d..(i + 1) * d].iter().flat_map(|v| v.to_le_bytes()));
    }
    b
}

struct Leader {
    ex: Mutex<MpiExchange>,
    placements: Mutex<Placements>,
}

// SAFETY: see `Ep`.
unsafe impl Send for Leader {}
unsafe impl Sync for Leader {}

impl ExpertParallel for Leader {
    fn expert_outputs(&self, moe: usize, x: &[f32], d: usize, experts: &[usize], k: usize, compute: &dyn Fn(&[usize]) -> Vec<f32>) -> Vec<f32> {
        let ex = self.ex.lock().expect("MPI lock");
        let mut msg = encode(moe, x, d, experts, k);
        ex.broadcast(&mut msg);
        let mut placements = self.placements.lock().expect("placement lock");
        let mine = placements.mine(moe, experts, k, 0);
        let rows = compute(&mine);
        // (An all-gather: OpenMPI's Gatherv rejects the null arguments rsmpi passes off-root.)
        let (all, _) = ex.all_gather(&records(&[], &[], d));
        placements.layers[moe].observe(experts, k);
        let mut out = vec![0f32; experts.len() * d];
        for (i, &j) in mine.iter().enumerate() {
            out[j * d..(j + 1) * d].copy_from_slice(&rows[i * d..(i + 1) * d]);
        }
        for rec in all.chunks_exact(8 + 4 * d) {
            let j = u64::from_le_bytes(rec[..8].try_into().expect("8 bytes")) as usize;
            for (o, c) in out[j * d..(j + 1) * d].iter_mut().zip(rec[8..].chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        out
    }
}

/// A worker rank's life: compute the pairs placed here for every MoE layer rank 0 runs, until
/// it says stop.
fn serve_experts(model: &DeepseekV3, ex: MpiExchange, mut placements: Placements, rank: usize) {
    let moes = model.moe_layers();
    loop {
        let mut msg = vec![];
        ex.broadcast(&mut msg);
        let u = |i: usize| u64::from_le_bytes(msg[8 * i..8 * i + 8].try_into().expect("header"));
        if msg.len() < 40 || u(0) == STOP {
            return;
        }
        let (moe, d, k, n) = (u(1) as usize, u(2) as usize, u(3) as usize, u(4) as usize);
        let x: Vec<f32> = msg[40..40 + 4 * n].chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        let experts: Vec<usize> = msg[40 + 4 * n..].chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as usize).collect();
        let mine = placements.mine(moe, &experts, k, rank);
        let rows = dsv3_model::model::on_pool(|| moes[moe].expert_rows(&x, d, &experts, k, &mine));
        ex.all_gather(&records(&mine, &rows, d));
        placements.layers[moe].observe(&experts, k);
    }
}

/// Initializes MPI; returns (rank, ranks).
pub fn init(options: Options) -> anyhow::Result<(usize, usize)> {
    let (universe, threading) = mpi::initialize_with_threading(mpi::Threading::Serialized).ok_or_else(|| anyhow::anyhow!("MPI is already initialized"))?;
    if threading < mpi::Threading::Serialized {
        anyhow::bail!("--expert-parallel: this MPI does not support serialized multi-threaded calls");
    }
    let world = universe.world();
    let (rank, ranks) = (world.rank() as usize, world.size() as usize);
    let _ = EP.set(Ep {
        universe: Mutex::new(Some(universe)),
        rank,
        ranks,
        exchange: Mutex::new(Some(MpiExchange { comm: world })),
        options,
        leader: Mutex::new(None),
    });
    Ok((rank, ranks))
}

/// Rank 0: routes the model's experts through the workers. Other ranks: serve experts until rank
/// 0 is done, then exit (they never run the command itself).
pub fn attach(model: &mut DeepseekV3) -> anyhow::Result<()> {
    let ep = EP.get().ok_or_else(|| anyhow::anyhow!("--expert-parallel: MPI not initialized"))?;
    let ex = ep.exchange.lock().expect("lock").take().ok_or_else(|| anyhow::anyhow!("--expert-parallel: one model per process"))?;
    let experts = model.config.n_routed_experts;
    let layers = model.moe_layers().len();
    if layers == 0 || experts < ep.ranks {
        anyhow::bail!("--expert-parallel: {} processes for {experts} routed experts in {layers} MoE layers", ep.ranks);
    }
    let placements = Placements::new(layers, experts, ep.ranks, ep.options)?;
    if ep.rank != 0 {
        serve_experts(model, ex, placements, ep.rank);
        finish();
        std::process::exit(0);
    }
    eprintln!(
        "expert parallel: {} processes; {experts} routed experts per layer over {} slots{}",
        ep.ranks,
        (experts + ep.options.redundant).next_multiple_of(ep.ranks),
        match ep.options.rebalance_every {
            0 => String::new(),
            b => format!(", re-placed by EPLB every {b} batches"),
        }
    );
    let leader = Arc::new(Leader { ex: Mutex::new(ex), placements: Mutex::new(placements) });
    *ep.leader.lock().expect("lock") = Some(leader.clone());
    model.set_expert_parallel(leader);
    Ok(())
}

/// Per-rank load imbalance (max/mean pairs per rank) of the last full window, averaged over the
/// MoE layers: (placement in force, static placement). None before a window completes.
pub fn imbalance() -> Option<(f64, f64)> {
    let leader = EP.get()?.leader.lock().ok()?.clone()?;
    let p = leader.placements.lock().ok()?;
    let v: Vec<(f64, f64)> = p.layers.iter().filter_map(|b| b.last_imbalance).collect();
    (!v.is_empty()).then(|| (v.iter().map(|x| x.0).sum::<f64>() / v.len() as f64, v.iter().map(|x| x.1).sum::<f64>() / v.len() as f64))
}

/// Stops the workers (rank 0) and finalizes MPI.
pub fn finish() {
    let Some(ep) = EP.get() else { return };
    let mut stop: Vec<u8> = [STOP, 0, 0, 0, 0].iter().flat_map(|v| v.to_le_bytes()).collect();
    if let Some(leader) = ep.leader.lock().ok().and_then(|mut l| l.take()) {
        leader.ex.lock().expect("MPI lock").broadcast(&mut stop);
    } else if ep.rank == 0 && ep.ranks > 1 {
        // Rank 0 failed before loading its model: release the workers waiting for work.
        if let Some(ex) = ep.exchange.lock().ok().and_then(|mut e| e.take()) {
            ex.broadcast(&mut stop);
        }
    }
    if let Ok(mut u) = ep.universe.lock() {
        u.take();
    }
}

/// The data-parallel sum of `dsv3 train --data-parallel`.
struct MpiSum {
    ex: Mutex<MpiExchange>,
    rank: usize,
    size: usize,
}

// SAFETY: see `Ep`.
unsafe impl Send for MpiSum {}
unsafe impl Sync for MpiSum {}

impl dsv3_train::parallel::AllReduce for MpiSum {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn sum_f64(&self, v: &mut [f64]) {
        let ex = self.ex.lock().expect("MPI lock");
        let send = v.to_vec();
        ex.comm.all_reduce_into(&send[..], v, mpi::collective::SystemOperation::sum());
    }
    fn with_peers(&self, f: &mut dyn FnMut(&mut dyn dsv3_dist::pipeline::P2p)) {
        let ex = self.ex.lock().expect("MPI lock");
        let mut peers = dsv3_dist::transport::MpiPeers::new(&ex.comm);
        f(&mut peers);
    }
}

impl dsv3_model::grad::moe::ExpertExchange for MpiSum {
    fn rank(&self) -> usize {
        self.rank
    }
    fn ranks(&self) -> usize {
        self.size
    }
    fn all_to_all(&self, send: Vec<Vec<f32>>) -> Vec<Vec<f32>> {
        self.all_to_all_overlapped(send, &mut || false)
    }
    /// `MPI_Ialltoallv` posted, `work` between tests, then the wait.
    fn all_to_all_overlapped(&self, send: Vec<Vec<f32>>, work: &mut dyn FnMut() -> bool) -> Vec<Vec<f32>> {
        use dsv3_dist::ep::Exchange;
        let counts: Vec<usize> = send.iter().map(|b| 4 * b.len()).collect();
        let remote: usize = counts.iter().enumerate().filter(|&(r, _)| r != self.rank).map(|(_, c)| c).sum();
        EXPERT_BYTES.fetch_add(remote as u64, std::sync::atomic::Ordering::Relaxed);
        let (recv, sizes) = self.ex.lock().expect("MPI lock").all_to_all_overlapped(&le_bytes(&send.concat()), &counts, work);
        f32_blocks(&recv, &sizes)
    }
}

/// Bytes this process sent to others in expert-parallel training's exchanges.
static EXPERT_BYTES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Bytes this process sent to other processes in expert-parallel training's exchanges.
pub fn expert_exchange_bytes() -> u64 {
    EXPERT_BYTES.load(std::sync::atomic::Ordering::Relaxed)
}

fn le_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Received bytes, `sizes[r]` from rank `r`, as f32 blocks per rank.
fn f32_blocks(bytes: &[u8], sizes: &[usize]) -> Vec<Vec<f32>> {
    let mut at = 0;
    sizes
        .iter()
        .map(|&n| {
            let block = &bytes[at..at + n];
            at += n;
            block.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
        })
        .collect()
}

/// How `dsv3 train` runs over the MPI processes.
pub enum Training {
    /// Each process trains on its share of every batch.
    DataParallel,
    /// Data parallelism with the routed experts split over the processes.
    ExpertParallel,
    /// Pipeline groups of `stages` processes running the schedule; the groups are data-parallel,
    /// and with `experts` they split the routed experts among them.
    Pipeline { kind: dsv3_dist::schedule::Kind, chunks: usize, stages: usize, experts: bool },
}

/// Makes the trainer parallel over the MPI processes.
pub fn training(how: Training) -> anyhow::Result<()> {
    let ep = EP.get().ok_or_else(|| anyhow::anyhow!("parallel training: MPI not initialized"))?;
    let ex = ep.exchange.lock().expect("lock").take().ok_or_else(|| anyhow::anyhow!("parallel training: one trainer per process"))?;
    let sum = Arc::new(MpiSum { ex: Mutex::new(ex), rank: ep.rank, size: ep.ranks });
    match how {
        Training::DataParallel => dsv3_train::parallel::set_data_parallel(sum),
        Training::ExpertParallel => dsv3_train::parallel::set_expert_parallel(sum.clone(), sum),
        Training::Pipeline { kind, chunks, stages, experts } => {
            let experts = experts.then(|| {
                // The processes at the same pipeline rank exchange expert rows (ranks ordered as
                // in the world: the pipeline index).
                let world = &sum.ex.lock().expect("MPI lock").comm;
                let (g, s) = (ep.rank / stages, ep.rank % stages);
                let comm = world.split_by_color(mpi::topology::Color::with_value(s as i32)).expect("a member of its own color");
                Arc::new(MpiSum { ex: Mutex::new(MpiExchange { comm }), rank: g, size: ep.ranks / stages }) as Arc<dyn dsv3_model::grad::moe::ExpertExchange>
            });
            dsv3_train::parallel::set_pipeline(sum, kind, chunks, stages, experts)
        }
    }
    Ok(())
}
