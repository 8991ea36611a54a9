//! The answer to a generation request: one JSON body, or a stream of server-sent events; chat
//! answers split into reasoning and content, tool-call markup parsed into `tool_calls`.

use super::detok::Detok;
use super::{now, submit, AppState, Shared};
use crate::engine::{Event, Finish, GenRequest, TokenOut};
use crate::error::ApiError;
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use dsv3_model::Tokenizer;
use serde_json::{json, Value};
use std::convert::Infallible;

pub(super) fn finish_reason(f: Finish) -> &'static str {
    match f {
        Finish::Stop => "stop",
        Finish::Length => "length",
    }
}

/// What the response looks like.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Mode {
    Completion,
    Chat,
    /// Chat with `tools`: special tokens kept in the text so DeepSeek's tool-call markup can be
    /// parsed; a stream sends the whole answer (content or tool_calls) at the end.
    ChatTools,
}

pub(super) fn logprob_entry(tok: Option<&Tokenizer>, t: &TokenOut, chat: bool) -> Value {
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
pub(super) fn chat_message(text: &str, eos_text: &[String], finish: &'static str) -> (Value, &'static str) {
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
pub(super) fn split_reasoning(text: &str) -> (Option<String>, String) {
    match text.split_once("</think>") {
        Some((r, a)) => (Some(r.trim_start_matches("<think>").trim().to_string()), a.trim_start().to_string()),
        None => (None, text.to_string()),
    }
}

/// What every piece of one answer carries.
pub(super) struct Reply {
    pub(super) id: String,
    pub(super) created: u64,
    pub(super) model: String,
    pub(super) mode: Mode,
    /// End-of-sequence token texts, removed from a tool-calling chat's text.
    pub(super) eos_text: Vec<String>,
    pub(super) prompt_tokens: usize,
    pub(super) include_usage: bool,
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

pub(super) async fn run(
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
pub(super) async fn respond_whole(
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
pub(super) async fn respond_stream(
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
pub(super) fn reasoning_delta(delta: &str, in_reasoning: &mut bool) -> Value {
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
pub(super) fn tool_chat_delta(whole: &str, eos_text: &[String], finish: &'static str) -> Value {
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
pub(super) fn rx_id<T>(rx: &tokio::sync::mpsc::UnboundedReceiver<T>) -> u64 {
    rx as *const _ as u64
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
