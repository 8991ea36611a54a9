//! Scale-out pieces of DeepSeek-V3 (spec `parallel.md`): the one communicator of every parallel
//! layout ([`comm`]; threads here, MPI in `transport` behind feature `mpi`), expert placement
//! with redundant replicas (EPLB, [`eplb`]), pipeline schedules with their simulator
//! ([`schedule`]) and executor ([`pipeline`]), and the cost planner ([`plan`]).
//!
//! Pure computations on plain data and the communicator; no model types. MPI only behind the
//! `mpi` feature, so single-process builds need no MPI.

pub mod comm;
pub mod dispatch;
pub mod eplb;
pub mod pipeline;
pub mod plan;
pub mod schedule;
#[cfg(feature = "mpi")]
pub mod transport;
