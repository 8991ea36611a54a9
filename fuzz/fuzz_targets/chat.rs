//! Any JSON as a chat request's messages and tools, rendered with the real DeepSeek-V3 template
//! (`DSV3_TOKENIZER_DIR`, which scripts/fuzz.sh points at the fetched tokenizer): an error naming
//! a field, or a rendering; never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

fn tokenizer() -> &'static dsv3_model::Tokenizer {
    static TOK: OnceLock<dsv3_model::Tokenizer> = OnceLock::new();
    TOK.get_or_init(|| {
        let dir = std::env::var("DSV3_TOKENIZER_DIR").expect("DSV3_TOKENIZER_DIR: a folder with tokenizer.json and a chat template");
        dsv3_model::Tokenizer::from_dir(std::path::Path::new(&dir)).expect("the tokenizer loads")
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) else { return };
    let (messages, tools) = match &v {
        serde_json::Value::Object(o) => (o.get("messages").cloned().unwrap_or_default(), o.get("tools").cloned()),
        other => (other.clone(), None),
    };
    if let Ok(text) = tokenizer().apply_chat_template_with_tools(&messages, tools.as_ref(), true) {
        let _ = tokenizer().encode(&text, false);
    }
});
