//! GGUF models (llama.cpp's `deepseek2` layout, written by llama.cpp's own `gguf` package:
//! `scripts/make_gguf_fixtures.py`) give what the same weights give from safetensors, and
//! transformers' numbers; bad files are one-line errors.

use dsv3_model::generate::score;
use dsv3_model::DeepseekV3;
use serde_json::Value;
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn reference(case: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join(case).join("reference.json")).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

fn load(p: &Path) -> DeepseekV3 {
    DeepseekV3::load(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The GGUF's logprobs (and MTP's) are bit for bit the safetensors checkpoint's.
fn same_as_safetensors(gguf: &str, case: &str) {
    let g = load(&fixtures().join("gguf").join(gguf));
    let s = load(&fixtures().join(case));
    assert_eq!(g.config.num_hidden_layers, s.config.num_hidden_layers);
    assert_eq!(g.mtp.len(), s.mtp.len(), "{gguf}: MTP layers");
    let toks = ids(&reference(case)["ids"]);
    let mtp = !s.mtp.is_empty();
    let (a, b) = (score(&g, &toks, mtp, 5).unwrap(), score(&s, &toks, mtp, 5).unwrap());
    assert_eq!(a.logprobs, b.logprobs, "{gguf} vs {case}");
    assert_eq!(a.mtp_logprobs, b.mtp_logprobs, "{gguf} vs {case}: MTP");
}

#[test]
fn split_mla_layout_in_two_parts_equals_the_checkpoint() {
    // Either part names the whole model.
    same_as_safetensors("v3-f32-00001-of-00002.gguf", "v3_f32_sharded");
    same_as_safetensors("v3-f32-00002-of-00002.gguf", "v3_f32_sharded");
}

#[test]
fn deepseek32_layout_equals_the_v32_checkpoint() {
    // V3.2 as llama.cpp writes it: the indexer's tensors and keys give the same sparse model
    // (index_topk 6 is below the prompt: the choice is exercised), hence transformers' logprobs.
    same_as_safetensors("v32-f32.gguf", "v32_f32");
    let g = load(&fixtures().join("gguf/v32-f32.gguf"));
    let ix = g.config.indexer.expect("deepseek32 has an indexer");
    assert_eq!((ix.n_heads, ix.head_dim, ix.topk), (16, 24, 6));
}

/// dsv3 on a GGUF against llama.cpp's own logprobs for it (`scripts/make_llamacpp_fixtures.sh`:
/// libllama on CPU, in one batch and token by token; llama.cpp keeps its KV cache in f16, so the
/// two engines agree to about 1e-2, not bit for bit).
fn llama_cpp_gap(gguf: &str, dense: bool) -> f32 {
    let path = fixtures().join("gguf").join(gguf);
    let want: Value = serde_json::from_str(
        &std::fs::read_to_string(path.with_extension("llamacpp.json")).expect("llama.cpp's numbers"),
    )
    .unwrap();
    let mut g = load(&path);
    if dense {
        g.layers.iter_mut().filter_map(|l| l.self_attn.indexer.as_mut()).for_each(|ix| ix.topk = usize::MAX);
    }
    let s = score(&g, &ids(&want["ids"]), false, 1).unwrap();
    let mut worst = 0f32;
    for mode in ["batch", "incremental"] {
        let w = floats(&want[mode]);
        assert_eq!(s.logprobs.len(), w.len(), "{gguf}");
        worst = s.logprobs.iter().zip(&w).map(|(a, b)| (a - b).abs()).fold(worst, f32::max);
    }
    worst
}

#[test]
fn llama_cpp_computes_what_dsv3_does_on_the_same_files() {
    // V3 written by gguf-py (split MLA in two parts, and Q8_0, where llama.cpp also rounds the
    // activations to Q8_0), and V3.2 written by dsv3's own converter as deepseek32: llama.cpp's
    // indexer (Hadamard-rotated f16 keys) picks 8 of up to 40 positions.
    for (gguf, tol) in [("v3-f32-00001-of-00002.gguf", 1e-2), ("v3-q8_0.gguf", 6e-2), ("v32-d64-f32.gguf", 1e-2)] {
        let worst = llama_cpp_gap(gguf, false);
        eprintln!("{gguf}: dsv3 vs llama.cpp, max |Δ logprob| {worst:.2e}");
        assert!(worst <= tol, "{gguf}: dsv3 and llama.cpp differ by {worst}");
    }
    // The comparison sees the choice: the same model attending densely is far from llama.cpp.
    let dense = llama_cpp_gap("v32-d64-f32.gguf", true);
    eprintln!("v32-d64-f32.gguf read densely: max |Δ logprob| {dense:.2e}");
    assert!(dense > 0.1, "dense attention should differ from llama.cpp's sparse model ({dense})");
}

#[test]
fn legacy_kv_b_layout_in_bf16_equals_the_checkpoint() {
    same_as_safetensors("v2-bf16-legacy.gguf", "v2_group_limited");
}

#[test]
fn q8_0_model_stays_close_to_transformers() {
    let g = load(&fixtures().join("gguf/v3-q8_0.gguf"));
    let r = reference("v3_f32_sharded");
    let s = score(&g, &ids(&r["ids"]), true, 5).unwrap();
    let want = floats(&r["logprobs"]);
    let worst = s.logprobs.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    // Q8_0 keeps ~8.5 bits per weight; on this tiny random model logprobs move by up to ~0.03
    // (the kernels themselves are exact to their dequantization: crates/kernels/tests).
    assert!(worst < 0.1, "Q8_0 logprobs differ from transformers' f32 by {worst}");
    assert!(worst > 0.0, "Q8_0 must not be the f32 weights");
}

/// `bytes` written to a temporary GGUF and loaded: the error message.
fn load_error(bytes: &[u8]) -> String {
    let dir = std::env::temp_dir().join(format!("dsv3-gguf-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(format!("bad-{}.gguf", bytes.len()));
    std::fs::write(&p, bytes).unwrap();
    let e = DeepseekV3::load(&p).err().map(|e| e.to_string()).unwrap_or_default();
    std::fs::remove_file(&p).unwrap();
    e
}

#[test]
fn corrupt_files_are_clear_errors() {
    let good = std::fs::read(fixtures().join("gguf/v3-q8_0.gguf")).unwrap();
    let mut bad = good.clone();
    bad[0] = b'X';
    assert!(load_error(&bad).contains("not a GGUF file"));
    let mut bad = good.clone();
    bad[4..8].copy_from_slice(&9u32.to_le_bytes());
    assert!(load_error(&bad).contains("version 9"));
    let mut bad = good.clone();
    bad[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    assert!(load_error(&bad).contains("more than the file can hold"));
    // Cut anywhere: header, metadata, tensor infos or data: an error naming the file, no panic.
    for cut in (0..good.len()).step_by(4099).chain([good.len() - 1]) {
        let e = load_error(&good[..cut]);
        assert!(e.contains("GGUF") || e.contains("truncated"), "cut at {cut}: `{e}`");
    }
}

fn tmp_gguf(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("dsv3-gguf-out-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    let p = d.join(format!("{tag}.gguf"));
    let _ = std::fs::remove_file(&p);
    p
}

#[test]
fn converted_gguf_reloads_as_the_checkpoint_mtp_included() {
    use dsv3_model::gguf::convert::{convert, GgufFormat};
    let f = |name: &str| GgufFormat::parse(name).unwrap();
    let src = fixtures().join("v3_f32_sharded");
    let out = tmp_gguf("v3-f32");
    let r = convert(&src, &out, f("f32"), 1 << 20).unwrap();
    assert!(r.tensors > 0);
    let (g, s) = (load(&out), load(&src));
    assert_eq!(g.mtp.len(), 1, "MTP written as nextn tensors and read back");
    let toks = ids(&reference("v3_f32_sharded")["ids"]);
    let (a, b) = (score(&g, &toks, true, 5).unwrap(), score(&s, &toks, true, 5).unwrap());
    assert_eq!(a.logprobs, b.logprobs);
    assert_eq!(a.mtp_logprobs, b.mtp_logprobs);
    // The official layout's FP8 weights straight to Q8_0 (no bf16 copy): close to the FP8 model.
    let fp8 = fixtures().join("v3_fp8");
    let q8 = tmp_gguf("v3-fp8-q8_0");
    convert(&fp8, &q8, f("q8_0"), 1 << 20).unwrap();
    let (g, s) = (load(&q8), load(&fp8));
    let toks = ids(&reference("v3_fp8")["ids"]);
    let (a, b) = (score(&g, &toks, false, 5).unwrap(), score(&s, &toks, false, 5).unwrap());
    let worst = a.logprobs.iter().zip(&b.logprobs).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    assert!(worst < 0.1, "Q8_0 of the FP8 model moved logprobs by {worst}");
    // The Q4_K_M mix, with a budget smaller than a row: the fixture's rows are not whole
    // 256-value super-blocks, so its matrices fall back to Q5_0 as llama-quantize's do.
    let q4 = tmp_gguf("v3-fp8-q4_k_m");
    convert(&fp8, &q4, f("q4_k_m"), 1).unwrap();
    let g = load(&q4);
    let a = score(&g, &toks, false, 5).unwrap();
    let worst = a.logprobs.iter().zip(&b.logprobs).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    assert!(worst < 1.0, "Q4_K_M of the FP8 model moved logprobs by {worst}");
    // An existing output is never overwritten.
    assert!(convert(&src, &out, f("f32"), 1 << 20).unwrap_err().to_string().contains("exists"));
    assert!(GgufFormat::parse("q3_k_xl").is_none());
    std::fs::remove_dir_all(out.parent().unwrap()).unwrap();
}

/// dsv3's k-quant writers against llama-quantize on the same rows (fixture from
/// `scripts/make_kquant_fixtures.py`): the relative RMS error of each type within 3% of
/// llama.cpp's, both decoded by the bit-exact dequantizer.
#[test]
fn k_quant_writers_match_llama_quantize() {
    use dsv3_kernels::ggml::{dequantize, quantize};
    use dsv3_kernels::GgmlType;
    use dsv3_model::gguf::GgufFile;
    let f = GgufFile::open(&fixtures().join("llama-quantize/k-quants.gguf")).unwrap();
    let bytes = |name: &str| {
        let t = &f.tensors[name];
        (&f.map[t.start..t.end], t.kind, t.dims.clone())
    };
    let err = |x: &[f32], y: &[f32]| {
        let e: f64 = x.iter().zip(y).map(|(&a, &b)| (a as f64 - b as f64).powi(2)).sum();
        (e / x.iter().map(|&a| (a as f64).powi(2)).sum::<f64>()).sqrt()
    };
    for ty in [GgmlType::Q4K, GgmlType::Q5K, GgmlType::Q6K, GgmlType::Q5_0, GgmlType::Q5_1, GgmlType::Q8_0] {
        let name = ty.name().to_uppercase();
        let (src, _, _) = bytes(&format!("src.{name}"));
        let x: Vec<f32> = src.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
        let (theirs, kind, dims) = bytes(&format!("llama.{name}"));
        assert_eq!(kind, ty);
        let mut y = vec![0f32; x.len()];
        dequantize(ty, theirs, &mut y);
        let e_llama = err(&x, &y);
        let mut ours = vec![];
        for row in x.chunks_exact(dims[0]) {
            match ty {
                GgmlType::Q4K => quantize::q4_k(row, &mut ours),
                GgmlType::Q5K => quantize::q5_k(row, &mut ours),
                GgmlType::Q6K => quantize::q6_k(row, &mut ours),
                GgmlType::Q5_0 => quantize::q5_0(row, &mut ours),
                GgmlType::Q5_1 => quantize::q5_1(row, &mut ours),
                _ => quantize::q8_0(row, &mut ours),
            }
        }
        assert_eq!(ours.len(), theirs.len(), "{ty} bytes");
        dequantize(ty, &ours, &mut y);
        let e = err(&x, &y);
        eprintln!("{ty}: dsv3 {e:.5}, llama-quantize {e_llama:.5}");
        assert!(e <= 1.03 * e_llama, "{ty}: dsv3's error {e:.5} vs llama-quantize's {e_llama:.5}");
        if ty == GgmlType::Q8_0 {
            // Q8_0 is ggml's reference rounding: the same bytes.
            assert_eq!(ours, theirs, "Q8_0 blocks");
        }
    }
}

/// The absorbed decode over a split-MLA GGUF reads `attn_k_b` / `attn_v_b` in place: its logits
/// are the safetensors checkpoint's absorbed ones (f32 file; the sums run in another order), and
/// a Q8_0 file's stay close to its own naive form.
#[test]
fn absorbed_attention_on_the_split_tensors() {
    use dsv3_model::AttnImpl;
    let toks = ids(&reference("v3_f32_sharded")["ids"]);
    let run = |m: &mut DeepseekV3, imp| {
        m.attn_impl = imp;
        let mut cache = m.new_cache();
        let h = m.forward(&toks, &mut cache).unwrap();
        m.logits(&h, toks.len())
    };
    let worst = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    let mut g = load(&fixtures().join("gguf/v3-f32-00001-of-00002.gguf"));
    assert!(
        g.layers.iter().all(|l| matches!(l.self_attn.kv_b, dsv3_model::mla::KvB::Split { .. })),
        "split tensors used"
    );
    let mut s = load(&fixtures().join("v3_f32_sharded"));
    let (a, b) = (run(&mut g, AttnImpl::Absorbed), run(&mut s, AttnImpl::Absorbed));
    assert!(worst(&a, &b) < 1e-4, "split vs kv_b_proj absorbed logits: {}", worst(&a, &b));
    // Training folds the split tensors into the checkpoint's `kv_b_proj`: the same values.
    let kv = |m: &mut DeepseekV3| {
        let p = m.params_mut();
        let p = p.into_iter().find(|p| p.name == "model.layers.0.self_attn.kv_b_proj.weight").expect("kv_b_proj");
        p.data.to_vec()
    };
    assert_eq!(kv(&mut g), kv(&mut s), "kv_b_proj folded from attn_k_b / attn_v_b");
    let mut q = load(&fixtures().join("gguf/v3-q8_0.gguf"));
    let (a, n) = (run(&mut q, AttnImpl::Absorbed), run(&mut q, AttnImpl::Naive));
    assert!(worst(&a, &n) < 0.05, "Q8_0 absorbed vs naive logits: {}", worst(&a, &n));
}

/// A bounded in-test fuzz (the cargo-fuzz target `gguf` runs longer): bytes of a real GGUF's
/// header and tensor table flipped, cut or overwritten with extreme values parse to an error or
/// to tensors inside the file, never a panic.
#[test]
fn mutated_gguf_headers_never_panic() {
    use rand::{Rng, SeedableRng};
    let orig = std::fs::read(fixtures().join("gguf/v3-q8_0.gguf")).unwrap();
    let (_, _, tensors) = dsv3_model::gguf::parse(Path::new("orig.gguf"), &orig).unwrap();
    let header_end = tensors.values().map(|t| t.start).min().unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(17);
    for _ in 0..3000 {
        let mut b = orig.clone();
        for _ in 0..rng.gen_range(1..4) {
            let at = rng.gen_range(0..header_end);
            match rng.gen_range(0..3) {
                0 => b[at] ^= 1 << rng.gen_range(0..8),
                1 => b[at..(at + 8).min(header_end)].fill(0xff),
                _ => b.truncate(at),
            }
            if b.len() <= at {
                break;
            }
        }
        if let Ok((_, _, ts)) = dsv3_model::gguf::parse(Path::new("m.gguf"), &b) {
            for t in ts.values() {
                assert!(t.start <= t.end && t.end <= b.len());
                let rows: usize = t.dims[1..].iter().product();
                assert_eq!(t.kind.row_bytes(t.dims[0]).unwrap() * rows, t.end - t.start);
            }
        }
    }
}
