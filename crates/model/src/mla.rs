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
use crate::exec::Exec;
use crate::grad::mla::MlaSaved;
use crate::indexer::{IndexRows, Indexer, Selection};
use crate::layers::{Linear, RmsNorm};
use crate::paged::IndexKeys;
use crate::rope::Rope;
use crate::weights::Checkpoint;
use dsv3_kernels::attention::{latent_attention, softmax_in_place, LatentShape, Pages};
use dsv3_kernels::gemm::{gemm_acc, Strided};
use dsv3_kernels::matmul::{matmul_nn, matmul_nt_batch, transpose, NtJob};
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
    pub kv_b: KvB,
    pub o_proj: Linear,
    /// V3.2's sparse attention: which positions each query attends to.
    pub indexer: Option<Indexer>,
    pub(crate) heads: usize,
    pub(crate) dn: usize,
    pub(crate) dr: usize,
    pub(crate) dv: usize,
    pub(crate) c: usize,
    pub(crate) scale: f32,
}

/// W_UK and W_UV, the latent's up-projections to each head's no-RoPE key and value.
#[derive(Clone)]
pub enum KvB {
    /// The checkpoint's `kv_b_proj [H·(dn+dv), C]`, head-major: rows `h·(dn+dv)..+dn` are
    /// W_UK(h), the next dv are W_UV(h).
    Joint(Linear),
    /// A split-MLA GGUF's, in the file's format: W_UK as `k_b [H·C, dn]` (row `h·C + j`: latent
    /// dim j's weights over head h's no-RoPE dims) and W_UV as `v_b [H·dv, C]`. The absorbed
    /// decode reads them in place (quantized kernels); the naive form, which expands whole
    /// caches, folds them into a `kv_b_proj` for the one forward ([`Mla::joint_kv_b`]), so the
    /// model holds no f32 copy.
    Split { k_b: Linear, v_b: Linear },
}

/// The names [`KvB::Split`] is read under (a GGUF's `attn_k_b` / `attn_v_b`).
pub const SPLIT_K_B: &str = "k_b_proj";
pub const SPLIT_V_B: &str = "v_b_proj";

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
            kv_b: match ck.contains(&format!("{p}.{SPLIT_K_B}.weight")) {
                true => KvB::Split {
                    k_b: Linear::load(ck, &format!("{p}.{SPLIT_K_B}"), h * c, dn, block)?,
                    v_b: Linear::load(ck, &format!("{p}.{SPLIT_V_B}"), h * dv, c, block)?,
                },
                false => KvB::Joint(Linear::load(ck, &format!("{p}.kv_b_proj"), h * (dn + dv), c, block)?),
            },
            o_proj: Linear::load(ck, &format!("{p}.o_proj"), d, h * dv, block)?,
            indexer: Indexer::load(ck, p, cfg, block)?,
            heads: h,
            dn,
            dr,
            dv,
            c,
            scale: cfg.softmax_scale(),
        })
    }

    /// `x [t, D]` for positions `cache.len()..cache.len()+t` → `[t, D]`; appends the tokens' latents.
    pub fn forward_cached(
        &self,
        cx: &Exec,
        x: &[f32],
        t: usize,
        cache: &mut LatentCache,
        rope: &Rope,
        imp: AttnImpl,
    ) -> Vec<f32> {
        self.forward(cx, x, &mut Seqs::Cached { lens: &[t], caches: &mut [cache], imp }, rope, None)
    }

    /// The one forward. `x` holds the rows of `seqs` (see [`Seqs`]); the projections run once over
    /// all rows (weights read once), RoPE positions and attention are per sequence, so each
    /// sequence's rows equal what it gives alone. With `tape` (whole sequences only), what
    /// [`Mla::backward`] needs is kept there.
    pub fn forward(
        &self,
        cx: &Exec,
        x: &[f32],
        seqs: &mut Seqs,
        rope: &Rope,
        tape: Option<&mut Option<MlaSaved>>,
    ) -> Vec<f32> {
        let n = seqs.rows();
        let positions = seqs.positions();
        let p = self.project(cx, x, n, &positions, rope);
        let (h, dv) = (self.heads, self.dv);
        match seqs {
            Seqs::Fresh { seqs, t } => {
                let (seqs, t) = (*seqs, *t);
                // [n, H, dn+dv]: keys (no-rope part) and values of every row.
                let kvb = self.joint_kv_b().forward(cx, &p.ckv, n);
                let visible: Vec<usize> = (1..=t).collect();
                let sel: Vec<Selection> = (0..seqs)
                    .map(|sq| match (&self.indexer, &p.idx) {
                        (Some(ix), Some(r)) if !cx.dense_attention => {
                            let (hi, d) = (r.w.len() / n, ix.key_dim());
                            let rows = sq * t..(sq + 1) * t;
                            let (q, w) =
                                (&r.q[rows.start * hi * d..rows.end * hi * d], &r.w[rows.start * hi..rows.end * hi]);
                            ix.select(q, w, &[IndexKeys::F32(&r.k[rows.start * d..rows.end * d])], &visible)
                        }
                        _ => vec![],
                    })
                    .collect();
                let per: Vec<(Vec<f32>, Vec<f32>)> = (0..seqs * h)
                    .into_par_iter()
                    .map(|sh| {
                        let (sq, hh) = (sh / h, sh % h);
                        let hk = HeadKv::gather(&kvb, &p.kpe, sq * t, hh, t, self);
                        self.attend_head(cx, &p.q[(sq * t * h + hh) * (self.dn + self.dr)..], &hk, t, 0, &sel[sq])
                    })
                    .collect();
                let mut probs = vec![0f32; seqs * h * t * t];
                let mut o = vec![0f32; n * h * dv];
                for (sh, (pr, oh)) in per.into_iter().enumerate() {
                    let (sq, hh) = (sh / h, sh % h);
                    probs[sh * t * t..(sh + 1) * t * t].copy_from_slice(&pr);
                    for i in 0..t {
                        o[((sq * t + i) * h + hh) * dv..][..dv].copy_from_slice(&oh[i * dv..(i + 1) * dv]);
                    }
                }
                let y = self.o_proj.forward(cx, &o, n);
                if let Some(tape) = tape {
                    let Projected { q, c_pre, ckv, kpe, cq, idx } = p;
                    let index = match (&self.indexer, idx) {
                        (Some(ix), Some(rows)) => Some(ix.train_loss(rows, &probs, h, (seqs, t), &sel, n)),
                        _ => None,
                    };
                    *tape = Some(MlaSaved { x: x.to_vec(), seqs, t, cq, c_pre, ckv, kvb, q, kpe, probs, o, index });
                }
                y
            }
            Seqs::Cached { lens, caches, imp } => {
                debug_assert!(tape.is_none(), "training runs whole sequences");
                let o = self.attend_cached(cx, &p, lens, caches, *imp);
                self.o_proj.forward(cx, &o, n)
            }
        }
    }

    /// The projections both forms share: queries `[n, H, dn+dr]` with RoPE on their rope part,
    /// the latent `c_kv` before and after `kv_a_layernorm` `[n, C]`, and the rotated shared rope
    /// key `[n, R]`; row `i` sits at position `positions[i]`.
    fn project(&self, cx: &Exec, x: &[f32], n: usize, positions: &[usize], rope: &Rope) -> Projected {
        let (h, dn, dr, c) = (self.heads, self.dn, self.dr, self.c);
        let dq = dn + dr;
        // q_a (or q) and kv_a read the same input: one parallel job.
        let first_proj = match &self.q {
            QProj::LowRank { q_a_proj, .. } => q_a_proj,
            QProj::Direct { q_proj } => q_proj,
        };
        let mut both = Linear::forward_many(cx, &[(first_proj, x, n), (&self.kv_a_proj_with_mqa, x, n)]);
        // [n, C+R]
        let kv = both.pop().unwrap_or_default();
        let first = both.pop().unwrap_or_default();
        // [n, H, dn+dr]
        let (mut q, cq) = match &self.q {
            QProj::LowRank { q_a_layernorm, q_b_proj, .. } => {
                let cqn = q_a_layernorm.forward(&first);
                (q_b_proj.forward(cx, &cqn, n), Some((first, cqn)))
            }
            QProj::Direct { .. } => (first, None),
        };
        let mut c_pre = vec![0f32; n * c];
        let mut kpe = vec![0f32; n * dr];
        for (i, &pos) in positions.iter().enumerate() {
            let row = &kv[i * (c + dr)..(i + 1) * (c + dr)];
            c_pre[i * c..(i + 1) * c].copy_from_slice(&row[..c]);
            kpe[i * dr..(i + 1) * dr].copy_from_slice(&row[c..]);
            rope.apply(&mut kpe[i * dr..(i + 1) * dr], pos);
            for hh in 0..h {
                rope.apply(&mut q[(i * h + hh) * dq + dn..(i * h + hh + 1) * dq], pos);
            }
        }
        let ckv = self.kv_a_layernorm.forward(&c_pre);
        let idx = match (&self.indexer, &cq) {
            (Some(ix), Some((_, cqn))) => Some(ix.rows(cx, x, cqn, n, positions)),
            _ => None,
        };
        Projected { q, c_pre, ckv, kpe, cq, idx }
    }

    /// One head's causal attention as GEMMs: `S = Q·Kᵀ·scale` over the `hk.len` keys, query `i` at
    /// position `start + i` seeing keys `..=start + i` (only those `sel[i]` names, where the
    /// indexer chose), softmax, `O = P·V`. `q` starts at the head's first query, rows
    /// `H·(dn+dr)` apart. Returns `P [t, len]` and `O [t, dv]`.
    pub(crate) fn attend_head(
        &self,
        cx: &Exec,
        q: &[f32],
        hk: &HeadKv,
        t: usize,
        start: usize,
        sel: &[Option<Vec<usize>>],
    ) -> (Vec<f32>, Vec<f32>) {
        let (dq, s) = (self.dn + self.dr, hk.len);
        let bf16 = cx.gemm.bf16;
        let mut p = vec![0f32; t * s];
        gemm_acc(Strided { a: q, a_s: 1, a_p: self.heads * dq }, &hk.kt, &mut p, t, s, dq, bf16);
        for i in 0..t {
            let (row, visible) = (&mut p[i * s..(i + 1) * s], start + i + 1);
            row[..visible].iter_mut().for_each(|v| *v *= self.scale);
            if let Some(Some(keep)) = sel.get(i) {
                let kept: Vec<f32> = keep.iter().map(|&s| row[s]).collect();
                row[..visible].fill(f32::NEG_INFINITY);
                keep.iter().zip(kept).for_each(|(&s, v)| row[s] = v);
            }
            softmax_in_place(&mut row[..visible]);
            row[visible..].fill(0.0);
        }
        let mut o = vec![0f32; t * self.dv];
        gemm_acc(Strided { a: &p, a_s: 1, a_p: s }, &hk.v, &mut o, t, self.dv, s, bf16);
        (p, o)
    }

    /// [`Self::attend_head`]'s output where only it is needed (inference): the rows the indexer
    /// chose for attend to their `index_topk` positions alone, gathered (prefill attention then
    /// costs `index_topk` positions per query, not the context); the rows before them (those that
    /// see at most `index_topk` positions, a prefix) as the one GEMM.
    pub(crate) fn attend_head_sparse(
        &self,
        cx: &Exec,
        q: &[f32],
        hk: &HeadKv,
        t: usize,
        start: usize,
        sel: &[Option<Vec<usize>>],
    ) -> Vec<f32> {
        use dsv3_kernels::dot::{axpy_f32, dot_f32};
        let dense = (0..t).take_while(|&i| !matches!(sel.get(i), Some(Some(_)))).count();
        if dense == t {
            return self.attend_head(cx, q, hk, t, start, sel).1;
        }
        let (dq, dv) = (self.dn + self.dr, self.dv);
        let mut o = vec![0f32; t * dv];
        if dense > 0 {
            o[..dense * dv].copy_from_slice(&self.attend_head(cx, q, hk, dense, start, &sel[..dense]).1);
        }
        let mut p = Vec::new();
        for i in dense..t {
            let Some(Some(keep)) = sel.get(i) else { unreachable!("rows past the dense prefix have a choice") };
            let qi = &q[i * self.heads * dq..][..dq];
            p.clear();
            p.extend(keep.iter().map(|&s| dot_f32(qi, &hk.k[s * dq..(s + 1) * dq]) * self.scale));
            softmax_in_place(&mut p);
            let oi = &mut o[i * dv..(i + 1) * dv];
            for (&s, &w) in keep.iter().zip(&p) {
                axpy_f32(oi, w, &hk.v[s * dv..(s + 1) * dv]);
            }
        }
        o
    }

    /// Attention over each sequence's cache (its new latents appended first): the absorbed form
    /// for the segments `imp` gives it (all at once), the naive one for the rest. `[n, H·dv]`.
    fn attend_cached(
        &self,
        cx: &Exec,
        p: &Projected,
        lens: &[usize],
        caches: &mut [&mut LatentCache],
        imp: AttnImpl,
    ) -> Vec<f32> {
        let (h, dn, dr, dv, c) = (self.heads, self.dn, self.dr, self.dv, self.c);
        let dq = dn + dr;
        let n: usize = lens.iter().sum();
        let offsets: Vec<usize> = lens
            .iter()
            .scan(0, |acc, &t| {
                let o = *acc;
                *acc += t;
                Some(o)
            })
            .collect();
        let di = self.indexer.as_ref().map_or(0, |ix| ix.key_dim());
        let mut starts = Vec::with_capacity(lens.len());
        for ((&t, &r0), cache) in lens.iter().zip(&offsets).zip(caches.iter_mut()) {
            starts.push(cache.len());
            for i in r0..r0 + t {
                let k_idx = p.idx.as_ref().map_or(IndexKeys::F32(&[]), |r| r.key(i, di));
                cache.push(&p.ckv[i * c..(i + 1) * c], &p.kpe[i * dr..(i + 1) * dr], k_idx);
            }
        }
        let sel: Vec<Selection> = (0..lens.len())
            .map(|s| match (&self.indexer, &p.idx) {
                (Some(ix), Some(r)) => {
                    let (rows, hi) = (offsets[s]..offsets[s] + lens[s], r.w.len() / n.max(1));
                    let visible: Vec<usize> = (1..=lens[s]).map(|i| starts[s] + i).collect();
                    let (q, w) = (&r.q[rows.start * hi * di..rows.end * hi * di], &r.w[rows.start * hi..rows.end * hi]);
                    ix.select(q, w, &caches[s].index_pages(), &visible)
                }
                _ => vec![],
            })
            .collect();
        // An adapter on kv_b_proj is not absorbed into the queries: the naive form expands the
        // latents through the adapted projection.
        let adapted = matches!(&self.kv_b, KvB::Joint(l) if l.lora.is_some() || !l.served.is_empty());
        let absorbed = |t: usize| match imp {
            _ if adapted => false,
            AttnImpl::Naive => false,
            AttnImpl::Absorbed => true,
            AttnImpl::Auto => t <= MAX_ABSORBED_TOKENS,
        };
        let mut o = vec![0f32; n * h * dv];
        // Absorbed sequences together: the W_UK / W_UV products run once over all their tokens.
        let abs: Vec<usize> = (0..lens.len()).filter(|&s| lens[s] > 0 && absorbed(lens[s])).collect();
        if !abs.is_empty() {
            let qa: Vec<f32> = abs
                .iter()
                .flat_map(|&s| p.q[offsets[s] * h * dq..(offsets[s] + lens[s]) * h * dq].iter().copied())
                .collect();
            let segs: Vec<Segment> = abs
                .iter()
                .map(|&s| Segment { t: lens[s], start: starts[s], cache: &*caches[s], sel: &sel[s] })
                .collect();
            let oa = self.attend_absorbed(cx, &qa, &segs);
            let mut r = 0;
            for &s in &abs {
                let len = lens[s] * h * dv;
                o[offsets[s] * h * dv..][..len].copy_from_slice(&oa[r..r + len]);
                r += len;
            }
        }
        for s in (0..lens.len()).filter(|&s| lens[s] > 0 && !absorbed(lens[s])) {
            let (t, r0) = (lens[s], offsets[s]);
            // A sequence's rows share its served adapter: its cached latents expand through it.
            let slots = cx.adapters.map(|a| vec![a[r0]; caches[s].len()]);
            let cxs = Exec { adapters: slots.as_deref(), ..*cx };
            let os = self.attend_naive(&cxs, &p.q[r0 * h * dq..(r0 + t) * h * dq], t, starts[s], caches[s], &sel[s]);
            o[r0 * h * dv..(r0 + t) * h * dv].copy_from_slice(&os);
        }
        o
    }

    /// The naive form over a cache: every cached latent expanded through `kv_b_proj` into
    /// per-head keys `[k_nope(h) ; k_pe]` and values, then [`Mla::attend_head`] per head.
    /// Returns `[t, H·dv]`.
    fn attend_naive(
        &self,
        cx: &Exec,
        q: &[f32],
        t: usize,
        start: usize,
        cache: &LatentCache,
        sel: &[Option<Vec<usize>>],
    ) -> Vec<f32> {
        let (h, dq, dv, s_all) = (self.heads, self.dn + self.dr, self.dv, cache.len());
        let (c_kv, k_pe) = cache.contiguous();
        // [S, H, dn+dv]
        let kv = self.joint_kv_b().forward(cx, &c_kv, s_all);
        let per: Vec<Vec<f32>> = (0..h)
            .into_par_iter()
            .map(|hh| {
                let hk = HeadKv::gather(&kv, &k_pe, 0, hh, s_all, self);
                self.attend_head_sparse(cx, &q[hh * dq..], &hk, t, start, sel)
            })
            .collect();
        let mut o = vec![0f32; t * h * dv];
        for (hh, oh) in per.iter().enumerate() {
            for i in 0..t {
                o[(i * h + hh) * dv..][..dv].copy_from_slice(&oh[i * dv..(i + 1) * dv]);
            }
        }
        o
    }

    /// `q_lat(h) = q_nope(h)·W_UK(h)`, attention over the latent cache, `o(h) = o_lat(h)·W_UV(h)ᵀ`,
    /// for several sequences at once: `q` holds each segment's `t` rows in order; the two weight
    /// products run once over all rows.
    fn attend_absorbed(&self, cx: &Exec, q: &[f32], segs: &[Segment]) -> Vec<f32> {
        let (h, dn, dr, dv, c) = (self.heads, self.dn, self.dr, self.dv, self.c);
        let (dq, dkv) = (dn + dr, dn + dv);
        let t: usize = segs.iter().map(|s| s.t).sum();
        let (w, split) = match &self.kv_b {
            KvB::Joint(l) => (l.weight.view(), None),
            KvB::Split { k_b, v_b } => (k_b.weight.view(), Some((k_b.weight.view(), v_b.weight.view()))),
        };
        let per_head = |src: &[f32], width: usize, off: usize, d: usize| -> Vec<Vec<f32>> {
            (0..h)
                .map(|hh| (0..t).flat_map(|i| src[(i * h + hh) * width + off..][..d].iter().copied()).collect())
                .collect()
        };
        // Per head: [t, C]
        let q_lat_h: Vec<Vec<f32>> = match &split {
            Some((k_b, _)) => {
                let xs = per_head(q, dq, 0, dn);
                let mut ys = vec![vec![0f32; t * c]; h];
                let mut jobs: Vec<NtJob> = xs
                    .iter()
                    .zip(ys.iter_mut())
                    .enumerate()
                    .map(|(hh, (x, y))| NtJob { w: *k_b, rows: hh * c..(hh + 1) * c, x, m: t, y })
                    .collect();
                matmul_nt_batch(&mut jobs, cx.gemm);
                ys
            }
            None => (0..h)
                .into_par_iter()
                .map(|hh| {
                    let x: Vec<f32> = (0..t).flat_map(|i| q[(i * h + hh) * dq..][..dn].iter().copied()).collect();
                    let mut y = vec![0f32; t * c];
                    matmul_nn(&w, hh * dkv..hh * dkv + dn, &x, t, &mut y);
                    y
                })
                .collect(),
        };
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
        for seg in segs {
            let rows = r0 * h..(r0 + seg.t) * h;
            self.attend_latent(
                seg,
                &q_lat[rows.start * c..rows.end * c],
                &q_pe[rows.start * dr..rows.end * dr],
                &mut o_lat[rows.start * c..rows.end * c],
            );
            r0 += seg.t;
        }
        let xs = per_head(&o_lat, c, 0, c);
        let mut o_h = vec![vec![0f32; t * dv]; h];
        let mut jobs: Vec<NtJob> = xs
            .iter()
            .zip(o_h.iter_mut())
            .enumerate()
            .map(|(hh, (x, y))| match &split {
                Some((_, v_b)) => NtJob { w: *v_b, rows: hh * dv..(hh + 1) * dv, x, m: t, y },
                None => NtJob { w, rows: hh * dkv + dn..(hh + 1) * dkv, x, m: t, y },
            })
            .collect();
        matmul_nt_batch(&mut jobs, cx.gemm);
        let mut o = vec![0f32; t * h * dv];
        for i in 0..t {
            for hh in 0..h {
                o[(i * h + hh) * dv..][..dv].copy_from_slice(&o_h[hh][i * dv..(i + 1) * dv]);
            }
        }
        o
    }

    /// One segment's latent attention: all its rows over the paged cache, except rows the
    /// indexer chose for, each of which attends to its chosen positions gathered into one page
    /// (decode cost proportional to `index_topk`, not to the context).
    fn attend_latent(&self, seg: &Segment, q_lat: &[f32], q_pe: &[f32], o_lat: &mut [f32]) {
        let (h, dr, c) = (self.heads, self.dr, self.c);
        let (ck, kp) = seg.cache.pages();
        let paged = Pages { c_kv: &ck, k_pe: &kp, block: crate::paged::BLOCK_TOKENS };
        if seg.sel.iter().all(Option::is_none) {
            let visible: Vec<usize> = (0..seg.t).map(|i| seg.start + i + 1).collect();
            let shape = LatentShape { tokens: seg.t, heads: h, latent: c, rope: dr };
            latent_attention(shape, q_lat, q_pe, paged, &visible, self.scale, o_lat);
            return;
        }
        let shape = LatentShape { tokens: 1, heads: h, latent: c, rope: dr };
        for i in 0..seg.t {
            let (ql, qp, o) = (
                &q_lat[i * h * c..(i + 1) * h * c],
                &q_pe[i * h * dr..(i + 1) * h * dr],
                &mut o_lat[i * h * c..(i + 1) * h * c],
            );
            match &seg.sel[i] {
                None => latent_attention(shape, ql, qp, paged, &[seg.start + i + 1], self.scale, o),
                Some(keep) => {
                    let (mut gc, mut gp) = (Vec::with_capacity(keep.len() * c), Vec::with_capacity(keep.len() * dr));
                    for &s in keep {
                        let (b, r) = (s / crate::paged::BLOCK_TOKENS, s % crate::paged::BLOCK_TOKENS);
                        gc.extend_from_slice(&ck[b][r * c..(r + 1) * c]);
                        gp.extend_from_slice(&kp[b][r * dr..(r + 1) * dr]);
                    }
                    let one = Pages { c_kv: &[&gc], k_pe: &[&gp], block: usize::MAX };
                    latent_attention(shape, ql, qp, one, &[keep.len()], self.scale, o);
                }
            }
        }
    }

    /// `kv_b_proj` as the checkpoint stores it: borrowed, or folded from the split tensors (the
    /// same f32 values a fold at load would hold, for as long as the caller keeps it).
    pub fn joint_kv_b(&self) -> std::borrow::Cow<'_, Linear> {
        use std::borrow::Cow;
        let (k_b, v_b) = match &self.kv_b {
            KvB::Joint(l) => return Cow::Borrowed(l),
            KvB::Split { k_b, v_b } => (k_b.weight.view(), v_b.weight.view()),
        };
        let (h, dn, dv, c) = (self.heads, self.dn, self.dv, self.c);
        let mut out = vec![0f32; h * (dn + dv) * c];
        out.par_chunks_mut((dn + dv) * c).enumerate().for_each(|(hh, rows)| {
            // W_UK(h)ᵀ: k_b's rows h·C..(h+1)·C are [C, dn].
            let mut kh = vec![0f32; c * dn];
            for (j, r) in kh.chunks_exact_mut(dn).enumerate() {
                k_b.decode_row(hh * c + j, 0, r);
            }
            for i in 0..dn {
                for j in 0..c {
                    rows[i * c + j] = kh[j * dn + i];
                }
            }
            for (v, r) in rows[dn * c..].chunks_exact_mut(c).enumerate() {
                v_b.decode_row(hh * dv + v, 0, r);
            }
        });
        Cow::Owned(Linear::new(crate::weights::Matrix::from_f32(h * (dn + dv), c, out)))
    }

    /// For training: the split tensors folded into `kv_b_proj` for good (the optimizer keeps f32
    /// masters of every weight anyway, and a saved checkpoint has the Hugging Face layout).
    pub fn join_kv_b(&mut self) {
        if let std::borrow::Cow::Owned(l) = self.joint_kv_b() {
            self.kv_b = KvB::Joint(l);
        }
    }

    /// Weight bytes one decode token reads.
    pub fn bytes(&self) -> usize {
        let q = match &self.q {
            QProj::LowRank { q_a_proj, q_b_proj, .. } => {
                q_a_proj.weight.view().bytes() + q_b_proj.weight.view().bytes()
            }
            QProj::Direct { q_proj } => q_proj.weight.view().bytes(),
        };
        let kv_b = match &self.kv_b {
            KvB::Split { k_b, v_b } => k_b.weight.view().bytes() + v_b.weight.view().bytes(),
            KvB::Joint(l) => l.weight.view().bytes(),
        };
        let ix = self.indexer.as_ref().map_or(0, Indexer::bytes);
        q + kv_b + ix + [&self.kv_a_proj_with_mqa, &self.o_proj].iter().map(|l| l.weight.view().bytes()).sum::<usize>()
    }
}

/// The sequences one forward runs over.
pub enum Seqs<'a, 'c> {
    /// `seqs` whole sequences of `t` tokens each at positions `0..t`, with no cache (training):
    /// `seqs·t` rows, sequence-major.
    Fresh { seqs: usize, t: usize },
    /// New tokens after what each cache holds (inference): `lens[s]` consecutive rows for
    /// sequence `s`, appended to `caches[s]`.
    Cached { lens: &'a [usize], caches: &'a mut [&'c mut LatentCache], imp: AttnImpl },
}

impl Seqs<'_, '_> {
    pub fn rows(&self) -> usize {
        match self {
            Seqs::Fresh { seqs, t } => seqs * t,
            Seqs::Cached { lens, .. } => lens.iter().sum(),
        }
    }

    /// The position of every row.
    fn positions(&self) -> Vec<usize> {
        match self {
            Seqs::Fresh { seqs, t } => (0..seqs * t).map(|i| i % t).collect(),
            Seqs::Cached { lens, caches, .. } => {
                lens.iter().zip(caches.iter()).flat_map(|(&t, c)| c.len()..c.len() + t).collect()
            }
        }
    }
}

/// What [`Mla::project`] gives.
struct Projected {
    /// `[n, H, dn+dr]`, rope part rotated.
    q: Vec<f32>,
    /// `[n, C]` latent before `kv_a_layernorm`, and after.
    c_pre: Vec<f32>,
    ckv: Vec<f32>,
    /// `[n, R]` rotated shared rope key.
    kpe: Vec<f32>,
    /// `q_a_proj`'s output and its norm (low-rank queries only).
    cq: Option<(Vec<f32>, Vec<f32>)>,
    /// The indexer's queries, weights and keys (sparse attention only).
    idx: Option<IndexRows>,
}

/// One sequence's part of an absorbed call: its `t` new rows at positions `start..`, its cache
/// (the new rows already appended) and the indexer's choice per row (empty: dense).
struct Segment<'a> {
    t: usize,
    start: usize,
    cache: &'a LatentCache,
    sel: &'a [Option<Vec<usize>>],
}

/// One head's keys and values over `len` positions, laid out for the GEMMs: `k [len, dn+dr]`
/// (`[k_nope ; k_pe]`), `kt` its transpose, `v [len, dv]` and `vt` its transpose.
pub(crate) struct HeadKv {
    pub(crate) len: usize,
    pub(crate) k: Vec<f32>,
    pub(crate) kt: Vec<f32>,
    pub(crate) v: Vec<f32>,
    pub(crate) vt: Vec<f32>,
}

impl HeadKv {
    /// Head `hh`'s rows `row0..row0 + len` of `kvb [., H, dn+dv]` and `kpe [., R]`.
    pub(crate) fn gather(kvb: &[f32], kpe: &[f32], row0: usize, hh: usize, len: usize, m: &Mla) -> Self {
        let (h, dn, dr, dv) = (m.heads, m.dn, m.dr, m.dv);
        let (dq, dkv) = (dn + dr, dn + dv);
        let mut k = vec![0f32; len * dq];
        let mut v = vec![0f32; len * dv];
        for j in 0..len {
            let r = row0 + j;
            k[j * dq..j * dq + dn].copy_from_slice(&kvb[(r * h + hh) * dkv..][..dn]);
            k[j * dq + dn..(j + 1) * dq].copy_from_slice(&kpe[r * dr..(r + 1) * dr]);
            v[j * dv..(j + 1) * dv].copy_from_slice(&kvb[(r * h + hh) * dkv + dn..][..dv]);
        }
        HeadKv { len, kt: transpose(&k, len, dq), vt: transpose(&v, len, dv), k, v }
    }
}
