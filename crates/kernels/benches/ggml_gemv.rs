//! Decode-time GEMV throughput per ggml format: one `[rows, cols]` matrix against 1 token,
//! GB/s of weight bytes read (`cargo bench -p dsv3-kernels --bench ggml_gemv`). With
//! `GGML_GEMV_BIG=1`, a matrix past the last-level cache on every core: the streamed rate a
//! decode sees. `GGML_GEMV_M=8`: 8 tokens at once (prefill and batched decode), Gweights/s
//! counting each token's products.

use dsv3_kernels::ggml::{self, GgmlType};
use dsv3_kernels::{gemv, MatRef};
use std::time::Instant;

fn main() {
    let big = std::env::var("GGML_GEMV_BIG").is_ok_and(|v| v == "1");
    let (rows, cols) = if big { (65536usize, 2048usize) } else { (4096usize, 2048usize) };
    let threads = if big { rayon::current_num_threads() } else { 1 };
    let m: usize = std::env::var("GGML_GEMV_M").ok().and_then(|v| v.parse().ok()).unwrap_or(1);
    let x: Vec<f32> = (0..m * cols).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
    // `cargo bench ... -- q4_K q6_K` times only those formats.
    let only: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    for ty in ggml::ALL.into_iter().filter(|t| only.is_empty() || only.iter().any(|o| o == t.name())) {
        let bytes = ty.row_bytes(cols).unwrap() * rows;
        // Random-looking codes with normal f16 scales (subnormal scales would time the FPU's
        // microcode assists, not the kernel).
        let mut data: Vec<u8> = (0..bytes).map(|i| ((i as u64 * 2654435761) >> 13) as u8).collect();
        let f16_at: &[usize] = match ty {
            GgmlType::F32 | GgmlType::F16 | GgmlType::Bf16 => &[],
            GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4K | GgmlType::Q5K => &[0, 2],
            GgmlType::Q2K => &[80, 82],
            GgmlType::Q3K => &[108],
            GgmlType::Q6K => &[208],
            GgmlType::Iq1M => &[],
            GgmlType::Mxfp4 => &[],
            _ => &[0],
        };
        for b in data.chunks_exact_mut(ty.block_bytes()) {
            match ty {
                GgmlType::F32 => b.copy_from_slice(&0.01f32.to_le_bytes()),
                GgmlType::F16 | GgmlType::Bf16 => b.copy_from_slice(&[0x66, 0x2e]),
                GgmlType::Mxfp4 => b[0] = 120,
                GgmlType::Iq1M => b[48..56].iter_mut().for_each(|v| *v &= 0x2f),
                _ => {}
            }
            for &o in f16_at {
                b[o..o + 2].copy_from_slice(&[0x66, 0x2e]);
            }
        }
        let w = MatRef::Ggml { data: &data, rows, cols, kind: ty };
        let mut out = vec![0f32; rows * m];
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        let run = |out: &mut [f32]| {
            use rayon::prelude::*;
            // Bands of rows per thread, as the decode's matmul jobs split them.
            let band = rows / (8 * threads);
            pool.install(|| {
                out.par_chunks_mut(band * m)
                    .enumerate()
                    .for_each(|(i, o)| gemv::rows_dots(&w, i * band..(i + 1) * band, &x, m, o))
            })
        };
        run(&mut out);
        let reps = (2e9 / bytes as f64).clamp(3.0, 200.0) as usize;
        let t = Instant::now();
        for _ in 0..reps {
            run(&mut out);
        }
        let s = t.elapsed().as_secs_f64() / reps as f64;
        println!(
            "{:8} {:5.2} bpw  {:7.2} GB/s  {:7.2} Gweights/s ({threads} threads, {m} tokens)",
            ty.name(),
            ty.bits_per_weight(),
            bytes as f64 / s / 1e9,
            (rows * cols * m) as f64 / s / 1e9
        );
    }
}
