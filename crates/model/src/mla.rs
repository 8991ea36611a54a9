//! Multi-head Latent Attention (spec §1 "MLA", §3 "Absorbed MLA").
//!
//! Both forms read the same latent cache (`c_kv = RMSNorm(kv[:C])` and the rotated shared `k_pe`,
//! `C + R` values per token) and give the same result:
//! - naive: expand every cached latent through `kv_b_proj` into per-head keys and values — cheaper
//!   when many queries share the expansion (prefill);
//! - absorbed: fold `W_UK` into the query and `W_UV` into the output, and attend in the latent space
//!   — cheaper for few queries over a long cache (decode).

use crate::config::Config;
use crate::error::Result;
use crate::layers::{Linear, RmsNorm};
use crate::rope::Rope;
use crate::weights::Checkpoint;
use dsv3_kernels::attention::{latent_attention, softmax_in_place, LatentShape, Pages};
use dsv3_kernels::dot::{axpy_f32, dot_f32};
use dsv3_kernels::matmul::{matmul_nn, matmul_nt};
use rayon::prelude::*;

/// `AttnImpl::Auto` runs the absorbed form up to this many new tokens (decode and MTP
/// verification), the naive one above (prompts).
pub const MAX_ABSORBED_TOKENS: usize = dsv3_kernels::gemv::MAX_TOKENS;

/// Which attention form runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttnImpl {
    Naive,
    Absorbed,
    /// Absorbed for a few new tokens (decode, MTP verification), naive for a prompt.
    Auto,
}

pub use crate::paged::LatentCache;

/// The query projection: low-rank (`q_a_proj → q_a_layernorm → q_b_proj`) or direct (`q_proj`,
/// when `q_lora_rank` is null, as in V2-Lite).
#[derive(Clone)]
pub enum QProj {
    LowRank { q_a_proj: Linear, q_a_layernorm: RmsNorm, q_b_proj: Linear },
    Direct { q_proj: Linear },
}

#[derive(Clone)]
pub struct Mla {
    pub q: QProj,
    pub kv_a_proj_with_mqa: Linear,
    pub kv_a_layernorm: RmsNorm,
    /// `[H·(dn+dv), C]`, head-major: rows `h·(dn+dv)..+dn` are W_UK(h), the next dv are W_UV(h).
    pub kv_b_proj: Linear,
    pub o_proj: Linear,
    pub(crate) heads: usize,
    pub(crate) dn: usize,
    pub(crate) dr: usize,
    pub(crate) dv: usize,
    pub(crate) c: usize,
    pub(crate) scale: f32,
}

impl Mla {
    pub fn load(ck: &Checkpoint, p: &str, cfg: &Config, block: [usize; 2]) -> Result<Self> {
        let (h, d) = (cfg.num_attention_heads, cfg.hidden_size);
        let (dn, dr, dv, c) = (cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank);
        let q = match cfg.q_lora_rank {
            Some(rq) => QProj::LowRank {
                q_a_proj: Linear::load(ck, &format!("{p}.q_a_proj"), rq, d, block)?,
                q_a_layernorm: RmsNorm::load(ck, &format!("{p}.q_a_layernorm"), rq, cfg.rms_norm_eps)?,
                q_b_proj: Linear::load(ck, &format!("{p}.q_b_proj"), h * (dn + dr), rq, block)?,
            },
            None => QProj::Direct { q_proj: Linear::load(ck, &format!("{p}.q_proj"), h * (dn + dr), d, block)? },
        };
        Ok(Mla {
            q,
            kv_a_proj_with_mqa: Linear::load(ck, &format!("{p}.kv_a_proj_with_mqa"), c + dr, d, block)?,
            kv_a_layernorm: RmsNorm::load(ck, &format!("{p}.kv_a_layernorm"), c, cfg.rms_norm_eps)?,
            kv_b_proj: Linear::load(ck, &format!("{p}.kv_b_proj"), h * (dn + dv), c, block)?,
            o_proj: Linear::load(ck, &format!("{p}.o_proj"), d, h * dv, block)?,
            heads: h,
            dn,
            dr,
            dv,
            c,
            scale: cfg.softmax_scale(),
        })
    }

    /// `x [t, D]` for positions `cache.len()..cache.len()+t` → `[t, D]`; appends the tokens' latents.
    pub fn forward(&self, x: &[f32], t: usize, cache: &mut LatentCache, rope: &Rope, imp: AttnImpl) -> Vec<f32> {
        self.forward_segments(x, &[t], &mut [cache], rope, imp)
    }

    /// Several sequences at once: `x` holds `lens[s]` consecutive rows per sequence `s`, each after
    /// what `caches[s]` holds. The projections run once over all rows (weights read once);
    /// RoPE positions, the cache and attention are per sequence, so each sequence's rows equal
    /// what [`Self::forward`] gives it alone.
    pub fn forward_segments(
        &self,
        x: &[f32],
        lens: &[usize],
        caches: &mut [&mut LatentCache],
        rope: &Rope,
        imp: AttnImpl,
    ) -> Vec<f32> {
        let (h, dn, dr, dv, c) = (self.heads, self.dn, self.dr, self.dv, self.c);
        let dq = dn + dr;
        let n: usize = lens.iter().sum();
        // q_a (or q) and kv_a read the same input: one parallel job.
        let (first, kv_a) = match &self.q {
            QProj::LowRank { q_a_proj, .. } => (q_a_proj, &self.kv_a_proj_with_mqa),
            QProj::Direct { q_proj } => (q_proj, &self.kv_a_proj_with_mqa),
        };
        let mut both = Linear::forward_many(&[(first, x, n), (kv_a, x, n)]);
        // [n, C+R]
        let kv = both.pop().unwrap_or_default();
        let first = both.pop().unwrap_or_default();
        // [n, H, dn+dr]
        let mut q = match &self.q {
            QProj::LowRank { q_a_layernorm, q_b_proj, .. } => {
                let mut cq = first;
                q_a_layernorm.forward_in_place(&mut cq);
                q_b_proj.forward(&cq, n)
            }
            QProj::Direct { .. } => first,
        };
        // RoPE and the cache, per sequence.
        let mut starts = Vec::with_capacity(lens.len());
        let mut row0 = 0;
        for (&t, cache) in lens.iter().zip(caches.iter_mut()) {
            let start = cache.len();
            starts.push(start);
            let qs = &mut q[row0 * h * dq..(row0 + t) * h * dq];
            for i in 0..t {
                for hh in 0..h {
                    rope.apply(&mut qs[(i * h + hh) * dq + dn..(i * h + hh + 1) * dq], start + i);
                }
                let row = &kv[(row0 + i) * (c + dr)..(row0 + i + 1) * (c + dr)];
                let mut pe = row[c..].to_vec();
                rope.apply(&mut pe, start + i);
                cache.push(&self.kv_a_layernorm.forward(&row[..c]), &pe);
            }
            row0 += t;
        }
        let absorbed = |t: usize| match imp {
            AttnImpl::Naive => false,
            AttnImpl::Absorbed => true,
            AttnImpl::Auto => t <= MAX_ABSORBED_TOKENS,
        };
        let offsets: Vec<usize> = lens
            .iter()
            .scan(0, |acc, &t| {
                let o = *acc;
                *acc += t;
                Some(o)
            })
            .collect();
        let mut o = vec![0f32; n * h * dv];
        // Absorbed sequences together: the W_UK / W_UV products run once over all their tokens.
        let abs: Vec<usize> = (0..lens.len()).filter(|&s| lens[s] > 0 && absorbed(lens[s])).collect();
        if !abs.is_empty() {
            let qa: Vec<f32> = abs
                .iter()
                .flat_map(|&s| q[offsets[s] * h * dq..(offsets[s] + lens[s]) * h * dq].iter().copied())
                .collect();
            let segs: Vec<(usize, usize, &LatentCache)> =
                abs.iter().map(|&s| (lens[s], starts[s], &*caches[s])).collect();
            let oa = self.attend_absorbed(&qa, &segs);
            let mut r = 0;
            for &s in &abs {
                let len = lens[s] * h * dv;
                o[offsets[s] * h * dv..][..len].copy_from_slice(&oa[r..r + len]);
                r += len;
            }
        }
        for s in (0..lens.len()).filter(|&s| lens[s] > 0 && !absorbed(lens[s])) {
            let (t, r0) = (lens[s], offsets[s]);
            let os = self.attend_naive(&q[r0 * h * dq..(r0 + t) * h * dq], t, starts[s], caches[s]);
            o[r0 * h * dv..(r0 + t) * h * dv].copy_from_slice(&os);
        }
        self.o_proj.forward(&o, n)
    }

    /// Per-head keys `[k_nope(h) ; k_pe]` and values from `kv_b_proj(c_kv)`. Returns `[t, H·dv]`.
    fn attend_naive(&self, q: &[f32], t: usize, start: usize, cache: &LatentCache) -> Vec<f32> {
        let (h, dn, dr, dv) = (self.heads, self.dn, self.dr, self.dv);
        let (dq, dkv, s_all) = (dn + dr, dn + dv, cache.len());
        let (c_kv, k_pe) = cache.contiguous();
        // [S, H, dn+dv]
        let kv = self.kv_b_proj.forward(&c_kv, s_all);
        let mut o = vec![0f32; t * h * dv];
        o.par_chunks_mut(dv).enumerate().for_each(|(th, out)| {
            let (i, hh) = (th / h, th % h);
            let qh = &q[th * dq..(th + 1) * dq];
            let visible = start + i + 1;
            let mut p: Vec<f32> = (0..visible)
                .map(|s| {
                    let k_nope = &kv[(s * h + hh) * dkv..][..dn];
                    (dot_f32(&qh[..dn], k_nope) + dot_f32(&qh[dn..], &k_pe[s * dr..(s + 1) * dr])) * self.scale
                })
                .collect();
            softmax_in_place(&mut p);
            for (s, &ps) in p.iter().enumerate() {
                axpy_f32(out, ps, &kv[(s * h + hh) * dkv + dn..][..dv]);
            }
        });
        o
    }

    /// `q_lat(h) = q_nope(h)·W_UK(h)`, attention over the latent cache, `o(h) = o_lat(h)·W_UV(h)ᵀ`,
    /// for several sequences at once: `q` holds each segment's `t` rows in order, each segment is
    /// `(t, start, cache)`; the two weight products run once over all rows.
    fn attend_absorbed(&self, q: &[f32], segs: &[(usize, usize, &LatentCache)]) -> Vec<f32> {
        let (h, dn, dr, dv, c) = (self.heads, self.dn, self.dr, self.dv, self.c);
        let (dq, dkv) = (dn + dr, dn + dv);
        let t: usize = segs.iter().map(|s| s.0).sum();
        let w = self.kv_b_proj.weight.view();
        // Per head: [t, C]
        let q_lat_h: Vec<Vec<f32>> = (0..h)
            .into_par_iter()
            .map(|hh| {
                let x: Vec<f32> = (0..t).flat_map(|i| q[(i * h + hh) * dq..][..dn].iter().copied()).collect();
                let mut y = vec![0f32; t * c];
                matmul_nn(&w, hh * dkv..hh * dkv + dn, &x, t, &mut y);
                y
            })
            .collect();
        let mut q_lat = vec![0f32; t * h * c];
        let mut q_pe = vec![0f32; t * h * dr];
        for i in 0..t {
            for hh in 0..h {
                q_lat[(i * h + hh) * c..][..c].copy_from_slice(&q_lat_h[hh][i * c..(i + 1) * c]);
                q_pe[(i * h + hh) * dr..][..dr].copy_from_slice(&q[(i * h + hh) * dq + dn..][..dr]);
            }
        }
        let mut o_lat = vec![0f32; t * h * c];
        let mut r0 = 0;
        for &(ts, start, cache) in segs {
            let visible: Vec<usize> = (0..ts).map(|i| start + i + 1).collect();
            let shape = LatentShape { tokens: ts, heads: h, latent: c, rope: dr };
            let rows = r0 * h..(r0 + ts) * h;
            let (ck, kp) = cache.pages();
            latent_attention(
                shape,
                &q_lat[rows.start * c..rows.end * c],
                &q_pe[rows.start * dr..rows.end * dr],
                Pages { c_kv: &ck, k_pe: &kp, block: crate::paged::BLOCK_TOKENS },
                &visible,
                self.scale,
                &mut o_lat[rows.start * c..rows.end * c],
            );
            r0 += ts;
        }
        let o_h: Vec<Vec<f32>> = (0..h)
            .into_par_iter()
            .map(|hh| {
                let x: Vec<f32> = (0..t).flat_map(|i| o_lat[(i * h + hh) * c..][..c].iter().copied()).collect();
                let mut y = vec![0f32; t * dv];
                matmul_nt(&w, hh * dkv + dn..(hh + 1) * dkv, &x, t, &mut y);
                y
            })
            .collect();
        let mut o = vec![0f32; t * h * dv];
        for i in 0..t {
            for hh in 0..h {
                o[(i * h + hh) * dv..][..dv].copy_from_slice(&o_h[hh][i * dv..(i + 1) * dv]);
            }
        }
        o
    }

    /// Weight bytes one decode token reads.
    pub fn bytes(&self) -> usize {
        let q = match &self.q {
            QProj::LowRank { q_a_proj, q_b_proj, .. } => {
                q_a_proj.weight.view().bytes() + q_b_proj.weight.view().bytes()
            }
            QProj::Direct { q_proj } => q_proj.weight.view().bytes(),
        };
        q + [&self.kv_a_proj_with_mqa, &self.kv_b_proj, &self.o_proj]
            .iter()
            .map(|l| l.weight.view().bytes())
            .sum::<usize>()
    }
}
