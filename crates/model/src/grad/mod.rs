//! Backward passes of the model's own modules, for training (llm.c style: the forward that training
//! runs saves what its backward needs; each backward returns the input gradient and adds parameter
//! gradients under the parameter's checkpoint name). The modules are the inference ones: there is
//! no second model definition.
//!
//! Training runs the naive MLA over whole sequences (no cache) in f32 with f32 master weights;
//! `Linear` GEMMs optionally in FP8 ([`fp8`]).

pub mod fp8;
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
}

impl Grads {
    /// The gradient buffer of `name` (`len` values, zeros when new).
    pub fn slot(&mut self, name: &str, len: usize) -> &mut [f32] {
        let g = self.map.entry(name.to_string()).or_insert_with(|| vec![0f32; len]);
        debug_assert_eq!(g.len(), len, "gradient {name} changed size");
        g
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
pub(crate) fn input_grad(w: &crate::weights::Matrix, dy: &[f32], m: usize) -> Vec<f32> {
    use dsv3_kernels::matmul::{matmul_nn, matmul_nn_f32};
    let mut dx = vec![0f32; m * w.cols];
    match w.view() {
        dsv3_kernels::MatRef::F32 { data, .. } => matmul_nn_f32(data, w.rows, w.cols, dy, m, &mut dx),
        v => matmul_nn(&v, 0..w.rows, dy, m, &mut dx),
    }
    dx
}

/// Adds `b` into `a` element-wise.
pub(crate) fn add_into(a: &mut [f32], b: &[f32]) {
    a.iter_mut().zip(b).for_each(|(a, b)| *a += b);
}
