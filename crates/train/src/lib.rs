//! Training DeepSeek-V3-architecture models (issue 3): data, the optimizer and schedule,
//! auxiliary-loss-free balancing, checkpoints with exact resume, metrics; post-training:
//! supervised fine-tuning on chats ([`chats`]) and GRPO ([`grpo`], [`reward`]). The model and its
//! gradients are the `dsv3-model` crate's (`grad`): this crate never defines a layer.

pub mod args;
pub mod balance;
pub mod chats;
pub mod checkpoint;
pub mod data;
pub mod grpo;
mod holders;
pub mod optim;
pub mod parallel;
pub mod pipeline;
pub mod trainer;

pub use args::{BalanceMode, Precision, TrainArgs};
pub use parallel::Layout;
pub use trainer::{run, StepLog, Summary, Trainer};
pub mod plot;
pub mod raster;
pub mod reward;

/// The tiny preset with a 512-token vocabulary, for the unit tests.
#[cfg(test)]
pub(crate) mod testing {
    use dsv3_model::init::{preset, write_training_init};
    use dsv3_model::DeepseekV3;
    use std::path::PathBuf;

    /// Its initial checkpoint, written to a temporary folder named by `tag` (the caller removes it).
    pub fn tiny_init(tag: &str, seed: u64) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("dsv3-{tag}-{}", std::process::id()));
        let mut cfg = preset("tiny").expect("the tiny preset");
        cfg["vocab_size"] = serde_json::json!(512);
        write_training_init(&dir, &cfg, seed, None).expect("an initial checkpoint");
        dir
    }

    /// The model itself (its folder already removed).
    pub fn tiny_model(tag: &str, seed: u64) -> DeepseekV3 {
        let dir = tiny_init(tag, seed);
        let model = DeepseekV3::load(&dir).expect("the tiny model");
        std::fs::remove_dir_all(&dir).ok();
        model
    }
}
