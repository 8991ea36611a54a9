//! What evaluation harnesses and clients send beyond the basics (issue 18): echoed prompts with
//! their log-probs (checked against the model's own forward), batched prompts, `n`, the penalties
//! and `logit_bias`, `min_tokens`, stop token ids, vLLM's `prompt_logprobs`.

mod common;

use common::{fixture, post, start};
use dsv3_model::sampling::log_prob;
use dsv3_model::DeepseekV3;
use dsv3_serve::ServeOptions;
use serde_json::{json, Value};

/// The log-prob of each prompt token after the first under the model itself.
fn reference_logprobs(prompt: &[u32]) -> Vec<f32> {
    let model = DeepseekV3::load(&fixture()).unwrap();
    let mut cache = model.new_cache();
    let h = model.forward(prompt, &mut cache).unwrap();
    let logits = model.logits(&h, prompt.len());
    let v = model.config.vocab_size;
    (1..prompt.len()).map(|i| log_prob(&logits[(i - 1) * v..i * v], prompt[i] as usize)).collect()
}

fn ids(v: &Value) -> Vec<u64> {
    v["token_ids"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect()
}

/// SSE `data:` payloads up to `[DONE]`.
fn events(url: &str, body: Value) -> Vec<Value> {
    let text = ureq::post(url).send_json(body).unwrap().into_string().unwrap();
    let mut out = vec![];
    for line in text.lines().filter_map(|l| l.strip_prefix("data: ")) {
        if line == "[DONE]" {
            return out;
        }
        out.push(serde_json::from_str(line).unwrap());
    }
    panic!("no [DONE] in the stream: {text}");
}

#[test]
fn echo_scores_the_prompt_like_the_model() {
    let base = start(ServeOptions::default());
    let url = format!("{base}/v1/completions");
    let prompt: Vec<u32> = vec![2, 40, 41, 77, 12, 90, 5, 200, 17];
    let want = reference_logprobs(&prompt);
    // lm-evaluation-harness's request: ids, echo, logprobs, max_tokens 0 (scoring only).
    let (code, v) =
        post(&url, json!({"prompt": prompt, "echo": true, "logprobs": 1, "max_tokens": 0, "temperature": 0}));
    assert_eq!(code, 200, "{v}");
    let c = &v["choices"][0];
    let lp = &c["logprobs"];
    let got = lp["token_logprobs"].as_array().unwrap();
    assert_eq!(got.len(), prompt.len());
    assert!(got[0].is_null(), "nothing predicts the first token");
    for (i, (g, w)) in got[1..].iter().zip(&want).enumerate() {
        let g = g.as_f64().unwrap() as f32;
        assert!((g - w).abs() < 1e-4, "token {}: served {g} vs model {w}", i + 1);
    }
    // The top alternative is at least as likely as the prompt's token; offsets rise.
    for (t, top) in got[1..].iter().zip(&lp["top_logprobs"].as_array().unwrap()[1..]) {
        let best = top.as_object().unwrap().values().map(|x| x.as_f64().unwrap()).fold(f64::MIN, f64::max);
        assert!(best >= t.as_f64().unwrap() - 1e-6);
    }
    let offs: Vec<u64> = lp["text_offset"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect();
    assert!(offs.windows(2).all(|w| w[0] <= w[1]) && offs[0] == 0, "{offs:?}");
    assert_eq!(c["finish_reason"], "length");
    assert_eq!(v["usage"]["completion_tokens"], 0);
    assert_eq!(v["usage"]["prompt_tokens"], prompt.len());

    // max_tokens 1 (lm-eval's other form): the prompt's entries, then the new token's, which
    // equals the plain request's.
    let (_, one) =
        post(&url, json!({"prompt": prompt, "echo": true, "logprobs": 2, "max_tokens": 1, "temperature": 0}));
    let (_, plain) = post(&url, json!({"prompt": prompt, "logprobs": 2, "max_tokens": 1, "temperature": 0}));
    let e = &one["choices"][0]["logprobs"]["token_logprobs"];
    assert_eq!(e.as_array().unwrap().len(), prompt.len() + 1);
    assert_eq!(e[prompt.len()], plain["choices"][0]["logprobs"]["token_logprobs"][0]);
    let (text, plain_text) =
        (one["choices"][0]["text"].as_str().unwrap(), plain["choices"][0]["text"].as_str().unwrap());
    assert!(text.ends_with(plain_text) && text.len() > plain_text.len(), "{text:?} / {plain_text:?}");

    // Streamed, the echo comes first with its log-probs; the pieces add up to the whole.
    let chunks = events(
        &url,
        json!({"prompt": prompt, "echo": true, "logprobs": 1, "max_tokens": 3, "temperature": 0, "stream": true}),
    );
    let (_, whole) =
        post(&url, json!({"prompt": prompt, "echo": true, "logprobs": 1, "max_tokens": 3, "temperature": 0}));
    let text: String = chunks.iter().map(|c| c["choices"][0]["text"].as_str().unwrap()).collect();
    assert_eq!(text, whole["choices"][0]["text"]);
    let streamed: Vec<Value> = chunks
        .iter()
        .filter(|c| !c["choices"][0]["logprobs"].is_null())
        .flat_map(|c| c["choices"][0]["logprobs"]["token_logprobs"].as_array().unwrap().clone())
        .collect();
    assert_eq!(&Value::from(streamed), &whole["choices"][0]["logprobs"]["token_logprobs"]);

    // vLLM's prompt_logprobs, on completions (per choice) and chat (per response).
    let (_, v) = post(&url, json!({"prompt": prompt, "prompt_logprobs": 0, "max_tokens": 1}));
    let pl = v["choices"][0]["prompt_logprobs"].as_array().unwrap();
    assert!(pl[0].is_null() && pl.len() == prompt.len());
    let entry = &pl[1][prompt[1].to_string()];
    assert!((entry["logprob"].as_f64().unwrap() as f32 - want[0]).abs() < 1e-4, "{entry}");
    assert!(entry["rank"].as_u64().unwrap() >= 1);
    let (code, v) = post(
        &format!("{base}/v1/chat/completions"),
        json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "prompt_logprobs": 2}),
    );
    assert_eq!(code, 200, "{v}");
    assert!(v["prompt_logprobs"][0].is_null() && v["prompt_logprobs"].as_array().unwrap().len() > 2);

    // Scoring needs echo or prompt_logprobs.
    let (code, _) = post(&url, json!({"prompt": prompt, "max_tokens": 0}));
    assert_eq!(code, 400);
}

#[test]
fn prompt_lists_and_n_give_one_choice_each() {
    let base = start(ServeOptions { max_batch: 8, ..ServeOptions::default() });
    let url = format!("{base}/v1/completions");
    let greedy = |p: Value| post(&url, json!({"prompt": p, "max_tokens": 6, "temperature": 0})).1;
    let (a, b) = (vec![5u32, 6, 7], vec![9u32, 30, 31, 32]);
    let (_, v) = post(&url, json!({"prompt": [a, b], "max_tokens": 6, "temperature": 0}));
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 2);
    assert_eq!(ids(&choices[0]), ids(&greedy(json!(a))["choices"][0]));
    assert_eq!(ids(&choices[1]), ids(&greedy(json!(b))["choices"][0]));
    assert_eq!((choices[0]["index"].as_u64(), choices[1]["index"].as_u64()), (Some(0), Some(1)));
    assert_eq!(v["usage"]["prompt_tokens"], 7);
    // A list of strings.
    let (_, v) = post(&url, json!({"prompt": ["fn main", "let x"], "max_tokens": 2, "temperature": 0}));
    assert_eq!(v["choices"].as_array().unwrap().len(), 2);

    // n samples: choice j is the single request seeded seed + j; they differ at temperature 1.5.
    let body =
        |n: usize, seed: u64| json!({"prompt": "pub fn", "max_tokens": 8, "temperature": 1.5, "n": n, "seed": seed});
    let (_, v) = post(&url, body(3, 40));
    let choices = v["choices"].as_array().unwrap();
    assert_eq!(choices.len(), 3);
    for (j, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], j);
        assert_eq!(ids(c), ids(&post(&url, body(1, 40 + j as u64)).1["choices"][0]), "choice {j}");
    }
    let distinct: std::collections::HashSet<Vec<u64>> = choices.iter().map(ids).collect();
    assert!(distinct.len() >= 2, "three samples at temperature 1.5 were identical");
    assert_eq!(v["usage"]["completion_tokens"], 24);

    // Streamed with n = 2 (greedy): each index's pieces add up to its whole text.
    let chunks = events(&url, json!({"prompt": "pub fn", "max_tokens": 5, "temperature": 0, "n": 2, "stream": true}));
    let (_, whole) = post(&url, json!({"prompt": "pub fn", "max_tokens": 5, "temperature": 0, "n": 2}));
    for j in 0..2u64 {
        let text: String = chunks
            .iter()
            .flat_map(|c| c["choices"].as_array().unwrap().clone())
            .filter(|c| c["index"] == j)
            .map(|c| c["text"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(text, whole["choices"][j as usize]["text"], "choice {j}");
    }
    // stream_options.include_usage: a last chunk with no choices and the usage of all of them.
    let chunks = events(
        &url,
        json!({"prompt": "pub fn", "max_tokens": 5, "temperature": 0, "n": 2, "stream": true, "stream_options": {"include_usage": true}}),
    );
    let last = chunks.last().unwrap();
    assert_eq!(last["choices"], json!([]));
    assert_eq!(
        (last["usage"]["completion_tokens"].as_u64(), last["usage"]["prompt_tokens"].as_u64()),
        (Some(10), whole["usage"]["prompt_tokens"].as_u64())
    );
    assert!(chunks[..chunks.len() - 1].iter().all(|c| c.get("usage").is_none_or(Value::is_null)));
    for (body, what) in [(json!({"prompt": "x", "n": 0}), "n 0"), (json!({"prompt": "x", "n": 1000}), "n 1000")] {
        assert_eq!(post(&url, body).0, 400, "{what}");
    }
}

#[test]
fn sampling_controls_change_the_choice_as_defined() {
    let base = start(ServeOptions::default());
    let url = format!("{base}/v1/completions");
    let run = |extra: Value| {
        let mut b = json!({"prompt": [5, 6, 7, 8], "max_tokens": 12, "temperature": 0, "logprobs": 20});
        b.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        let (code, v) = post(&url, b);
        assert_eq!(code, 200, "{v}");
        v["choices"][0].clone()
    };
    let plain = run(json!({}));
    // logit_bias: +100 forces a token at every step; -100 on the greedy first token bans it.
    let forced = run(json!({"logit_bias": {"123": 100}}));
    assert!(ids(&forced).iter().all(|&t| t == 123), "{:?}", ids(&forced));
    let first = ids(&plain)[0];
    let banned = run(json!({"logit_bias": {first.to_string(): -100}}));
    assert_ne!(ids(&banned)[0], first);

    // Frequency and presence penalties: each greedy choice maximizes the raw log-prob minus the
    // penalty for the tokens generated so far (log-probs are reported before the adjustment).
    for (field, presence, frequency) in [("frequency_penalty", 0.0, 1.5), ("presence_penalty", 1.5, 0.0)] {
        let c = run(json!({ field: presence + frequency }));
        let chosen = ids(&c);
        assert_ne!(chosen, ids(&plain), "{field} 1.5 changed nothing");
        let mut counts = std::collections::HashMap::<String, f64>::new();
        let tokens = c["logprobs"]["tokens"].as_array().unwrap();
        for (i, top) in c["logprobs"]["top_logprobs"].as_array().unwrap().iter().enumerate() {
            let score = |tok: &str, lp: f64| {
                let n = counts.get(tok).copied().unwrap_or(0.0);
                lp - if n > 0.0 { presence } else { 0.0 } - frequency * n
            };
            let best =
                top.as_object().unwrap().iter().map(|(t, lp)| score(t, lp.as_f64().unwrap())).fold(f64::MIN, f64::max);
            let tok = tokens[i].as_str().unwrap();
            let got = score(tok, c["logprobs"]["token_logprobs"][i].as_f64().unwrap());
            assert!(got >= best - 1e-5, "{field} step {i}: chose {tok:?} at {got}, best {best}");
            *counts.entry(tok.to_string()).or_default() += 1.0;
        }
    }
    // The repetition penalty over the prompt and output: a large one avoids every prompt token.
    let rep = run(json!({"repetition_penalty": 50.0}));
    assert!(ids(&rep).iter().all(|t| ![5, 6, 7, 8].contains(t)), "{:?}", ids(&rep));

    // min_tokens: the end-of-sequence id (1 here) made certain by logit_bias is masked until then.
    let eos = run(json!({"logit_bias": {"1": 100}}));
    assert_eq!((ids(&eos), eos["finish_reason"].as_str()), (vec![1], Some("stop")));
    let late = run(json!({"logit_bias": {"1": 100}, "min_tokens": 5}));
    assert_eq!(ids(&late).len(), 6);
    assert_eq!((ids(&late)[5], late["finish_reason"].as_str()), (1, Some("stop")));

    // Stop token ids: generation ends at the first of them, whose text is not shown.
    let greedy_ids = ids(&plain);
    let stop = greedy_ids[3];
    let at = greedy_ids.iter().position(|&t| t == stop).unwrap();
    for body in [json!({"stop_token_ids": [stop]}), json!({"stop": [stop]})] {
        let c = run(body);
        assert_eq!(ids(&c), greedy_ids[..=at].to_vec());
        assert_eq!(c["finish_reason"], "stop");
    }
    // Out-of-range values are 400s naming the field.
    for (body, field) in [
        (json!({"prompt": [5], "logit_bias": {"999999": 1}}), "logit_bias"),
        (json!({"prompt": [5], "logit_bias": {"5": 500}}), "logit_bias"),
        (json!({"prompt": [5], "presence_penalty": 3}), "presence_penalty"),
        (json!({"prompt": [5], "repetition_penalty": 0}), "repetition_penalty"),
        (json!({"prompt": [5], "stop_token_ids": [999999]}), "stop_token_ids"),
        (json!({"prompt": [5], "max_tokens": 2, "min_tokens": 3}), "min_tokens"),
    ] {
        let (code, v) = post(&url, body);
        assert_eq!((code, v["error"]["param"].as_str()), (400, Some(field)), "{v}");
    }
}

#[test]
fn metrics_carry_the_vllm_names() {
    let base = start(ServeOptions::default());
    let url = format!("{base}/v1/completions");
    post(&url, json!({"prompt": [5, 6], "max_tokens": 4, "temperature": 0}));
    post(&url, json!({"prompt": [5, 6], "max_tokens": 4, "temperature": 0, "logit_bias": {"1": 100}}));
    let m = |name: &str| common::metric(&base, &format!("{name}{{model_name=\"fixture\"}}"));
    assert_eq!(m("vllm:generation_tokens_total"), common::metric(&base, "dsv3_generation_tokens_total"));
    assert_eq!(m("vllm:prompt_tokens_total"), 4.0);
    assert_eq!(common::settled(&base, "vllm:num_requests_running{model_name=\"fixture\"}", 0.0), 0.0);
    let usage = m("vllm:kv_cache_usage_perc");
    assert!((0.0..=1.0).contains(&usage), "{usage}");
    let text = ureq::get(&format!("{base}/metrics")).call().unwrap().into_string().unwrap();
    let line = |prefix: &str| {
        text.lines().find(|l| l.starts_with(prefix)).unwrap_or_else(|| panic!("{prefix} missing")).to_string()
    };
    assert!(line("vllm:request_success_total{finished_reason=\"length\"").ends_with(" 1"));
    assert!(line("vllm:request_success_total{finished_reason=\"stop\"").ends_with(" 1"));
    assert!(line("vllm:time_to_first_token_seconds_count{model_name=\"fixture\"}").ends_with(" 2"));
    assert!(text.contains("vllm:e2e_request_latency_seconds_bucket{le=\"+Inf\",model_name=\"fixture\"}"));
}

#[test]
fn the_chat_page_is_served_from_the_binary() {
    let base = start(ServeOptions { api_key: Some("k".into()), ..ServeOptions::default() });
    let r = ureq::get(&format!("{base}/")).call().unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.header("content-type").unwrap().starts_with("text/html"));
    assert!(r.header("content-security-policy").unwrap().contains("connect-src 'self'"));
    let html = r.into_string().unwrap();
    assert!(html.contains("/v1/chat/completions") && !html.contains("http://") && !html.contains("https://"));
    // The page needs no key; the API behind it still does.
    assert_eq!(post(&format!("{base}/v1/completions"), json!({"prompt": [5], "max_tokens": 1})).0, 401);
}
