//! Errors of the model crate: each names the file, tensor or field at fault.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: invalid JSON: {source}")]
    Json { path: PathBuf, source: serde_json::Error },
    #[error("config field `{field}`: {msg}")]
    Config { field: String, msg: String },
    #[error("{path}: not a valid safetensors file: {msg}")]
    Safetensors { path: PathBuf, msg: String },
    #[error("{path}: GGUF: {msg}")]
    Gguf { path: PathBuf, msg: String },
    #[error("tensor `{name}`{}: {msg}", file.as_ref().map(|f| format!(" in {}", f.display())).unwrap_or_default())]
    Tensor { name: String, file: Option<PathBuf>, msg: String },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("`{field}`: {msg}")]
    Chat { field: String, msg: String },
    #[error("chat template: {0}")]
    Template(String),
    #[error("{0}")]
    Input(String),
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;

impl ModelError {
    pub(crate) fn config(field: &str, msg: impl Into<String>) -> Self {
        ModelError::Config { field: field.to_string(), msg: msg.into() }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ModelError::Io { path: path.into(), source }
    }
}
