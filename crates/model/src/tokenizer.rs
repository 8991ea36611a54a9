//! The model's tokenizer (`tokenizer.json` through `tokenizers`) and chat template (the Jinja text in
//! `tokenizer_config.json`, rendered with minijinja set up as transformers sets up jinja2:
//! `trim_blocks`, `lstrip_blocks`, Python string methods such as `.split()`).

use crate::error::{ModelError, Result};
use serde_json::Value;
use std::path::Path;

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    chat_template: Option<String>,
    /// DeepSeek-V3.2's chat encoding ([`crate::dsml`]) for a checkpoint that ships rules, not a
    /// template (`model_type: deepseek_v32` and no `chat_template`).
    dsml: bool,
    /// The roles the template handles ([`crate::chat::template_roles`]).
    roles: Vec<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    add_bos_token: bool,
}

/// A token string in `tokenizer_config.json`: a plain string or an `AddedToken` object.
fn token_text(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(str::to_string),
        _ => None,
    }
}

impl Tokenizer {
    /// The tokenizer of the model at `path`: a folder's `tokenizer.json`, or a GGUF file's own
    /// (a `tokenizer.json` beside the file, with its `tokenizer_config.json`, takes precedence).
    /// `None` for a folder without one, or a GGUF without a vocabulary (no
    /// `tokenizer.ggml.model`, or llama.cpp's `none`/`no_vocab`).
    pub fn for_model(path: &Path) -> Result<Option<Self>> {
        if crate::gguf::is_gguf(path) {
            let dir = path.parent().unwrap_or(Path::new("."));
            if dir.join("tokenizer.json").exists() {
                return Self::from_dir(dir).map(Some);
            }
            let g = crate::gguf::Gguf::open(path)?;
            let model = g.main().string("tokenizer.ggml.model")?;
            if matches!(model, None | Some("none") | Some("no_vocab")) {
                return Ok(None);
            }
            return crate::gguf::tokenizer::tokenizer(&g).map(Some);
        }
        Ok(if path.join("tokenizer.json").exists() { Some(Self::from_dir(path)?) } else { None })
    }

    /// Reads `tokenizer.json` and, when present, `tokenizer_config.json` from `dir`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let tj = dir.join("tokenizer.json");
        if !tj.exists() {
            return Err(ModelError::Tokenizer(format!("{} not found", tj.display())));
        }
        let bytes = crate::files::read_regular(&tj, crate::files::MAX_TEXT_BYTES)?;
        let inner = tokenizers::Tokenizer::from_bytes(&bytes)
            .map_err(|e| ModelError::Tokenizer(format!("{}: {e}", tj.display())))?;
        let tc = dir.join("tokenizer_config.json");
        let cfg: Value = if tc.exists() { crate::files::read_json(&tc)? } else { Value::Null };
        let chat_template = match cfg.get("chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            // A list of named templates: take "default".
            Some(Value::Array(a)) => a
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .and_then(|t| t.get("template"))
                .and_then(|t| t.as_str())
                .map(str::to_string),
            _ => None,
        };
        let chat_template = match chat_template {
            Some(t) => Some(t),
            None => crate::files::read_text(&dir.join("chat_template.jinja")).ok(),
        };
        let v32 = || {
            let c = crate::files::read_json(&dir.join("config.json")).ok();
            c.is_some_and(|c| c.get("model_type").and_then(Value::as_str) == Some("deepseek_v32"))
        };
        let dsml = chat_template.is_none() && v32();
        let mut t = Self::from_parts(
            inner,
            chat_template,
            token_text(cfg.get("bos_token")),
            token_text(cfg.get("eos_token")),
            cfg.get("add_bos_token").and_then(|v| v.as_bool()).unwrap_or(false),
        );
        t.dsml = dsml;
        Ok(t)
    }

    /// A tokenizer from its pieces (a GGUF file's metadata gives them: [`crate::gguf::tokenizer`]).
    pub fn from_parts(
        inner: tokenizers::Tokenizer,
        chat_template: Option<String>,
        bos_token: Option<String>,
        eos_token: Option<String>,
        add_bos_token: bool,
    ) -> Self {
        Tokenizer {
            inner,
            roles: crate::chat::template_roles(chat_template.as_deref().unwrap_or("")),
            chat_template,
            dsml: false,
            bos_token,
            eos_token,
            add_bos_token,
        }
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The tokenizer as HF's `tokenizer.json` value (for libraries that read the vocabulary from
    /// it, such as the grammar engine's token trie).
    pub fn to_json(&self) -> Result<Value> {
        let text = self.inner.to_string(false).map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        serde_json::from_str(&text).map_err(|e| ModelError::Tokenizer(e.to_string()))
    }

    /// Token ids of `text`. With `add_special_tokens`, the tokenizer's post-processor runs and a BOS
    /// is put first when `add_bos_token` is set and it is not there yet (as `LlamaTokenizerFast`).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, add_special_tokens).map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        let mut ids = enc.get_ids().to_vec();
        if add_special_tokens && self.add_bos_token {
            if let Some(bos) = self.bos_token.as_deref().and_then(|b| self.token_id(b)) {
                if ids.first() != Some(&bos) {
                    ids.insert(0, bos);
                }
            }
        }
        Ok(ids)
    }

    /// The tokens of `text` (no special tokens added), each with its byte range in it.
    pub fn encode_with_offsets(&self, text: &str) -> Result<Vec<(u32, usize, usize)>> {
        let enc = self.inner.encode(text, false).map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().iter().zip(enc.get_offsets()).map(|(&id, &(a, b))| (id, a, b)).collect())
    }

    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner.decode(ids, skip_special_tokens).map_err(|e| ModelError::Tokenizer(e.to_string()))
    }

    /// The Jinja chat template, when the checkpoint has one.
    pub fn chat_template(&self) -> Option<&str> {
        self.chat_template.as_deref()
    }

    /// Whether chats are encoded by DeepSeek-V3.2's rules ([`crate::dsml`]) rather than a template.
    pub fn encodes_dsml(&self) -> bool {
        self.dsml
    }

    /// Whether encoding with special tokens puts the BOS first.
    pub fn adds_bos(&self) -> bool {
        self.add_bos_token
    }

    pub fn has_chat_template(&self) -> bool {
        self.chat_template.is_some() || self.dsml
    }

    /// Renders `messages` (a JSON array of `{role, content, ...}`) with the chat template.
    pub fn apply_chat_template(&self, messages: &Value, add_generation_prompt: bool) -> Result<String> {
        self.apply_chat_template_with_tools(messages, None, add_generation_prompt)
    }

    /// As [`Self::apply_chat_template`], with the request's `tools` (OpenAI function specs) in the
    /// template's context, for templates that render them (DeepSeek-V3.1 and later).
    pub fn apply_chat_template_with_tools(
        &self,
        messages: &Value,
        tools: Option<&Value>,
        add_generation_prompt: bool,
    ) -> Result<String> {
        self.render_chat(messages, tools, add_generation_prompt, None)
    }

    /// The chat as the checkpoint's format renders it, with `kwargs` (transformers'
    /// `chat_template_kwargs`, e.g. `{"thinking": true}` for V3.1's hybrid thinking) in the
    /// template's context. V3.2's rules read `thinking` (or `thinking_mode: "thinking"`); they
    /// have no generation prompt of their own (a user turn ends with it).
    pub fn render_chat(
        &self,
        messages: &Value,
        tools: Option<&Value>,
        add_generation_prompt: bool,
        kwargs: Option<&Value>,
    ) -> Result<String> {
        if let Some(k) = kwargs.filter(|k| !k.is_null() && !k.is_object()) {
            return Err(ModelError::Template(format!("chat_template_kwargs must be an object, not {k}")));
        }
        let kw = |key: &str| kwargs.and_then(|k| k.get(key));
        if self.chat_template.is_none() && self.dsml {
            let list = messages
                .as_array()
                .filter(|m| m.iter().all(Value::is_object))
                .ok_or_else(|| ModelError::Template("messages must be a list of objects".into()))?;
            if let Some(t) = tools {
                crate::chat::check_tools(t)?;
            }
            let thinking = kw("thinking").and_then(Value::as_bool).unwrap_or(false)
                || kw("thinking_mode").and_then(Value::as_str) == Some("thinking");
            // V3.2's rules put a request's response_format (passed as a kwarg) in the system block.
            let format = kw("response_format").filter(|f| !f.is_null());
            return crate::dsml::encode_messages(&crate::dsml::with_request_tools(list, tools, format), thinking);
        }
        let tpl = self
            .chat_template
            .as_deref()
            .ok_or_else(|| ModelError::Template("tokenizer_config.json has no chat_template".into()))?;
        let messages = crate::chat::normalize_messages(messages, &self.roles)?;
        if let Some(t) = tools {
            crate::chat::check_tools(t)?;
        }
        let mut env = minijinja::Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        });
        env.add_template("chat", tpl).map_err(|e| ModelError::Template(e.to_string()))?;
        let base = minijinja::context! {
            messages => minijinja::Value::from_serialize(&messages),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.clone().unwrap_or_default(),
            eos_token => self.eos_token.clone().unwrap_or_default(),
            tools => tools.map(minijinja::Value::from_serialize),
        };
        // The request's kwargs under the fixed names (which they cannot replace).
        let ctx = match kwargs {
            Some(k) if k.is_object() => minijinja::context! { ..base, ..minijinja::Value::from_serialize(k) },
            _ => base,
        };
        env.get_template("chat").and_then(|t| t.render(ctx)).map_err(|e| ModelError::Template(e.to_string()))
    }

    /// Ids of a chat: rendered, then encoded without adding special tokens (the template already
    /// starts with BOS; spec pitfall 13).
    pub fn encode_chat(&self, messages: &Value, add_generation_prompt: bool) -> Result<Vec<u32>> {
        self.encode(&self.apply_chat_template(messages, add_generation_prompt)?, false)
    }
}
