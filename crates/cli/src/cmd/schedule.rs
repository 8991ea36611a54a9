//! `dsv3 schedule`: pipeline schedules (1F1B, DualPipe, DualPipeV), each rank's ops, and the
//! simulated makespan and per-rank bubble.

use crate::args::{choice, Schedule as Kind};
use anyhow::{bail, Result};
use dsv3_dist::schedule::{bubble_formula, generate, simulate, Timing};

/// Pipeline schedules (1F1B, DualPipe, DualPipeV): each rank's ops, and the simulated makespan
/// and per-rank bubble.
#[derive(clap::Args)]
pub struct Schedule {
    /// 1f1b | dualpipe | dualpipev
    #[arg(long, value_parser = choice::<Kind>("--kind"))]
    pub kind: Kind,
    /// Pipeline ranks (devices); DualPipeV runs 2·pp stages on them.
    #[arg(long)]
    pub pp: usize,
    /// Micro-batches per step.
    #[arg(long)]
    pub chunks: usize,
    /// Forward chunk time.
    #[arg(long, default_value_t = 1.0)]
    pub f: f64,
    /// Full backward chunk time.
    #[arg(long, default_value_t = 2.0)]
    pub b: f64,
    /// Weight-gradient part of a backward.
    #[arg(long, default_value_t = 1.0)]
    pub w: f64,
    /// A forward and a backward overlapped.
    #[arg(long, default_value_t = 3.0)]
    pub fb: f64,
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: &Schedule) -> Result<()> {
    let k: dsv3_dist::schedule::Kind = a.kind.into();
    let (f, b, w, fb) = (a.f, a.b, a.w, a.fb);
    if [f, b, w, fb].iter().any(|x| !x.is_finite() || *x < 0.0) || w > b {
        bail!("--f/--b/--w/--fb must be non-negative, with --w at most --b");
    }
    let t = Timing { f, b, w, fb };
    let ops = generate(k, a.pp, a.chunks).map_err(|e| anyhow::anyhow!("{e}"))?;
    let sim = simulate(k, &ops, t).map_err(|e| anyhow::anyhow!("{e}"))?;
    let stages = if k == dsv3_dist::schedule::Kind::DualPipeV { 2 * a.pp } else { a.pp };
    let ranks: Vec<Vec<String>> = ops.iter().map(|r| r.iter().map(|o| o.to_string()).collect()).collect();
    if a.json {
        let formula = bubble_formula(k, stages, t);
        println!(
            "{}",
            serde_json::json!({"ranks": ranks, "makespan": sim.makespan, "bubble": sim.bubble, "formula": formula})
        );
    } else {
        for (r, ops) in ranks.iter().enumerate() {
            println!("rank {r}: {}", ops.join(" "));
        }
        println!(
            "makespan {} ; bubble per rank {:?} ; formula {}",
            sim.makespan,
            sim.bubble,
            bubble_formula(k, stages, t)
        );
    }
    Ok(())
}
