//! FP8 GEMM with fine-grained scaling, DeepGEMM's contract (spec parallel §7):
//!
//! `D[m, n] = Σ_kb sa[m, kb]·sb[n/br, kb]·Σ_{k ∈ kb} qa[m, k]·qb[n, k]`
//!
//! with `A [M, K]` in ar×T tiles and `B [N, K]` in br×T blocks (T = 128; A: ar = 1, the report's
//! activation tiles, or 128 for its Dgrad experiment; B: br = 128 for weights or 1 for Wgrad's
//! second operand). `sa[m, kb]` stands for `sa[m/ar, kb]`. Each K block's products are summed in a fresh f32 tile and promoted
//! into the f32 result with the two scales at the block's end: the report's "promotion to CUDA
//! cores every N_C = 128". The per-block product of codes runs on [`gemm_acc`] with bf16
//! inputs, which is exact for E4M3 values (4 significant bits in bf16's 8), so only the f32
//! accumulation rounds, as on the tensor core after promotion.
//!
//! [`reference`] emulates an accumulator of limited precision (Hopper's FP8 WGMMA keeps about 14
//! bits) so the report's promotion experiment can be reproduced.

use crate::formats::E4M3;
use crate::gemm::{gemm_acc, Strided};
use crate::quant::Fp8Blocks;
use rayon::prelude::*;

fn check(a: &Fp8Blocks, b: &Fp8Blocks) {
    assert!(
        a.cols == b.cols && a.block[1] == b.block[1],
        "fp8 gemm: A [M, K] and B [N, K] need the same K and K tile (A {:?} {}x{}, B {:?} {}x{})",
        a.block,
        a.rows,
        a.cols,
        b.block,
        b.rows,
        b.cols
    );
}

/// `D = A·Bᵀ` (row-major `[a.rows, b.rows]`), promoting every K block.
pub fn gemm_nt(a: &Fp8Blocks, b: &Fp8Blocks) -> Vec<f32> {
    check(a, b);
    let (m, n, k, t) = (a.rows, b.rows, a.cols, a.block[1]);
    let mut d = vec![0f32; m * n];
    if m == 0 || n == 0 || k == 0 {
        return d;
    }
    let table = E4M3.table();
    let decode = |codes: &[u8]| -> Vec<f32> {
        let mut v = vec![0f32; codes.len()];
        v.par_chunks_mut(1 << 14).zip(codes.par_chunks(1 << 14)).for_each(|(v, c)| {
            v.iter_mut().zip(c).for_each(|(v, &c)| *v = table[c as usize]);
        });
        v
    };
    // Code values (exact in bf16): A as [m, k]; B transposed to [k, n] (gemm_acc's B layout),
    // decoded in bands of 16 columns of codes so each band's output rows stay in cache.
    let av = decode(&a.codes);
    let mut bv = vec![0f32; k * n];
    bv.par_chunks_mut(16 * n).enumerate().for_each(|(i, band)| {
        let s0 = 16 * i;
        for q in 0..n {
            for (j, &c) in b.codes[q * k + s0..][..band.len() / n].iter().enumerate() {
                band[j * n + q] = table[c as usize];
            }
        }
    });
    let (nb, br) = (k.div_ceil(t), b.block[0]);
    // B's scale of every output column, per K block: `sb[kb·n + q]`.
    let sb: Vec<f32> = (0..nb).flat_map(|kb| (0..n).map(move |q| b.scales[(q / br) * nb + kb])).collect();
    // Bands of rows (the GEMM parallelizes within one); each K block's tile is promoted while it
    // is still in cache.
    const BAND: usize = 256;
    let mut tile = vec![0f32; BAND.min(m) * n];
    for (i, dband) in d.chunks_mut(BAND * n).enumerate() {
        let (p0, rows) = (i * BAND, dband.len() / n);
        let tile = &mut tile[..rows * n];
        for kb in 0..nb {
            let (k0, kt) = (kb * t, t.min(k - kb * t));
            tile.fill(0.0);
            let ab = Strided { a: &av[p0 * k + k0..], a_s: 1, a_p: k };
            gemm_acc(ab, &bv[k0 * n..(k0 + kt) * n], tile, rows, n, kt, true);
            let sb = &sb[kb * n..(kb + 1) * n];
            dband.par_chunks_mut(n).zip(tile.par_chunks(n)).enumerate().for_each(|(r, (drow, trow))| {
                let sa = a.scales[((p0 + r) / a.block[0]) * nb + kb];
                for ((dv, &tv), &s) in drow.iter_mut().zip(trow).zip(sb) {
                    *dv += sa * s * tv;
                }
            });
        }
    }
    d
}

/// DeepGEMM's grouped "contiguous" layout (MoE): rows of `a` belong to the expert in
/// `m_indices` (−1: no expert, output row 0), each expert with its own `B [N, K]`.
pub fn grouped_gemm_nt(a: &Fp8Blocks, m_indices: &[i32], bs: &[Fp8Blocks]) -> Vec<f32> {
    assert_eq!(m_indices.len(), a.rows, "grouped gemm: one index per row");
    assert_eq!(a.block[0], 1, "grouped gemm: A in 1×T tiles (rows move between experts)");
    let n = bs.first().map_or(0, |b| b.rows);
    assert!(bs.iter().all(|b| b.rows == n), "grouped gemm: every expert's B has N rows");
    let (k, nb) = (a.cols, a.cols.div_ceil(a.block[1]));
    let mut d = vec![0f32; a.rows * n];
    for (g, b) in bs.iter().enumerate() {
        let rows: Vec<usize> = (0..a.rows).filter(|&r| m_indices[r] == g as i32).collect();
        if rows.is_empty() {
            continue;
        }
        let sub = Fp8Blocks {
            codes: rows.iter().flat_map(|&r| a.codes[r * k..(r + 1) * k].iter().copied()).collect(),
            scales: rows.iter().flat_map(|&r| a.scales[r * nb..(r + 1) * nb].iter().copied()).collect(),
            rows: rows.len(),
            cols: k,
            block: a.block,
        };
        for (&r, out) in rows.iter().zip(gemm_nt(&sub, b).chunks_exact(n.max(1))) {
            d[r * n..(r + 1) * n].copy_from_slice(out);
        }
    }
    d
}

/// Scalar definitions: exact accumulation (the promoted GEMM's target) and an accumulator of
/// limited precision.
pub mod reference {
    use crate::formats::E4M3;
    use crate::quant::Fp8Blocks;

    /// How each K block's sum of code products is accumulated before the scales apply.
    #[derive(Clone, Copy, Debug)]
    pub enum Accumulator {
        /// In f64 (exact for these products): what promotion approximates.
        Exact,
        /// Products summed exactly `group` at a time (one tensor-core step: K = 32 for FP8 WGMMA),
        /// each group sum added to an accumulator that keeps `bits` significant bits, truncating
        /// the rest (the report measured ~14 bits on H800).
        Limited { bits: u32, group: usize },
    }

    /// `x` truncated toward zero to `bits` significant bits.
    pub fn truncate(x: f64, bits: u32) -> f64 {
        if x == 0.0 || !x.is_finite() {
            return x;
        }
        let e = x.abs().log2().floor() as i32;
        let q = (2f64).powi(e - bits as i32 + 1);
        (x / q).trunc() * q
    }

    /// `D = A·Bᵀ` with each K tile of A and B (one tile = the whole K for per-tensor scaling, i.e.
    /// no promotion) accumulated by `acc`, then scaled and added in f64.
    pub fn gemm_nt(a: &Fp8Blocks, b: &Fp8Blocks, acc: Accumulator) -> Vec<f32> {
        super::check(a, b);
        let (m, n, k, t, br) = (a.rows, b.rows, a.cols, a.block[1], b.block[0]);
        let nb = k.div_ceil(t);
        let mut d = vec![0f32; m * n];
        for p in 0..m {
            for q in 0..n {
                let mut total = 0f64;
                for kb in 0..nb {
                    let prod =
                        |i: usize| E4M3.decode(a.codes[p * k + i]) as f64 * E4M3.decode(b.codes[q * k + i]) as f64;
                    let range = kb * t..((kb + 1) * t).min(k);
                    let sum = match acc {
                        Accumulator::Exact => range.map(prod).sum::<f64>(),
                        Accumulator::Limited { bits, group } => {
                            let idx: Vec<usize> = range.collect();
                            idx.chunks(group)
                                .fold(0f64, |s, g| truncate(s + g.iter().map(|&i| prod(i)).sum::<f64>(), bits))
                        }
                    };
                    total += a.scales[(p / a.block[0]) * nb + kb] as f64 * b.scales[(q / br) * nb + kb] as f64 * sum;
                }
                d[p * n + q] = total as f32;
            }
        }
        d
    }
}

/// Relative errors `|D − D_exact| / |D_exact|` of every output of `x [m, K]·w [n, K]ᵀ` with a
/// `bits`-bit accumulator (`group` products per step): first without promotion (one scale per row over
/// all of K, as a tensor core must without promotion), then with 1×128 / 128×128 scaling and
/// promotion every 128. Positive inputs avoid cancellation, so the error is the accumulator's.
pub fn promotion_experiment(x: &[f32], w: &[f32], k: usize, bits: u32, group: usize) -> (Vec<f64>, Vec<f64>) {
    use reference::{gemm_nt as refgemm, Accumulator};
    let (m, n) = (x.len() / k, w.len() / k);
    let run = |t: usize, br: usize| {
        let a = Fp8Blocks::quantize(x, m, k, [1, t], crate::quant::ScaleFmt::F32);
        let b = Fp8Blocks::quantize(w, n, k, [br, t], crate::quant::ScaleFmt::F32);
        let exact = refgemm(&a, &b, Accumulator::Exact);
        let got = refgemm(&a, &b, Accumulator::Limited { bits, group });
        got.iter().zip(&exact).map(|(&g, &e)| ((g as f64 - e as f64) / e as f64).abs()).collect::<Vec<f64>>()
    };
    (run(k, n.max(1)), run(128, 128))
}

#[cfg(test)]
mod tests {
    use super::reference::Accumulator;
    use super::*;
    use crate::quant::ScaleFmt;
    use rand::{Rng, SeedableRng};

    fn random(n: usize, rng: &mut impl Rng) -> Vec<f32> {
        (0..n).map(|_| rng.gen_range(-1.0f32..1.0) * rng.gen_range(-4.0f32..4.0).exp2()).collect()
    }

    #[test]
    fn gemm_matches_the_exact_reference_on_ragged_shapes() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(4);
        for (m, n, k, ar, br) in [
            (1, 1, 1, 1, 128),
            (3, 5, 129, 1, 128),
            (17, 130, 300, 1, 128),
            (40, 33, 256, 1, 1),
            (9, 260, 128, 1, 128),
            (300, 20, 140, 128, 128),
        ] {
            let a = Fp8Blocks::quantize(&random(m * k, &mut rng), m, k, [ar, 128], ScaleFmt::F32);
            let b = Fp8Blocks::quantize(&random(n * k, &mut rng), n, k, [br, 128], ScaleFmt::F32);
            let got = gemm_nt(&a, &b);
            let want = reference::gemm_nt(&a, &b, Accumulator::Exact);
            // Error bound from the magnitudes: f32 accumulation of ≤ K terms.
            let (aa, ba) = (a.dequantize(), b.dequantize());
            for p in 0..m {
                for q in 0..n {
                    let mag: f32 = (0..k).map(|i| (aa[p * k + i] * ba[q * k + i]).abs()).sum();
                    let (g, w) = (got[p * n + q], want[p * n + q]);
                    assert!((g - w).abs() <= 1e-6 * mag + 1e-30, "({m},{n},{k}) [{p},{q}]: {g} vs {w}");
                }
            }
        }
    }

    #[test]
    fn grouped_gemm_equals_each_experts_gemm() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let (m, n, k) = (23, 40, 200);
        let a = Fp8Blocks::quantize(&random(m * k, &mut rng), m, k, [1, 128], ScaleFmt::F32);
        let bs: Vec<Fp8Blocks> =
            (0..3).map(|_| Fp8Blocks::quantize(&random(n * k, &mut rng), n, k, [128, 128], ScaleFmt::F32)).collect();
        let idx: Vec<i32> = (0..m).map(|_| rng.gen_range(-1..3)).collect();
        let d = grouped_gemm_nt(&a, &idx, &bs);
        for (r, &g) in idx.iter().enumerate() {
            let row = Fp8Blocks {
                codes: a.codes[r * k..(r + 1) * k].to_vec(),
                scales: a.scales[r * 2..(r + 1) * 2].to_vec(),
                rows: 1,
                cols: k,
                block: a.block,
            };
            let want = if g < 0 { vec![0f32; n] } else { gemm_nt(&row, &bs[g as usize]) };
            assert_eq!(&d[r * n..(r + 1) * n], &want[..], "row {r} expert {g}");
        }
    }

    /// The report's §3.3.2 observation at K = 4096: a ~14-bit accumulator loses about 2% without
    /// promotion; promoting every 128 keeps the error at bf16 level.
    #[test]
    fn promotion_keeps_a_limited_accumulator_within_bf16_error() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let k = 4096;
        let x: Vec<f32> = (0..8 * k).map(|_| rng.gen_range(0.0..1.0)).collect();
        let w: Vec<f32> = (0..8 * k).map(|_| rng.gen_range(0.0..1.0)).collect();
        let (errs_plain, errs_promoted) = promotion_experiment(&x, &w, k, 14, 32);
        eprintln!(
            "K=4096, 14-bit accumulator: max rel. error {:.3}% plain, {:.4}% promoted",
            100.0 * errs_plain.iter().copied().fold(0.0, f64::max),
            100.0 * errs_promoted.iter().copied().fold(0.0, f64::max)
        );
        let worst = |e: &[f64]| e.iter().copied().fold(0.0, f64::max);
        let bf16_eps = 2f64.powi(-8);
        assert!(worst(&errs_promoted) < bf16_eps, "promoted: {}", worst(&errs_promoted));
        assert!(
            worst(&errs_plain) > 4.0 * worst(&errs_promoted),
            "plain {} vs promoted {}",
            worst(&errs_plain),
            worst(&errs_promoted)
        );
    }
}
