//! The bf16 mode of `gemm_acc`: inputs rounded to bf16 where the CPU has AVX512-BF16, f32 elsewhere.

use dsv3_kernels::codec::{bf16_to_f32, f32_to_bf16};
use dsv3_kernels::gemm::{bf16_available, gemm_acc, reference, Strided};
use rand::{Rng, SeedableRng};

#[test]
fn bf16_inputs_match_a_reference_on_rounded_values() {
    if !bf16_available() {
        eprintln!("no AVX512-BF16 on this CPU: gemm_acc's bf16 mode runs in f32");
        let (a, b) = ([0.1f32, 0.2, 0.3], [1.0f32 / 3.0]);
        let (mut c, mut f) = ([0f32; 3], [0f32; 3]);
        gemm_acc(Strided { a: &a, a_s: 3, a_p: 1 }, &b, &mut c, 3, 1, 1, true);
        gemm_acc(Strided { a: &a, a_s: 3, a_p: 1 }, &b, &mut f, 3, 1, 1, false);
        assert_eq!(c, f);
        return;
    }
    let round = |v: &[f32]| v.iter().map(|&x| bf16_to_f32(f32_to_bf16(x))).collect::<Vec<f32>>();
    let mut rng = rand::rngs::StdRng::seed_from_u64(22);
    for &(rows, cols, depth) in &[(1usize, 1usize, 1usize), (3, 17, 5), (13, 47, 33), (70, 100, 64)] {
        let b: Vec<f32> = (0..depth * cols).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let at: Vec<f32> = (0..depth * rows).map(|_| rng.gen_range(-1.0..1.0)).collect();
        let (br, atr) = (round(&b), round(&at));
        for (a, ar) in [
            (Strided { a: &at, a_s: rows, a_p: 1 }, Strided { a: &atr, a_s: rows, a_p: 1 }),
            (Strided { a: &at, a_s: 1, a_p: depth }, Strided { a: &atr, a_s: 1, a_p: depth }),
        ] {
            let mut c = vec![0f32; rows * cols];
            gemm_acc(a, &b, &mut c, rows, cols, depth, true);
            let want = reference(ar, &br, rows, cols, depth);
            for (g, w) in c.iter().zip(&want) {
                assert!((g - w).abs() < 1e-4 * (1.0 + w.abs()), "{rows}x{cols}x{depth}: {g} vs {w}");
            }
            // And it is not the f32 result: the inputs really were rounded.
            let mut f = vec![0f32; rows * cols];
            gemm_acc(a, &b, &mut f, rows, cols, depth, false);
            assert!(depth < 5 || c.iter().zip(&f).any(|(x, y)| x != y));
        }
    }
}
