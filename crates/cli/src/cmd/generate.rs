//! `dsv3 generate`: a continuation of a prompt (text or ids), streamed, or as JSON.

use crate::args::{ModelArgs, Sampling};
use crate::cluster::Cluster;
use crate::load::{eos_ids, load, parse_ids, tokenizer, Streamer};
use anyhow::{Context, Result};
use dsv3_model::generate::{generate, GenerateOptions};
use serde_json::json;

/// Generate a continuation of a prompt.
#[derive(clap::Args)]
pub struct Generate {
    #[command(flatten)]
    pub model: ModelArgs,
    #[arg(long, conflicts_with = "prompt_ids", required_unless_present = "prompt_ids")]
    pub prompt: Option<String>,
    /// Comma-separated token ids.
    #[arg(long)]
    pub prompt_ids: Option<String>,
    #[command(flatten)]
    pub sampling: Sampling,
    /// Speculative decoding with the checkpoint's MTP module drafting K tokens per step.
    #[arg(long, value_name = "K", default_value_t = 0, num_args = 0..=1, default_missing_value = "1")]
    pub mtp_speculative: usize,
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: &Generate, cluster: &Cluster) -> Result<()> {
    a.sampling.check()?;
    let Some(l) = load(&a.model, cluster, false)? else { return Ok(()) };
    let tok = tokenizer(&l.dir)?;
    let ids = match (&a.prompt, &a.prompt_ids) {
        (_, Some(p)) => parse_ids(p)?,
        (Some(p), None) => tok
            .as_ref()
            .context("--prompt needs tokenizer.json in the model folder (or use --prompt-ids)")?
            .encode(p, true)?,
        (None, None) => anyhow::bail!("give --prompt or --prompt-ids"),
    };
    let model = &l.model;
    let opts = GenerateOptions {
        mtp_speculative: a.mtp_speculative,
        ..a.sampling.options(eos_ids(&l.dir, model, tok.as_ref()))
    };
    let mut streamer = tok.as_ref().filter(|_| !a.json).map(Streamer::new);
    let (out, stats) = generate(model, &ids, &opts, |id| {
        if let Some(st) = streamer.as_mut() {
            st.push(id)
        }
    })?;
    let text = match &tok {
        Some(t) => t.decode(&out, true)?,
        None => String::new(),
    };
    if a.json {
        println!("{}", json!({"prompt_ids": ids, "output_ids": out, "text": text, "stats": stats}));
        return Ok(());
    }
    if tok.is_none() {
        println!("{}", out.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(","));
    } else {
        println!();
    }
    eprintln!(
        "[{} prompt tokens, {:.1} tok/s prefill; {} new tokens, {:.1} tok/s decode]",
        stats.prompt_tokens, stats.prefill_tokens_per_second, stats.generated_tokens, stats.decode_tokens_per_second
    );
    if stats.finish_reason == "length" && out.len() < a.sampling.max_new_tokens {
        eprintln!("[stopped at the context window of {} tokens]", model.config.max_position_embeddings);
    }
    if let (Some(rate), Some(len)) = (stats.acceptance_rate, stats.mean_accepted_length) {
        eprintln!(
            "[MTP speculative: {:.1}% of {} drafts accepted, {len:.2} tokens per verifying forward]",
            100.0 * rate,
            stats.draft_tokens
        );
    }
    Ok(())
}
