//! V3.2's official indexer numerics (`Exec::indexer_fp8`, spec deepseek-v32-v4.md §2.6): the
//! scores against the FP8 kernel's formula written out here, the FP8 key cache against the
//! one-pass forward, and how much the rounding changes the indexer's choice.

use dsv3_kernels::formats::E4M3;
use dsv3_model::init::{preset, write_random_checkpoint, StoreDtype};
use dsv3_model::paged::IndexKeys;
use dsv3_model::DeepseekV3;
use rand::{Rng, SeedableRng};

fn tiny_v32(tag: &str) -> DeepseekV3 {
    let dir = std::env::temp_dir().join(format!("dsv3-ixnum-{tag}-{}", std::process::id()));
    write_random_checkpoint(&dir, &preset("tiny-v32").unwrap(), StoreDtype::F32, 7).unwrap();
    let model = DeepseekV3::load(&dir).unwrap();
    std::fs::remove_dir_all(&dir).ok();
    model
}

fn normal(rng: &mut impl Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| (0..4).map(|_| rng.gen::<f32>() - 0.5).sum::<f32>() * 1.7).collect()
}

/// Sylvester's Hadamard matrix of order `n` as rows, by its definition `H₂ₙ = [[H, H], [H, −H]]`.
fn hadamard_matrix(n: usize) -> Vec<Vec<f32>> {
    let mut h = vec![vec![1f32]];
    while h.len() < n {
        let top = h.iter().map(|r| [r.clone(), r.clone()].concat());
        let bottom = h.iter().map(|r| [r.clone(), r.iter().map(|v| -v).collect()].concat());
        h = top.chain(bottom).collect();
    }
    h
}

/// DeepSeek's `rotate_activation` + `act_quant(…, 128, "ue8m0")` of one vector: E4M3 codes as
/// values and the power-of-two scale.
fn rotate_and_quantize(x: &[f32]) -> (Vec<f32>, f32) {
    let d = x.len();
    let h = hadamard_matrix(d);
    let r: Vec<f32> =
        h.iter().map(|row| row.iter().zip(x).map(|(a, b)| a * b).sum::<f32>() / (d as f32).sqrt()).collect();
    let amax = r.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-4);
    let s = (amax / 448.0).log2().ceil().exp2();
    (r.iter().map(|v| E4M3.decode(E4M3.encode(v / s))).collect(), s)
}

#[test]
fn official_scores_are_the_fp8_kernels_formula() {
    let mut model = tiny_v32("scores");
    let ix = model.layers[0].self_attn.indexer.clone().unwrap();
    let (h, d, dm, rq) = (ix.heads, ix.dim, model.config.hidden_size, model.config.q_lora_rank.unwrap());
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let t = 40;
    let (x, cq) = (normal(&mut rng, t * dm), normal(&mut rng, t * rq));
    let positions: Vec<usize> = (0..t).collect();
    let exact = ix.rows(&model.exec(), &x, &cq, t, &positions);
    model.inference.indexer_fp8 = true;
    let cx = model.exec();
    // UE8M0 scales, as V3.2's `scale_fmt` (the indexer quantizes with the checkpoint's format).
    let cx = dsv3_model::exec::Exec { act_scale_fmt: dsv3_kernels::quant::ScaleFmt::Ue8m0, ..cx };
    let off = ix.rows(&cx, &x, &cq, t, &positions);
    let k8 = off.k8.as_ref().expect("the official numerics keep FP8 keys");
    let keys = [(0, IndexKeys::Fp8 { codes: &k8.codes, scales: &k8.scales })];
    let rows: Vec<usize> = (0..t).collect();
    let got = ix.scores(&off.q, &off.w, &rows, &keys, t);
    // I(t, s) = k_s · Σ_h ReLU(q8·k8) · w · q_s, from the exact rows (w has d^-½·H^-½ folded in).
    let kq: Vec<(Vec<f32>, f32)> = (0..t).map(|s| rotate_and_quantize(&exact.k[s * d..(s + 1) * d])).collect();
    for i in 0..t {
        let qq: Vec<(Vec<f32>, f32)> =
            (0..h).map(|hh| rotate_and_quantize(&exact.q[(i * h + hh) * d..][..d])).collect();
        for (s, (k8, ks)) in kq.iter().enumerate() {
            let want: f64 = (0..h)
                .map(|hh| {
                    let dot: f64 = qq[hh].0.iter().zip(k8).map(|(a, b)| *a as f64 * *b as f64).sum();
                    dot.max(0.0) * (exact.w[i * h + hh] * qq[hh].1 * ks) as f64
                })
                .sum();
            let g = got[i * t + s] as f64;
            assert!((g - want).abs() <= 1e-5 * want.abs().max(1.0), "score ({i}, {s}): {g} vs {want}");
        }
    }
    // The FP8 key as the cache holds it is 132 bytes at V3.2's width; here d + 4.
    assert_eq!(k8.codes.len(), t * d);
    assert_eq!(k8.scales.len(), t * d.div_ceil(128));
}

#[test]
fn the_fp8_key_cache_gives_the_one_pass_forward() {
    let mut model = tiny_v32("cache");
    let topk = model.config.indexer.unwrap().topk;
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let toks: Vec<u32> = (0..topk + 90).map(|_| rng.gen_range(2..model.config.vocab_size as u32)).collect();
    let exact = model.forward(&toks, &mut model.new_cache()).unwrap();
    let f32_bytes = model.kv_bytes_per_token();
    model.inference.indexer_fp8 = true;
    let one_pass = model.forward(&toks, &mut model.new_cache()).unwrap();
    let d = model.config.indexer.unwrap().head_dim;
    assert_eq!(f32_bytes - model.kv_bytes_per_token(), model.layers.len() * (4 * d - d - 4));
    // Prefill in two chunks, then token by token (block boundaries, FP8 pages read back), and a
    // speculative-style rollback re-run: the same states as one pass.
    let mut cache = model.new_cache();
    let split = topk + 10;
    let mut states = model.forward(&toks[..split], &mut cache).unwrap();
    for (i, &tok) in toks[split..].iter().enumerate() {
        states.extend(model.forward(&[tok], &mut cache).unwrap());
        if i == 20 {
            cache.truncate(split + 15);
            states.truncate((split + 15) * model.config.hidden_size);
            for &t in &toks[split + 15..split + 21] {
                states.extend(model.forward(&[t], &mut cache).unwrap());
            }
        }
    }
    let gap = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
    assert_eq!(states.len(), one_pass.len());
    assert!(gap(&states, &one_pass) < 1e-4, "cached FP8 keys vs one pass: {}", gap(&states, &one_pass));
    // Up to index_topk positions every query sees all (the rounding only enters the choice);
    // past it the rounding changes some choices.
    let hd = model.config.hidden_size;
    assert_eq!(exact[..topk * hd], one_pass[..topk * hd], "dense prefix");
    assert!(gap(&exact[topk * hd..], &one_pass[topk * hd..]) > 0.0, "the official numerics should change some choice");
}

/// The share of the exact indexer's `index_topk` choice the official numerics keep, for the last
/// `queries` of `t` positions of random states through layer 0's indexer.
fn selection_overlap(model: &mut DeepseekV3, t: usize, queries: usize, seed: u64) -> f64 {
    let ix = model.layers[0].self_attn.indexer.clone().unwrap();
    let (dm, rq, d) = (model.config.hidden_size, model.config.q_lora_rank.unwrap(), ix.dim);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let (x, cq) = (normal(&mut rng, t * dm), normal(&mut rng, t * rq));
    let positions: Vec<usize> = (0..t).collect();
    let visible: Vec<usize> = (t - queries + 1..=t).collect();
    let mut choose = |fp8: bool| {
        model.inference.indexer_fp8 = fp8;
        let r = ix.rows(&model.exec(), &x, &cq, t, &positions);
        let hq = r.w.len() / t * d;
        let q = &r.q[(t - queries) * hq..];
        let w = &r.w[(t - queries) * (r.w.len() / t)..];
        let k = match &r.k8 {
            Some(k8) => IndexKeys::Fp8 { codes: &k8.codes, scales: &k8.scales },
            None => IndexKeys::F32(&r.k),
        };
        ix.select(q, w, &[k], &visible)
    };
    let (a, b) = (choose(false), choose(true));
    model.inference.indexer_fp8 = false;
    let (mut kept, mut all) = (0usize, 0usize);
    for (a, b) in a.iter().zip(&b) {
        let (a, b) = (a.as_ref().unwrap(), b.as_ref().unwrap());
        kept += a.iter().filter(|s| b.binary_search(s).is_ok()).count();
        all += a.len();
    }
    kept as f64 / all as f64
}

#[test]
fn the_official_rounding_keeps_most_of_the_exact_choice() {
    let mut model = tiny_v32("overlap");
    let overlap = selection_overlap(&mut model, 1024, 32, 11);
    eprintln!(
        "tiny-v32 (16 heads × 32 dims, top 64 of 1024): official keeps {:.1}% of the exact choice",
        100.0 * overlap
    );
    assert!(overlap > 0.8 && overlap < 1.0, "overlap {overlap}");
}
