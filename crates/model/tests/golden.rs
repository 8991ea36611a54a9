//! Golden tests: dsv3 against transformers' outputs on the committed fixtures
//! (`scripts/make_fixtures.py` regenerates them).

use dsv3_model::generate::{generate, score, GenerateOptions};
use dsv3_model::sampling::SamplingParams;
use dsv3_model::{AttnImpl, DeepseekV3};
use serde_json::Value;
use std::path::PathBuf;

// `train_roundtrip` is a checkpoint written by `dsv3 train` (scripts/make_train_fixtures.py).
// `v32_*` are DeepSeek-V3.2 (sparse attention) with `index_topk` below the sequence length;
// `train_roundtrip_v32` is one `dsv3 train --dsa-warmup-steps` wrote.
const CASES: [&str; 10] = [
    "v3_f32_sharded",
    "v3_bf16_noqlora",
    "v3_yarn_long",
    "v3_fp8",
    "v2_group_limited",
    "train_roundtrip",
    "v32_f32",
    "v32_bf16_yarn",
    "v32_fp8",
    "train_roundtrip_v32",
];

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures").join(name)
}

fn reference(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(name).join("reference.json")).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn floats(v: &Value) -> Vec<f32> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect()
}

fn assert_close(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!((g - w).abs() <= tol, "{what}[{i}]: dsv3 {g} vs transformers {w}");
    }
}

#[test]
fn logprobs_and_mtp_match_transformers() {
    for case in CASES {
        let model = DeepseekV3::load(&fixture(case)).unwrap_or_else(|e| panic!("{case}: {e}"));
        let r = reference(case);
        let toks = ids(&r["ids"]);
        let has_mtp = r.get("mtp_logprobs").is_some();
        assert_eq!(!model.mtp.is_empty(), has_mtp, "{case}: MTP module loaded iff the fixture has one");
        let s = score(&model, &toks, has_mtp, 5).unwrap();
        assert_close(&s.logprobs, &floats(&r["logprobs"]), 1e-3, &format!("{case} logprobs"));
        if has_mtp {
            assert_close(&s.mtp_logprobs, &floats(&r["mtp_logprobs"]), 1e-3, &format!("{case} mtp_logprobs"));
        }
        // Top-1 of every scored position is transformers' argmax.
        for (i, top) in s.top.iter().enumerate() {
            assert_eq!(top[0].0 as u64, r["top5"][i][0].as_u64().unwrap(), "{case} argmax at {i}");
        }
    }
}

#[test]
fn greedy_generation_matches_transformers() {
    for case in CASES {
        let model = DeepseekV3::load(&fixture(case)).unwrap();
        let r = reference(case);
        let opts = GenerateOptions {
            max_new_tokens: 8,
            sampling: SamplingParams::default(),
            eos_token_ids: vec![],
            ignore_eos: true,
            mtp_speculative: 0,
        };
        let (out, _) = generate(&model, &ids(&r["generate"]["prompt"]), &opts, |_| {}).unwrap();
        assert_eq!(out, ids(&r["generate"]["output"]), "{case}");
    }
}

#[test]
fn naive_and_absorbed_attention_agree() {
    for case in CASES {
        let mut model = DeepseekV3::load(&fixture(case)).unwrap();
        let toks = ids(&reference(case)["ids"]);
        let mut run = |imp| {
            model.attn_impl = imp;
            let mut cache = model.new_cache();
            let h = model.forward(&toks, &mut cache).unwrap();
            model.logits(&h, toks.len())
        };
        let (naive, absorbed) = (run(AttnImpl::Naive), run(AttnImpl::Absorbed));
        assert_close(&absorbed, &naive, 1e-3, &format!("{case} absorbed vs naive logits"));
    }
}

#[test]
fn prefill_then_decode_equals_one_forward() {
    for case in CASES {
        let model = DeepseekV3::load(&fixture(case)).unwrap();
        let toks = ids(&reference(case)["ids"]);
        let v = model.config.vocab_size;
        let mut cache = model.new_cache();
        let full = model.logits(&model.forward(&toks, &mut cache).unwrap(), toks.len());
        // Prefill a prefix, then a chunk of two (naive over the cache), then one token at a time
        // (absorbed).
        let mut cache = model.new_cache();
        let split = toks.len() / 2;
        let mut got = model.logits(&model.forward(&toks[..split], &mut cache).unwrap(), split);
        got.extend(model.logits(&model.forward(&toks[split..split + 2], &mut cache).unwrap(), 2));
        for &t in &toks[split + 2..] {
            got.extend(model.logits(&model.forward(&[t], &mut cache).unwrap(), 1));
        }
        assert_eq!(cache.len(), toks.len());
        assert_eq!(got.len(), toks.len() * v);
        assert_close(&got, &full, 1e-3, &format!("{case} incremental vs full logits"));
    }
}

#[test]
fn mtp_speculative_greedy_reproduces_plain_greedy() {
    for case in CASES {
        let model = DeepseekV3::load(&fixture(case)).unwrap();
        if model.mtp.is_empty() {
            continue;
        }
        let r = reference(case);
        let prompt = ids(&r["generate"]["prompt"]);
        let plain = GenerateOptions {
            max_new_tokens: 20,
            sampling: SamplingParams::default(),
            eos_token_ids: vec![],
            ignore_eos: true,
            mtp_speculative: 0,
        };
        let (want, _) = generate(&model, &prompt, &plain, |_| {}).unwrap();
        assert_eq!(want[..8], ids(&r["generate"]["output"])[..], "{case}: plain greedy vs transformers");
        for k in 1..=3 {
            let mut streamed = vec![];
            let opts = GenerateOptions { mtp_speculative: k, ..plain.clone() };
            let (got, stats) = generate(&model, &prompt, &opts, |t| streamed.push(t)).unwrap();
            assert_eq!(got, want, "{case}: k = {k}");
            assert_eq!(streamed, got, "{case}: streamed tokens");
            assert!(stats.verify_steps > 0 && stats.accepted_tokens <= stats.draft_tokens, "{case}: {stats:?}");
            assert_eq!(stats.draft_tokens, k * stats.verify_steps);
        }
        // Sampling: reproducible under a seed, and stops at max_new_tokens.
        let sampled = GenerateOptions {
            sampling: SamplingParams { temperature: 0.8, top_p: 0.9, seed: 5, ..Default::default() },
            mtp_speculative: 2,
            ..plain.clone()
        };
        let (a, _) = generate(&model, &prompt, &sampled, |_| {}).unwrap();
        let (b, _) = generate(&model, &prompt, &sampled, |_| {}).unwrap();
        assert_eq!((a.len(), &a), (20, &b), "{case}: seeded speculative sampling repeats");
    }
}

#[test]
fn mtp_drafts_come_from_the_verified_states() {
    // Each step's first draft must be the MTP module's argmax at the position before the newest
    // token, as a full forward over the final sequence computes it: that checks the MTP cache and
    // the pending states across rollbacks.
    use dsv3_model::sampling::{argmax, Sampler};
    use dsv3_model::speculative::Speculator;
    for case in CASES {
        let model = DeepseekV3::load(&fixture(case)).unwrap();
        if model.mtp.is_empty() {
            continue;
        }
        let (d, v) = (model.config.hidden_size, model.config.vocab_size);
        let prompt = ids(&reference(case)["generate"]["prompt"]);
        for k in 1..=3 {
            let mut sampler = Sampler::new(SamplingParams::default());
            let mut cache = model.new_cache();
            let h = model.forward(&prompt, &mut cache).unwrap();
            let first = argmax(&model.logits(&h[(prompt.len() - 1) * d..], 1)) as u32;
            let mut spec = Speculator::new(&prompt, h, first);
            let mut seq: Vec<u32> = prompt.iter().copied().chain([first]).collect();
            let mut first_drafts = vec![];
            for _ in 0..6 {
                let at = seq.len() - 1;
                let step = spec.step(&model, &mut cache, k, &mut sampler).unwrap();
                first_drafts.push((at, step.drafts[0]));
                seq.extend(&step.drafts[..step.accepted]);
                seq.push(step.next);
                assert_eq!(cache.len(), seq.len() - 1, "{case}: main cache holds all but the newest token");
            }
            let n = seq.len();
            let mut full = model.new_cache();
            let hs = model.forward(&seq, &mut full).unwrap();
            let hm = model.mtp_forward(0, &hs[..(n - 1) * d], &seq[1..], &mut full).unwrap();
            let ml = model.logits(&hm, n - 1);
            for (at, draft) in first_drafts {
                // MTP at position at − 1 reads h_{at−1} and the token at `at`; it predicts at + 1.
                let want = argmax(&ml[(at - 1) * v..at * v]) as u32;
                assert_eq!(draft, want, "{case} k={k}: first draft after position {at}");
            }
        }
    }
}

#[test]
fn batched_sequences_equal_each_alone_bit_for_bit() {
    // Continuous batching: a decode step, a short chunk and a long prompt in one pass, each
    // sequence after its own cached prefix, must give exactly what each gives alone.
    for case in CASES {
        let model = DeepseekV3::load(&fixture(case)).unwrap();
        let ids = ids(&reference(case)["ids"]);
        let n = ids.len();
        let plan: [(&[u32], &[u32]); 3] =
            [(&ids[..n - 1], &ids[n - 1..]), (&ids[..3], &ids[3..8.min(n)]), (&[], &ids[..])];
        let mut alone = vec![];
        for (prefix, new) in plan {
            let mut cache = model.new_cache();
            if !prefix.is_empty() {
                model.forward(prefix, &mut cache).unwrap();
            }
            alone.push(model.forward(new, &mut cache).unwrap());
        }
        let mut caches: Vec<_> = plan
            .iter()
            .map(|(prefix, _)| {
                let mut c = model.new_cache();
                if !prefix.is_empty() {
                    model.forward(prefix, &mut c).unwrap();
                }
                c
            })
            .collect();
        let mut seqs: Vec<(&[u32], &mut dsv3_model::KvCache)> =
            plan.iter().map(|(_, new)| *new).zip(caches.iter_mut()).collect();
        let batched = model.forward_batch(&mut seqs).unwrap();
        for (i, (a, b)) in alone.iter().zip(&batched).enumerate() {
            assert!(a == b, "{case}: sequence {i} differs when batched");
        }
        for (c, (prefix, new)) in caches.iter().zip(plan) {
            assert_eq!(c.len(), prefix.len() + new.len(), "{case}: cache length");
        }
    }
}

#[test]
fn v32_matches_only_with_the_indexers_choice() {
    // The same weights read as a dense model (index_topk above the sequence length) agree with
    // transformers while no query sees more than index_topk positions, and not after: the golden
    // comparisons above exercise the selection, not only the dense prefix.
    let case = "v32_f32";
    let dir = std::env::temp_dir().join(format!("dsv3-v32-dense-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for e in std::fs::read_dir(fixture(case)).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
    }
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let topk = cfg["index_topk"].as_u64().unwrap() as usize;
    cfg["index_topk"] = 1000.into();
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let dense = DeepseekV3::load(&dir).unwrap();
    std::fs::remove_dir_all(&dir).ok();
    let r = reference(case);
    let s = score(&dense, &ids(&r["ids"]), false, 1).unwrap();
    let want = floats(&r["logprobs"]);
    // logprobs[i] is position i's prediction, made from i + 1 positions.
    assert_close(&s.logprobs[..topk], &want[..topk], 1e-3, "dense up to index_topk");
    let gap = s.logprobs[topk..].iter().zip(&want[topk..]).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    assert!(gap > 0.05, "dense attention past index_topk should differ from DSA (max gap {gap})");
}
