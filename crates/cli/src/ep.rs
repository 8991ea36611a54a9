//! `--expert-parallel` (feature `mpi`): under `mpirun -np N`, every process loads the model and
//! runs the same tokens (attention replicated); process `r` computes the routed experts
//! `e·N/E == r`, and each MoE layer all-gathers every (token, slot) output, so every process sums
//! the same rows in the same order as one process would: outputs are bit-identical.

use dsv3_dist::transport::MpiExchange;
use dsv3_model::moe::ExpertParallel;
use mpi::traits::*;
use std::sync::{Arc, Mutex, OnceLock};

pub struct MpiExperts {
    /// MPI is initialized "serialized": the forward calls it from a pool thread, one at a time.
    ex: Mutex<MpiExchange>,
    rank: usize,
    ranks: usize,
    experts: usize,
}

impl ExpertParallel for MpiExperts {
    fn holds(&self, e: usize) -> bool {
        e * self.ranks / self.experts.max(1) == self.rank
    }

    fn gather(&self, rows: &[f32], slots: &[usize], total: usize, d: usize) -> Vec<f32> {
        let mut bytes = Vec::with_capacity(slots.len() * (8 + 4 * d));
        for (i, &s) in slots.iter().enumerate() {
            bytes.extend((s as u64).to_le_bytes());
            bytes.extend(rows[i * d..(i + 1) * d].iter().flat_map(|v| v.to_le_bytes()));
        }
        let (all, _) = self.ex.lock().expect("MPI lock").all_gather(&bytes);
        let mut out = vec![0f32; total * d];
        for rec in all.chunks_exact(8 + 4 * d) {
            let s = u64::from_le_bytes(rec[..8].try_into().expect("8 bytes")) as usize;
            for (o, c) in out[s * d..(s + 1) * d].iter_mut().zip(rec[8..].chunks_exact(4)) {
                *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        out
    }
}

struct Ep {
    /// Dropped by [`finish`] (MPI_Finalize) before the process exits.
    universe: Mutex<Option<mpi::environment::Universe>>,
    rank: usize,
    ranks: usize,
    exchange: Mutex<Option<MpiExchange>>,
}

// SAFETY: the universe is only kept alive (dropped at exit, finalizing MPI); the communicator is
// used behind a mutex, with MPI initialized for serialized multi-threaded use.
unsafe impl Send for Ep {}
unsafe impl Sync for Ep {}
unsafe impl Send for MpiExperts {}
unsafe impl Sync for MpiExperts {}

static EP: OnceLock<Ep> = OnceLock::new();

/// Initializes MPI; returns (rank, ranks).
pub fn init() -> anyhow::Result<(usize, usize)> {
    let (universe, threading) = mpi::initialize_with_threading(mpi::Threading::Serialized).ok_or_else(|| anyhow::anyhow!("MPI is already initialized"))?;
    if threading < mpi::Threading::Serialized {
        anyhow::bail!("--expert-parallel: this MPI does not support serialized multi-threaded calls");
    }
    let world = universe.world();
    let (rank, ranks) = (world.rank() as usize, world.size() as usize);
    let _ = EP.set(Ep { universe: Mutex::new(Some(universe)), rank, ranks, exchange: Mutex::new(Some(MpiExchange { comm: world })) });
    Ok((rank, ranks))
}

/// Finalizes MPI (all ranks reach it after the same work).
pub fn finish() {
    if let Some(ep) = EP.get() {
        if let Ok(mut u) = ep.universe.lock() {
            u.take();
        }
    }
}

/// Splits the model's routed experts over the MPI processes.
pub fn attach(model: &mut dsv3_model::DeepseekV3) -> anyhow::Result<()> {
    let ep = EP.get().ok_or_else(|| anyhow::anyhow!("--expert-parallel: MPI not initialized"))?;
    let ex = ep.exchange.lock().expect("lock").take().ok_or_else(|| anyhow::anyhow!("--expert-parallel: one model per process"))?;
    let experts = model.config.n_routed_experts;
    if experts < ep.ranks {
        anyhow::bail!("--expert-parallel: {} processes for {experts} routed experts", ep.ranks);
    }
    if ep.rank == 0 {
        eprintln!("expert parallel: {} processes, {experts} routed experts per MoE layer split {} to {} per process", ep.ranks, experts / ep.ranks, experts.div_ceil(ep.ranks));
    }
    model.set_expert_parallel(Arc::new(MpiExperts { ex: Mutex::new(ex), rank: ep.rank, ranks: ep.ranks, experts }));
    Ok(())
}
