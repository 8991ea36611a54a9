//! LoRA adapters: the adapted model's outputs equal the merged model's (f32 and FP8 bases, the
//! latent-cache decode included); the adapters' gradients match finite differences while the
//! base gets none; PEFT's files written and read back give the same adapters.

use dsv3_model::exec::Training;
use dsv3_model::grad::model::LossWeights;
use dsv3_model::grad::moe::Balance;
use dsv3_model::grad::Grads;
use dsv3_model::init::{write_random_checkpoint, StoreDtype};
use dsv3_model::lora::LoraConfig;
use dsv3_model::DeepseekV3;
use rand::{Rng, SeedableRng};
use serde_json::json;

fn config() -> serde_json::Value {
    json!({
        "model_type": "deepseek_v3", "vocab_size": 64, "hidden_size": 128, "intermediate_size": 160,
        "moe_intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
        "num_key_value_heads": 2, "n_shared_experts": 1, "n_routed_experts": 4, "num_experts_per_tok": 2,
        "n_group": 2, "topk_group": 1, "first_k_dense_replace": 1, "moe_layer_freq": 1,
        "q_lora_rank": 32, "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
        "rope_theta": 10000.0, "rms_norm_eps": 1e-6, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid",
        "topk_method": "noaux_tc", "norm_topk_prob": true, "num_nextn_predict_layers": 1,
        "max_position_embeddings": 64, "tie_word_embeddings": false
    })
}

fn model(tag: &str, dtype: StoreDtype) -> DeepseekV3 {
    let dir = std::env::temp_dir().join(format!("dsv3-lora-{tag}-{}", std::process::id()));
    write_random_checkpoint(&dir, &config(), dtype, 3).unwrap();
    let m = DeepseekV3::load(&dir).unwrap();
    std::fs::remove_dir_all(&dir).ok();
    m
}

fn every_kind() -> LoraConfig {
    let targets = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "mlp.gate_proj"];
    let mut t: Vec<String> = targets.iter().map(|s| s.to_string()).collect();
    t.extend(["shared_experts.up_proj".into(), "experts.*.down_proj".into()]);
    LoraConfig { rank: 4, alpha: 8.0, targets: t }
}

/// Adapters with random `B` (fresh ones are zero and would change nothing).
fn adapt(m: &mut DeepseekV3, cfg: &LoraConfig) -> Vec<String> {
    let names = m.add_lora(cfg, 1).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(9);
    for (_, l) in m.linears_mut() {
        if let Some(a) = &mut l.lora {
            a.b.f32_mut().iter_mut().for_each(|v| *v = rng.gen_range(-0.05..0.05));
        }
    }
    names
}

/// Logits of every position through the latent cache: a prefill, then one token at a time.
fn decode_logits(m: &DeepseekV3, ids: &[u32]) -> Vec<f32> {
    let mut cache = m.new_cache();
    let d = m.config.hidden_size;
    let h = m.forward(&ids[..4], &mut cache).unwrap();
    let mut out = m.logits(&h, 4);
    for &t in &ids[4..] {
        let h = m.forward(&[t], &mut cache).unwrap();
        out.extend(m.logits(&h[..d], 1));
    }
    out
}

/// A peft fixture's `reference.json`: the ids and peft's logits, flattened.
fn reference(dir: &std::path::Path) -> (Vec<u32>, Vec<f32>) {
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
    let ids = r["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    let rows = r["logits"].as_array().unwrap().iter().flat_map(|row| row.as_array().unwrap().clone());
    (ids, rows.map(|v| v.as_f64().unwrap() as f32).collect())
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn the_adapted_model_equals_the_merged_one() {
    let ids: Vec<u32> = (0..10).map(|i| (i * 7 + 3) % 64).collect();
    for (tag, dtype) in [("f32", StoreDtype::F32), ("fp8", StoreDtype::Fp8)] {
        let mut m = model(tag, dtype);
        let base = decode_logits(&m, &ids);
        let names = adapt(&mut m, &every_kind());
        // Attention (both layers), the dense MLP's gate, the shared and every routed expert.
        assert_eq!(names.len(), 2 * 5 + 1 + 1 + 4, "{names:?}");
        assert!(names.iter().all(|n| !n.starts_with("model.layers.2.")), "the MTP module is not adapted");
        let adapted = decode_logits(&m, &ids);
        assert!(max_diff(&adapted, &base) > 1e-2, "{tag}: the adapters change the outputs");
        assert_eq!(m.merge_lora(), names.len());
        let merged = decode_logits(&m, &ids);
        let d = max_diff(&adapted, &merged);
        assert!(d < 2e-4, "{tag}: adapted vs merged logits differ by {d}");
    }
}

#[test]
fn adapter_gradients_match_finite_differences_and_the_base_is_frozen() {
    let mut m = model("grad", StoreDtype::Fp8);
    m.training = Training::default();
    adapt(&mut m, &every_kind());
    let (seqs, t) = (2, 6);
    let mut rng = rand::rngs::StdRng::seed_from_u64(4);
    let tokens: Vec<u32> = (0..seqs * (t + 1)).map(|_| rng.gen_range(0..64)).collect();
    let w = LossWeights { mtp_lambda: 0.3, balance: Balance { seq_alpha: 0.05, batch_alpha: 0.0 } };
    let mut g = Grads::only(DeepseekV3::is_lora_param);
    let base = m.train_step(&tokens, seqs, t, w, Some(&mut g)).unwrap();
    assert!(g.map.keys().all(|k| DeepseekV3::is_lora_param(k)), "only adapters get gradients");
    let names: Vec<(String, usize)> =
        m.params_mut_where(DeepseekV3::is_lora_param).into_iter().map(|p| (p.name, p.data.len())).collect();
    assert!(names.len() >= 2 * 14);
    let (mut checked, mut skipped) = (0, 0);
    for (name, len) in names {
        let grad = g.get(&name).map_or_else(|| vec![0f32; len], |s| s.to_vec());
        for _ in 0..2 {
            let i = rng.gen_range(0..len);
            let eps = 3e-3f32;
            let at = |delta: f32, m: &mut DeepseekV3| {
                m.params_mut_where(|n| n == name).into_iter().for_each(|p| p.data[i] += delta);
            };
            at(eps, &mut m);
            let plus = m.train_step(&tokens, seqs, t, w, None).unwrap();
            at(-2.0 * eps, &mut m);
            let minus = m.train_step(&tokens, seqs, t, w, None).unwrap();
            at(eps, &mut m);
            if plus.choice_digest != base.choice_digest || minus.choice_digest != base.choice_digest {
                skipped += 1;
                continue;
            }
            let num = (plus.loss - minus.loss) / (2.0 * eps as f64);
            let ana = grad[i] as f64;
            assert!(
                (num - ana).abs() <= 3e-4 + 3e-2 * ana.abs().max(num.abs()),
                "d loss / d {name}[{i}]: finite difference {num:.6} vs backward {ana:.6}"
            );
            checked += 1;
        }
    }
    assert!(checked > 10 * skipped.max(1), "{checked} checked, {skipped} skipped");
}

#[test]
fn peft_files_round_trip() {
    let mut m = model("peft", StoreDtype::Bf16);
    let cfg = every_kind();
    adapt(&mut m, &cfg);
    let ids: Vec<u32> = (0..8).map(|i| (i * 5 + 1) % 64).collect();
    let want = decode_logits(&m, &ids);
    let dir = std::env::temp_dir().join(format!("dsv3-lora-adapter-{}", std::process::id()));
    m.write_peft(&dir, &cfg, "base").unwrap();
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!((config["peft_type"].as_str(), config["r"].as_u64()), (Some("LORA"), Some(4)));
    let ck = dsv3_model::weights::Checkpoint::open_files(&[dir.join("adapter_model.safetensors")]).unwrap();
    let key = "base_model.model.model.layers.0.self_attn.q_a_proj.lora_A.weight";
    assert_eq!(ck.shape(key), Some(&[4usize, 128][..]), "PEFT's key names and [r, in] shapes");

    let mut fresh = model("peft", StoreDtype::Bf16);
    assert_eq!(fresh.load_peft(&dir).unwrap(), cfg);
    let got = decode_logits(&fresh, &ids);
    assert_eq!(max_diff(&got, &want), 0.0, "the same adapters, bit for bit");

    // Every routed expert's three projections: PEFT's fused tensors (gate and up block-diagonal
    // in gate_up_proj, rank and α doubled), read back as the same adapters.
    let fused_dir = dir.with_extension("fused");
    let all = LoraConfig {
        targets: ["o_proj", "experts.*.gate_proj", "experts.*.up_proj", "experts.*.down_proj"]
            .map(String::from)
            .to_vec(),
        ..cfg.clone()
    };
    let mut m = model("peft", StoreDtype::Bf16);
    adapt(&mut m, &all);
    let want = decode_logits(&m, &ids);
    m.write_peft(&fused_dir, &all, "base").unwrap();
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fused_dir.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(written["target_parameters"], json!(["gate_up_proj", "down_proj"]));
    assert_eq!(
        (written["rank_pattern"][".*\\.gate_up_proj"].as_u64(), written["alpha_pattern"][".*\\.gate_up_proj"].as_f64()),
        (Some(8), Some(16.0))
    );
    let ck = dsv3_model::weights::Checkpoint::open_files(&[fused_dir.join("adapter_model.safetensors")]).unwrap();
    // 4 experts × rank 8, over hidden 128; B over 2 × 32 intermediate rows.
    assert_eq!(
        ck.shape("base_model.model.model.layers.1.mlp.experts.base_layer.lora_A.weight"),
        Some(&[32usize, 128][..])
    );
    assert_eq!(
        ck.shape("base_model.model.model.layers.1.mlp.experts.base_layer.lora_B.weight"),
        Some(&[64usize, 32][..])
    );
    let mut fresh = model("peft", StoreDtype::Bf16);
    fresh.load_peft(&fused_dir).unwrap();
    let gate = fresh.linears_mut().into_iter().find(|(n, _)| n == "model.layers.1.mlp.experts.2.gate_proj");
    assert_eq!(
        gate.and_then(|(_, l)| l.lora.as_ref().map(|a| a.rank())),
        Some(4),
        "read back as separate rank-4 adapters"
    );
    assert_eq!(max_diff(&decode_logits(&fresh, &ids), &want), 0.0, "fused routed-expert adapters read back exactly");
    std::fs::remove_dir_all(&fused_dir).ok();
    // What does not fit is refused, naming it.
    let mut other = model("peft-other", StoreDtype::Bf16);
    let cfg2 = LoraConfig { rank: 2, alpha: 2.0, targets: vec!["o_proj".into()] };
    other.add_lora(&cfg2, 0).unwrap();
    let odir = dir.with_extension("r2");
    other.write_peft(&odir, &cfg2, "base").unwrap();
    std::fs::copy(odir.join("adapter_model.safetensors"), dir.join("adapter_model.safetensors")).unwrap();
    let err = fresh.load_peft(&dir).unwrap_err().to_string();
    assert!(err.contains("o_proj") && err.contains("r 4"), "{err}");
    std::fs::remove_dir_all(&dir).ok();
    std::fs::remove_dir_all(&odir).ok();
}

/// The adapters peft made on the transformers model (scripts/make_peft_fixtures.py) give peft's
/// logits here, on an f32 and an FP8 base; written back by dsv3 they are peft's tensors under
/// peft's names. (`DSV3_PEFT_OUT=DIR` keeps dsv3's copy, for the script's reverse check.)
#[test]
fn peft_adapters_give_the_logits_peft_gives() {
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
    for case in ["v3_f32_sharded", "v3_fp8"] {
        let dir = root.join("peft").join(case);
        let (ids, want) = reference(&dir);
        let mut m = DeepseekV3::load(&root.join(case)).unwrap();
        let base = {
            let mut cache = m.new_cache();
            let h = m.forward(&ids, &mut cache).unwrap();
            m.logits(&h, ids.len())
        };
        let cfg = m.load_peft(&dir).unwrap();
        assert_eq!((cfg.rank, cfg.alpha), (4, 8.0));
        let mut cache = m.new_cache();
        let h = m.forward(&ids, &mut cache).unwrap();
        let got = m.logits(&h, ids.len());
        assert!(max_diff(&base, &want) > 0.1, "{case}: the adapters matter");
        let d = max_diff(&got, &want);
        assert!(d < 1e-3, "{case}: dsv3 with peft's adapters vs peft: logits differ by {d}");
        // The decode through the latent cache agrees too.
        let dec = decode_logits(&m, &ids);
        assert!(max_diff(&dec, &want) < 1e-3, "{case}: decoding");

        let out = std::env::var("DSV3_PEFT_OUT").map_or_else(
            |_| std::env::temp_dir().join(format!("dsv3-peft-{case}-{}", std::process::id())),
            |d| std::path::PathBuf::from(d).join(case),
        );
        m.write_peft(&out, &cfg, "base").unwrap();
        let open = |p: &std::path::Path| {
            dsv3_model::weights::Checkpoint::open_files(&[p.join("adapter_model.safetensors")]).unwrap()
        };
        let (theirs, ours) = (open(&dir), open(&out));
        let mut names: Vec<&str> = theirs.names().collect();
        let mut mine: Vec<&str> = ours.names().collect();
        names.sort();
        mine.sort();
        assert_eq!(names, mine, "{case}: peft's tensor names");
        for n in names {
            let shape = theirs.shape(n).unwrap().to_vec();
            assert_eq!(theirs.f32s(n, &shape).unwrap(), ours.f32s(n, &shape).unwrap(), "{case}: {n}");
        }
        match std::env::var("DSV3_PEFT_OUT") {
            Err(_) => {
                std::fs::remove_dir_all(&out).ok();
            }
            Ok(d) => {
                write_own_adapters(&root.join(case), &std::path::PathBuf::from(d).join(format!("{case}-dsv3")), &ids)
            }
        }
    }
}

/// For scripts/make_peft_fixtures.py's reverse check: adapters as dsv3 makes them on attention
/// and routed experts, random, with dsv3's logits beside them.
fn write_own_adapters(base: &std::path::Path, out: &std::path::Path, ids: &[u32]) {
    let mut m = DeepseekV3::load(base).unwrap();
    // What peft 0.21 holds on transformers 5's DeepSeek-V3: attention and routed experts (it
    // turns every *_proj of the MLPs into the fused experts' tensors, so the dense and shared
    // MLPs get none).
    let targets = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"].into_iter().chain([
        "experts.*.gate_proj",
        "experts.*.up_proj",
        "experts.*.down_proj",
    ]);
    let cfg = LoraConfig { rank: 4, alpha: 8.0, targets: targets.map(String::from).collect() };
    m.add_lora(&cfg, 7).unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(8);
    for (_, l) in m.linears_mut() {
        if let Some(a) = &mut l.lora {
            a.b.f32_mut().iter_mut().for_each(|v| *v = rng.gen_range(-0.1..0.1));
        }
    }
    m.write_peft(out, &cfg, "base").unwrap();
    let mut cache = m.new_cache();
    let h = m.forward(ids, &mut cache).unwrap();
    let logits: Vec<Vec<f32>> = m.logits(&h, ids.len()).chunks(m.config.vocab_size).map(|r| r.to_vec()).collect();
    std::fs::write(out.join("reference.json"), json!({"ids": ids, "logits": logits}).to_string()).unwrap();
}

/// `convert --merge-lora`: peft's adapters folded into the stored weights give peft's logits
/// without any adapter attached (f32 and FP8 bases, written as f32).
#[test]
fn adapters_merged_by_convert_give_the_adapted_logits() {
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
    for case in ["v3_f32_sharded", "v3_fp8"] {
        let (from, adapters) = (root.join(case), root.join("peft").join(case));
        let ck = dsv3_model::weights::Checkpoint::open(&from).unwrap();
        let read = dsv3_model::lora::read_peft(&adapters, &dsv3_model::convert::linear_shapes(&ck)).unwrap();
        let out = std::env::temp_dir().join(format!("dsv3-merged-{case}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&out);
        let target = dsv3_model::convert::Target::F32;
        let r = dsv3_model::convert::convert_merging(&from, &out, target, false, 1 << 26, Some(&read)).unwrap();
        assert_eq!(r.merged, read.modules.len());
        let m = DeepseekV3::load(&out).unwrap();
        let (ids, want) = reference(&adapters);
        let mut cache = m.new_cache();
        let h = m.forward(&ids, &mut cache).unwrap();
        let d = max_diff(&m.logits(&h, ids.len()), &want);
        assert!(d < 1e-3, "{case}: merged vs peft logits differ by {d}");
        std::fs::remove_dir_all(&out).ok();
    }
}

/// Serving: sequences of two adapters and of the base in one batch, each as its own model
/// computes it alone — prefill and decode, attention, dense, shared and routed experts adapted.
#[test]
fn served_adapters_in_one_batch_equal_each_model_alone() {
    let dir = std::env::temp_dir().join(format!("dsv3-served-{}", std::process::id()));
    let mut dirs = vec![];
    for (i, cfg) in
        [every_kind(), LoraConfig { rank: 2, alpha: 4.0, targets: vec!["o_proj".into()] }].iter().enumerate()
    {
        let mut m = model("served-src", StoreDtype::Bf16);
        adapt(&mut m, cfg);
        let d = dir.join(format!("a{i}"));
        m.write_peft(&d, cfg, "base").unwrap();
        dirs.push(d);
    }
    let mut server = model("served-base", StoreDtype::Bf16);
    assert_eq!((server.serve_adapter(&dirs[0]).unwrap(), server.serve_adapter(&dirs[1]).unwrap()), (1, 2));
    let alone = |slot: u16| {
        let mut m = model("served-alone", StoreDtype::Bf16);
        if slot > 0 {
            m.load_peft(&dirs[slot as usize - 1]).unwrap();
        }
        m
    };
    let prompts: [Vec<u32>; 3] = [vec![3, 9, 27, 17], vec![5, 1], vec![40, 41, 42]];
    let slots = [1u16, 0, 2];
    let mut caches: Vec<dsv3_model::KvCache> = (0..3).map(|_| server.new_cache()).collect();
    let mut got: Vec<Vec<f32>> = vec![vec![]; 3];
    for step in 0..3 {
        let toks: Vec<Vec<u32>> = match step {
            0 => prompts.to_vec(),
            _ => (0..3).map(|i| vec![(step * 11 + i) as u32]).collect(),
        };
        let mut batch: Vec<(&[u32], &mut dsv3_model::KvCache)> =
            toks.iter().map(|t| t.as_slice()).zip(caches.iter_mut()).collect();
        for (i, h) in server.forward_batch_adapted(&mut batch, Some(&slots)).unwrap().into_iter().enumerate() {
            got[i].extend(h);
        }
    }
    for (i, &slot) in slots.iter().enumerate() {
        let m = alone(slot);
        let mut cache = m.new_cache();
        let mut want = m.forward(&prompts[i], &mut cache).unwrap();
        for step in 1..3 {
            want.extend(m.forward(&[(step * 11 + i) as u32], &mut cache).unwrap());
        }
        let d = max_diff(&got[i], &want);
        assert!(d < 1e-5, "sequence {i} (adapter {slot}): batched vs alone differ by {d}");
    }
    let mut one = [(&prompts[0][..], &mut server.new_cache())];
    assert!(server.forward_batch_adapted(&mut one, Some(&[3])).is_err(), "an unknown slot is refused");
    std::fs::remove_dir_all(&dir).ok();
}
