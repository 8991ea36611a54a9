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

/// A trainable tensor's storage: a weight matrix or a norm's vector.
enum Slot<'a> {
    Matrix(&'a mut Matrix),
    Vector(&'a mut Vec<f32>),
}

type Slots<'a> = Vec<(String, Slot<'a>)>;

fn matrix<'a>(out: &mut Slots<'a>, name: String, m: &'a mut Matrix) {
    out.push((name, Slot::Matrix(m)));
}

fn linear<'a>(out: &mut Slots<'a>, name: String, l: &'a mut Linear) {
    matrix(out, format!("{name}.weight"), &mut l.weight);
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

    /// Every trainable tensor this process holds, as mutable f32 (bf16/FP8 stores are decoded
    /// to f32 masters once). Tensors dropped by [`DeepseekV3::drop_params`] are not listed.
    pub fn params_mut(&mut self) -> ParamsMut<'_> {
        self.slots()
            .into_iter()
            .filter_map(|(name, slot)| match slot {
                Slot::Matrix(m) if !m.is_absent() => {
                    Some(Param { name, shape: vec![m.rows, m.cols], data: m.f32_mut() })
                }
                Slot::Vector(v) if !v.is_empty() => Some(Param { name, shape: vec![v.len()], data: v.as_mut_slice() }),
                _ => None,
            })
            .collect()
    }

    /// Every trainable tensor's name and shape, held here or not (norm vectors as loaded: call
    /// before dropping any). Reads no weight.
    pub fn param_shapes(&mut self) -> Vec<(String, Vec<usize>)> {
        self.slots()
            .into_iter()
            .map(|(name, slot)| match slot {
                Slot::Matrix(m) => (name, vec![m.rows, m.cols]),
                Slot::Vector(v) => (name, vec![v.len()]),
            })
            .collect()
    }

    /// Frees the tensors `keep` rejects: parallel training, where other processes hold them
    /// (routed experts under expert parallelism, other stages' layers in a pipeline). The
    /// forward and backward of what remains never read them.
    pub fn drop_params(&mut self, keep: impl Fn(&str) -> bool) {
        for (name, slot) in self.slots() {
            if !keep(&name) {
                match slot {
                    Slot::Matrix(m) => *m = Matrix::absent(m.rows, m.cols),
                    Slot::Vector(v) => *v = vec![],
                }
            }
        }
    }

    /// Sets each named tensor (held or dropped) to its `data` of `shape`; returns the names that
    /// are not this model's.
    pub fn set_params(&mut self, tensors: Vec<(String, Vec<usize>, Vec<f32>)>) -> Vec<String> {
        let mut by_name: std::collections::HashMap<String, (Vec<usize>, Vec<f32>)> =
            tensors.into_iter().map(|(n, s, d)| (n, (s, d))).collect();
        for (name, slot) in self.slots() {
            if let Some((shape, data)) = by_name.remove(&name) {
                match slot {
                    Slot::Matrix(m) => *m = Matrix::from_f32(shape[0], shape[1], data),
                    Slot::Vector(v) => *v = data,
                }
            }
        }
        by_name.into_keys().collect()
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
