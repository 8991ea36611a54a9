//! GEMMs with the weight in its stored format: `x·Wᵀ` (every `Linear`) and `x·W` (the absorbed
//! MLA's key up-projection), over a range of weight rows so one packed matrix can serve per-head
//! slices.
//!
//! Each weight row is decoded in registers once per group of up to 8 tokens and
//! dotted with all of them ([`crate::gemv`]), so decode reads a matrix from memory once per call
//! and prefill decodes each weight m/8 times against 8·m multiply-adds. A task owns a range of
//! rows and walks every token group over it while those rows sit in cache.

use crate::gemm::{gemm_acc, Strided};
use crate::gemv::rows_dots;
use crate::matrix::MatRef;
use rayon::prelude::*;
use std::ops::Range;

/// From this many tokens, f32 weights go through [`gemm_acc`] (a transposed copy of the weight
/// costs O(n·k) against O(m·n·k)) when the caller asks for it ([`Gemm::many_token`]: training);
/// otherwise everything uses the GEMV kernel, whose per-token result does not depend on which
/// other tokens share the call.
const GEMM_M: usize = 32;
/// Tokens per GEMV group: the kernel's batch-invariant width.
const GROUP: usize = 8;

/// How a product runs, chosen by the caller at every call (no process-wide switch decides it).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Gemm {
    /// Many-token products on f32 weights through the blocked GEMM: faster, but a token's result
    /// then depends on the token count (training). Off: the batch-invariant GEMV kernel.
    pub many_token: bool,
    /// The blocked GEMM rounds its inputs to bf16 where the CPU has AVX512-BF16 (training's bf16
    /// compute; see [`gemm_acc`]).
    pub bf16: bool,
}

impl Gemm {
    /// Inference: the GEMV kernel everywhere, f32.
    pub const BATCH_INVARIANT: Gemm = Gemm { many_token: false, bf16: false };
}

/// Work (multiply-adds) under which a call stays on the calling thread.
const SERIAL_WORK: usize = 1 << 15;

/// A pointer that rayon tasks may share because each task writes a disjoint set of elements.
#[derive(Clone, Copy)]
struct SharedOut(*mut f32);
// SAFETY: used only for writes to disjoint elements, one task per element set.
unsafe impl Send for SharedOut {}
unsafe impl Sync for SharedOut {}

/// `y[m, n] = x[m, cols] · W[rows]ᵀ` with `n = rows.len()`.
pub fn matmul_nt(w: &MatRef, rows: Range<usize>, x: &[f32], m: usize, y: &mut [f32], g: Gemm) {
    matmul_nt_batch(&mut [NtJob { w: *w, rows, x, m, y }], g);
}

/// One `y[m, n] = x[m, cols] · W[rows]ᵀ` of a batch.
pub struct NtJob<'a> {
    pub w: MatRef<'a>,
    pub rows: Range<usize>,
    pub x: &'a [f32],
    pub m: usize,
    pub y: &'a mut [f32],
}

/// Several independent products as one parallel job. At decode the matrices of a step are small
/// (q_a and kv_a; gate and up of every selected expert), and waking the threads once for all of
/// them rather than once per matrix saves a visible share of a token's time.
pub fn matmul_nt_batch(jobs: &mut [NtJob], g: Gemm) {
    struct Job<'a> {
        w: MatRef<'a>,
        r0: usize,
        n: usize,
        x: &'a [f32],
        m: usize,
        y: SharedOut,
        /// The tokens as int8, once per job, for weights with an integer body.
        qx: Option<Vec<crate::ggml::vnni::QuantAct>>,
    }
    let mut live = Vec::new();
    for j in jobs.iter_mut() {
        let (n, k) = (j.rows.len(), j.w.cols());
        assert!(j.rows.end <= j.w.rows() && j.x.len() == j.m * k && j.y.len() == j.m * n, "matmul_nt shape mismatch");
        if j.m == 0 || n == 0 {
            continue;
        }
        if let (MatRef::F32 { data, .. }, true) = (j.w, j.m >= GEMM_M && g.many_token) {
            // Many tokens on f32 weights (training): the register-blocked GEMM over Wᵀ.
            let wt = transpose(&data[j.rows.start * k..j.rows.end * k], n, k);
            j.y.fill(0.0);
            gemm_acc(Strided { a: j.x, a_s: 1, a_p: k }, &wt, j.y, j.m, n, k, g.bf16);
            continue;
        }
        let qx = crate::gemv::quantized_acts(&j.w, j.x, j.m);
        live.push(Job { w: j.w, r0: j.rows.start, n, x: j.x, m: j.m, y: SharedOut(j.y.as_mut_ptr()), qx });
    }
    let work: usize = live.iter().map(|s| s.m * s.n * s.w.cols()).sum();
    // Row ranges of about an eighth of a thread's share, so stealing evens out the ends.
    let per_task = (work / (8 * rayon::current_num_threads())).max(SERIAL_WORK / 4);
    let tasks: Vec<(usize, Range<usize>)> = live
        .iter()
        .enumerate()
        .flat_map(|(s, job)| {
            let rows = (per_task / (job.m * job.w.cols()).max(1)).max(4).min(job.n);
            (0..job.n).step_by(rows).map(move |i| (s, i..(i + rows).min(job.n)))
        })
        .collect();
    let body = |(s, range): &(usize, Range<usize>)| {
        let job = &live[*s];
        let (k, n, m) = (job.w.cols(), job.n, job.m);
        let rows = job.r0 + range.start..job.r0 + range.end;
        if m == 1 {
            // SAFETY: each task owns rows `range` of its job's output, which for one token are
            // the contiguous elements range.start..range.end of y (length n, checked).
            let y = unsafe { std::slice::from_raw_parts_mut(job.y.0.add(range.start), range.len()) };
            match &job.qx {
                Some(q) => crate::gemv::rows_dots_quantized(&job.w, rows, q, y),
                None => rows_dots(&job.w, rows, job.x, 1, y),
            }
            return;
        }
        // The integer body takes every token at once (each row's codes decoded once); the
        // others run GROUP tokens at a time.
        let group = if job.qx.is_some() { m } else { GROUP };
        let mut dots = vec![0f32; range.len() * group];
        for t0 in (0..m).step_by(group) {
            let g = group.min(m - t0);
            match &job.qx {
                Some(q) => crate::gemv::rows_dots_quantized(&job.w, rows.clone(), &q[t0..t0 + g], &mut dots),
                None => rows_dots(&job.w, rows.clone(), &job.x[t0 * k..(t0 + g) * k], g, &mut dots),
            }
            for (i, d) in range.clone().zip(dots.chunks_exact(g)) {
                for (t, &v) in d.iter().enumerate() {
                    // SAFETY: as above; element (t0 + t, i) lies inside this job's y of m·n.
                    unsafe { *job.y.0.add((t0 + t) * n + i) = v };
                }
            }
        }
    };
    if work >= SERIAL_WORK && tasks.len() > 1 {
        tasks.par_iter().for_each(body);
    } else {
        tasks.iter().for_each(body);
    }
}

/// `y[m, cols] = x[m, n] · W[rows]` with `n = rows.len()`.
pub fn matmul_nn(w: &MatRef, rows: Range<usize>, x: &[f32], m: usize, y: &mut [f32]) {
    let (n, c) = (rows.len(), w.cols());
    assert!(rows.end <= w.rows() && x.len() == m * n && y.len() == m * c, "matmul_nn shape mismatch");
    y.fill(0.0);
    if m == 0 || c == 0 {
        return;
    }
    // Column chunks keep FP8 scale blocks whole when they are 128 wide.
    const CHUNK: usize = 128;
    let out = SharedOut(y.as_mut_ptr());
    let body = |c0: usize| {
        let cw = CHUNK.min(c - c0);
        // Moves the whole wrapper in: a closure naming `out.0` would capture the bare pointer,
        // which is not Sync.
        #[allow(clippy::redundant_locals)]
        let out = out;
        for t in 0..m {
            // SAFETY: this task alone writes columns c0..c0+cw of y.
            let yt = unsafe { std::slice::from_raw_parts_mut(out.0.add(t * c + c0), cw) };
            for (i, r) in rows.clone().enumerate() {
                w.row_axpy(r, c0, x[t * n + i], yt);
            }
        }
    };
    if m * n * c >= SERIAL_WORK {
        (0..c).step_by(CHUNK).collect::<Vec<_>>().into_par_iter().for_each(body);
    } else {
        (0..c).step_by(CHUNK).for_each(body);
    }
}

/// `dw[n, k] += dy[m, n]ᵀ · x[m, k]`: the weight gradient of `y = x·Wᵀ`, summed over the m tokens.
pub fn matmul_tn_acc(dy: &[f32], x: &[f32], m: usize, n: usize, k: usize, dw: &mut [f32], bf16: bool) {
    assert!(dy.len() == m * n && x.len() == m * k && dw.len() == n * k, "matmul_tn_acc shape mismatch");
    gemm_acc(Strided { a: dy, a_s: n, a_p: 1 }, x, dw, n, k, m, bf16);
}

/// `y[m, k] = x[m, n] · W[n, k]` for an f32 `W` (the input gradient of `y = x·Wᵀ`).
pub fn matmul_nn_f32(w: &[f32], n: usize, k: usize, x: &[f32], m: usize, y: &mut [f32], bf16: bool) {
    assert!(w.len() == n * k && x.len() == m * n && y.len() == m * k, "matmul_nn_f32 shape mismatch");
    y.fill(0.0);
    gemm_acc(Strided { a: x, a_s: 1, a_p: n }, w, y, m, k, n, bf16);
}

/// `[rows, cols]` → `[cols, rows]`, in cache-sized tiles, bands of output rows in parallel.
pub fn transpose(a: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    const T: usize = 32;
    let mut out = vec![0f32; rows * cols];
    if rows == 0 || cols == 0 {
        return out;
    }
    let band = |(b, chunk): (usize, &mut [f32])| {
        let c0 = b * T;
        let cw = chunk.len() / rows;
        for r0 in (0..rows).step_by(T) {
            for r in r0..(r0 + T).min(rows) {
                let src = &a[r * cols + c0..r * cols + c0 + cw];
                for (j, &v) in src.iter().enumerate() {
                    chunk[j * rows + r] = v;
                }
            }
        }
    };
    if rows * cols >= SERIAL_WORK {
        out.par_chunks_mut(T * rows).enumerate().for_each(band);
    } else {
        out.chunks_mut(T * rows).enumerate().for_each(band);
    }
    out
}

/// Scalar references: decode the whole slice and multiply naively.
pub mod reference {
    use crate::matrix::MatRef;
    use std::ops::Range;

    pub fn matmul_nt(w: &MatRef, rows: Range<usize>, x: &[f32], m: usize) -> Vec<f32> {
        let (k, wf) = (w.cols(), w.to_f32());
        let n = rows.len();
        let mut y = vec![0f32; m * n];
        for t in 0..m {
            for (i, r) in rows.clone().enumerate() {
                y[t * n + i] = (0..k).map(|j| x[t * k + j] as f64 * wf[r * k + j] as f64).sum::<f64>() as f32;
            }
        }
        y
    }

    pub fn matmul_nn(w: &MatRef, rows: Range<usize>, x: &[f32], m: usize) -> Vec<f32> {
        let (c, wf) = (w.cols(), w.to_f32());
        let n = rows.len();
        let mut y = vec![0f32; m * c];
        for t in 0..m {
            for j in 0..c {
                y[t * c + j] =
                    rows.clone().enumerate().map(|(i, r)| x[t * n + i] as f64 * wf[r * c + j] as f64).sum::<f64>()
                        as f32;
            }
        }
        y
    }

    pub fn matmul_tn_acc(dy: &[f32], x: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
        let mut dw = vec![0f32; n * k];
        for o in 0..n {
            for i in 0..k {
                dw[o * k + i] = (0..m).map(|t| dy[t * n + o] as f64 * x[t * k + i] as f64).sum::<f64>() as f32;
            }
        }
        dw
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{f32_to_bf16, f32_to_fp8_e4m3};
    use rand::{Rng, SeedableRng};

    struct Owned {
        f32s: Vec<f32>,
        bf16: Vec<u8>,
        fp8: Vec<u8>,
        scale: Vec<f32>,
        rows: usize,
        cols: usize,
        block: [usize; 2],
    }

    fn random(rows: usize, cols: usize, block: [usize; 2], rng: &mut impl Rng) -> Owned {
        let f32s: Vec<f32> = (0..rows * cols).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let bf16 = f32s.iter().flat_map(|&v| f32_to_bf16(v).to_le_bytes()).collect();
        let (nb0, nb1) = (rows.div_ceil(block[0]), cols.div_ceil(block[1]));
        let scale: Vec<f32> = (0..nb0 * nb1).map(|_| rng.gen_range(0.001..0.01)).collect();
        let fp8 = (0..rows * cols)
            .map(|i| {
                let s = scale[(i / cols / block[0]) * nb1 + (i % cols) / block[1]];
                f32_to_fp8_e4m3(f32s[i] / s)
            })
            .collect();
        Owned { f32s, bf16, fp8, scale, rows, cols, block }
    }

    fn views(o: &Owned) -> [MatRef<'_>; 3] {
        let (rows, cols) = (o.rows, o.cols);
        [
            MatRef::F32 { data: &o.f32s, rows, cols },
            MatRef::Bf16 { data: &o.bf16, rows, cols },
            MatRef::Fp8 { data: &o.fp8, scale_inv: &o.scale, rows, cols, block: o.block },
        ]
    }

    fn assert_close(a: &[f32], b: &[f32], what: &str) {
        for (i, (p, q)) in a.iter().zip(b).enumerate() {
            assert!((p - q).abs() <= 1e-4 * (1.0 + q.abs()), "{what}[{i}]: {p} vs {q}");
        }
    }

    #[test]
    fn matmuls_match_reference_for_every_format_and_ragged_blocks() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        // Shapes that are not multiples of the block (ragged edge blocks) and several token counts
        // on both sides of SMALL_M.
        for &(rows, cols) in &[(1usize, 1usize), (5, 130), (200, 300), (64, 256), (300, 129)] {
            let o = random(rows, cols, [128, 128], &mut rng);
            for w in views(&o) {
                w.validate().unwrap();
                for m in [1usize, 3, 8, 9, 40] {
                    for range in [0..rows, rows / 3..rows] {
                        let x: Vec<f32> = (0..m * cols).map(|_| rng.gen_range(-1.0..1.0)).collect();
                        let mut y = vec![0f32; m * range.len()];
                        matmul_nt(&w, range.clone(), &x, m, &mut y, Gemm::BATCH_INVARIANT);
                        let want = reference::matmul_nt(&w, range.clone(), &x, m);
                        assert_close(&y, &want, &format!("nt {:?} {rows}x{cols} m={m}", w.format()));
                        // The training GEMM path (f32 weights, many tokens) gives the same.
                        let mut y = vec![0f32; m * range.len()];
                        matmul_nt(&w, range.clone(), &x, m, &mut y, Gemm { many_token: true, bf16: false });
                        assert_close(&y, &want, &format!("nt gemm {:?} {rows}x{cols} m={m}", w.format()));

                        let x: Vec<f32> = (0..m * range.len()).map(|_| rng.gen_range(-1.0..1.0)).collect();
                        let mut y = vec![0f32; m * cols];
                        matmul_nn(&w, range.clone(), &x, m, &mut y);
                        let want = reference::matmul_nn(&w, range.clone(), &x, m);
                        assert_close(&y, &want, &format!("nn {:?} {rows}x{cols} m={m}", w.format()));
                    }
                }
            }
        }
    }

    #[test]
    fn weight_gradient_matches_reference() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(13);
        for &(m, n, k) in &[(1usize, 1usize, 1usize), (3, 5, 7), (40, 130, 33), (64, 300, 128)] {
            let dy: Vec<f32> = (0..m * n).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let x: Vec<f32> = (0..m * k).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let mut dw = vec![0.5f32; n * k];
            matmul_tn_acc(&dy, &x, m, n, k, &mut dw, false);
            let want: Vec<f32> = reference::matmul_tn_acc(&dy, &x, m, n, k).iter().map(|v| v + 0.5).collect();
            assert_close(&dw, &want, &format!("tn {m}x{n}x{k}"));
            // The input gradient through the transposed weight equals the strided reference.
            let w: Vec<f32> = (0..n * k).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let mut y = vec![0f32; m * k];
            matmul_nn_f32(&w, n, k, &dy, m, &mut y, false);
            let wm = MatRef::F32 { data: &w, rows: n, cols: k };
            assert_close(&y, &reference::matmul_nn(&wm, 0..n, &dy, m), &format!("nn_f32 {m}x{n}x{k}"));
        }
    }

    #[test]
    fn a_batch_equals_its_jobs_run_one_by_one() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(12);
        let mats: Vec<Owned> = [(300usize, 200usize), (64, 1024), (7, 33)]
            .iter()
            .map(|&(r, c)| random(r, c, [128, 128], &mut rng))
            .collect();
        let ms = [1usize, 2, 8, 9, 0, 3];
        let xs: Vec<Vec<f32>> = ms
            .iter()
            .enumerate()
            .map(|(i, &m)| (0..m * mats[i % 3].cols).map(|_| rng.gen_range(-1.0..1.0)).collect())
            .collect();
        for f in 0..3 {
            let mut ys: Vec<Vec<f32>> = ms.iter().enumerate().map(|(i, &m)| vec![0f32; m * mats[i % 3].rows]).collect();
            let mut jobs: Vec<NtJob> = ys
                .iter_mut()
                .enumerate()
                .map(|(i, y)| NtJob { w: views(&mats[i % 3])[f], rows: 0..mats[i % 3].rows, x: &xs[i], m: ms[i], y })
                .collect();
            matmul_nt_batch(&mut jobs, Gemm::BATCH_INVARIANT);
            for (i, y) in ys.iter().enumerate() {
                let w = views(&mats[i % 3])[f];
                assert_close(
                    y,
                    &reference::matmul_nt(&w, 0..w.rows(), &xs[i], ms[i]),
                    &format!("job {i} {:?}", w.format()),
                );
            }
        }
    }

    #[test]
    fn fp8_dequantizes_by_multiplying_the_block_scale() {
        // One value per block with distinct scales, so a swapped or divided scale shows.
        let (rows, cols) = (130usize, 257usize);
        let nb1 = cols.div_ceil(128);
        let scale: Vec<f32> = (0..2 * nb1).map(|i| 0.5 + i as f32).collect();
        let data = vec![0x38u8; rows * cols]; // 1.0
        let w = MatRef::Fp8 { data: &data, scale_inv: &scale, rows, cols, block: [128, 128] };
        let wf = w.to_f32();
        assert_eq!(wf[0], 0.5);
        assert_eq!(wf[128], 1.5);
        assert_eq!(wf[256], 2.5);
        assert_eq!(wf[129 * cols], 0.5 + nb1 as f32);
        assert_eq!(wf[129 * cols + 256], 0.5 + (nb1 + 2) as f32);
    }
}
