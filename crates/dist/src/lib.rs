//! Scale-out pieces of DeepSeek-V3 (spec `parallel.md`): expert placement with redundant replicas
//! (EPLB, [`eplb`]) and pipeline schedules with their simulator ([`schedule`]).
//!
//! Pure computations on plain data; no model types and no transport.

pub mod eplb;
pub mod plan;
pub mod schedule;
