//! Next-token choice from logits: greedy, temperature, top-k, top-p, seeded.

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
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams { temperature: 0.0, top_p: 1.0, top_k: 0, seed: 0 }
    }
}

pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Self {
        let rng = StdRng::seed_from_u64(params.seed);
        Sampler { params, rng }
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
        let mut s = Sampler::new(SamplingParams { temperature: 1.0, top_p: 0.1, top_k: 0, seed: 1 });
        assert!((0..50).all(|_| s.sample(&logits) == 1));
        // top_k 2 never draws tokens 0 or 3.
        let mut s = Sampler::new(SamplingParams { temperature: 5.0, top_p: 1.0, top_k: 2, seed: 1 });
        assert!((0..200).all(|_| matches!(s.sample(&logits), 1 | 2)));
        // Same seed, same draws.
        let run = |seed| {
            let mut s = Sampler::new(SamplingParams { temperature: 1.0, top_p: 1.0, top_k: 0, seed });
            (0..20).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(run(3), run(3));
        let lp: f32 = (0..4).map(|i| log_prob(&logits, i).exp()).sum();
        assert!((lp - 1.0).abs() < 1e-6);
    }
}
