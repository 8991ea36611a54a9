//! Rotary position embedding on the `qk_rope_head_dim` dims, with YaRN (spec §1 "RoPE / YaRN",
//! pitfalls 1–4), computed as transformers' `_compute_yarn_parameters` does.

use crate::config::{yarn_get_mscale, Config};

#[derive(Clone, Debug)]
pub struct Rope {
    /// `[dim/2]` inverse frequencies.
    pub inv_freq: Vec<f32>,
    /// cos/sin multiplier: `mscale(s, mscale)/mscale(s, mscale_all_dim)`, 1.0 for V3.
    pub attention_factor: f32,
    /// Checkpoint pairs are (2j, 2j+1) (DeepSeek); else (j, j+dim/2).
    pub interleave: bool,
}

impl Rope {
    pub fn new(cfg: &Config) -> Self {
        let dim = cfg.qk_rope_head_dim;
        let base = cfg.rope_theta;
        let half = dim / 2;
        let pos_freq: Vec<f64> = (0..half).map(|j| base.powf((2 * j) as f64 / dim as f64)).collect();
        let (inv_freq, attention_factor) = match &cfg.yarn {
            None => (pos_freq.iter().map(|p| (1.0 / p) as f32).collect(), 1.0),
            Some(y) => {
                let correction_dim = |rot: f64| {
                    dim as f64 * (y.original_max_position_embeddings as f64 / (rot * 2.0 * std::f64::consts::PI)).ln()
                        / (2.0 * base.ln())
                };
                let (mut low, mut high) = (correction_dim(y.beta_fast), correction_dim(y.beta_slow));
                if y.truncate {
                    low = low.floor();
                    high = high.ceil();
                }
                let low = low.max(0.0);
                let mut high = high.min(dim as f64 - 1.0);
                if low == high {
                    high += 0.001;
                }
                let inv = (0..half)
                    .map(|j| {
                        let ramp = ((j as f64 - low) / (high - low)).clamp(0.0, 1.0);
                        let extrapolation = 1.0 - ramp;
                        let (f_ex, f_in) = (1.0 / pos_freq[j], 1.0 / (y.factor * pos_freq[j]));
                        (f_in * (1.0 - extrapolation) + f_ex * extrapolation) as f32
                    })
                    .collect();
                let af = y.attention_factor.unwrap_or_else(|| {
                    if y.mscale != 0.0 && y.mscale_all_dim != 0.0 {
                        yarn_get_mscale(y.factor, y.mscale) / yarn_get_mscale(y.factor, y.mscale_all_dim)
                    } else {
                        yarn_get_mscale(y.factor, 1.0)
                    }
                });
                (inv, af as f32)
            }
        };
        Rope { inv_freq, attention_factor, interleave: cfg.rope_interleave }
    }

    /// Rotates one `[dim]` vector in place for absolute position `pos`.
    pub fn apply(&self, x: &mut [f32], pos: usize) {
        self.rotate(x, pos, 1.0);
    }

    /// The transpose of [`Self::apply`] (rotation by −θ, same attention factor): the backward of
    /// RoPE.
    pub fn apply_transpose(&self, x: &mut [f32], pos: usize) {
        self.rotate(x, pos, -1.0);
    }

    fn rotate(&self, x: &mut [f32], pos: usize, sign: f32) {
        let half = self.inv_freq.len();
        for (j, &f) in self.inv_freq.iter().enumerate() {
            // transformers computes the angle in f32.
            let angle = pos as f32 * f;
            let (s, c) = angle.sin_cos();
            let (c, s) = (c * self.attention_factor, sign * s * self.attention_factor);
            let (a, b) = if self.interleave { (2 * j, 2 * j + 1) } else { (j, j + half) };
            let (xa, xb) = (x[a], x[b]);
            x[a] = xa * c - xb * s;
            x[b] = xb * c + xa * s;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v3_yarn_frequencies_match_the_spec_check_values() {
        let cfg = Config::from_json(&serde_json::json!({
            "vocab_size": 10, "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1,
            "num_attention_heads": 1, "kv_lora_rank": 4, "qk_nope_head_dim": 4, "qk_rope_head_dim": 64,
            "v_head_dim": 4, "rope_theta": 10000,
            "rope_scaling": {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                              "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}
        }))
        .unwrap();
        let r = Rope::new(&cfg);
        for (j, want) in [(0, 1.0), (10, 0.0562341), (13, 0.0183781), (31, 3.3338e-6)] {
            assert!((r.inv_freq[j] - want).abs() <= 1e-6 * want.max(1e-3) * 10.0, "{j}: {}", r.inv_freq[j]);
        }
        assert_eq!(r.attention_factor, 1.0);
    }

    #[test]
    fn rotation_keeps_norm_and_relative_dot_products() {
        let cfg = Config::from_json(&serde_json::json!({
            "vocab_size": 10, "hidden_size": 8, "intermediate_size": 8, "num_hidden_layers": 1,
            "num_attention_heads": 1, "kv_lora_rank": 4, "qk_nope_head_dim": 4, "qk_rope_head_dim": 8, "v_head_dim": 4
        }))
        .unwrap();
        let r = Rope::new(&cfg);
        let q: Vec<f32> = (0..8).map(|i| (i as f32 * 0.7).sin()).collect();
        let k: Vec<f32> = (0..8).map(|i| (i as f32 * 1.3).cos()).collect();
        let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
        let rot = |v: &[f32], p| {
            let mut v = v.to_vec();
            r.apply(&mut v, p);
            v
        };
        assert!((dot(&rot(&q, 7), &rot(&k, 3)) - dot(&rot(&q, 14), &rot(&k, 10))).abs() < 1e-4);
        assert!((dot(&rot(&q, 5), &rot(&q, 5)) - dot(&q, &q)).abs() < 1e-4);
    }
}
