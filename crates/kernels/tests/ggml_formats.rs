//! Every ggml block format decodes bit for bit as llama.cpp's `gguf` package does
//! (fixtures: `scripts/ggml_fixtures.py`), and the row kernels agree with that decode.

use dsv3_kernels::ggml::{self, dequantize, GgmlType};
use dsv3_kernels::{gemv, MatRef};
use rand::{Rng, SeedableRng};
use std::path::PathBuf;

fn fixture(ty: GgmlType, ext: &str) -> Vec<u8> {
    let name = format!("{}.{ext}", ty.name().to_lowercase());
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ggml").join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Fixture blocks of `ty` and gguf-py's values for them.
fn blocks_and_values(ty: GgmlType) -> (Vec<u8>, Vec<f32>) {
    let vals = fixture(ty, "f32").chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    (fixture(ty, "blocks"), vals)
}

fn quantized() -> impl Iterator<Item = GgmlType> {
    ggml::ALL.into_iter().filter(|t| *t != GgmlType::F32)
}

#[test]
fn dequantize_matches_gguf_py_bit_for_bit() {
    for ty in quantized() {
        let (blocks, want) = blocks_and_values(ty);
        assert_eq!(blocks.len(), want.len() / ty.block_elems() * ty.block_bytes(), "{ty} fixture sizes");
        let mut got = vec![0f32; want.len()];
        dequantize(ty, &blocks, &mut got);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g.to_bits(), w.to_bits(), "{ty} value {i} (block {}): {g} vs {w}", i / ty.block_elems());
        }
    }
}

#[test]
fn type_ids_sizes_and_row_bytes() {
    for ty in ggml::ALL {
        assert_eq!(GgmlType::from_id(ty.id()), Some(ty));
        assert_eq!(ty.row_bytes(ty.block_elems() * 3), Some(3 * ty.block_bytes()));
    }
    assert_eq!(GgmlType::from_id(15), None, "Q8_K is an activation format, not a weight type");
    assert_eq!(GgmlType::Q4K.row_bytes(100), None, "partial blocks");
    assert_eq!(GgmlType::Q8_0.row_bytes(usize::MAX / 32 * 32), None, "overflow");
    assert!((GgmlType::Q4K.bits_per_weight() - 4.5).abs() < 1e-12);
}

/// Rows of fixture blocks as a matrix: `rows × cols` (cols a multiple of the block).
fn matrix_of(ty: GgmlType, blocks: &[u8], rows: usize) -> (Vec<u8>, usize) {
    let nb = blocks.len() / ty.block_bytes();
    let per_row = (nb / rows).max(1);
    let data: Vec<u8> = blocks.chunks_exact(ty.block_bytes()).cycle().take(per_row * rows).flatten().copied().collect();
    (data, per_row * ty.block_elems())
}

#[test]
fn row_kernels_agree_with_dequantize() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for ty in quantized() {
        let (blocks, _) = blocks_and_values(ty);
        let rows = 3;
        let (data, k) = matrix_of(ty, &blocks, rows);
        let w = MatRef::Ggml { data: &data, rows, cols: k, kind: ty };
        w.validate().unwrap();
        let dense = w.to_f32();
        for m in 1..=gemv::MAX_TOKENS {
            let x: Vec<f32> = (0..m * k).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let mut got = vec![0f32; rows * m];
            gemv::rows_dots(&w, 0..rows, &x, m, &mut got);
            for r in 0..rows {
                for t in 0..m {
                    let row = &dense[r * k..][..k];
                    let xt = &x[t * k..][..k];
                    let want: f64 = row.iter().zip(xt).map(|(&a, &b)| a as f64 * b as f64).sum();
                    let mag: f64 = row.iter().zip(xt).map(|(&a, &b)| (a as f64 * b as f64).abs()).sum();
                    let g = got[r * m + t] as f64;
                    // The integer paths quantize activations to int8 (their exactness is tested
                    // against their own reference below); the rest decode weights to f32.
                    let tol = if ggml::vnni::handles(ty) && k.is_multiple_of(64) { 1e-2 } else { 1e-5 };
                    assert!((g - want).abs() <= tol * mag + 1e-30, "{ty} m={m} r={r} t={t}: {g} vs {want}");
                }
            }
            // Batch-invariant: a token's result does not depend on how many run beside it.
            let mut alone = vec![0f32; rows];
            gemv::rows_dots(&w, 0..rows, &x[(m - 1) * k..], 1, &mut alone);
            for r in 0..rows {
                assert_eq!(alone[r].to_bits(), got[r * m + m - 1].to_bits(), "{ty} batch invariance");
            }
        }
        // Partial-row decode and axpy from an unaligned column.
        let c0 = ty.block_elems() / 2 + 1;
        let mut part = vec![0f32; k - c0];
        w.decode_row(1, c0, &mut part);
        assert_eq!(part, dense[k + c0..2 * k]);
        let mut y = vec![1f32; k - c0];
        w.row_axpy(2, c0, 0.5, &mut y);
        for (j, v) in y.iter().enumerate() {
            assert_eq!(*v, 1.0 + 0.5 * dense[2 * k + c0 + j], "{ty} axpy");
        }
    }
}

#[test]
fn malformed_ggml_matrices_are_rejected() {
    let data = vec![0u8; 2 * 144];
    let ok = MatRef::Ggml { data: &data, rows: 2, cols: 256, kind: GgmlType::Q4K };
    assert!(ok.validate().is_ok());
    let short = MatRef::Ggml { data: &data[..200], rows: 2, cols: 256, kind: GgmlType::Q4K };
    assert!(short.validate().is_err());
    let ragged = MatRef::Ggml { data: &data, rows: 2, cols: 200, kind: GgmlType::Q4K };
    assert!(ragged.validate().unwrap_err().contains("whole blocks"));
    let huge = MatRef::Ggml { data: &data, rows: usize::MAX, cols: 256, kind: GgmlType::Q4K };
    assert!(huge.validate().is_err());
}

#[test]
fn q8_0_quantizer_matches_gguf_py_bit_for_bit() {
    let x: Vec<f32> = fixture_named("quantize_q8_0.f32")
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let want = fixture_named("quantize_q8_0.blocks");
    let mut got = vec![];
    ggml::quantize::q8_0(&x, &mut got);
    assert_eq!(got.len(), want.len());
    for (i, (g, w)) in got.chunks(34).zip(want.chunks(34)).enumerate() {
        assert_eq!(g, w, "block {i}");
    }
    let mut back = vec![0f32; x.len()];
    dequantize(GgmlType::Q8_0, &got, &mut back);
    for (b, (xs, ys)) in x.chunks(32).zip(back.chunks(32)).enumerate() {
        let amax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
        let step = ggml::quantize::q8_0_scale(amax);
        for (a, y) in xs.iter().zip(ys) {
            // Rounded with the f32 scale, decoded with its f16: half a step plus 127 × the f16 error.
            let bound = 0.5 * step + 127.0 * (step - amax / 127.0).abs();
            assert!((a - y).abs() <= bound * 1.0001 + 1e-30, "block {b}: {a} → {y}");
        }
    }
}

fn fixture_named(name: &str) -> Vec<u8> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/ggml").join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn integer_dot_products_match_their_reference() {
    use ggml::vnni::{quantize_act, reference};
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    for ty in ggml::ALL.into_iter().filter(|t| ggml::vnni::handles(*t)) {
        let (blocks, values) = blocks_and_values(ty);
        // Blocks whose values a product of f32 sums holds (the fixtures span each format's
        // whole scale range: MXFP4's reaches 2^127).
        let sane = |v: &[f32]| v.iter().all(|x| x.abs() < 1e4);
        let blocks: Vec<u8> = blocks
            .chunks_exact(ty.block_bytes())
            .zip(values.chunks_exact(ty.block_elems()))
            .filter(|(_, v)| sane(v))
            .flat_map(|(b, _)| b.to_vec())
            .collect();
        assert!(blocks.len() >= 2 * ty.block_bytes(), "{ty}: fixture blocks");
        // One block pair; a full chunk of 512 values and part of the next (scales gathered
        // under a mask); several chunks.
        for k in [64usize, 768, 1216, 2048].into_iter().filter(|k| k % ty.block_elems() == 0) {
            let rows = 3;
            let nb = k / ty.block_elems() * rows;
            let cycle = blocks.chunks_exact(ty.block_bytes()).cycle();
            // A different run of the fixture's blocks in each row.
            let data: Vec<u8> = cycle.skip(1).take(nb).flatten().copied().collect();
            let w = MatRef::Ggml { data: &data, rows, cols: k, kind: ty };
            let dense = w.to_f32();
            for m in [1, 2, 3, 7, 8] {
                let x: Vec<f32> = (0..m * k).map(|_| rng.gen_range(-1.0..1.0)).collect();
                let mut got = vec![0f32; rows * m];
                gemv::rows_dots(&w, 0..rows, &x, m, &mut got);
                let rb = ty.row_bytes(k).unwrap();
                // The integer body where this CPU runs this format with it (else the f32 path).
                let integer = gemv::quantized_acts(&w, &x[..k], 1).is_some();
                for t in 0..m {
                    // Each token's sums are the same alone as beside others, bit for bit.
                    let mut alone = vec![0f32; rows];
                    gemv::rows_dots(&w, 0..rows, &x[t * k..][..k], 1, &mut alone);
                    for r in 0..rows {
                        assert_eq!(got[r * m + t].to_bits(), alone[r].to_bits(), "{ty}: token {t} of {m}");
                    }
                }
                for r in 0..rows {
                    for t in 0..m {
                        let xt = &x[t * k..][..k];
                        let int = reference::row_dot(ty, &data[r * rb..][..rb], &quantize_act(xt));
                        let row = &dense[r * k..][..k];
                        let exact: f64 = row.iter().zip(xt).map(|(&a, &b)| a as f64 * b as f64).sum();
                        let mag: f64 = row.iter().zip(xt).map(|(&a, &b)| (a as f64 * b as f64).abs()).sum();
                        let g = got[r * m + t];
                        let want = if integer { int as f64 } else { exact };
                        assert!(
                            (g as f64 - want).abs() <= 1e-5 * mag,
                            "{ty}: kernel {g} vs {want} (integer: {integer})"
                        );
                        // int8 activations per 32 values: within ~1% of Σ|w·x| of the f32 product.
                        assert!((g as f64 - exact).abs() <= 1e-2 * mag, "{ty}: {g} vs f64 {exact}");
                    }
                }
            }
        }
    }
}

/// The AVX2 integer body on every format it takes (the dispatch sends the 1–3-bit formats to the
/// f32 path on AVX2, so this runs the body directly), against the integer reference.
#[cfg(target_arch = "x86_64")]
#[test]
fn avx2_integer_body_matches_the_reference() {
    use ggml::avx2;
    use ggml::vnni::reference;
    if !avx2::available() {
        eprintln!("no AVX2 here: nothing to check");
        return;
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(29);
    for ty in ggml::ALL.into_iter().filter(|t| ggml::vnni::handles(*t)) {
        let (blocks, values) = blocks_and_values(ty);
        let blocks: Vec<u8> = blocks
            .chunks_exact(ty.block_bytes())
            .zip(values.chunks_exact(ty.block_elems()))
            .filter(|(_, v)| v.iter().all(|x| x.abs() < 1e4))
            .flat_map(|(b, _)| b.to_vec())
            .collect();
        // Eight blocks of 32 and a ragged rest (1216 = 4·256 + 6·32), where the format allows.
        let k = if ty.block_elems() == 32 { 1216 } else { 1024 };
        let rows = 3;
        let nb = k / ty.block_elems() * rows;
        let data: Vec<u8> = blocks.chunks_exact(ty.block_bytes()).cycle().skip(2).take(nb).flatten().copied().collect();
        let rb = ty.row_bytes(k).unwrap();
        let dense = MatRef::Ggml { data: &data, rows, cols: k, kind: ty }.to_f32();
        for m in [1, 3, 8] {
            let x: Vec<f32> = (0..m * k).map(|_| rng.gen_range(-1.0..1.0)).collect();
            // SAFETY: AVX2 checked above; whole blocks, k codes per token, out of rows·m.
            let acts: Vec<_> = x.chunks(k).map(|x| unsafe { avx2::quantize_act(x) }).collect();
            let mut got = vec![0f32; rows * m];
            unsafe { avx2::rows_dots(avx2::Src::Ggml { data: &data, kind: ty }, k, 0..rows, &acts, &mut got) };
            for r in 0..rows {
                for (t, a) in acts.iter().enumerate() {
                    let want = reference::row_dot(ty, &data[r * rb..][..rb], a);
                    let mag: f64 =
                        (0..k).map(|c| (dense[r * k + c] as f64 * a.q[c] as f64 * a.d[c / 32] as f64).abs()).sum();
                    let g = got[r * m + t];
                    assert!(((g - want) as f64).abs() <= 1e-5 * mag, "{ty} m={m}: {g} vs {want}");
                }
            }
        }
    }
}

/// Relative RMS error of `x` through a quantizer and back through the (bit-exact) decode.
fn round_trip_error(ty: GgmlType, x: &[f32]) -> f64 {
    use ggml::quantize::*;
    let mut b = vec![];
    match ty {
        GgmlType::Q8_0 => q8_0(x, &mut b),
        GgmlType::Q5_0 => q5_0(x, &mut b),
        GgmlType::Q5_1 => q5_1(x, &mut b),
        GgmlType::Q4K => q4_k(x, &mut b),
        GgmlType::Q5K => q5_k(x, &mut b),
        GgmlType::Q6K => q6_k(x, &mut b),
        _ => unreachable!(),
    }
    assert_eq!(b.len(), ty.row_bytes(x.len()).unwrap(), "{ty} bytes");
    let mut y = vec![0f32; x.len()];
    dequantize(ty, &b, &mut y);
    let err: f64 = x.iter().zip(&y).map(|(&a, &b)| (a as f64 - b as f64).powi(2)).sum();
    let norm: f64 = x.iter().map(|&a| (a as f64).powi(2)).sum();
    (err / norm).sqrt()
}

#[test]
fn quantizers_round_trip_within_their_bits() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    // Normal-ish weights with a few outliers, per block scales varying over 100×, and blocks of
    // one sign (the minimum of the affine formats), zeros and a constant.
    let mut x: Vec<f32> = (0..4096)
        .map(|i| {
            let g: f32 = (0..4).map(|_| rng.gen_range(-1.0f32..1.0)).sum();
            let scale = 10f32.powf(((i / 256) % 3) as f32 - 1.0);
            if rng.gen_range(0..200) == 0 {
                8.0 * g * scale
            } else {
                g * scale
            }
        })
        .collect();
    x[256..512].iter_mut().for_each(|v| *v = v.abs());
    x[512..544].fill(0.0);
    x[544..576].fill(0.37);
    // Bounds ~25% above what this quantizer measured on this data when written (about halving
    // per bit, as the formats' bits give).
    for (ty, bound) in [
        (GgmlType::Q8_0, 0.009),
        (GgmlType::Q6K, 0.026),
        (GgmlType::Q5K, 0.048),
        (GgmlType::Q5_1, 0.046),
        (GgmlType::Q5_0, 0.065),
        (GgmlType::Q4K, 0.095),
    ] {
        let e = round_trip_error(ty, &x);
        eprintln!("{ty}: {e:.4}");
        assert!(e < bound, "{ty}: relative RMS error {e:.4} ≥ {bound}");
    }
    assert!(round_trip_error(GgmlType::Q6K, &x) < round_trip_error(GgmlType::Q5K, &x));
    assert!(round_trip_error(GgmlType::Q5K, &x) < round_trip_error(GgmlType::Q4K, &x));
}

#[test]
fn vector_activation_quantizer_equals_the_scalar_one() {
    use ggml::vnni::{quantize_act, reference};
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let mut x: Vec<f32> = (0..4096).map(|_| rng.gen_range(-3.0f32..3.0)).collect();
    x[64..96].fill(0.0);
    // Ties: values that land exactly on a half step.
    x[96] = 127.0;
    x[97] = 0.5;
    x[98] = -1.5;
    // Whole spans, and a row ending inside one (1216 = 2·512 + 192).
    for x in [&x[..], &x[..1216]] {
        let (a, b) = (quantize_act(x), reference::quantize_act(x));
        assert_eq!(a.q, b.q);
        assert_eq!(a.d, b.d);
        assert_eq!(a.sum16, b.sum16);
        // (The AVX2 quantizer leaves out the layouts only the AVX-512 body reads.)
        if !a.spans()[0].is_empty() {
            assert_eq!(a.spans(), b.spans(), "the transposed layouts");
        }
    }
}

/// dsv3's own MXFP4 / NVFP4 through the integer body: the decoded weights against the int8
/// activations, summed exactly (f64), equal the kernel to f32 rounding, at several token counts.
#[test]
fn fp4_integer_dot_products_match_their_definition() {
    use dsv3_kernels::quant::Fp4Kind;
    let mut rng = rand::rngs::StdRng::seed_from_u64(23);
    for kind in [Fp4Kind::Mx, Fp4Kind::Nv] {
        let (rows, k) = (5, 1216);
        let data: Vec<u8> = (0..rows * k / 2).map(|_| rng.gen()).collect();
        let scales: Vec<u8> = (0..rows * k / kind.block())
            .map(|_| match kind {
                Fp4Kind::Mx => rng.gen_range(110..136),
                Fp4Kind::Nv => rng.gen_range(0x20..0x60),
            })
            .collect();
        let w = MatRef::Fp4 { data: &data, scales: &scales, tensor_scale: 0.01, rows, cols: k, kind };
        let dense = w.to_f32();
        for m in [1, 3, 8] {
            let x: Vec<f32> = (0..m * k).map(|_| rng.gen_range(-1.0..1.0)).collect();
            let acts = gemv::quantized_acts(&w, &x, m).expect("FP4 takes the integer body here");
            let mut got = vec![0f32; rows * m];
            gemv::rows_dots_quantized(&w, 0..rows, &acts, &mut got);
            for r in 0..rows {
                for (t, a) in acts.iter().enumerate() {
                    let row = &dense[r * k..][..k];
                    let want: f64 =
                        row.iter().enumerate().map(|(c, &v)| v as f64 * a.q[c] as f64 * a.d[c / 32] as f64).sum();
                    let mag: f64 = row
                        .iter()
                        .enumerate()
                        .map(|(c, &v)| (v as f64 * a.q[c] as f64 * a.d[c / 32] as f64).abs())
                        .sum();
                    let g = got[r * m + t] as f64;
                    assert!((g - want).abs() <= 1e-5 * mag, "{kind:?} m={m}: kernel {g} vs {want}");
                }
            }
        }
    }
}
