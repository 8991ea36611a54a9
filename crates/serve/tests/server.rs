//! A real server on a loopback port, driven by a real HTTP client: streaming and non-streaming
//! agree, concurrent greedy requests give what each gives alone, errors are OpenAI-shaped 4xx.

mod common;

use common::{metric, post, settled, start};
use dsv3_serve::ServeOptions;
use serde_json::{json, Value};

fn stream_ids(url: &str, body: Value) -> (Vec<String>, String) {
    let r = ureq::post(url).send_json(body).unwrap();
    let text = r.into_string().unwrap();
    let mut pieces = vec![];
    let mut finish = String::new();
    for line in text.lines().filter_map(|l| l.strip_prefix("data: ")) {
        if line == "[DONE]" {
            return (pieces, finish);
        }
        let v: Value = serde_json::from_str(line).unwrap();
        let c = &v["choices"][0];
        pieces.push(c["text"].as_str().or(c["delta"]["content"].as_str()).unwrap_or("").to_string());
        if let Some(f) = c["finish_reason"].as_str() {
            finish = f.to_string();
        }
    }
    panic!("no [DONE] in the stream: {text}");
}

#[test]
fn completions_stream_and_batch_consistently() {
    let base = start(ServeOptions { max_batch: 8, ..ServeOptions::default() });
    let url = format!("{base}/v1/completions");
    let req = |p: &str, stream: bool| json!({"prompt": p, "max_tokens": 12, "temperature": 0, "stream": stream});
    let (code, v) = post(&url, req("pub fn forward(", false));
    assert_eq!(code, 200, "{v}");
    let text = v["choices"][0]["text"].as_str().unwrap().to_string();
    assert_eq!(v["usage"]["completion_tokens"], 12);
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    let (pieces, finish) = stream_ids(&url, req("pub fn forward(", true));
    assert_eq!(pieces.concat(), text, "streaming and non-streaming give the same text");
    assert_eq!(finish, "length");

    // Concurrent greedy requests (different prompts and lengths) equal each one alone.
    let prompts = ["pub fn forward(", "impl Mla {", "let x = ", "// The", "fn main() { let y = vec![", "use std::"];
    let alone: Vec<Value> =
        prompts.iter().map(|p| post(&url, req(p, false)).1["choices"][0]["token_ids"].clone()).collect();
    let handles: Vec<_> = prompts
        .iter()
        .map(|p| {
            let (url, body) = (url.clone(), req(p, false));
            std::thread::spawn(move || post(&url, body).1["choices"][0]["token_ids"].clone())
        })
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        assert_eq!(h.join().unwrap(), alone[i], "request {i} changed when batched with the others");
    }

    // Token ids in, logprobs out; a stop string cuts the text.
    let (code, v) = post(&url, json!({"prompt": [5, 6, 7], "max_tokens": 3, "temperature": 0, "logprobs": 2}));
    assert_eq!(code, 200, "{v}");
    let lp = &v["choices"][0]["logprobs"];
    assert_eq!(lp["token_logprobs"].as_array().unwrap().len(), 3);
    assert!(lp["token_logprobs"][0].as_f64().unwrap() <= 0.0);
    assert_eq!(lp["top_logprobs"][0].as_object().unwrap().len(), 2);
    let stop = text.chars().skip(3).take(2).collect::<String>();
    if !stop.trim().is_empty() {
        let (_, v) = post(
            &url,
            json!({"prompt": "pub fn forward(", "max_tokens": 12, "temperature": 0, "stop": [stop.clone()]}),
        );
        let t = v["choices"][0]["text"].as_str().unwrap();
        assert!(!t.contains(&stop) && text.starts_with(t), "{t:?} vs {text:?} stop {stop:?}");
    }

    // Chat through the template.
    let (code, v) = post(
        &format!("{base}/v1/chat/completions"),
        json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0}),
    );
    assert_eq!(code, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");

    // Tools are accepted (rendered when the template uses them); a malformed list is a 400.
    let tools = json!([{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]);
    let chat = format!("{base}/v1/chat/completions");
    let (code, v) =
        post(&chat, json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "tools": tools}));
    assert_eq!(code, 200, "{v}");
    let (code, _) = post(&chat, json!({"messages": [{"role": "user", "content": "hi"}], "tools": "f"}));
    assert_eq!(code, 400);
    let (pieces, finish) = stream_ids(
        &chat,
        json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0, "tools": tools, "stream": true}),
    );
    assert!(!finish.is_empty() && pieces.len() >= 2);

    // The small endpoints.
    let models: Value = ureq::get(&format!("{base}/v1/models")).call().unwrap().into_json().unwrap();
    assert_eq!(models["data"][0]["id"], "fixture");
    let (_, t) = post(&format!("{base}/tokenize"), json!({"prompt": "fn main"}));
    let (_, d) = post(&format!("{base}/detokenize"), json!({"tokens": t["tokens"]}));
    assert_eq!(d["prompt"], "fn main");
    let m = ureq::get(&format!("{base}/metrics")).call().unwrap().into_string().unwrap();
    assert!(m.contains("dsv3_generation_tokens_total") && m.contains("dsv3_time_to_first_token_seconds_bucket"));
}

#[test]
fn bad_requests_are_openai_shaped_4xx() {
    let base = start(ServeOptions { max_batch: 2, max_queue: 3, api_key: Some("k".into()), ..ServeOptions::default() });
    let url = format!("{base}/v1/completions");
    let send = |body: &str, key: Option<&str>| {
        let mut r = ureq::post(&url).set("content-type", "application/json");
        if let Some(k) = key {
            r = r.set("authorization", &format!("Bearer {k}"));
        }
        match r.send_string(body) {
            Ok(r) => (r.status(), Value::Null),
            Err(ureq::Error::Status(c, r)) => (c, r.into_json().unwrap_or(Value::Null)),
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(send(r#"{"prompt":"x","max_tokens":2}"#, None).0, 401);
    assert_eq!(send(r#"{"prompt":"x","max_tokens":2}"#, Some("wrong")).0, 401);
    assert_eq!(send(r#"{"prompt":"x","max_tokens":2}"#, Some("k")).0, 200);
    for body in [
        "{not json",
        r#"{"prompt": 5}"#,
        r#"{"prompt": "x", "max_tokens": "many"}"#,
        r#"{"prompt": "x", "max_tokens": 100000}"#,
        r#"{"prompt": "x", "n": 0}"#,
        r#"{"prompt": "x", "temperature": -1}"#,
        r#"{"prompt": [99999999]}"#,
        r#"{"prompt": ""}"#,
    ] {
        let (code, v) = send(body, Some("k"));
        assert_eq!(code, 400, "{body}: {v}");
        assert!(v["error"]["message"].is_string() && v["error"]["type"] == "invalid_request_error", "{body}: {v}");
    }
    let (code, _) = {
        let r = ureq::post(&url).set("authorization", "Bearer k").send_bytes(&[0xff, 0xfe, b'{']);
        match r {
            Ok(r) => (r.status(), ()),
            Err(ureq::Error::Status(c, _)) => (c, ()),
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(code, 400, "invalid UTF-8");
    // A flood beyond batch + queue: some requests are refused with 429, none fail otherwise.
    let handles: Vec<_> = (0..16)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || {
                match ureq::post(&url)
                    .set("authorization", "Bearer k")
                    .send_json(json!({"prompt": "fn", "max_tokens": 200, "temperature": 0}))
                {
                    Ok(r) => r.status(),
                    Err(ureq::Error::Status(c, _)) => c,
                    Err(e) => panic!("{e}"),
                }
            })
        })
        .collect();
    let codes: Vec<u16> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert!(codes.iter().all(|&c| c == 200 || c == 429), "{codes:?}");
    assert!(codes.contains(&429) && codes.contains(&200), "{codes:?}");
}

#[test]
fn mtp_speculative_serving_gives_the_plain_tokens() {
    let plain = start(ServeOptions { max_batch: 4, max_queue: 7, ..ServeOptions::default() });
    let spec = start(ServeOptions { max_batch: 4, max_queue: 9, mtp_speculative: 2, ..ServeOptions::default() });
    for p in ["pub fn forward(", "impl Mla {", "let x = "] {
        let body = json!({"prompt": p, "max_tokens": 16, "temperature": 0});
        let a = post(&format!("{plain}/v1/completions"), body.clone()).1;
        let b = post(&format!("{spec}/v1/completions"), body).1;
        assert_eq!(a["choices"][0]["token_ids"], b["choices"][0]["token_ids"], "{p}");
        assert_eq!(b["usage"]["completion_tokens"], 16);
    }
    let m = ureq::get(&format!("{spec}/metrics")).call().unwrap().into_string().unwrap();
    let drafts: f64 = m.lines().find_map(|l| l.strip_prefix("dsv3_mtp_draft_tokens_total ")).unwrap().parse().unwrap();
    assert!(drafts > 0.0, "{m}");
    assert!(m.contains("dsv3_mtp_acceptance_rate"));
}

#[test]
fn paged_cache_with_prefix_reuse_changes_no_token_and_frees_its_blocks() {
    let plain = start(ServeOptions { max_batch: 4, max_queue: 11, ..ServeOptions::default() });
    let cached = start(ServeOptions { max_batch: 4, max_queue: 13, prefix_cache: true, ..ServeOptions::default() });
    // Prompts of 150 tokens sharing their first 140: two full 64-token blocks to reuse.
    fn body(tail: u32) -> Value {
        let prompt: Vec<u32> =
            (0..140).map(|i| 2 + (i * 37) % 290).chain((0..10).map(|i| 2 + (tail * 13 + i) % 290)).collect();
        json!({"prompt": prompt, "max_tokens": 20, "temperature": 0})
    }
    for tail in [1, 2, 3] {
        let a = post(&format!("{plain}/v1/completions"), body(tail)).1;
        let b = post(&format!("{cached}/v1/completions"), body(tail)).1;
        assert_eq!(
            a["choices"][0]["token_ids"], b["choices"][0]["token_ids"],
            "tail {tail}: prefix reuse changed the output"
        );
    }
    // The first request computed everything; the next two each took 128 tokens from the cache.
    assert_eq!(metric(&cached, "dsv3_prefix_reused_tokens_total"), 256.0);
    assert_eq!(metric(&plain, "dsv3_prefix_reused_tokens_total"), 0.0);
    // Concurrent requests with the shared prefix also match their plain outputs.
    let handles: Vec<_> = [4u32, 5, 6]
        .into_iter()
        .map(|t| {
            let (p, c) = (plain.clone(), cached.clone());
            std::thread::spawn(move || {
                let a = post(&format!("{p}/v1/completions"), body(t)).1;
                let b = post(&format!("{c}/v1/completions"), body(t)).1;
                (a["choices"][0]["token_ids"].clone(), b["choices"][0]["token_ids"].clone())
            })
        })
        .collect();
    for h in handles {
        let (a, b) = h.join().unwrap();
        assert_eq!(a, b);
    }
    // Idle: the plain server has freed every block; the cached one keeps only its prefix entries
    // (2 blocks per main layer).
    std::thread::sleep(std::time::Duration::from_millis(300));
    post(&format!("{plain}/v1/completions"), json!({"prompt": [3, 4], "max_tokens": 1}));
    assert!(metric(&plain, "dsv3_kv_blocks_capacity") > 0.0);
    assert_eq!(settled(&plain, "dsv3_kv_blocks_in_use", 0.0), 0.0, "every block freed when its request ended");
    let layers = 2.0; // train_roundtrip's main layers
    let entries = metric(&cached, "dsv3_prefix_cache_entries");
    assert_eq!(entries, 2.0);
    post(&format!("{cached}/v1/completions"), json!({"prompt": [3, 4], "max_tokens": 1}));
    assert_eq!(
        settled(&cached, "dsv3_kv_blocks_in_use", entries * layers),
        entries * layers,
        "only the cached prefix blocks stay"
    );
}
