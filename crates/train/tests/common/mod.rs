//! A small model dsv3 pre-trained for the post-training tests: its own tokenizer (with the chat
//! tokens) and chat template.
#![allow(dead_code)] // each test file uses its own share of the helpers

use dsv3_train::{run, Layout, TrainArgs};
use std::path::{Path, PathBuf};

pub fn config(path: &Path) -> PathBuf {
    let c = serde_json::json!({
        "model_type": "deepseek_v3", "vocab_size": 300, "hidden_size": 32, "intermediate_size": 48,
        "moe_intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
        "n_shared_experts": 1, "n_routed_experts": 8, "num_experts_per_tok": 2, "n_group": 4, "topk_group": 2,
        "first_k_dense_replace": 1, "moe_layer_freq": 1, "q_lora_rank": 16, "kv_lora_rank": 16,
        "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 8, "rope_theta": 10000.0,
        "rms_norm_eps": 1e-6, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "topk_method": "noaux_tc",
        "norm_topk_prob": true, "max_position_embeddings": 256, "tie_word_embeddings": false
    });
    std::fs::write(path, c.to_string()).unwrap();
    path.to_path_buf()
}

/// A few steps of pre-training on arithmetic sentences, saved in `base/pre`.
pub fn pretrained(base: &Path) -> PathBuf {
    let corpus = base.join("corpus");
    std::fs::create_dir_all(&corpus).unwrap();
    for i in 0..30 {
        let text: String = (0..20).map(|j| format!("{i} plus {j} is {}. ", i + j)).collect();
        std::fs::write(corpus.join(format!("d{i}.txt")), text).unwrap();
    }
    let pre = TrainArgs {
        data: vec![corpus],
        config: Some(config(&base.join("config.json"))),
        vocab_size: 300,
        steps: 4,
        seq_len: 16,
        batch_size: 2,
        bias_update_rate: 1e-2,
        eval_every: 0,
        out: base.join("pre"),
        ..TrainArgs::default()
    };
    run(pre, &Layout::single(), None, None, |_| {}).unwrap();
    base.join("pre")
}
