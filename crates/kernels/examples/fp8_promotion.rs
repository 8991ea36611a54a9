//! The report's §3.3.2 experiment: a K = 4096 FP8 GEMM whose accumulator keeps ~14 bits, with and
//! without promotion to f32 every 128 products, and the speed of the promoted GEMM against the f32
//! GEMM on the same shape: `cargo run --release -p dsv3-kernels --example fp8_promotion`.

use dsv3_kernels::fp8_gemm::{gemm_nt, promotion_experiment};
use dsv3_kernels::gemm::{gemm_acc, Strided};
use dsv3_kernels::quant::{Fp8Blocks, ScaleFmt};
use rand::{Rng, SeedableRng};
use std::time::Instant;

fn main() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let (k, m, n) = (4096, 16, 16);
    let x: Vec<f32> = (0..m * k).map(|_| rng.gen_range(0.0..1.0)).collect();
    let w: Vec<f32> = (0..n * k).map(|_| rng.gen_range(0.0..1.0)).collect();
    println!("K={k}, {m}x{n} outputs, positive uniform inputs; max (mean) relative error vs exact accumulation");
    println!("| accumulator | products per add | no promotion | promotion every 128 |\n|---|---|---|---|");
    for (bits, group) in [(14, 32), (14, 8), (14, 4), (13, 32), (24, 32)] {
        let (plain, promoted) = promotion_experiment(&x, &w, k, bits, group);
        let stat =
            |e: &[f64]| (100.0 * e.iter().copied().fold(0.0, f64::max), 100.0 * e.iter().sum::<f64>() / e.len() as f64);
        let ((pm, pa), (qm, qa)) = (stat(&plain), stat(&promoted));
        println!("| {bits} bits, truncating | {group} | {pm:.3}% ({pa:.3}%) | {qm:.4}% ({qa:.4}%) |");
    }
    let (m, n, k) = (512, 1024, 1024);
    let x: Vec<f32> = (0..m * k).map(|_| rng.gen_range(-1.0..1.0)).collect();
    let w: Vec<f32> = (0..n * k).map(|_| rng.gen_range(-1.0..1.0)).collect();
    let (a, b) = (
        Fp8Blocks::quantize(&x, m, k, [1, 128], ScaleFmt::F32),
        Fp8Blocks::quantize(&w, n, k, [128, 128], ScaleFmt::F32),
    );
    let wt = dsv3_kernels::matmul::transpose(&w, n, k);
    let time = |f: &mut dyn FnMut()| {
        f();
        let t = Instant::now();
        for _ in 0..5 {
            f();
        }
        2.0 * (m * n * k * 5) as f64 / t.elapsed().as_secs_f64() / 1e9
    };
    let fp8 = time(&mut || drop(gemm_nt(&a, &b)));
    let f32g = time(&mut || {
        let mut c = vec![0f32; m * n];
        gemm_acc(Strided { a: &x, a_s: 1, a_p: k }, &wt, &mut c, m, n, k, false);
    });
    println!(
        "{m}x{n}x{k}: FP8 block-scaled with promotion {fp8:.1} GFLOP/s, f32 gemm_acc {f32g:.1} GFLOP/s ({:.2}x)",
        fp8 / f32g
    );
}
