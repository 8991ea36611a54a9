//! `dsv3 tokenize`: token ids of a text, or of a chat rendered with the chat template.

use anyhow::{bail, Context, Result};
use dsv3_model::Tokenizer;
use serde_json::json;
use std::path::PathBuf;

/// Token ids of a text, or of a chat rendered with the chat template.
#[derive(clap::Args)]
pub struct Tokenize {
    /// Folder with tokenizer.json (and tokenizer_config.json for --chat), or a GGUF file.
    #[arg(long, alias = "model")]
    pub tokenizer: PathBuf,
    #[arg(long, group = "input")]
    pub text: Option<String>,
    /// A JSON file holding an array of messages.
    #[arg(long, group = "input")]
    pub chat: Option<PathBuf>,
    /// With --chat: end with the assistant prompt.
    #[arg(long)]
    pub add_generation_prompt: bool,
    /// With --chat: a JSON object passed to the template (`{"thinking": true}` for DeepSeek-V3.1's
    /// and V3.2's thinking mode).
    #[arg(long)]
    pub chat_template_kwargs: Option<String>,
    #[arg(long)]
    pub json: bool,
}

pub fn run(a: &Tokenize) -> Result<()> {
    let tok = Tokenizer::for_model(&a.tokenizer)?
        .with_context(|| format!("{}: no tokenizer (tokenizer.json, or a GGUF vocabulary)", a.tokenizer.display()))?;
    let (ids, text) = match (&a.text, &a.chat) {
        (Some(t), _) => (tok.encode(t, true)?, t.to_string()),
        (None, Some(f)) => {
            let messages = dsv3_model::files::read_json(f).with_context(|| format!("reading {}", f.display()))?;
            let kwargs: Option<serde_json::Value> = match &a.chat_template_kwargs {
                Some(k) => Some(serde_json::from_str(k).context("--chat-template-kwargs: not JSON")?),
                None => None,
            };
            let rendered = tok.render_chat(&messages, None, a.add_generation_prompt, kwargs.as_ref())?;
            (tok.encode(&rendered, false)?, rendered)
        }
        _ => bail!("give --text or --chat"),
    };
    if a.json {
        println!("{}", json!({"ids": ids, "text": text}));
    } else {
        println!("{}", ids.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(" "));
    }
    Ok(())
}
