//! `dsv3 convert`: a checkpoint folder's weights to another format, streamed under a memory
//! budget, into a new folder.

use crate::args::choice;
use crate::load::parse_size;
use anyhow::{Context, Result};
use dsv3_kernels::quant::Fp4Kind;
use dsv3_model::convert::Target;
use std::path::PathBuf;

/// The format of a converted checkpoint's Linear weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Fp8,
    Bf16,
    F32,
    /// NVFP4, in NVIDIA ModelOpt's layout.
    #[value(alias = "nvfp4")]
    Fp4,
    Mxfp4,
    /// GGUF outputs only: llama.cpp's f16, Q8_0, Q6_K and the Q5_K_M / Q4_K_M mixes.
    F16,
    #[value(name = "q8_0")]
    Q8_0,
    #[value(name = "q6_k")]
    Q6K,
    #[value(name = "q5_k_m")]
    Q5KM,
    #[value(name = "q4_k_m")]
    Q4KM,
}

/// Convert a checkpoint folder's weights to another format (FP8 with 128×128 weight_scale_inv
/// blocks, FP4, bf16, f32), streamed under a memory budget, into a new folder; or, with `--to
/// FILE.gguf`, into one GGUF file llama.cpp loads (f32, f16, bf16, q8_0, q6_k, q5_k_m or q4_k_m;
/// MTP included).
#[derive(clap::Args)]
pub struct Convert {
    #[arg(long)]
    pub from: PathBuf,
    #[arg(long)]
    pub to: PathBuf,
    /// fp8 | bf16 | f32 | fp4 (NVFP4, ModelOpt layout) | mxfp4; to a .gguf: f32 | f16 | bf16 | q8_0 |
    /// q6_k | q5_k_m | q4_k_m (the mixes choose per tensor as llama-quantize's do)
    #[arg(long, value_parser = choice::<Format>("--format"))]
    pub format: Format,
    /// Also store the embedding and the head in FP8 (folders only; off by default, as in the
    /// official release; with a 129,280-id vocabulary on a small model they are most of the bytes
    /// a token reads). transformers expects a bf16 head: such a folder is for dsv3.
    #[arg(long)]
    pub quantize_head: bool,
    /// Fold the LoRA adapters of this PEFT folder (dsv3's or peft's) into the weights:
    /// `W + scale·B·A`, then stored in --format.
    #[arg(long)]
    pub merge_lora: Option<PathBuf>,
    /// Budget for conversion buffers (e.g. 512M, 4G); tensors are streamed in bands of rows.
    #[arg(long, default_value = "1G")]
    pub max_memory: String,
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: &Convert) -> Result<()> {
    if dsv3_model::gguf::is_gguf(&a.to) {
        anyhow::ensure!(
            a.merge_lora.is_none(),
            "--merge-lora writes folders: merge into one (--format f32 or bf16), then convert that to GGUF"
        );
        anyhow::ensure!(
            !a.quantize_head,
            "--quantize-head is for folders: a GGUF's q8_0/q6_k/q*_k_m formats quantize the head already"
        );
        return to_gguf(a);
    }
    let target = match a.format {
        Format::Fp8 => Target::Fp8,
        Format::Bf16 => Target::Bf16,
        Format::F32 => Target::F32,
        Format::Fp4 => Target::Fp4(Fp4Kind::Nv),
        Format::Mxfp4 => Target::Fp4(Fp4Kind::Mx),
        Format::F16 | Format::Q8_0 | Format::Q6K | Format::Q5KM | Format::Q4KM => {
            anyhow::bail!("--format {:?} is a GGUF format: give --to FILE.gguf", a.format)
        }
    };
    let budget = parse_size(&a.max_memory).context("--max-memory")?;
    let t = std::time::Instant::now();
    let adapters = match &a.merge_lora {
        Some(dir) => {
            let ck = dsv3_model::weights::Checkpoint::open(&a.from)?;
            let shapes = dsv3_model::convert::linear_shapes(&ck);
            Some(dsv3_model::lora::read_peft(dir, &shapes).with_context(|| format!("--merge-lora {}", dir.display()))?)
        }
        None => None,
    };
    let r = dsv3_model::convert::convert_merging(&a.from, &a.to, target, a.quantize_head, budget, adapters.as_ref())?;
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "converted {} tensors in {} files to {:?} in {:.1}s: {:.1} MB → {:.1} MB, peak buffers {:.1} MB (budget {})",
            r.tensors,
            r.files,
            a.format,
            t.elapsed().as_secs_f64(),
            r.bytes_in as f64 / 1e6,
            r.bytes_out as f64 / 1e6,
            r.peak_buffer_bytes as f64 / 1e6,
            a.max_memory
        );
    }
    Ok(())
}

fn to_gguf(a: &Convert) -> Result<()> {
    use dsv3_model::gguf::convert::GgufFormat;
    let name = match a.format {
        Format::F32 => "f32",
        Format::F16 => "f16",
        Format::Bf16 => "bf16",
        Format::Q8_0 => "q8_0",
        Format::Q6K => "q6_k",
        Format::Q5KM => "q5_k_m",
        Format::Q4KM => "q4_k_m",
        f => anyhow::bail!("--format {f:?}: a GGUF is written in f32, f16, bf16, q8_0, q6_k, q5_k_m or q4_k_m"),
    };
    let ty = GgufFormat::parse(name).expect("every GGUF format name parses");
    let budget = parse_size(&a.max_memory).context("--max-memory")?;
    let t = std::time::Instant::now();
    let r = dsv3_model::gguf::convert::convert(&a.from, &a.to, ty, budget)?;
    if a.json {
        println!("{}", serde_json::to_string(&r)?);
    } else {
        println!(
            "converted {} tensors to {} ({name}) in {:.1}s: {:.1} MB",
            r.tensors,
            a.to.display(),
            t.elapsed().as_secs_f64(),
            r.bytes_out as f64 / 1e6
        );
    }
    Ok(())
}
