//! The f32 GEMM throughput of this machine through dsv3's kernel (`gemm_acc`), the reference for
//! training's model-FLOPs utilization: `cargo run --release -p dsv3-kernels --example gemm_peak`.

use dsv3_kernels::gemm::{gemm_acc, Strided};
use std::time::Instant;

fn main() {
    for &(m, n, k) in &[(1024usize, 1024usize, 1024usize), (1024, 256, 768), (256, 128, 256)] {
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 7) % 13) as f32 * 0.01).collect();
        let b: Vec<f32> = (0..k * n).map(|i| ((i * 5) % 11) as f32 * 0.01).collect();
        let mut c = vec![0f32; m * n];
        let run = |c: &mut Vec<f32>| gemm_acc(Strided { a: &a, a_s: 1, a_p: k }, &b, c, m, n, k, false);
        run(&mut c);
        let reps = (4e9 / (2.0 * (m * n * k) as f64)).ceil() as usize;
        let t = Instant::now();
        for _ in 0..reps {
            run(&mut c);
        }
        let gflops = 2.0 * (m * n * k * reps) as f64 / t.elapsed().as_secs_f64() / 1e9;
        println!("gemm_acc {m}×{n}×{k}: {gflops:.1} GFLOP/s on {} threads", rayon::current_num_threads());
    }
}
