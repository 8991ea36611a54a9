//! `dsv3 random-model`: a random DeepSeek-V3 checkpoint of a preset shape, for benchmarks and
//! experiments.

use crate::args::choice;
use anyhow::{Context, Result};
use dsv3_model::init::{preset, write_random_checkpoint, StoreDtype};
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Dtype {
    F32,
    Bf16,
    Fp8,
}

/// Write a random DeepSeek-V3 checkpoint (a preset shape) for benchmarks and experiments.
#[derive(clap::Args)]
pub struct RandomModel {
    /// tiny | tiny-v32 | bench-1b (real 129,280-id vocabulary) | bench-1b-v32 | bench-1b-32k, or a
    /// config.json path (`-v32`: DeepSeek-V3.2 sparse attention).
    #[arg(long, default_value = "tiny")]
    pub preset: String,
    /// f32 | bf16 | fp8
    #[arg(long, value_parser = choice::<Dtype>("--dtype"), default_value = "bf16")]
    pub dtype: Dtype,
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// A preset's config, or a config.json's.
fn config_for(name: &str) -> Result<serde_json::Value> {
    match preset(name) {
        Some(v) => Ok(v),
        None => dsv3_model::files::read_json(Path::new(name)).with_context(|| {
            format!("`{name}` is neither a preset (tiny, tiny-v32, bench-1b, bench-1b-v32, bench-1b-32k) nor a readable config.json")
        }),
    }
}

pub fn run(a: &RandomModel) -> Result<()> {
    let dtype = match a.dtype {
        Dtype::F32 => StoreDtype::F32,
        Dtype::Bf16 => StoreDtype::Bf16,
        Dtype::Fp8 => StoreDtype::Fp8,
    };
    write_random_checkpoint(&a.out, &config_for(&a.preset)?, dtype, a.seed)?;
    eprintln!("wrote a random {} ({dtype:?}) to {}", a.preset, a.out.display());
    Ok(())
}
