//! Data-parallel and pipeline training (`dsv3 train --data-parallel` under `mpirun`): every process holds the
//! whole model, trains on its share of each batch's sequences, and the gradients, losses and
//! expert loads are summed across processes before the update — so every process applies the
//! same update (the aux-free bias included, from the global expert counts) and the run equals one
//! process training on the whole batch up to the order of the sums. The transport is outside
//! this crate (MPI in the CLI).

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
static PIPELINE: OnceLock<(dsv3_dist::schedule::Kind, usize)> = OnceLock::new();

/// Pipeline training (`dsv3 train --pipeline KIND --chunks C` under `mpirun`): every process
/// holds the model, the batch's C micro-batches flow through the schedule's stages (each process
/// runs its stages' forwards and backwards, activations and gradients travel point to point),
/// then the stage gradients are summed across processes as in data parallelism (the two copies
/// of a DualPipe stage, and the embedding used by the first and last stages, add up there).
pub fn set_pipeline(dp: Arc<dyn AllReduce>, kind: dsv3_dist::schedule::Kind, chunks: usize) {
    set_data_parallel(dp);
    let _ = PIPELINE.set((kind, chunks));
}

pub(crate) fn pipeline() -> Option<(dsv3_dist::schedule::Kind, usize)> {
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

pub(crate) fn get() -> Option<&'static Arc<dyn AllReduce>> {
    DP.get()
}
