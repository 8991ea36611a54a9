//! Next-token choice from logits: greedy, temperature, top-k, top-p, seeded; and the logit
//! adjustments clients ask for before the choice (OpenAI's presence/frequency penalties and
//! `logit_bias`, the CTRL/HF repetition penalty).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[derive(Clone, Debug)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// Nucleus mass in (0, 1]; 1 keeps every token.
    pub top_p: f32,
    /// 0 keeps every token.
    pub top_k: usize,
    pub seed: u64,
    pub penalties: Penalties,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams { temperature: 0.0, top_p: 1.0, top_k: 0, seed: 0, penalties: Penalties::default() }
    }
}

/// Adjustments to the logits before the choice. Presence and frequency count the generated
/// tokens (OpenAI's definition: `logit -= presence·[count > 0] + frequency·count`); the repetition
/// penalty covers the prompt and the generated tokens (CTRL's, as transformers and vLLM apply it:
/// a positive logit divided by it, a negative one multiplied). `logit_bias` is added last.
#[derive(Clone, Debug, PartialEq)]
pub struct Penalties {
    pub presence: f32,
    pub frequency: f32,
    pub repetition: f32,
    pub logit_bias: Vec<(u32, f32)>,
}

impl Default for Penalties {
    fn default() -> Self {
        Penalties { presence: 0.0, frequency: 0.0, repetition: 1.0, logit_bias: vec![] }
    }
}

impl Penalties {
    /// Nothing to adjust: the logits go to the choice as they are.
    pub fn is_neutral(&self) -> bool {
        *self == Penalties::default()
    }
}

pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// How often each generated token was chosen (for presence and frequency).
    counts: std::collections::HashMap<u32, u32>,
    /// The prompt's tokens (for the repetition penalty).
    prompt: std::collections::HashSet<u32>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = StdRng::seed_from_u64(params.seed);
        Sampler { params, rng, counts: Default::default(), prompt: Default::default() }
    }

    /// The prompt the repetition penalty also covers.
    pub fn with_prompt(mut self, prompt: &[u32]) -> Self {
        if self.params.penalties.repetition != 1.0 {
            self.prompt = prompt.iter().copied().collect();
        }
        self
    }

    /// Applies the penalties and the bias to a logits row, from what was generated so far.
    pub fn adjust(&self, logits: &mut [f32]) {
        let p = &self.params.penalties;
        if p.repetition != 1.0 {
            let seen = self.prompt.iter().chain(self.counts.keys());
            for &t in seen {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = if *l > 0.0 { *l / p.repetition } else { *l * p.repetition };
                }
            }
        }
        if p.presence != 0.0 || p.frequency != 0.0 {
            for (&t, &c) in &self.counts {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l -= p.presence + p.frequency * c as f32;
                }
            }
        }
        for &(t, b) in &p.logit_bias {
            if let Some(l) = logits.get_mut(t as usize) {
                *l += b;
            }
        }
    }

    /// Chooses the next token after the adjustments, and counts it.
    pub fn sample_adjusted(&mut self, logits: &[f32]) -> u32 {
        let id = if self.params.penalties.is_neutral() {
            self.sample(logits)
        } else {
            let mut l = logits.to_vec();
            self.adjust(&mut l);
            self.sample(&l)
        };
        *self.counts.entry(id).or_insert(0) += 1;
        id
    }

    /// Probabilities after temperature, top-k and top-p (for speculative acceptance too).
    /// Greedy gives a one-hot.
    pub fn probs(&self, logits: &[f32]) -> Vec<f32> {
        let mut p = vec![0f32; logits.len()];
        if self.params.temperature <= 0.0 {
            p[argmax(logits)] = 1.0;
            return p;
        }
        let t = self.params.temperature;
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| logits[b].partial_cmp(&logits[a]).unwrap_or(std::cmp::Ordering::Equal));
        if self.params.top_k > 0 {
            order.truncate(self.params.top_k);
        }
        let w: Vec<f32> = order.iter().map(|&i| ((logits[i] - max) / t).exp()).collect();
        let z: f32 = w.iter().sum();
        let mut kept = 0f32;
        for (&i, &wi) in order.iter().zip(&w) {
            p[i] = wi / z;
            kept += wi / z;
            if kept >= self.params.top_p {
                break;
            }
        }
        let s: f32 = p.iter().sum();
        p.iter_mut().for_each(|v| *v /= s);
        p
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// The seeded generator (speculative verification draws from it too, so runs repeat).
    pub fn rng(&mut self) -> &mut StdRng {
        &mut self.rng
    }

    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.params.temperature <= 0.0 {
            return argmax(logits) as u32;
        }
        let p = self.probs(logits);
        self.draw(&p)
    }

    /// Draws from a probability vector.
    pub fn draw(&mut self, p: &[f32]) -> u32 {
        let mut u: f32 = self.rng.gen::<f32>() * p.iter().sum::<f32>();
        let mut last = 0;
        for (i, &pi) in p.iter().enumerate() {
            if pi > 0.0 {
                last = i;
                if u < pi {
                    return i as u32;
                }
                u -= pi;
            }
        }
        last as u32
    }
}

pub fn argmax(v: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}

/// `log_softmax(logits)[i]` in f64 for accuracy.
pub fn log_prob(logits: &[f32], i: usize) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let z: f64 = logits.iter().map(|&l| (l as f64 - max).exp()).sum();
    (logits[i] as f64 - max - z.ln()) as f32
}

/// The `k` most likely tokens of a logits row with their log-probs, best first.
pub fn top_k_logprobs(logits: &[f32], k: usize) -> Vec<(u32, f32)> {
    crate::moe::top_k_indices(logits, k).into_iter().map(|i| (i as u32, log_prob(logits, i))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_top_p_and_seed() {
        let logits = [1.0, 3.0, 2.0, -1.0];
        let mut g = Sampler::new(SamplingParams::default());
        assert_eq!(g.sample(&logits), 1);
        // top_p small keeps only the best token.
        let mut s = Sampler::new(SamplingParams { temperature: 1.0, top_p: 0.1, seed: 1, ..Default::default() });
        assert!((0..50).all(|_| s.sample(&logits) == 1));
        // top_k 2 never draws tokens 0 or 3.
        let mut s = Sampler::new(SamplingParams { temperature: 5.0, top_k: 2, seed: 1, ..Default::default() });
        assert!((0..200).all(|_| matches!(s.sample(&logits), 1 | 2)));
        // Same seed, same draws.
        let run = |seed| {
            let mut s = Sampler::new(SamplingParams { temperature: 1.0, seed, ..Default::default() });
            (0..20).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(run(3), run(3));
        let lp: f32 = (0..4).map(|i| log_prob(&logits, i).exp()).sum();
        assert!((lp - 1.0).abs() < 1e-6);
    }

    #[test]
    fn penalties_follow_their_definitions() {
        let greedy = |penalties: Penalties, prompt: &[u32], steps: usize| {
            let mut s = Sampler::new(SamplingParams { penalties, ..Default::default() }).with_prompt(prompt);
            (0..steps).map(|_| s.sample_adjusted(&[2.0, 1.9, 1.0, -1.0])).collect::<Vec<_>>()
        };
        assert_eq!(greedy(Penalties::default(), &[], 3), [0, 0, 0]);
        // Presence: a chosen token loses 0.5 once, so 0 and 1 alternate only while it matters.
        let presence = Penalties { presence: 0.5, ..Default::default() };
        assert_eq!(greedy(presence, &[], 3), [0, 1, 0]);
        // Frequency 0.2 per use: 2.0 - 0.2 < 1.9 after one use, 1.9 - 0.2 < 2.0 - 0.2 after two.
        let frequency = Penalties { frequency: 0.2, ..Default::default() };
        assert_eq!(greedy(frequency, &[], 4), [0, 1, 0, 1]);
        // Repetition over the prompt: token 0 in the prompt is 2.0 / 1.5 < 1.9.
        let repetition = Penalties { repetition: 1.5, ..Default::default() };
        assert_eq!(greedy(repetition.clone(), &[0], 1), [1]);
        assert_eq!(greedy(repetition, &[], 1), [0]);
        // A negative logit is multiplied: -1 * 2 = -2 (the penalty pushes it further down).
        let mut l = [2.0, -1.0];
        let s = Sampler::new(SamplingParams {
            penalties: Penalties { repetition: 2.0, ..Default::default() },
            ..Default::default()
        })
        .with_prompt(&[0, 1]);
        s.adjust(&mut l);
        assert_eq!(l, [1.0, -2.0]);
        // logit_bias -100 bans a token; +5 forces one; out-of-range ids are ignored.
        let bias = Penalties { logit_bias: vec![(0, -100.0), (3, 5.0), (99, 1.0)], ..Default::default() };
        assert_eq!(greedy(bias, &[], 2), [3, 3]);
    }
}
