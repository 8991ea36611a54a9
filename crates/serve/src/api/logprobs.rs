//! Log-probabilities in the shapes clients parse: the legacy completions object (`tokens`,
//! `token_logprobs`, `top_logprobs`, `text_offset`, as lm-evaluation-harness reads it), the chat
//! object (`content: [{token, logprob, bytes, top_logprobs}]`), and vLLM's `prompt_logprobs`.

use crate::engine::TokenOut;
use dsv3_model::Tokenizer;
use serde_json::{json, Map, Value};

/// A token's text as the logprob objects show it (special tokens kept).
pub(super) fn token_text(tok: Option<&Tokenizer>, id: u32) -> String {
    tok.and_then(|k| k.decode(&[id], false).ok()).unwrap_or_else(|| id.to_string())
}

/// The legacy completions `logprobs` object, built token by token. `text_offset` counts
/// characters of the choice's text up to each token (the tokens' texts summed, as vLLM does).
#[derive(Default)]
pub(super) struct Legacy {
    tokens: Vec<Value>,
    token_logprobs: Vec<Value>,
    top_logprobs: Vec<Value>,
    text_offset: Vec<Value>,
    offset: usize,
}

impl Legacy {
    /// The first token of an echoed prompt: nothing predicts it, so its log-probs are `null`.
    pub(super) fn push_first(&mut self, tok: Option<&Tokenizer>, id: u32) {
        self.push_text(token_text(tok, id), Value::Null, Value::Null);
    }

    pub(super) fn push(&mut self, tok: Option<&Tokenizer>, t: &TokenOut) {
        let mut top = Map::new();
        for &(i, l) in &t.top {
            top.entry(token_text(tok, i)).or_insert(json!(l));
        }
        self.push_text(token_text(tok, t.id), json!(t.logprob), Value::Object(top));
    }

    fn push_text(&mut self, text: String, logprob: Value, top: Value) {
        self.text_offset.push(json!(self.offset));
        self.offset += text.chars().count();
        self.tokens.push(json!(text));
        self.token_logprobs.push(logprob);
        self.top_logprobs.push(top);
    }

    pub(super) fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// The object, leaving an empty builder that continues the offsets.
    pub(super) fn take(&mut self) -> Value {
        json!({
            "tokens": std::mem::take(&mut self.tokens),
            "token_logprobs": std::mem::take(&mut self.token_logprobs),
            "top_logprobs": std::mem::take(&mut self.top_logprobs),
            "text_offset": std::mem::take(&mut self.text_offset),
        })
    }
}

/// One entry of a chat answer's `logprobs.content`.
pub(super) fn chat_entry(tok: Option<&Tokenizer>, t: &TokenOut) -> Value {
    let entry = |id: u32, l: f32| {
        let text = token_text(tok, id);
        json!({"token": text, "logprob": l, "bytes": text.as_bytes()})
    };
    let mut e = entry(t.id, t.logprob.unwrap_or(f32::NEG_INFINITY));
    e["top_logprobs"] = t.top.iter().map(|&(i, l)| entry(i, l)).collect();
    e
}

/// vLLM's `prompt_logprobs`: `null` for the first prompt token, then per token a map from token id
/// to `{logprob, rank, decoded_token}` holding the prompt's token and the top alternatives.
pub(super) fn vllm_prompt_logprobs(tok: Option<&Tokenizer>, toks: &[TokenOut]) -> Value {
    let mut out = vec![Value::Null];
    for t in toks {
        let mut m = Map::new();
        let rank_of_top = t.top.iter().position(|&(i, _)| i == t.id).map(|r| r + 1);
        let rank = t.rank.or(rank_of_top);
        m.insert(t.id.to_string(), json!({"logprob": t.logprob, "rank": rank, "decoded_token": token_text(tok, t.id)}));
        for (r, &(i, l)) in t.top.iter().enumerate() {
            m.entry(i.to_string())
                .or_insert_with(|| json!({"logprob": l, "rank": r + 1, "decoded_token": token_text(tok, i)}));
        }
        out.push(Value::Object(m));
    }
    Value::Array(out)
}
