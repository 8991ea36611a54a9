//! `dsv3 eplb`: EPLB's `rebalance_experts` on per-expert loads.

use anyhow::{Context, Result};
use dsv3_dist::eplb::{imbalance, rebalance_experts};
use std::path::PathBuf;

/// Place experts with redundant replicas (EPLB's rebalance_experts) from per-expert loads.
#[derive(clap::Args)]
pub struct Eplb {
    /// JSON `[[load per logical expert] per layer]`.
    #[arg(long)]
    pub load: PathBuf,
    /// Physical expert slots (P ≥ experts; a multiple of --gpus).
    #[arg(long)]
    pub replicas: usize,
    /// Expert groups (the routing groups; hierarchical placement when they divide among nodes).
    #[arg(long, default_value_t = 1)]
    pub groups: usize,
    #[arg(long, default_value_t = 1)]
    pub nodes: usize,
    #[arg(long)]
    pub gpus: usize,
    /// Print `{"phy2log","log2phy","logcnt","phyrank"}`.
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: &Eplb) -> Result<()> {
    let v = dsv3_model::files::read_json(&a.load).with_context(|| format!("reading {}", a.load.display()))?;
    let weight: Vec<Vec<f64>> = serde_json::from_value(v)
        .with_context(|| format!("{}: expected [[load per logical expert] per layer]", a.load.display()))?;
    let p =
        rebalance_experts(&weight, a.replicas, a.groups, a.nodes, a.gpus).map_err(|e| anyhow::anyhow!("eplb: {e}"))?;
    if a.json {
        println!("{}", serde_json::to_string(&p)?);
        return Ok(());
    }
    // Without replicas: expert e on GPU e / (E / gpus) when the experts divide evenly.
    let (e, gpus) = (weight[0].len(), a.gpus);
    for (l, w) in weight.iter().enumerate() {
        let before = e.is_multiple_of(gpus).then(|| {
            let per = e / gpus;
            imbalance(&(0..gpus).map(|g| w[g * per..(g + 1) * per].iter().sum()).collect::<Vec<f64>>())
        });
        let after = imbalance(&p.loads(l, w, gpus));
        match before {
            Some(b) => println!(
                "layer {l}: GPU load max/mean {b:.3} with experts in order → {after:.3} placed with {} slots",
                a.replicas
            ),
            None => println!("layer {l}: GPU load max/mean {after:.3} placed with {} slots", a.replicas),
        }
    }
    Ok(())
}
