//! `dsv3 plot`: a training run's plots redrawn from its metrics, or several runs compared.

use anyhow::Result;
use std::path::PathBuf;

/// (Re)draw a training run's plots (loss, expert load, MaxVio; SVG and PNG) from its metrics.jsonl.
#[derive(clap::Args)]
pub struct Plot {
    /// The run's output folder (several with --compare).
    #[arg(required = true)]
    pub runs: Vec<PathBuf>,
    /// Compare the runs: charts of LM loss, validation loss and MaxVio, and a Markdown table.
    #[arg(long)]
    pub compare: bool,
    /// Where the comparison goes.
    #[arg(long, default_value = ".")]
    pub out: PathBuf,
}

pub fn run(a: &Plot) -> Result<()> {
    if a.compare {
        dsv3_train::plot::write_compare_plots(&a.runs, &a.out).map(|table| print!("{table}"))
    } else {
        a.runs.iter().try_for_each(|r| dsv3_train::plot::write_run_plots(r))
    }
}
