//! The small building blocks: `Linear` over a stored matrix, `RmsNorm`, and the SwiGLU `Mlp`
//! (dense FFN, routed expert and shared expert alike).

use crate::error::Result;
use crate::weights::{Checkpoint, Matrix};
use dsv3_kernels::matmul::matmul_nt;

/// `y = x·Wᵀ`, no bias (DeepSeek-V3 has none). The weight stays in its stored format.
#[derive(Clone)]
pub struct Linear {
    pub weight: Matrix,
}

impl Linear {
    pub fn load(ck: &Checkpoint, prefix: &str, out_dim: usize, in_dim: usize, block: [usize; 2]) -> Result<Self> {
        Ok(Linear { weight: ck.matrix(&format!("{prefix}.weight"), out_dim, in_dim, block)? })
    }

    pub fn out_dim(&self) -> usize {
        self.weight.rows
    }

    /// `x [m, in]` → `[m, out]`.
    pub fn forward(&self, x: &[f32], m: usize) -> Vec<f32> {
        let mut y = vec![0f32; m * self.weight.rows];
        matmul_nt(&self.weight.view(), 0..self.weight.rows, x, m, &mut y);
        y
    }
}

/// `y = w ⊙ x / sqrt(mean(x²) + eps)` per row, in f32.
#[derive(Clone)]
pub struct RmsNorm {
    pub weight: Vec<f32>,
    pub eps: f32,
}

impl RmsNorm {
    pub fn load(ck: &Checkpoint, name: &str, dim: usize, eps: f32) -> Result<Self> {
        Ok(RmsNorm { weight: ck.f32s(&format!("{name}.weight"), &[dim])?, eps })
    }

    pub fn forward(&self, x: &[f32]) -> Vec<f32> {
        let mut y = x.to_vec();
        self.forward_in_place(&mut y);
        y
    }

    pub fn forward_in_place(&self, x: &mut [f32]) {
        let d = self.weight.len();
        for row in x.chunks_exact_mut(d) {
            let ms = row.iter().map(|v| v * v).sum::<f32>() / d as f32;
            let r = 1.0 / (ms + self.eps).sqrt();
            row.iter_mut().zip(&self.weight).for_each(|(v, w)| *v = w * (*v * r));
        }
    }
}

/// SwiGLU FFN: `down(silu(gate(x)) ⊙ up(x))`.
#[derive(Clone)]
pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

impl Mlp {
    pub fn load(ck: &Checkpoint, prefix: &str, hidden: usize, inter: usize, block: [usize; 2]) -> Result<Self> {
        Ok(Mlp {
            gate_proj: Linear::load(ck, &format!("{prefix}.gate_proj"), inter, hidden, block)?,
            up_proj: Linear::load(ck, &format!("{prefix}.up_proj"), inter, hidden, block)?,
            down_proj: Linear::load(ck, &format!("{prefix}.down_proj"), hidden, inter, block)?,
        })
    }

    /// `x [m, hidden]` → `[m, hidden]`.
    pub fn forward(&self, x: &[f32], m: usize) -> Vec<f32> {
        let mut g = self.gate_proj.forward(x, m);
        let u = self.up_proj.forward(x, m);
        g.iter_mut().zip(&u).for_each(|(g, u)| *g = silu(*g) * u);
        self.down_proj.forward(&g, m)
    }

    /// Weight bytes one token reads.
    pub fn bytes(&self) -> usize {
        [&self.gate_proj, &self.up_proj, &self.down_proj].iter().map(|l| l.weight.view().bytes()).sum()
    }
}

#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}
