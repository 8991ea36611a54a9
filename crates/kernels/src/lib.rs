//! Hot CPU loops of dsv3 on plain slices.
//!
//! What lives here: number codecs (bf16, f16, FP8 E4M3), GEMMs whose weight operand stays in its
//! stored format (f32, bf16 or FP8 with 128×128 block scales, decoded in registers, never a whole
//! matrix at once), and the absorbed-MLA attention over the latent cache. Each kernel has a plain
//! scalar reference beside it and a test that compares the two on random inputs.
//!
//! What does not: tensors, model types, configs. Callers pass slices and shapes.

pub mod attention;
pub mod codec;
pub mod dot;
pub mod formats;
pub mod fp8_gemm;
pub mod gemm;
pub mod gemv;
pub mod matmul;
pub mod matrix;
pub mod quant;

pub use matrix::{MatRef, WeightFormat};
