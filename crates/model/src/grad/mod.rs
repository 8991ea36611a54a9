//! Backward passes of the model's own modules, for training (llm.c style: the forward that training
//! runs saves what its backward needs; each backward returns the input gradient and adds parameter
//! gradients under the parameter's checkpoint name). The modules are the inference ones: there is
//! no second model definition.
//!
//! Training runs the naive MLA over whole sequences (no cache) in f32 with f32 master weights;
//! `Linear` GEMMs optionally in FP8 ([`fp8`]).

pub mod exchange;
pub mod fp8;
pub mod indexer;
pub mod layers;
pub mod mla;
pub mod model;
pub mod moe;
pub mod params;

use std::collections::BTreeMap;

/// Parameter gradients by checkpoint name, flattened in the parameter's layout.
#[derive(Clone, Debug, Default)]
pub struct Grads {
    pub map: BTreeMap<String, Vec<f32>>,
    /// Weight gradients kept for later ([`Grads::defer_weight_grads`]).
    deferred: Option<Vec<WeightGrad>>,
    /// The parameters whose gradients are computed (`None`: all). The rest are frozen: their
    /// gradient GEMMs never run and no buffer is allocated for them (LoRA on a large base).
    trainable: Option<fn(&str) -> bool>,
}

/// A weight gradient `dW += dyᵀ·x` (`dy [m, out]`, `x [m, in]`) kept for later: zero-bubble
/// pipeline schedules split a backward into `b`, the input gradient the previous stage waits
/// for, and `W`, the weight gradients, which fill a bubble.
#[derive(Clone, Debug)]
pub struct WeightGrad {
    name: String,
    dy: Vec<f32>,
    x: Vec<f32>,
    m: usize,
    out: usize,
    inp: usize,
    fp8: Option<fp8::Fp8Recipe>,
    bf16: bool,
}

impl Grads {
    /// Gradients of the parameters `trainable` accepts only.
    pub fn only(trainable: fn(&str) -> bool) -> Self {
        Grads { trainable: Some(trainable), ..Default::default() }
    }

    /// Whether `name`'s gradient is computed.
    pub fn wants(&self, name: &str) -> bool {
        self.trainable.is_none_or(|f| f(name))
    }

    /// The gradient buffer of `name` (`len` values, zeros when new).
    pub fn slot(&mut self, name: &str, len: usize) -> &mut [f32] {
        let g = self.map.entry(name.to_string()).or_insert_with(|| vec![0f32; len]);
        debug_assert_eq!(g.len(), len, "gradient {name} changed size");
        g
    }

    /// `name`'s gradient `+= dyᵀ·x` (Wgrad in FP8 under a recipe, with `cx`'s bf16 setting
    /// otherwise), now or, while deferring, later.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn weight_grad(
        &mut self,
        cx: &crate::exec::Exec,
        name: String,
        dy: &[f32],
        x: &[f32],
        m: usize,
        out: usize,
        inp: usize,
        fp8: Option<fp8::Fp8Recipe>,
    ) {
        if !self.wants(&name) {
            return;
        }
        let bf16 = cx.gemm.bf16;
        match &mut self.deferred {
            Some(q) => q.push(WeightGrad { name, dy: dy.to_vec(), x: x.to_vec(), m, out, inp, fp8, bf16 }),
            None => {
                let dw = self.slot(&name, out * inp);
                match fp8 {
                    Some(r) => fp8::wgrad(r, dy, x, m, out, inp, dw),
                    None => dsv3_kernels::matmul::matmul_tn_acc(dy, x, m, out, inp, dw, bf16),
                }
            }
        }
    }

    /// From now on weight gradients are kept, not computed, until [`Grads::take_deferred`].
    pub fn defer_weight_grads(&mut self) {
        self.deferred.get_or_insert_with(Vec::new);
    }

    /// The weight gradients kept since [`Grads::defer_weight_grads`]; computing them resumes.
    pub fn take_deferred(&mut self) -> Vec<WeightGrad> {
        self.deferred.take().unwrap_or_default()
    }

    /// Computes kept weight gradients (a pipeline's `W`).
    pub fn apply(&mut self, jobs: Vec<WeightGrad>) {
        for j in jobs {
            let dw = self.slot(&j.name, j.out * j.inp);
            match j.fp8 {
                Some(r) => fp8::wgrad(r, &j.dy, &j.x, j.m, j.out, j.inp, dw),
                None => dsv3_kernels::matmul::matmul_tn_acc(&j.dy, &j.x, j.m, j.out, j.inp, dw, j.bf16),
            }
        }
    }

    pub fn get(&self, name: &str) -> Option<&[f32]> {
        self.map.get(name).map(|v| v.as_slice())
    }

    pub fn zero(&mut self) {
        self.map.values_mut().for_each(|g| g.fill(0.0));
    }

    /// √Σg² over every parameter, in f64.
    pub fn global_norm(&self) -> f64 {
        self.map.values().flat_map(|g| g.iter()).map(|&v| v as f64 * v as f64).sum::<f64>().sqrt()
    }

    pub fn scale(&mut self, s: f32) {
        self.map.values_mut().for_each(|g| g.iter_mut().for_each(|v| *v *= s));
    }
}

/// `dx = dy·W` for `y = x·Wᵀ` (`dy [m, rows]` → `[m, cols]`): through `Wᵀ` and the GEMV kernel
/// for f32 masters, the strided form otherwise.
pub(crate) fn input_grad(cx: &crate::exec::Exec, w: &crate::weights::Matrix, dy: &[f32], m: usize) -> Vec<f32> {
    use dsv3_kernels::matmul::{matmul_nn, matmul_nn_f32};
    let mut dx = vec![0f32; m * w.cols];
    match w.view() {
        dsv3_kernels::MatRef::F32 { data, .. } => matmul_nn_f32(data, w.rows, w.cols, dy, m, &mut dx, cx.gemm.bf16),
        v => matmul_nn(&v, 0..w.rows, dy, m, &mut dx),
    }
    dx
}

/// Adds `b` into `a` element-wise.
pub(crate) fn add_into(a: &mut [f32], b: &[f32]) {
    a.iter_mut().zip(b).for_each(|(a, b)| *a += b);
}
