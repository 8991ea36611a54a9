//! GEMV throughput per weight format: `cargo run --release -p dsv3-kernels --example gemv`.
//! Prints weight GB/s at one token for a matrix that fits in L2 and one that streams from memory,
//! on one thread and on the whole pool, so a kernel's compute ceiling and the memory's can be
//! told apart.

use dsv3_kernels::matmul::matmul_nt;
use dsv3_kernels::MatRef;
use std::time::Instant;

fn time(w: &MatRef, x: &[f32], y: &mut [f32], reps: usize) -> f64 {
    matmul_nt(w, 0..w.rows(), x, 1, y, dsv3_kernels::matmul::Gemm::BATCH_INVARIANT);
    let t = Instant::now();
    for _ in 0..reps {
        matmul_nt(w, 0..w.rows(), x, 1, y, dsv3_kernels::matmul::Gemm::BATCH_INVARIANT);
    }
    (w.bytes() * reps) as f64 / t.elapsed().as_secs_f64() / 1e9
}

fn main() {
    let cols: usize = 1024;
    for (label, rows) in [("L2-resident 256 KiB FP8", 256usize), ("streamed 256 MiB FP8", 256 * 1024)] {
        let fp8: Vec<u8> = (0..rows * cols).map(|i| ((i * 37 % 251) as u8) & 0x7e).collect();
        let bf16: Vec<u8> = (0..rows * cols * 2).map(|i| if i % 2 == 1 { 0x3f } else { (i * 13) as u8 }).collect();
        let scale = vec![0.01f32; rows.div_ceil(128) * cols.div_ceil(128)];
        let x: Vec<f32> = (0..cols).map(|i| (i as f32).sin()).collect();
        let mut y = vec![0f32; rows];
        let reps = (1 << 30) / (rows * cols);
        let mats = [
            ("fp8", MatRef::Fp8 { data: &fp8, scale_inv: &scale, rows, cols, block: [128, 128] }),
            ("bf16", MatRef::Bf16 { data: &bf16, rows, cols }),
        ];
        for (name, w) in mats {
            let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
            let g1 = one.install(|| time(&w, &x, &mut y, reps));
            let gn = time(&w, &x, &mut y, reps);
            println!(
                "{label:>26} {name:>5}: {g1:6.1} GB/s on 1 thread, {gn:6.1} GB/s on {} threads",
                rayon::current_num_threads()
            );
        }
    }
}
