//! Request bodies as clients send them, and the checks that turn one into an engine request: sizes
//! compared without wrapping sums, parameters dsv3 does not implement refused, not ignored.

use super::{now, AppState};
use crate::engine::GenRequest;
use crate::error::ApiError;
use dsv3_model::sampling::{Penalties, SamplingParams};
use serde::Deserialize;
use serde_json::Value;

/// Strings or a list of them; or token ids.
#[derive(Deserialize, Default)]
#[serde(untagged)]
pub(super) enum Stop {
    #[default]
    None,
    One(String),
    Many(Vec<String>),
    Ids(Vec<u32>),
}

impl Stop {
    fn list(&self) -> Vec<String> {
        match self {
            Stop::None | Stop::Ids(_) => vec![],
            Stop::One(s) => vec![s.clone()],
            Stop::Many(v) => v.clone(),
        }
    }

    fn ids(&self) -> &[u32] {
        match self {
            Stop::Ids(v) => v,
            _ => &[],
        }
    }
}

/// The sampling fields both endpoints share.
#[derive(Deserialize)]
pub(super) struct Common {
    /// The served model: the base, or a LoRA adapter's name (`dsv3 serve --lora NAME=DIR`).
    #[serde(default)]
    pub(super) model: Option<String>,
    #[serde(default)]
    pub(super) max_tokens: Option<usize>,
    #[serde(default)]
    pub(super) max_completion_tokens: Option<usize>,
    #[serde(default)]
    pub(super) temperature: Option<f32>,
    #[serde(default)]
    pub(super) top_p: Option<f32>,
    /// vLLM's and Anthropic's top-k (absent, 0 or vLLM's -1 keeps every token).
    #[serde(default)]
    pub(super) top_k: Option<i64>,
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
    #[serde(default)]
    pub(super) presence_penalty: Option<f32>,
    #[serde(default)]
    pub(super) frequency_penalty: Option<f32>,
    #[serde(default)]
    pub(super) repetition_penalty: Option<f32>,
    /// Token id (as a string key, OpenAI's shape) → bias added to its logit, in [-100, 100].
    #[serde(default)]
    pub(super) logit_bias: Option<serde_json::Map<String, Value>>,
    #[serde(default)]
    pub(super) min_tokens: Option<usize>,
    /// More ids that end a generation (vLLM's name); the text of such a token is not shown.
    #[serde(default)]
    pub(super) stop_token_ids: Option<Vec<u32>>,
    /// vLLM's prompt log-probs: each prompt token's log-prob and this many alternatives.
    #[serde(default)]
    pub(super) prompt_logprobs: Option<usize>,
    /// `{"type": "text" | "json_object" | "json_schema", "json_schema": {"schema": ...}}`,
    /// enforced while decoding.
    #[serde(default)]
    pub(super) response_format: Option<Value>,
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
    best_of: Option<usize>,
    suffix: Option<String>,
}

impl Unsupported {
    fn check(&self) -> Result<(), ApiError> {
        let refuse = |p: &str| Err(ApiError::bad(format!("`{p}` is not supported by this server yet"), Some(p)));
        let u = self;
        if u.best_of.is_some_and(|b| b > 1) {
            return refuse("best_of");
        }
        if u.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
            return refuse("suffix");
        }
        Ok(())
    }
}

#[derive(Deserialize)]
pub(super) struct CompletionBody {
    pub(super) prompt: Value,
    #[serde(default)]
    pub(super) logprobs: Option<usize>,
    /// The prompt comes back before the completion, with its log-probs when `logprobs` is set.
    #[serde(default)]
    pub(super) echo: bool,
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
    /// `"auto"`, `"none"`, `"required"` or `{"type": "function", "function": {"name": ...}}`
    /// (the last two enforced while decoding).
    #[serde(default)]
    pub(super) tool_choice: Option<Value>,
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

/// A prompt's ids and, for `echo`, its text.
pub(super) type Prompt = (Vec<u32>, Option<String>);

/// Most choices one request may ask for (prompts × `n`).
pub(super) const MAX_CHOICES: usize = 128;

/// A validated request: one engine request per choice, and what the answer needs to know.
pub(super) struct Plan {
    /// Per choice, in `index` order: the engine request and the prompt's text for `echo`.
    pub(super) choices: Vec<(GenRequest, Option<String>)>,
    /// Prompt tokens over the distinct prompts (usage counts each prompt once, whatever `n`).
    pub(super) prompt_tokens: usize,
    pub(super) stops: Vec<String>,
    /// Stop ids whose text is not shown (`stop_token_ids`); end-of-sequence text never is.
    pub(super) hidden: Vec<u32>,
    pub(super) echo: bool,
    /// The rendered chat prompt ends in `<think>` (set by the chat endpoints).
    pub(super) thinking: bool,
    /// The grammar forces a tool call (set by the chat endpoints).
    pub(super) forced: Option<super::structured::Forced>,
}

/// What the endpoint adds to the shared fields.
pub(super) struct Asks {
    pub(super) logprobs: Option<usize>,
    pub(super) echo: bool,
}

/// Validates everything a client can get wrong and builds one engine request per choice: each
/// prompt `n` times, choice `j` of a prompt seeded `seed + j`.
pub(super) fn plan(st: &AppState, prompts: Vec<Prompt>, c: &Common, a: Asks) -> Result<Plan, ApiError> {
    let n = c.n.unwrap_or(1);
    if n == 0 || n > MAX_CHOICES {
        return Err(ApiError::bad(format!("n = {n} must be in 1..={MAX_CHOICES}"), Some("n")));
    }
    if prompts.is_empty() {
        return Err(ApiError::bad("the prompt list is empty", Some("prompt")));
    }
    if prompts.len().checked_mul(n).is_none_or(|t| t > MAX_CHOICES) {
        let msg = format!("{} prompts × n = {n} choices; at most {MAX_CHOICES} per request", prompts.len());
        return Err(ApiError::bad(msg, Some("n")));
    }
    let base = gen_request(st, c, &a)?;
    let mut choices = vec![];
    let mut prompt_tokens = 0usize;
    for (ids, text) in prompts {
        check_prompt(st, &ids, base.max_tokens, base.field)?;
        prompt_tokens = prompt_tokens.saturating_add(ids.len());
        let max_tokens = match c.max_completion_tokens.or(c.max_tokens) {
            Some(m) => m,
            None => default_budget(st, ids.len()),
        };
        for j in 0..n {
            let mut req = base.clone();
            req.prompt = ids.clone();
            req.max_tokens = max_tokens;
            req.sampling.seed = req.sampling.seed.wrapping_add(j as u64);
            choices.push((req, text.clone()));
        }
    }
    let hidden: Vec<u32> = c.stop_token_ids.iter().flatten().chain(c.stop.ids()).copied().collect();
    Ok(Plan { choices, prompt_tokens, stops: c.stop.list(), hidden, echo: a.echo, thinking: false, forced: None })
}

/// The completion budget when the client names none: what fits, at most 256.
fn default_budget(st: &AppState, n: usize) -> usize {
    let (ctx, kv) = (st.model.config.max_position_embeddings, st.engine.config.kv_tokens);
    ctx.saturating_sub(n).min(kv.saturating_sub(n)).min(256)
}

/// A prompt against the vocabulary, the context window and the KV budget, with `max_tokens` of
/// room after it. Compared without arithmetic that can wrap: a `max_tokens` near 2⁶⁴ is an error,
/// not a huge budget that a wrapped sum lets through.
fn check_prompt(st: &AppState, prompt: &[u32], max_tokens: Option<usize>, field: &str) -> Result<(), ApiError> {
    let ctx = st.model.config.max_position_embeddings;
    let kv = st.engine.config.kv_tokens;
    if prompt.is_empty() {
        return Err(ApiError::bad("the prompt is empty", Some("prompt")));
    }
    if let Some(&bad) = prompt.iter().find(|&&t| t as usize >= st.model.config.vocab_size) {
        return Err(ApiError::bad(format!("token id {bad} is outside the vocabulary"), Some("prompt")));
    }
    let n = prompt.len();
    // A scoring request (`max_tokens: 0`) may fill the window; one that generates needs a slot.
    let room = usize::from(max_tokens != Some(0));
    if n + room > ctx {
        let msg = format!("the prompt has {n} tokens; the context window is {ctx}, which leaves no room to generate");
        return Err(ApiError::bad(msg, Some("prompt")));
    }
    if n + room > kv {
        let msg =
            format!("the prompt has {n} tokens; the server's KV-cache budget (--kv-memory) holds {kv} per request");
        return Err(ApiError::bad(msg, Some("prompt")));
    }
    match max_tokens {
        Some(m) if m > ctx - n => {
            let msg = format!("{field} {m} with a {n}-token prompt exceeds the context window of {ctx} tokens");
            Err(ApiError::bad(msg, Some(field)))
        }
        Some(m) if m > kv - n => {
            let msg = format!("{field} {m} with a {n}-token prompt exceeds the server's KV-cache budget of {kv} tokens per request (--kv-memory)");
            Err(ApiError::bad(msg, Some(field)))
        }
        _ => Ok(()),
    }
}

/// The settings every choice shares (prompt and budget filled in per choice).
struct Base {
    req: GenRequest,
    max_tokens: Option<usize>,
    /// Which of `max_tokens` / `max_completion_tokens` gave it.
    field: &'static str,
}

impl std::ops::Deref for Base {
    type Target = GenRequest;
    fn deref(&self) -> &GenRequest {
        &self.req
    }
}

fn gen_request(st: &AppState, c: &Common, a: &Asks) -> Result<Base, ApiError> {
    c.unsupported.check()?;
    let adapter = st.adapter_of(c.model.as_deref())?;
    let (field, asked) = match (c.max_completion_tokens, c.max_tokens) {
        (Some(m), _) => ("max_completion_tokens", Some(m)),
        (None, m) => ("max_tokens", m),
    };
    let scoring = a.echo || c.prompt_logprobs.is_some();
    if asked == Some(0) && !scoring {
        return Err(ApiError::bad(
            format!("{field} must be at least 1 (0 only with echo or prompt_logprobs)"),
            Some(field),
        ));
    }
    let temperature = c.temperature.unwrap_or(1.0);
    if !(temperature.is_finite() && (0.0..=2.0).contains(&temperature)) {
        return Err(ApiError::bad(format!("temperature {temperature} must be in [0, 2]"), Some("temperature")));
    }
    let top_p = c.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::bad(format!("top_p {top_p} must be in (0, 1]"), Some("top_p")));
    }
    for (p, k) in [("logprobs", a.logprobs), ("prompt_logprobs", c.prompt_logprobs)] {
        if k.is_some_and(|k| k > 20) {
            return Err(ApiError::bad(format!("at most 20 alternatives per token for {p}"), Some(p)));
        }
    }
    let stops = c.stop.list();
    if stops.len() > MAX_STOPS {
        return Err(ApiError::bad(format!("{} stop strings; at most {MAX_STOPS}", stops.len()), Some("stop")));
    }
    if let Some(s) = stops.iter().find(|s| s.is_empty() || s.len() > MAX_STOP_BYTES) {
        let msg = format!("a stop string must have 1 to {MAX_STOP_BYTES} bytes, not {}", s.len());
        return Err(ApiError::bad(msg, Some("stop")));
    }
    let mut stop_ids = st.eos_ids.clone();
    let extra: Vec<u32> = c.stop_token_ids.iter().flatten().chain(c.stop.ids()).copied().collect();
    if extra.len() > MAX_STOPS {
        return Err(ApiError::bad(
            format!("{} stop token ids; at most {MAX_STOPS}", extra.len()),
            Some("stop_token_ids"),
        ));
    }
    if let Some(&bad) = extra.iter().find(|&&t| t as usize >= st.model.config.vocab_size) {
        return Err(ApiError::bad(format!("stop token id {bad} is outside the vocabulary"), Some("stop_token_ids")));
    }
    stop_ids.extend(extra);
    let min_tokens = c.min_tokens.unwrap_or(0);
    if asked.is_some_and(|m| min_tokens > m) {
        return Err(ApiError::bad(format!("min_tokens {min_tokens} exceeds {field}"), Some("min_tokens")));
    }
    let sampling = SamplingParams {
        temperature,
        top_p,
        top_k: c.top_k.and_then(|k| usize::try_from(k).ok()).unwrap_or(0),
        seed: c.seed.unwrap_or_else(|| now() ^ 0x5eed),
        penalties: penalties(st, c)?,
    };
    let req = GenRequest {
        prompt: vec![],
        max_tokens: 0,
        sampling,
        stop_ids,
        logprobs: a.logprobs,
        prompt_logprobs: c.prompt_logprobs.or(a.logprobs.filter(|_| a.echo)),
        min_tokens,
        constraint: None,
        adapter,
    };
    Ok(Base { req, max_tokens: asked, field })
}

/// Presence and frequency in [-2, 2] (OpenAI's range), the repetition penalty positive,
/// `logit_bias` keyed by ids in the vocabulary with biases in [-100, 100].
fn penalties(st: &AppState, c: &Common) -> Result<Penalties, ApiError> {
    for (p, v) in [("presence_penalty", c.presence_penalty), ("frequency_penalty", c.frequency_penalty)] {
        if v.is_some_and(|v| !(v.is_finite() && (-2.0..=2.0).contains(&v))) {
            return Err(ApiError::bad(format!("{p} must be in [-2, 2]"), Some(p)));
        }
    }
    let repetition = c.repetition_penalty.unwrap_or(1.0);
    if !(repetition.is_finite() && repetition > 0.0) {
        return Err(ApiError::bad("repetition_penalty must be positive", Some("repetition_penalty")));
    }
    let mut logit_bias = vec![];
    for (k, v) in c.logit_bias.iter().flatten() {
        let id = k.parse::<u32>().ok().filter(|&i| (i as usize) < st.model.config.vocab_size);
        let Some(id) = id else {
            return Err(ApiError::bad(
                format!("logit_bias key {k:?} is not a token id in the vocabulary"),
                Some("logit_bias"),
            ));
        };
        let b = v.as_f64().filter(|b| (-100.0..=100.0).contains(b));
        let Some(b) = b else {
            return Err(ApiError::bad(
                format!("logit_bias[{k}] = {v} must be a number in [-100, 100]"),
                Some("logit_bias"),
            ));
        };
        logit_bias.push((id, b as f32));
    }
    Ok(Penalties {
        presence: c.presence_penalty.unwrap_or(0.0),
        frequency: c.frequency_penalty.unwrap_or(0.0),
        repetition,
        logit_bias,
    })
}

/// Completion prompts: a string, a list of strings, a list of ids, or a list of id lists (one
/// choice each); each with its text for `echo` (a string as given, ids decoded).
pub(super) fn completion_prompts(st: &AppState, prompt: &Value) -> Result<Vec<Prompt>, ApiError> {
    let tok = || {
        st.tokenizer
            .as_ref()
            .ok_or_else(|| ApiError::bad("this model has no tokenizer.json: send token ids", Some("prompt")))
    };
    let text = |s: &str| -> Result<Prompt, ApiError> {
        let ids = tok()?.encode(s, true).map_err(|e| ApiError::bad(e.to_string(), Some("prompt")))?;
        Ok((ids, Some(s.to_string())))
    };
    let ids = |a: &[Value], at: &str| -> Result<Prompt, ApiError> {
        let ids = a
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_u64()
                    .and_then(|x| u32::try_from(x).ok())
                    .ok_or_else(|| ApiError::bad(format!("prompt{at}[{i}] = {v} is not a token id"), Some("prompt")))
            })
            .collect::<Result<Vec<u32>, _>>()?;
        let text = st.tokenizer.as_ref().and_then(|t| t.decode(&ids, false).ok());
        Ok((ids, text))
    };
    match prompt {
        Value::String(s) => Ok(vec![text(s)?]),
        Value::Array(a) if a.first().is_some_and(Value::is_string) => a
            .iter()
            .map(|v| {
                v.as_str()
                    .ok_or_else(|| ApiError::bad("a prompt list mixes strings and other values", Some("prompt")))
                    .and_then(text)
            })
            .collect(),
        Value::Array(a) if a.first().is_some_and(Value::is_array) => a
            .iter()
            .enumerate()
            .map(|(i, v)| match v {
                Value::Array(p) => ids(p, &format!("[{i}]")),
                _ => Err(ApiError::bad("a prompt list mixes id lists and other values", Some("prompt"))),
            })
            .collect(),
        Value::Array(a) => Ok(vec![ids(a, "")?]),
        _ => {
            Err(ApiError::bad("prompt must be a string, a list of strings, token ids or lists of them", Some("prompt")))
        }
    }
}
