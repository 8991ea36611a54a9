//! How the model computes, as a value that every forward and backward receives: the kernel
//! choice, activation quantization, the FP8 training recipe and where routed experts run. No
//! process-wide switch or thread-local decides a result; a function's behaviour is in its
//! arguments.

use crate::experts::ExpertDispatch;
use crate::grad::fp8::Fp8Recipe;
use dsv3_kernels::quant::ScaleFmt;
use dsv3_kernels::Gemm;

#[derive(Clone, Copy)]
pub struct Exec<'a> {
    /// Many-token GEMMs and bf16 inputs (training), or the batch-invariant GEMV (inference).
    pub gemm: Gemm,
    /// Each `Linear`'s input rounded per token to E4M3 in 1×128 tiles (`--act-quant fp8`, the
    /// official `activation_scheme: dynamic`).
    pub act_quant_fp8: bool,
    /// How those activation scales are rounded (the checkpoint's `scale_fmt`; UE8M0 for V3.1).
    pub act_scale_fmt: ScaleFmt,
    /// V3.2's official indexer numerics (`--indexer-numerics official`): index queries and keys
    /// Hadamard-rotated and rounded to E4M3 per 128 with `act_scale_fmt` scales, the cache holding
    /// the FP8 keys. Off: transformers' f32 scores.
    pub indexer_fp8: bool,
    /// Every `Linear`'s Fprop, Dgrad and Wgrad in FP8 (report §3.3), for training.
    pub fp8: Option<Fp8Recipe>,
    /// Where each MoE layer's routed experts run: here, or on other processes.
    pub experts: &'a dyn ExpertDispatch,
    /// Sparse attention ignores the indexer's choice and attends densely (DSA's warm-up, where
    /// only the indexer trains, towards the dense attention).
    pub dense_attention: bool,
    /// Serving several LoRA adapters in one batch: the served adapter of each row the `Linear`s
    /// see (0: none; `k`: each `Linear`'s `served[k - 1]`).
    pub adapters: Option<&'a [u16]>,
}

impl std::fmt::Debug for Exec<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.debug_struct("Exec")
            .field("gemm", &self.gemm)
            .field("act_quant_fp8", &self.act_quant_fp8)
            .field("act_scale_fmt", &self.act_scale_fmt)
            .field("indexer_fp8", &self.indexer_fp8)
            .field("fp8", &self.fp8)
            .field("dense_attention", &self.dense_attention)
            .finish_non_exhaustive()
    }
}

/// The numerics of inference: what the loaded model was asked for (`--act-quant`,
/// `--indexer-numerics`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Inference {
    pub act_quant_fp8: bool,
    pub indexer_fp8: bool,
}

/// The numerics of training: bf16 compute (f32 masters) and the FP8 recipe.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Training {
    /// The blocked GEMM's inputs rounded to bf16 where the CPU has AVX512-BF16.
    pub bf16: bool,
    pub fp8: Option<Fp8Recipe>,
    /// DSA's dense warm-up (V3.2): attention dense, the indexer trained towards it.
    pub dsa_warmup: bool,
}

impl<'a> Exec<'a> {
    pub fn inference(n: Inference, experts: &'a dyn ExpertDispatch) -> Self {
        Exec {
            gemm: Gemm::BATCH_INVARIANT,
            act_quant_fp8: n.act_quant_fp8,
            act_scale_fmt: ScaleFmt::F32,
            indexer_fp8: n.indexer_fp8,
            fp8: None,
            experts,
            dense_attention: false,
            adapters: None,
        }
    }

    /// Training: every product over many tokens on the blocked GEMM.
    pub fn training(n: Training, experts: &'a dyn ExpertDispatch) -> Self {
        let gemm = Gemm { many_token: true, bf16: n.bf16 };
        let act_scale_fmt = ScaleFmt::F32;
        let dense_attention = n.dsa_warmup;
        let indexer_fp8 = false;
        Exec {
            gemm,
            act_quant_fp8: false,
            act_scale_fmt,
            indexer_fp8,
            fp8: n.fp8,
            experts,
            dense_attention,
            adapters: None,
        }
    }
}
