//! `dsv3 serve --lora`: requests name a LoRA adapter (or the base) in `model`; requests for two
//! adapters and the base decode in one batch and each answer equals its model's own greedy
//! generation; /v1/models lists the adapters; an unknown name is a 404.

mod common;

use common::{fixture, post, start_prepared, TEMPLATE};
use dsv3_model::generate::{generate, GenerateOptions};
use dsv3_model::lora::LoraConfig;
use dsv3_model::DeepseekV3;
use dsv3_serve::ServeOptions;
use rand::{Rng, SeedableRng};
use serde_json::json;

/// Two adapters of the fixture (attention and FFNs; attention only), written as PEFT folders.
fn adapters() -> Vec<std::path::PathBuf> {
    let targets = |t: &[&str]| t.iter().map(|s| s.to_string()).collect();
    let cfgs = [
        LoraConfig {
            rank: 4,
            alpha: 32.0,
            targets: targets(&["q_a_proj", "kv_b_proj", "o_proj", "gate_proj", "down_proj"]),
        },
        LoraConfig { rank: 2, alpha: 16.0, targets: targets(&["q_b_proj", "o_proj"]) },
    ];
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    cfgs.iter()
        .enumerate()
        .map(|(i, cfg)| {
            let mut m = DeepseekV3::load(&fixture()).unwrap();
            m.add_lora(cfg, i as u64).unwrap();
            for (_, l) in m.linears_mut() {
                if let Some(a) = &mut l.lora {
                    a.b.f32_mut().iter_mut().for_each(|v| *v = rng.gen_range(-1.0..1.0));
                }
            }
            let dir = std::env::temp_dir().join(format!("dsv3-serve-lora-{}-{i}", std::process::id()));
            m.write_peft(&dir, cfg, "fixture").unwrap();
            dir
        })
        .collect()
}

#[test]
fn adapters_and_the_base_decode_together_each_as_its_own_model() {
    let dirs = adapters();
    let o = ServeOptions { max_batch: 8, adapters: vec!["math".into(), "chat".into()], ..ServeOptions::default() };
    let served = dirs.clone();
    let base = start_prepared(o, TEMPLATE, move |m| {
        for d in &served {
            m.serve_adapter(d).unwrap();
        }
    });
    let prompt: Vec<u32> = vec![5, 17, 42, 9, 100];
    let opts = GenerateOptions {
        max_new_tokens: 12,
        sampling: Default::default(),
        eos_token_ids: vec![],
        ignore_eos: true,
        mtp_speculative: 0,
    };
    let want: Vec<Vec<u32>> = [None, Some(&dirs[0]), Some(&dirs[1])]
        .iter()
        .map(|d| {
            let mut m = DeepseekV3::load(&fixture()).unwrap();
            if let Some(d) = d {
                m.load_peft(d).unwrap();
            }
            generate(&m, &prompt, &opts, |_| {}).unwrap().0
        })
        .collect();
    assert!(want[0] != want[1] && want[0] != want[2], "the adapters change the greedy answer");
    // Concurrent requests, so that they share decode steps.
    let url = format!("{base}/v1/completions");
    let answers: Vec<(u16, serde_json::Value)> = std::thread::scope(|s| {
        let hs: Vec<_> = ["fixture", "math", "chat"]
            .iter()
            .map(|name| {
                let (url, prompt) = (&url, &prompt);
                s.spawn(move || {
                    post(
                        url,
                        json!({"model": name, "prompt": prompt, "max_tokens": 12, "temperature": 0,
                        "logprobs": 0, "ignore_eos": true}),
                    )
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let tok = dsv3_model::Tokenizer::from_dir(&fixture()).unwrap();
    for ((status, body), (want, name)) in answers.iter().zip(want.iter().zip(["fixture", "math", "chat"])) {
        assert_eq!(*status, 200, "{body}");
        assert_eq!(body["model"], name);
        let text = body["choices"][0]["text"].as_str().unwrap();
        assert_eq!(text, tok.decode(want, false).unwrap(), "{name}: the served answer is the model's own");
    }
    let models: serde_json::Value = ureq::get(&format!("{base}/v1/models")).call().unwrap().into_json().unwrap();
    let ids: Vec<&str> = models["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["fixture", "math", "chat"]);
    assert_eq!(models["data"][1]["parent"], "fixture");
    let (status, body) = post(&url, json!({"model": "nope", "prompt": "x", "max_tokens": 2}));
    assert_eq!(status, 404, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("nope"));
    for d in dirs {
        std::fs::remove_dir_all(d).ok();
    }
}
