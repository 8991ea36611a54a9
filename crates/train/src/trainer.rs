//! The training loop: data → `DeepseekV3::train_step` (LM + MTP + balance losses, backward) →
//! clip + AdamW → aux-loss-free bias update → metrics, validation and checkpoints.

use crate::balance::{max_vio, update_biases};
use crate::checkpoint::{self, TrainState};
use crate::data::{self, Loader, LoaderState, Split};
use crate::optim::{OptimConfig, Optimizer, OptimizerKind};
use crate::placement::Placement;
use anyhow::{bail, Context, Result};
use dsv3_model::grad::fp8::with_recipe;
use dsv3_model::grad::model::{LossWeights, StepReport};
use dsv3_model::grad::moe::Balance;
use dsv3_model::grad::Grads;
use dsv3_model::init::{preset, write_training_init};
use dsv3_model::DeepseekV3;
use serde_json::Value;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// How experts are kept balanced (`--balance`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BalanceMode {
    /// Routing bias nudged by γ each step, plus the tiny sequence-wise loss (the report).
    AuxFree,
    /// The classic auxiliary loss over the batch, no bias.
    AuxLoss,
    None,
}

fn default_beta1() -> f32 {
    0.9
}

fn default_beta2() -> f32 {
    0.95
}

/// `--precision`: the inputs of training's matrix products.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
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

/// Everything a run is made of (saved in its checkpoints; a resume continues with these).
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct TrainArgs {
    /// Text files or folders; empty: the built-in corpus.
    pub data: Vec<PathBuf>,
    pub preset: String,
    pub config: Option<PathBuf>,
    /// An existing tokenizer folder (tokenizer.json); else one is trained on the data.
    pub tokenizer: Option<PathBuf>,
    pub vocab_size: usize,
    pub steps: u64,
    pub seq_len: usize,
    pub batch_size: usize,
    pub lr: f32,
    pub min_lr_ratio: f32,
    pub warmup_steps: u64,
    pub weight_decay: f32,
    #[serde(default = "default_beta1")]
    pub beta1: f32,
    #[serde(default = "default_beta2")]
    pub beta2: f32,
    pub clip: f32,
    pub optimizer: OptimizerKind,
    /// Multiply precision of training's GEMMs (master weights, gradients and moments stay f32).
    #[serde(default)]
    pub precision: Precision,
    pub seed: u64,
    /// Std of the initial weights (None: 1/√fan_in).
    pub init_std: Option<f32>,
    pub mtp_depth: usize,
    /// λ of the MTP loss, and the value it switches to after `mtp_lambda_switch` of the steps
    /// (the report: 0.3 for the first 10T tokens, then 0.1).
    pub mtp_lambda: f32,
    pub mtp_lambda_final: f32,
    pub mtp_lambda_switch: f32,
    pub balance: BalanceMode,
    /// γ of the bias update.
    pub bias_update_rate: f32,
    /// Subtract the mean of each bias update (torchtitan's variant).
    pub bias_zero_mean: bool,
    /// Step from which γ = 0 (the report freezes the bias for the last 500B tokens).
    pub bias_freeze_step: Option<u64>,
    /// α of the sequence-wise balance loss (aux-free mode).
    pub seq_alpha: f32,
    /// α of the classic auxiliary loss (aux-loss mode).
    pub aux_alpha: f32,
    pub out: PathBuf,
    pub save_every: u64,
    pub eval_every: u64,
    /// Most validation windows per evaluation.
    pub eval_windows: usize,
    pub log_every: u64,
}

impl Default for TrainArgs {
    fn default() -> Self {
        TrainArgs {
            data: vec![],
            preset: "tiny".into(),
            config: None,
            tokenizer: None,
            vocab_size: 2048,
            steps: 300,
            seq_len: 128,
            batch_size: 8,
            lr: 3e-3,
            min_lr_ratio: 0.1,
            warmup_steps: 30,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            clip: 1.0,
            optimizer: OptimizerKind::Adamw,
            precision: Precision::Bf16,
            seed: 0,
            init_std: None,
            mtp_depth: 1,
            mtp_lambda: 0.3,
            mtp_lambda_final: 0.3,
            mtp_lambda_switch: 1.0,
            balance: BalanceMode::AuxFree,
            bias_update_rate: 1e-3,
            bias_zero_mean: false,
            bias_freeze_step: None,
            seq_alpha: 1e-4,
            aux_alpha: 1e-3,
            out: PathBuf::from("runs/tiny"),
            save_every: 0,
            eval_every: 50,
            eval_windows: 32,
            log_every: 1,
        }
    }
}

impl TrainArgs {
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
        finite_in("mtp-lambda-final", self.mtp_lambda_final, 0.0, 1e3)?;
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
        Ok(())
    }
}

/// One logged step (a line of metrics.jsonl).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct StepLog {
    pub step: u64,
    pub steps: u64,
    pub loss: f64,
    pub lm_loss: f64,
    pub mtp_losses: Vec<f64>,
    pub balance_loss: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val_loss: Option<f64>,
    /// Global MaxVio over the validation windows (mean over MoE layers).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val_maxvio: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val_mtp_top1: Option<f64>,
    pub lr: f32,
    pub grad_norm: f64,
    /// MaxVio of this batch: mean over MoE layers, and per layer.
    pub maxvio: f64,
    pub maxvio_per_layer: Vec<f64>,
    /// Tokens per expert of each MoE layer this step.
    pub expert_load: Vec<Vec<usize>>,
    /// Smallest and largest routing bias over all MoE layers.
    pub bias_range: (f32, f32),
    pub mtp_top1: Option<f64>,
    pub tokens_seen: u64,
    pub tokens_per_second: f64,
    pub elapsed_seconds: f64,
    pub eta_seconds: f64,
}

/// What a finished run reports.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Summary {
    pub out: PathBuf,
    pub steps: u64,
    /// Steps this invocation ran (fewer than `steps` after a resume).
    pub steps_run: u64,
    pub final_loss: f64,
    pub final_lm_loss: f64,
    pub val_loss: Option<f64>,
    pub val_maxvio: Option<f64>,
    pub val_mtp_top1: Option<f64>,
    pub tokens_per_second: f64,
    pub parameters: usize,
    /// Model FLOPs per training token and the achieved rate (see [`train_flops_per_token`]).
    pub flops_per_token: f64,
    pub model_gflops_per_second: f64,
}

/// Model FLOPs of one training token (forward + backward = 3 × 2 × the forward's multiply-adds):
/// every linear a token passes (top-k experts, not all), causal attention at the mean context
/// `(T + 1)/2`, the head, and each MTP module. The figure MFU is quoted against.
pub fn train_flops_per_token(c: &dsv3_model::Config, seq_len: usize) -> f64 {
    let m = macs_per_token(c, seq_len);
    6.0 * (m.layers.iter().sum::<f64>() + m.head + m.mtp.iter().sum::<f64>())
}

/// A token's forward multiply-adds by part.
pub(crate) struct Macs {
    /// Each decoder layer (attention and its FFN).
    pub layers: Vec<f64>,
    /// The output head.
    pub head: f64,
    /// Each MTP module (its projection, block and head).
    pub mtp: Vec<f64>,
}

/// A token's forward multiply-adds by part, attention at the mean context of `seq_len`.
pub(crate) fn macs_per_token(c: &dsv3_model::Config, seq_len: usize) -> Macs {
    let (d, h) = (c.hidden_size as f64, c.num_attention_heads as f64);
    let (dn, dr, dv, kv) =
        (c.qk_nope_head_dim as f64, c.qk_rope_head_dim as f64, c.v_head_dim as f64, c.kv_lora_rank as f64);
    let q = match c.q_lora_rank {
        Some(r) => d * r as f64 + r as f64 * h * (dn + dr),
        None => d * h * (dn + dr),
    };
    let attn = q + d * (kv + dr) + kv * h * (dn + dv) + h * dv * d + (seq_len as f64 + 1.0) / 2.0 * h * (dn + dr + dv);
    let ffn = |l: usize| {
        if c.is_moe_layer(l) {
            let e = c.moe_intermediate_size as f64;
            d * c.n_routed_experts as f64 + 3.0 * d * e * (c.num_experts_per_tok + c.n_shared_experts) as f64
        } else {
            3.0 * d * c.intermediate_size as f64
        }
    };
    let head = d * c.vocab_size as f64;
    let layers = (0..c.num_hidden_layers).map(|l| attn + ffn(l)).collect();
    let mtp =
        (0..c.num_nextn_predict_layers).map(|j| 2.0 * d * d + attn + ffn(c.num_hidden_layers + j) + head).collect();
    Macs { layers, head, mtp }
}

/// The model's config JSON for a run: the preset or file, with the tokenizer's vocabulary and the
/// MTP depth.
fn model_config(args: &TrainArgs, vocab: usize) -> Result<Value> {
    let mut c = match &args.config {
        Some(p) => {
            serde_json::from_str(&std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?)
                .with_context(|| format!("{}: not JSON", p.display()))?
        }
        None => preset(&args.preset).with_context(|| format!("--preset {}: unknown (tiny, bench-1b)", args.preset))?,
    };
    c["vocab_size"] = vocab.into();
    c["num_nextn_predict_layers"] = args.mtp_depth.into();
    c["architectures"] = serde_json::json!(["DeepseekV3ForCausalLM"]);
    c["bos_token_id"] = 0.into();
    c["eos_token_id"] = 1.into();
    c["torch_dtype"] = "float32".into();
    Ok(c)
}

fn loss_weights(args: &TrainArgs, step: u64) -> LossWeights {
    let switch = (args.mtp_lambda_switch as f64 * args.steps as f64) as u64;
    let mtp_lambda = if step > switch { args.mtp_lambda_final } else { args.mtp_lambda };
    let balance = match args.balance {
        BalanceMode::AuxFree => Balance { seq_alpha: args.seq_alpha, batch_alpha: 0.0 },
        BalanceMode::AuxLoss => Balance { seq_alpha: 0.0, batch_alpha: args.aux_alpha },
        BalanceMode::None => Balance::default(),
    };
    LossWeights { mtp_lambda, balance }
}

/// The validation loss, MTP top-1 agreement, and global MaxVio (loads summed over the windows).
fn evaluate(
    model: &DeepseekV3,
    val: &Split,
    args: &TrainArgs,
    w: LossWeights,
) -> Result<Option<(f64, f64, Option<f64>)>> {
    let n = val.windows().min(args.eval_windows);
    if n == 0 {
        return Ok(None);
    }
    // In parallel, each data-parallel replica (a process, or a pipeline) takes its share of every
    // batch; one with no share runs the batch's first window uncounted, since expert parallelism
    // needs every replica in every MoE layer. The sums below add up what each process computed.
    let dp = crate::parallel::get();
    let pipelined = dp.zip(crate::parallel::pipeline());
    let stages = pipelined.map_or(1, |(_, p)| p.stages);
    let (replica, replicas) = dp.map_or((0, 1), |dp| (dp.rank() / stages, dp.size() / stages));
    let (mut loss, mut top1, mut tops) = (0f64, 0f64, 0f64);
    let moe_layers: Vec<usize> =
        (0..model.layers.len() + model.mtp.len()).filter(|&l| model.config.is_moe_layer(l)).collect();
    let mut load: Vec<Vec<f64>> = vec![vec![0.0; model.config.n_routed_experts]; moe_layers.len()];
    for i in (0..n).step_by(args.batch_size) {
        let b = args.batch_size.min(n - i);
        let per = b.div_ceil(replicas);
        let mine = (replica * per).min(b)..((replica + 1) * per).min(b);
        let counted = !mine.is_empty();
        let windows = if counted { i + mine.start..i + mine.end } else { i..i + 1 };
        let b = windows.len();
        let tokens: Vec<u32> = windows.flat_map(|j| val.window(j).iter().copied()).collect();
        let r = with_recipe(args.precision.fp8_recipe(), || match pipelined {
            Some((dp, p)) => crate::pipeline::forward_only(dp.as_ref(), p, model, &tokens, b, args.seq_len, w),
            None => Ok(model.train_step(&tokens, b, args.seq_len, w, None)?),
        })?;
        if !counted {
            continue;
        }
        loss += r.lm_loss * b as f64;
        if let Some(t) = r.mtp_top1 {
            top1 += t * b as f64;
            tops += b as f64;
        }
        for (l, c) in r.load {
            let slot = moe_layers.iter().position(|&x| x == l).expect("a MoE layer");
            load[slot].iter_mut().zip(&c).for_each(|(a, &c)| *a += c as f64);
        }
    }
    if let Some(dp) = dp {
        let mut flat = vec![loss, top1, tops];
        flat.extend(load.iter().flatten());
        dp.sum_f64(&mut flat);
        (loss, top1, tops) = (flat[0], flat[1], flat[2]);
        load.iter_mut().flatten().zip(&flat[3..]).for_each(|(a, &b)| *a = b);
    }
    let load: Vec<Vec<usize>> = load.into_iter().map(|c| c.into_iter().map(|v| v as usize).collect()).collect();
    let mv = load.iter().map(|c| max_vio(c)).sum::<f64>() / load.len().max(1) as f64;
    Ok(Some((loss / n as f64, mv, (tops > 0.0).then(|| top1 / tops))))
}

/// One pipelined step: this process's pipeline takes its share of the batch as `p.chunks`
/// micro-batches through the schedule; this process keeps the gradients of the stages it ran, and
/// its report holds what they computed (summed over micro-batches; [`all_reduce_step`] turns them
/// into the batch's means).
fn pipeline_step(
    dp: &dyn crate::parallel::AllReduce,
    p: crate::parallel::Pipeline,
    model: &DeepseekV3,
    tokens: &[u32],
    args: &TrainArgs,
    w: LossWeights,
    grads: &mut Grads,
) -> Result<StepReport> {
    let (kind, chunks, stages) = (p.kind, p.chunks, p.stages);
    let (group, rank) = (dp.rank() / stages, dp.rank() % stages);
    let shard = args.batch_size / (dp.size() / stages);
    let per = shard / chunks;
    let row = args.seq_len + 1;
    let mine = &tokens[group * shard * row..(group + 1) * shard * row];
    let mbs: Vec<Vec<u32>> = mine.chunks(per * row).map(|c| c.to_vec()).collect();
    let model_stages = crate::pipeline::DeepSeekStages::new(
        model,
        &mbs,
        per,
        args.seq_len,
        w,
        dsv3_dist::pipeline::positions(kind, stages),
    )?;
    let ops = dsv3_dist::schedule::generate(kind, stages, chunks).map_err(|e| anyhow::anyhow!("{e}"))?;
    dp.with_peers(&mut |peers| {
        let mut peers = dsv3_dist::pipeline::Group { inner: peers, base: group * stages };
        dsv3_dist::pipeline::execute(&mut peers, kind, stages, chunks, &ops[rank], &model_stages);
    });
    let mut report = model_stages.report.into_inner().expect("report");
    // Expert loads per MoE layer (summed over the micro-batches this process ran), in layer order
    // with zeros for the layers it does not hold, so the sums line up across processes.
    let moe_layers: Vec<usize> =
        (0..model.layers.len() + model.mtp.len()).filter(|&l| model.config.is_moe_layer(l)).collect();
    let experts = model.config.n_routed_experts;
    let mut load: Vec<(usize, Vec<usize>)> = moe_layers.iter().map(|&l| (l, vec![0; experts])).collect();
    for (l, c) in &report.load {
        if let Some(slot) = load.iter_mut().find(|(ll, _)| ll == l) {
            slot.1.iter_mut().zip(c).for_each(|(a, b)| *a += b);
        }
    }
    report.load = load;
    report.mtp_losses.resize(model.mtp.len(), 0.0);
    if !model.mtp.is_empty() && report.mtp_top1.is_none() {
        report.mtp_top1 = Some(0.0);
    }
    report.loss = report.lm_loss
        + report.mtp_losses.iter().sum::<f64>() * (w.mtp_lambda / model.mtp.len().max(1) as f32) as f64
        + report.balance_loss;
    report.tokens = args.batch_size * args.seq_len / dp.size();
    *grads = model_stages.grads.into_inner().expect("gradients");
    Ok(report)
}

/// Data parallelism: the mean gradient over every process's shard (each shard's gradient is of its
/// mean loss, and the shards are equal), the mean losses, and the summed expert loads. Pipelined
/// (`micro_batches`, over all pipelines): every process holds sums over micro-batches of the
/// stages it ran, so the sums are divided by the micro-batch count instead.
///
/// Returns the global gradient norm. Each gradient is summed over the processes holding its
/// parameter (all of them in plain data parallelism; a routed expert's owner alone, whose
/// gradient already sums every process's tokens).
fn all_reduce_step(
    dp: &dyn crate::parallel::AllReduce,
    placement: &Placement,
    grads: &mut Grads,
    report: &mut StepReport,
    micro_batches: Option<usize>,
) -> f64 {
    let scale = 1.0 / micro_batches.unwrap_or(dp.size()) as f64;
    let norm_sq = placement.reduce_grads(dp, grads, scale);
    let n_mtp = report.mtp_losses.len();
    let mut flat = vec![norm_sq, report.loss, report.lm_loss, report.balance_loss, report.mtp_top1.unwrap_or(0.0)];
    flat.extend(&report.mtp_losses);
    flat.extend(report.load.iter().flat_map(|(_, c)| c.iter().map(|&v| v as f64)));
    dp.sum_f64(&mut flat);
    report.loss = flat[1] * scale;
    report.lm_loss = flat[2] * scale;
    report.balance_loss = flat[3] * scale;
    report.mtp_top1 = report.mtp_top1.map(|_| flat[4] * scale);
    let mut at = 5;
    for l in report.mtp_losses.iter_mut().take(n_mtp) {
        *l = flat[at] * scale;
        at += 1;
    }
    for (_, c) in report.load.iter_mut() {
        for v in c.iter_mut() {
            *v = flat[at] as usize;
            at += 1;
        }
    }
    report.tokens *= dp.size();
    flat[0].sqrt()
}

/// A folder of initial weights a fresh run loads from, removed when dropped by the process that
/// wrote it.
struct TempDir(PathBuf, bool);

impl Drop for TempDir {
    fn drop(&mut self) {
        if self.1 {
            std::fs::remove_dir_all(&self.0).ok();
        }
    }
}

/// Writes a fresh run's random initial weights. In parallel, rank 0 writes them and the
/// processes that see its folder (on its machine, or a shared file system) read them there; the
/// others write their own copy (the same bytes: the same seed).
fn fresh_init(config: &serde_json::Value, args: &TrainArgs) -> Result<TempDir> {
    let write = || -> Result<TempDir> {
        let dir = TempDir(std::env::temp_dir().join(format!("dsv3-train-init-{}", std::process::id())), true);
        write_training_init(&dir.0, config, args.seed, args.init_std)?;
        Ok(dir)
    };
    let Some(dp) = crate::parallel::get() else { return write() };
    // Rank 0 writes first (and reaches the sum even when it fails, so that none waits forever),
    // then says where (its process id) and whether it succeeded.
    let first = (dp.rank() == 0).then(write);
    let mut said = [0.0, 0.0];
    if let Some(r) = &first {
        said = [std::process::id() as f64, r.is_ok() as u8 as f64];
    }
    dp.sum_f64(&mut said);
    if let Some(r) = first {
        return r;
    }
    if said[1] == 0.0 {
        bail!("rank 0 could not write the initial weights (its error says why)");
    }
    let shared = std::env::temp_dir().join(format!("dsv3-train-init-{}", said[0] as u32));
    match shared.join("model.safetensors").is_file() && shared.join("config.json").is_file() {
        true => Ok(TempDir(shared, false)),
        false => write(),
    }
}

/// Trains (or resumes) a run, calling `on_log` for every logged step. `stop_at` ends it early
/// (with a checkpoint) while the schedule still spans `args.steps`: an interrupted run.
pub fn run(
    args: TrainArgs,
    resume: Option<&Path>,
    stop_at: Option<u64>,
    mut on_log: impl FnMut(&StepLog),
) -> Result<Summary> {
    // In parallel the first load reads no weight (shapes only): once it is known which tensors this
    // process holds, only those are read.
    let parallel = crate::parallel::get().is_some();
    args.validate()?;
    if crate::parallel::get().is_none_or(|dp| dp.rank() == 0) {
        // Saves interrupted before (a crash, a kill) leave their temporary folders beside the run.
        for dir in std::iter::once(args.out.as_path()).chain(resume) {
            for line in checkpoint::recover_interrupted(dir)? {
                eprintln!("{line}");
            }
        }
    }
    let mut init_dir = None;
    let (mut model, config, tok, mut opt, mut state) = match resume {
        Some(dir) => {
            let r = checkpoint::load(dir, move |_| parallel)?;
            let mut state = r.state;
            // A resume may extend the run (more steps) and write elsewhere; the rest is the run's.
            state.args.steps = args.steps.max(state.step);
            state.args.out = args.out.clone();
            // (The optimizer's moments are read below, once it is known which this process keeps.)
            (r.model, r.config, r.tokenizer, Optimizer::default(), state)
        }
        None => {
            let docs = if args.data.is_empty() { data::builtin_corpus() } else { data::read_documents(&args.data)? };
            let tok = match &args.tokenizer {
                Some(dir) => tokenizers::Tokenizer::from_file(dir.join("tokenizer.json"))
                    .map_err(|e| anyhow::anyhow!("--tokenizer {}: {e}", dir.display()))?,
                None => data::train_tokenizer(&docs, args.vocab_size)?,
            };
            let config = model_config(&args, tok.get_vocab_size(true))?;
            let dir = fresh_init(&config, &args)?;
            let model = DeepseekV3::load_skipping(&dir.0, move |_| parallel);
            init_dir = Some(dir);
            let state = TrainState { step: 0, tokens_seen: 0, loader: LoaderState::default(), args: args.clone() };
            (model?, config, tok, Optimizer::default(), state)
        }
    };
    let args = state.args.clone();
    dsv3_kernels::gemm::set_bf16(args.precision != Precision::F32);
    let fp8 = args.precision.fp8_recipe();
    args.validate()?;
    if args.seq_len > model.config.max_position_embeddings {
        bail!(
            "--seq-len {} exceeds the model's max_position_embeddings {}",
            args.seq_len,
            model.config.max_position_embeddings
        );
    }
    let docs = if args.data.is_empty() { data::builtin_corpus() } else { data::read_documents(&args.data)? };
    let (train, val) = data::pack(&tok, &docs, args.seq_len, 20)?;
    let mut loader = Loader::new(&train, args.seed, state.loader);
    let ocfg = OptimConfig {
        kind: args.optimizer,
        lr: args.lr,
        min_lr_ratio: args.min_lr_ratio,
        warmup_steps: args.warmup_steps,
        total_steps: args.steps,
        beta1: args.beta1,
        beta2: args.beta2,
        eps: 1e-8,
        weight_decay: args.weight_decay,
        clip: args.clip,
    };
    let parameters: usize = model.param_shapes().iter().map(|(_, s)| s.iter().product::<usize>()).sum();
    if let Some(ex) = crate::parallel::experts() {
        let experts = model.config.n_routed_experts;
        if model.moe_layers().is_empty() || experts < ex.forward.ranks() {
            bail!(
                "--expert-parallel: {} processes for {experts} routed experts in {} MoE layers",
                ex.forward.ranks(),
                model.moe_layers().len()
            );
        }
    }
    // Who holds and updates what; this process then reads what it holds.
    let placement = crate::parallel::get().map(|dp| {
        let p = Placement::new(&mut model, dp.as_ref(), crate::parallel::pipeline(), crate::parallel::experts().is_some(), crate::parallel::zero1());
        let (held, total, updated) = p.sizes();
        eprintln!("process {}/{}: holds {held} of the model's {total} parameters, updates (and keeps optimizer moments for) {updated}", dp.rank(), dp.size());
        p
    });
    if let Some(p) = &placement {
        let held: std::collections::HashSet<String> =
            model.param_shapes().into_iter().map(|(n, _)| n).filter(|n| p.holds(n)).collect();
        let dir = init_dir.as_ref().map(|d| d.0.as_path()).or(resume).expect("a fresh or resumed run");
        model = DeepseekV3::load_skipping(dir, move |n| !held.contains(n))
            .with_context(|| format!("loading {}", dir.display()))?;
        p.drop_foreign(&mut model, &mut opt);
    }
    if let (Some(dp), Some(_)) = (crate::parallel::get(), &init_dir) {
        // Every process has read the shared initial weights before rank 0 removes them.
        dp.sum_f64(&mut [0.0]);
    }
    drop(init_dir);
    if let Some(ex) = crate::parallel::experts() {
        model.set_expert_exchanges(ex.forward.clone(), ex.backward.clone());
    }
    if let Some(dir) = resume {
        opt = checkpoint::load_optimizer(dir, &|n| placement.as_ref().is_none_or(|p| p.updates(n)))?;
    }
    let flops_per_token = train_flops_per_token(&model.config, args.seq_len);
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    let mut metrics = std::fs::OpenOptions::new().create(true).append(true).open(args.out.join("metrics.jsonl"))?;
    let mut grads = Grads::default();
    let start = Instant::now();
    let start_step = state.step;
    let mut last = StepLog::default();
    let mut last_report = StepReport::default();
    let end = stop_at.unwrap_or(args.steps).min(args.steps);
    let dp = crate::parallel::get();
    let (dp_rank, dp_size) = dp.map_or((0, 1), |d| (d.rank(), d.size()));
    let pipelined = crate::parallel::pipeline();
    // Data-parallel shares of each batch: one per process, or one per pipeline.
    let shard_count = pipelined.map_or(dp_size, |p| dp_size / p.stages);
    if !args.batch_size.is_multiple_of(shard_count) {
        bail!("--batch-size {} does not divide among {shard_count} data-parallel shares", args.batch_size);
    }
    if let Some(p) = pipelined {
        if !(args.batch_size / shard_count).is_multiple_of(p.chunks) {
            bail!(
                "--batch-size {}: {} sequences per pipeline do not divide into {} micro-batches",
                args.batch_size,
                args.batch_size / shard_count,
                p.chunks
            );
        }
        dsv3_dist::schedule::generate(p.kind, p.stages, p.chunks).map_err(|e| anyhow::anyhow!("--pipeline: {e}"))?;
        let positions = dsv3_dist::pipeline::positions(p.kind, p.stages);
        if positions > model.layers.len() {
            bail!("--pipeline: {positions} stages for {} decoder layers", model.layers.len());
        }
    }
    let shard = args.batch_size / shard_count;
    let writer = dp_rank == 0;
    while state.step < end {
        let step = state.step + 1;
        let w = loss_weights(&args, step);
        let tokens = loader.next_batch(&train, args.batch_size);
        grads.zero();
        let row = args.seq_len + 1;
        let mut report = match (dp, pipelined) {
            (Some(dp), Some(p)) => {
                with_recipe(fp8, || pipeline_step(dp.as_ref(), p, &model, &tokens, &args, w, &mut grads))?
            }
            _ => {
                // This process's share of the batch: sequences dp_rank·shard .. (dp_rank+1)·shard.
                let mine = &tokens[dp_rank * shard * row..(dp_rank + 1) * shard * row];
                with_recipe(fp8, || model.train_step(mine, shard, args.seq_len, w, Some(&mut grads)))?
            }
        };
        let grad_norm = match dp {
            Some(dp) => {
                let placement = placement.as_ref().expect("a placement under data parallelism");
                all_reduce_step(
                    dp.as_ref(),
                    placement,
                    &mut grads,
                    &mut report,
                    pipelined.map(|p| p.chunks * dp.size() / p.stages),
                )
            }
            None => grads.global_norm(),
        };
        if !report.loss.is_finite() {
            bail!("step {step}: the loss is {} (lower --lr?); the last checkpoint is intact", report.loss);
        }
        let mut params = model.params_mut();
        if let Some(p) = &placement {
            params.retain(|x| p.updates(&x.name));
        }
        let info = opt.update(&ocfg, params, &mut grads, grad_norm);
        if let (Some(p), Some(dp)) = (&placement, dp) {
            p.share_params(dp.as_ref(), &mut model);
        }
        let gamma = match (args.balance, args.bias_freeze_step) {
            (BalanceMode::AuxFree, Some(f)) if step >= f => 0.0,
            (BalanceMode::AuxFree, _) => args.bias_update_rate,
            _ => 0.0,
        };
        update_biases(&mut model, &report.load, gamma, args.bias_zero_mean);
        state.step = step;
        state.tokens_seen += (args.batch_size * args.seq_len) as u64;
        state.loader = loader.state;

        let elapsed = start.elapsed().as_secs_f64();
        let tps = (step - start_step) as f64 * (args.batch_size * args.seq_len) as f64 / elapsed.max(1e-9);
        let biases: Vec<f32> = model.routing_biases_mut().iter().flat_map(|(_, b)| b.iter().copied()).collect();
        let mut log = StepLog {
            step,
            steps: args.steps,
            loss: report.loss,
            lm_loss: report.lm_loss,
            mtp_losses: report.mtp_losses.clone(),
            balance_loss: report.balance_loss,
            lr: info.lr,
            grad_norm: info.grad_norm,
            maxvio_per_layer: report.load.iter().map(|(_, c)| max_vio(c)).collect(),
            expert_load: report.load.iter().map(|(_, c)| c.clone()).collect(),
            bias_range: biases.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &x| (a.min(x), b.max(x))),
            mtp_top1: report.mtp_top1,
            tokens_seen: state.tokens_seen,
            tokens_per_second: tps,
            elapsed_seconds: elapsed,
            eta_seconds: (args.steps - step) as f64 * elapsed / (step - start_step) as f64,
            ..Default::default()
        };
        log.maxvio = log.maxvio_per_layer.iter().sum::<f64>() / log.maxvio_per_layer.len().max(1) as f64;
        if biases.is_empty() {
            log.bias_range = (0.0, 0.0);
        }
        let eval_now = (args.eval_every > 0 && step % args.eval_every == 0) || step == args.steps;
        if eval_now {
            if let Some((vl, mv, top1)) = evaluate(&model, &val, &args, w)? {
                log.val_loss = Some(vl);
                log.val_maxvio = Some(mv);
                log.val_mtp_top1 = top1;
            }
        }
        if writer && args.log_every > 0 && (step % args.log_every == 0 || eval_now) {
            writeln!(metrics, "{}", serde_json::to_string(&log)?)?;
            on_log(&log);
        }
        if (args.save_every > 0 && step % args.save_every == 0) || step == end {
            // Rank 0 first collects what the others hold.
            if let (Some(p), Some(dp)) = (&placement, dp) {
                p.gather_to_rank0(dp.as_ref(), &mut model, &mut opt, args.optimizer == OptimizerKind::Adamw);
            }
            if writer {
                metrics.flush()?;
                checkpoint::save(&args.out, &mut model, &config, &tok, &opt, &state)?;
                if let Err(e) = crate::plot::write_run_plots(&args.out) {
                    eprintln!("warning: plots not written: {e:#}");
                }
                metrics = std::fs::OpenOptions::new().create(true).append(true).open(args.out.join("metrics.jsonl"))?;
            }
            if let Some(p) = &placement {
                p.drop_foreign(&mut model, &mut opt);
            }
        }
        last = log;
        last_report = report;
    }
    let _ = last_report;
    Ok(Summary {
        out: args.out.clone(),
        steps: state.step,
        steps_run: state.step - start_step,
        final_loss: last.loss,
        final_lm_loss: last.lm_loss,
        val_loss: last.val_loss,
        val_maxvio: last.val_maxvio,
        val_mtp_top1: last.val_mtp_top1,
        tokens_per_second: last.tokens_per_second,
        parameters,
        flops_per_token,
        model_gflops_per_second: flops_per_token * last.tokens_per_second / 1e9,
    })
}
