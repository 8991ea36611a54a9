//! The processes of a run under `mpirun` (a build with `--features dsv3-cli/mpi`): MPI started
//! once for the commands whose flags ask for parallelism, and the layouts the libraries take
//! built from it. Without MPI (or without such flags) a run is one process.

use anyhow::{bail, Result};
use dsv3_dist::comm::Comm;
use std::sync::Arc;

/// This run's processes: one, or the MPI world.
pub struct Cluster {
    #[cfg(feature = "mpi")]
    world: Option<dsv3_dist::transport::World>,
}

const NEEDS_MPI: &str = "--expert-parallel, --data-parallel and --pipeline need a build with MPI: cargo build \
                         --release --features dsv3-cli/mpi (OpenMPI and clang installed)";

impl Cluster {
    /// One process.
    pub fn single() -> Cluster {
        Cluster {
            #[cfg(feature = "mpi")]
            world: None,
        }
    }

    /// MPI started (under `mpirun`); every rank but 0 silent on stdout.
    pub fn mpi() -> Result<Cluster> {
        #[cfg(feature = "mpi")]
        {
            let world = dsv3_dist::transport::World::init().map_err(|e| anyhow::anyhow!("MPI: {e}"))?;
            if world.rank() != 0 {
                silence_stdout();
            }
            Ok(Cluster { world: Some(world) })
        }
        #[cfg(not(feature = "mpi"))]
        bail!(NEEDS_MPI)
    }

    pub fn rank(&self) -> usize {
        #[cfg(feature = "mpi")]
        if let Some(w) = &self.world {
            return w.rank();
        }
        0
    }

    pub fn size(&self) -> usize {
        #[cfg(feature = "mpi")]
        if let Some(w) = &self.world {
            return w.size();
        }
        1
    }

    /// The world's communicator (an error without MPI).
    pub fn comm(&self) -> Result<Arc<dyn Comm>> {
        #[cfg(feature = "mpi")]
        if let Some(w) = &self.world {
            return Ok(w.comm.clone());
        }
        bail!(NEEDS_MPI)
    }

    /// Each rank's host name, in rank order.
    pub fn hosts(&self) -> Vec<String> {
        #[cfg(feature = "mpi")]
        if let Some(w) = &self.world {
            return w.hosts();
        }
        vec!["localhost".into()]
    }

    /// The training layout of `p` over these processes.
    pub fn train_layout(&self, p: &crate::args::TrainParallel) -> Result<dsv3_train::Layout> {
        use dsv3_train::Layout;
        if p.pp.is_some() && p.pipeline.is_none() {
            bail!("--pp needs --pipeline");
        }
        let parallel = p.data_parallel || p.expert_parallel || p.pipeline.is_some();
        if !parallel {
            if p.zero1 {
                bail!("--zero1 shards the optimizer over data-parallel processes: run under mpirun with --data-parallel, --expert-parallel or --pipeline");
            }
            return Ok(Layout::single());
        }
        let comm = self.comm()?;
        let ranks = comm.size();
        let mut layout = match p.pipeline {
            None if p.expert_parallel => Layout::expert_parallel(comm.clone(), comm),
            None => Layout::data_parallel(comm),
            Some(kind) => {
                let stages = p.pp.unwrap_or(ranks);
                if stages == 0 || !ranks.is_multiple_of(stages) {
                    bail!("--pp {stages}: not a divisor of the {ranks} processes (mpirun -np D·P runs D data-parallel pipelines of P)");
                }
                let experts = if p.expert_parallel { Some(self.stage_exchange(stages)?) } else { None };
                Layout::pipelined(comm, kind.into(), p.chunks.unwrap_or(2 * stages), stages, experts)
            }
        };
        if p.zero1 && ranks < 2 {
            bail!("--zero1 shards the optimizer over data-parallel processes: run under mpirun with more than one");
        }
        layout.zero1 = p.zero1;
        Ok(layout)
    }

    /// The processes at the same pipeline rank exchange expert rows (ranks ordered as in the
    /// world: the pipeline index), the backward's on a duplicate communicator when a forward and
    /// a backward may run at once.
    fn stage_exchange(&self, stages: usize) -> Result<dsv3_model::grad::exchange::ExchangeExperts> {
        #[cfg(feature = "mpi")]
        if let Some(w) = &self.world {
            let comm = Arc::new(w.comm.split((w.rank() % stages) as i32));
            let backward: Arc<dyn Comm> = if w.concurrent { Arc::new(comm.duplicate()) } else { comm.clone() };
            return Ok(dsv3_model::grad::exchange::ExchangeExperts { forward: comm, backward });
        }
        let _ = stages;
        bail!(NEEDS_MPI)
    }
}

#[cfg(feature = "mpi")]
fn silence_stdout() {
    // SAFETY: plain POSIX calls on descriptors this process owns; stdout becomes /dev/null.
    unsafe {
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_WRONLY);
        if null >= 0 {
            libc::dup2(null, 1);
            libc::close(null);
        }
    }
}
