//! The cost of a training run: parameters and FLOPs per token from the model shape (attention
//! included), GPU-hours and dollars at a utilization, memory per device for a PP × EP × ZeRO-1 DP
//! layout, and the pipeline bubble of each schedule from the simulator.
//!
//! FLOPs per token = 6 × the matrix parameters a token passes through (router and output head
//! included, the input embedding is a lookup) + 6 × the attention score and value products
//! (`2·H·(dq + dv)` per attended position, `(S+1)/2` positions on average under the causal mask),
//! for the main model and each MTP module.

/// The numbers of a DeepSeek-V3-style config that cost depends on.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelShape {
    pub hidden: usize,
    pub layers: usize,
    /// Decoder layers before the first MoE layer (`first_k_dense_replace`).
    pub dense_layers: usize,
    /// Every this-many-th layer from `dense_layers` on is MoE (`moe_layer_freq`, 1 for V3).
    pub moe_layer_freq: usize,
    pub vocab: usize,
    pub heads: usize,
    pub q_lora_rank: Option<usize>,
    pub kv_lora_rank: usize,
    pub qk_nope: usize,
    pub qk_rope: usize,
    pub v_head: usize,
    pub intermediate: usize,
    pub moe_intermediate: usize,
    pub routed_experts: usize,
    pub shared_experts: usize,
    pub experts_per_token: usize,
    pub mtp_layers: usize,
}

/// A token's forward multiply-adds by part (training FLOPs are 6× their sum).
#[derive(Clone, Debug, PartialEq)]
pub struct Macs {
    /// Each decoder layer (attention and its FFN).
    pub layers: Vec<f64>,
    /// The output head.
    pub head: f64,
    /// Each MTP module (its projection, block and head).
    pub mtp: Vec<f64>,
}

/// Parameter counts.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Params {
    /// Everything (main model + MTP modules; the MTP modules share the embedding and head).
    pub total: f64,
    /// The main model alone.
    pub main: f64,
    /// Routed experts (main + MTP): what expert parallelism splits.
    pub routed: f64,
    /// Matrix parameters one token of the main model passes through (head included, input
    /// embedding not).
    pub active_main: f64,
    /// The same for the MTP modules (their own head product included).
    pub active_mtp: f64,
}

impl ModelShape {
    fn attention(&self) -> f64 {
        let (d, h, c, r) = (self.hidden as f64, self.heads as f64, self.kv_lora_rank as f64, self.qk_rope as f64);
        let dq = (self.qk_nope + self.qk_rope) as f64;
        let q = match self.q_lora_rank {
            Some(rq) => d * rq as f64 + rq as f64 + rq as f64 * h * dq,
            None => d * h * dq,
        };
        q + d * (c + r) + c + c * h * (self.qk_nope + self.v_head) as f64 + h * self.v_head as f64 * d
    }

    fn expert(&self) -> f64 {
        3.0 * self.hidden as f64 * self.moe_intermediate as f64
    }

    /// Whether decoder layer `l` (MTP blocks numbered after the main layers) has a MoE FFN.
    pub fn is_moe(&self, l: usize) -> bool {
        self.routed_experts > 0 && l >= self.dense_layers && l.is_multiple_of(self.moe_layer_freq.max(1))
    }

    /// How many of layers `0..n` have a MoE FFN, counted without visiting them.
    pub fn moe_count(&self, n: usize) -> usize {
        let (lo, f) = (self.dense_layers, self.moe_layer_freq.max(1));
        if self.routed_experts == 0 || lo >= n {
            return 0;
        }
        n.div_ceil(f) - lo.div_ceil(f)
    }

    pub fn params(&self) -> Params {
        let d = self.hidden as f64;
        let (attn, expert, e) = (self.attention(), self.expert(), self.routed_experts as f64);
        let norms = 2.0 * d;
        let dense = attn + 3.0 * d * self.intermediate as f64 + norms;
        let gate = e * d + e;
        let moe = attn + (e + self.shared_experts as f64) * expert + gate + norms;
        let moe_layers = self.moe_count(self.layers) as f64;
        let dense_layers = self.layers as f64 - moe_layers;
        let embed = self.vocab as f64 * d;
        let main = 2.0 * embed + dense_layers * dense + moe_layers * moe + d;
        // An MTP module: two norms, eh_proj [D, 2D], one MoE block, the head's norm.
        let mtp_one = 3.0 * d + 2.0 * d * d + moe;
        let mtp = self.mtp_layers as f64 * mtp_one;
        let active_layer = |routed: f64| attn + (routed + self.shared_experts as f64) * expert + e * d;
        let k = self.experts_per_token as f64;
        let active_main =
            dense_layers * (attn + 3.0 * d * self.intermediate as f64) + moe_layers * active_layer(k) + embed;
        let active_mtp = self.mtp_layers as f64 * (2.0 * d * d + active_layer(k) + embed);
        Params {
            total: main + mtp,
            main,
            routed: (moe_layers + self.mtp_layers as f64) * e * expert,
            active_main,
            active_mtp,
        }
    }

    /// A token's forward multiply-adds by part: every linear it passes (top-k experts, not all),
    /// causal attention at the mean context `(seq + 1)/2`, the head, and each MTP module.
    pub fn macs_per_token(&self, seq: usize) -> Macs {
        let (d, h) = (self.hidden as f64, self.heads as f64);
        let (dn, dr, dv, kv) = (self.qk_nope as f64, self.qk_rope as f64, self.v_head as f64, self.kv_lora_rank as f64);
        let q = match self.q_lora_rank {
            Some(r) => d * r as f64 + r as f64 * h * (dn + dr),
            None => d * h * (dn + dr),
        };
        let attn = q + d * (kv + dr) + kv * h * (dn + dv) + h * dv * d + (seq as f64 + 1.0) / 2.0 * h * (dn + dr + dv);
        let ffn = |l: usize| {
            if self.is_moe(l) {
                let e = self.moe_intermediate as f64;
                let experts = (self.experts_per_token + self.shared_experts) as f64;
                d * self.routed_experts as f64 + 3.0 * d * e * experts
            } else {
                3.0 * d * self.intermediate as f64
            }
        };
        let head = d * self.vocab as f64;
        let layers = (0..self.layers).map(|l| attn + ffn(l)).collect();
        let mtp = (0..self.mtp_layers).map(|j| 2.0 * d * d + attn + ffn(self.layers + j) + head).collect();
        Macs { layers, head, mtp }
    }

    /// Training FLOPs per token at sequence length `seq`: forward + backward = 3 × 2 × the
    /// forward's multiply-adds ([`ModelShape::macs_per_token`]). The figure MFU is quoted against.
    pub fn train_flops_per_token(&self, seq: usize) -> f64 {
        let m = self.macs_per_token(seq);
        6.0 * (m.layers.iter().sum::<f64>() + m.head + m.mtp.iter().sum::<f64>())
    }
}

/// A GPU's dense peak throughput.
#[derive(Clone, Copy, Debug)]
pub struct Gpu {
    pub name: &'static str,
    pub bf16_tflops: f64,
    pub fp8_tflops: f64,
    pub memory_gb: f64,
}

pub const GPUS: [Gpu; 4] = [
    Gpu { name: "h800", bf16_tflops: 989.4, fp8_tflops: 1978.9, memory_gb: 80.0 },
    Gpu { name: "h100", bf16_tflops: 989.4, fp8_tflops: 1978.9, memory_gb: 80.0 },
    Gpu { name: "h200", bf16_tflops: 989.4, fp8_tflops: 1978.9, memory_gb: 141.0 },
    Gpu { name: "a100", bf16_tflops: 312.0, fp8_tflops: 312.0, memory_gb: 80.0 },
];

pub fn gpu(name: &str) -> Option<Gpu> {
    GPUS.iter().copied().find(|g| g.name.eq_ignore_ascii_case(name))
}

/// GPU-hours for `tokens` at `flops_per_token`, with the GPUs achieving `mfu` of their bf16 peak.
pub fn gpu_hours(tokens: f64, flops_per_token: f64, gpu: Gpu, mfu: f64) -> f64 {
    tokens * flops_per_token / (mfu * gpu.bf16_tflops * 1e12) / 3600.0
}

/// A parallel layout: GPUs in all, devices per pipeline, how the model is cut into stages, and
/// expert-parallel ranks.
#[derive(Clone, Copy, Debug)]
pub struct Mesh {
    pub gpus: usize,
    /// Devices in one pipeline (data parallelism is gpus / devices).
    pub devices: usize,
    /// Stages the model is cut into.
    pub stages: usize,
    /// Stages each device holds (DualPipe/DualPipeV: 2, so parameters 2×).
    pub stages_per_device: usize,
    pub ep: usize,
    /// Micro-batches of activations a device keeps at once (PP+1 for DualPipe, PP for 1F1B).
    pub live_micro_batches: usize,
    pub micro_batch_tokens: usize,
    /// Activation bytes per token per layer (an estimate: Megatron's 34·D for bf16, halved for the
    /// FP8 caching of the report).
    pub act_bytes_per_token_layer: f64,
}

/// Bytes per device.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Memory {
    pub params: f64,
    pub grads: f64,
    pub optimizer: f64,
    pub activations: f64,
}

impl Memory {
    pub fn total(&self) -> f64 {
        self.params + self.grads + self.optimizer + self.activations
    }
}

/// bf16 weights, fp32 gradients, ZeRO-1 sharded fp32 master weights and bf16 AdamW moments (the
/// report's §3.3); routed experts split over `ep`, everything else replicated across the data
/// parallel ranks of a stage; each device holds `stages_per_device` of `pp`·`stages_per_device`
/// stages.
pub fn memory(shape: &ModelShape, l: Mesh) -> Memory {
    let p = shape.params();
    let dp = (l.gpus / l.devices.max(1)).max(1) as f64;
    let share = l.stages_per_device as f64 / l.stages.max(1) as f64;
    let routed = p.routed * share / l.ep.max(1) as f64;
    let other = (p.total - p.routed) * share;
    let held = routed + other;
    // ZeRO-1: optimizer states sharded over the ranks holding the same parameters.
    let expert_replicas = (dp / l.ep.max(1) as f64).max(1.0);
    let optimizer = 8.0 * (routed / expert_replicas + other / dp);
    // Each live micro-batch holds one stage's activations (the DualPipe table counts PP+1).
    let layers_per_stage = (shape.layers + shape.mtp_layers) as f64 / l.stages.max(1) as f64;
    let activations =
        l.live_micro_batches as f64 * l.micro_batch_tokens as f64 * layers_per_stage * l.act_bytes_per_token_layer;
    Memory { params: 2.0 * held, grads: 4.0 * held, optimizer, activations }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub fn deepseek_v3() -> ModelShape {
        ModelShape {
            hidden: 7168,
            layers: 61,
            dense_layers: 3,
            moe_layer_freq: 1,
            vocab: 129280,
            heads: 128,
            q_lora_rank: Some(1536),
            kv_lora_rank: 512,
            qk_nope: 128,
            qk_rope: 64,
            v_head: 128,
            intermediate: 18432,
            moe_intermediate: 2048,
            routed_experts: 256,
            shared_experts: 1,
            experts_per_token: 8,
            mtp_layers: 1,
        }
    }

    #[test]
    fn parameter_counts_match_the_spec() {
        let s = deepseek_v3();
        assert!((s.attention() / 1e6 - 187.1).abs() < 0.1, "{}", s.attention());
        assert!((s.expert() / 1e6 - 44.04).abs() < 0.01);
        let p = s.params();
        assert!((p.main / 1e9 - 671.03).abs() < 0.05, "main {}", p.main / 1e9);
        // Active per token without the input embedding: 36.6B (spec), "37B" (paper).
        assert!((p.active_main / 1e9 - 36.6).abs() < 0.1, "active {}", p.active_main / 1e9);
        // The MTP module's unique parameters: 11.5B (spec [RW]); the release's "685B" adds its
        // copies of the embedding and head (2 × 0.93B).
        assert!(((p.total - p.main) / 1e9 - 11.5).abs() < 0.2, "mtp {}", (p.total - p.main) / 1e9);
    }

    #[test]
    fn the_reports_gpu_hours_at_forty_percent_of_bf16_peak() {
        let s = deepseek_v3();
        let f = s.train_flops_per_token(4096);
        let h800 = gpu("h800").unwrap();
        let per_t = gpu_hours(1e12, f, h800, 0.40);
        // 180K GPU-hours per trillion tokens (report §1), within 2%.
        assert!((per_t / 180e3 - 1.0).abs() < 0.02, "{per_t}");
        let pre = gpu_hours(14.8e12, f, h800, 0.40);
        assert!((pre / 2664e3 - 1.0).abs() < 0.02, "{pre}");
    }

    #[test]
    fn a_pp16_ep64_device_fits_in_80_gb() {
        let s = deepseek_v3();
        let l = Mesh {
            gpus: 2048,
            devices: 16,
            stages: 16,
            stages_per_device: 2,
            ep: 64,
            live_micro_batches: 17,
            micro_batch_tokens: 4096,
            act_bytes_per_token_layer: 17.0 * 7168.0,
        };
        let m = memory(&s, l);
        assert!(m.total() < 80e9 && m.params > 1e9, "{m:?}");
    }
}
