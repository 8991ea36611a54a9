//! Scale-out pieces of DeepSeek-V3 (spec `parallel.md`): expert placement with redundant replicas
//! (EPLB, [`eplb`]), pipeline schedules with their simulator ([`schedule`]), MoE dispatch and
//! combine ([`ep`]) over MPI (`transport`, feature `mpi`), and the cost planner ([`plan`]).
//!
//! Pure computations on plain data and an all-to-all trait; no model types. MPI only behind the
//! `mpi` feature, so single-process builds need no MPI.

pub mod ep;
pub mod eplb;
pub mod pipeline;
pub mod plan;
pub mod schedule;
#[cfg(feature = "mpi")]
pub mod transport;
