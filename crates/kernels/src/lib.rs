//! Hot CPU loops of dsv3 on plain slices.
//!
//! What lives here: number formats (bf16, f16, FP8 E4M3/E5M2, FP4 E2M1, UE8M0) and block
//! quantizers (1×128 / 128×128 FP8, MXFP4, NVFP4), GEMMs whose weight operand stays in its stored
//! format (f32, bf16, FP8 with 128×128 block scales, FP4; decoded in registers, never a whole
//! matrix at once), the FP8×FP8 block-scaled GEMM with promotion every 128 products of training,
//! the FP4×FP4 product-table GEMV, and the absorbed-MLA attention over the latent cache. Each
//! kernel has a plain scalar reference beside it and a test that compares the two on random inputs.
//!
//! What does not: tensors, model types, configs. Callers pass slices and shapes.

pub mod attention;
pub mod codec;
pub mod dot;
pub mod formats;
pub mod fp4_lut;
pub mod fp8_gemm;
pub mod gemm;
pub mod gemv;
pub mod ggml;
pub mod matmul;
pub mod matrix;
pub mod quant;

pub use ggml::GgmlType;
pub use matmul::Gemm;
pub use matrix::{MatRef, WeightFormat};
