//! Generation (prefill, then one token per step over the latent cache) and scoring.

use crate::error::{ModelError, Result};
use crate::model::DeepseekV3;
use crate::sampling::{log_prob, top_k_logprobs, Sampler, SamplingParams};
use std::time::Instant;

#[derive(Clone, Debug)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    /// Token ids that end generation (unless `ignore_eos`).
    pub eos_token_ids: Vec<u32>,
    pub ignore_eos: bool,
    /// MTP drafts per step (0: plain decoding). See [`crate::speculative`].
    pub mtp_speculative: usize,
}

#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct GenerateStats {
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
    pub prefill_tokens_per_second: f64,
    pub decode_tokens_per_second: f64,
    /// `stop` (an end-of-sequence token) or `length` (`max_new_tokens`, or the context window).
    pub finish_reason: String,
    /// Speculative decoding only: drafts proposed and accepted, main forwards that verified them,
    /// accepted/proposed, and tokens emitted per verifying forward.
    #[serde(skip_serializing_if = "is_zero")]
    pub draft_tokens: usize,
    #[serde(skip_serializing_if = "is_zero")]
    pub accepted_tokens: usize,
    #[serde(skip_serializing_if = "is_zero")]
    pub verify_steps: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub acceptance_rate: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mean_accepted_length: Option<f64>,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// Generates after `prompt`, calling `on_token` with each new id as it is chosen.
pub fn generate(
    model: &DeepseekV3,
    prompt: &[u32],
    opts: &GenerateOptions,
    on_token: impl FnMut(u32),
) -> Result<(Vec<u32>, GenerateStats)> {
    let budget = new_token_budget(model, prompt.len(), opts.max_new_tokens)?;
    let opts = &GenerateOptions { max_new_tokens: budget, ..opts.clone() };
    let p = &opts.sampling.penalties;
    if !(p.repetition.is_finite() && p.repetition > 0.0 && p.presence.is_finite() && p.frequency.is_finite()) {
        return Err(ModelError::Input(format!(
            "penalties must be finite and the repetition penalty positive (got repetition {}, presence {}, frequency {})",
            p.repetition, p.presence, p.frequency
        )));
    }
    // Speculative acceptance draws from the plain distribution: penalties decode plainly.
    let (out, mut stats) = if opts.mtp_speculative > 0 && p.is_neutral() {
        crate::speculative::generate_speculative(model, prompt, opts, on_token)?
    } else {
        generate_plain(model, prompt, opts, on_token)?
    };
    let eos = out.last().is_some_and(|t| !opts.ignore_eos && opts.eos_token_ids.contains(t));
    stats.finish_reason = if eos { "stop" } else { "length" }.into();
    Ok((out, stats))
}

/// How many tokens may follow a prompt of `prompt_len`: `max_new_tokens`, cut at the context
/// window (`max_position_embeddings`). A prompt that leaves no room is an error naming both.
pub fn new_token_budget(model: &DeepseekV3, prompt_len: usize, max_new_tokens: usize) -> Result<usize> {
    let ctx = model.config.max_position_embeddings;
    if prompt_len == 0 {
        return Err(ModelError::Input("the prompt is empty".into()));
    }
    if prompt_len >= ctx {
        return Err(ModelError::Input(format!(
            "the prompt has {prompt_len} tokens; the context window (max_position_embeddings) is {ctx}, \
             which leaves no room for a new token"
        )));
    }
    Ok(max_new_tokens.min(ctx - prompt_len))
}

fn generate_plain(
    model: &DeepseekV3,
    prompt: &[u32],
    opts: &GenerateOptions,
    mut on_token: impl FnMut(u32),
) -> Result<(Vec<u32>, GenerateStats)> {
    let mut sampler = Sampler::new(opts.sampling.clone()).with_prompt(prompt);
    let mut cache = model.new_cache();
    let d = model.config.hidden_size;
    let t0 = Instant::now();
    let h = model.forward(prompt, &mut cache)?;
    let mut logits = model.logits(&h[(prompt.len() - 1) * d..], 1);
    let prefill = t0.elapsed().as_secs_f64();
    let t1 = Instant::now();
    let mut out = vec![];
    while out.len() < opts.max_new_tokens {
        let tok = sampler.sample_adjusted(&logits);
        out.push(tok);
        on_token(tok);
        if !opts.ignore_eos && opts.eos_token_ids.contains(&tok) {
            break;
        }
        if out.len() == opts.max_new_tokens {
            break;
        }
        let h = model.forward(&[tok], &mut cache)?;
        logits = model.logits(&h, 1);
    }
    let decode = t1.elapsed().as_secs_f64();
    // The first token comes from the prefill's logits; decode steps are the rest.
    let steps = out.len().saturating_sub(1);
    let stats = GenerateStats {
        prompt_tokens: prompt.len(),
        generated_tokens: out.len(),
        prefill_seconds: prefill,
        decode_seconds: decode,
        prefill_tokens_per_second: prompt.len() as f64 / prefill.max(1e-9),
        decode_tokens_per_second: if steps > 0 { steps as f64 / decode.max(1e-9) } else { 0.0 },
        ..Default::default()
    };
    Ok((out, stats))
}

#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Score {
    /// `lp(ids[i+1] | ids[..=i])`
    pub logprobs: Vec<f32>,
    /// `lp(ids[i+2])` from MTP module 0 at position i (empty unless asked).
    pub mtp_logprobs: Vec<f32>,
    /// Per position, the `top_k` most likely next tokens with their log-probs.
    pub top: Vec<Vec<(u32, f32)>>,
    /// Mean negative log-likelihood of `ids[1..]`.
    pub nll: f64,
    pub ppl: f64,
}

/// Scores `ids` in one forward.
pub fn score(model: &DeepseekV3, ids: &[u32], mtp: bool, top_k: usize) -> Result<Score> {
    if ids.len() < 2 {
        return Err(ModelError::Input("scoring needs at least 2 tokens".into()));
    }
    let ctx = model.config.max_position_embeddings;
    if ids.len() > ctx {
        return Err(ModelError::Input(format!(
            "the text has {} tokens; the context window (max_position_embeddings) is {ctx}",
            ids.len()
        )));
    }
    if mtp && model.mtp.is_empty() {
        return Err(ModelError::Input("--mtp: the checkpoint has no MTP module".into()));
    }
    let (n, v, d) = (ids.len(), model.config.vocab_size, model.config.hidden_size);
    let mut cache = model.new_cache();
    let h = model.forward(ids, &mut cache)?;
    let logits = model.logits(&h, n);
    let mut s = Score::default();
    for i in 0..n - 1 {
        let row = &logits[i * v..(i + 1) * v];
        s.logprobs.push(log_prob(row, ids[i + 1] as usize));
        if top_k > 0 {
            s.top.push(top_k_logprobs(row, top_k));
        }
    }
    if mtp {
        let hm = model.mtp_forward(0, &h[..(n - 1) * d], &ids[1..], &mut cache)?;
        let ml = model.logits(&hm, n - 1);
        s.mtp_logprobs = (0..n - 2).map(|i| log_prob(&ml[i * v..(i + 1) * v], ids[i + 2] as usize)).collect();
    }
    s.nll = -s.logprobs.iter().map(|&x| x as f64).sum::<f64>() / (n - 1) as f64;
    s.ppl = s.nll.exp();
    Ok(s)
}
