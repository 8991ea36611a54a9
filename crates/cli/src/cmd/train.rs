//! `dsv3 train`: the run's flags (the library's `TrainArgs`, their one definition) and layout, a
//! progress line (or one JSON object per logged step with `--json`), then a sample from the
//! trained model.

use crate::args::TrainParallel;
use crate::cluster::Cluster;
use anyhow::Result;
use dsv3_train::{StepLog, TrainArgs};
use std::io::Write;
use std::path::PathBuf;

/// Train a DeepSeek-V3-architecture model (MLA + DeepSeekMoE + MTP) from text.
#[derive(clap::Args, Clone)]
pub struct Train {
    #[command(flatten)]
    pub args: TrainArgs,
    /// Continue a run from its checkpoint folder (bit-identical to not stopping).
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Stop (with a checkpoint) after this step while the schedule still spans --steps; continue
    /// later with --resume.
    #[arg(long)]
    pub stop_at: Option<u64>,
    /// One JSON object per logged step on stdout.
    #[arg(long)]
    pub json: bool,
    /// Skip the sample generated after training.
    #[arg(long)]
    pub no_sample: bool,
    #[command(flatten)]
    pub parallel: TrainParallel,
}

fn progress(l: &StepLog) {
    let width = 24;
    let done = (width as u64 * l.step / l.steps.max(1)) as usize;
    let bar: String = "█".repeat(done) + &"░".repeat(width - done);
    let val = l.val_loss.map(|v| format!(" val {v:.3}")).unwrap_or_default();
    let mtp = l.mtp_losses.first().map(|m| format!(" mtp {m:.3}")).unwrap_or_default();
    eprint!(
        "\r{bar} {}/{} loss {:.3}{mtp}{val} maxvio {:.2} lr {:.1e} {:.0} tok/s ETA {:.0}s   ",
        l.step, l.steps, l.lm_loss, l.maxvio, l.lr, l.tokens_per_second, l.eta_seconds
    );
    if l.val_loss.is_some() {
        eprintln!();
    }
    std::io::stderr().flush().ok();
}

pub fn run(c: &Train, cluster: &Cluster) -> Result<()> {
    let layout = cluster.train_layout(&c.parallel)?;
    let json = c.json;
    let summary = dsv3_train::run(c.args.clone(), &layout, c.resume.as_deref(), c.stop_at, |l| {
        if json {
            println!("{}", serde_json::to_string(l).unwrap_or_default());
        } else {
            progress(l);
        }
    })?;
    if let Some(ex) = &layout.experts {
        let sent = ex.forward.bytes_sent() + if ex.apart() { ex.backward.bytes_sent() } else { 0 };
        let tokens = summary.steps_run as f64 * (c.args.batch_size * c.args.seq_len) as f64 / layout.processes() as f64;
        eprintln!(
            "process {}: the expert exchange sent {:.1} MB to other processes ({:.0} bytes per token of its share)",
            layout.rank(),
            sent as f64 / 1e6,
            sent as f64 / tokens
        );
    }
    if json {
        println!("{}", serde_json::json!({ "summary": summary }));
    } else {
        eprintln!(
            "\ntrained {} parameters for {} steps: LM loss {:.3}, validation loss {}, global MaxVio {}, MTP top-1 agreement {} → {}",
            summary.parameters,
            summary.steps,
            summary.final_lm_loss,
            summary.val_loss.map_or("-".into(), |v| format!("{v:.3}")),
            summary.val_maxvio.map_or("-".into(), |v| format!("{v:.3}")),
            summary.val_mtp_top1.map_or("-".into(), |v| format!("{:.1}%", 100.0 * v)),
            summary.out.display()
        );
        eprintln!(
            "{:.0} tokens/s × {:.1} MFLOP/token = {:.1} GFLOP/s of model FLOPs",
            summary.tokens_per_second,
            summary.flops_per_token / 1e6,
            summary.model_gflops_per_second
        );
    }
    if !c.no_sample && !json && layout.rank() == 0 {
        match c.args.chats {
            true => crate::cmd::demo::sample_chat(&summary.out, c.args.model.as_deref(), "What is 23+45?")?,
            false => crate::cmd::demo::sample(&summary.out)?,
        }
    }
    Ok(())
}
