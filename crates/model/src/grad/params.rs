//! The model's trainable parameters by checkpoint name, in one fixed order (the optimizer's state,
//! the gradients and the saved checkpoint all use these names).

use crate::layers::{LayerNorm, Linear, Mlp, RmsNorm};
use crate::mla::{Mla, QProj};
use crate::model::{DecoderLayer, DeepseekV3, Ffn};
use crate::weights::Matrix;

/// One trainable tensor: its checkpoint name, shape and values.
pub struct Param<'a> {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: &'a mut [f32],
}

pub type ParamsMut<'a> = Vec<Param<'a>>;

/// A trainable tensor's storage: a weight matrix, a norm's vector, or a `Linear` (its weight and
/// its adapter's `lora_A` / `lora_B`, named under the module).
enum Slot<'a> {
    Matrix(&'a mut Matrix),
    Vector(&'a mut Vec<f32>),
    Linear(&'a mut Linear),
}

type Slots<'a> = Vec<(String, Slot<'a>)>;

fn matrix<'a>(out: &mut Slots<'a>, name: String, m: &'a mut Matrix) {
    out.push((name, Slot::Matrix(m)));
}

fn linear<'a>(out: &mut Slots<'a>, name: String, l: &'a mut Linear) {
    out.push((name, Slot::Linear(l)));
}

/// A slot's tensors by parameter name: a `Linear` gives its weight and its adapter's factors.
fn tensors<'a>(name: String, slot: Slot<'a>) -> Vec<(String, Tensor<'a>)> {
    match slot {
        Slot::Matrix(m) => vec![(name, Tensor::Matrix(m))],
        Slot::Vector(v) => vec![(name, Tensor::Vector(v))],
        Slot::Linear(Linear { weight, lora, .. }) => {
            let mut t = vec![(format!("{name}.weight"), Tensor::Matrix(weight))];
            if let Some(l) = lora {
                t.push((format!("{name}.lora_A.weight"), Tensor::Matrix(&mut l.a)));
                t.push((format!("{name}.lora_B.weight"), Tensor::Matrix(&mut l.b)));
            }
            t
        }
    }
}

/// One parameter tensor's storage.
enum Tensor<'a> {
    Matrix(&'a mut Matrix),
    Vector(&'a mut Vec<f32>),
}

fn norm<'a>(out: &mut Slots<'a>, name: String, n: &'a mut RmsNorm) {
    out.push((format!("{name}.weight"), Slot::Vector(&mut n.weight)));
}

fn mlp<'a>(out: &mut Slots<'a>, name: &str, m: &'a mut Mlp) {
    linear(out, format!("{name}.gate_proj"), &mut m.gate_proj);
    linear(out, format!("{name}.up_proj"), &mut m.up_proj);
    linear(out, format!("{name}.down_proj"), &mut m.down_proj);
}

fn mla<'a>(out: &mut Slots<'a>, name: &str, a: &'a mut Mla) {
    a.join_kv_b();
    match &mut a.q {
        QProj::LowRank { q_a_proj, q_a_layernorm, q_b_proj } => {
            linear(out, format!("{name}.q_a_proj"), q_a_proj);
            norm(out, format!("{name}.q_a_layernorm"), q_a_layernorm);
            linear(out, format!("{name}.q_b_proj"), q_b_proj);
        }
        QProj::Direct { q_proj } => linear(out, format!("{name}.q_proj"), q_proj),
    }
    linear(out, format!("{name}.kv_a_proj_with_mqa"), &mut a.kv_a_proj_with_mqa);
    norm(out, format!("{name}.kv_a_layernorm"), &mut a.kv_a_layernorm);
    let crate::mla::KvB::Joint(kv_b_proj) = &mut a.kv_b else { unreachable!("joined above") };
    linear(out, format!("{name}.kv_b_proj"), kv_b_proj);
    linear(out, format!("{name}.o_proj"), &mut a.o_proj);
    if let Some(ix) = &mut a.indexer {
        let p = format!("{name}.indexer");
        linear(out, format!("{p}.wq_b"), &mut ix.wq_b);
        linear(out, format!("{p}.wk"), &mut ix.wk);
        let LayerNorm { weight, bias, .. } = &mut ix.k_norm;
        out.push((format!("{p}.k_norm.weight"), Slot::Vector(weight)));
        out.push((format!("{p}.k_norm.bias"), Slot::Vector(bias)));
        linear(out, format!("{p}.weights_proj"), &mut ix.weights_proj);
    }
}

fn layer<'a>(out: &mut Slots<'a>, name: &str, l: &'a mut DecoderLayer) {
    norm(out, format!("{name}.input_layernorm"), &mut l.input_layernorm);
    mla(out, &format!("{name}.self_attn"), &mut l.self_attn);
    norm(out, format!("{name}.post_attention_layernorm"), &mut l.post_attention_layernorm);
    match &mut l.mlp {
        Ffn::Dense(m) => mlp(out, &format!("{name}.mlp"), m),
        Ffn::Moe(m) => {
            matrix(out, format!("{name}.mlp.gate.weight"), &mut m.gate.weight);
            for (i, e) in m.experts.iter_mut().enumerate() {
                mlp(out, &format!("{name}.mlp.experts.{i}"), e);
            }
            if let Some(s) = &mut m.shared_experts {
                mlp(out, &format!("{name}.mlp.shared_experts"), s);
            }
        }
    }
}

impl DeepseekV3 {
    fn slots(&mut self) -> Slots<'_> {
        let n = self.layers.len();
        let mut out = vec![];
        matrix(&mut out, "model.embed_tokens.weight".into(), &mut self.embed_tokens);
        for (l, ly) in self.layers.iter_mut().enumerate() {
            layer(&mut out, &format!("model.layers.{l}"), ly);
        }
        for (j, m) in self.mtp.iter_mut().enumerate() {
            let name = format!("model.layers.{}", n + j);
            norm(&mut out, format!("{name}.enorm"), &mut m.enorm);
            norm(&mut out, format!("{name}.hnorm"), &mut m.hnorm);
            linear(&mut out, format!("{name}.eh_proj"), &mut m.eh_proj);
            layer(&mut out, &name, &mut m.block);
            norm(&mut out, format!("{name}.shared_head.norm"), &mut m.shared_head_norm);
        }
        norm(&mut out, "model.norm".into(), &mut self.norm);
        if let Some(h) = &mut self.lm_head {
            matrix(&mut out, "lm_head.weight".into(), h);
        }
        out
    }

    /// Every parameter tensor by name, adapters included.
    fn tensors(&mut self) -> Vec<(String, Tensor<'_>)> {
        self.slots().into_iter().flat_map(|(name, slot)| tensors(name, slot)).collect()
    }

    /// Every trainable tensor this process holds, as mutable f32 (bf16/FP8 stores are decoded
    /// to f32 masters once). Tensors dropped by [`DeepseekV3::drop_params`] are not listed.
    pub fn params_mut(&mut self) -> ParamsMut<'_> {
        self.params_mut_where(|_| true)
    }

    /// The tensors of [`Self::params_mut`] that `keep` names; the others stay in their stored
    /// format (a LoRA run trains the adapters of an FP8 or bf16 base without decoding it).
    pub fn params_mut_where(&mut self, keep: impl Fn(&str) -> bool) -> ParamsMut<'_> {
        self.tensors()
            .into_iter()
            .filter(|(name, _)| keep(name))
            .filter_map(|(name, t)| match t {
                Tensor::Matrix(m) if !m.is_absent() => {
                    Some(Param { name, shape: vec![m.rows, m.cols], data: m.f32_mut() })
                }
                Tensor::Vector(v) if !v.is_empty() => {
                    Some(Param { name, shape: vec![v.len()], data: v.as_mut_slice() })
                }
                _ => None,
            })
            .collect()
    }

    /// Every trainable tensor's name and shape, held here or not (norm vectors as loaded: call
    /// before dropping any). Reads no weight.
    pub fn param_shapes(&mut self) -> Vec<(String, Vec<usize>)> {
        self.tensors()
            .into_iter()
            .map(|(name, t)| match t {
                Tensor::Matrix(m) => (name, vec![m.rows, m.cols]),
                Tensor::Vector(v) => (name, vec![v.len()]),
            })
            .collect()
    }

    /// Frees the tensors `keep` rejects: parallel training, where other processes hold them
    /// (routed experts under expert parallelism, other stages' layers in a pipeline). The
    /// forward and backward of what remains never read them.
    pub fn drop_params(&mut self, keep: impl Fn(&str) -> bool) {
        for (name, t) in self.tensors() {
            if !keep(&name) {
                match t {
                    Tensor::Matrix(m) => *m = Matrix::absent(m.rows, m.cols),
                    Tensor::Vector(v) => *v = vec![],
                }
            }
        }
    }

    /// Sets each named tensor (held or dropped) to its `data` of `shape`; returns the names that
    /// are not this model's.
    pub fn set_params(&mut self, tensors: Vec<(String, Vec<usize>, Vec<f32>)>) -> Vec<String> {
        let mut by_name: std::collections::HashMap<String, (Vec<usize>, Vec<f32>)> =
            tensors.into_iter().map(|(n, s, d)| (n, (s, d))).collect();
        for (name, t) in self.tensors() {
            if let Some((shape, data)) = by_name.remove(&name) {
                match t {
                    Tensor::Matrix(m) => *m = Matrix::from_f32(shape[0], shape[1], data),
                    Tensor::Vector(v) => *v = data,
                }
            }
        }
        by_name.into_keys().collect()
    }

    /// Every `Linear` of the main layers by module name (`model.layers.3.self_attn.q_a_proj`,
    /// `model.layers.3.mlp.experts.7.up_proj`): where LoRA adapters attach. The MTP modules'
    /// are left out (they do not exist in the Hugging Face model PEFT adapts).
    pub fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let main = self.layers.len();
        self.slots()
            .into_iter()
            .filter_map(|(name, slot)| match slot {
                Slot::Linear(l) => Some((name, l)),
                _ => None,
            })
            .filter(|(name, _)| layer_of(name).is_none_or(|l| l < main))
            .collect()
    }

    /// Each MoE layer's `e_score_correction_bias` (a buffer the aux-loss-free balancing updates,
    /// not a gradient parameter), by layer index (main layers, then MTP blocks).
    pub fn routing_biases_mut(&mut self) -> Vec<(usize, &mut Vec<f32>)> {
        let blocks = self.layers.iter_mut().chain(self.mtp.iter_mut().map(|m| &mut m.block));
        blocks
            .enumerate()
            .filter_map(|(l, ly)| match &mut ly.mlp {
                Ffn::Moe(m) => m.gate.e_score_correction_bias.as_mut().map(|b| (l, b)),
                Ffn::Dense(_) => None,
            })
            .collect()
    }
}

/// The decoder layer a parameter or module name belongs to (`model.layers.N.…`).
fn layer_of(name: &str) -> Option<usize> {
    name.strip_prefix("model.layers.")?.split('.').next()?.parse().ok()
}
