//! The small building blocks: `Linear` over a stored matrix, `RmsNorm`, and the SwiGLU `Mlp`
//! (dense FFN, routed expert and shared expert alike).

use crate::error::Result;
use crate::exec::Exec;
use crate::grad::layers::MlpSaved;
use crate::weights::{Checkpoint, Matrix};
use dsv3_kernels::matmul::{matmul_nt_batch, NtJob};
use dsv3_kernels::quant::Fp8Blocks;

/// `y = x·Wᵀ`, no bias (DeepSeek-V3 has none), plus a LoRA adapter's `scale·(x·Aᵀ)·Bᵀ` when one
/// is attached. The weight stays in its stored format.
#[derive(Clone)]
pub struct Linear {
    pub weight: Matrix,
    pub lora: Option<Box<Lora>>,
    /// Adapters served per request (`dsv3 serve --lora`): slot `k` at `served[k - 1]`, applied to
    /// the rows [`Exec::adapters`] gives `k`.
    pub served: Vec<Option<Box<Lora>>>,
}

/// A low-rank adapter (LoRA, Hu et al. 2021, in PEFT's layout): `A [r, in]`, `B [out, r]`, f32
/// whatever the base weight's format; `scale = α/r`.
#[derive(Clone)]
pub struct Lora {
    pub a: Matrix,
    pub b: Matrix,
    pub scale: f32,
}

/// An adapter's update to compute: the adapter, its input `[m, in]` and `m`.
pub type LoraJob<'a> = (&'a Lora, &'a [f32], usize);

impl Lora {
    /// PEFT's initialization: `A` uniform in `±1/√in` (Kaiming-uniform with `a = √5`), `B = 0`, so
    /// the adapted layer starts equal to the base.
    pub fn init(out: usize, inp: usize, rank: usize, alpha: f32, rng: &mut impl rand::Rng) -> Self {
        let bound = 1.0 / (inp as f32).sqrt();
        let a = (0..rank * inp).map(|_| rng.gen_range(-bound..bound)).collect();
        Lora {
            a: Matrix::from_f32(rank, inp, a),
            b: Matrix::from_f32(out, rank, vec![0.0; out * rank]),
            scale: alpha / rank as f32,
        }
    }

    pub fn rank(&self) -> usize {
        self.a.rows
    }

    /// `scale·(x·Aᵀ)·Bᵀ` of each `(adapter, x [m, in], m)`: the `x·Aᵀ` of all of them as one
    /// parallel job, then the `·Bᵀ`.
    pub fn updates(cx: &Exec, jobs: &[LoraJob]) -> Vec<Vec<f32>> {
        if jobs.is_empty() {
            return vec![];
        }
        let mut xa: Vec<Vec<f32>> = jobs.iter().map(|&(a, _, m)| vec![0f32; m * a.rank()]).collect();
        let mut nt: Vec<NtJob> = jobs
            .iter()
            .zip(xa.iter_mut())
            .map(|(&(a, x, m), y)| NtJob { w: a.a.view(), rows: 0..a.rank(), x, m, y })
            .collect();
        matmul_nt_batch(&mut nt, cx.gemm);
        let mut up: Vec<Vec<f32>> = jobs.iter().map(|&(a, _, m)| vec![0f32; m * a.b.rows]).collect();
        let mut nt: Vec<NtJob> = jobs
            .iter()
            .zip(xa.iter())
            .zip(up.iter_mut())
            .map(|((&(a, _, m), x), y)| NtJob { w: a.b.view(), rows: 0..a.b.rows, x, m, y })
            .collect();
        matmul_nt_batch(&mut nt, cx.gemm);
        for (u, &(a, _, _)) in up.iter_mut().zip(jobs) {
            u.iter_mut().for_each(|v| *v *= a.scale);
        }
        up
    }

    /// `scale·B·A [out, in]`: what merging adds to the weight.
    pub fn delta(&self) -> Vec<f32> {
        let mut d = vec![0f32; self.b.rows * self.a.cols];
        self.add_delta_rows(0, &mut d);
        d
    }

    /// Adds rows `r0..` of `scale·B·A` into `w` (whole rows of the weight, from row `r0`).
    pub fn add_delta_rows(&self, r0: usize, w: &mut [f32]) {
        let (inp, r) = (self.a.cols, self.a.rows);
        let (a, b) = (self.a.view().to_f32(), self.b.view().to_f32());
        for (o, row) in w.chunks_exact_mut(inp).enumerate() {
            for k in 0..r {
                let c = self.scale * b[(r0 + o) * r + k];
                row.iter_mut().zip(&a[k * inp..(k + 1) * inp]).for_each(|(d, &a)| *d += c * a);
            }
        }
    }
}

impl Linear {
    pub fn new(weight: Matrix) -> Self {
        Linear { weight, lora: None, served: vec![] }
    }

    pub fn load(ck: &Checkpoint, prefix: &str, out_dim: usize, in_dim: usize, block: [usize; 2]) -> Result<Self> {
        Ok(Linear::new(ck.matrix(&format!("{prefix}.weight"), out_dim, in_dim, block)?))
    }

    pub fn out_dim(&self) -> usize {
        self.weight.rows
    }

    /// `x [m, in]` → `[m, out]`.
    pub fn forward(&self, cx: &Exec, x: &[f32], m: usize) -> Vec<f32> {
        Linear::forward_many(cx, &[(self, x, m)]).pop().unwrap_or_default()
    }

    /// Several `Linear`s, each on its own `[m, in]` input, as one parallel job (decode-time
    /// matrices are small; waking the threads once for all of them is cheaper).
    pub fn forward_many(cx: &Exec, calls: &[(&Linear, &[f32], usize)]) -> Vec<Vec<f32>> {
        Linear::forward_many_rows(cx, calls, &vec![cx.adapters; calls.len()])
    }

    /// [`Self::forward_many`] with each call's rows' served adapters given (`rows[i]`: call `i`'s,
    /// one per row of its input).
    pub fn forward_many_rows(cx: &Exec, calls: &[(&Linear, &[f32], usize)], rows: &[Option<&[u16]>]) -> Vec<Vec<f32>> {
        let mut ys = Linear::base_many(cx, calls);
        Linear::add_lora(cx, calls, &mut ys);
        for (i, &(l, x, m)) in calls.iter().enumerate() {
            if let (false, Some(slots)) = (l.served.is_empty(), rows[i]) {
                assert_eq!(slots.len(), m, "a served adapter per row");
                l.add_served(cx, x, slots, &mut ys[i]);
            }
        }
        ys
    }

    /// The adapters' `scale·(x·Aᵀ)·Bᵀ` of the calls that have one, added into their outputs.
    fn add_lora(cx: &Exec, calls: &[(&Linear, &[f32], usize)], ys: &mut [Vec<f32>]) {
        let with: Vec<(usize, LoraJob)> =
            calls.iter().enumerate().filter_map(|(i, &(l, x, m))| l.lora.as_deref().map(|a| (i, (a, x, m)))).collect();
        let jobs: Vec<LoraJob> = with.iter().map(|w| w.1).collect();
        for ((i, _), u) in with.iter().zip(Lora::updates(cx, &jobs)) {
            ys[*i].iter_mut().zip(&u).for_each(|(y, u)| *y += u);
        }
    }

    /// The served adapters' updates on the rows that chose one: each adapter over its rows.
    fn add_served(&self, cx: &Exec, x: &[f32], slots: &[u16], y: &mut [f32]) {
        let (inp, out) = (self.weight.cols, self.weight.rows);
        let groups: Vec<(&Lora, Vec<usize>, Vec<f32>)> = self
            .served
            .iter()
            .enumerate()
            .filter_map(|(k, a)| {
                let rows: Vec<usize> = (0..slots.len()).filter(|&r| slots[r] as usize == k + 1).collect();
                let xs = rows.iter().flat_map(|&r| x[r * inp..(r + 1) * inp].iter().copied()).collect();
                a.as_deref().filter(|_| !rows.is_empty()).map(|a| (a, rows, xs))
            })
            .collect();
        let jobs: Vec<LoraJob> = groups.iter().map(|(a, r, xs)| (*a, xs.as_slice(), r.len())).collect();
        for ((_, rows, _), u) in groups.iter().zip(Lora::updates(cx, &jobs)) {
            for (i, &r) in rows.iter().enumerate() {
                y[r * out..(r + 1) * out].iter_mut().zip(&u[i * out..(i + 1) * out]).for_each(|(y, u)| *y += u);
            }
        }
    }

    /// The base weights' products.
    fn base_many(cx: &Exec, calls: &[(&Linear, &[f32], usize)]) -> Vec<Vec<f32>> {
        if let Some(r) = cx.fp8 {
            return calls.iter().map(|&(l, x, m)| crate::grad::fp8::forward(r, &l.weight, x, m)).collect();
        }
        // Dynamic activation quantization: each token's 128-column tiles rounded to E4M3 with
        // their own scale, then the weight kernel as usual. The products are those of an FP8×FP8
        // GEMM with promotion (up to f32 rounding); a CPU has no FP8 arithmetic to gain speed from.
        let quantized: Vec<Vec<f32>>;
        let requantized: Vec<(&Linear, &[f32], usize)>;
        let calls = if cx.act_quant_fp8 {
            quantized = calls
                .iter()
                .map(|&(l, x, m)| Fp8Blocks::quantize(x, m, l.weight.cols, [1, 128], cx.act_scale_fmt).dequantize())
                .collect();
            requantized = calls.iter().zip(&quantized).map(|(&(l, _, m), q)| (l, q.as_slice(), m)).collect();
            &requantized[..]
        } else {
            calls
        };
        let mut ys: Vec<Vec<f32>> = calls.iter().map(|(l, _, m)| vec![0f32; m * l.weight.rows]).collect();
        let mut jobs: Vec<NtJob> = calls
            .iter()
            .zip(ys.iter_mut())
            .map(|(&(l, x, m), y)| NtJob { w: l.weight.view(), rows: 0..l.weight.rows, x, m, y })
            .collect();
        matmul_nt_batch(&mut jobs, cx.gemm);
        ys
    }
}

/// `y = w ⊙ x / sqrt(mean(x²) + eps)` per row, in f32.
#[derive(Clone)]
pub struct RmsNorm {
    pub weight: Vec<f32>,
    pub eps: f32,
}

impl RmsNorm {
    pub fn load(ck: &Checkpoint, name: &str, dim: usize, eps: f32) -> Result<Self> {
        Ok(RmsNorm { weight: ck.f32s(&format!("{name}.weight"), &[dim])?, eps })
    }

    pub fn forward(&self, x: &[f32]) -> Vec<f32> {
        let mut y = x.to_vec();
        self.forward_in_place(&mut y);
        y
    }

    pub fn forward_in_place(&self, x: &mut [f32]) {
        let d = self.weight.len();
        for row in x.chunks_exact_mut(d) {
            let ms = row.iter().map(|v| v * v).sum::<f32>() / d as f32;
            let r = 1.0 / (ms + self.eps).sqrt();
            row.iter_mut().zip(&self.weight).for_each(|(v, w)| *v = w * (*v * r));
        }
    }
}

/// `y = w ⊙ (x − mean) / sqrt(var + eps) + b` per row, in f32 (torch's `nn.LayerNorm`; V3.2's
/// indexer normalizes its keys with one).
#[derive(Clone)]
pub struct LayerNorm {
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
    pub eps: f32,
}

impl LayerNorm {
    pub fn load(ck: &Checkpoint, name: &str, dim: usize, eps: f32) -> Result<Self> {
        let (weight, bias) = (ck.f32s(&format!("{name}.weight"), &[dim])?, ck.f32s(&format!("{name}.bias"), &[dim])?);
        Ok(LayerNorm { weight, bias, eps })
    }

    pub fn forward_in_place(&self, x: &mut [f32]) {
        let d = self.weight.len();
        for row in x.chunks_exact_mut(d) {
            let mean = row.iter().sum::<f32>() / d as f32;
            let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / d as f32;
            let r = 1.0 / (var + self.eps).sqrt();
            for ((v, w), b) in row.iter_mut().zip(&self.weight).zip(&self.bias) {
                *v = (*v - mean) * r * w + b;
            }
        }
    }
}

/// SwiGLU FFN: `down(silu(gate(x)) ⊙ up(x))`.
#[derive(Clone)]
pub struct Mlp {
    pub gate_proj: Linear,
    pub up_proj: Linear,
    pub down_proj: Linear,
}

impl Mlp {
    pub fn load(ck: &Checkpoint, prefix: &str, hidden: usize, inter: usize, block: [usize; 2]) -> Result<Self> {
        Ok(Mlp {
            gate_proj: Linear::load(ck, &format!("{prefix}.gate_proj"), inter, hidden, block)?,
            up_proj: Linear::load(ck, &format!("{prefix}.up_proj"), inter, hidden, block)?,
            down_proj: Linear::load(ck, &format!("{prefix}.down_proj"), hidden, inter, block)?,
        })
    }

    /// `x [m, hidden]` → `[m, hidden]`; with `tape`, what [`Mlp::backward`] needs.
    pub fn forward(&self, cx: &Exec, x: &[f32], m: usize, tape: Option<&mut Option<MlpSaved>>) -> Vec<f32> {
        let mut saved = tape.as_ref().map(|_| Vec::new());
        let y = Mlp::forward_many(cx, &[(self, x, m)], saved.as_mut()).pop().unwrap_or_default();
        if let Some(t) = tape {
            *t = saved.and_then(|mut v| v.pop());
        }
        y
    }

    /// Several MLPs, each on its own tokens (a step's selected experts and the shared one), as two
    /// parallel jobs: gate and up of all of them, then down of all of them. With `saved`, each
    /// call's activations are pushed there in call order.
    pub fn forward_many(
        cx: &Exec,
        calls: &[(&Mlp, &[f32], usize)],
        saved: Option<&mut Vec<MlpSaved>>,
    ) -> Vec<Vec<f32>> {
        Mlp::forward_many_rows(cx, calls, &vec![cx.adapters; calls.len()], saved)
    }

    /// [`Self::forward_many`] with each call's rows' served adapters given (routed experts run on
    /// a selection of the batch's rows).
    pub fn forward_many_rows(
        cx: &Exec,
        calls: &[(&Mlp, &[f32], usize)],
        rows: &[Option<&[u16]>],
        saved: Option<&mut Vec<MlpSaved>>,
    ) -> Vec<Vec<f32>> {
        let gate_up: Vec<(&Linear, &[f32], usize)> =
            calls.iter().flat_map(|&(mlp, x, m)| [(&mlp.gate_proj, x, m), (&mlp.up_proj, x, m)]).collect();
        let pair_rows: Vec<Option<&[u16]>> = rows.iter().flat_map(|&r| [r, r]).collect();
        let gu = Linear::forward_many_rows(cx, &gate_up, &pair_rows);
        let hidden: Vec<Vec<f32>> =
            gu.chunks_exact(2).map(|p| p[0].iter().zip(&p[1]).map(|(&g, &u)| silu(g) * u).collect()).collect();
        let down: Vec<(&Linear, &[f32], usize)> =
            calls.iter().zip(&hidden).map(|(&(mlp, _, m), h)| (&mlp.down_proj, h.as_slice(), m)).collect();
        let ys = Linear::forward_many_rows(cx, &down, rows);
        if let Some(saved) = saved {
            let mut gu = gu.into_iter();
            for (&(_, x, m), hidden) in calls.iter().zip(hidden) {
                let (gate, up) = (gu.next().unwrap_or_default(), gu.next().unwrap_or_default());
                saved.push(MlpSaved { x: x.to_vec(), gate, up, hidden, m });
            }
        }
        ys
    }

    /// Weight bytes one token reads.
    pub fn bytes(&self) -> usize {
        [&self.gate_proj, &self.up_proj, &self.down_proj].iter().map(|l| l.weight.view().bytes()).sum()
    }
}

#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}
