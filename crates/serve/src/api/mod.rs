//! The OpenAI-compatible HTTP surface: the routes, the API key, the handlers; request checks in
//! [`request`], answers in [`respond`], text deltas in [`detok`].

mod anthropic;
mod detok;
mod logprobs;
mod reasoning;
mod request;
mod respond;
mod structured;
mod toolstream;

use crate::engine::{EngineHandle, Event, GenRequest, SubmitError};
use crate::error::ApiError;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use dsv3_model::{DeepseekV3, Tokenizer};
use request::{completion_prompts, plan, Asks, ChatBody, Common, CompletionBody};
use respond::{run, Mode};
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};
use structured::ToolChoice;

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
    /// The checkpoint's chat conventions (tool-call markup) from its template.
    pub format: crate::tools::ChatFormat,
    /// The grammar engine over the vocabulary, built on the first constrained request.
    pub grammars: std::sync::OnceLock<Result<Arc<crate::grammar::Grammars>, String>>,
    /// The LoRA adapters served beside the base, by name: adapter slot `k` is `adapters[k - 1]`.
    pub adapters: Vec<String>,
}

impl AppState {
    /// The served adapter a request's `model` names: 0 for the base (its name, or none given).
    /// With adapters served, any other name is a 404, as vLLM answers; without, the field is
    /// not checked (clients send their own labels).
    pub fn adapter_of(&self, model: Option<&str>) -> Result<u16, ApiError> {
        let Some(m) = model.filter(|m| *m != self.model_name && !self.adapters.is_empty()) else { return Ok(0) };
        match self.adapters.iter().position(|a| a == m) {
            Some(i) => Ok(i as u16 + 1),
            None => Err(ApiError::new(
                axum::http::StatusCode::NOT_FOUND,
                "not_found_error",
                format!("The model `{m}` does not exist (served: {}, {}).", self.model_name, self.adapters.join(", ")),
            )
            .with_param("model")),
        }
    }

    /// The name a response gives the model that answered.
    pub fn name_of(&self, adapter: u16) -> String {
        match adapter {
            0 => self.model_name.clone(),
            k => self.adapters[k as usize - 1].clone(),
        }
    }
}

type Shared = Arc<AppState>;

pub fn router(state: Shared) -> Router {
    let edge = Arc::new(crate::http::EdgeState { limits: state.http.clone(), metrics: state.engine.metrics.clone() });
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/messages", post(anthropic::messages))
        .route("/v1/messages/count_tokens", post(anthropic::count_tokens))
        .route("/v1/models", get(models))
        .route("/tokenize", post(tokenize))
        .route("/tokenizer_info", get(tokenizer_info))
        .route("/detokenize", post(detokenize))
        .route("/", get(page))
        .route("/health", get(|| async { "ok" }))
        .route("/metrics", get(metrics))
        .fallback(crate::http::not_found)
        .method_not_allowed_fallback(crate::http::method_not_allowed)
        // The edge reads bodies under its own cap and deadline.
        .layer(DefaultBodyLimit::disable())
        .layer(axum::middleware::from_fn_with_state(edge, crate::http::edge))
        .with_state(state)
}

/// The chat page (static, in the binary): it talks to `/v1/chat/completions` from the browser, so
/// the page itself needs no key; the API calls carry the one typed into it. Nothing is fetched
/// from elsewhere (the policy says so).
async fn page() -> Response {
    let csp = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'";
    (
        [
            (axum::http::header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (axum::http::header::CONTENT_SECURITY_POLICY, csp),
            (axum::http::header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        include_str!("../page/index.html"),
    )
        .into_response()
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

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
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

async fn completions(State(st): State<Shared>, headers: HeaderMap, body: Bytes) -> Result<Response, ApiError> {
    check_key(&st, &headers)?;
    let b: CompletionBody = parse(&body)?;
    let prompts = completion_prompts(&st, &b.prompt)?;
    let mut plan = plan(&st, prompts, &b.common, Asks { logprobs: b.logprobs, echo: b.echo })?;
    let schema = structured::response_schema(b.common.response_format.as_ref())?;
    structured::apply(&st, &mut plan, schema.map(|s| (s, "response_format")))?;
    run(st, plan, stream_mode(&b.common), Mode::Completion).await
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
    let choice = ToolChoice::parse(b.tool_choice.as_ref())?;
    let offered = b.tools.as_ref().filter(|t| !t.is_null());
    let tools = if matches!(choice, ToolChoice::None) { None } else { offered };
    let schema = structured::chat_schema(&choice, offered, b.common.response_format.as_ref())?;
    // The template also sees the response_format (DeepSeek-V3.2's rules write it into the system
    // block; Jinja templates that do not read it are unchanged).
    let mut kwargs = b.chat_template_kwargs.clone();
    if let Some(rf) = b
        .common
        .response_format
        .as_ref()
        .filter(|_| schema.is_some() && matches!(choice, ToolChoice::Auto | ToolChoice::None))
    {
        let k = kwargs.get_or_insert_with(|| json!({}));
        if let Some(o) = k.as_object_mut() {
            o.entry("response_format").or_insert(rf.clone());
        }
    }
    let text =
        tok.render_chat(&b.messages, tools, true, kwargs.as_ref()).map_err(|e| ApiError::from_model(e, "messages"))?;
    let prompt = tok.encode(&text, false).map_err(|e| ApiError::bad(e.to_string(), Some("messages")))?;
    let lp = if b.logprobs { Some(b.top_logprobs.unwrap_or(0)) } else { None };
    let mut plan = plan(&st, vec![(prompt, None)], &b.common, Asks { logprobs: lp, echo: false })?;
    plan.thinking = reasoning::Reasoning::prompt_opens(&text);
    structured::apply(&st, &mut plan, schema)?;
    if let ToolChoice::Forced(f) = choice {
        plan.forced = Some(f);
    }
    let mode = if tools.is_some() || plan.forced.is_some() { Mode::ChatTools } else { Mode::Chat };
    run(st, plan, stream_mode(&b.common), mode).await
}

/// How to stream: `None` answers in one body; `Some(usage)` streams, with a final usage chunk
/// when `stream_options.include_usage` is set.
fn stream_mode(c: &Common) -> Option<bool> {
    c.stream.then(|| c.stream_options.as_ref().is_some_and(|o| o.include_usage))
}

async fn models(State(st): State<Shared>, headers: HeaderMap) -> Result<Response, ApiError> {
    check_key(&st, &headers)?;
    let ctx = st.model.config.max_position_embeddings;
    let mut data = vec![json!({"id": st.model_name, "object": "model", "created": 0, "owned_by": "dsv3",
        "root": st.model_name, "parent": null, "max_model_len": ctx, "chat_format": st.format.name()})];
    // vLLM lists each LoRA adapter as a model whose parent is the base.
    data.extend(st.adapters.iter().map(|a| {
        json!({"id": a, "object": "model", "created": 0, "owned_by": "dsv3", "root": a, "parent": st.model_name,
            "max_model_len": ctx, "chat_format": st.format.name()})
    }));
    Ok(Json(json!({"object": "list", "data": data})).into_response())
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

/// vLLM's `/tokenizer_info`: what a client needs to tokenize on the server's side
/// (lm-evaluation-harness's remote tokenizer reads it, then `/tokenize` and `/detokenize`).
async fn tokenizer_info(State(st): State<Shared>, headers: HeaderMap) -> Result<Response, ApiError> {
    check_key(&st, &headers)?;
    let tok = st.tokenizer.as_ref().ok_or_else(|| ApiError::bad("this model has no tokenizer.json", None))?;
    Ok(Json(json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": tok.bos_token,
        "eos_token": tok.eos_token,
        "pad_token": tok.eos_token,
        "add_bos_token": tok.adds_bos(),
        "chat_template": tok.chat_template(),
        "model_max_length": st.model.config.max_position_embeddings,
        "vocab_size": st.model.config.vocab_size,
    }))
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
    text.push_str(&st.engine.metrics.render_vllm(&st.model_name));
    if let Some(hook) = &st.extra_metrics {
        text.push_str(&(hook.0)());
    }
    Ok(text.into_response())
}
