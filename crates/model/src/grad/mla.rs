//! MLA over whole sequences for training: the naive form (per-head keys and values expanded from
//! the normed latent), causal, positions 0..T per sequence, with its backward.

use super::{add_into, Grads};
use crate::layers::Linear;
use crate::mla::{Mla, QProj};
use crate::rope::Rope;
use dsv3_kernels::dot::{axpy_f32, dot_f32};
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

impl Mla {
    /// `x [seqs·t, D]`, each sequence at positions `0..t` → `[seqs·t, D]`.
    pub fn forward_train(&self, x: &[f32], seqs: usize, t: usize, rope: &Rope) -> (Vec<f32>, MlaSaved) {
        let (h, dn, dr, dv, c) = (self.heads, self.dn, self.dr, self.dv, self.c);
        let (dq, dkv, n) = (dn + dr, dn + dv, seqs * t);
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

        // One task per (sequence, head): its T×T probabilities and its slice of the output.
        let per: Vec<(Vec<f32>, Vec<f32>)> = (0..seqs * h)
            .into_par_iter()
            .map(|sh| {
                let (sq, hh) = (sh / h, sh % h);
                let mut p = vec![0f32; t * t];
                let mut o = vec![0f32; t * dv];
                for i in 0..t {
                    let qi = &q[((sq * t + i) * h + hh) * dq..][..dq];
                    let row = &mut p[i * t..i * t + i + 1];
                    for (j, pj) in row.iter_mut().enumerate() {
                        let kj = &kvb[((sq * t + j) * h + hh) * dkv..][..dn];
                        let pe = &kpe[(sq * t + j) * dr..][..dr];
                        let dot = dot_f32(&qi[..dn], kj) + dot_f32(&qi[dn..], pe);
                        *pj = dot * self.scale;
                    }
                    dsv3_kernels::attention::softmax_in_place(row);
                    let oi = &mut o[i * dv..(i + 1) * dv];
                    for (j, &pj) in row.iter().enumerate() {
                        let vj = &kvb[((sq * t + j) * h + hh) * dkv + dn..][..dv];
                        axpy_f32(oi, pj, vj);
                    }
                }
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

        // Per (sequence, head): dq [t, dq], dk_nope|dv [t, dkv], dk_pe [t, dr].
        let per: Vec<(Vec<f32>, Vec<f32>, Vec<f32>)> = (0..seqs * h)
            .into_par_iter()
            .map(|sh| {
                let (sq, hh) = (sh / h, sh % h);
                let p = &s.probs[sh * t * t..(sh + 1) * t * t];
                let (mut gq, mut gkv, mut gpe) = (vec![0f32; t * dq], vec![0f32; t * dkv], vec![0f32; t * dr]);
                let mut ds = vec![0f32; t];
                for i in 0..t {
                    let doi = &d_o[((sq * t + i) * h + hh) * dv..][..dv];
                    let pi = &p[i * t..i * t + i + 1];
                    for j in 0..=i {
                        let vj = &s.kvb[((sq * t + j) * h + hh) * dkv + dn..][..dv];
                        ds[j] = dot_f32(doi, vj);
                        // dv_j += P_ij·do_i
                        axpy_f32(&mut gkv[j * dkv + dn..(j + 1) * dkv], pi[j], doi);
                    }
                    let mean: f32 = (0..=i).map(|j| pi[j] * ds[j]).sum();
                    let qi = &s.q[((sq * t + i) * h + hh) * dq..][..dq];
                    for j in 0..=i {
                        let dsc = pi[j] * (ds[j] - mean) * self.scale;
                        if dsc == 0.0 {
                            continue;
                        }
                        let kj = &s.kvb[((sq * t + j) * h + hh) * dkv..][..dn];
                        let pej = &s.kpe[(sq * t + j) * dr..][..dr];
                        let gqi = &mut gq[i * dq..(i + 1) * dq];
                        axpy_f32(&mut gqi[..dn], dsc, kj);
                        axpy_f32(&mut gqi[dn..], dsc, pej);
                        axpy_f32(&mut gkv[j * dkv..j * dkv + dn], dsc, &qi[..dn]);
                        axpy_f32(&mut gpe[j * dr..(j + 1) * dr], dsc, &qi[dn..]);
                    }
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
