//! `dsv3`: the command line of the DeepSeek-V3 system. Thin: parsing, output formats and progress;
//! the work is in the library crates.

mod bench;
mod commands;
#[cfg(feature = "mpi")]
mod ep;
mod hub;
mod plan;
mod train;

use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "dsv3",
    version,
    about = "DeepSeek-V3 in Rust: run, score and benchmark DeepSeek-V3-family checkpoints"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Inference activations: none (weight-only quantization, the default) or fp8 (each Linear's
    /// input quantized per token in 1×128 E4M3 tiles, as FP8 serving does).
    #[arg(long, global = true, default_value = "none")]
    act_quant: String,
    /// Under `mpirun -np N` (a build with `--features dsv3-cli/mpi`): split the routed experts
    /// over the N processes. generate/score/chat/bench/serve: rank 0 runs the command, the others
    /// serve experts (serve --data-parallel: every rank serves), outputs identical to one
    /// process. train: data parallel with each expert on one process (with --pipeline: split
    /// between the pipelines). Rank 0 prints.
    #[arg(long, global = true)]
    expert_parallel: bool,
    /// `dsv3 train` under `mpirun -np N` (a build with `--features dsv3-cli/mpi`): each process
    /// trains on 1/N of every batch; gradients, losses and expert loads are summed across them.
    /// `dsv3 serve --expert-parallel`: attention data-parallel, each rank r serving its own
    /// requests on --port + 1 + r, rank 0 relaying connections to --port to them in turn.
    #[arg(long, global = true)]
    data_parallel: bool,
    /// `dsv3 train` under `mpirun -np N`: pipeline the model with this schedule (1f1b | dualpipe
    /// | dualpipev) over `--pp P` processes (default N; N/P pipelines train data-parallel), each
    /// holding only its stages, with `--chunks` micro-batches per batch.
    #[arg(long, global = true)]
    pipeline: Option<String>,
    /// Micro-batches per pipeline and batch with --pipeline (default 2·P, DualPipe's minimum).
    #[arg(long, global = true)]
    chunks: Option<usize>,

    /// With --expert-parallel: extra expert replicas (EPLB's redundant experts) per MoE layer.
    #[arg(long, global = true, default_value_t = 0)]
    redundant_experts: usize,
    /// With --expert-parallel: re-place the experts with EPLB every this many batches per layer,
    /// from the routing counts of the window (0: static placement).
    #[arg(long, global = true, default_value_t = 0)]
    rebalance_every: usize,
}

/// Sampling flags shared by `generate` and `chat`.
#[derive(clap::Args, Clone)]
pub struct Sampling {
    /// Most new tokens to generate.
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
}

#[derive(Subcommand)]
enum Command {
    /// Generate a continuation of a prompt.
    Generate {
        /// A Hugging Face model folder (config.json, safetensors, tokenizer.json), or a Hub id
        /// (`owner/name`) in a build with `--features dsv3-cli/hub`.
        #[arg(long)]
        model: PathBuf,
        #[arg(long, conflicts_with = "prompt_ids", required_unless_present = "prompt_ids")]
        prompt: Option<String>,
        /// Comma-separated token ids.
        #[arg(long)]
        prompt_ids: Option<String>,
        #[command(flatten)]
        sampling: Sampling,
        /// Speculative decoding with the checkpoint's MTP module drafting K tokens per step.
        #[arg(long, value_name = "K", default_value_t = 0, num_args = 0..=1, default_missing_value = "1")]
        mtp_speculative: usize,
        #[arg(long)]
        json: bool,
    },
    /// Chat interactively with the model's chat template, streaming replies.
    Chat {
        #[arg(long)]
        model: PathBuf,
        /// A system prompt.
        #[arg(long)]
        system: Option<String>,
        #[command(flatten)]
        sampling: Sampling,
    },
    /// Log-probabilities of a token sequence (and of the MTP module's predictions).
    Score {
        #[arg(long)]
        model: PathBuf,
        /// Comma-separated token ids.
        #[arg(long, group = "input")]
        ids: Option<String>,
        #[arg(long, group = "input")]
        text: Option<String>,
        /// A text file.
        #[arg(long, group = "input")]
        file: Option<PathBuf>,
        /// Also list the K most likely next tokens at each position.
        #[arg(long, default_value_t = 0)]
        top_k: usize,
        /// Also score ids[i+2] with MTP module 0 at each position i.
        #[arg(long)]
        mtp: bool,
        #[arg(long)]
        json: bool,
    },
    /// Token ids of a text, or of a chat rendered with the chat template.
    Tokenize {
        /// Folder with tokenizer.json (and tokenizer_config.json for --chat).
        #[arg(long, alias = "model")]
        tokenizer: PathBuf,
        #[arg(long, group = "input")]
        text: Option<String>,
        /// A JSON file holding an array of messages.
        #[arg(long, group = "input")]
        chat: Option<PathBuf>,
        /// With --chat: end with the assistant prompt.
        #[arg(long)]
        add_generation_prompt: bool,
        #[arg(long)]
        json: bool,
    },
    /// An OpenAI-compatible server (completions, chat, streaming, continuous batching).
    Serve {
        #[arg(long)]
        model: PathBuf,
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        #[arg(long, default_value_t = 8000)]
        port: u16,
        /// Require `Authorization: Bearer KEY`.
        #[arg(long)]
        api_key: Option<String>,
        /// Most sequences decoded together.
        #[arg(long, default_value_t = 16)]
        max_batch: usize,
        /// Memory for the latent KV cache across running requests (e.g. 512M, 2G).
        #[arg(long, default_value = "1G")]
        kv_memory: String,
        /// Requests waiting beyond the running ones before 429.
        #[arg(long, default_value_t = 64)]
        max_queue: usize,
        /// Prompt tokens per sequence per step (long prompts are prefilled in chunks).
        #[arg(long, default_value_t = 64)]
        prefill_chunk: usize,
        /// MTP speculative decoding: K drafts per step from the checkpoint's MTP module (greedy
        /// and sampled requests; requests asking for log-probs decode plainly).
        #[arg(long, default_value_t = 0)]
        mtp_speculative: usize,
        /// Keep the full 64-token blocks of prompts and reuse them for later prompts with the
        /// same prefix (outputs unchanged; speculative requests compute their prompt in full).
        #[arg(long)]
        prefix_cache: bool,
        /// Seconds a client has to send a request's headers (and an idle keep-alive connection
        /// its next request) before the connection is closed.
        #[arg(long, default_value_t = 30.0)]
        header_timeout: f64,
        /// Seconds a client has to send a request's body once its headers are in (408 after).
        #[arg(long, default_value_t = 30.0)]
        body_timeout: f64,
        /// Open connections at most; more wait until one closes.
        #[arg(long, default_value_t = 512)]
        max_connections: usize,
    },
    /// Train a DeepSeek-V3-architecture model (MLA + DeepSeekMoE + MTP) from text.
    Train(Box<train::TrainCli>),
    /// (Re)draw a training run's plots (loss, expert load, MaxVio; SVG and PNG) from its metrics.jsonl.
    Plot {
        /// The run's output folder (several with --compare).
        #[arg(required = true)]
        runs: Vec<PathBuf>,
        /// Compare the runs: charts of LM loss, validation loss and MaxVio, and a Markdown table.
        #[arg(long)]
        compare: bool,
        /// Where the comparison goes.
        #[arg(long, default_value = ".")]
        out: PathBuf,
    },
    /// Prefill and decode speed, peak memory and KV-cache size of a model.
    Bench(bench::BenchArgs),
    /// Write a random DeepSeek-V3 checkpoint (a preset shape) for benchmarks and experiments.
    RandomModel {
        /// tiny | bench-1b, or a config.json path.
        #[arg(long, default_value = "tiny")]
        preset: String,
        /// f32 | bf16 | fp8
        #[arg(long, default_value = "bf16")]
        dtype: String,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Convert a checkpoint folder's weights to another format (FP8 with 128×128 weight_scale_inv
    /// blocks, FP4, bf16, f32), streamed under a memory budget, into a new folder.
    Convert {
        #[arg(long)]
        from: PathBuf,
        #[arg(long)]
        to: PathBuf,
        /// fp8 | bf16 | f32 | fp4 (NVFP4, ModelOpt layout) | mxfp4
        #[arg(long)]
        format: String,
        /// Budget for conversion buffers (e.g. 512M, 4G); tensors are streamed in bands of rows.
        #[arg(long, default_value = "1G")]
        max_memory: String,
        #[arg(long)]
        json: bool,
    },
    /// Place experts with redundant replicas (EPLB's rebalance_experts) from per-expert loads.
    Eplb {
        /// JSON `[[load per logical expert] per layer]`.
        #[arg(long)]
        load: PathBuf,
        /// Physical expert slots (P ≥ experts; a multiple of --gpus).
        #[arg(long)]
        replicas: usize,
        /// Expert groups (the routing groups; hierarchical placement when they divide among nodes).
        #[arg(long, default_value_t = 1)]
        groups: usize,
        #[arg(long, default_value_t = 1)]
        nodes: usize,
        #[arg(long)]
        gpus: usize,
        /// Print `{"phy2log","log2phy","logcnt","phyrank"}`.
        #[arg(long)]
        json: bool,
    },
    /// Pipeline schedules (1F1B, DualPipe, DualPipeV): each rank's ops, and the simulated makespan
    /// and per-rank bubble.
    Schedule {
        /// 1f1b | dualpipe | dualpipev
        #[arg(long)]
        kind: String,
        /// Pipeline ranks (devices); DualPipeV runs 2·pp stages on them.
        #[arg(long)]
        pp: usize,
        /// Micro-batches per step.
        #[arg(long)]
        chunks: usize,
        /// Forward chunk time.
        #[arg(long, default_value_t = 1.0)]
        f: f64,
        /// Full backward chunk time.
        #[arg(long, default_value_t = 2.0)]
        b: f64,
        /// Weight-gradient part of a backward.
        #[arg(long, default_value_t = 1.0)]
        w: f64,
        /// A forward and a backward overlapped.
        #[arg(long, default_value_t = 3.0)]
        fb: f64,
        #[arg(long)]
        json: bool,
    },
    /// The cost of a training run: FLOPs per token, GPU-hours and dollars, memory per device,
    /// and the pipeline bubble of each schedule.
    Plan {
        /// A config.json, or `deepseek-v3` (the released 671B config, built in).
        #[arg(long, default_value = "deepseek-v3")]
        config: String,
        /// Training tokens (e.g. 14.8T, 500B).
        #[arg(long, default_value = "14.8T")]
        tokens: String,
        #[arg(long, default_value_t = 2048)]
        gpus: usize,
        /// h800 | h100 | h200 | a100
        #[arg(long, default_value = "h800")]
        gpu: String,
        /// Pipeline ranks.
        #[arg(long, default_value_t = 16)]
        pp: usize,
        /// Expert-parallel ranks.
        #[arg(long, default_value_t = 64)]
        ep: usize,
        /// Utilization: achieved FLOP/s ÷ the GPU's dense bf16 peak (0.40 reproduces the report).
        #[arg(long, default_value_t = 0.40)]
        mfu: f64,
        /// Dollars per GPU-hour.
        #[arg(long, default_value_t = 2.0)]
        price: f64,
        #[arg(long, default_value_t = 4096)]
        seq_len: usize,
        /// Micro-batches per pipeline step (for the bubble).
        #[arg(long, default_value_t = 32)]
        chunks: usize,
        /// Add the report's context extension (1000 steps of 1920 × 32K, 1000 of 480 × 128K
        /// tokens, costed here) and post-training (5K GPU-hours, taken from the report).
        #[arg(long)]
        report_phases: bool,
        #[arg(long)]
        json: bool,
    },
    /// The built-in default: a small random DeepSeek-V3, generated and benchmarked (no downloads).
    Demo,
}

/// Activation buffers of a few MB are allocated and freed every step. By default glibc serves
/// them with mmap and returns them with munmap, so each step pays page faults and kernel zeroing
/// (20% of a training step here); keeping them in the heap avoids that.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tunables; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

fn main() {
    keep_freed_memory();
    let cli = Cli::parse();
    let train = match &cli.command {
        Command::Train(a) => Some(a.pp),
        _ => None,
    };
    if cli.expert_parallel || cli.data_parallel || cli.pipeline.is_some() || train.flatten().is_some() {
        let p = commands::Parallel {
            expert: cli.expert_parallel,
            data: cli.data_parallel,
            pipeline: cli.pipeline.as_deref(),
            chunks: cli.chunks,
            train,
            serve: matches!(cli.command, Command::Serve { .. }),
            redundant: cli.redundant_experts,
            rebalance_every: cli.rebalance_every,
        };
        if let Err(e) = commands::start_parallel(p) {
            eprintln!("error: {e:#}");
            std::process::exit(1);
        }
    }
    match cli.act_quant.as_str() {
        "none" => {}
        "fp8" => dsv3_model::layers::set_act_quant_fp8(true),
        a => {
            eprintln!("error: --act-quant {a}: none or fp8");
            std::process::exit(2);
        }
    }
    let result = match cli.command {
        Command::Generate { model, prompt, prompt_ids, sampling, mtp_speculative, json } => hub::resolve_model(&model)
            .and_then(|m| {
                commands::generate(&m, prompt.as_deref(), prompt_ids.as_deref(), &sampling, mtp_speculative, json)
            }),
        Command::Chat { model, system, sampling } => {
            hub::resolve_model(&model).and_then(|m| commands::chat(&m, system.as_deref(), &sampling))
        }
        Command::Score { model, ids, text, file, top_k, mtp, json } => hub::resolve_model(&model)
            .and_then(|m| commands::score(&m, ids.as_deref(), text.as_deref(), file.as_deref(), top_k, mtp, json)),
        Command::Tokenize { tokenizer, text, chat, add_generation_prompt, json } => {
            commands::tokenize(&tokenizer, text.as_deref(), chat.as_deref(), add_generation_prompt, json)
        }
        Command::Bench(args) => {
            hub::resolve_model(&args.model).and_then(|model| bench::run(&bench::BenchArgs { model, ..args }))
        }
        Command::Plan { config, tokens, gpus, gpu, pp, ep, mfu, price, seq_len, chunks, report_phases, json } => {
            crate::plan::run(&crate::plan::PlanArgs {
                config,
                tokens,
                gpus,
                gpu,
                pp,
                ep,
                mfu,
                price,
                seq_len,
                chunks,
                report_phases,
                json,
            })
        }
        Command::Schedule { kind, pp, chunks, f, b, w, fb, json } => {
            commands::schedule(&kind, pp, chunks, f, b, w, fb, json)
        }
        Command::Eplb { load, replicas, groups, nodes, gpus, json } => {
            commands::eplb(&load, replicas, groups, nodes, gpus, json)
        }
        Command::Convert { from, to, format, max_memory, json } => {
            commands::convert(&from, &to, &format, &max_memory, json)
        }
        Command::RandomModel { preset, dtype, out, seed } => commands::random_model(&preset, &dtype, &out, seed),
        Command::Serve {
            model,
            host,
            port,
            api_key,
            max_batch,
            kv_memory,
            max_queue,
            prefill_chunk,
            mtp_speculative,
            prefix_cache,
            header_timeout,
            body_timeout,
            max_connections,
        } => hub::resolve_model(&model).and_then(|m| {
            let http = commands::http_limits(header_timeout, body_timeout, max_connections)?;
            let o = dsv3_serve::ServeOptions {
                host,
                port,
                api_key,
                max_batch,
                kv_memory: 0,
                max_queue,
                prefill_chunk,
                mtp_speculative,
                prefix_cache,
                extra_metrics: commands::ep_metrics(),
                http,
            };
            commands::serve(&m, o, &kv_memory)
        }),
        Command::Train(args) => train::run(&args),
        Command::Plot { runs, compare, out } => {
            if compare {
                dsv3_train::plot::write_compare_plots(&runs, &out).map(|table| print!("{table}"))
            } else {
                runs.iter().try_for_each(|r| dsv3_train::plot::write_run_plots(r))
            }
        }
        Command::Demo => commands::demo(),
    };
    #[cfg(feature = "mpi")]
    ep::finish();
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
