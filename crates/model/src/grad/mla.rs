//! The backward of MLA over whole sequences (the naive form [`Mla::forward`] runs for
//! [`crate::mla::Seqs::Fresh`]: per-head keys and values expanded from the normed latent, causal,
//! positions 0..T per sequence).

use super::{add_into, Grads};
use crate::exec::Exec;
use crate::mla::{HeadKv, Mla, QProj};
use crate::rope::Rope;
use dsv3_kernels::gemm::{gemm_acc, Strided};
use rayon::prelude::*;

/// What [`Mla::backward`] needs from [`Mla::forward_train`].
pub struct MlaSaved {
    pub(crate) x: Vec<f32>,
    pub(crate) seqs: usize,
    pub(crate) t: usize,
    /// `q_a_proj` output and its norm (low-rank queries only).
    pub(crate) cq: Option<(Vec<f32>, Vec<f32>)>,
    /// `[n, C]` latent before `kv_a_layernorm`, and after.
    pub(crate) c_pre: Vec<f32>,
    pub(crate) ckv: Vec<f32>,
    /// `[n, H, dn+dv]` keys (no-rope part) and values.
    pub(crate) kvb: Vec<f32>,
    /// `[n, H, dn+dr]` queries, rope part rotated; `[n, R]` rotated shared rope key.
    pub(crate) q: Vec<f32>,
    pub(crate) kpe: Vec<f32>,
    /// `[seqs, H, T, T]` attention probabilities (zero above the diagonal).
    pub(crate) probs: Vec<f32>,
    /// `[n, H·dv]` attention output before `o_proj`.
    pub(crate) o: Vec<f32>,
    /// The indexer's loss and what its backward needs (sparse attention only).
    pub(crate) index: Option<super::indexer::IndexSaved>,
}

impl Mla {
    /// Parameter gradients under `{name}.*` (checkpoint names); returns `dx`.
    pub fn backward(&self, cx: &Exec, name: &str, s: &MlaSaved, dy: &[f32], rope: &Rope, g: &mut Grads) -> Vec<f32> {
        let (h, dn, dr, dv, c) = (self.heads, self.dn, self.dr, self.dv, self.c);
        let (dq, dkv, t, seqs) = (dn + dr, dn + dv, s.t, s.seqs);
        let n = seqs * t;
        let d_o = self.o_proj.backward(cx, &format!("{name}.o_proj"), &s.o, dy, n, g);
        if let (Some(ix), Some(is), Some((_, cqn))) = (&self.indexer, &s.index, &s.cq) {
            ix.backward(cx, &format!("{name}.indexer"), is, &s.x, cqn, (seqs, t), g);
        }

        // Per (sequence, head), as GEMMs: dP = dO·Vᵀ, dS = P ⊙ (dP − rowsum(P ⊙ dP))·scale,
        // dQ = dS·K, dK = dSᵀ·Q, dV = Pᵀ·dO. Returns dq [t, dq], dk_nope|dv [t, dkv], dk_pe [t, dr].
        let per: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = (0..seqs * h)
            .into_par_iter()
            .map(|sh| {
                let (sq, hh) = (sh / h, sh % h);
                let p = &s.probs[sh * t * t..(sh + 1) * t * t];
                let hk = HeadKv::gather(&s.kvb, &s.kpe, sq * t, hh, t, self);
                let o0 = (sq * t * h + hh) * dv;
                let d_oh: Vec<f32> = (0..t).flat_map(|i| d_o[o0 + i * h * dv..][..dv].iter().copied()).collect();
                let q0 = (sq * t * h + hh) * dq;
                let qh: Vec<f32> = (0..t).flat_map(|i| s.q[q0 + i * h * dq..][..dq].iter().copied()).collect();
                let mut ds = vec![0f32; t * t];
                gemm_acc(Strided { a: &d_oh, a_s: 1, a_p: dv }, &hk.vt, &mut ds, t, t, dv, cx.gemm.bf16);
                for i in 0..t {
                    let (pr, dr_) = (&p[i * t..(i + 1) * t], &mut ds[i * t..(i + 1) * t]);
                    let mean: f32 = pr[..=i].iter().zip(&dr_[..=i]).map(|(a, b)| a * b).sum();
                    for j in 0..=i {
                        dr_[j] = pr[j] * (dr_[j] - mean) * self.scale;
                    }
                    dr_[i + 1..].fill(0.0);
                }
                let mut gq = vec![0f32; t * dq];
                gemm_acc(Strided { a: &ds, a_s: 1, a_p: t }, &hk.k, &mut gq, t, dq, t, cx.gemm.bf16);
                let mut gk = vec![0f32; t * dq];
                gemm_acc(Strided { a: &ds, a_s: t, a_p: 1 }, &qh, &mut gk, t, dq, t, cx.gemm.bf16);
                let mut gv = vec![0f32; t * dv];
                gemm_acc(Strided { a: p, a_s: t, a_p: 1 }, &d_oh, &mut gv, t, dv, t, cx.gemm.bf16);
                let mut gkv = vec![0f32; t * dkv];
                let mut gpe = vec![0f32; t * dr];
                for j in 0..t {
                    gkv[j * dkv..j * dkv + dn].copy_from_slice(&gk[j * dq..j * dq + dn]);
                    gkv[j * dkv + dn..(j + 1) * dkv].copy_from_slice(&gv[j * dv..(j + 1) * dv]);
                    gpe[j * dr..(j + 1) * dr].copy_from_slice(&gk[j * dq + dn..(j + 1) * dq]);
                }
                (gq, gkv, gpe)
            })
            .collect();
        let mut d_q = vec![0f32; n * h * dq];
        let mut d_kvb = vec![0f32; n * h * dkv];
        let mut d_kpe = vec![0f32; n * dr];
        for (sh, (gq, gkv, gpe)) in per.into_iter().enumerate() {
            let (sq, hh) = (sh / h, sh % h);
            for i in 0..t {
                let r = sq * t + i;
                d_q[(r * h + hh) * dq..][..dq].copy_from_slice(&gq[i * dq..(i + 1) * dq]);
                d_kvb[(r * h + hh) * dkv..][..dkv].copy_from_slice(&gkv[i * dkv..(i + 1) * dkv]);
                add_into(&mut d_kpe[r * dr..(r + 1) * dr], &gpe[i * dr..(i + 1) * dr]);
            }
        }

        // Training folds split tensors into `kv_b_proj` first ([`Mla::join_kv_b`]).
        let d_ckv = self.joint_kv_b().backward(cx, &format!("{name}.kv_b_proj"), &s.ckv, &d_kvb, n, g);
        let d_c = self.kv_a_layernorm.backward(&format!("{name}.kv_a_layernorm"), &s.c_pre, &d_ckv, g);
        let mut d_kv = vec![0f32; n * (c + dr)];
        for i in 0..n {
            rope.apply_transpose(&mut d_kpe[i * dr..(i + 1) * dr], i % t);
            d_kv[i * (c + dr)..i * (c + dr) + c].copy_from_slice(&d_c[i * c..(i + 1) * c]);
            d_kv[i * (c + dr) + c..(i + 1) * (c + dr)].copy_from_slice(&d_kpe[i * dr..(i + 1) * dr]);
            for hh in 0..h {
                rope.apply_transpose(&mut d_q[(i * h + hh) * dq + dn..(i * h + hh + 1) * dq], i % t);
            }
        }
        let mut dx = match (&self.q, &s.cq) {
            (QProj::LowRank { q_a_proj, q_a_layernorm, q_b_proj }, Some((cq, cqn))) => {
                let d_cqn = q_b_proj.backward(cx, &format!("{name}.q_b_proj"), cqn, &d_q, n, g);
                let d_cq = q_a_layernorm.backward(&format!("{name}.q_a_layernorm"), cq, &d_cqn, g);
                q_a_proj.backward(cx, &format!("{name}.q_a_proj"), &s.x, &d_cq, n, g)
            }
            (QProj::Direct { q_proj }, _) => q_proj.backward(cx, &format!("{name}.q_proj"), &s.x, &d_q, n, g),
            (QProj::LowRank { .. }, None) => unreachable!("the forward saves the low-rank query path"),
        };
        add_into(
            &mut dx,
            &self.kv_a_proj_with_mqa.backward(cx, &format!("{name}.kv_a_proj_with_mqa"), &s.x, &d_kv, n, g),
        );
        dx
    }
}
