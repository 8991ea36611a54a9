//! Constrained decoding on a model that knows nothing of JSON (a tiny code model): every answer
//! under `response_format` or a forced `tool_choice` parses and follows the schema, at
//! temperature 1.5 over several seeds, streamed or not; a schema the engine cannot take is a 400
//! naming the keyword; an unconstrained request batched with constrained ones is unchanged.

mod common;

use common::{post, start};
use dsv3_serve::ServeOptions;
use serde_json::{json, Value};

/// A schema small enough that every answer fits in the token budget.
fn person() -> Value {
    json!({"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2}},
        "required": ["name", "age"], "additionalProperties": false})
}

/// The checks `person()` asks for, written out.
fn is_person(v: &Value) -> bool {
    let Some(o) = v.as_object() else { return false };
    let name_ok = o.get("name").and_then(Value::as_str).is_some_and(|n| n.chars().count() <= 6);
    let age_ok = o.get("age").and_then(Value::as_i64).is_some_and(|a| (0..=120).contains(&a));
    let tags_ok = o
        .get("tags")
        .is_none_or(|t| t.as_array().is_some_and(|a| a.len() <= 2 && a.iter().all(|x| x == "a" || x == "b")));
    name_ok && age_ok && tags_ok && o.keys().all(|k| ["name", "age", "tags"].contains(&k.as_str()))
}

fn chat(base: &str, extra: Value) -> Value {
    let mut b = json!({"messages": [{"role": "user", "content": "fn main"}], "max_tokens": 120, "temperature": 1.5});
    b.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
    let (code, v) = post(&format!("{base}/v1/chat/completions"), b);
    assert_eq!(code, 200, "{v}");
    v
}

#[test]
fn structured_outputs_always_parse_and_follow_the_schema() {
    let base = start(ServeOptions { max_batch: 8, ..ServeOptions::default() });
    let rf = json!({"type": "json_schema", "json_schema": {"name": "person", "schema": person(), "strict": true}});
    for seed in 0..4 {
        let v = chat(&base, json!({"response_format": rf, "seed": seed}));
        let text = v["choices"][0]["message"]["content"].as_str().unwrap();
        let parsed: Value = serde_json::from_str(text).unwrap_or_else(|e| panic!("seed {seed}: {e}: {text:?}"));
        assert!(is_person(&parsed), "seed {seed}: {parsed}");
        assert_eq!(v["choices"][0]["finish_reason"], "stop", "the grammar ended the answer");
    }
    // json_object: any object.
    let v = chat(&base, json!({"response_format": {"type": "json_object"}, "seed": 7, "max_tokens": 200}));
    let text = v["choices"][0]["message"]["content"].as_str().unwrap();
    if v["choices"][0]["finish_reason"] == "stop" {
        // Valid JSON (numbers past f64's range included, which `Value` would refuse).
        serde_json::from_str::<serde::de::IgnoredAny>(text).unwrap_or_else(|e| panic!("{e}: {text:?}"));
        assert!(text.starts_with('{'), "{text:?}");
    } else {
        assert!(text.starts_with('{'), "{text:?}");
    }
    // Streamed, on completions: the pieces make a valid answer.
    let body = json!({"prompt": "pub fn", "max_tokens": 120, "temperature": 1.5, "seed": 3, "stream": true, "response_format": rf});
    let text = ureq::post(&format!("{base}/v1/completions")).send_json(body).unwrap().into_string().unwrap();
    let streamed: String = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|l| *l != "[DONE]")
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["choices"][0]["text"].as_str().unwrap_or("").to_string())
        .collect();
    assert!(is_person(&serde_json::from_str(&streamed).unwrap()), "{streamed:?}");
    // Unconstrained greedy requests batched with constrained ones give what they give alone.
    let plain = |p: &str| json!({"prompt": p, "max_tokens": 10, "temperature": 0});
    let alone = post(&format!("{base}/v1/completions"), plain("impl Mla {")).1["choices"][0]["token_ids"].clone();
    let url = format!("{base}/v1/completions");
    let handles: Vec<_> = (0..3)
        .map(|s| {
            let (url, rf) = (url.clone(), rf.clone());
            std::thread::spawn(move || {
                post(
                    &url,
                    json!({"prompt": "let", "max_tokens": 60, "temperature": 1.0, "seed": s, "response_format": rf}),
                )
            })
        })
        .collect();
    let batched = post(&url, plain("impl Mla {")).1["choices"][0]["token_ids"].clone();
    for h in handles {
        assert_eq!(h.join().unwrap().0, 200);
    }
    assert_eq!(batched, alone);
}

#[test]
fn forced_tool_calls_follow_the_tools() {
    let base = start(ServeOptions::default());
    let tools = json!([
        {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object",
            "properties": {"city": {"type": "string", "maxLength": 5}}, "required": ["city"], "additionalProperties": false}}},
        {"type": "function", "function": {"name": "add", "parameters": {"type": "object",
            "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99}, "b": {"type": "integer", "minimum": 0, "maximum": 99}},
            "required": ["a", "b"], "additionalProperties": false}}}]);
    for seed in 0..3 {
        let named = json!({"type": "function", "function": {"name": "add"}});
        let v = chat(&base, json!({"tools": tools, "tool_choice": named, "seed": seed}));
        let m = &v["choices"][0]["message"];
        assert_eq!(v["choices"][0]["finish_reason"], "tool_calls", "{v}");
        assert_eq!(m["tool_calls"][0]["function"]["name"], "add");
        let args: Value = serde_json::from_str(m["tool_calls"][0]["function"]["arguments"].as_str().unwrap()).unwrap();
        assert!(args["a"].as_i64().is_some_and(|a| (0..=99).contains(&a)) && args["b"].is_i64(), "{args}");

        let v = chat(&base, json!({"tools": tools, "tool_choice": "required", "seed": seed, "max_tokens": 200}));
        let calls = v["choices"][0]["message"]["tool_calls"].as_array().cloned();
        if v["choices"][0]["finish_reason"] == "tool_calls" {
            let calls = calls.unwrap();
            assert!(!calls.is_empty());
            for c in calls {
                assert!(["get_weather", "add"].contains(&c["function"]["name"].as_str().unwrap()), "{c}");
            }
        }
    }
    // Streamed (greedy): no content, then the same call as the whole answer's.
    let named = json!({"type": "function", "function": {"name": "get_weather"}});
    let body = json!({"messages": [{"role": "user", "content": "fn main"}], "max_tokens": 120, "temperature": 0,
        "tools": tools, "tool_choice": named});
    let (_, whole) = post(&format!("{base}/v1/chat/completions"), body.clone());
    let mut sbody = body;
    sbody["stream"] = json!(true);
    let text = ureq::post(&format!("{base}/v1/chat/completions")).send_json(sbody).unwrap().into_string().unwrap();
    let chunks: Vec<Value> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter(|l| *l != "[DONE]")
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let content: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(content, "");
    let last =
        chunks.iter().rev().find(|c| !c["choices"][0]["delta"]["tool_calls"].is_null()).expect("a tool_calls delta");
    let call = &last["choices"][0]["delta"]["tool_calls"][0];
    assert_eq!(call["function"], whole["choices"][0]["message"]["tool_calls"][0]["function"]);
    assert_eq!(last["choices"][0]["finish_reason"], "tool_calls");

    // Errors name what is wrong.
    for (extra, param) in [
        (json!({"tools": tools, "tool_choice": {"type": "function", "function": {"name": "nope"}}}), "tool_choice"),
        (json!({"tool_choice": "required"}), "tool_choice"),
        (json!({"response_format": {"type": "xml"}}), "response_format"),
        (
            json!({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "object", "dependentSchemas": {"a": {"required": ["b"]}}}}}}),
            "response_format",
        ),
        (
            json!({"tools": tools, "tool_choice": "required", "response_format": {"type": "json_object"}}),
            "response_format",
        ),
    ] {
        let mut b = json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 4});
        b.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        let (code, v) = post(&format!("{base}/v1/chat/completions"), b);
        assert_eq!((code, v["error"]["param"].as_str()), (400, Some(param)), "{extra}: {v}");
    }
}
