//! The answer to a generation request: one JSON body, or a stream of server-sent events; chat
//! answers split into reasoning and content, tool-call markup parsed into `tool_calls`.

use super::detok::Detok;
use super::logprobs::{chat_entry, vllm_prompt_logprobs, Legacy};
use super::reasoning::Reasoning;
use super::request::Plan;
use super::structured::Forced;
use super::toolstream::ToolStream;
use super::{now, submit, AppState, Shared};
use crate::engine::{Event, Finish, TokenOut};
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

/// The assistant message of a chat answer: `reasoning_content` split at `</think>`, tool calls
/// parsed into `tool_calls` (finish reason `tool_calls`), end-of-sequence text removed.
pub(super) fn chat_message(text: &str, p: &Parse, finish: &'static str) -> (Value, &'static str) {
    let mut text = text.to_string();
    for e in p.eos_text.iter().filter(|e| !e.is_empty()) {
        text = text.replace(e.as_str(), "");
    }
    let (reasoning, rest) = Reasoning::split(&text, p.thinking);
    let mut message = json!({"role": "assistant", "content": rest});
    let mut finish = finish;
    let parsed = match &p.forced {
        Some(f) => f.calls(&rest).map(|calls| (String::new(), calls)),
        None => p.format.parse_tool_calls(&rest),
    };
    if let Some((content, calls)) = parsed {
        message["content"] = if content.is_empty() { Value::Null } else { json!(content) };
        message["tool_calls"] = json!(calls);
        finish = "tool_calls";
    }
    if let Some(r) = reasoning {
        message["reasoning_content"] = json!(r);
    }
    (message, finish)
}

/// How a chat answer's text is read: end-of-sequence texts removed (they stay in the text when
/// tool markup is parsed), reasoning split (starting inside it when the prompt opened it), tool
/// calls from the model's markup or, when forced, from the grammar's JSON.
#[derive(Clone, Default)]
pub(super) struct Parse {
    pub(super) eos_text: Vec<String>,
    pub(super) thinking: bool,
    pub(super) forced: Option<Forced>,
    pub(super) format: crate::tools::ChatFormat,
}

/// What every piece of one answer carries.
pub(super) struct Reply {
    pub(super) id: String,
    pub(super) created: u64,
    pub(super) model: String,
    pub(super) mode: Mode,
    pub(super) parse: Parse,
    pub(super) prompt_tokens: usize,
    pub(super) include_usage: bool,
    /// Whether log-probs were asked for generated tokens.
    pub(super) logprobs: bool,
    /// vLLM's `prompt_logprobs` asked for explicitly (not only implied by `echo`).
    pub(super) show_prompt_logprobs: bool,
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

pub(super) async fn run(st: Shared, plan: Plan, stream: Option<bool>, mode: Mode) -> Result<Response, ApiError> {
    let keep_special = mode == Mode::ChatTools;
    let eos_text: Vec<String> = match (keep_special, plan.choices.first()) {
        (true, Some((req, _))) => req
            .stop_ids
            .iter()
            .filter_map(|&i| st.tokenizer.as_ref().and_then(|t| t.decode(&[i], false).ok()))
            .collect(),
        _ => vec![],
    };
    let first = plan.choices.first().map(|(r, _)| r);
    let logprobs = first.is_some_and(|r| r.logprobs.is_some());
    let show_prompt_logprobs = first.is_some_and(|r| r.prompt_logprobs.is_some()) && !(plan.echo && logprobs);
    let mut streams = tokio_stream::StreamMap::new();
    let mut choices = vec![];
    let model = st.name_of(plan.choices.first().map_or(0, |c| c.0.adapter));
    for (index, (req, text)) in plan.choices.into_iter().enumerate() {
        let prompt = req.prompt.clone();
        let rx = submit(&st, req)?;
        streams.insert(index, tokio_stream::wrappers::UnboundedReceiverStream::new(rx));
        let stops = plan.stops.clone();
        let det = Detok::new(keep_special, stops);
        let mut c = Choice::new(index, det, prompt, text.filter(|_| plan.echo), plan.hidden.clone());
        c.reasoning = Reasoning::new(plan.thinking);
        // A forced call's JSON is no content; otherwise content stops at the format's markup.
        let mut markers: Vec<String> = st.format.call_starts().iter().map(|m| m.to_string()).collect();
        markers.extend(eos_text.iter().cloned());
        c.tools = if plan.forced.is_some() { ToolStream::new(vec![]).closed() } else { ToolStream::new(markers) };
        choices.push(c);
    }
    let kind = if mode == Mode::Completion { "cmpl" } else { "chatcmpl" };
    let reply = Reply {
        id: format!("{kind}-{:x}", now() ^ (&streams as *const _ as u64)),
        created: now(),
        model,
        mode,
        parse: Parse { eos_text, thinking: plan.thinking, forced: plan.forced.clone(), format: st.format },
        prompt_tokens: plan.prompt_tokens,
        include_usage: stream.unwrap_or(false),
        logprobs,
        show_prompt_logprobs,
    };
    let answer = Answer { reply, choices, streams };
    match stream {
        None => Ok(Json(answer.whole(&st).await).into_response()),
        Some(_) => {
            let (tx, out) = tokio::sync::mpsc::unbounded_channel::<Result<SseEvent, Infallible>>();
            tokio::spawn(answer.stream(st.clone(), tx));
            Ok(Sse::new(tokio_stream::wrappers::UnboundedReceiverStream::new(out)).into_response())
        }
    }
}

type Events = tokio_stream::StreamMap<usize, tokio_stream::wrappers::UnboundedReceiverStream<Event>>;

/// The choices of one answer and their event streams (a stream is dropped when its choice ends,
/// which makes the engine free the sequence).
struct Answer<'a> {
    reply: Reply,
    choices: Vec<Choice<'a>>,
    streams: Events,
}

/// One choice as its events arrive.
struct Choice<'a> {
    index: usize,
    det: Detok<'a>,
    prompt: Vec<u32>,
    /// The prompt's text when it is echoed.
    echo: Option<String>,
    /// Stop ids whose text is not shown.
    hidden: Vec<u32>,
    prompt_lps: Vec<TokenOut>,
    tokens: Vec<TokenOut>,
    text: String,
    finish: Option<&'static str>,
    completion_tokens: usize,
    /// Streaming: the first chunk (echo, prompt log-probs) went out; inside `<think>`; the
    /// legacy log-probs builder continuing the offsets.
    started: bool,
    reasoning: Reasoning,
    legacy: Legacy,
    /// The last event was a token (a `Done` carries none of its own).
    fresh_token: bool,
    /// Tool-calling chats: the content up to the calls, and what of it was sent.
    tools: ToolStream,
    streamed: String,
}

impl<'a> Choice<'a> {
    fn new(index: usize, det: Detok<'a>, prompt: Vec<u32>, echo: Option<String>, hidden: Vec<u32>) -> Self {
        Choice {
            index,
            det,
            prompt,
            echo,
            hidden,
            prompt_lps: vec![],
            tokens: vec![],
            text: String::new(),
            finish: None,
            completion_tokens: 0,
            started: false,
            reasoning: Reasoning::new(false),
            legacy: Legacy::default(),
            fresh_token: false,
            tools: ToolStream::new(vec![]),
            streamed: String::new(),
        }
    }

    /// Takes one event: the new text it makes safe to show, or `None` for a prompt event.
    fn take(&mut self, ev: Event) -> Option<String> {
        match ev {
            Event::Prompt(p) => {
                self.prompt_lps.extend(p);
                None
            }
            Event::Token(t) => {
                self.completion_tokens += 1;
                self.fresh_token = true;
                let delta = if self.hidden.contains(&t.id) { String::new() } else { self.det.push(t.id) };
                self.tokens.push(t);
                if self.det.stopped {
                    self.finish = Some("stop");
                }
                self.text.push_str(&delta);
                Some(delta)
            }
            Event::Done { finish, completion_tokens, .. } => {
                self.fresh_token = false;
                let delta = self.det.flush();
                self.finish = Some(finish_reason(finish));
                self.completion_tokens = completion_tokens;
                self.text.push_str(&delta);
                Some(delta)
            }
        }
    }

    /// The legacy log-probs of the echoed prompt (its first token has none).
    fn echo_logprobs(&self, tok: Option<&Tokenizer>, into: &mut Legacy) {
        if let Some(&first) = self.prompt.first() {
            into.push_first(tok, first);
        }
        for t in &self.prompt_lps {
            into.push(tok, t);
        }
    }
}

impl Answer<'_> {
    /// The next event of any choice; a choice's stream is dropped once it ended.
    async fn next(&mut self) -> Option<(usize, Option<String>)> {
        use tokio_stream::StreamExt;
        let (i, ev) = self.streams.next().await?;
        let delta = self.choices[i].take(ev);
        if self.choices[i].finish.is_some() {
            self.streams.remove(&i);
        }
        Some((i, delta))
    }

    fn completion_tokens(&self) -> usize {
        self.choices.iter().map(|c| c.completion_tokens).sum()
    }

    /// The whole answer as one JSON body.
    async fn whole(mut self, st: &AppState) -> Value {
        let tok = st.tokenizer.as_ref();
        for c in &mut self.choices {
            c.det.tok = tok;
        }
        while self.next().await.is_some() {}
        let reply = &self.reply;
        let mut choices = vec![];
        for c in &self.choices {
            let finish = c.finish.unwrap_or("stop");
            let choice = if reply.chat() {
                let lps: Vec<Value> = c.tokens.iter().map(|t| chat_entry(tok, t)).collect();
                let logprobs = if reply.logprobs { json!({"content": lps}) } else { Value::Null };
                let (message, finish) = chat_message(&c.text, &reply.parse, finish);
                json!({"index": c.index, "message": message, "logprobs": logprobs, "finish_reason": finish})
            } else {
                let mut legacy = Legacy::default();
                if c.echo.is_some() && reply.logprobs {
                    c.echo_logprobs(tok, &mut legacy);
                }
                for t in c.tokens.iter().filter(|_| reply.logprobs) {
                    legacy.push(tok, t);
                }
                let logprobs = if reply.logprobs { legacy.take() } else { Value::Null };
                let text = format!("{}{}", c.echo.as_deref().unwrap_or(""), c.text);
                let ids: Vec<u32> = c.tokens.iter().map(|t| t.id).collect();
                let mut v = json!({"index": c.index, "text": text, "token_ids": ids, "logprobs": logprobs, "finish_reason": finish});
                if reply.show_prompt_logprobs {
                    v["prompt_logprobs"] = vllm_prompt_logprobs(tok, &c.prompt_lps);
                }
                v
            };
            choices.push(choice);
        }
        let mut body = reply.object(Value::Array(choices), false);
        if reply.chat() && reply.show_prompt_logprobs {
            body["prompt_logprobs"] =
                vllm_prompt_logprobs(tok, self.choices.first().map_or(&[][..], |c| &c.prompt_lps));
        }
        body["usage"] = reply.usage(self.completion_tokens());
        body
    }

    /// The answer as server-sent events: per choice, a chunk per piece of text that is safe to
    /// send (the first with the echo and prompt log-probs), the last with its finish reason; the
    /// usage chunk when asked, then `[DONE]`.
    async fn stream(mut self, st: Shared, tx: tokio::sync::mpsc::UnboundedSender<Result<SseEvent, Infallible>>) {
        let tok = st.tokenizer.as_ref();
        for c in &mut self.choices {
            c.det.tok = tok;
        }
        let send = |v: Value| tx.send(Ok(SseEvent::default().data(v.to_string()))).is_ok();
        if self.reply.chat() {
            for c in &self.choices {
                let first =
                    json!({"index": c.index, "delta": {"role": "assistant", "content": ""}, "finish_reason": null});
                send(self.reply.object(json!([first]), true));
            }
        }
        while let Some((i, delta)) = self.next().await {
            let Some(delta) = delta else { continue };
            let (reply, c) = (&self.reply, &mut self.choices[i]);
            let mut chunk = match reply.mode {
                Mode::ChatTools => {
                    // Reasoning and content as they come; the calls once the answer is parsed.
                    let Some(d) = tool_chat_delta(c, &delta, &reply.parse) else { continue };
                    json!({"index": c.index, "delta": d.0, "logprobs": Value::Null, "finish_reason": d.1})
                }
                Mode::Chat => {
                    let d = reasoning_delta(&mut c.reasoning, &delta, c.finish.is_some());
                    let lps: Vec<Value> = c
                        .tokens
                        .last()
                        .filter(|_| reply.logprobs && c.fresh_token)
                        .map(|t| chat_entry(tok, t))
                        .into_iter()
                        .collect();
                    let logprobs = if lps.is_empty() { Value::Null } else { json!({"content": lps}) };
                    json!({"index": c.index, "delta": d, "logprobs": logprobs, "finish_reason": c.finish})
                }
                Mode::Completion => {
                    let mut text = String::new();
                    if !c.started {
                        if let Some(e) = &c.echo {
                            text.push_str(e);
                            let mut legacy = std::mem::take(&mut c.legacy);
                            if reply.logprobs {
                                c.echo_logprobs(tok, &mut legacy);
                            }
                            c.legacy = legacy;
                        }
                    }
                    text.push_str(&delta);
                    if reply.logprobs && c.fresh_token {
                        if let Some(t) = c.tokens.last() {
                            c.legacy.push(tok, t);
                        }
                    }
                    let logprobs = if c.legacy.is_empty() { Value::Null } else { c.legacy.take() };
                    let mut v =
                        json!({"index": c.index, "text": text, "logprobs": logprobs, "finish_reason": c.finish});
                    if !c.started && reply.show_prompt_logprobs {
                        v["prompt_logprobs"] = vllm_prompt_logprobs(tok, &c.prompt_lps);
                    }
                    v
                }
            };
            let first = !c.started;
            c.started = true;
            let mut obj = reply.object(json!([chunk.take()]), true);
            if first && reply.chat() && reply.show_prompt_logprobs {
                obj["prompt_logprobs"] = vllm_prompt_logprobs(tok, &c.prompt_lps);
            }
            if !send(obj) {
                return; // client gone: dropping the streams makes the engine free the sequences
            }
        }
        if self.reply.include_usage {
            // OpenAI's `stream_options.include_usage`: a last chunk with no choices and the usage.
            let mut last = self.reply.object(json!([]), true);
            last["usage"] = self.reply.usage(self.completion_tokens());
            send(last);
        }
        let _ = tx.send(Ok(SseEvent::default().data("[DONE]")));
    }
}

/// A chat delta split into `reasoning_content` and `content` (no marker, whole or part, shown).
fn reasoning_delta(r: &mut Reasoning, delta: &str, last: bool) -> Value {
    let (mut reasoning, mut content) = r.push(delta);
    if last {
        let (a, b) = r.finish();
        reasoning.push_str(&a);
        content.push_str(&b);
    }
    let mut d = json!({});
    if !reasoning.is_empty() {
        d["reasoning_content"] = json!(reasoning);
    }
    if !content.is_empty() || !r.inside() {
        d["content"] = json!(content);
    }
    d
}

/// A streamed tool-calling chat's delta: reasoning, content up to the tool-call markup, and at the
/// end the parsed `tool_calls` (each with its index) and whatever content the parse kept that was
/// not sent. `None` when there is nothing to send yet.
fn tool_chat_delta(c: &mut Choice, delta: &str, p: &Parse) -> Option<(Value, Option<&'static str>)> {
    let last = c.finish.is_some();
    let (mut reasoning, answer) = c.reasoning.push(delta);
    let mut content = c.tools.push(&answer);
    if last {
        let (r, a) = c.reasoning.finish();
        reasoning.push_str(&r);
        content.push_str(&c.tools.push(&a));
        content.push_str(&c.tools.finish());
    }
    c.streamed.push_str(&content);
    let mut d = json!({});
    if !reasoning.is_empty() {
        d["reasoning_content"] = json!(reasoning);
    }
    let mut finish = None;
    if let Some(f) = c.finish {
        let (message, f) = chat_message(&c.text, p, f);
        finish = Some(f);
        match message.get("tool_calls").and_then(Value::as_array) {
            Some(calls) => {
                let indexed: Vec<Value> = calls
                    .iter()
                    .enumerate()
                    .map(|(i, call)| {
                        let mut call = call.clone();
                        call["index"] = json!(i);
                        call
                    })
                    .collect();
                d["tool_calls"] = Value::from(indexed);
            }
            None => {
                let whole = message["content"].as_str().unwrap_or("");
                content.push_str(whole.strip_prefix(c.streamed.as_str()).unwrap_or(""));
            }
        }
    }
    if !content.is_empty() {
        d["content"] = json!(content);
    }
    (finish.is_some() || d.as_object().is_some_and(|o| !o.is_empty())).then_some((d, finish))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_messages_split_reasoning_and_tool_calls() {
        let p = Parse { eos_text: vec!["<｜end▁of▁sentence｜>".to_string()], ..Default::default() };
        let (m, f) = chat_message("<think>look it up</think>Sure.<｜end▁of▁sentence｜>", &p, "stop");
        assert_eq!(
            (m["content"].as_str(), m["reasoning_content"].as_str(), f),
            (Some("Sure."), Some("look it up"), "stop")
        );
        let text = "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{\"city\": \"Paris\"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜><｜end▁of▁sentence｜>";
        let (m, f) = chat_message(text, &p, "stop");
        assert_eq!(f, "tool_calls");
        assert!(m["content"].is_null());
        assert_eq!(m["tool_calls"][0]["function"]["name"], "get_weather");
        assert_eq!(m["tool_calls"][0]["type"], "function");
    }

    #[test]
    fn streamed_tool_chats_send_content_then_the_parsed_calls() {
        let eos = "<｜end▁of▁sentence｜>".to_string();
        let p = Parse { eos_text: vec![eos.clone()], format: crate::tools::ChatFormat::V3, ..Default::default() };
        let text = format!("<think>need weather</think>Let me check. <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{{\"city\": \"Paris\"}}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>{eos}");
        for n in [1, 3, 10, 1000] {
            let mut c = Choice::new(0, Detok::new(true, vec![]), vec![], None, vec![]);
            let mut markers: Vec<String> = p.format.call_starts().iter().map(|m| m.to_string()).collect();
            markers.push(eos.clone());
            c.tools = ToolStream::new(markers);
            let chars: Vec<char> = text.chars().collect();
            let pieces: Vec<String> = chars.chunks(n).map(|p| p.iter().collect()).collect();
            let (mut content, mut reasoning, mut calls) = (String::new(), String::new(), vec![]);
            for (i, piece) in pieces.iter().enumerate() {
                c.text.push_str(piece);
                if i + 1 == pieces.len() {
                    c.finish = Some("stop");
                }
                let Some((d, f)) = tool_chat_delta(&mut c, piece, &p) else { continue };
                let part = d["content"].as_str().unwrap_or("");
                assert!(!part.contains('<') && !part.contains('｜'), "markup in content: {part:?}");
                content.push_str(part);
                reasoning.push_str(d["reasoning_content"].as_str().unwrap_or(""));
                if let Some(t) = d["tool_calls"].as_array() {
                    calls.extend(t.clone());
                    assert_eq!(f, Some("tool_calls"));
                }
            }
            assert_eq!((content.as_str(), reasoning.as_str()), ("Let me check.", "need weather"), "pieces of {n}");
            assert_eq!(calls.len(), 1);
            assert_eq!(
                (calls[0]["index"].as_u64(), calls[0]["function"]["name"].as_str()),
                (Some(0), Some("get_weather"))
            );
        }
    }
}
