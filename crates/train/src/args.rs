//! What a run is made of: one schema (`TrainArgs`), saved in its checkpoints so a resume
//! continues with it, and the values derived from it step by step (loss weights, learning-rate
//! schedule, numerics).

use crate::optim::{OptimConfig, OptimizerKind};
use anyhow::{bail, Context, Result};
use dsv3_model::grad::model::LossWeights;
use dsv3_model::grad::moe::Balance;
use dsv3_model::init::preset;
use serde_json::Value;
use std::path::PathBuf;

/// A flag's enum value, with an error listing the choices (`--precision fp4: f32, bf16, fp8 or
/// fp8-block-dgrad`).
pub fn parse_choice<T: clap::ValueEnum>(flag: &str, s: &str) -> std::result::Result<T, String> {
    T::from_str(s, false).map_err(|_| {
        let names: Vec<String> = T::value_variants()
            .iter()
            .filter_map(|v| v.to_possible_value())
            .map(|p| p.get_name().to_string())
            .collect();
        let list = match names.split_last() {
            Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
            _ => names.join(""),
        };
        format!("{flag} {s}: {list}")
    })
}

fn precision(s: &str) -> std::result::Result<Precision, String> {
    parse_choice("--precision", s)
}

fn balance(s: &str) -> std::result::Result<BalanceMode, String> {
    parse_choice("--balance", s)
}

fn optimizer(s: &str) -> std::result::Result<OptimizerKind, String> {
    parse_choice("--optimizer", s)
}

/// How experts are kept balanced (`--balance`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum BalanceMode {
    /// Routing bias nudged by γ each step, plus the tiny sequence-wise loss (the report).
    AuxFree,
    /// The classic auxiliary loss over the batch, no bias.
    AuxLoss,
    None,
}

fn default_lora_targets() -> Vec<String> {
    dsv3_model::lora::ATTENTION.iter().map(|s| s.to_string()).collect()
}

fn default_beta1() -> f32 {
    0.9
}

fn default_beta2() -> f32 {
    0.95
}

/// `--precision`: the inputs of training's matrix products.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    F32,
    /// bf16 inputs, f32 accumulation, where the CPU has AVX512-BF16 (f32 elsewhere).
    #[default]
    Bf16,
    /// The report's FP8 recipe: every `Linear`'s Fprop, Dgrad and Wgrad on E4M3 inputs (1×128
    /// activation and gradient tiles, 128×128 weight blocks) with promotion; the rest as `Bf16`.
    Fp8,
    /// `Fp8` with Dgrad's output gradient in 128×128 blocks: the variant of the report's App. B.2.
    #[serde(rename = "fp8-block-dgrad")]
    Fp8BlockDgrad,
}

impl Precision {
    /// The FP8 recipe of `Linear` GEMMs, if this precision has one.
    pub fn fp8_recipe(self) -> Option<dsv3_model::grad::fp8::Fp8Recipe> {
        use dsv3_model::grad::fp8::Fp8Recipe;
        match self {
            Precision::F32 | Precision::Bf16 => None,
            Precision::Fp8 => Some(Fp8Recipe::default()),
            Precision::Fp8BlockDgrad => Some(Fp8Recipe { dgrad_block: [128, 128], ..Fp8Recipe::default() }),
        }
    }
}

/// Everything a run is made of: the flags of `dsv3 train` (this struct is their one definition,
/// defaults included) and what its checkpoints save, so a resume continues with it.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize, clap::Args)]
pub struct TrainArgs {
    /// Text files or folders (repeatable); default: the built-in corpus (dsv3's own sources).
    /// `dsv3 sft`: JSONL files of chats; default: the built-in chat set.
    #[arg(long)]
    pub data: Vec<PathBuf>,
    /// Start from this model (a dsv3 or Hugging Face DeepSeek-architecture folder, f32, bf16 or
    /// FP8): its weights, config, tokenizer and chat template. --preset, --config, --tokenizer and
    /// --vocab-size then do not apply; --mtp-depth keeps at most that many of its MTP modules.
    #[arg(long)]
    #[serde(default)]
    pub model: Option<PathBuf>,
    /// The data are chats, learned on the assistant's tokens only (`dsv3 sft`).
    #[arg(skip)]
    #[serde(default)]
    pub chats: bool,
    /// LoRA: train rank-R adapters on --lora-targets of --model, the base frozen in its stored
    /// format (FP8, bf16 or f32); checkpoints hold the adapters in PEFT's layout (0: train every
    /// weight).
    #[arg(long, default_value_t = 0)]
    #[serde(default)]
    pub lora_rank: usize,
    /// LoRA's α (the update is scaled by α/R); default: R.
    #[arg(long)]
    #[serde(default)]
    pub lora_alpha: Option<f32>,
    /// The modules LoRA adapts, by their last name components (`*`: any one): the attention
    /// projections by default; `gate_proj,up_proj,down_proj` every FFN; `mlp.gate_proj` the dense
    /// ones; `shared_experts.up_proj` the shared experts; `experts.*.down_proj` the routed ones.
    #[arg(long, value_delimiter = ',', default_value = "q_a_proj,q_b_proj,q_proj,kv_a_proj_with_mqa,kv_b_proj,o_proj")]
    #[serde(default = "default_lora_targets")]
    pub lora_targets: Vec<String>,
    /// Model shape: tiny | tiny-v32 | bench-1b (real 129,280-id vocabulary) | bench-1b-v32 |
    /// bench-1b-32k (or --config; `-v32`: DeepSeek-V3.2 sparse attention).
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
    #[serde(default = "default_beta1")]
    pub beta1: f32,
    /// AdamW β2.
    #[arg(long, default_value_t = 0.95)]
    #[serde(default = "default_beta2")]
    pub beta2: f32,
    /// Global gradient-norm clip (0: off).
    #[arg(long, default_value_t = 1.0)]
    pub clip: f32,
    #[arg(long, value_parser = optimizer, default_value = "adamw")]
    pub optimizer: OptimizerKind,
    /// Inputs of the matrix products: bf16 (f32 accumulation; on CPUs with AVX512-BF16, else
    /// f32), f32, fp8 (every Linear's three GEMMs on E4M3 with 1×128/128×128 scaling and
    /// promotion, the rest bf16) or fp8-block-dgrad (fp8 with Dgrad's gradient in 128×128
    /// blocks). Master weights, gradients and optimizer moments are f32 always.
    #[arg(long, value_parser = precision, default_value = "bf16")]
    #[serde(default)]
    pub precision: Precision,
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
    /// λ after --mtp-lambda-switch of the steps (the report: 0.3, then 0.1); default: --mtp-lambda.
    #[arg(long)]
    pub mtp_lambda_final: Option<f32>,
    /// The share of the steps after which λ becomes --mtp-lambda-final (the report: 10T of 14.8T).
    #[arg(long, default_value_t = 0.7)]
    pub mtp_lambda_switch: f32,
    #[arg(long, value_parser = balance, default_value = "aux-free")]
    pub balance: BalanceMode,
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
    /// V3.2 (DSA): the first N steps are the dense warm-up, where attention ignores the indexers
    /// and only they train, towards it; then sparse training of everything.
    #[arg(long, default_value_t = 0)]
    #[serde(default)]
    pub dsa_warmup_steps: u64,
    /// The output folder: a Hugging Face model folder plus the run's state and metrics.
    #[arg(long, default_value = "runs/tiny")]
    pub out: PathBuf,
    /// Checkpoint every N steps (and always at the end).
    #[arg(long, default_value_t = 0)]
    pub save_every: u64,
    #[arg(long, default_value_t = 50)]
    pub eval_every: u64,
    /// Most validation windows per evaluation.
    #[arg(long, default_value_t = 32)]
    pub eval_windows: usize,
    #[arg(long, default_value_t = 1)]
    pub log_every: u64,
}

impl Default for TrainArgs {
    /// The flags' defaults (clap's attributes above are their one definition).
    fn default() -> Self {
        #[derive(clap::Parser)]
        struct Defaults {
            #[command(flatten)]
            args: TrainArgs,
        }
        <Defaults as clap::Parser>::parse_from(["train"]).args
    }
}

impl TrainArgs {
    /// The args as a run saves them: defaults that follow other flags made explicit.
    pub fn resolved(mut self) -> Self {
        self.mtp_lambda_final = Some(self.mtp_lambda_final.unwrap_or(self.mtp_lambda));
        self
    }

    /// Every value in the domain its formula needs; each error names the flag and its value.
    pub fn validate(&self) -> Result<()> {
        let finite_in = |flag: &str, v: f32, lo: f32, hi: f32| {
            if v.is_finite() && (lo..=hi).contains(&v) {
                Ok(())
            } else {
                bail!("--{flag} {v}: must be a number in [{lo}, {hi}]")
            }
        };
        finite_in("lr", self.lr, 0.0, 1e3)?;
        finite_in("min-lr-ratio", self.min_lr_ratio, 0.0, 1.0)?;
        finite_in("weight-decay", self.weight_decay, 0.0, 1e3)?;
        finite_in("beta1", self.beta1, 0.0, 0.999_999)?;
        finite_in("beta2", self.beta2, 0.0, 0.999_999_9)?;
        finite_in("clip", self.clip, 0.0, f32::MAX)?;
        finite_in("mtp-lambda", self.mtp_lambda, 0.0, 1e3)?;
        finite_in("mtp-lambda-final", self.mtp_lambda_final.unwrap_or(self.mtp_lambda), 0.0, 1e3)?;
        finite_in("mtp-lambda-switch", self.mtp_lambda_switch, 0.0, 1.0)?;
        finite_in("bias-update-rate", self.bias_update_rate, 0.0, 1e3)?;
        finite_in("seq-alpha", self.seq_alpha, 0.0, 1e3)?;
        finite_in("aux-alpha", self.aux_alpha, 0.0, 1e3)?;
        if let Some(s) = self.init_std {
            if !(s.is_finite() && s > 0.0) {
                bail!("--init-std {s}: must be a positive number");
            }
        }
        if self.seq_len == 0 || self.batch_size == 0 {
            bail!("--seq-len {} and --batch-size {} must be positive", self.seq_len, self.batch_size);
        }
        // A batch's tokens and its activations are sized from these: refuse what cannot be held.
        let tokens = (self.seq_len as u128 + 1) * self.batch_size as u128;
        if tokens > 1 << 32 {
            bail!(
                "--seq-len {} × --batch-size {} = {tokens} tokens per batch: too many",
                self.seq_len,
                self.batch_size
            );
        }
        if self.steps == 0 {
            bail!("--steps must be at least 1");
        }
        if self.model.is_some() && (self.config.is_some() || self.tokenizer.is_some()) {
            bail!("--model brings its own config and tokenizer: drop --config / --tokenizer");
        }
        if let Some(cfg) = self.lora() {
            if self.model.is_none() {
                bail!("--lora-rank {}: adapters need a model to adapt (--model DIR)", self.lora_rank);
            }
            cfg.validate()?;
        }
        Ok(())
    }

    /// The LoRA adapters a run trains, if any.
    pub fn lora(&self) -> Option<dsv3_model::lora::LoraConfig> {
        (self.lora_rank > 0).then(|| dsv3_model::lora::LoraConfig {
            rank: self.lora_rank,
            alpha: self.lora_alpha.unwrap_or(self.lora_rank as f32),
            targets: self.lora_targets.clone(),
        })
    }
}

impl TrainArgs {
    /// λ of the MTP loss and the balance losses' α at `step`.
    pub fn loss_weights(&self, step: u64) -> LossWeights {
        let switch = (self.mtp_lambda_switch as f64 * self.steps as f64) as u64;
        let mtp_lambda = if step > switch { self.mtp_lambda_final.unwrap_or(self.mtp_lambda) } else { self.mtp_lambda };
        let balance = match self.balance {
            BalanceMode::AuxFree => Balance { seq_alpha: self.seq_alpha, batch_alpha: 0.0 },
            BalanceMode::AuxLoss => Balance { seq_alpha: 0.0, batch_alpha: self.aux_alpha },
            BalanceMode::None => Balance::default(),
        };
        LossWeights { mtp_lambda, balance }
    }

    /// Whether `step` is in DSA's dense warm-up.
    pub fn dsa_warmup(&self, step: u64) -> bool {
        step <= self.dsa_warmup_steps
    }

    /// γ of the aux-free bias update at `step` (0 after `bias_freeze_step`, or in other modes, or
    /// while the main model is frozen in DSA's warm-up).
    pub fn bias_rate(&self, step: u64) -> f32 {
        if self.dsa_warmup(step) {
            return 0.0;
        }
        match (self.balance, self.bias_freeze_step) {
            (BalanceMode::AuxFree, Some(f)) if step >= f => 0.0,
            (BalanceMode::AuxFree, _) => self.bias_update_rate,
            _ => 0.0,
        }
    }

    /// The optimizer and its schedule.
    pub fn optim(&self) -> OptimConfig {
        OptimConfig {
            kind: self.optimizer,
            lr: self.lr,
            min_lr_ratio: self.min_lr_ratio,
            warmup_steps: self.warmup_steps,
            total_steps: self.steps,
            beta1: self.beta1,
            beta2: self.beta2,
            eps: 1e-8,
            weight_decay: self.weight_decay,
            clip: self.clip,
        }
    }

    /// The numerics of every step: bf16 compute where the CPU has it, the FP8 recipe.
    pub fn numerics(&self) -> dsv3_model::exec::Training {
        dsv3_model::exec::Training {
            bf16: self.precision != Precision::F32 && dsv3_kernels::gemm::bf16_available(),
            fp8: self.precision.fp8_recipe(),
            dsa_warmup: false,
        }
    }
}

/// The model's config JSON for a run: the preset or file, with the tokenizer's vocabulary and the
/// MTP depth.
pub(crate) fn model_config(args: &TrainArgs, vocab: usize) -> Result<Value> {
    let mut c = match &args.config {
        Some(p) => {
            serde_json::from_str(&std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?)
                .with_context(|| format!("{}: not JSON", p.display()))?
        }
        None => preset(&args.preset).with_context(|| {
            format!("--preset {}: unknown (tiny, tiny-v32, bench-1b, bench-1b-v32, bench-1b-32k)", args.preset)
        })?,
    };
    c["vocab_size"] = vocab.into();
    c["num_nextn_predict_layers"] = args.mtp_depth.into();
    if let Some(o) = c.as_object_mut() {
        o.remove("architectures"); // the model type's own, below
    }
    let mut c = dsv3_model::config::with_architectures(&c);
    c["bos_token_id"] = 0.into();
    c["eos_token_id"] = 1.into();
    c["torch_dtype"] = "float32".into();
    Ok(c)
}
