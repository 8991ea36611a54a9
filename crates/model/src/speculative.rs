//! MTP speculative decoding (spec §3; the report's 85–90% acceptance and 1.8× tokens/s).
//!
//! Each step the MTP module drafts `k` tokens (module 0 reused on its own output for `k > 1`), one
//! main forward over `[last, drafts…]` verifies them all, and both caches roll back past the first
//! rejection. Greedy verification keeps the greedy output; with temperature, rejection sampling
//! (accept a draft with probability min(1, p/q), else draw from max(0, p − q)) keeps the target
//! distribution exactly.
//!
//! The MTP module at position i reads the main model's state h_i and the token at i+1. Its cache
//! therefore lags the main one: [`Speculator`] holds the verified states and tokens it has not seen
//! yet, and the next step's draft runs them in one call before drafting.

use crate::error::{ModelError, Result};
use crate::generate::{GenerateOptions, GenerateStats};
use crate::mla::MAX_ABSORBED_TOKENS;
use crate::model::{DeepseekV3, KvCache};
use crate::sampling::{argmax, Sampler};
use rand::Rng;
use std::time::Instant;

/// The verdict on one draft token: `None` when accepted, else the token to emit instead.
/// `p` is the target distribution at that position and `q` the draft's.
pub fn verify_draft(p: &[f32], q: &[f32], draft: u32, rng: &mut impl Rng) -> Option<u32> {
    let d = draft as usize;
    let (pd, qd) = (p[d], q[d]);
    if qd > 0.0 && rng.gen::<f32>() * qd < pd {
        return None;
    }
    // Rejected: draw from the normalized residual max(0, p − q). It is empty only when p ≤ q
    // everywhere, i.e. p = q, where a rejection cannot happen; p itself is the safe fallback.
    let residual: Vec<f32> = p.iter().zip(q).map(|(&a, &b)| (a - b).max(0.0)).collect();
    let z: f32 = residual.iter().sum();
    let dist = if z > 0.0 { &residual } else { p };
    let mut u = rng.gen::<f32>() * dist.iter().sum::<f32>();
    let mut last = d;
    for (i, &w) in dist.iter().enumerate() {
        if w > 0.0 {
            last = i;
            if u < w {
                return Some(i as u32);
            }
            u -= w;
        }
    }
    Some(last as u32)
}

/// What one speculative step did.
#[derive(Clone, Debug)]
pub struct Step {
    /// The MTP module's drafts for the positions after the last token.
    pub drafts: Vec<u32>,
    /// How many of them the main model accepted (a prefix).
    pub accepted: usize,
    /// The token after the accepted drafts: the correction, or a bonus when all were accepted.
    pub next: u32,
}

/// One sequence's speculative-decoding state over its [`KvCache`].
pub struct Speculator {
    /// Main-model states the MTP module has not run yet (positions `mtp_len..main_len`) …
    pending_h: Vec<f32>,
    /// … and the token after each of them; the last is `last`.
    pending_tok: Vec<u32>,
    /// The newest token: chosen, not yet run through the main model.
    last: u32,
}

impl Speculator {
    /// After a prefill of `prompt` that produced states `h [len, D]` and chose `next`.
    pub fn new(prompt: &[u32], h: Vec<f32>, next: u32) -> Self {
        Speculator { pending_h: h, pending_tok: prompt[1..].iter().copied().chain([next]).collect(), last: next }
    }

    /// Drafts `k` tokens, verifies them in one main forward, rolls the caches back past the first
    /// rejection. The returned tokens (`drafts[..accepted]`, then `next`) follow `last`.
    pub fn step(&mut self, model: &DeepseekV3, cache: &mut KvCache, k: usize, sampler: &mut Sampler) -> Result<Step> {
        if model.mtp.is_empty() {
            return Err(ModelError::Input("speculative decoding: the checkpoint has no MTP module".into()));
        }
        if k == 0 || k >= MAX_ABSORBED_TOKENS {
            return Err(ModelError::Input(format!(
                "speculative decoding: drafts per step must be 1..={}",
                MAX_ABSORBED_TOKENS - 1
            )));
        }
        let (d, v) = (model.config.hidden_size, model.config.vocab_size);
        let greedy = sampler.params().temperature <= 0.0;
        // `last` sits at position l.
        let l = cache.len();
        let n = self.pending_tok.len();
        let hm = model.mtp_forward(0, &self.pending_h, &self.pending_tok, cache)?;
        let mut h_draft = hm[(n - 1) * d..].to_vec();
        let (mut drafts, mut q) = (Vec::with_capacity(k), Vec::with_capacity(k));
        for j in 0..k {
            let logits = model.logits(&h_draft, 1);
            let tok = if greedy {
                argmax(&logits) as u32
            } else {
                let qj = sampler.probs(&logits);
                let tok = sampler.draw(&qj);
                q.push(qj);
                tok
            };
            drafts.push(tok);
            if j + 1 < k {
                // Module 0 again, on its own output state (the checkpoint has one module).
                h_draft = model.mtp_forward(0, &h_draft, &[tok], cache)?;
            }
        }

        let input: Vec<u32> = std::iter::once(self.last).chain(drafts.iter().copied()).collect();
        let hv = model.forward(&input, cache)?;
        let lv = model.logits(&hv, k + 1);
        let mut accepted = 0;
        let mut correction = None;
        for (j, &draft) in drafts.iter().enumerate() {
            let row = &lv[j * v..(j + 1) * v];
            let verdict = if greedy {
                Some(argmax(row) as u32).filter(|&t| t != draft)
            } else {
                verify_draft(&sampler.probs(row), &q[j], draft, sampler.rng())
            };
            match verdict {
                None => accepted += 1,
                Some(t) => {
                    correction = Some(t);
                    break;
                }
            }
        }
        let next = match correction {
            Some(t) => t,
            None => sampler.sample(&lv[k * v..]),
        };

        cache.truncate_main(l + accepted + 1);
        // Entries past l were made from draft states, not the main model's.
        cache.truncate_mtp(l);
        self.pending_h = hv[..(accepted + 1) * d].to_vec();
        self.pending_tok = drafts[..accepted].iter().copied().chain([next]).collect();
        self.last = next;
        Ok(Step { drafts, accepted, next })
    }
}

/// [`crate::generate::generate`] with `opts.mtp_speculative = k ≥ 1` drafts per step.
pub(crate) fn generate_speculative(
    model: &DeepseekV3,
    prompt: &[u32],
    opts: &GenerateOptions,
    mut on_token: impl FnMut(u32),
) -> Result<(Vec<u32>, GenerateStats)> {
    let k = opts.mtp_speculative;
    if model.mtp.is_empty() {
        return Err(ModelError::Input("--mtp-speculative: the checkpoint has no MTP module".into()));
    }
    let d = model.config.hidden_size;
    let mut sampler = Sampler::new(opts.sampling.clone());
    let mut cache = model.new_cache();

    let t0 = Instant::now();
    let h = model.forward(prompt, &mut cache)?;
    let first = sampler.sample(&model.logits(&h[(prompt.len() - 1) * d..], 1));
    let prefill = t0.elapsed().as_secs_f64();

    let t1 = Instant::now();
    let mut out = vec![];
    let mut stats = GenerateStats::default();
    // Emits a token; true when generation is over.
    let mut emit = |tok: u32, out: &mut Vec<u32>| {
        out.push(tok);
        on_token(tok);
        out.len() >= opts.max_new_tokens || (!opts.ignore_eos && opts.eos_token_ids.contains(&tok))
    };
    let mut spec = Speculator::new(prompt, h, first);
    let mut done = opts.max_new_tokens == 0 || emit(first, &mut out);
    while !done {
        let step = spec.step(model, &mut cache, k, &mut sampler)?;
        stats.draft_tokens += k;
        stats.accepted_tokens += step.accepted;
        stats.verify_steps += 1;
        for &t in step.drafts[..step.accepted].iter().chain([&step.next]) {
            done = emit(t, &mut out);
            if done {
                break;
            }
        }
    }
    let decode = t1.elapsed().as_secs_f64();
    let steps = out.len().saturating_sub(1);
    stats.prompt_tokens = prompt.len();
    stats.generated_tokens = out.len();
    stats.prefill_seconds = prefill;
    stats.decode_seconds = decode;
    stats.prefill_tokens_per_second = prompt.len() as f64 / prefill.max(1e-9);
    stats.decode_tokens_per_second = if steps > 0 { steps as f64 / decode.max(1e-9) } else { 0.0 };
    if stats.verify_steps > 0 {
        stats.acceptance_rate = Some(stats.accepted_tokens as f64 / stats.draft_tokens as f64);
        stats.mean_accepted_length =
            Some((stats.accepted_tokens + stats.verify_steps) as f64 / stats.verify_steps as f64);
    }
    Ok((out, stats))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn rejection_sampling_keeps_the_target_distribution() {
        let p = [0.5f32, 0.3, 0.15, 0.05, 0.0];
        let q = [0.1f32, 0.2, 0.3, 0.2, 0.2];
        let mut rng = rand::rngs::StdRng::seed_from_u64(9);
        let n = 200_000;
        let mut counts = [0usize; 5];
        for _ in 0..n {
            // The draft is drawn from q, as the MTP module does.
            let mut u = rng.gen::<f32>();
            let mut draft = 4;
            for (i, &qi) in q.iter().enumerate() {
                if u < qi {
                    draft = i;
                    break;
                }
                u -= qi;
            }
            let tok = verify_draft(&p, &q, draft as u32, &mut rng).unwrap_or(draft as u32);
            counts[tok as usize] += 1;
        }
        for (i, &c) in counts.iter().enumerate() {
            let f = c as f32 / n as f32;
            // 4σ of a binomial at n = 200k is under 0.5%.
            assert!((f - p[i]).abs() < 0.005, "token {i}: {f} vs {}", p[i]);
        }
    }

    #[test]
    fn a_draft_equal_to_the_target_is_always_accepted() {
        let p = [0.2f32, 0.8];
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        assert!((0..1000).all(|_| verify_draft(&p, &p, 1, &mut rng).is_none()));
        // A draft the target gives zero mass is never accepted.
        let (p, q) = ([1.0f32, 0.0], [0.0f32, 1.0]);
        assert!((0..1000).all(|_| verify_draft(&p, &q, 1, &mut rng) == Some(0)));
    }
}
