//! `dsv3 convert` (issue 4): FP8 → bf16 equals DeepSeek's fp8_cast_bf16.py (fixture made with
//! PyTorch by scripts/make_fp8_cast_fixture.py), f32 → FP8 is the 128×128 block quantizer, the
//! f32 → FP8 → bf16 round trip, streaming under a budget smaller than the checkpoint, FP4 outputs
//! that load, and bad input that fails cleanly.

use dsv3_kernels::codec::f32_to_bf16;
use dsv3_kernels::quant::{Fp4Kind, Fp8Blocks, ScaleFmt};
use dsv3_model::convert::{convert, is_linear_weight, Target};
use dsv3_model::init::{preset, write_random_checkpoint, StoreDtype};
use dsv3_model::weights::Checkpoint;
use dsv3_model::DeepseekV3;
use std::path::{Path, PathBuf};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures").join(name)
}

fn tmp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("dsv3-convert-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// Raw bytes and dtype of every tensor of a folder.
fn raw(dir: &Path) -> std::collections::BTreeMap<String, (String, Vec<usize>, Vec<u8>)> {
    let mut out = std::collections::BTreeMap::new();
    for p in dsv3_model::weights::shard_paths(dir).unwrap() {
        let bytes = std::fs::read(&p).unwrap();
        for (name, e) in dsv3_model::weights::parse_header(&p, &bytes, bytes.len()).unwrap() {
            out.insert(name, (e.dtype, e.shape, bytes[e.start..e.end].to_vec()));
        }
    }
    out
}

/// Cosine of two logit vectors.
fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum();
    let norm = |v: &[f32]| v.iter().map(|&x| x as f64 * x as f64).sum::<f64>().sqrt();
    dot / (norm(a) * norm(b))
}

/// The logits of `ids` from the model in `dir`.
fn logits(dir: &Path, ids: &[u32]) -> Vec<f32> {
    let m = DeepseekV3::load(dir).unwrap();
    let h = m.forward(ids, &mut m.new_cache()).unwrap();
    m.logits(&h, ids.len())
}

fn f32s(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect()
}

#[test]
fn fp8_to_bf16_matches_deepseeks_fp8_cast_bf16() {
    let out = tmp("cast");
    let r = convert(&fixture("v3_fp8"), &out, Target::Bf16, false, 1 << 30).unwrap();
    let ours = raw(&out);
    let want = raw(&fixture("fp8_cast_bf16"));
    assert!(want.len() > 10);
    for (name, (dtype, shape, bytes)) in &want {
        let (d, s, b) = &ours[name];
        assert_eq!((d, s), (dtype, shape), "{name}");
        assert!(b == bytes, "{name}: bytes differ from fp8_cast_bf16");
    }
    assert!(ours.keys().all(|n| !n.ends_with("_scale_inv")));
    assert!(!std::fs::read_to_string(out.join("config.json")).unwrap().contains("quantization_config"));
    assert!(r.tensors > want.len());
    DeepseekV3::load(&out).unwrap();
    std::fs::remove_dir_all(&out).ok();
}

#[test]
fn f32_to_fp8_is_the_block_quantizer_and_round_trips_through_bf16() {
    let (src, fp8, back) = (tmp("src"), tmp("fp8"), tmp("back"));
    write_random_checkpoint(&src, &preset("tiny").unwrap(), StoreDtype::F32, 5).unwrap();
    convert(&src, &fp8, Target::Fp8, false, 1 << 30).unwrap();
    convert(&fp8, &back, Target::Bf16, false, 1 << 30).unwrap();
    let (a, q, b) = (raw(&src), raw(&fp8), raw(&back));
    let mut linears = 0;
    for (name, (_, shape, bytes)) in &a {
        let x = f32s(bytes);
        if is_linear_weight(name) {
            linears += 1;
            let want = Fp8Blocks::quantize(&x, shape[0], shape[1], [128, 128], ScaleFmt::F32);
            assert_eq!(q[name].0, "F8_E4M3");
            assert!(q[name].2 == want.codes, "{name}: codes");
            assert_eq!(f32s(&q[&format!("{name}_scale_inv")].2), want.scales, "{name}: scales");
            let deq = want.dequantize();
            let bf: Vec<u16> = b[name].2.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect();
            assert!(bf.iter().zip(&deq).all(|(&h, &v)| h == f32_to_bf16(v)), "{name}: bf16 of the dequantized values");
            // And close to the original: within E4M3's half step of each block's scale.
            let s_max = want.scales.iter().copied().fold(0f32, f32::max);
            assert!(x.iter().zip(&deq).all(|(a, b)| (a - b).abs() <= 16.0 * s_max));
        } else if name.ends_with("e_score_correction_bias") {
            assert_eq!(q[name].0, "F32");
            assert_eq!(&q[name].2, bytes);
        } else {
            assert_eq!(q[name].0, "BF16", "{name}");
        }
    }
    assert!(linears > 20);
    let cfg = std::fs::read_to_string(fp8.join("config.json")).unwrap();
    assert!(cfg.contains("\"weight_block_size\"") && cfg.contains("\"quant_method\": \"fp8\""));
    for d in [src, fp8, back] {
        std::fs::remove_dir_all(d).ok();
    }
}

#[test]
fn a_checkpoint_larger_than_the_memory_budget_streams_in_bands() {
    let (src, big, small) = (tmp("stream-src"), tmp("stream-big"), tmp("stream-small"));
    write_random_checkpoint(&src, &preset("tiny").unwrap(), StoreDtype::F32, 6).unwrap();
    let size = std::fs::metadata(src.join("model.safetensors")).unwrap().len() as usize;
    let budget = 2 << 20;
    assert!(size > 10 * budget, "the checkpoint ({size} B) must dwarf the budget");
    convert(&src, &big, Target::Fp8, false, 1 << 30).unwrap();
    let r = convert(&src, &small, Target::Fp8, false, budget).unwrap();
    assert!(r.peak_buffer_bytes <= budget, "peak {} over budget {budget}", r.peak_buffer_bytes);
    assert_eq!(
        std::fs::read(big.join("model.safetensors")).unwrap(),
        std::fs::read(small.join("model.safetensors")).unwrap()
    );
    // Too small for one band: a clear error, and no output folder.
    let e = convert(&src, &tmp("stream-tiny"), Target::Fp8, false, 64 << 10).unwrap_err().to_string();
    assert!(e.contains("--max-memory"), "{e}");
    assert!(!tmp("stream-tiny").exists());
    for d in [src, big, small] {
        std::fs::remove_dir_all(d).ok();
    }
}

#[test]
fn fp4_checkpoints_load_and_stay_close_to_the_original() {
    let src = tmp("fp4-src");
    write_random_checkpoint(&src, &preset("tiny").unwrap(), StoreDtype::F32, 7).unwrap();
    let reference = DeepseekV3::load(&src).unwrap();
    let ids = [5u32, 6, 7, 8, 9, 10];
    let want = reference.forward(&ids, &mut reference.new_cache()).unwrap();
    let cosine = |got: &[f32]| cosine(got, &want);
    let fp8 = tmp("fp4-vs-fp8");
    convert(&src, &fp8, Target::Fp8, false, 1 << 30).unwrap();
    let m8 = DeepseekV3::load(&fp8).unwrap();
    let cos_fp8 = cosine(&m8.forward(&ids, &mut m8.new_cache()).unwrap());
    std::fs::remove_dir_all(&fp8).ok();
    // (Random MoE routers are near ties, so quantization also flips some expert choices.)
    assert!(cos_fp8 > 0.9, "FP8 logits cosine {cos_fp8}");
    for kind in [Fp4Kind::Nv, Fp4Kind::Mx] {
        let out = tmp(&format!("fp4-{kind:?}"));
        convert(&src, &out, Target::Fp4(kind), false, 1 << 30).unwrap();
        let ck = Checkpoint::open(&out).unwrap();
        let w = "model.layers.0.self_attn.o_proj.weight";
        assert_eq!(ck.shape(w).unwrap(), &[256, 128], "{kind:?}: [out, in/2] packed");
        let model = DeepseekV3::load(&out).unwrap();
        let got = model.forward(&ids, &mut model.new_cache()).unwrap();
        // E2M1 keeps one mantissa bit: on this random model the logits stay correlated with
        // the f32 ones (~0.8), and less so than FP8's (~0.95).
        let cos = cosine(&got);
        assert!(cos > 0.6 && cos < cos_fp8, "{kind:?}: logits cosine {cos} (FP8: {cos_fp8})");
        // FP4 → bf16 decodes what the FP4 model computes with.
        let back = tmp(&format!("fp4-back-{kind:?}"));
        convert(&out, &back, Target::Bf16, false, 1 << 30).unwrap();
        let m2 = DeepseekV3::load(&back).unwrap();
        let again = m2.forward(&ids, &mut m2.new_cache()).unwrap();
        // (bf16 rounds the decoded values once more: close, not equal.)
        let c = self::cosine(&got, &again);
        assert!(c > 0.99, "{kind:?}: fp4 vs its bf16 decode: cosine {c}");
        for d in [out, back] {
            std::fs::remove_dir_all(d).ok();
        }
    }
    std::fs::remove_dir_all(src).ok();
}

#[test]
fn quantize_head_stores_embedding_and_head_in_fp8_and_the_logits_stay_close() {
    let (src, plain, q) = (tmp("qh-src"), tmp("qh-plain"), tmp("qh-fp8"));
    write_random_checkpoint(&src, &preset("tiny").unwrap(), StoreDtype::F32, 9).unwrap();
    convert(&src, &plain, Target::Bf16, false, 1 << 30).unwrap();
    convert(&src, &q, Target::Bf16, true, 1 << 30).unwrap();
    let (a, got) = (raw(&src), raw(&q));
    for name in ["model.embed_tokens.weight", "lm_head.weight"] {
        let (_, shape, bytes) = &a[name];
        let want = Fp8Blocks::quantize(&f32s(bytes), shape[0], shape[1], [128, 128], ScaleFmt::F32);
        assert_eq!(got[name].0, "F8_E4M3", "{name}");
        assert!(got[name].2 == want.codes, "{name}: codes");
        assert_eq!(f32s(&got[&format!("{name}_scale_inv")].2), want.scales, "{name}: scales");
    }
    // Everything else is as without the option.
    assert_eq!(got["model.norm.weight"].0, "BF16");
    assert_eq!(got["model.layers.0.self_attn.o_proj.weight"].0, "BF16");
    let ids = [5u32, 6, 7, 8, 9, 10];
    let cos = cosine(&logits(&plain, &ids), &logits(&q, &ids));
    assert!(cos > 0.98, "logits cosine with an FP8 head and embedding: {cos}");
    for d in [src, plain, q] {
        std::fs::remove_dir_all(d).ok();
    }
}

#[test]
fn bad_input_fails_cleanly() {
    let (src, out) = (tmp("bad-src"), tmp("bad-out"));
    write_random_checkpoint(&src, &preset("tiny").unwrap(), StoreDtype::Fp8, 8).unwrap();
    // A truncated shard: an error naming the problem, no output folder, the source untouched.
    let f = src.join("model.safetensors");
    let len = std::fs::metadata(&f).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&f).unwrap().set_len(len / 2).unwrap();
    let e = convert(&src, &out, Target::Bf16, false, 1 << 30).unwrap_err().to_string();
    assert!(e.contains("truncated"), "{e}");
    assert!(!out.exists());
    assert_eq!(std::fs::metadata(&f).unwrap().len(), len / 2);
    // A target that holds files is refused.
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "mine").unwrap();
    let e = convert(&src, &out, Target::Bf16, false, 1 << 30).unwrap_err().to_string();
    assert!(e.contains("not empty"), "{e}");
    assert_eq!(std::fs::read_to_string(out.join("keep.txt")).unwrap(), "mine");
    for d in [src, out] {
        std::fs::remove_dir_all(d).ok();
    }
}

#[test]
fn v32_keeps_the_releases_indexer_formats_and_converts_to_gguf() {
    // The V3.2 release stores the indexer's wq_b and wk in FP8 and weights_proj in bf16; a
    // conversion back to FP8 keeps that split and the model still loads and agrees.
    let (src, bf16, fp8) = (tmp("v32-src"), tmp("v32-bf16"), tmp("v32-fp8"));
    write_random_checkpoint(&src, &preset("tiny-v32").unwrap(), StoreDtype::Fp8, 3).unwrap();
    convert(&src, &bf16, Target::Bf16, false, 1 << 30).unwrap();
    convert(&bf16, &fp8, Target::Fp8, false, 1 << 30).unwrap();
    let t = raw(&fp8);
    let p = "model.layers.1.self_attn.indexer";
    assert_eq!(t[&format!("{p}.wq_b.weight")].0, "F8_E4M3");
    assert_eq!(t[&format!("{p}.wk.weight")].0, "F8_E4M3");
    assert!(t.contains_key(&format!("{p}.wk.weight_scale_inv")));
    assert_eq!(t[&format!("{p}.weights_proj.weight")].0, "BF16");
    let ids: Vec<u32> = (0..80).map(|i| (i * 37 % 2000) as u32 + 2).collect(); // past index_topk (64)
                                                                               // bf16 rounds each dequantized weight once more (a random model's routing amplifies that):
                                                                               // close, not equal.
    let cos = cosine(&logits(&src, &ids), &logits(&bf16, &ids));
    assert!(cos > 0.95, "FP8 vs its bf16 copy: logits cosine {cos}");
    // GGUF: llama.cpp's `deepseek32` (deepseek2 plus `blk.N.indexer.*` and the indexer keys). f32
    // from the bf16 folder is lossless; Q8_0 straight from FP8 stays close.
    use dsv3_model::gguf::convert::{convert as to_gguf, GgufFormat};
    let (g32, g8) = (tmp("v32-f32").with_extension("gguf"), tmp("v32-q8").with_extension("gguf"));
    to_gguf(&bf16, &g32, GgufFormat::parse("f32").unwrap(), 1 << 20).unwrap();
    let file = dsv3_model::gguf::GgufFile::open(&g32).unwrap();
    assert_eq!(file.string("general.architecture").unwrap(), Some("deepseek32"));
    assert_eq!(file.uint("deepseek32.attention.indexer.top_k").unwrap(), Some(64));
    for t in ["attn_q_b.weight", "attn_k.weight", "k_norm.weight", "k_norm.bias", "proj.weight"] {
        assert!(file.tensors.contains_key(&format!("blk.1.indexer.{t}")), "blk.1.indexer.{t}");
    }
    let back = DeepseekV3::load(&g32).unwrap();
    assert_eq!(back.config.indexer, DeepseekV3::load(&bf16).unwrap().config.indexer);
    assert_eq!(logits(&g32, &ids), logits(&bf16, &ids), "f32 GGUF of the bf16 folder");
    to_gguf(&src, &g8, GgufFormat::parse("q8_0").unwrap(), 1 << 20).unwrap();
    let cos = cosine(&logits(&src, &ids), &logits(&g8, &ids));
    assert!(cos > 0.95, "FP8 vs its Q8_0 GGUF: logits cosine {cos}");
    std::fs::remove_file(g32).ok();
    std::fs::remove_file(g8).ok();
    for d in [src, bf16, fp8] {
        std::fs::remove_dir_all(d).ok();
    }
}
