//! MLA over whole sequences for training: the naive form (per-head keys and values expanded from
//! the normed latent), causal, positions 0..T per sequence, with its backward.

use super::{add_into, Grads};
use crate::layers::Linear;
use crate::mla::{Mla, QProj};
use crate::rope::Rope;
use dsv3_kernels::attention::softmax_in_place;
use dsv3_kernels::gemm::{gemm_acc, Strided};
use dsv3_kernels::matmul::transpose;
use rayon::prelude::*;

/// What [`Mla::backward`] needs from [`Mla::forward_train`].
pub struct MlaSaved {
    x: Vec<f32>,
    seqs: usize,
    t: usize,
    /// `q_a_proj` output and its norm (low-rank queries only).
    cq: Option<(Vec<f32>, Vec<f32>)>,
    /// `[n, C]` latent before `kv_a_layernorm`, and after.
    c_pre: Vec<f32>,
    ckv: Vec<f32>,
    /// `[n, H, dn+dv]` keys (no-rope part) and values.
    kvb: Vec<f32>,
    /// `[n, H, dn+dr]` queries, rope part rotated; `[n, R]` rotated shared rope key.
    q: Vec<f32>,
    kpe: Vec<f32>,
    /// `[seqs, H, T, T]` attention probabilities (zero above the diagonal).
    probs: Vec<f32>,
    /// `[n, H·dv]` attention output before `o_proj`.
    o: Vec<f32>,
}

/// One head's keys and values over one sequence, laid out for the GEMMs: `k [t, dn+dr]`
/// (`[k_nope ; k_pe]`), `kt` its transpose, `v [t, dv]` and `vt` its transpose.
struct HeadKv {
    k: Vec<f32>,
    kt: Vec<f32>,
    v: Vec<f32>,
    vt: Vec<f32>,
}

impl HeadKv {
    #[allow(clippy::too_many_arguments)]
    fn gather(
        kvb: &[f32],
        kpe: &[f32],
        sq: usize,
        hh: usize,
        t: usize,
        h: usize,
        dn: usize,
        dr: usize,
        dv: usize,
    ) -> Self {
        let (dq, dkv) = (dn + dr, dn + dv);
        let mut k = vec![0f32; t * dq];
        let mut v = vec![0f32; t * dv];
        for j in 0..t {
            let r = sq * t + j;
            k[j * dq..j * dq + dn].copy_from_slice(&kvb[(r * h + hh) * dkv..][..dn]);
            k[j * dq + dn..(j + 1) * dq].copy_from_slice(&kpe[r * dr..(r + 1) * dr]);
            v[j * dv..(j + 1) * dv].copy_from_slice(&kvb[(r * h + hh) * dkv + dn..][..dv]);
        }
        HeadKv { kt: transpose(&k, t, dq), vt: transpose(&v, t, dv), k, v }
    }
}

impl Mla {
    /// `x [seqs·t, D]`, each sequence at positions `0..t` → `[seqs·t, D]`.
    pub fn forward_train(&self, x: &[f32], seqs: usize, t: usize, rope: &Rope) -> (Vec<f32>, MlaSaved) {
        let (h, dn, dr, dv, c) = (self.heads, self.dn, self.dr, self.dv, self.c);
        let (dq, n) = (dn + dr, seqs * t);
        let first_proj = match &self.q {
            QProj::LowRank { q_a_proj, .. } => q_a_proj,
            QProj::Direct { q_proj } => q_proj,
        };
        let mut both = Linear::forward_many(&[(first_proj, x, n), (&self.kv_a_proj_with_mqa, x, n)]);
        let kv = both.pop().unwrap_or_default();
        let first = both.pop().unwrap_or_default();
        let (mut q, cq) = match &self.q {
            QProj::LowRank { q_a_layernorm, q_b_proj, .. } => {
                let cqn = q_a_layernorm.forward(&first);
                (q_b_proj.forward(&cqn, n), Some((first, cqn)))
            }
            QProj::Direct { .. } => (first, None),
        };
        let mut c_pre = vec![0f32; n * c];
        let mut kpe = vec![0f32; n * dr];
        for i in 0..n {
            let row = &kv[i * (c + dr)..(i + 1) * (c + dr)];
            c_pre[i * c..(i + 1) * c].copy_from_slice(&row[..c]);
            kpe[i * dr..(i + 1) * dr].copy_from_slice(&row[c..]);
            rope.apply(&mut kpe[i * dr..(i + 1) * dr], i % t);
            for hh in 0..h {
                rope.apply(&mut q[(i * h + hh) * dq + dn..(i * h + hh + 1) * dq], i % t);
            }
        }
        let ckv = self.kv_a_layernorm.forward(&c_pre);
        let kvb = self.kv_b_proj.forward(&ckv, n);

        // One task per (sequence, head): S = Q·Kᵀ·scale, causal softmax, O = P·V, as GEMMs.
        let per: Vec<(Vec<f32>, Vec<f32>)> = (0..seqs * h)
            .into_par_iter()
            .map(|sh| {
                let (sq, hh) = (sh / h, sh % h);
                let hk = HeadKv::gather(&kvb, &kpe, sq, hh, t, h, dn, dr, dv);
                let q0 = (sq * t * h + hh) * dq;
                let mut p = vec![0f32; t * t];
                gemm_acc(Strided { a: &q[q0..], a_s: 1, a_p: h * dq }, &hk.kt, &mut p, t, t, dq);
                for i in 0..t {
                    let row = &mut p[i * t..(i + 1) * t];
                    row[..=i].iter_mut().for_each(|v| *v *= self.scale);
                    softmax_in_place(&mut row[..=i]);
                    row[i + 1..].fill(0.0);
                }
                let mut o = vec![0f32; t * dv];
                gemm_acc(Strided { a: &p, a_s: 1, a_p: t }, &hk.v, &mut o, t, dv, t);
                (p, o)
            })
            .collect();
        let mut probs = vec![0f32; seqs * h * t * t];
        let mut o = vec![0f32; n * h * dv];
        for (sh, (p, oh)) in per.into_iter().enumerate() {
            let (sq, hh) = (sh / h, sh % h);
            probs[sh * t * t..(sh + 1) * t * t].copy_from_slice(&p);
            for i in 0..t {
                o[((sq * t + i) * h + hh) * dv..][..dv].copy_from_slice(&oh[i * dv..(i + 1) * dv]);
            }
        }
        let y = self.o_proj.forward(&o, n);
        (y, MlaSaved { x: x.to_vec(), seqs, t, cq, c_pre, ckv, kvb, q, kpe, probs, o })
    }

    /// Parameter gradients under `{name}.*` (checkpoint names); returns `dx`.
    pub fn backward(&self, name: &str, s: &MlaSaved, dy: &[f32], rope: &Rope, g: &mut Grads) -> Vec<f32> {
        let (h, dn, dr, dv, c) = (self.heads, self.dn, self.dr, self.dv, self.c);
        let (dq, dkv, t, seqs) = (dn + dr, dn + dv, s.t, s.seqs);
        let n = seqs * t;
        let d_o = self.o_proj.backward(&format!("{name}.o_proj"), &s.o, dy, n, g);

        // Per (sequence, head), as GEMMs: dP = dO·Vᵀ, dS = P ⊙ (dP − rowsum(P ⊙ dP))·scale,
        // dQ = dS·K, dK = dSᵀ·Q, dV = Pᵀ·dO. Returns dq [t, dq], dk_nope|dv [t, dkv], dk_pe [t, dr].
        let per: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = (0..seqs * h)
            .into_par_iter()
            .map(|sh| {
                let (sq, hh) = (sh / h, sh % h);
                let p = &s.probs[sh * t * t..(sh + 1) * t * t];
                let hk = HeadKv::gather(&s.kvb, &s.kpe, sq, hh, t, h, dn, dr, dv);
                let o0 = (sq * t * h + hh) * dv;
                let d_oh: Vec<f32> = (0..t).flat_map(|i| d_o[o0 + i * h * dv..][..dv].iter().copied()).collect();
                let q0 = (sq * t * h + hh) * dq;
                let qh: Vec<f32> = (0..t).flat_map(|i| s.q[q0 + i * h * dq..][..dq].iter().copied()).collect();
                let mut ds = vec![0f32; t * t];
                gemm_acc(Strided { a: &d_oh, a_s: 1, a_p: dv }, &hk.vt, &mut ds, t, t, dv);
                for i in 0..t {
                    let (pr, dr_) = (&p[i * t..(i + 1) * t], &mut ds[i * t..(i + 1) * t]);
                    let mean: f32 = pr[..=i].iter().zip(&dr_[..=i]).map(|(a, b)| a * b).sum();
                    for j in 0..=i {
                        dr_[j] = pr[j] * (dr_[j] - mean) * self.scale;
                    }
                    dr_[i + 1..].fill(0.0);
                }
                let mut gq = vec![0f32; t * dq];
                gemm_acc(Strided { a: &ds, a_s: 1, a_p: t }, &hk.k, &mut gq, t, dq, t);
                let mut gk = vec![0f32; t * dq];
                gemm_acc(Strided { a: &ds, a_s: t, a_p: 1 }, &qh, &mut gk, t, dq, t);
                let mut gv = vec![0f32; t * dv];
                gemm_acc(Strided { a: p, a_s: t, a_p: 1 }, &d_oh, &mut gv, t, dv, t);
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

        let d_ckv = self.kv_b_proj.backward(&format!("{name}.kv_b_proj"), &s.ckv, &d_kvb, n, g);
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
                let d_cqn = q_b_proj.backward(&format!("{name}.q_b_proj"), cqn, &d_q, n, g);
                let d_cq = q_a_layernorm.backward(&format!("{name}.q_a_layernorm"), cq, &d_cqn, g);
                q_a_proj.backward(&format!("{name}.q_a_proj"), &s.x, &d_cq, n, g)
            }
            (QProj::Direct { q_proj }, _) => q_proj.backward(&format!("{name}.q_proj"), &s.x, &d_q, n, g),
            (QProj::LowRank { .. }, None) => unreachable!("forward_train saves the low-rank query path"),
        };
        add_into(&mut dx, &self.kv_a_proj_with_mqa.backward(&format!("{name}.kv_a_proj_with_mqa"), &s.x, &d_kv, n, g));
        dx
    }
}
