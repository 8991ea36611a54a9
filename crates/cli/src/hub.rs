//! `--model` resolution: a local folder, or (with the `hub` feature) a Hugging Face Hub id whose
//! config, safetensors shards and tokenizer files are downloaded into the Hub's usual cache.

use anyhow::{bail, Result};
use std::path::{Path, PathBuf};

/// The folder `--model` names. A Hub id looks like `owner/name` and is not a local path.
pub fn resolve_model(arg: &Path) -> Result<PathBuf> {
    if arg.is_dir() || dsv3_model::gguf::is_gguf(arg) {
        return Ok(arg.to_path_buf());
    }
    let s = arg.to_string_lossy();
    let looks_like_id = s.split('/').count() == 2 && !s.starts_with('.') && !s.starts_with('/') && !s.contains('\\');
    if !looks_like_id {
        bail!("--model {s}: not a folder (a Hugging Face model folder with config.json and safetensors)");
    }
    download(&s)
}

#[cfg(feature = "hub")]
fn download(id: &str) -> Result<PathBuf> {
    use anyhow::Context;
    let api =
        hf_hub::api::sync::ApiBuilder::from_env().with_progress(true).build().context("Hugging Face Hub client")?;
    let repo = api.model(id.to_string());
    let config = repo.get("config.json").with_context(|| format!("{id}: config.json"))?;
    let shards: Vec<String> = match repo.get("model.safetensors.index.json") {
        Ok(index) => {
            let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&index)?)
                .with_context(|| format!("{id}: model.safetensors.index.json"))?;
            let map = v["weight_map"].as_object().with_context(|| format!("{id}: index has no weight_map"))?;
            let mut files: Vec<String> = map.values().filter_map(|f| f.as_str().map(String::from)).collect();
            files.sort();
            files.dedup();
            files
        }
        Err(_) => vec!["model.safetensors".into()],
    };
    for f in &shards {
        repo.get(f).with_context(|| format!("{id}: {f}"))?;
    }
    // Optional files: a model without them still scores and generates from ids.
    for f in ["tokenizer.json", "tokenizer_config.json", "generation_config.json"] {
        repo.get(f).ok();
    }
    Ok(config.parent().map(Path::to_path_buf).unwrap_or_default())
}

#[cfg(not(feature = "hub"))]
fn download(id: &str) -> Result<PathBuf> {
    bail!("--model {id}: no such folder; Hub ids need a build with `--features hub` (cargo build --release --features dsv3-cli/hub)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn folders_resolve_and_other_paths_are_clear_errors() {
        let dir = std::env::temp_dir();
        assert_eq!(resolve_model(&dir).unwrap(), dir);
        let e = resolve_model(Path::new("./no/such/dir")).unwrap_err().to_string();
        assert!(e.contains("not a folder"), "{e}");
        #[cfg(not(feature = "hub"))]
        {
            let e = resolve_model(Path::new("deepseek-ai/DeepSeek-V3")).unwrap_err().to_string();
            assert!(e.contains("--features hub"), "{e}");
        }
    }
}
