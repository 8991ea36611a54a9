//! The OpenAI-compatible HTTP surface: request parsing and validation, SSE streaming, OpenAI-shaped
//! errors, the API key, and the small endpoints (models, tokenize, detokenize, health, metrics).

use crate::engine::{EngineHandle, Event, Finish, GenRequest, SubmitError, TokenOut};
use crate::error::ApiError;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use dsv3_model::sampling::SamplingParams;
use dsv3_model::{DeepseekV3, Tokenizer};
use serde::Deserialize;
use serde_json::{json, Value};
use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

pub struct AppState {
    pub engine: EngineHandle,
    pub model: Arc<DeepseekV3>,
    pub tokenizer: Option<Tokenizer>,
    pub model_name: String,
    pub api_key: Option<String>,
    /// Token ids that end a generation (generation_config.json, config.json, tokenizer).
    pub eos_ids: Vec<u32>,
    /// More Prometheus text for `/metrics` (expert-parallel placement, from the CLI).
    pub extra_metrics: Option<crate::MetricsHook>,
    /// Connection limits and deadlines ([`crate::http`]).
    pub http: crate::http::HttpLimits,
}

type Shared = Arc<AppState>;

pub fn router(state: Shared) -> Router {
    let edge = Arc::new(crate::http::EdgeState { limits: state.http.clone(), metrics: state.engine.metrics.clone() });
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .route("/health", get(|| async { "ok" }))
        .route("/metrics", get(metrics))
        .fallback(crate::http::not_found)
        .method_not_allowed_fallback(crate::http::method_not_allowed)
        // The edge reads bodies under its own cap and deadline.
        .layer(DefaultBodyLimit::disable())
        .layer(axum::middleware::from_fn_with_state(edge, crate::http::edge))
        .with_state(state)
}

/// `Authorization: Bearer KEY`, compared in constant time (no timing oracle on the key's bytes).
fn check_key(st: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    use subtle::ConstantTimeEq;
    let Some(key) = &st.api_key else { return Ok(()) };
    let given = headers.get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    match given {
        Some(g) if bool::from(g.as_bytes().ct_eq(key.as_bytes())) => Ok(()),
        _ => Err(ApiError::unauthorized()),
    }
}

fn parse<T: for<'de> Deserialize<'de>>(body: &Bytes) -> Result<T, ApiError> {
    let text = std::str::from_utf8(body).map_err(|_| ApiError::bad("the body is not valid UTF-8", None))?;
    serde_json::from_str(text).map_err(|e| ApiError::bad(format!("invalid request: {e}"), None))
}

/// Strings or a list of them.
#[derive(Deserialize, Default)]
#[serde(untagged)]
enum Stop {
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
struct Common {
    #[serde(default)]
    max_tokens: Option<usize>,
    #[serde(default)]
    max_completion_tokens: Option<usize>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_p: Option<f32>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    stop: Stop,
    #[serde(default)]
    n: Option<usize>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(flatten)]
    unsupported: Unsupported,
}

#[derive(Deserialize, Default)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

/// OpenAI parameters dsv3 does not implement yet: refused when they would change the answer, so
/// that no request is silently read as a different one.
#[derive(Deserialize, Default)]
struct Unsupported {
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
struct CompletionBody {
    prompt: Value,
    #[serde(default)]
    logprobs: Option<usize>,
    #[serde(flatten)]
    common: Common,
}

#[derive(Deserialize)]
struct ChatBody {
    messages: Value,
    #[serde(default)]
    logprobs: bool,
    #[serde(default)]
    top_logprobs: Option<usize>,
    #[serde(default)]
    tools: Option<Value>,
    #[serde(flatten)]
    common: Common,
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// Most stop strings per request, and bytes per stop string.
const MAX_STOPS: usize = 64;
const MAX_STOP_BYTES: usize = 4096;

/// Builds the engine request after validating everything a client can get wrong. Sizes are
/// compared without arithmetic that can wrap: a `max_tokens` near 2⁶⁴ is an error, not a huge
/// budget that a wrapped sum lets through.
fn gen_request(
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
fn completion_prompt(st: &AppState, prompt: &Value) -> Result<Vec<u32>, ApiError> {
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

fn submit(st: &AppState, req: GenRequest) -> Result<tokio::sync::mpsc::UnboundedReceiver<Event>, ApiError> {
    let n = req.prompt.len() as u64;
    match st.engine.submit(req) {
        Ok(rx) => {
            st.engine.metrics.requests.fetch_add(1, Ordering::Relaxed);
            st.engine.metrics.prompt_tokens.fetch_add(n, Ordering::Relaxed);
            Ok(rx)
        }
        Err(SubmitError::QueueFull) => Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_error",
            "the server's queue is full; retry later",
        )),
        Err(SubmitError::ShuttingDown) => {
            Err(ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "server_error", "the server is shutting down"))
        }
    }
}

/// Turns the engine's token events into text deltas, applying stop strings (the text up to a stop
/// string is kept, the rest dropped) with a UTF-8-safe incremental decode.
struct Detok<'a> {
    tok: Option<&'a Tokenizer>,
    keep_special: bool,
    ids: Vec<u32>,
    sent: usize,
    stops: Vec<String>,
    stopped: bool,
}

impl<'a> Detok<'a> {
    fn text(&self) -> String {
        self.tok.and_then(|t| t.decode(&self.ids, !self.keep_special).ok()).unwrap_or_default()
    }

    /// The new text this token makes safe to send: a possible start of a stop string is held back
    /// until it is known not to be one.
    fn push(&mut self, id: u32) -> String {
        self.ids.push(id);
        let text = self.text();
        if text.ends_with('\u{fffd}') {
            return String::new(); // wait for the rest of a multi-byte character
        }
        let hold = self.stops.iter().map(|s| s.len()).max().unwrap_or(1).saturating_sub(1);
        let from = floor_boundary(&text, self.sent.saturating_sub(hold));
        let hit = self.stops.iter().filter_map(|s| text[from..].find(s.as_str()).map(|i| i + from)).min();
        let end = match hit {
            Some(i) => {
                self.stopped = true;
                i
            }
            None => floor_boundary(&text, text.len().saturating_sub(hold)),
        };
        let out = if end > self.sent { text[self.sent..end].to_string() } else { String::new() };
        self.sent = self.sent.max(end);
        out
    }

    /// What was held back, once generation ended without a stop string.
    fn flush(&mut self) -> String {
        if self.stopped {
            return String::new();
        }
        let text = self.text();
        let out = text.get(self.sent..).unwrap_or("").to_string();
        self.sent = text.len();
        out
    }
}

fn floor_boundary(s: &str, mut i: usize) -> usize {
    i = i.min(s.len());
    while !s.is_char_boundary(i) {
        i -= 1;
    }
    i
}

fn finish_reason(f: Finish) -> &'static str {
    match f {
        Finish::Stop => "stop",
        Finish::Length => "length",
    }
}

async fn completions(State(st): State<Shared>, headers: HeaderMap, body: Bytes) -> Result<Response, ApiError> {
    check_key(&st, &headers)?;
    let b: CompletionBody = parse(&body)?;
    let prompt = completion_prompt(&st, &b.prompt)?;
    let (req, stops) = gen_request(&st, prompt, &b.common, b.logprobs)?;
    run(st, req, stops, stream_mode(&b.common), Mode::Completion).await
}

async fn chat_completions(State(st): State<Shared>, headers: HeaderMap, body: Bytes) -> Result<Response, ApiError> {
    check_key(&st, &headers)?;
    let b: ChatBody = parse(&body)?;
    let tok = st
        .tokenizer
        .as_ref()
        .filter(|t| t.has_chat_template())
        .ok_or_else(|| ApiError::bad("this model has no chat template", Some("messages")))?;
    if b.messages.as_array().is_some_and(|m| m.is_empty()) {
        return Err(ApiError::bad("messages is empty", Some("messages")));
    }
    if b.top_logprobs.is_some_and(|k| k > 20) {
        return Err(ApiError::bad("at most 20 top_logprobs per token", Some("top_logprobs")));
    }
    let tools = b.tools.as_ref().filter(|t| !t.is_null());
    let text = tok
        .apply_chat_template_with_tools(&b.messages, tools, true)
        .map_err(|e| ApiError::from_model(e, "messages"))?;
    let prompt = tok.encode(&text, false).map_err(|e| ApiError::bad(e.to_string(), Some("messages")))?;
    let lp = if b.logprobs { Some(b.top_logprobs.unwrap_or(0)) } else { None };
    let (req, stops) = gen_request(&st, prompt, &b.common, lp)?;
    run(st, req, stops, stream_mode(&b.common), if tools.is_some() { Mode::ChatTools } else { Mode::Chat }).await
}

/// How to stream: `None` answers in one body; `Some(usage)` streams, with a final usage chunk
/// when `stream_options.include_usage` is set.
fn stream_mode(c: &Common) -> Option<bool> {
    c.stream.then(|| c.stream_options.as_ref().is_some_and(|o| o.include_usage))
}

/// What the response looks like.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Completion,
    Chat,
    /// Chat with `tools`: special tokens kept in the text so DeepSeek's tool-call markup can be
    /// parsed; a stream sends the whole answer (content or tool_calls) at the end.
    ChatTools,
}

fn logprob_entry(tok: Option<&Tokenizer>, t: &TokenOut, chat: bool) -> Value {
    let text = |id: u32| tok.and_then(|k| k.decode(&[id], false).ok()).unwrap_or_else(|| id.to_string());
    if chat {
        json!({"token": text(t.id), "logprob": t.logprob, "top_logprobs": t.top.iter().map(|(i, l)| json!({"token": text(*i), "logprob": l})).collect::<Vec<_>>()})
    } else {
        json!({"token": text(t.id), "logprob": t.logprob, "top": t.top.iter().map(|(i, l)| (text(*i), *l)).collect::<std::collections::BTreeMap<_, _>>()})
    }
}

/// The assistant message of a chat answer: `reasoning_content` split at `</think>`, DeepSeek
/// tool-call markup parsed into `tool_calls` (finish reason `tool_calls`), end-of-sequence text
/// removed.
fn chat_message(text: &str, eos_text: &[String], finish: &'static str) -> (Value, &'static str) {
    let mut text = text.to_string();
    for e in eos_text.iter().filter(|e| !e.is_empty()) {
        text = text.replace(e.as_str(), "");
    }
    let (reasoning, rest) = split_reasoning(&text);
    let mut message = json!({"role": "assistant", "content": rest});
    let mut finish = finish;
    if let Some((content, calls)) = crate::tools::parse_tool_calls(&rest) {
        message["content"] = if content.is_empty() { Value::Null } else { json!(content) };
        message["tool_calls"] = json!(calls);
        finish = "tool_calls";
    }
    if let Some(r) = reasoning {
        message["reasoning_content"] = json!(r);
    }
    (message, finish)
}

/// Splits DeepSeek-R1-style output at `</think>`: (reasoning, answer).
fn split_reasoning(text: &str) -> (Option<String>, String) {
    match text.split_once("</think>") {
        Some((r, a)) => (Some(r.trim_start_matches("<think>").trim().to_string()), a.trim_start().to_string()),
        None => (None, text.to_string()),
    }
}

/// What every piece of one answer carries.
struct Reply {
    id: String,
    created: u64,
    model: String,
    mode: Mode,
    /// End-of-sequence token texts, removed from a tool-calling chat's text.
    eos_text: Vec<String>,
    prompt_tokens: usize,
    include_usage: bool,
}

impl Reply {
    fn chat(&self) -> bool {
        self.mode != Mode::Completion
    }

    fn usage(&self, completion_tokens: usize) -> Value {
        let p = self.prompt_tokens;
        json!({"prompt_tokens": p, "completion_tokens": completion_tokens, "total_tokens": p + completion_tokens})
    }

    fn object(&self, choices: Value, chunk: bool) -> Value {
        let obj = match (self.chat(), chunk) {
            (true, true) => "chat.completion.chunk",
            (true, false) => "chat.completion",
            (false, _) => "text_completion",
        };
        json!({"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices})
    }
}

async fn run(
    st: Shared,
    req: GenRequest,
    stops: Vec<String>,
    stream: Option<bool>,
    mode: Mode,
) -> Result<Response, ApiError> {
    let keep_special = mode == Mode::ChatTools;
    let eos_text: Vec<String> = if keep_special {
        req.stop_ids.iter().filter_map(|&i| st.tokenizer.as_ref().and_then(|t| t.decode(&[i], false).ok())).collect()
    } else {
        vec![]
    };
    let prompt_tokens = req.prompt.len();
    let rx = submit(&st, req)?;
    let kind = if mode == Mode::Completion { "cmpl" } else { "chatcmpl" };
    let reply = Reply {
        id: format!("{kind}-{:x}", now() ^ rx_id(&rx)),
        created: now(),
        model: st.model_name.clone(),
        mode,
        eos_text,
        prompt_tokens,
        include_usage: stream.unwrap_or(false),
    };
    let det = Detok { tok: None, keep_special, ids: vec![], sent: 0, stops, stopped: false };
    match stream {
        None => Ok(Json(respond_whole(&st, reply, det, rx).await).into_response()),
        Some(_) => {
            let (tx, out) = tokio::sync::mpsc::unbounded_channel::<Result<SseEvent, Infallible>>();
            tokio::spawn(respond_stream(st.clone(), reply, det, rx, tx));
            Ok(Sse::new(tokio_stream::wrappers::UnboundedReceiverStream::new(out)).into_response())
        }
    }
}

/// The whole answer as one JSON body.
async fn respond_whole(
    st: &AppState,
    reply: Reply,
    mut det: Detok<'_>,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<Event>,
) -> Value {
    let (tok, chat) = (st.tokenizer.as_ref(), reply.chat());
    det.tok = tok;
    let (mut text, mut lps, mut ids) = (String::new(), vec![], vec![]);
    let mut completion_tokens = 0;
    let mut finish = "stop";
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Token(t) => {
                ids.push(t.id);
                text.push_str(&det.push(t.id));
                if t.logprob.is_some() {
                    lps.push(logprob_entry(tok, &t, chat));
                }
                if det.stopped {
                    // A stop string: dropping rx ends the sequence in the engine.
                    finish = "stop";
                    completion_tokens = ids.len();
                    break;
                }
            }
            Event::Done { finish: f, completion_tokens: n, .. } => {
                text.push_str(&det.flush());
                finish = finish_reason(f);
                completion_tokens = n;
            }
        }
    }
    let logprobs = if lps.is_empty() { Value::Null } else { json!({"content": lps}) };
    let choice = if chat {
        let (message, finish) = chat_message(&text, &reply.eos_text, finish);
        json!({"index": 0, "message": message, "logprobs": logprobs, "finish_reason": finish})
    } else {
        json!({"index": 0, "text": text, "token_ids": ids, "logprobs": logprobs, "finish_reason": finish})
    };
    let mut body = reply.object(json!([choice]), false);
    body["usage"] = reply.usage(completion_tokens);
    body
}

/// The answer as server-sent events: a chunk per piece of text that is safe to send, the last
/// with its finish reason, the usage chunk when asked, then `[DONE]`.
async fn respond_stream(
    st: Shared,
    reply: Reply,
    mut det: Detok<'_>,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<Event>,
    tx: tokio::sync::mpsc::UnboundedSender<Result<SseEvent, Infallible>>,
) {
    let (tok, chat) = (st.tokenizer.as_ref(), reply.chat());
    det.tok = tok;
    let send = |v: Value| tx.send(Ok(SseEvent::default().data(v.to_string()))).is_ok();
    if chat {
        let first = json!({"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": null});
        send(reply.object(json!([first]), true));
    }
    let mut whole = String::new();
    let mut in_reasoning = false;
    let mut completion_tokens = 0;
    while let Some(ev) = rx.recv().await {
        let (delta, finish, lp) = match ev {
            Event::Token(t) => {
                completion_tokens += 1;
                let lp = t.logprob.map(|_| logprob_entry(tok, &t, chat));
                (det.push(t.id), if det.stopped { Some("stop") } else { None }, lp)
            }
            Event::Done { finish, .. } => (det.flush(), Some(finish_reason(finish)), None),
        };
        let logprobs = lp.map(|l| json!({"content": [l]}));
        let c = match reply.mode {
            Mode::ChatTools => {
                // The answer goes out whole at the end: tool-call markup is parsed from all of it.
                whole.push_str(&delta);
                let Some(f) = finish else { continue };
                tool_chat_delta(&whole, &reply.eos_text, f)
            }
            Mode::Chat => {
                let d = reasoning_delta(&delta, &mut in_reasoning);
                json!({"index": 0, "delta": d, "logprobs": logprobs, "finish_reason": finish})
            }
            Mode::Completion => json!({"index": 0, "text": delta, "logprobs": logprobs, "finish_reason": finish}),
        };
        if !send(reply.object(json!([c]), true)) {
            return; // client gone: dropping rx makes the engine free the sequence
        }
        if finish.is_some() {
            break;
        }
    }
    if reply.include_usage {
        // OpenAI's `stream_options.include_usage`: a last chunk with no choices and the usage.
        let mut last = reply.object(json!([]), true);
        last["usage"] = reply.usage(completion_tokens);
        send(last);
    }
    let _ = tx.send(Ok(SseEvent::default().data("[DONE]")));
}

/// A chat delta split into `reasoning_content` and `content` at `<think>` / `</think>`.
fn reasoning_delta(delta: &str, in_reasoning: &mut bool) -> Value {
    let mut d = json!({});
    let mut text = delta;
    if text.contains("<think>") {
        *in_reasoning = true;
        text = text.split("<think>").last().unwrap_or("");
    }
    if *in_reasoning {
        match text.split_once("</think>") {
            Some((r, a)) => {
                *in_reasoning = false;
                d["reasoning_content"] = json!(r);
                d["content"] = json!(a);
            }
            None => d["reasoning_content"] = json!(text),
        }
    } else {
        d["content"] = json!(text);
    }
    d
}

/// The one delta of a streamed tool-calling chat: content or `tool_calls` (each with its index),
/// and the reasoning.
fn tool_chat_delta(whole: &str, eos_text: &[String], finish: &'static str) -> Value {
    let (message, f) = chat_message(whole, eos_text, finish);
    let mut d = json!({});
    if let Some(calls) = message.get("tool_calls").and_then(Value::as_array) {
        let indexed: Vec<Value> = calls
            .iter()
            .enumerate()
            .map(|(i, c)| {
                let mut c = c.clone();
                c["index"] = json!(i);
                c
            })
            .collect();
        d["tool_calls"] = Value::from(indexed);
    }
    d["content"] = message["content"].clone();
    if let Some(r) = message.get("reasoning_content") {
        d["reasoning_content"] = r.clone();
    }
    json!({"index": 0, "delta": d, "logprobs": Value::Null, "finish_reason": f})
}

/// A per-request number for ids (the channel's address is unique while it lives).
fn rx_id<T>(rx: &tokio::sync::mpsc::UnboundedReceiver<T>) -> u64 {
    rx as *const _ as u64
}

async fn models(State(st): State<Shared>, headers: HeaderMap) -> Result<Response, ApiError> {
    check_key(&st, &headers)?;
    Ok(Json(
        json!({"object": "list", "data": [{"id": st.model_name, "object": "model", "created": 0, "owned_by": "dsv3",
        "max_model_len": st.model.config.max_position_embeddings}]}),
    )
    .into_response())
}

#[derive(Deserialize)]
struct TokenizeBody {
    #[serde(default)]
    prompt: Option<String>,
    #[serde(default)]
    messages: Option<Value>,
    #[serde(default = "yes")]
    add_special_tokens: bool,
}

fn yes() -> bool {
    true
}

async fn tokenize(State(st): State<Shared>, headers: HeaderMap, body: Bytes) -> Result<Response, ApiError> {
    check_key(&st, &headers)?;
    let b: TokenizeBody = parse(&body)?;
    let tok = st.tokenizer.as_ref().ok_or_else(|| ApiError::bad("this model has no tokenizer.json", None))?;
    let ids = match (&b.prompt, &b.messages) {
        (Some(p), None) => {
            tok.encode(p, b.add_special_tokens).map_err(|e| ApiError::bad(e.to_string(), Some("prompt")))
        }
        (None, Some(m)) => tok.encode_chat(m, true).map_err(|e| ApiError::from_model(e, "messages")),
        _ => Err(ApiError::bad("give prompt or messages", None)),
    }?;
    Ok(Json(json!({"tokens": ids, "count": ids.len(), "max_model_len": st.model.config.max_position_embeddings}))
        .into_response())
}

#[derive(Deserialize)]
struct DetokenizeBody {
    tokens: Vec<u32>,
}

async fn detokenize(State(st): State<Shared>, headers: HeaderMap, body: Bytes) -> Result<Response, ApiError> {
    check_key(&st, &headers)?;
    let b: DetokenizeBody = parse(&body)?;
    let tok = st.tokenizer.as_ref().ok_or_else(|| ApiError::bad("this model has no tokenizer.json", None))?;
    if let Some(&bad) = b.tokens.iter().find(|&&t| t as usize >= st.model.config.vocab_size) {
        return Err(ApiError::bad(format!("token id {bad} is outside the vocabulary"), Some("tokens")));
    }
    let text = tok.decode(&b.tokens, false).map_err(|e| ApiError::bad(e.to_string(), None))?;
    Ok(Json(json!({"prompt": text})).into_response())
}

/// Prometheus text. Behind the API key when one is set: the counters tell who uses the server how
/// much (vLLM leaves them open; put a scraper's bearer token in its config).
async fn metrics(State(st): State<Shared>, headers: HeaderMap) -> Result<Response, ApiError> {
    check_key(&st, &headers)?;
    let mut text = st.engine.metrics.render(st.model.kv_bytes_per_token());
    if let Some(hook) = &st.extra_metrics {
        text.push_str(&(hook.0)());
    }
    Ok(text.into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_messages_split_reasoning_and_tool_calls() {
        let eos = vec!["<｜end▁of▁sentence｜>".to_string()];
        let (m, f) = chat_message("<think>look it up</think>Sure.<｜end▁of▁sentence｜>", &eos, "stop");
        assert_eq!(
            (m["content"].as_str(), m["reasoning_content"].as_str(), f),
            (Some("Sure."), Some("look it up"), "stop")
        );
        let text = "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{\"city\": \"Paris\"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜><｜end▁of▁sentence｜>";
        let (m, f) = chat_message(text, &eos, "stop");
        assert_eq!(f, "tool_calls");
        assert!(m["content"].is_null());
        assert_eq!(m["tool_calls"][0]["function"]["name"], "get_weather");
        assert_eq!(m["tool_calls"][0]["type"], "function");
    }
}
