//! Supervised fine-tuning through the training loop: a model dsv3 pre-trained (its own tokenizer
//! and chat template) fine-tuned on chats. The first step's loss is the model's masked loss on
//! the loader's first batch, whose learned labels are exactly the assistant replies; the routing
//! bias stays as loaded; a stopped and resumed run equals an uninterrupted one bit for bit.

mod common;

use dsv3_train::chats::{pad_examples, Addition};
use dsv3_train::data::{Loader, LoaderState};
use dsv3_train::{run, Layout, StepLog, TrainArgs};
use std::path::{Path, PathBuf};

fn sft_args(model: &Path, data: &Path, out: PathBuf, steps: u64) -> TrainArgs {
    TrainArgs {
        model: Some(model.to_path_buf()),
        chats: true,
        data: vec![data.to_path_buf()],
        steps,
        seq_len: 80,
        batch_size: 2,
        warmup_steps: 2,
        lr: 3e-3,
        bias_freeze_step: Some(0),
        eval_every: 3,
        eval_windows: 4,
        out,
        ..TrainArgs::default()
    }
}

#[test]
fn sft_learns_the_replies_keeps_the_bias_and_resumes_exactly() {
    let base = std::env::temp_dir().join(format!("dsv3-sft-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base).unwrap();
    let pre = common::pretrained(&base);
    let chats: Vec<String> = Addition::sample(60, 2, 3).iter().map(|p| p.chat().to_string()).collect();
    let data = base.join("chats.jsonl");
    std::fs::write(&data, chats.join("\n")).unwrap();

    // The first batch as the loop draws it: its learned labels are the replies, nothing else.
    let tok = dsv3_model::Tokenizer::from_dir(&pre).unwrap();
    assert!(tok.has_chat_template(), "a pre-trained run saves a chat template");
    let parsed: Vec<serde_json::Value> = chats.iter().map(|c| serde_json::from_str(c).unwrap()).collect();
    let (train, _, stats) = pad_examples(&tok, &parsed, 80, 1, 20).unwrap();
    assert_eq!((stats.examples, stats.truncated, stats.dropped), (60, 0, 0));
    let batch = Loader::new(&train, 0, LoaderState::default()).next_batch(&train, 2);
    let labels = batch.labels.clone().unwrap();
    for b in 0..2 {
        let row = &batch.tokens[b * 81..(b + 1) * 81];
        let learned: Vec<u32> = (0..80).filter(|&i| labels[b * 80 + i]).map(|i| row[i + 1]).collect();
        let text = tok.decode(&learned, false).unwrap();
        assert!(text.starts_with("<think>") && text.ends_with("<｜end▁of▁sentence｜>"), "learned: {text:?}");
        assert!(!text.contains("What is"), "the question is not learned: {text:?}");
    }
    let mut model = dsv3_model::DeepseekV3::load(&pre).unwrap();
    let args = sft_args(&pre, &data, base.join("x"), 1);
    model.training = args.numerics();
    let w = args.loss_weights(1);
    let want = model.train_step_masked(&batch.tokens, 2, 80, w, Some(&labels), None).unwrap();

    let mut straight: Vec<StepLog> = vec![];
    run(sft_args(&pre, &data, base.join("a"), 6), &Layout::single(), None, None, |l| straight.push(l.clone())).unwrap();
    assert!((straight[0].lm_loss - want.lm_loss).abs() < 1e-6, "{} vs {}", straight[0].lm_loss, want.lm_loss);
    assert_eq!(straight[0].learned_tokens, Some(labels.iter().filter(|&&l| l).count() as u64));
    assert!(straight.last().unwrap().lm_loss < straight[0].lm_loss);
    let bias = |dir: &Path| {
        let mut m = dsv3_model::DeepseekV3::load(dir).unwrap();
        m.routing_biases_mut().into_iter().map(|(_, b)| b.clone()).collect::<Vec<_>>()
    };
    assert_eq!(bias(&base.join("a")), bias(&pre), "the routing bias stays as loaded");
    // The fine-tuned folder keeps the model's chat template.
    assert!(dsv3_model::Tokenizer::from_dir(&base.join("a")).unwrap().has_chat_template());

    let mut first: Vec<StepLog> = vec![];
    run(sft_args(&pre, &data, base.join("b"), 6), &Layout::single(), None, Some(3), |l| first.push(l.clone())).unwrap();
    let mut second: Vec<StepLog> = vec![];
    let resume = base.join("b");
    run(sft_args(&pre, &data, base.join("b"), 6), &Layout::single(), Some(&resume), None, |l| second.push(l.clone()))
        .unwrap();
    let bits = |v: &[StepLog]| v.iter().map(|l| (l.step, l.loss.to_bits())).collect::<Vec<_>>();
    assert_eq!(bits(&[first, second].concat()), bits(&straight), "resumed bit for bit");
    std::fs::remove_dir_all(&base).ok();
}

#[test]
fn lora_sft_trains_adapters_only_and_resumes_exactly() {
    let base = std::env::temp_dir().join(format!("dsv3-sft-lora-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base).unwrap();
    let pre = common::pretrained(&base);
    let chats: Vec<String> = Addition::sample(40, 2, 5).iter().map(|p| p.chat().to_string()).collect();
    let data = base.join("chats.jsonl");
    std::fs::write(&data, chats.join("\n")).unwrap();
    let lora = |out: PathBuf| TrainArgs {
        lora_rank: 4,
        lora_alpha: Some(8.0),
        lora_targets: ["q_a_proj", "kv_b_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
            .map(String::from)
            .to_vec(),
        lr: 1e-2,
        ..sft_args(&pre, &data, out, 6)
    };
    let mut straight: Vec<StepLog> = vec![];
    run(lora(base.join("a")), &Layout::single(), None, None, |l| straight.push(l.clone())).unwrap();
    assert!(straight.last().unwrap().lm_loss < straight[0].lm_loss, "the adapters learn");
    // The checkpoint is an adapter folder in PEFT's layout; the base is untouched.
    let a = base.join("a");
    let files: Vec<_> = std::fs::read_dir(&a).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(a.join("adapter_config.json").exists() && !a.join("model.safetensors").exists(), "{files:?}");
    // Routed experts' adapters in PEFT's fused layout (gate and up block-diagonal in gate_up_proj).
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(a.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(written["target_parameters"], serde_json::json!(["gate_up_proj", "down_proj"]));
    let mut m = dsv3_model::DeepseekV3::load(&pre).unwrap();
    let cfg = m.load_peft(&a).unwrap();
    assert_eq!((cfg.rank, cfg.alpha), (4, 8.0));
    let mut fresh = dsv3_model::DeepseekV3::load(&pre).unwrap();
    let before: Vec<Vec<f32>> = fresh.params_mut().into_iter().map(|p| p.data.to_vec()).collect();
    let after: Vec<Vec<f32>> = m
        .params_mut_where(|n| !dsv3_model::DeepseekV3::is_lora_param(n))
        .into_iter()
        .map(|p| p.data.to_vec())
        .collect();
    assert!(before == after, "the base weights are frozen");

    let mut first: Vec<StepLog> = vec![];
    run(lora(base.join("b")), &Layout::single(), None, Some(3), |l| first.push(l.clone())).unwrap();
    let mut second: Vec<StepLog> = vec![];
    let resume = base.join("b");
    run(lora(base.join("b")), &Layout::single(), Some(&resume), None, |l| second.push(l.clone())).unwrap();
    let bits = |v: &[StepLog]| v.iter().map(|l| (l.step, l.loss.to_bits())).collect::<Vec<_>>();
    assert_eq!(bits(&[first, second].concat()), bits(&straight), "resumed bit for bit");
    std::fs::remove_dir_all(&base).ok();
}
