//! `--act-quant fp8` (issue 4): every Linear input rounded to E4M3 per token and 128-column tile.

use dsv3_kernels::quant::{Fp8Blocks, ScaleFmt};
use dsv3_model::exec::{Exec, Inference};
use dsv3_model::experts::LOCAL;
use dsv3_model::init::{preset, write_random_checkpoint, StoreDtype};
use dsv3_model::layers::Linear;
use dsv3_model::weights::Matrix;
use dsv3_model::DeepseekV3;

#[test]
fn linear_inputs_are_quantized_per_token_tile_and_the_model_stays_close() {
    // One Linear: with the switch on, the output is the product with the quantized input.
    let (m, k, n) = (3, 300, 5);
    let x: Vec<f32> = (0..m * k).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013).collect();
    let w: Vec<f32> = (0..n * k).map(|i| ((i * 53 % 97) as f32 - 48.0) * 0.01).collect();
    let lin = Linear::new(Matrix::from_f32(n, k, w.clone()));
    let xq = Fp8Blocks::quantize(&x, m, k, [1, 128], ScaleFmt::F32).dequantize();
    let off = Exec::inference(Inference::default(), &LOCAL);
    let on = Exec::inference(Inference { act_quant_fp8: true, ..Inference::default() }, &LOCAL);
    let plain = lin.forward(&off, &xq, m);
    let quant = lin.forward(&on, &x, m);
    assert_eq!(plain, quant);
    assert_ne!(lin.forward(&off, &x, m), quant);
    // A checkpoint declaring `scale_fmt: ue8m0` (V3.1, V3.2) rounds the scales to powers of two.
    let ue8m0 = Exec { act_scale_fmt: ScaleFmt::Ue8m0, ..on };
    let xq8 = Fp8Blocks::quantize(&x, m, k, [1, 128], ScaleFmt::Ue8m0).dequantize();
    assert_eq!(lin.forward(&off, &xq8, m), lin.forward(&ue8m0, &x, m));
    assert_ne!(xq8, xq);

    let dir = std::env::temp_dir().join(format!("dsv3-actq-{}", std::process::id()));
    write_random_checkpoint(&dir, &preset("tiny").unwrap(), StoreDtype::Fp8, 2).unwrap();
    let mut model = DeepseekV3::load(&dir).unwrap();
    std::fs::remove_dir_all(&dir).ok();
    let ids = [3u32, 4, 5, 6, 7];
    let a = model.forward(&ids, &mut model.new_cache()).unwrap();
    model.inference.act_quant_fp8 = true;
    let b = model.forward(&ids, &mut model.new_cache()).unwrap();
    let dot: f64 = a.iter().zip(&b).map(|(&x, &y)| x as f64 * y as f64).sum();
    let nrm = |v: &[f32]| v.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
    let cos = dot / (nrm(&a) * nrm(&b));
    assert!(a != b && cos > 0.9, "logits cosine {cos}");
}
