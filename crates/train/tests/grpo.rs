//! GRPO on the built-in addition task: a small model, pre-trained and briefly fine-tuned on the
//! built-in chats (so that some of its samples already have the `<think>…</think>answer` form),
//! raises its mean format reward within a few steps; the run saves a model folder that loads,
//! with its metrics and plots.

mod common;

use dsv3_train::grpo::{GrpoArgs, GrpoLog};
use dsv3_train::reward::RewardKind;
use dsv3_train::{run, Layout, Precision, TrainArgs};

#[test]
fn grpo_raises_the_reward_on_the_builtin_task() {
    let base = std::env::temp_dir().join(format!("dsv3-grpo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base).unwrap();
    let pre = common::pretrained(&base);
    let sft = TrainArgs {
        model: Some(pre),
        chats: true,
        steps: 60,
        seq_len: 80,
        batch_size: 4,
        warmup_steps: 2,
        lr: 3e-3,
        bias_freeze_step: Some(0),
        eval_every: 0,
        out: base.join("sft"),
        ..TrainArgs::default()
    };
    run(sft, &Layout::single(), None, None, |_| {}).unwrap();
    let args = GrpoArgs {
        model: base.join("sft"),
        out: base.join("grpo"),
        prompts: None,
        reward: RewardKind::Format,
        reward_command: None,
        digits: 2,
        group: 8,
        prompts_per_step: 4,
        steps: 30,
        updates: 2,
        max_new_tokens: 40,
        temperature: 1.0,
        top_p: 1.0,
        beta: 0.04,
        clip_eps: 0.2,
        lr: 1e-2,
        weight_decay: 0.0,
        clip: 1.0,
        precision: Precision::F32,
        seed: 0,
        save_every: 0,
        eval_prompts: 16,
        eval_every: 0,
    };
    let mut logs: Vec<GrpoLog> = vec![];
    let s = dsv3_train::grpo::run(&args, |l| logs.push(l.clone())).unwrap();
    let rewards: Vec<f64> = logs.iter().map(|l| l.reward).collect();
    let mean = |r: &[f64]| r.iter().sum::<f64>() / r.len() as f64;
    let (first, last) = (mean(&rewards[..3]), mean(&rewards[rewards.len() - 3..]));
    // Seeds 0-3 here: +0.68, +0.19, +0.26, +0.28.
    assert!(last > first + 0.1, "mean reward {first:.3} over the first 3 steps → {last:.3} over the last 3");
    assert_eq!(s.steps, 30);
    assert!(logs.iter().all(|l| l.kl.is_finite() && l.kl >= 0.0 && l.response_length > 0.0));
    // The policy is a model folder that loads, with its metrics and plots.
    dsv3_model::DeepseekV3::load(&base.join("grpo")).unwrap();
    assert_eq!(std::fs::read_to_string(base.join("grpo/metrics.jsonl")).unwrap().lines().count(), 30);
    assert!(base.join("grpo/reward.png").exists() && base.join("grpo/kl.svg").exists());
    // The greedy evaluation ran before and after, on answers it can score.
    let (before, after) = (s.eval_before.unwrap(), s.eval_after.unwrap());
    assert!(before.1.is_some() && after.1.is_some() && logs.last().unwrap().eval_reward.is_some());
    std::fs::remove_dir_all(&base).ok();
}
