//! `dsv3 plan`: the cost of a training run from a config (see `dsv3_dist::plan`).

use anyhow::{bail, Context, Result};
use dsv3_dist::plan::{gpu, gpu_hours, memory, Mesh, ModelShape};
use dsv3_dist::schedule::{bubble_formula, generate, simulate, Kind, Timing};
use serde_json::json;

/// The cost of a training run: FLOPs per token, GPU-hours and dollars, memory per device,
/// and the pipeline bubble of each schedule.
#[derive(clap::Args)]
pub struct Plan {
    /// A config.json, or `deepseek-v3` (the released 671B config, built in).
    #[arg(long, default_value = "deepseek-v3")]
    pub config: String,
    /// Training tokens (e.g. 14.8T, 500B).
    #[arg(long, default_value = "14.8T")]
    pub tokens: String,
    #[arg(long, default_value_t = 2048)]
    pub gpus: usize,
    /// h800 | h100 | h200 | a100
    #[arg(long, default_value = "h800")]
    pub gpu: String,
    /// Pipeline ranks.
    #[arg(long, default_value_t = 16)]
    pub pp: usize,
    /// Expert-parallel ranks.
    #[arg(long, default_value_t = 64)]
    pub ep: usize,
    /// Utilization: achieved FLOP/s ÷ the GPU's dense bf16 peak (0.40 reproduces the report).
    #[arg(long, default_value_t = 0.40)]
    pub mfu: f64,
    /// Dollars per GPU-hour.
    #[arg(long, default_value_t = 2.0)]
    pub price: f64,
    #[arg(long, default_value_t = 4096)]
    pub seq_len: usize,
    /// Micro-batches per pipeline step (for the bubble).
    #[arg(long, default_value_t = 32)]
    pub chunks: usize,
    /// Add the report's context extension (1000 steps of 1920 × 32K, 1000 of 480 × 128K
    /// tokens, costed here) and post-training (5K GPU-hours, taken from the report).
    #[arg(long)]
    pub report_phases: bool,
    #[arg(long)]
    pub json: bool,
}

/// `14.8T`, `500B`, `2e9` → tokens.
fn parse_tokens(s: &str) -> Result<f64> {
    let t = s.trim();
    let (num, mul) = match t.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('T') => (&t[..t.len() - 1], 1e12),
        Some('B') => (&t[..t.len() - 1], 1e9),
        Some('M') => (&t[..t.len() - 1], 1e6),
        Some('K') => (&t[..t.len() - 1], 1e3),
        _ => (t, 1.0),
    };
    let v: f64 = num.parse().map_err(|_| anyhow::anyhow!("--tokens {s}: a count like 14.8T or 500B"))?;
    if !(v.is_finite() && v > 0.0) {
        bail!("--tokens {s}: must be positive");
    }
    Ok(v * mul)
}

fn shape(config: &str) -> Result<ModelShape> {
    let text = if config == "deepseek-v3" {
        include_str!("../../configs/deepseek-v3.json").to_string()
    } else {
        std::fs::read_to_string(config)
            .with_context(|| format!("--config {config}: neither `deepseek-v3` nor a readable config.json"))?
    };
    let v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{config}: not JSON"))?;
    Ok(dsv3_model::Config::from_json(&v)?.shape())
}

pub fn run(a: &Plan) -> Result<()> {
    let s = shape(&a.config)?;
    let g = gpu(&a.gpu).ok_or_else(|| anyhow::anyhow!("--gpu {}: h800, h100, h200 or a100", a.gpu))?;
    let tokens = parse_tokens(&a.tokens)?;
    if !(a.mfu > 0.0 && a.mfu <= 1.0)
        || a.gpus == 0
        || a.pp == 0
        || a.ep == 0
        || a.seq_len == 0
        || !a.gpus.is_multiple_of(a.pp)
    {
        bail!("--mfu in (0, 1]; --gpus, --pp, --ep, --seq-len positive; --gpus a multiple of --pp");
    }
    let p = s.params();
    let flops = s.train_flops_per_token(a.seq_len);
    let pre = gpu_hours(tokens, flops, g, a.mfu);
    let per_t = gpu_hours(1e12, flops, g, a.mfu);
    // The report's context extension: two phases of 1000 steps (§4.3), costed at the same utilization.
    let ext: Vec<(usize, f64)> = vec![(32768, 1000.0 * 1920.0 * 32768.0), (131072, 1000.0 * 480.0 * 131072.0)];
    let ext_hours: f64 = if a.report_phases {
        ext.iter().map(|&(seq, t)| gpu_hours(t, s.train_flops_per_token(seq), g, a.mfu)).sum()
    } else {
        0.0
    };
    let post_hours = if a.report_phases { 5e3 } else { 0.0 };
    let total = pre + ext_hours + post_hours;

    // The model in `pp` stages; DualPipeV runs them on pp/2 devices.
    let layout = |kind: Kind| Mesh {
        gpus: a.gpus,
        devices: if kind == Kind::DualPipeV { a.pp / 2 } else { a.pp },
        stages: a.pp,
        stages_per_device: if kind == Kind::OneFOneB { 1 } else { 2 },
        ep: a.ep,
        live_micro_batches: if kind == Kind::OneFOneB { a.pp } else { a.pp + 1 },
        micro_batch_tokens: a.seq_len,
        act_bytes_per_token_layer: 17.0 * s.hidden as f64,
    };
    let t = Timing::default();
    let chunks = a.chunks.max(2 * a.pp).next_multiple_of(2);
    let mut schedules = vec![];
    for (kind, name, ranks) in
        [(Kind::OneFOneB, "1f1b", a.pp), (Kind::DualPipe, "dualpipe", a.pp), (Kind::DualPipeV, "dualpipev", a.pp / 2)]
    {
        if ranks == 0 || (kind == Kind::DualPipe && !a.pp.is_multiple_of(2)) {
            continue;
        }
        let sim = simulate(kind, &generate(kind, ranks, chunks).map_err(|e| anyhow::anyhow!("{e}"))?, t)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let stages = if kind == Kind::DualPipeV { 2 * ranks } else { ranks };
        let bubble = sim.bubble.iter().copied().fold(0.0, f64::max);
        let m = memory(&s, layout(kind));
        schedules.push(json!({
            "schedule": name, "devices": ranks, "stages": stages, "chunks": chunks,
            "bubble": bubble, "bubble_formula": bubble_formula(kind, stages, t), "bubble_fraction": bubble / sim.makespan,
            "memory_gb": {"params": m.params / 1e9, "grads": m.grads / 1e9, "optimizer": m.optimizer / 1e9, "activations": m.activations / 1e9, "total": m.total() / 1e9},
        }));
    }
    let out = json!({
        "params_total": p.total, "params_main": p.main, "active_params_per_token": p.active_main,
        "train_flops_per_token": flops, "seq_len": a.seq_len, "tokens": tokens,
        "gpu": g.name, "mfu_bf16": a.mfu, "mfu_fp8": a.mfu * g.bf16_tflops / g.fp8_tflops,
        "gpu_hours_per_trillion_tokens": per_t, "pretraining_gpu_hours": pre,
        "context_extension_gpu_hours": ext_hours, "post_training_gpu_hours": post_hours,
        "total_gpu_hours": total, "cost_usd": total * a.price, "days": total / a.gpus as f64 / 24.0,
        "schedules": schedules,
    });
    if a.json {
        println!("{out}");
        return Ok(());
    }
    println!(
        "model: {:.2}B parameters ({:.2}B main), {:.2}B active per token",
        p.total / 1e9,
        p.main / 1e9,
        p.active_main / 1e9
    );
    println!(
        "training FLOPs per token at {} tokens of context: {:.1} GFLOP (attention included)",
        a.seq_len,
        flops / 1e9
    );
    println!(
        "{} at {:.0}% of its bf16 peak ({:.0}% of FP8 peak): {:.0}K GPU-hours per trillion tokens",
        g.name,
        100.0 * a.mfu,
        100.0 * a.mfu * g.bf16_tflops / g.fp8_tflops,
        per_t / 1e3
    );
    println!("pre-training {:.2}T tokens: {:.0}K GPU-hours", tokens / 1e12, pre / 1e3);
    if a.report_phases {
        println!(
            "context extension (32K, then 128K): {:.0}K GPU-hours; post-training (report): {:.0}K",
            ext_hours / 1e3,
            post_hours / 1e3
        );
    }
    println!(
        "total {:.3}M GPU-hours, ${:.3}M at ${}/GPU-hour, {:.1} days on {} GPUs",
        total / 1e6,
        total * a.price / 1e6,
        a.price,
        total / a.gpus as f64 / 24.0,
        a.gpus
    );
    for sch in &schedules {
        println!(
            "{:<9} on {:>3} devices, {} micro-batches: bubble {} (formula {}), {:.1}% of the step; memory/device {:.1} GB (params {:.1}, grads {:.1}, optimizer {:.1}, activations {:.1})",
            sch["schedule"].as_str().unwrap_or(""),
            sch["devices"],
            sch["chunks"],
            sch["bubble"],
            sch["bubble_formula"],
            100.0 * sch["bubble_fraction"].as_f64().unwrap_or(0.0),
            sch["memory_gb"]["total"].as_f64().unwrap_or(0.0),
            sch["memory_gb"]["params"].as_f64().unwrap_or(0.0),
            sch["memory_gb"]["grads"].as_f64().unwrap_or(0.0),
            sch["memory_gb"]["optimizer"].as_f64().unwrap_or(0.0),
            sch["memory_gb"]["activations"].as_f64().unwrap_or(0.0),
        );
    }
    Ok(())
}
