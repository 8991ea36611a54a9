//! `dsv3 train`: flags → `dsv3_train::TrainArgs`, a progress line (or one JSON object per logged
//! step with `--json`), then a sample from the trained model.

use anyhow::Result;
use dsv3_train::optim::OptimizerKind;
use dsv3_train::{BalanceMode, Precision, StepLog, TrainArgs};
use std::io::Write;
use std::path::PathBuf;

#[derive(clap::Args, Clone)]
pub struct TrainCli {
    /// Text files or folders (repeatable); default: the built-in corpus (dsv3's own sources).
    #[arg(long)]
    pub data: Vec<PathBuf>,
    /// Model shape: tiny | bench-1b (or --config).
    #[arg(long, default_value = "tiny")]
    pub preset: String,
    /// A config.json for the model shape (vocab_size and MTP depth are set by the run).
    #[arg(long, conflicts_with = "preset")]
    pub config: Option<PathBuf>,
    /// A folder with tokenizer.json to use instead of training a BPE on the data.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    #[arg(long, default_value_t = 2048)]
    pub vocab_size: usize,
    #[arg(long, default_value_t = 300)]
    pub steps: u64,
    #[arg(long, default_value_t = 128)]
    pub seq_len: usize,
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    #[arg(long, default_value_t = 3e-3)]
    pub lr: f32,
    /// The cosine decays to lr × this.
    #[arg(long, default_value_t = 0.1)]
    pub min_lr_ratio: f32,
    #[arg(long, default_value_t = 30)]
    pub warmup_steps: u64,
    #[arg(long, default_value_t = 0.1)]
    pub weight_decay: f32,
    /// AdamW β1.
    #[arg(long, default_value_t = 0.9)]
    pub beta1: f32,
    /// AdamW β2.
    #[arg(long, default_value_t = 0.95)]
    pub beta2: f32,
    /// Global gradient-norm clip (0: off).
    #[arg(long, default_value_t = 1.0)]
    pub clip: f32,
    /// adamw | sgd
    #[arg(long, default_value = "adamw")]
    pub optimizer: String,
    /// Inputs of the matrix products: bf16 (f32 accumulation; on CPUs with AVX512-BF16, else
    /// f32), f32, fp8 (every Linear's three GEMMs on E4M3 with 1×128/128×128 scaling and
    /// promotion, the rest bf16) or fp8-block-dgrad (fp8 with Dgrad's gradient in 128×128
    /// blocks). Master weights, gradients and optimizer moments are f32 always.
    #[arg(long, default_value = "bf16")]
    pub precision: String,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Std of the initial weights (default 1/√fan_in; the report uses 0.006 at full width).
    #[arg(long)]
    pub init_std: Option<f32>,
    /// MTP depth D (0 disables the MTP module).
    #[arg(long, default_value_t = 1)]
    pub mtp_depth: usize,
    /// λ of L_MTP = λ/D·Σ L_k.
    #[arg(long, default_value_t = 0.3)]
    pub mtp_lambda: f32,
    /// λ after --mtp-lambda-switch of the steps (the report: 0.3, then 0.1).
    #[arg(long)]
    pub mtp_lambda_final: Option<f32>,
    #[arg(long, default_value_t = 0.7)]
    pub mtp_lambda_switch: f32,
    /// aux-free | aux-loss | none
    #[arg(long, default_value = "aux-free")]
    pub balance: String,
    /// γ of the routing-bias update.
    #[arg(long, default_value_t = 1e-3)]
    pub bias_update_rate: f32,
    /// Subtract the mean of each bias update (torchtitan's variant).
    #[arg(long)]
    pub bias_zero_mean: bool,
    /// Step from which γ = 0 (the report's last 500B tokens).
    #[arg(long)]
    pub bias_freeze_step: Option<u64>,
    /// α of the sequence-wise balance loss (aux-free mode).
    #[arg(long, default_value_t = 1e-4)]
    pub seq_alpha: f32,
    /// α of the classic auxiliary loss (aux-loss mode).
    #[arg(long, default_value_t = 1e-3)]
    pub aux_alpha: f32,
    /// The output folder: a Hugging Face model folder plus the run's state and metrics.
    #[arg(long, default_value = "runs/tiny")]
    pub out: PathBuf,
    /// Continue a run from its checkpoint folder (bit-identical to not stopping).
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Stop (with a checkpoint) after this step while the schedule still spans --steps; continue
    /// later with --resume.
    #[arg(long)]
    pub stop_at: Option<u64>,
    /// Checkpoint every N steps (and always at the end).
    #[arg(long, default_value_t = 0)]
    pub save_every: u64,
    #[arg(long, default_value_t = 50)]
    pub eval_every: u64,
    #[arg(long, default_value_t = 32)]
    pub eval_windows: usize,
    #[arg(long, default_value_t = 1)]
    pub log_every: u64,
    /// One JSON object per logged step on stdout.
    #[arg(long)]
    pub json: bool,
    /// Skip the sample generated after training.
    #[arg(long)]
    pub no_sample: bool,
    /// Under mpirun with data, expert or pipeline parallelism: split the optimizer moments of the
    /// replicated parameters over the processes (ZeRO stage 1; bit-identical updates).
    #[arg(long)]
    pub zero1: bool,
    /// With --pipeline under `mpirun -np N`: the processes per pipeline (default N); N/P
    /// pipelines then train data-parallel.
    #[arg(long)]
    pub pp: Option<usize>,
}

impl TrainCli {
    fn args(&self) -> Result<TrainArgs> {
        let optimizer = match self.optimizer.as_str() {
            "adamw" => OptimizerKind::Adamw,
            "sgd" => OptimizerKind::Sgd,
            o => anyhow::bail!("--optimizer {o}: adamw or sgd"),
        };
        let precision = match self.precision.as_str() {
            "bf16" => Precision::Bf16,
            "f32" => Precision::F32,
            "fp8" => Precision::Fp8,
            "fp8-block-dgrad" => Precision::Fp8BlockDgrad,
            p => anyhow::bail!("--precision {p}: bf16, f32, fp8 or fp8-block-dgrad"),
        };
        let balance = match self.balance.as_str() {
            "aux-free" => BalanceMode::AuxFree,
            "aux-loss" => BalanceMode::AuxLoss,
            "none" => BalanceMode::None,
            b => anyhow::bail!("--balance {b}: aux-free, aux-loss or none"),
        };
        Ok(TrainArgs {
            data: self.data.clone(),
            preset: self.preset.clone(),
            config: self.config.clone(),
            tokenizer: self.tokenizer.clone(),
            vocab_size: self.vocab_size,
            steps: self.steps,
            seq_len: self.seq_len,
            batch_size: self.batch_size,
            lr: self.lr,
            min_lr_ratio: self.min_lr_ratio,
            warmup_steps: self.warmup_steps,
            weight_decay: self.weight_decay,
            beta1: self.beta1,
            beta2: self.beta2,
            clip: self.clip,
            optimizer,
            precision,
            seed: self.seed,
            init_std: self.init_std,
            mtp_depth: self.mtp_depth,
            mtp_lambda: self.mtp_lambda,
            mtp_lambda_final: self.mtp_lambda_final.unwrap_or(self.mtp_lambda),
            mtp_lambda_switch: self.mtp_lambda_switch,
            balance,
            bias_update_rate: self.bias_update_rate,
            bias_zero_mean: self.bias_zero_mean,
            bias_freeze_step: self.bias_freeze_step,
            seq_alpha: self.seq_alpha,
            aux_alpha: self.aux_alpha,
            out: self.out.clone(),
            save_every: self.save_every,
            eval_every: self.eval_every,
            eval_windows: self.eval_windows,
            log_every: self.log_every,
        })
    }
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

pub fn run(c: &TrainCli) -> Result<()> {
    let args = c.args()?;
    if c.zero1 {
        if dsv3_train::parallel::processes() < 2 {
            anyhow::bail!("--zero1 shards the optimizer over data-parallel processes: run under mpirun with --data-parallel, --expert-parallel or --pipeline");
        }
        dsv3_train::parallel::set_zero1();
    }
    let json = c.json;
    let summary = dsv3_train::run(args, c.resume.as_deref(), c.stop_at, |l| {
        if json {
            println!("{}", serde_json::to_string(l).unwrap_or_default());
        } else {
            progress(l);
        }
    })?;
    #[cfg(feature = "mpi")]
    if crate::ep::expert_exchange_bytes() > 0 {
        let tokens =
            summary.steps_run as f64 * (c.batch_size * c.seq_len) as f64 / dsv3_train::parallel::processes() as f64;
        eprintln!(
            "process {}: the expert exchange sent {:.1} MB to other processes ({:.0} bytes per token of its share)",
            dsv3_train::parallel::rank(),
            crate::ep::expert_exchange_bytes() as f64 / 1e6,
            crate::ep::expert_exchange_bytes() as f64 / tokens
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
    if !c.no_sample && !json && dsv3_train::parallel::rank() == 0 {
        crate::commands::sample(&summary.out)?;
    }
    Ok(())
}
