//! What a careless or hostile client can send, against a real server: sizes that would wrap,
//! prompts past the context window, malformed chats and tools, slow and truncated requests, paths
//! and methods the API does not have, oversized URIs, headers and bodies. Every refusal is an
//! OpenAI-shaped JSON error with the right status, nothing is held forever, and `/health` answers
//! after all of it.

mod common;

use common::{metric, post, settled, start};
use dsv3_serve::http::HttpLimits;
use dsv3_serve::ServeOptions;
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// The fixture's context window (`max_position_embeddings`).
const CTX: usize = 256;

fn limits() -> HttpLimits {
    HttpLimits { header_timeout: Duration::from_secs(1), body_timeout: Duration::from_secs(1), ..HttpLimits::default() }
}

fn addr(base: &str) -> String {
    base.trim_start_matches("http://").to_string()
}

/// Sends raw bytes and reads the answer until the server closes or `wait` passes: (status, the
/// `Retry-After` header, the JSON body).
fn raw(base: &str, request: &[u8], wait: Duration) -> (u16, Option<String>, Value) {
    let mut s = TcpStream::connect(addr(base)).unwrap();
    s.set_read_timeout(Some(wait)).unwrap();
    s.write_all(request).unwrap();
    let mut buf = vec![];
    let _ = s.read_to_end(&mut buf);
    parse_response(&buf)
}

fn parse_response(buf: &[u8]) -> (u16, Option<String>, Value) {
    let text = String::from_utf8_lossy(buf);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no response: {text:?}"));
    let status = head.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let retry =
        head.lines().find_map(|l| l.to_ascii_lowercase().strip_prefix("retry-after:").map(|v| v.trim().to_string()));
    (status, retry, serde_json::from_str(body).unwrap_or(Value::Null))
}

fn assert_openai_error(what: &str, status: u16, got: (u16, Option<String>, Value)) {
    assert_eq!(got.0, status, "{what}: {:?}", got.2);
    let e = &got.2["error"];
    assert!(e["message"].is_string() && e["type"].is_string() && e["code"] == status, "{what}: {}", got.2);
}

fn request(method: &str, path: &str, body: &str, extra: &str) -> Vec<u8> {
    format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n{extra}\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[test]
fn sizes_and_bounds_are_checked_without_wrapping() {
    let base = start(ServeOptions { http: limits(), ..ServeOptions::default() });
    let url = format!("{base}/v1/completions");
    // u64::MAX and friends: the sum with the prompt would wrap.
    for m in [u64::MAX, u64::MAX - 3, 1 << 63, (CTX as u64) - 1] {
        let (code, v) = post(&url, json!({"prompt": "fn main", "max_tokens": m}));
        assert_eq!(code, 400, "max_tokens {m}: {v}");
        assert_eq!(v["error"]["param"], "max_tokens", "{v}");
        assert!(v["error"]["message"].as_str().unwrap().contains("256"), "names the context: {v}");
    }
    let (code, v) = post(&url, json!({"prompt": [5, 6], "max_completion_tokens": u64::MAX}));
    assert_eq!((code, v["error"]["param"].as_str()), (400, Some("max_completion_tokens")), "{v}");
    // A prompt past the window names both numbers.
    let long: Vec<u32> = (0..CTX as u32 + 10).map(|i| 2 + i % 200).collect();
    let (code, v) = post(&url, json!({"prompt": long, "max_tokens": 1}));
    let msg = v["error"]["message"].as_str().unwrap_or("");
    assert!(code == 400 && msg.contains("266") && msg.contains("256"), "{v}");
    // Without max_tokens the answer stops at the window with finish_reason "length".
    let near: Vec<u32> = (0..CTX as u32 - 3).map(|i| 2 + i % 200).collect();
    let (code, v) = post(&url, json!({"prompt": near, "temperature": 0, "stop": []}));
    assert_eq!(code, 200, "{v}");
    let c = &v["choices"][0];
    assert!(c["token_ids"].as_array().unwrap().len() <= 3, "{v}");
    if c["token_ids"].as_array().unwrap().len() == 3 {
        assert_eq!(c["finish_reason"], "length");
    }
    // Ids past u32 are not truncated into valid ones.
    let (code, v) = post(&url, json!({"prompt": [2, 4294967301u64]}));
    assert!(code == 400 && v["error"]["message"].as_str().unwrap().contains("4294967301"), "{v}");
    for (body, param) in [
        (json!({"prompt": "x", "logprobs": 21}), "logprobs"),
        (json!({"prompt": "x", "n": 0}), "n"),
        (json!({"prompt": vec!["x"; 100], "n": 2}), "n"),
        (json!({"prompt": [], "max_tokens": 1}), "prompt"),
        (json!({"prompt": [[1, 2], "x"]}), "prompt"),
        (json!({"prompt": "x", "stop": [""]}), "stop"),
        (json!({"prompt": "x", "stop": vec!["a"; 65]}), "stop"),
        (json!({"prompt": "x", "top_p": 0}), "top_p"),
        (json!({"prompt": "x", "temperature": 1e9}), "temperature"),
        (json!({"prompt": "x", "max_tokens": 0}), "max_tokens"),
        (json!({"prompt": "x", "prompt_logprobs": 21}), "prompt_logprobs"),
        (json!({"prompt": "x", "logit_bias": {"x": 10}}), "logit_bias"),
        (json!({"prompt": "x", "frequency_penalty": f32::MAX}), "frequency_penalty"),
        (json!({"prompt": "x", "best_of": 2}), "best_of"),
    ] {
        let (code, v) = post(&url, body.clone());
        assert_eq!((code, v["error"]["param"].as_str()), (400, Some(param)), "{body}: {v}");
    }
    let chat = format!("{base}/v1/chat/completions");
    let (code, v) =
        post(&chat, json!({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 50, "logprobs": true}));
    assert_eq!((code, v["error"]["param"].as_str()), (400, Some("top_logprobs")), "{v}");
    assert_eq!(ureq::get(&format!("{base}/health")).call().unwrap().status(), 200);
}

#[test]
fn malformed_chats_and_tools_name_the_message_and_field() {
    let base = start(ServeOptions { http: limits(), ..ServeOptions::default() });
    let chat = format!("{base}/v1/chat/completions");
    let cases = [
        (json!([{"content": "hi"}]), "messages[0].role"),
        (json!([{"role": "wizard", "content": "hi"}]), "messages[0].role"),
        (json!([{"role": 5, "content": "hi"}]), "messages[0].role"),
        (json!([{"role": "user", "content": "hi"}, "hello"]), "messages[1]"),
        (json!([{"role": "user", "content": "hi"}, null]), "messages[1]"),
        (json!([{"role": "user", "content": null}]), "messages[0].content"),
        (json!([{"role": "user", "content": {"text": "x"}}]), "messages[0].content"),
        (json!("hello"), "messages"),
    ];
    for (messages, param) in cases {
        let (code, v) = post(&chat, json!({"messages": messages, "max_tokens": 2}));
        assert_eq!((code, v["error"]["param"].as_str()), (400, Some(param)), "{messages}: {v}");
    }
    let user = json!([{"role": "user", "content": "hi"}]);
    for (tools, param) in [
        (json!([{"type": "function", "function": {"name": 5}}]), "tools[0].function.name"),
        (json!([{"type": "function"}]), "tools[0].function"),
        (json!({"name": "f"}), "tools"),
    ] {
        let (code, v) = post(&chat, json!({"messages": user, "tools": tools, "max_tokens": 2}));
        assert_eq!((code, v["error"]["param"].as_str()), (400, Some(param)), "{tools}: {v}");
    }
    // /tokenize validates chats the same way.
    let (code, v) = post(&format!("{base}/tokenize"), json!({"messages": [{"role": "wizard", "content": "x"}]}));
    assert_eq!((code, v["error"]["param"].as_str()), (400, Some("messages[0].role")), "{v}");
    // Content parts are joined, not dropped.
    let (code, v) = post(
        &format!("{base}/tokenize"),
        json!({"messages": [{"role": "user", "content": [{"type": "text", "text": "fn"}, {"type": "text", "text": "main"}]}]}),
    );
    let (_, w) = post(&format!("{base}/tokenize"), json!({"messages": [{"role": "user", "content": "fn\nmain"}]}));
    assert_eq!((code, &v["tokens"]), (200, &w["tokens"]));
    assert_eq!(ureq::get(&format!("{base}/health")).call().unwrap().status(), 200);
}

#[test]
fn unknown_routes_oversized_requests_and_slow_clients_get_json_errors_and_deadlines() {
    let base = start(ServeOptions { http: limits(), ..ServeOptions::default() });
    let wait = Duration::from_secs(5);
    assert_openai_error("404", 404, raw(&base, &request("GET", "/v1/nothing", "", ""), wait));
    assert_openai_error("405", 405, raw(&base, &request("GET", "/v1/completions", "", ""), wait));
    // A body declared over the 4 MB cap is refused before it is read (the client sends a little
    // of it: were it to keep writing, the server's close could reset the connection first).
    let big = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5000000\r\n\r\n{\"prompt\": \"aaaa";
    assert_openai_error("413", 413, raw(&base, big, wait));
    // On Anthropic's endpoint the same refusal has Anthropic's shape.
    let big = b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Length: 5000000\r\n\r\n{\"max_tokens\": 4";
    let (code, _, e) = raw(&base, big, wait);
    assert_eq!(
        (code, e["type"].as_str(), e["error"]["type"].as_str()),
        (413, Some("error"), Some("request_too_large")),
        "{e}"
    );
    let path = format!("/v1/completions?x={}", "a".repeat(9 << 10));
    assert_openai_error("414", 414, raw(&base, &request("POST", &path, "{}", ""), wait));
    let headers: String = (0..40).map(|i| format!("X-Pad-{i}: {}\r\n", "b".repeat(1000))).collect();
    assert_openai_error("431", 431, raw(&base, &request("POST", "/v1/completions", "{}", &headers), wait));

    // A body shorter than its Content-Length, and a chunked body never finished: 408 at the
    // body deadline (1 s here), not a connection held forever.
    let t = Instant::now();
    let short = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"prompt\":";
    assert_openai_error("short body", 408, raw(&base, short, wait));
    let chunked = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{\"pro\r\n";
    assert_openai_error("unterminated chunked body", 408, raw(&base, chunked, wait));
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());

    // Headers a byte at a time: the connection is closed at the header deadline.
    let mut s = TcpStream::connect(addr(&base)).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    let t = Instant::now();
    let mut closed = false;
    for b in b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Slow: ".iter().cycle().take(40) {
        if s.write_all(&[*b]).is_err() {
            closed = true;
            break;
        }
        let mut one = [0u8; 512];
        match s.read(&mut one) {
            Ok(0) => {
                closed = true;
                break;
            }
            Ok(_) => {
                closed = true; // an answer (hyper's 408) then close
                break;
            }
            Err(_) => {}
        }
    }
    assert!(closed && t.elapsed() < Duration::from_secs(4), "slow headers held the connection {:?}", t.elapsed());
    assert_eq!(ureq::get(&format!("{base}/health")).call().unwrap().status(), 200);
    assert!(metric(&base, "dsv3_request_errors_total") >= 7.0);
}

#[test]
fn idle_connections_beyond_the_limit_wait_and_are_closed_at_the_deadline() {
    let base = start(ServeOptions { http: HttpLimits { max_connections: 2, ..limits() }, ..ServeOptions::default() });
    // Two silent connections take both slots; a third client waits until the header deadline
    // frees one (1 s), then is served.
    let _a = TcpStream::connect(addr(&base)).unwrap();
    let _b = TcpStream::connect(addr(&base)).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let t = Instant::now();
    assert_eq!(ureq::get(&format!("{base}/health")).call().unwrap().status(), 200);
    let waited = t.elapsed();
    assert!(waited >= Duration::from_millis(500) && waited < Duration::from_secs(5), "{waited:?}");
}

#[test]
fn the_key_guards_the_api_and_metrics_and_gauges_fall_to_zero_when_idle() {
    let base = start(ServeOptions { api_key: Some("sesame".into()), http: limits(), ..ServeOptions::default() });
    let wait = Duration::from_secs(5);
    let body = r#"{"prompt": "fn", "max_tokens": 4}"#;
    assert_openai_error("no key", 401, raw(&base, &request("POST", "/v1/completions", body, ""), wait));
    let wrong = "Authorization: Bearer sesamf\r\n";
    assert_openai_error("wrong key", 401, raw(&base, &request("POST", "/v1/completions", body, wrong), wait));
    assert_openai_error("metrics without key", 401, raw(&base, &request("GET", "/metrics", "", ""), wait));
    assert_eq!(raw(&base, &request("GET", "/health", "", ""), wait).0, 200, "health stays open");
    let key = "Authorization: Bearer sesame\r\n";
    assert_eq!(raw(&base, &request("POST", "/v1/completions", body, key), wait).0, 200);
    let metrics = |name: &str| {
        let mut s = TcpStream::connect(addr(&base)).unwrap();
        s.write_all(&request("GET", "/metrics", "", key)).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out.lines().find_map(|l| l.strip_prefix(&format!("{name} "))).and_then(|v| v.parse::<f64>().ok()).unwrap()
    };
    for _ in 0..40 {
        if metrics("dsv3_batch_size") == 0.0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!((metrics("dsv3_batch_size"), metrics("dsv3_kv_cache_tokens")), (0.0, 0.0));
}

#[test]
fn a_full_queue_says_when_to_retry() {
    let base = start(ServeOptions { max_batch: 1, max_queue: 1, http: limits(), ..ServeOptions::default() });
    let url = format!("{base}/v1/completions");
    let handles: Vec<_> = (0..8)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || match ureq::post(&url).send_json(json!({"prompt": "fn", "max_tokens": 60})) {
                Ok(r) => (r.status(), None),
                Err(ureq::Error::Status(c, r)) => (c, r.header("retry-after").map(str::to_string)),
                Err(e) => panic!("{e}"),
            })
        })
        .collect();
    let answers: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
    assert!(answers.iter().any(|a| a.0 == 429), "{answers:?}");
    assert!(answers.iter().filter(|a| a.0 == 429).all(|a| a.1.as_deref() == Some("1")), "{answers:?}");
    settled(&base, "dsv3_batch_size", 0.0);
}
