//! Constrained decoding through llguidance (the grammar engine llama.cpp and vLLM can use): a
//! token trie over the model's vocabulary, built once on the first constrained request; per
//! request a matcher for a JSON schema (OpenAI's `response_format`, forced tool calls) that gives
//! the allowed-token mask before each choice and follows the chosen tokens.
//!
//! JSON is compact-with-spaces (`", "` and `": "`, Python's `json.dumps` style) with no free
//! whitespace: a model cannot loop on newlines inside a constrained answer (a known failure of
//! flexible-whitespace grammars). A schema's own `x-guidance` options win.

use dsv3_model::Tokenizer;
use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{self, InferenceCapabilities, TokEnv, TokRxInfo, TokTrie};
use llguidance::{Matcher, ParserFactory};
use serde_json::{json, Value};
use std::sync::Arc;

/// The parser factory for one model's vocabulary.
pub struct Grammars {
    factory: ParserFactory,
    vocab_size: usize,
}

impl Grammars {
    /// The trie over `vocab_size` ids (the model's; ids the tokenizer lacks have no bytes and are
    /// never allowed), with `eos` as the end a finished grammar allows.
    pub fn new(tok: &Tokenizer, vocab_size: usize, eos: u32) -> Result<Self, String> {
        let json = tok.to_json().map_err(|e| e.to_string())?;
        // The library asserts on malformed vocabularies; a bad tokenizer file is an error here.
        let bytes = std::panic::catch_unwind(|| llguidance::token_bytes_from_tokenizer_json(&json))
            .map_err(|_| "the tokenizer's vocabulary could not be read for the grammar engine".to_string())?
            .map_err(|e| format!("the tokenizer's vocabulary could not be read for the grammar engine: {e}"))?;
        let mut words = bytes;
        if words.len() > vocab_size {
            return Err(format!("the tokenizer has {} tokens, more than the model's {vocab_size}", words.len()));
        }
        words.resize(vocab_size, vec![]);
        let info = TokRxInfo::new(vocab_size as u32, eos);
        let trie = TokTrie::from(&info, &words);
        // Masks only (no fast-forwarded tokens), so the trie's greedy tokenization is enough.
        let env: TokEnv = Arc::new(toktrie::ApproximateTokEnv::new(trie));
        let caps = InferenceCapabilities { ff_tokens: false, backtrack: false, ..Default::default() };
        let slices = llguidance::earley::SlicedBiasComputer::general_slices();
        let mut factory = ParserFactory::new(&env, caps, &slices).map_err(|e| e.to_string())?;
        factory.quiet();
        Ok(Grammars { factory, vocab_size })
    }

    /// A matcher for `schema`, or the engine's reason it cannot take it (naming the keyword).
    pub fn json_schema(&self, schema: &Value) -> Result<Constraint, String> {
        let mut schema = schema.clone();
        if let Some(o) = schema.as_object_mut() {
            o.entry("x-guidance")
                .or_insert(json!({"whitespace_flexible": false, "item_separator": ", ", "key_separator": ": "}));
        } else if schema != json!(true) {
            return Err("the JSON schema must be an object".into());
        }
        let parser =
            self.factory.create_parser(TopLevelGrammar::from_json_schema(schema)).map_err(|e| e.to_string())?;
        let m = Matcher::new(Ok(parser));
        match m.get_error() {
            Some(e) => Err(e),
            None => Ok(Constraint { m, vocab_size: self.vocab_size, wait: None }),
        }
    }
}

/// One request's grammar state.
#[derive(Clone)]
pub struct Constraint {
    m: Matcher,
    vocab_size: usize,
    /// Thinking mode: the grammar starts after these ids (`</think>`); the tokens seen so far.
    wait: Option<(Vec<u32>, Vec<u32>)>,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("Constraint")
    }
}

/// The allowed next tokens.
pub struct Mask(toktrie::SimpleVob);

impl Mask {
    /// Sets every disallowed logit to −∞, 32 at a time (a JSON state allows few tokens: most
    /// words of the bitmap are zero).
    pub fn apply(&self, logits: &mut [f32]) {
        let words = self.0.as_slice();
        for (i, chunk) in logits.chunks_mut(32).enumerate() {
            match words.get(i).copied().unwrap_or(0) {
                u32::MAX => {}
                0 => chunk.fill(f32::NEG_INFINITY),
                w => {
                    for (b, l) in chunk.iter_mut().enumerate() {
                        if w & (1 << b) == 0 {
                            *l = f32::NEG_INFINITY;
                        }
                    }
                }
            }
        }
    }

    pub fn allows(&self, id: u32) -> bool {
        self.0.is_allowed(id)
    }
}

impl Constraint {
    /// Starts the grammar only after the model emitted `close` (the reasoning's end), so that a
    /// thinking model reasons freely and then answers in the grammar (vLLM's reasoning-aware
    /// structured output).
    pub fn after(mut self, close: Vec<u32>) -> Self {
        if !close.is_empty() {
            self.wait = Some((close, vec![]));
        }
        self
    }

    /// The tokens the grammar allows next (the end-of-sequence id once it is complete); `None`
    /// while it waits for the reasoning to end.
    pub fn mask(&mut self) -> Result<Option<Mask>, String> {
        if self.wait.is_some() {
            return Ok(None);
        }
        let v = self.m.compute_mask_or_eos().map_err(|e| e.to_string())?;
        if v.len() < self.vocab_size {
            return Err("the grammar mask is shorter than the vocabulary".into());
        }
        Ok(Some(Mask(v)))
    }

    /// Follows a chosen token.
    pub fn consume(&mut self, id: u32) -> Result<(), String> {
        if let Some((close, seen)) = &mut self.wait {
            seen.push(id);
            if seen.ends_with(close) {
                self.wait = None;
            }
            return Ok(());
        }
        self.m.consume_token(id).map_err(|e| e.to_string())
    }

    /// The grammar is complete and allows nothing more but the end.
    pub fn is_stopped(&self) -> bool {
        self.m.is_stopped()
    }
}

/// The schema that forces tool calls, as vLLM builds it: for a named function its parameters;
/// for `required` an array of one or more `{name, parameters}` objects over the offered tools.
pub fn tool_call_schema(tools: &Value, named: Option<&str>) -> Result<Value, String> {
    let list = tools.as_array().ok_or("tools must be a list")?;
    let params = |t: &Value| t["function"].get("parameters").cloned().unwrap_or(json!({"type": "object"}));
    if let Some(name) = named {
        let t = list
            .iter()
            .find(|t| t["function"]["name"].as_str() == Some(name))
            .ok_or_else(|| format!("tool_choice names {name:?}, which is not among the tools"))?;
        return Ok(params(t));
    }
    let one_of: Vec<Value> = list
        .iter()
        .map(|t| {
            json!({"type": "object", "properties": {"name": {"const": t["function"]["name"]}, "parameters": params(t)},
                "required": ["name", "parameters"], "additionalProperties": false})
        })
        .collect();
    if one_of.is_empty() {
        return Err("tool_choice \"required\" needs at least one tool".into());
    }
    Ok(json!({"type": "array", "minItems": 1, "items": {"anyOf": one_of}}))
}

/// The tool calls a forced answer encodes (OpenAI shape), given what forced it.
pub fn forced_tool_calls(text: &str, named: Option<&str>) -> Option<Vec<Value>> {
    let v: Value = serde_json::from_str(text.trim()).ok()?;
    let call = |i: usize, name: &Value, args: &Value| json!({"id": format!("call_{i}"), "type": "function", "function": {"name": name, "arguments": args.to_string()}});
    match named {
        Some(n) => Some(vec![call(0, &json!(n), &v)]),
        None => {
            let calls = v.as_array()?;
            Some(calls.iter().enumerate().map(|(i, c)| call(i, &c["name"], &c["parameters"])).collect())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn word_wise_masking_equals_the_bitwise_reference() {
        let n = 1000;
        let mut v = toktrie::SimpleVob::alloc(n);
        for i in (0..n).filter(|i| i % 7 == 0 || (64..96).contains(i) || *i == n - 1) {
            v.allow_token(i as u32);
        }
        let mask = Mask(v);
        let mut logits: Vec<f32> = (0..n).map(|i| i as f32).collect();
        mask.apply(&mut logits);
        for (i, l) in logits.iter().enumerate() {
            let want = if mask.allows(i as u32) { i as f32 } else { f32::NEG_INFINITY };
            assert_eq!(*l, want, "token {i}");
        }
    }
}
