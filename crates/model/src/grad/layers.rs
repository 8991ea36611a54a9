//! Gradients of `Linear`, `RmsNorm`, the SwiGLU `Mlp`, the embedding and the softmax cross-entropy.

use super::{add_into, Grads};
use crate::exec::Exec;
use crate::layers::{Linear, Mlp, RmsNorm};
use crate::weights::Matrix;

impl Linear {
    /// For `y = x·Wᵀ` with `x [m, in]` and `dy [m, out]`: adds `dyᵀ·x` to `{name}.weight`'s
    /// gradient and returns `dx = dy·W`.
    /// With an adapter, `A` and `B` get theirs under `{name}.lora_A.weight` / `lora_B.weight`.
    pub fn backward(&self, cx: &Exec, name: &str, x: &[f32], dy: &[f32], m: usize, g: &mut Grads) -> Vec<f32> {
        let (out, inp) = (self.weight.rows, self.weight.cols);
        g.weight_grad(cx, format!("{name}.weight"), dy, x, m, out, inp, cx.fp8);
        let mut dx = match cx.fp8 {
            Some(r) => super::fp8::dgrad(r, &self.weight, dy, m),
            None => super::input_grad(cx, &self.weight, dy, m),
        };
        if let Some(l) = &self.lora {
            // y += s·(x·Aᵀ)·Bᵀ: dB = s·dyᵀ·(x·Aᵀ), d(x·Aᵀ) = s·dy·B, dA = d(x·Aᵀ)ᵀ·x, dx += d(x·Aᵀ)·A.
            let r = l.rank();
            let mut xa = vec![0f32; m * r];
            dsv3_kernels::matmul::matmul_nt(&l.a.view(), 0..r, x, m, &mut xa, cx.gemm);
            let dys: Vec<f32> = dy.iter().map(|v| v * l.scale).collect();
            g.weight_grad(cx, format!("{name}.lora_B.weight"), &dys, &xa, m, out, r, None);
            let dxa = super::input_grad(cx, &l.b, &dys, m);
            g.weight_grad(cx, format!("{name}.lora_A.weight"), &dxa, x, m, r, inp, None);
            add_into(&mut dx, &super::input_grad(cx, &l.a, &dxa, m));
        }
        dx
    }
}

impl RmsNorm {
    /// For `y = w ⊙ x·r`, `r = (mean(x²) + eps)^-½`, rows of `x`: adds to `{name}.weight`'s gradient
    /// and returns `dx = r·(w⊙dy) − x·r³·Σ(w⊙dy⊙x)/d`.
    pub fn backward(&self, name: &str, x: &[f32], dy: &[f32], g: &mut Grads) -> Vec<f32> {
        let (d, name) = (self.weight.len(), format!("{name}.weight"));
        let mut dw = g.wants(&name).then(|| g.slot(&name, d));
        let mut dx = vec![0f32; x.len()];
        for ((xr, dyr), dxr) in x.chunks_exact(d).zip(dy.chunks_exact(d)).zip(dx.chunks_exact_mut(d)) {
            let ms = xr.iter().map(|v| v * v).sum::<f32>() / d as f32;
            let r = 1.0 / (ms + self.eps).sqrt();
            let mut dot = 0f32;
            for j in 0..d {
                dot += self.weight[j] * dyr[j] * xr[j];
            }
            if let Some(dw) = dw.as_deref_mut() {
                dw.iter_mut().zip(dyr.iter().zip(xr)).for_each(|(w, (dy, x))| *w += dy * x * r);
            }
            let c = r * r * r * dot / d as f32;
            for j in 0..d {
                dxr[j] = r * self.weight[j] * dyr[j] - xr[j] * c;
            }
        }
        dx
    }
}

/// What [`Mlp::backward`] needs from the forward.
pub struct MlpSaved {
    pub(crate) x: Vec<f32>,
    pub(crate) gate: Vec<f32>,
    pub(crate) up: Vec<f32>,
    pub(crate) hidden: Vec<f32>,
    pub(crate) m: usize,
}

impl Mlp {
    /// Parameter gradients under `{name}.{gate,up,down}_proj.weight`; returns `dx`.
    pub fn backward(&self, cx: &Exec, name: &str, s: &MlpSaved, dy: &[f32], g: &mut Grads) -> Vec<f32> {
        let dh = self.down_proj.backward(cx, &format!("{name}.down_proj"), &s.hidden, dy, s.m, g);
        let mut dgate = vec![0f32; dh.len()];
        let mut dup = vec![0f32; dh.len()];
        for i in 0..dh.len() {
            let z = s.gate[i];
            let sig = 1.0 / (1.0 + (-z).exp());
            dup[i] = dh[i] * z * sig;
            dgate[i] = dh[i] * s.up[i] * sig * (1.0 + z * (1.0 - sig));
        }
        let mut dx = self.gate_proj.backward(cx, &format!("{name}.gate_proj"), &s.x, &dgate, s.m, g);
        add_into(&mut dx, &self.up_proj.backward(cx, &format!("{name}.up_proj"), &s.x, &dup, s.m, g));
        dx
    }
}

/// Adds the rows of `dy [t, D]` into the embedding gradient rows of `tokens`.
pub fn embedding_backward(name: &str, table: &Matrix, tokens: &[u32], dy: &[f32], g: &mut Grads) {
    let (d, name) = (table.cols, format!("{name}.weight"));
    if !g.wants(&name) {
        return;
    }
    let dw = g.slot(&name, table.rows * d);
    for (&tok, row) in tokens.iter().zip(dy.chunks_exact(d)) {
        add_into(&mut dw[tok as usize * d..(tok as usize + 1) * d], row);
    }
}

/// `log softmax(logits)[label]` of each row (`logits [n, v]`).
pub fn label_log_probs(logits: &[f32], labels: &[u32]) -> Vec<f32> {
    use rayon::prelude::*;
    let v = logits.len() / labels.len().max(1);
    logits
        .par_chunks(v.max(1))
        .zip(labels.par_iter())
        .map(|(row, &y)| {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let z: f64 = row.iter().map(|&l| ((l - max).exp()) as f64).sum();
            ((row[y as usize] - max) as f64 - z.ln()) as f32
        })
        .collect()
}

/// The logits' gradient of a loss whose gradient towards each row's `log π(label)` is
/// `d_logp`: `d_logp · (onehot(label) − softmax)` per row.
pub fn log_prob_backward(logits: &[f32], labels: &[u32], d_logp: &[f32]) -> Vec<f32> {
    use rayon::prelude::*;
    let v = logits.len() / labels.len().max(1);
    let mut dl = vec![0f32; logits.len()];
    dl.par_chunks_mut(v.max(1)).enumerate().for_each(|(i, d)| {
        let c = d_logp[i];
        if c == 0.0 {
            return;
        }
        let row = &logits[i * v..(i + 1) * v];
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut z = 0f64;
        for (d, &l) in d.iter_mut().zip(row) {
            let e = (l - max).exp();
            *d = e;
            z += e as f64;
        }
        let inv = -(1.0 / z) as f32 * c;
        d.iter_mut().for_each(|x| *x *= inv);
        d[labels[i] as usize] += c;
    });
    dl
}

/// Mean cross-entropy of `logits [t, V]` against `labels` over the positions where `mask` is set,
/// and its gradient `(softmax − onehot)·scale / count` (zero at masked positions). Rows in
/// parallel; each row's normalizer is summed in f64.
pub fn cross_entropy(logits: &[f32], labels: &[u32], mask: &[bool], scale: f32) -> (f64, Vec<f32>) {
    use rayon::prelude::*;
    let t = labels.len();
    let v = logits.len() / t.max(1);
    let count = mask.iter().filter(|&&m| m).count().max(1);
    let c = scale / count as f32;
    let mut dl = vec![0f32; logits.len()];
    // Per-row losses are collected in order and summed serially: a parallel sum's order depends
    // on work stealing, and resume must reproduce the loss bit for bit.
    let losses: Vec<f64> = dl
        .par_chunks_mut(v.max(1))
        .enumerate()
        .map(|(i, d)| {
            if !mask[i] {
                return 0.0;
            }
            let row = &logits[i * v..(i + 1) * v];
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut z = 0f64;
            for (d, &l) in d.iter_mut().zip(row) {
                let e = (l - max).exp();
                *d = e;
                z += e as f64;
            }
            let inv = (1.0 / z) as f32 * c;
            d.iter_mut().for_each(|x| *x *= inv);
            let y = labels[i] as usize;
            d[y] -= c;
            z.ln() - (row[y] - max) as f64
        })
        .collect();
    let loss: f64 = losses.iter().sum();
    (loss / count as f64, dl)
}
