//! Anthropic's Messages API (`POST /v1/messages`), for Claude-Code-style clients: the request is
//! turned into the chat the model's template renders (system, tool results, tool uses, thinking),
//! run like any chat, and answered as content blocks (`thinking`, `text`, `tool_use`) or as
//! Anthropic's server-sent events. Errors have Anthropic's shape; the key comes as `x-api-key` or
//! `Authorization: Bearer`.

use super::detok::Detok;
use super::reasoning::Reasoning;
use super::request::{plan, Asks, Common};
use super::respond::{chat_message, Parse};
use super::structured::{Forced, ToolChoice};
use super::toolstream::ToolStream;
use super::{now, parse, submit, Shared};
use crate::engine::{Event, Finish};
use crate::error::ApiError;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};
use std::convert::Infallible;

#[derive(Deserialize)]
struct MessagesBody {
    #[serde(default)]
    model: Option<String>,
    max_tokens: Option<usize>,
    messages: Vec<Value>,
    #[serde(default)]
    system: Option<Value>,
    #[serde(default)]
    stop_sequences: Option<Vec<String>>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_p: Option<f32>,
    #[serde(default)]
    top_k: Option<i64>,
    #[serde(default)]
    tools: Option<Vec<Value>>,
    #[serde(default)]
    tool_choice: Option<Value>,
    /// `{"type": "enabled", "budget_tokens": N}` or `{"type": "disabled"}`: the template's
    /// `thinking` flag (V3.1/V3.2 hybrid thinking).
    #[serde(default)]
    thinking: Option<Value>,
}

pub(super) async fn messages(State(st): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    match answer(st, headers, body).await {
        Ok(r) => r,
        Err(e) => e.into_anthropic_response(),
    }
}

/// `x-api-key: KEY` (Anthropic's header) or `Authorization: Bearer KEY`.
fn check_key(st: &super::AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    use subtle::ConstantTimeEq;
    let Some(key) = &st.api_key else { return Ok(()) };
    let x = headers.get("x-api-key").and_then(|v| v.to_str().ok());
    let bearer = headers.get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    match x.or(bearer) {
        Some(g) if bool::from(g.as_bytes().ct_eq(key.as_bytes())) => Ok(()),
        _ => Err(ApiError::unauthorized()),
    }
}

/// A request's conversation as the model sees it: the rendered prompt and how tools are chosen.
struct Rendered {
    prompt: Vec<u32>,
    text: String,
    tools: Option<Value>,
    choice: ToolChoice,
    schema: Option<(Value, &'static str)>,
}

/// Renders a Messages request with the model's template (what `/v1/messages` runs and
/// `/v1/messages/count_tokens` counts).
fn render(st: &super::AppState, b: &MessagesBody) -> Result<Rendered, ApiError> {
    let tok = st
        .tokenizer
        .as_ref()
        .filter(|t| t.has_chat_template())
        .ok_or_else(|| ApiError::bad("this model has no chat template", Some("messages")))?;
    if b.messages.is_empty() {
        return Err(ApiError::bad("messages is empty", Some("messages")));
    }
    // Anthropic's tool_choice: auto, any (some tool: OpenAI's "required"), tool (a named one), none.
    let choice = match b.tool_choice.as_ref().and_then(|c| c.get("type")).and_then(Value::as_str) {
        None | Some("auto") => ToolChoice::Auto,
        Some("none") => ToolChoice::None,
        Some("any") => ToolChoice::Forced(Forced { name: None }),
        Some("tool") => match b.tool_choice.as_ref().and_then(|c| c.get("name")).and_then(Value::as_str) {
            Some(n) => ToolChoice::Forced(Forced { name: Some(n.to_string()) }),
            None => return Err(ApiError::bad("tool_choice of type tool needs a name", Some("tool_choice"))),
        },
        Some(other) => {
            return Err(ApiError::bad(
                format!("tool_choice type {other:?} is not auto, any, tool or none"),
                Some("tool_choice"),
            ))
        }
    };
    let offered = b.tools.as_ref().filter(|t| !t.is_empty()).map(|t| openai_tools(t)).transpose()?;
    let tools = if matches!(choice, ToolChoice::None) { None } else { offered.clone() };
    let schema = super::structured::chat_schema(&choice, offered.as_ref(), None)?;
    let chat = openai_messages(b.system.as_ref(), &b.messages)?;
    let kwargs = match b.thinking.as_ref().and_then(|t| t.get("type")).and_then(Value::as_str) {
        Some("enabled") => Some(json!({"thinking": true})),
        Some("disabled") => Some(json!({"thinking": false})),
        Some(other) => {
            return Err(ApiError::bad(format!("thinking type {other:?} is not enabled or disabled"), Some("thinking")))
        }
        None => None,
    };
    let text = tok
        .render_chat(&chat, tools.as_ref(), true, kwargs.as_ref())
        .map_err(|e| ApiError::from_model(e, "messages"))?;
    let prompt = tok.encode(&text, false).map_err(|e| ApiError::bad(e.to_string(), Some("messages")))?;
    Ok(Rendered { prompt, text, tools, choice, schema })
}

/// `POST /v1/messages/count_tokens`: the prompt's length as `/v1/messages` would run it.
pub(super) async fn count_tokens(State(st): State<Shared>, headers: HeaderMap, body: Bytes) -> Response {
    let counted = check_key(&st, &headers)
        .and_then(|_| parse::<MessagesBody>(&body))
        .and_then(|b| render(&st, &b))
        .map(|r| Json(json!({"input_tokens": r.prompt.len()})).into_response());
    counted.unwrap_or_else(|e| e.into_anthropic_response())
}

async fn answer(st: Shared, headers: HeaderMap, body: Bytes) -> Result<Response, ApiError> {
    check_key(&st, &headers)?;
    let b: MessagesBody = parse(&body)?;
    let max_tokens = b.max_tokens.ok_or_else(|| ApiError::bad("max_tokens is required", Some("max_tokens")))?;
    if max_tokens == 0 {
        return Err(ApiError::bad("max_tokens must be at least 1", Some("max_tokens")));
    }
    let Rendered { prompt, text, tools, choice, schema } = render(&st, &b)?;
    let tok = st.tokenizer.as_ref().ok_or_else(|| ApiError::bad("this model has no tokenizer", Some("messages")))?;
    let common: Common = serde_json::from_value(json!({
        "model": b.model, "max_tokens": max_tokens, "temperature": b.temperature, "top_p": b.top_p, "top_k": b.top_k,
        "stop": b.stop_sequences.unwrap_or_default(),
    }))
    .map_err(|e| ApiError::bad(format!("invalid request: {e}"), None))?;
    let mut plan = plan(&st, vec![(prompt, None)], &common, Asks { logprobs: None, echo: false })?;
    let thinking = Reasoning::prompt_opens(&text);
    plan.thinking = thinking;
    super::structured::apply(&st, &mut plan, schema)?;
    let forced = match choice {
        ToolChoice::Forced(f) => Some(f),
        _ => None,
    };
    let (req, _) = plan.choices.remove(0);
    let keep_special = tools.is_some() || forced.is_some();
    let eos_text: Vec<String> =
        if keep_special { req.stop_ids.iter().filter_map(|&i| tok.decode(&[i], false).ok()).collect() } else { vec![] };
    let input_tokens = req.prompt.len();
    let model = st.name_of(req.adapter);
    let rx = submit(&st, req)?;
    let msg = Msg {
        id: format!("msg_{:016x}", now() ^ (&rx as *const _ as u64).rotate_left(17)),
        model,
        input_tokens,
        parse: Parse { eos_text, thinking, forced, format: st.format },
    };
    let det = Detok::new(keep_special, plan.stops);
    if !b.stream {
        return Ok(Json(whole(&st, msg, det, rx).await).into_response());
    }
    let (tx, out) = tokio::sync::mpsc::unbounded_channel::<Result<SseEvent, Infallible>>();
    tokio::spawn(stream(st.clone(), msg, det, rx, tx));
    Ok(Sse::new(tokio_stream::wrappers::UnboundedReceiverStream::new(out)).into_response())
}

/// Anthropic tools (`name`, `description`, `input_schema`) as the OpenAI tools templates read.
fn openai_tools(tools: &[Value]) -> Result<Value, ApiError> {
    tools
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let name = t.get("name").and_then(Value::as_str).ok_or_else(|| ApiError::bad(format!("tools[{i}] has no name"), Some("tools")))?;
            let mut f = json!({"name": name, "parameters": t.get("input_schema").cloned().unwrap_or(json!({"type": "object"}))});
            if let Some(d) = t.get("description") {
                f["description"] = d.clone();
            }
            Ok(json!({"type": "function", "function": f}))
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Value::from)
}

/// The text of `content`: a string, or the `text` of its text blocks.
fn block_text(content: &Value, at: &str) -> Result<String, ApiError> {
    match content {
        Value::String(s) => Ok(s.clone()),
        Value::Array(blocks) => {
            let mut s = String::new();
            for (i, b) in blocks.iter().enumerate() {
                match b.get("type").and_then(Value::as_str) {
                    Some("text") => s.push_str(b.get("text").and_then(Value::as_str).unwrap_or("")),
                    other => {
                        let msg = format!("{at}[{i}]: content of type {other:?} is not supported here (text only)");
                        return Err(ApiError::bad(msg, Some("messages")));
                    }
                }
            }
            Ok(s)
        }
        Value::Null => Ok(String::new()),
        _ => Err(ApiError::bad(format!("{at} must be a string or a list of blocks"), Some("messages"))),
    }
}

/// Anthropic messages as OpenAI-style chat messages: `system` first; a user turn's
/// `tool_result` blocks as `tool` messages (before its text, the order Anthropic requires); an
/// assistant turn's `thinking` as `reasoning_content` and `tool_use` as `tool_calls`.
fn openai_messages(system: Option<&Value>, messages: &[Value]) -> Result<Value, ApiError> {
    let mut out = vec![];
    if let Some(s) = system {
        out.push(json!({"role": "system", "content": block_text(s, "system")?}));
    }
    for (i, m) in messages.iter().enumerate() {
        let at = format!("messages[{i}]");
        let role = m.get("role").and_then(Value::as_str).unwrap_or("");
        let content = m.get("content").unwrap_or(&Value::Null);
        let blocks: Vec<Value> = match content {
            Value::String(s) => vec![json!({"type": "text", "text": s})],
            Value::Array(b) => b.clone(),
            _ => {
                return Err(ApiError::bad(
                    format!("{at}.content must be a string or a list of blocks"),
                    Some("messages"),
                ))
            }
        };
        match role {
            "user" => {
                let mut text = String::new();
                for (j, b) in blocks.iter().enumerate() {
                    match b.get("type").and_then(Value::as_str) {
                        Some("tool_result") => {
                            let id = b.get("tool_use_id").and_then(Value::as_str).unwrap_or("");
                            let body = block_text(
                                b.get("content").unwrap_or(&Value::Null),
                                &format!("{at}.content[{j}].content"),
                            )?;
                            out.push(json!({"role": "tool", "tool_call_id": id, "content": body}));
                        }
                        Some("text") => text.push_str(b.get("text").and_then(Value::as_str).unwrap_or("")),
                        other => {
                            let msg = format!(
                                "{at}.content[{j}]: blocks of type {other:?} are not supported (text and tool_result)"
                            );
                            return Err(ApiError::bad(msg, Some("messages")));
                        }
                    }
                }
                if !text.is_empty()
                    || !blocks.iter().any(|b| b.get("type").and_then(Value::as_str) == Some("tool_result"))
                {
                    out.push(json!({"role": "user", "content": text}));
                }
            }
            "assistant" => {
                let (mut text, mut reasoning, mut calls) = (String::new(), String::new(), vec![]);
                for (j, b) in blocks.iter().enumerate() {
                    match b.get("type").and_then(Value::as_str) {
                        Some("text") => text.push_str(b.get("text").and_then(Value::as_str).unwrap_or("")),
                        Some("thinking") => reasoning.push_str(b.get("thinking").and_then(Value::as_str).unwrap_or("")),
                        Some("redacted_thinking") => {}
                        Some("tool_use") => {
                            let input = b.get("input").cloned().unwrap_or(json!({}));
                            calls.push(json!({"id": b.get("id"), "type": "function", "function": {
                                "name": b.get("name"), "arguments": input.to_string()}}));
                        }
                        other => {
                            let msg = format!(
                                "{at}.content[{j}]: blocks of type {other:?} are not supported in assistant turns"
                            );
                            return Err(ApiError::bad(msg, Some("messages")));
                        }
                    }
                }
                let mut m = json!({"role": "assistant", "content": text});
                if !reasoning.is_empty() {
                    m["reasoning_content"] = json!(reasoning);
                }
                if !calls.is_empty() {
                    m["tool_calls"] = json!(calls);
                }
                out.push(m);
            }
            other => {
                return Err(ApiError::bad(format!("{at}.role {other:?} is not user or assistant"), Some("messages")))
            }
        }
    }
    Ok(Value::Array(out))
}

/// What every piece of one answer carries.
struct Msg {
    id: String,
    model: String,
    input_tokens: usize,
    /// How the answer's text is read (reasoning, tool markup or a forced call).
    parse: Parse,
}

/// Why the message ended, in Anthropic's words, and the stop sequence that ended it.
fn stop_reason(finish: Option<Finish>, det: &Detok, tool_use: bool) -> (&'static str, Value) {
    if tool_use {
        return ("tool_use", Value::Null);
    }
    match (&det.stopped_by, finish) {
        (Some(s), _) => ("stop_sequence", json!(s)),
        (None, Some(Finish::Length)) => ("max_tokens", Value::Null),
        _ => ("end_turn", Value::Null),
    }
}

/// The content blocks of a finished answer: thinking, text, tool uses.
fn blocks(m: &Msg, text: &str) -> Vec<Value> {
    let (message, _) = chat_message(text, &m.parse, "stop");
    let mut out = vec![];
    if let Some(r) = message.get("reasoning_content").and_then(Value::as_str) {
        out.push(json!({"type": "thinking", "thinking": r, "signature": ""}));
    }
    if let Some(t) = message.get("content").and_then(Value::as_str).filter(|t| !t.is_empty()) {
        out.push(json!({"type": "text", "text": t}));
    }
    for (i, c) in message.get("tool_calls").and_then(Value::as_array).into_iter().flatten().enumerate() {
        let args = c["function"]["arguments"].as_str().unwrap_or("{}");
        let input = serde_json::from_str::<Value>(args).unwrap_or_else(|_| json!({"arguments": args}));
        let id = c
            .get("id")
            .and_then(Value::as_str)
            .map_or_else(|| format!("toolu_{i}"), |s| s.replacen("call_", "toolu_", 1));
        out.push(json!({"type": "tool_use", "id": id, "name": c["function"]["name"], "input": input}));
    }
    out
}

fn message(m: &Msg, content: Vec<Value>, reason: Option<(&str, Value)>, output_tokens: usize) -> Value {
    let (stop_reason, stop_sequence) = match reason {
        Some((r, s)) => (json!(r), s),
        None => (Value::Null, Value::Null),
    };
    json!({"id": m.id, "type": "message", "role": "assistant", "model": m.model, "content": content,
        "stop_reason": stop_reason, "stop_sequence": stop_sequence,
        "usage": {"input_tokens": m.input_tokens, "output_tokens": output_tokens}})
}

/// Runs the request's events to the end: (text, why it ended, tokens generated).
async fn collect(
    det: &mut Detok<'_>,
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<Event>,
    mut on_delta: impl FnMut(&str),
) -> (String, Option<Finish>, usize) {
    let (mut text, mut n) = (String::new(), 0);
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Prompt(_) => {}
            Event::Token(t) => {
                n += 1;
                let d = det.push(t.id);
                on_delta(&d);
                text.push_str(&d);
                if det.stopped {
                    return (text, None, n); // dropping rx ends the sequence in the engine
                }
            }
            Event::Done { finish, completion_tokens, .. } => {
                let d = det.flush();
                on_delta(&d);
                text.push_str(&d);
                return (text, Some(finish), completion_tokens);
            }
        }
    }
    (text, None, n)
}

async fn whole(
    st: &super::AppState,
    m: Msg,
    mut det: Detok<'_>,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<Event>,
) -> Value {
    det.tok = st.tokenizer.as_ref();
    let (text, finish, n) = collect(&mut det, &mut rx, |_| {}).await;
    let content = blocks(&m, &text);
    let tool_use = content.iter().any(|b| b["type"] == "tool_use");
    message(&m, content, Some(stop_reason(finish, &det, tool_use)), n)
}

/// Anthropic's event stream: `message_start`, `ping`, per block `content_block_start`, deltas
/// (`thinking_delta` then `signature_delta`, `text_delta`, `input_json_delta`),
/// `content_block_stop`; `message_delta` with the stop reason and usage; `message_stop`.
/// Thinking and text stream as they come (text up to any tool-call markup); tool uses go out
/// whole at the end, parsed from the whole answer.
async fn stream(
    st: Shared,
    m: Msg,
    mut det: Detok<'_>,
    mut rx: tokio::sync::mpsc::UnboundedReceiver<Event>,
    tx: tokio::sync::mpsc::UnboundedSender<Result<SseEvent, Infallible>>,
) {
    det.tok = st.tokenizer.as_ref();
    let send = |name: &str, v: Value| {
        let _ = tx.send(Ok(SseEvent::default().event(name).data(v.to_string())));
    };
    send("message_start", json!({"type": "message_start", "message": message(&m, vec![], None, 0)}));
    send("ping", json!({"type": "ping"}));
    let mut blocks_out = Blocks { index: 0, open: None, send: &send };
    let mut split = Reasoning::new(m.parse.thinking);
    // Text up to the format's tool-call markup (none of a forced call's JSON); the calls at the end.
    let mut markers: Vec<String> = m.parse.format.call_starts().iter().map(|s| s.to_string()).collect();
    markers.extend(m.parse.eos_text.iter().cloned());
    let mut content =
        if m.parse.forced.is_some() { ToolStream::new(vec![]).closed() } else { ToolStream::new(markers) };
    let mut streamed = String::new();
    let mut put = |blocks_out: &mut Blocks<_>, r: &str, a: &str, last: bool| {
        blocks_out.put("thinking", r);
        let mut c = content.push(a);
        if last {
            c.push_str(&content.finish());
        }
        streamed.push_str(&c);
        blocks_out.put("text", &c);
    };
    let (text, finish, n) = collect(&mut det, &mut rx, |d| {
        let (r, a) = split.push(d);
        put(&mut blocks_out, &r, &a, false);
    })
    .await;
    let (r, a) = split.finish();
    put(&mut blocks_out, &r, &a, true);
    let mut tool_use = false;
    for b in blocks(&m, &text) {
        match b["type"].as_str() {
            Some("tool_use") => {
                tool_use = true;
                blocks_out.whole(&b);
            }
            // What the parse kept as text beyond what went out (markup that did not parse).
            Some("text") => {
                blocks_out.put("text", b["text"].as_str().unwrap_or("").strip_prefix(streamed.as_str()).unwrap_or(""))
            }
            _ => {}
        }
    }
    blocks_out.close();
    let (reason, seq) = stop_reason(finish, &det, tool_use);
    send(
        "message_delta",
        json!({"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": seq}, "usage": {"output_tokens": n}}),
    );
    send("message_stop", json!({"type": "message_stop"}));
}

/// The content blocks of a stream: which is open, and the next index.
struct Blocks<'s, F: Fn(&str, Value)> {
    index: usize,
    open: Option<&'static str>,
    send: &'s F,
}

impl<F: Fn(&str, Value)> Blocks<'_, F> {
    /// Appends text to a block of `kind` (`thinking` or `text`), opening it (and closing the
    /// other) as needed.
    fn put(&mut self, kind: &'static str, text: &str) {
        if text.is_empty() {
            return;
        }
        if self.open != Some(kind) {
            self.close();
            let block = if kind == "thinking" {
                json!({"type": "thinking", "thinking": ""})
            } else {
                json!({"type": "text", "text": ""})
            };
            (self.send)(
                "content_block_start",
                json!({"type": "content_block_start", "index": self.index, "content_block": block}),
            );
            self.open = Some(kind);
        }
        let delta = if kind == "thinking" {
            json!({"type": "thinking_delta", "thinking": text})
        } else {
            json!({"type": "text_delta", "text": text})
        };
        (self.send)("content_block_delta", json!({"type": "content_block_delta", "index": self.index, "delta": delta}));
    }

    fn close(&mut self) {
        if let Some(kind) = self.open.take() {
            if kind == "thinking" {
                let d = json!({"type": "signature_delta", "signature": ""});
                (self.send)(
                    "content_block_delta",
                    json!({"type": "content_block_delta", "index": self.index, "delta": d}),
                );
            }
            (self.send)("content_block_stop", json!({"type": "content_block_stop", "index": self.index}));
            self.index += 1;
        }
    }

    /// One finished block: start (empty), one delta with all of it, stop.
    fn whole(&mut self, b: &Value) {
        match b["type"].as_str() {
            Some("tool_use") => {
                self.close();
                let start = json!({"type": "tool_use", "id": b["id"], "name": b["name"], "input": {}});
                (self.send)(
                    "content_block_start",
                    json!({"type": "content_block_start", "index": self.index, "content_block": start}),
                );
                let d = json!({"type": "input_json_delta", "partial_json": b["input"].to_string()});
                (self.send)(
                    "content_block_delta",
                    json!({"type": "content_block_delta", "index": self.index, "delta": d}),
                );
                (self.send)("content_block_stop", json!({"type": "content_block_stop", "index": self.index}));
                self.index += 1;
            }
            Some("thinking") => self.put("thinking", b["thinking"].as_str().unwrap_or("")),
            _ => self.put("text", b["text"].as_str().unwrap_or("")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anthropic_turns_become_the_chat_the_template_reads() {
        let system = json!([{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]);
        let msgs = [
            json!({"role": "user", "content": "Weather in Paris?"}),
            json!({"role": "assistant", "content": [
                {"type": "thinking", "thinking": "call the tool", "signature": "x"},
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}]}),
            json!({"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "18C"}]},
                {"type": "text", "text": "Thanks"}]}),
        ];
        let chat = openai_messages(Some(&system), &msgs).unwrap();
        assert_eq!(chat[0], json!({"role": "system", "content": "Be brief."}));
        assert_eq!(chat[1], json!({"role": "user", "content": "Weather in Paris?"}));
        let a = &chat[2];
        assert_eq!(
            (a["content"].as_str(), a["reasoning_content"].as_str()),
            (Some("Checking."), Some("call the tool"))
        );
        assert_eq!(a["tool_calls"][0]["function"]["name"], "get_weather");
        assert_eq!(a["tool_calls"][0]["function"]["arguments"], r#"{"city":"Paris"}"#);
        assert_eq!(chat[3], json!({"role": "tool", "tool_call_id": "toolu_1", "content": "18C"}));
        assert_eq!(chat[4], json!({"role": "user", "content": "Thanks"}));
        let tools =
            openai_tools(&[json!({"name": "f", "description": "d", "input_schema": {"type": "object"}})]).unwrap();
        assert_eq!(
            tools[0],
            json!({"type": "function", "function": {"name": "f", "description": "d", "parameters": {"type": "object"}}})
        );
    }

    #[test]
    fn answers_become_blocks_with_tool_uses() {
        let m = Msg {
            id: "msg_1".into(),
            model: "m".into(),
            input_tokens: 3,
            parse: Parse { thinking: true, ..Default::default() },
        };
        let text = "plan</think>Sure.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{\"city\": \"Paris\"}<｜tool▁call▁end｜><｜tool▁calls▁end｜>";
        let b = blocks(&m, text);
        assert_eq!(b[0], json!({"type": "thinking", "thinking": "plan", "signature": ""}));
        assert_eq!(b[1], json!({"type": "text", "text": "Sure."}));
        assert_eq!((b[2]["type"].as_str(), b[2]["name"].as_str()), (Some("tool_use"), Some("get_weather")));
        assert_eq!(b[2]["input"], json!({"city": "Paris"}));
    }
}
