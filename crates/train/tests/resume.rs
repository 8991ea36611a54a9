//! A run stopped and resumed continues bit-identically; a checkpoint is a Hugging Face folder that
//! the inference engine loads; the routing bias moves against the load.

mod common;

use dsv3_train::{run, Layout, StepLog, TrainArgs};
use std::path::PathBuf;

fn tiny_args(out: PathBuf, steps: u64) -> TrainArgs {
    std::fs::create_dir_all(out.parent().unwrap()).unwrap();
    let cfg = common::config(&out.with_extension("config.json"));
    // A corpus of its own: the built-in one is the repository's text and changes with every commit.
    let data = out.with_extension("corpus");
    std::fs::create_dir_all(&data).unwrap();
    for i in 0..40 {
        let text: String = (0..30).map(|j| format!("fn f{i}_{j}(x: u32) -> u32 {{ x * {j} + {i} }}\n")).collect();
        std::fs::write(data.join(format!("d{i}.rs")), text).unwrap();
    }
    TrainArgs {
        data: vec![data],
        config: Some(cfg),
        vocab_size: 300,
        steps,
        seq_len: 16,
        batch_size: 2,
        warmup_steps: 2,
        lr: 1e-2,
        bias_update_rate: 1e-2,
        eval_every: 3,
        eval_windows: 4,
        out,
        ..TrainArgs::default()
    }
}

#[test]
fn resume_is_bit_identical_and_checkpoints_load_for_inference() {
    let base = std::env::temp_dir().join(format!("dsv3-resume-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let mut straight: Vec<StepLog> = vec![];
    run(tiny_args(base.join("a"), 6), &Layout::single(), None, None, |l| straight.push(l.clone())).unwrap();

    let mut first: Vec<StepLog> = vec![];
    run(tiny_args(base.join("b"), 6), &Layout::single(), None, Some(3), |l| first.push(l.clone())).unwrap();
    let mut second: Vec<StepLog> = vec![];
    run(tiny_args(base.join("b"), 6), &Layout::single(), Some(&base.join("b")), None, |l| second.push(l.clone()))
        .unwrap();
    let resumed: Vec<(u64, u64, f64)> =
        first.iter().chain(&second).map(|l| (l.step, l.loss.to_bits(), l.grad_norm)).collect();
    let want: Vec<(u64, u64, f64)> = straight.iter().map(|l| (l.step, l.loss.to_bits(), l.grad_norm)).collect();
    assert_eq!(resumed, want, "losses after a resume equal an uninterrupted run's, bit for bit");
    let wa = std::fs::read(base.join("a/model.safetensors")).unwrap();
    let wb = std::fs::read(base.join("b/model.safetensors")).unwrap();
    assert!(wa == wb, "final weights (routing biases included) are identical");

    // The loss went down, and the bias moved against the load: overloaded experts end lower.
    assert!(straight.last().unwrap().lm_loss < straight[0].lm_loss);
    let (lo, hi) = straight.last().unwrap().bias_range;
    assert!(lo < 0.0 && hi > 0.0, "bias range {lo}..{hi}");

    // The checkpoint is a model folder the inference engine (and its tokenizer) loads.
    let model = dsv3_model::DeepseekV3::load(&base.join("a")).unwrap();
    let tok = dsv3_model::Tokenizer::from_dir(&base.join("a")).unwrap();
    let ids = tok.encode("fn main() {", false).unwrap();
    let s = dsv3_model::generate::score(&model, &ids, true, 0).unwrap();
    assert!(s.nll.is_finite() && !s.mtp_logprobs.is_empty());
    // metrics.jsonl has one line per logged step and survived the checkpoint swaps.
    let lines = std::fs::read_to_string(base.join("b/metrics.jsonl")).unwrap().lines().count();
    assert_eq!(lines, 6);
    std::fs::remove_dir_all(&base).ok();
}

#[test]
fn dsa_warmup_trains_only_the_indexers() {
    // DeepSeek-V3.2's dense warm-up: every weight but the indexers' (and the routing biases) stays
    // as initialized, the indexers move and their loss is logged.
    let base = std::env::temp_dir().join(format!("dsv3-dsa-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let v32 = |out: PathBuf, steps: u64| {
        let mut a = tiny_args(out, steps);
        let cfg = a.config.clone().unwrap();
        let mut c: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
        c["model_type"] = "deepseek_v32".into();
        (c["index_n_heads"], c["index_head_dim"], c["index_topk"]) = (16.into(), 16.into(), 4.into());
        std::fs::write(&cfg, c.to_string()).unwrap();
        a.dsa_warmup_steps = 3;
        a.eval_every = 0;
        a
    };
    let mut logs: Vec<StepLog> = vec![];
    run(v32(base.join("warm"), 3), &Layout::single(), None, None, |l| logs.push(l.clone())).unwrap();
    // The run's initial weights: its config, its seed, the trainer's initializer.
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(base.join("warm/config.json")).unwrap()).unwrap();
    dsv3_model::init::write_training_init(&base.join("init"), &cfg, 0, None).unwrap();
    assert!(logs.iter().all(|l| l.dsa_warmup && l.indexer_loss.is_some_and(|v| v > 0.0)), "warm-up steps log L_I");
    let mut init = dsv3_model::DeepseekV3::load(&base.join("init")).unwrap();
    let mut warm = dsv3_model::DeepseekV3::load(&base.join("warm")).unwrap();
    let (mut moved, mut kept) = (0, 0);
    for (a, b) in init.params_mut().into_iter().zip(warm.params_mut()) {
        assert_eq!(a.name, b.name);
        match a.name.contains(".indexer.") {
            true => moved += (a.data != b.data) as usize,
            false => {
                assert!(a.data == b.data, "{} changed during the warm-up", a.name);
                kept += 1;
            }
        }
    }
    assert!(moved >= 5 * 3 && kept > 0, "{moved} indexer tensors moved, {kept} others kept");
    let biases = |m: &mut dsv3_model::DeepseekV3| -> Vec<f32> {
        m.routing_biases_mut().iter().flat_map(|(_, b)| b.iter().copied()).collect()
    };
    assert_eq!(biases(&mut init), biases(&mut warm), "routing biases frozen with the main model");
    std::fs::remove_dir_all(&base).ok();
}
