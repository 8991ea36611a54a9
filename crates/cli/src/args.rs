//! Flags several commands share: the model and how inference computes and is parallel, the
//! sampling controls, and the parallel layout of training.

use clap::ValueEnum;
use std::path::PathBuf;

/// A flag's enum value with the choices in its error.
pub fn choice<T: ValueEnum>(flag: &'static str) -> impl Fn(&str) -> Result<T, String> + Clone + Send + Sync + 'static {
    move |s| dsv3_train::args::parse_choice(flag, s)
}

/// `--act-quant`: inference activations.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum ActQuant {
    /// Weight-only quantization (the default).
    #[default]
    None,
    /// Each Linear's input quantized per token in 1×128 E4M3 tiles, as FP8 serving does.
    Fp8,
}

/// V3.2's lightning-indexer numerics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum IndexerNumerics {
    /// f32 scores, no rotation (transformers 5.23).
    #[default]
    Exact,
    /// DeepSeek's inference code: Hadamard rotation, FP8 queries and keys, an FP8 key cache.
    Official,
}

/// The model a command runs, and how.
#[derive(clap::Args, Clone, Debug)]
pub struct ModelArgs {
    /// A Hugging Face model folder (config.json, safetensors, tokenizer.json), a GGUF file
    /// (llama.cpp's deepseek2; one part of a split names them all), or a Hub id (`owner/name`)
    /// in a build with `--features dsv3-cli/hub`.
    #[arg(long)]
    pub model: PathBuf,
    /// Inference activations: none (weight-only quantization) or fp8 (each Linear's input
    /// quantized per token in 1×128 E4M3 tiles, as FP8 serving does).
    #[arg(long, value_parser = choice::<ActQuant>("--act-quant"), default_value = "none")]
    pub act_quant: ActQuant,
    /// V3.2's indexer: exact (f32 scores, transformers' numerics) or official (DeepSeek's code:
    /// index queries and keys Hadamard-rotated and rounded to E4M3 per 128 with the checkpoint's
    /// scale format; the cache keeps the FP8 keys, 132 bytes instead of 512 per position).
    #[arg(long, value_parser = choice::<IndexerNumerics>("--indexer-numerics"), default_value = "exact")]
    pub indexer_numerics: IndexerNumerics,
    #[command(flatten)]
    pub ep: ExpertParallelArgs,
}

/// Expert-parallel inference under `mpirun -np N` (a build with `--features dsv3-cli/mpi`).
#[derive(clap::Args, Clone, Debug, Default)]
pub struct ExpertParallelArgs {
    /// Split the routed experts over the N processes: rank 0 runs the command, the others serve
    /// experts (with `serve --data-parallel`, every rank serves), outputs identical to one
    /// process.
    #[arg(long)]
    pub expert_parallel: bool,
    /// With --expert-parallel: extra expert replicas (EPLB's redundant experts) per MoE layer.
    #[arg(long, default_value_t = 0, requires = "expert_parallel")]
    pub redundant_experts: usize,
    /// With --expert-parallel: re-place the experts with EPLB every this many calls per layer,
    /// from the routing counts of the window (0: static placement).
    #[arg(long, default_value_t = 0, requires = "expert_parallel")]
    pub rebalance_every: usize,
}

/// Sampling flags shared by `generate` and `chat`.
#[derive(clap::Args, Clone, Debug)]
pub struct Sampling {
    /// Most new tokens to generate (generation also stops at the context window).
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    #[arg(long, default_value_t = 1.0)]
    pub top_p: f32,
    /// 0 keeps every token.
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Keep going past the end-of-sequence token.
    #[arg(long)]
    pub ignore_eos: bool,
    /// CTRL's repetition penalty over the prompt and the output (1 is off; llama.cpp's
    /// --repeat-penalty over the whole context).
    #[arg(long, default_value_t = 1.0)]
    pub repetition_penalty: f32,
    /// Subtracted once from the logit of every token already generated (OpenAI's definition).
    #[arg(long, default_value_t = 0.0)]
    pub presence_penalty: f32,
    /// Subtracted from a generated token's logit per time it was generated.
    #[arg(long, default_value_t = 0.0)]
    pub frequency_penalty: f32,
}

/// A pipeline schedule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Schedule {
    #[value(name = "1f1b")]
    OneFOneB,
    Dualpipe,
    Dualpipev,
}

impl From<Schedule> for dsv3_dist::schedule::Kind {
    fn from(s: Schedule) -> Self {
        match s {
            Schedule::OneFOneB => dsv3_dist::schedule::Kind::OneFOneB,
            Schedule::Dualpipe => dsv3_dist::schedule::Kind::DualPipe,
            Schedule::Dualpipev => dsv3_dist::schedule::Kind::DualPipeV,
        }
    }
}

/// The parallel layout of `dsv3 train` under `mpirun -np N` (a build with `--features
/// dsv3-cli/mpi`).
#[derive(clap::Args, Clone, Debug, Default)]
pub struct TrainParallel {
    /// Each process trains on 1/N of every batch; gradients, losses and expert loads are summed
    /// across them.
    #[arg(long)]
    pub data_parallel: bool,
    /// Data parallel with each routed expert on one process (with --pipeline: split between the
    /// pipelines).
    #[arg(long)]
    pub expert_parallel: bool,
    /// Pipeline the model with this schedule (1f1b | dualpipe | dualpipev) over `--pp P`
    /// processes (default N; N/P pipelines train data-parallel), each holding only its stages.
    #[arg(long, value_parser = choice::<Schedule>("--pipeline"))]
    pub pipeline: Option<Schedule>,
    /// With --pipeline: the processes per pipeline (default N).
    #[arg(long)]
    pub pp: Option<usize>,
    /// Micro-batches per pipeline and batch with --pipeline (default 2·P, DualPipe's minimum).
    #[arg(long)]
    pub chunks: Option<usize>,
    /// Split the optimizer moments of the replicated parameters over the processes (ZeRO stage
    /// 1; bit-identical updates).
    #[arg(long)]
    pub zero1: bool,
}

impl TrainParallel {
    pub fn wants_mpi(&self) -> bool {
        self.data_parallel || self.expert_parallel || self.pipeline.is_some()
    }
}

impl Sampling {
    /// The generation options of these flags with end-of-sequence ids `eos`.
    pub fn options(&self, eos: Vec<u32>) -> dsv3_model::generate::GenerateOptions {
        dsv3_model::generate::GenerateOptions {
            max_new_tokens: self.max_new_tokens,
            sampling: dsv3_model::sampling::SamplingParams {
                temperature: self.temperature,
                top_p: self.top_p,
                top_k: self.top_k,
                seed: self.seed,
                penalties: dsv3_model::sampling::Penalties {
                    presence: self.presence_penalty,
                    frequency: self.frequency_penalty,
                    repetition: self.repetition_penalty,
                    logit_bias: vec![],
                },
            },
            eos_token_ids: eos,
            ignore_eos: self.ignore_eos,
            mtp_speculative: 0,
        }
    }

    pub fn check(&self) -> anyhow::Result<()> {
        if !(self.temperature >= 0.0 && self.temperature.is_finite()) {
            anyhow::bail!("--temperature must be a finite number ≥ 0");
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            anyhow::bail!("--top-p must be in (0, 1]");
        }
        Ok(())
    }
}
