//! `POST /v1/messages` (Anthropic's Messages API) against a real server: the same greedy answer as
//! the chat endpoint, the event stream's order and contents, stop reasons, thinking blocks when
//! the template opens the reasoning, Anthropic-shaped errors, both key headers.

mod common;

use common::{post, start, start_with_template};
use dsv3_serve::ServeOptions;
use serde_json::{json, Value};

fn send(url: &str, body: &Value, key: Option<(&str, &str)>) -> (u16, Value) {
    let mut r = ureq::post(url).set("content-type", "application/json").set("anthropic-version", "2023-06-01");
    if let Some((h, v)) = key {
        r = r.set(h, v);
    }
    match r.send_string(&body.to_string()) {
        Ok(r) => (r.status(), r.into_json().unwrap()),
        Err(ureq::Error::Status(c, r)) => (c, r.into_json().unwrap_or(Value::Null)),
        Err(e) => panic!("{e}"),
    }
}

/// (event name, data) pairs of an SSE answer.
fn events(url: &str, body: &Value) -> Vec<(String, Value)> {
    let text = ureq::post(url).send_string(&body.to_string()).unwrap().into_string().unwrap();
    let mut out = vec![];
    let mut name = String::new();
    for line in text.lines() {
        if let Some(n) = line.strip_prefix("event: ") {
            name = n.to_string();
        } else if let Some(d) = line.strip_prefix("data: ") {
            out.push((name.clone(), serde_json::from_str(d).unwrap()));
        }
    }
    out
}

#[test]
fn messages_answer_like_chat_and_stream_anthropic_events() {
    let base = start(ServeOptions { api_key: Some("k".into()), ..ServeOptions::default() });
    let url = format!("{base}/v1/messages");
    let auth = Some(("x-api-key", "k"));
    let body = json!({"model": "fixture", "max_tokens": 8, "temperature": 0, "system": "be brief",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "fn main"}]}]});
    let (code, v) = send(&url, &body, auth);
    assert_eq!(code, 200, "{v}");
    assert_eq!((v["type"].as_str(), v["role"].as_str()), (Some("message"), Some("assistant")));
    assert_eq!(v["stop_reason"], "max_tokens");
    assert_eq!(v["usage"]["output_tokens"], 8);
    let text: String = v["content"].as_array().unwrap().iter().map(|b| b["text"].as_str().unwrap()).collect();

    // The chat endpoint on the same conversation gives the same greedy text.
    let chat = ureq::post(&format!("{base}/v1/chat/completions"))
        .set("authorization", "Bearer k")
        .send_json(json!({"max_tokens": 8, "temperature": 0,
            "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "fn main"}]}))
        .unwrap()
        .into_json::<Value>()
        .unwrap();
    assert_eq!(chat["choices"][0]["message"]["content"].as_str().unwrap(), text);
    assert_eq!(v["usage"]["input_tokens"], chat["usage"]["prompt_tokens"]);

    // count_tokens counts what /v1/messages runs.
    let count = format!("{base}/v1/messages/count_tokens");
    let (code, c) = send(&count, &body, auth);
    assert_eq!((code, &c["input_tokens"]), (200, &v["usage"]["input_tokens"]), "{c}");
    let (code, e) = send(&count, &json!({"messages": []}), auth);
    assert_eq!((code, e["error"]["type"].as_str()), (400, Some("invalid_request_error")), "{e}");
    assert_eq!(send(&count, &body, None).0, 401);

    // Bearer works too; a wrong key is an Anthropic-shaped 401.
    assert_eq!(send(&url, &body, Some(("authorization", "Bearer k"))).0, 200);
    let (code, e) = send(&url, &body, Some(("x-api-key", "wrong")));
    assert_eq!(
        (code, e["type"].as_str(), e["error"]["type"].as_str()),
        (401, Some("error"), Some("authentication_error"))
    );

    // Streamed: the events in Anthropic's order, the text deltas adding up to the whole.
    let open = start(ServeOptions::default());
    let mut sbody = body.clone();
    sbody["stream"] = json!(true);
    let ev = events(&format!("{open}/v1/messages"), &sbody);
    let names: Vec<&str> = ev.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(&names[..3], ["message_start", "ping", "content_block_start"], "{names:?}");
    assert_eq!(&names[names.len() - 3..], ["content_block_stop", "message_delta", "message_stop"]);
    assert!(ev.iter().all(|(n, d)| d["type"] == n.as_str()));
    let streamed: String = ev
        .iter()
        .filter(|(n, _)| n == "content_block_delta")
        .map(|(_, d)| d["delta"]["text"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(streamed, text);
    let last = &ev[ev.len() - 2].1;
    assert_eq!(
        (last["delta"]["stop_reason"].as_str(), last["usage"]["output_tokens"].as_u64()),
        (Some("max_tokens"), Some(8))
    );

    // A stop sequence is named in the answer.
    let cut: String = text.chars().skip(2).take(2).collect();
    if !cut.trim().is_empty() {
        let mut b = body.clone();
        b["stop_sequences"] = json!([cut]);
        let (_, v) = send(&url, &b, auth);
        assert_eq!(
            (v["stop_reason"].as_str(), v["stop_sequence"].as_str()),
            (Some("stop_sequence"), Some(cut.as_str())),
            "{v}"
        );
    }

    // Errors: a missing max_tokens, an unknown role, an image block.
    for bad in [
        json!({"messages": [{"role": "user", "content": "x"}]}),
        json!({"max_tokens": 4, "messages": [{"role": "robot", "content": "x"}]}),
        json!({"max_tokens": 4, "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}),
        json!({"max_tokens": 4, "tool_choice": {"type": "any"}, "messages": [{"role": "user", "content": "x"}]}),
    ] {
        let (code, e) = send(&url, &bad, auth);
        assert_eq!((code, e["error"]["type"].as_str()), (400, Some("invalid_request_error")), "{bad}: {e}");
    }
}

#[test]
fn thinking_blocks_follow_the_template() {
    // A template that opens the reasoning when `thinking` is on (V3.1's hybrid-thinking rule).
    let tpl = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:{% if thinking %}<think>{% else %}</think>{% endif %}";
    let base = start_with_template(ServeOptions::default(), tpl);
    let url = format!("{base}/v1/messages");
    let body = |thinking: &str, stream: bool| {
        json!({"max_tokens": 6, "temperature": 0, "stream": stream, "thinking": {"type": thinking, "budget_tokens": 1024},
            "messages": [{"role": "user", "content": "fn main"}]})
    };
    // Thinking on: a random-weight answer never closes the reasoning, so it is all thinking.
    let (code, v) = send(&url, &body("enabled", false), None);
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["content"][0]["type"], "thinking", "{v}");
    let ev = events(&url, &body("enabled", true));
    let thought: String = ev.iter().filter_map(|(_, d)| d["delta"]["thinking"].as_str()).collect();
    assert_eq!(thought.trim(), v["content"][0]["thinking"].as_str().unwrap());
    assert!(ev.iter().any(|(_, d)| d["delta"]["type"] == "signature_delta"));
    // Thinking off: the same conversation's answer is text.
    let (_, v) = send(&url, &body("disabled", false), None);
    assert!(v["content"].as_array().unwrap().iter().all(|b| b["type"] == "text"), "{v}");

    // The chat endpoint splits the same way: reasoning_content whole and streamed.
    let chat = format!("{base}/v1/chat/completions");
    let req = |stream: bool| {
        json!({"max_tokens": 6, "temperature": 0, "stream": stream, "chat_template_kwargs": {"thinking": true},
            "messages": [{"role": "user", "content": "fn main"}]})
    };
    let (_, whole) = post(&chat, req(false));
    let m = &whole["choices"][0]["message"];
    assert!(m["reasoning_content"].as_str().is_some_and(|r| !r.is_empty()), "{whole}");
    let text = ureq::post(&chat).send_json(req(true)).unwrap().into_string().unwrap();
    let mut streamed = String::new();
    for line in text.lines().filter_map(|l| l.strip_prefix("data: ")).filter(|l| *l != "[DONE]") {
        let v: Value = serde_json::from_str(line).unwrap();
        streamed.push_str(v["choices"][0]["delta"]["reasoning_content"].as_str().unwrap_or(""));
    }
    assert_eq!(streamed.trim(), m["reasoning_content"].as_str().unwrap());
}
