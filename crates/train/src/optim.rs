//! AdamW (decoupled weight decay) or plain SGD over the model's parameters by name, a linear
//! warm-up then cosine decay, and global-norm gradient clipping. Defaults are the report's
//! (β 0.9/0.95, weight decay 0.1, clip 1.0). Moments are kept in f32 (the report keeps them in
//! bf16 to save memory at scale; at this size f32 costs little and keeps resume exact).

use dsv3_model::grad::params::{Param, ParamsMut};
use dsv3_model::grad::Grads;
use rayon::prelude::*;
use std::collections::BTreeMap;

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    Adamw,
    Sgd,
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct OptimConfig {
    pub kind: OptimizerKind,
    pub lr: f32,
    /// The cosine decays to `lr · min_lr_ratio`.
    pub min_lr_ratio: f32,
    pub warmup_steps: u64,
    pub total_steps: u64,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    /// Applied to matrices (2-D parameters), not to norm weights.
    pub weight_decay: f32,
    /// Global gradient-norm clip (0 disables).
    pub clip: f32,
}

impl OptimConfig {
    /// Learning rate of (1-based) step `step`.
    pub fn lr_at(&self, step: u64) -> f32 {
        if step <= self.warmup_steps && self.warmup_steps > 0 {
            return self.lr * step as f32 / self.warmup_steps as f32;
        }
        let decay = self.total_steps.saturating_sub(self.warmup_steps).max(1);
        let progress = ((step - self.warmup_steps.min(step)) as f32 / decay as f32).min(1.0);
        let min = self.lr * self.min_lr_ratio;
        min + (self.lr - min) * 0.5 * (1.0 + (std::f32::consts::PI * progress).cos())
    }
}

/// A parameter's first and second moments, borrowed for one update.
type Moments<'a> = (&'a mut Vec<f32>, &'a mut Vec<f32>);

/// Optimizer state: the step count and the moments by parameter name.
#[derive(Clone, Debug, Default)]
pub struct Optimizer {
    pub step: u64,
    pub m: BTreeMap<String, Vec<f32>>,
    pub v: BTreeMap<String, Vec<f32>>,
}

/// What one update did.
#[derive(Clone, Copy, Debug, Default)]
pub struct UpdateInfo {
    pub lr: f32,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
}

impl Optimizer {
    /// Clips `grads` by their global norm `grad_norm` (all of the model's gradients, also those
    /// other processes hold), then updates every parameter (one without a gradient entry had
    /// gradient 0).
    pub fn update(&mut self, cfg: &OptimConfig, params: ParamsMut, grads: &mut Grads, grad_norm: f64) -> UpdateInfo {
        // On a pool thread: the parallel loop below then forks instead of being injected.
        dsv3_model::model::in_pool(|| self.update_on_pool(cfg, params, grads, grad_norm))
    }

    fn update_on_pool(
        &mut self,
        cfg: &OptimConfig,
        params: ParamsMut,
        grads: &mut Grads,
        grad_norm: f64,
    ) -> UpdateInfo {
        self.step += 1;
        let lr = cfg.lr_at(self.step);
        if cfg.clip > 0.0 && grad_norm > cfg.clip as f64 {
            grads.scale((cfg.clip as f64 / (grad_norm + 1e-6)) as f32);
        }
        let t = self.step as i32;
        let (bc1, bc2) = (1.0 - cfg.beta1.powi(t), 1.0 - cfg.beta2.powi(t));
        // Moments are created up front so the update below can run the parameters in parallel.
        if cfg.kind == OptimizerKind::Adamw {
            for p in &params {
                self.m.entry(p.name.clone()).or_insert_with(|| vec![0f32; p.data.len()]);
                self.v.entry(p.name.clone()).or_insert_with(|| vec![0f32; p.data.len()]);
            }
        }
        let grads = &*grads;
        let mut jobs: Vec<(Param, Option<Moments>)> = vec![];
        let mut ms: BTreeMap<&String, &mut Vec<f32>> = self.m.iter_mut().collect();
        let mut vs: BTreeMap<&String, &mut Vec<f32>> = self.v.iter_mut().collect();
        for p in params {
            let mv = match cfg.kind {
                OptimizerKind::Adamw => {
                    Some((ms.remove(&p.name).expect("moment"), vs.remove(&p.name).expect("moment")))
                }
                OptimizerKind::Sgd => None,
            };
            jobs.push((p, mv));
        }
        jobs.into_par_iter().for_each(|(p, mv)| {
            let g = grads.get(&p.name);
            let decay = if p.shape.len() >= 2 { cfg.weight_decay } else { 0.0 };
            match mv {
                None => {
                    if let Some(g) = g {
                        p.data.iter_mut().zip(g).for_each(|(w, g)| *w -= lr * g);
                    }
                }
                Some((m, v)) => {
                    for i in 0..p.data.len() {
                        let gi = g.map_or(0.0, |g| g[i]);
                        m[i] = cfg.beta1 * m[i] + (1.0 - cfg.beta1) * gi;
                        v[i] = cfg.beta2 * v[i] + (1.0 - cfg.beta2) * gi * gi;
                        let upd = (m[i] / bc1) / ((v[i] / bc2).sqrt() + cfg.eps);
                        p.data[i] -= lr * (upd + decay * p.data[i]);
                    }
                }
            }
        });
        UpdateInfo { lr, grad_norm }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine() {
        let c = OptimConfig {
            kind: OptimizerKind::Adamw,
            lr: 1e-3,
            min_lr_ratio: 0.1,
            warmup_steps: 10,
            total_steps: 110,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
            clip: 1.0,
        };
        assert!((c.lr_at(5) - 5e-4).abs() < 1e-9);
        assert!((c.lr_at(10) - 1e-3).abs() < 1e-9);
        assert!((c.lr_at(60) - 5.5e-4).abs() < 1e-7, "{}", c.lr_at(60));
        assert!((c.lr_at(110) - 1e-4).abs() < 1e-9);
        assert!((c.lr_at(500) - 1e-4).abs() < 1e-9);
    }
}
