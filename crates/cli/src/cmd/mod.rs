//! One file per command: its flags (a clap `Args`) and what it runs.

pub mod bench;
pub mod chat;
pub mod convert;
pub mod demo;
pub mod eplb;
pub mod generate;
pub mod grpo;
pub mod plan;
pub mod plot;
pub mod random_model;
pub mod schedule;
pub mod score;
pub mod serve;
pub mod sft;
pub mod tokenize;
pub mod train;
