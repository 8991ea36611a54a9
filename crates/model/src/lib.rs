//! The DeepSeek-V3 model: config, checkpoint loading, the one forward (MLA, DeepSeekMoE, MTP,
//! YaRN), the latent KV cache, tokenizer and chat template, sampling and generation.
//!
//! Not here: HTTP, MPI, optimizers. Hot loops live in `dsv3-kernels`; this crate arranges them.
//! Activations are f32 `Vec`s laid out `[tokens, features]`; weights stay in their stored format.

pub mod chat;
pub mod config;
pub mod convert;
pub mod dsml;
pub mod error;
pub mod exec;
pub mod expert_service;
pub mod experts;
pub mod files;
pub mod generate;
pub mod gguf;
pub mod grad;
pub mod indexer;
pub mod init;
pub mod layers;
pub mod lora;
pub mod mla;
pub mod model;
pub mod moe;
pub mod paged;
pub mod rope;
pub mod sampling;
pub mod sft;
pub mod speculative;
pub mod tokenizer;
pub mod weights;

pub use config::Config;
pub use error::{ModelError, Result};
pub use exec::Exec;
pub use mla::AttnImpl;
pub use model::{DeepseekV3, KvCache};
pub use tokenizer::Tokenizer;
