//! Data-parallel training (`dsv3 train --data-parallel` under `mpirun`): every process holds the
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
}

static DP: OnceLock<Arc<dyn AllReduce>> = OnceLock::new();

/// Makes this process one of `dp.size()` data-parallel trainers.
pub fn set_data_parallel(dp: Arc<dyn AllReduce>) {
    let _ = DP.set(dp);
}

pub(crate) fn get() -> Option<&'static Arc<dyn AllReduce>> {
    DP.get()
}
