//! `dsv3`: the command line of the DeepSeek-V3 system. Thin: parsing, output formats and progress;
//! the work is in the library crates. One file per command under `cmd/`.

mod args;
mod cluster;
mod cmd;
mod hub;
mod load;

use clap::{Parser, Subcommand};
use cluster::Cluster;

#[derive(Parser)]
#[command(
    name = "dsv3",
    version,
    about = "DeepSeek-V3 in Rust: run, score and benchmark DeepSeek-V3-family checkpoints"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate a continuation of a prompt.
    Generate(cmd::generate::Generate),
    /// Chat interactively with the model's chat template, streaming replies.
    Chat(cmd::chat::Chat),
    /// Log-probabilities of a token sequence (and of the MTP module's predictions).
    Score(cmd::score::Score),
    /// Token ids of a text, or of a chat rendered with the chat template.
    Tokenize(cmd::tokenize::Tokenize),
    /// An OpenAI-compatible server (completions, chat, streaming, continuous batching).
    Serve(Box<cmd::serve::Serve>),
    /// Train a DeepSeek-V3-architecture model (MLA + DeepSeekMoE + MTP) from text.
    Train(Box<cmd::train::Train>),
    /// Fine-tune a model on chats (JSONL of {"messages": [...]}), learning the assistant's tokens.
    #[command(
        mut_arg("lr", |a| a.default_value("2e-5")),
        mut_arg("out", |a| a.default_value("runs/sft")),
        mut_arg("warmup_steps", |a| a.default_value("10")),
        mut_arg("steps", |a| a.default_value("100"))
    )]
    Sft(Box<cmd::sft::Sft>),
    /// Reinforcement learning with GRPO: sampled groups, rule rewards, a KL-penalized clipped objective.
    Grpo(Box<cmd::grpo::Grpo>),
    /// (Re)draw a training run's plots (loss, expert load, MaxVio; SVG and PNG) from its metrics.jsonl.
    Plot(cmd::plot::Plot),
    /// Prefill and decode speed, peak memory and KV-cache size of a model.
    Bench(cmd::bench::Bench),
    /// Write a random DeepSeek-V3 checkpoint (a preset shape) for benchmarks and experiments.
    RandomModel(cmd::random_model::RandomModel),
    /// Convert a checkpoint folder's weights to another format (FP8 with 128×128 weight_scale_inv
    /// blocks, FP4, bf16, f32), streamed under a memory budget, into a new folder.
    Convert(cmd::convert::Convert),
    /// Place experts with redundant replicas (EPLB's rebalance_experts) from per-expert loads.
    Eplb(cmd::eplb::Eplb),
    /// Pipeline schedules (1F1B, DualPipe, DualPipeV): each rank's ops, and the simulated makespan
    /// and per-rank bubble.
    Schedule(cmd::schedule::Schedule),
    /// The cost of a training run: FLOPs per token, GPU-hours and dollars, memory per device,
    /// and the pipeline bubble of each schedule.
    Plan(cmd::plan::Plan),
    /// The built-in default: a small DeepSeek-V3 trained on dsv3's own sources, sampled and
    /// benchmarked (no downloads).
    Demo(cmd::demo::Demo),
}

impl Command {
    /// Whether the flags ask for more than one process (MPI).
    fn parallel(&self) -> bool {
        match self {
            Command::Generate(c) => c.model.ep.expert_parallel,
            Command::Chat(c) => c.model.ep.expert_parallel,
            Command::Score(c) => c.model.ep.expert_parallel,
            Command::Bench(c) => c.model.ep.expert_parallel,
            Command::Serve(c) => c.model.ep.expert_parallel,
            Command::Train(c) => c.parallel.wants_mpi(),
            Command::Sft(c) => c.train.parallel.wants_mpi(),
            _ => false,
        }
    }
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

fn run(command: Command) -> anyhow::Result<()> {
    let cluster = if command.parallel() { Cluster::mpi()? } else { Cluster::single() };
    match command {
        Command::Generate(c) => cmd::generate::run(&c, &cluster),
        Command::Chat(c) => cmd::chat::run(&c, &cluster),
        Command::Score(c) => cmd::score::run(&c, &cluster),
        Command::Tokenize(c) => cmd::tokenize::run(&c),
        Command::Serve(c) => cmd::serve::run(&c, &cluster),
        Command::Train(c) => cmd::train::run(&c, &cluster),
        Command::Sft(c) => cmd::sft::run(&c, &cluster),
        Command::Grpo(c) => cmd::grpo::run(&c),
        Command::Plot(c) => cmd::plot::run(&c),
        Command::Bench(c) => cmd::bench::run(&c, &cluster),
        Command::RandomModel(c) => cmd::random_model::run(&c),
        Command::Convert(c) => cmd::convert::run(&c),
        Command::Eplb(c) => cmd::eplb::run(&c),
        Command::Schedule(c) => cmd::schedule::run(&c),
        Command::Plan(c) => cmd::plan::run(&c),
        Command::Demo(_) => cmd::demo::run(&cluster),
    }
}

fn main() {
    keep_freed_memory();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // Bad flags are bad input like any other: the message and exit code 1 (help: 0).
        Err(e) => {
            let code = if e.use_stderr() { 1 } else { 0 };
            let _ = e.print();
            std::process::exit(code);
        }
    };
    if let Err(e) = run(cli.command) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
