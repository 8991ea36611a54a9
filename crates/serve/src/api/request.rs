//! Request bodies as clients send them, and the checks that turn one into an engine request: sizes
//! compared without wrapping sums, parameters dsv3 does not implement refused, not ignored.

use super::{now, AppState};
use crate::engine::GenRequest;
use crate::error::ApiError;
use dsv3_model::sampling::SamplingParams;
use serde::Deserialize;
use serde_json::Value;

/// Strings or a list of them.
#[derive(Deserialize, Default)]
#[serde(untagged)]
pub(super) enum Stop {
    #[default]
    None,
    One(String),
    Many(Vec<String>),
}

impl Stop {
    fn list(&self) -> Vec<String> {
        match self {
            Stop::None => vec![],
            Stop::One(s) => vec![s.clone()],
            Stop::Many(v) => v.clone(),
        }
    }
}

/// The sampling fields both endpoints share.
#[derive(Deserialize)]
pub(super) struct Common {
    #[serde(default)]
    pub(super) max_tokens: Option<usize>,
    #[serde(default)]
    pub(super) max_completion_tokens: Option<usize>,
    #[serde(default)]
    pub(super) temperature: Option<f32>,
    #[serde(default)]
    pub(super) top_p: Option<f32>,
    #[serde(default)]
    pub(super) seed: Option<u64>,
    #[serde(default)]
    pub(super) stop: Stop,
    #[serde(default)]
    pub(super) n: Option<usize>,
    #[serde(default)]
    pub(super) stream: bool,
    #[serde(default)]
    pub(super) stream_options: Option<StreamOptions>,
    #[serde(flatten)]
    pub(super) unsupported: Unsupported,
}

#[derive(Deserialize, Default)]
pub(super) struct StreamOptions {
    #[serde(default)]
    pub(super) include_usage: bool,
}

/// OpenAI parameters dsv3 does not implement yet: refused when they would change the answer, so
/// that no request is silently read as a different one.
#[derive(Deserialize, Default)]
pub(super) struct Unsupported {
    echo: Option<bool>,
    best_of: Option<usize>,
    suffix: Option<String>,
    logit_bias: Option<serde_json::Map<String, Value>>,
    presence_penalty: Option<f32>,
    frequency_penalty: Option<f32>,
    repetition_penalty: Option<f32>,
    min_tokens: Option<usize>,
    response_format: Option<Value>,
    tool_choice: Option<Value>,
}

impl Unsupported {
    fn check(&self) -> Result<(), ApiError> {
        let refuse = |p: &str| Err(ApiError::bad(format!("`{p}` is not supported by this server yet"), Some(p)));
        let u = self;
        if u.echo == Some(true) {
            return refuse("echo");
        }
        if u.best_of.is_some_and(|b| b > 1) {
            return refuse("best_of");
        }
        if u.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
            return refuse("suffix");
        }
        if u.logit_bias.as_ref().is_some_and(|m| !m.is_empty()) {
            return refuse("logit_bias");
        }
        for (p, v, neutral) in [
            ("presence_penalty", u.presence_penalty, 0.0),
            ("frequency_penalty", u.frequency_penalty, 0.0),
            ("repetition_penalty", u.repetition_penalty, 1.0),
        ] {
            if v.is_some_and(|v| v != neutral) {
                return refuse(p);
            }
        }
        if u.min_tokens.is_some_and(|m| m > 0) {
            return refuse("min_tokens");
        }
        if u.response_format
            .as_ref()
            .is_some_and(|f| !f.is_null() && f.get("type").and_then(Value::as_str) != Some("text"))
        {
            return refuse("response_format");
        }
        if u.tool_choice.as_ref().is_some_and(|c| !c.is_null() && c.as_str() != Some("auto")) {
            return refuse("tool_choice");
        }
        Ok(())
    }
}

#[derive(Deserialize)]
pub(super) struct CompletionBody {
    pub(super) prompt: Value,
    #[serde(default)]
    pub(super) logprobs: Option<usize>,
    #[serde(flatten)]
    pub(super) common: Common,
}

#[derive(Deserialize)]
pub(super) struct ChatBody {
    pub(super) messages: Value,
    #[serde(default)]
    pub(super) logprobs: bool,
    #[serde(default)]
    pub(super) top_logprobs: Option<usize>,
    #[serde(default)]
    pub(super) tools: Option<Value>,
    /// Passed to the chat template (vLLM's and SGLang's name): `{"thinking": true}` opens
    /// DeepSeek-V3.1's and V3.2's thinking mode.
    #[serde(default)]
    pub(super) chat_template_kwargs: Option<Value>,
    #[serde(flatten)]
    pub(super) common: Common,
}

/// Most stop strings per request, and bytes per stop string.
pub(super) const MAX_STOPS: usize = 64;
pub(super) const MAX_STOP_BYTES: usize = 4096;

/// Builds the engine request after validating everything a client can get wrong. Sizes are
/// compared without arithmetic that can wrap: a `max_tokens` near 2⁶⁴ is an error, not a huge
/// budget that a wrapped sum lets through.
pub(super) fn gen_request(
    st: &AppState,
    prompt: Vec<u32>,
    c: &Common,
    logprobs: Option<usize>,
) -> Result<(GenRequest, Vec<String>), ApiError> {
    c.unsupported.check()?;
    let ctx = st.model.config.max_position_embeddings;
    let kv = st.engine.config.kv_tokens;
    if prompt.is_empty() {
        return Err(ApiError::bad("the prompt is empty", Some("prompt")));
    }
    if let Some(&bad) = prompt.iter().find(|&&t| t as usize >= st.model.config.vocab_size) {
        return Err(ApiError::bad(format!("token id {bad} is outside the vocabulary"), Some("prompt")));
    }
    let n = prompt.len();
    if n >= ctx {
        let msg = format!("the prompt has {n} tokens; the context window is {ctx}, which leaves no room to generate");
        return Err(ApiError::bad(msg, Some("prompt")));
    }
    if n >= kv {
        let msg =
            format!("the prompt has {n} tokens; the server's KV-cache budget (--kv-memory) holds {kv} per request");
        return Err(ApiError::bad(msg, Some("prompt")));
    }
    let room = (ctx - n).min(kv - n);
    let (field, asked) = match (c.max_completion_tokens, c.max_tokens) {
        (Some(m), _) => ("max_completion_tokens", Some(m)),
        (None, m) => ("max_tokens", m),
    };
    let max_tokens = match asked {
        None => room.min(256),
        Some(0) => return Err(ApiError::bad(format!("{field} must be at least 1"), Some(field))),
        Some(m) if m > ctx - n => {
            let msg = format!("{field} {m} with a {n}-token prompt exceeds the context window of {ctx} tokens");
            return Err(ApiError::bad(msg, Some(field)));
        }
        Some(m) if m > kv - n => {
            let msg = format!("{field} {m} with a {n}-token prompt exceeds the server's KV-cache budget of {kv} tokens per request (--kv-memory)");
            return Err(ApiError::bad(msg, Some(field)));
        }
        Some(m) => m,
    };
    let temperature = c.temperature.unwrap_or(1.0);
    if !(temperature.is_finite() && (0.0..=2.0).contains(&temperature)) {
        return Err(ApiError::bad(format!("temperature {temperature} must be in [0, 2]"), Some("temperature")));
    }
    let top_p = c.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::bad(format!("top_p {top_p} must be in (0, 1]"), Some("top_p")));
    }
    if c.n.unwrap_or(1) != 1 {
        return Err(ApiError::bad("only n = 1 is supported", Some("n")));
    }
    if logprobs.is_some_and(|k| k > 20) {
        return Err(ApiError::bad("at most 20 log-probs per token", Some("logprobs")));
    }
    let stops = c.stop.list();
    if stops.len() > MAX_STOPS {
        return Err(ApiError::bad(format!("{} stop strings; at most {MAX_STOPS}", stops.len()), Some("stop")));
    }
    if let Some(s) = stops.iter().find(|s| s.is_empty() || s.len() > MAX_STOP_BYTES) {
        let msg = format!("a stop string must have 1 to {MAX_STOP_BYTES} bytes, not {}", s.len());
        return Err(ApiError::bad(msg, Some("stop")));
    }
    let eos = st.eos_ids.clone();
    let sampling = SamplingParams { temperature, top_p, top_k: 0, seed: c.seed.unwrap_or_else(|| now() ^ 0x5eed) };
    Ok((GenRequest { prompt, max_tokens, sampling, stop_ids: eos, logprobs }, stops))
}

/// A completion prompt: text, or token ids (each checked to be a u32 before the vocabulary check).
pub(super) fn completion_prompt(st: &AppState, prompt: &Value) -> Result<Vec<u32>, ApiError> {
    match prompt {
        Value::String(s) => st
            .tokenizer
            .as_ref()
            .ok_or_else(|| ApiError::bad("this model has no tokenizer.json: send token ids", Some("prompt")))?
            .encode(s, true)
            .map_err(|e| ApiError::bad(e.to_string(), Some("prompt"))),
        Value::Array(a) => a
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_u64()
                    .and_then(|x| u32::try_from(x).ok())
                    .ok_or_else(|| ApiError::bad(format!("prompt[{i}] = {v} is not a token id"), Some("prompt")))
            })
            .collect(),
        _ => Err(ApiError::bad("prompt must be a string or an array of token ids", Some("prompt"))),
    }
}
