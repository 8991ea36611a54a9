//! `dsv3 bench`: prefill and decode tokens/s at batch 1, peak memory, latent KV bytes per token,
//! and the decode memory-bandwidth floor (active weight bytes per token ÷ measured copy bandwidth).

use crate::args::ModelArgs;
use crate::cluster::Cluster;
use crate::load::load;
use anyhow::Result;
use dsv3_model::generate::{generate, GenerateOptions};
use dsv3_model::sampling::SamplingParams;
use serde_json::json;
use std::time::Instant;

/// Prefill and decode speed, peak memory and KV-cache size of a model.
#[derive(clap::Args, Clone)]
pub struct Bench {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Prompt tokens to prefill.
    #[arg(long, default_value_t = 128)]
    pub prompt_len: usize,
    /// Tokens to decode.
    #[arg(long, default_value_t = 64)]
    pub gen: usize,
    /// Also decode with MTP speculative decoding, K drafts per step, and report its speed-up and
    /// acceptance (random weights accept little; a trained model is the real test).
    #[arg(long, value_name = "K", default_value_t = 0)]
    pub mtp_speculative: usize,
    #[arg(long)]
    pub json: bool,
}

/// Peak resident memory of this process (Linux `VmHWM`), in bytes.
fn peak_rss() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?; // procfs: a regular text file
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse::<u64>().ok().map(|kb| kb * 1024)
}

/// Read bandwidth of a streaming pass over 512 MiB from both cores, in bytes/s: what decode at
/// batch 1 is bound by.
fn read_bandwidth() -> f64 {
    use rayon::prelude::*;
    let buf = vec![1u8; 512 << 20];
    let mut best = 0f64;
    for _ in 0..3 {
        let t = Instant::now();
        let s: u64 = buf
            .par_chunks(1 << 20)
            .map(|c| {
                c.chunks_exact(8)
                    .map(|w| u64::from_le_bytes(w.try_into().unwrap()))
                    .fold(0u64, |a, b| a.wrapping_add(b))
            })
            .reduce(|| 0, |a, b| a.wrapping_add(b));
        std::hint::black_box(s);
        best = best.max(buf.len() as f64 / t.elapsed().as_secs_f64());
    }
    best
}

impl Bench {
    /// The defaults for `model`, with these lengths and MTP drafts (the demo's benchmark).
    pub fn parse_for(model: &std::path::Path, prompt_len: usize, gen: usize, mtp_speculative: usize) -> Self {
        use clap::Parser;
        #[derive(Parser)]
        struct W {
            #[command(flatten)]
            b: Bench,
        }
        let mut b = W::parse_from(["bench", "--model", &model.to_string_lossy()]).b;
        (b.prompt_len, b.gen, b.mtp_speculative) = (prompt_len, gen, mtp_speculative);
        b
    }
}

pub fn run(a: &Bench, cluster: &Cluster) -> Result<()> {
    let t = Instant::now();
    let Some(l) = load(&a.model, cluster, false)? else { return Ok(()) };
    let model = l.model.clone();
    let load_s = t.elapsed().as_secs_f64();
    let ctx = model.config.max_position_embeddings;
    if a.prompt_len.max(1).saturating_add(a.gen).saturating_add(1) > ctx {
        anyhow::bail!(
            "--prompt-len {} + --gen {} exceed the model's context window (max_position_embeddings {ctx})",
            a.prompt_len,
            a.gen
        );
    }
    let v = model.config.vocab_size as u32;
    let prompt: Vec<u32> = (0..a.prompt_len.max(1)).map(|i| 2 + (i as u32 * 7919) % (v - 2).max(1)).collect();
    let opts = GenerateOptions {
        max_new_tokens: a.gen + 1,
        sampling: SamplingParams::default(),
        eos_token_ids: vec![],
        ignore_eos: true,
        mtp_speculative: 0,
    };
    // A short warm-up run pages the weights in.
    generate(&model, &prompt[..prompt.len().min(8)], &GenerateOptions { max_new_tokens: 2, ..opts.clone() }, |_| {})?;
    let (_, stats) = generate(&model, &prompt, &opts, |_| {})?;
    let spec = match a.mtp_speculative {
        0 => None,
        k => Some(generate(&model, &prompt, &GenerateOptions { mtp_speculative: k, ..opts.clone() }, |_| {})?.1),
    };
    let peak = peak_rss();
    let active = model.active_weight_bytes();
    let bw = read_bandwidth();
    let floor_tps = bw / active as f64;
    let r = json!({
        "model": l.dir.display().to_string(),
        "load_seconds": load_s,
        "prompt_tokens": stats.prompt_tokens,
        "decode_tokens": stats.generated_tokens.saturating_sub(1),
        "prefill_tokens_per_second": stats.prefill_tokens_per_second,
        "decode_tokens_per_second": stats.decode_tokens_per_second,
        "peak_memory_bytes": peak,
        "kv_cache_bytes_per_token": model.kv_bytes_per_token(),
        "kv_cache_values_per_token_per_layer": model.config.latent_cache_width(),
        "active_weight_bytes_per_token": active,
        "read_bandwidth_bytes_per_second": bw,
        "decode_floor_tokens_per_second": floor_tps,
        "decode_vs_floor": stats.decode_tokens_per_second / floor_tps,
        "threads": rayon::current_num_threads(),
        "mtp_speculative": spec.as_ref().map(|s| json!({
            "drafts_per_step": a.mtp_speculative,
            "decode_tokens_per_second": s.decode_tokens_per_second,
            "speedup": s.decode_tokens_per_second / stats.decode_tokens_per_second,
            "acceptance_rate": s.acceptance_rate,
            "mean_accepted_length": s.mean_accepted_length,
        })),
    });
    if a.json {
        println!("{r}");
    } else {
        println!("bench {}", l.dir.display());
        println!("  prefill  {:>9.1} tok/s  ({} tokens)", stats.prefill_tokens_per_second, stats.prompt_tokens);
        println!(
            "  decode   {:>9.2} tok/s  ({} tokens, batch 1)",
            stats.decode_tokens_per_second,
            stats.generated_tokens.saturating_sub(1)
        );
        println!("  peak memory        {:.1} MiB", peak.unwrap_or(0) as f64 / (1 << 20) as f64);
        println!(
            "  KV cache per token {} bytes ({} values, {} B per layer × {} layers)",
            model.kv_bytes_per_token(),
            model.config.latent_cache_width(),
            model.latent_bytes_per_token_layer(),
            model.layers.len()
        );
        println!("  active weights     {:.1} MiB/token; read bandwidth {:.1} GB/s → floor {:.1} tok/s; decode at {:.0}% of floor", active as f64 / (1 << 20) as f64, bw / 1e9, floor_tps, 100.0 * stats.decode_tokens_per_second / floor_tps);
        if let Some(s) = &spec {
            println!(
                "  MTP speculative    {:.2} tok/s with {} draft(s)/step ({:.2}× plain decode); {:.1}% accepted, {:.2} tokens per verifying forward",
                s.decode_tokens_per_second,
                a.mtp_speculative,
                s.decode_tokens_per_second / stats.decode_tokens_per_second,
                100.0 * s.acceptance_rate.unwrap_or(0.0),
                s.mean_accepted_length.unwrap_or(0.0)
            );
        }
    }
    Ok(())
}
