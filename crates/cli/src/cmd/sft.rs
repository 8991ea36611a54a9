//! `dsv3 sft`: supervised fine-tuning on chats — `dsv3 train`'s run (its flags, metrics, plots,
//! checkpoints, exact resume and parallel layouts) starting from a model, with the loss on the
//! assistant's tokens of each chat rendered by the model's own template.

use crate::cluster::Cluster;
use crate::cmd::train::Train;
use anyhow::{bail, Result};

/// Fine-tune a model on chats (JSONL of {"messages": [...]}), learning the assistant's tokens.
#[derive(clap::Args, Clone)]
pub struct Sft {
    #[command(flatten)]
    pub train: Train,
    /// Keep updating the routing bias (auxiliary-loss-free balancing) as pre-training does; by
    /// default it stays as loaded.
    #[arg(long)]
    pub update_bias: bool,
}

pub fn run(c: &Sft, cluster: &Cluster) -> Result<()> {
    let mut t = c.train.clone();
    if t.args.model.is_none() && t.resume.is_none() {
        bail!("dsv3 sft: --model DIR (the model to fine-tune) or --resume DIR");
    }
    t.args.chats = true;
    if !c.update_bias {
        t.args.bias_freeze_step = Some(0);
    }
    crate::cmd::train::run(&t, cluster)
}
