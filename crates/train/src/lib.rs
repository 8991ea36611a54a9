//! Training DeepSeek-V3-architecture models (issue 3): data, the optimizer and schedule,
//! auxiliary-loss-free balancing, checkpoints with exact resume, metrics. The model and its
//! gradients are the `dsv3-model` crate's (`grad`): this crate never defines a layer.

pub mod data;
pub mod balance;
pub mod optim;
pub mod parallel;
mod placement;
pub mod pipeline;
pub mod checkpoint;
pub mod trainer;

pub use trainer::{run, BalanceMode, Precision, StepLog, Summary, TrainArgs};
pub mod plot;
pub mod raster;
