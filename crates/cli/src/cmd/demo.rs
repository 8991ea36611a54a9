//! `dsv3 demo`, the README's main job: train the tiny preset on dsv3's own sources with every
//! technique on, sample from the result, benchmark it. No downloads.

use crate::cluster::Cluster;
use anyhow::Result;
use dsv3_model::generate::{generate, GenerateOptions};
use dsv3_model::sampling::SamplingParams;
use dsv3_model::{DeepseekV3, Tokenizer};
use std::path::Path;

/// The built-in default: a tiny DeepSeek-V3 trained, sampled and benchmarked (no downloads).
#[derive(clap::Args)]
pub struct Demo {}

pub fn run(cluster: &Cluster) -> Result<()> {
    use clap::Parser;
    #[derive(Parser)]
    struct Defaults {
        #[command(flatten)]
        train: super::train::Train,
    }
    println!(
        "dsv3 demo: trains a tiny DeepSeek-V3 (MLA, DeepSeekMoE with aux-loss-free balancing, MTP) on dsv3's own sources, \
         then generates from it and benchmarks it (a minute or two on 2 cores)"
    );
    let d = Defaults::parse_from(["demo", "--out", "runs/demo"]);
    super::train::run(&d.train, cluster)?;
    let bench = super::bench::Bench::parse_for(&d.train.args.out, 64, 32, 1);
    super::bench::run(&bench, cluster)
}

/// A sampled and a greedy continuation from a trained model folder (after `dsv3 train`), and the
/// greedy one again with MTP speculative decoding: the same tokens, and the trained module's
/// acceptance.
/// A greedy reply of the model in `dir` to `question`, through its chat template; `dir` may hold
/// LoRA adapters for the `base` model.
pub fn sample_chat(dir: &Path, base: Option<&Path>, question: &str) -> Result<()> {
    let adapters = dir.join("adapter_config.json").exists();
    let src = base.filter(|_| adapters).unwrap_or(dir);
    let mut model = DeepseekV3::load(src)?;
    if adapters {
        model.load_peft(dir)?;
    }
    let tok = Tokenizer::from_dir(src)?;
    let ids = tok.encode_chat(&serde_json::json!([{"role": "user", "content": question}]), true)?;
    let opts = GenerateOptions {
        max_new_tokens: 64,
        sampling: SamplingParams::default(),
        eos_token_ids: model.config.eos_token_ids.clone(),
        ignore_eos: false,
        mtp_speculative: 0,
    };
    let (out, _) = generate(&model, &ids, &opts, |_| {})?;
    println!("sample (greedy): {question} → {}", tok.decode(&out, false)?);
    Ok(())
}

pub fn sample(dir: &Path) -> Result<()> {
    let model = DeepseekV3::load(dir)?;
    let tok = Tokenizer::from_dir(dir)?;
    let prompt = "fn main() {";
    let ids = tok.encode(prompt, false)?;
    let sampled = GenerateOptions {
        max_new_tokens: 48,
        sampling: SamplingParams { temperature: 0.7, top_p: 0.9, ..Default::default() },
        eos_token_ids: vec![1],
        ignore_eos: false,
        mtp_speculative: 0,
    };
    let (out, _) = generate(&model, &ids, &sampled, |_| {})?;
    println!("sample (temperature 0.7, top-p 0.9): {prompt}{}", tok.decode(&out, true)?);
    let mut opts = GenerateOptions { sampling: SamplingParams::default(), ..sampled };
    let (out, plain) = generate(&model, &ids, &opts, |_| {})?;
    if !model.mtp.is_empty() {
        opts.mtp_speculative = 1;
        let (spec_out, spec) = generate(&model, &ids, &opts, |_| {})?;
        println!(
            "MTP speculative decoding: {:.1}% of drafts accepted, {:.2} tokens per forward, {:.1} vs {:.1} tok/s plain (same tokens: {})",
            100.0 * spec.acceptance_rate.unwrap_or(0.0),
            spec.mean_accepted_length.unwrap_or(0.0),
            spec.decode_tokens_per_second,
            plain.decode_tokens_per_second,
            spec_out == out
        );
    }
    Ok(())
}
