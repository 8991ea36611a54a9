//! The chat-format table: which DeepSeek version's conventions a checkpoint follows (read from its
//! template and config), and the tool-call markup each writes, parsed into OpenAI `tool_calls`.
//!
//! | format | tool calls | reasoning |
//! |---|---|---|
//! | `deepseek_v3` | `<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\n```json\nARGS\n```<｜tool▁call▁end｜>…<｜tool▁calls▁end｜>` | none |
//! | `deepseek_r1` | as V3 | `<think>…</think>`, the prompt opening it in the later template |
//! | `deepseek_v31` | `<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>NAME<｜tool▁sep｜>ARGS<｜tool▁call▁end｜>…` | hybrid: the template's `thinking` flag ends the prompt in `<think>` or `</think>` |
//! | `deepseek_v32` | DSML `<｜DSML｜function_calls>` blocks ([`dsv3_model::dsml`]) | hybrid, as V3.1 |
//!
//! The reasoning split ([`crate::api`]'s splitter) follows the rendered prompt, so one rule serves
//! every row; a template the table does not know (`generic`) gets every parser in turn.

use serde_json::{json, Value};

/// A checkpoint's chat conventions (vLLM's parser names).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ChatFormat {
    V3,
    R1,
    V31,
    V32,
    #[default]
    Generic,
}

impl ChatFormat {
    /// A tokenizer's format (`Generic` without one).
    pub fn of(tok: Option<&dsv3_model::Tokenizer>) -> Self {
        tok.map_or(ChatFormat::Generic, |t| Self::detect(t.chat_template(), t.encodes_dsml()))
    }

    /// From the chat template's text (and whether the tokenizer encodes V3.2's DSML itself).
    pub fn detect(template: Option<&str>, dsml: bool) -> Self {
        let Some(t) = template else { return if dsml { ChatFormat::V32 } else { ChatFormat::Generic } };
        if t.contains("DSML") {
            ChatFormat::V32
        } else if t.contains("tool▁call▁begin") && t.contains("```json") {
            if t.contains("<think>") {
                ChatFormat::R1
            } else {
                ChatFormat::V3
            }
        } else if t.contains("tool▁call▁begin") {
            ChatFormat::V31
        } else if dsml {
            ChatFormat::V32
        } else {
            ChatFormat::Generic
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ChatFormat::V3 => "deepseek_v3",
            ChatFormat::R1 => "deepseek_r1",
            ChatFormat::V31 => "deepseek_v31",
            ChatFormat::V32 => "deepseek_v32",
            ChatFormat::Generic => "generic",
        }
    }

    /// The texts that open a tool-call block in this format's answers.
    pub fn call_starts(self) -> &'static [&'static str] {
        match self {
            ChatFormat::V3 | ChatFormat::R1 | ChatFormat::V31 => &[CALLS_BEGIN, CALL_BEGIN],
            ChatFormat::V32 => &[DSML_CALLS],
            ChatFormat::Generic => &[CALLS_BEGIN, CALL_BEGIN, DSML_CALLS],
        }
    }

    /// Splits an answer into the content before its tool calls and the calls.
    pub fn parse_tool_calls(self, text: &str) -> Option<(String, Vec<Value>)> {
        match self {
            ChatFormat::V32 => dsv3_model::dsml::parse_tool_calls(text),
            ChatFormat::V3 | ChatFormat::R1 | ChatFormat::V31 => parse_markup(text),
            ChatFormat::Generic => parse_tool_calls(text),
        }
    }
}

const DSML_CALLS: &str = "<｜DSML｜function_calls>";

const CALLS_BEGIN: &str = "<｜tool▁calls▁begin｜>";
const CALL_BEGIN: &str = "<｜tool▁call▁begin｜>";
const CALL_END: &str = "<｜tool▁call▁end｜>";
const SEP: &str = "<｜tool▁sep｜>";

/// Splits text into the content before the tool calls and the calls (OpenAI shape), trying every
/// format. `None` when the text has no tool-call markup.
pub fn parse_tool_calls(text: &str) -> Option<(String, Vec<Value>)> {
    dsv3_model::dsml::parse_tool_calls(text).or_else(|| parse_markup(text))
}

/// V3's and V3.1's markup (V3's arguments in a ```json fence).
fn parse_markup(text: &str) -> Option<(String, Vec<Value>)> {
    let start = text.find(CALLS_BEGIN).or_else(|| text.find(CALL_BEGIN))?;
    let content = text[..start].trim_end().to_string();
    let mut calls = vec![];
    for (i, part) in text[start..].split(CALL_BEGIN).skip(1).enumerate() {
        let body = part.split(CALL_END).next().unwrap_or(part);
        let (left, right) = body.split_once(SEP)?;
        let (name, args) = match right.split_once("```json") {
            Some((name, rest)) => (name.trim(), rest.rsplit_once("```").map_or(rest, |(a, _)| a).trim()),
            None => (left.trim(), right.trim()),
        };
        if name.is_empty() {
            return None;
        }
        calls.push(
            json!({"id": format!("call_{i}"), "type": "function", "function": {"name": name, "arguments": args}}),
        );
    }
    if calls.is_empty() {
        return None;
    }
    Some((content, calls))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v3_and_v31_markup() {
        let v3 = "Let me check.<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n{\"city\": \"Paris\"}\n```<｜tool▁call▁end｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_time\n```json\n{}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>";
        let (content, calls) = parse_tool_calls(v3).unwrap();
        assert_eq!(content, "Let me check.");
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0]["function"]["name"], "get_weather");
        assert_eq!(calls[0]["function"]["arguments"], "{\"city\": \"Paris\"}");
        assert_eq!(calls[1]["function"]["name"], "get_time");
        let v31 = "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>get_weather<｜tool▁sep｜>{\"city\":\"Rome\"}<｜tool▁call▁end｜><｜tool▁calls▁end｜>";
        let (content, calls) = parse_tool_calls(v31).unwrap();
        assert_eq!(content, "");
        assert_eq!(calls[0]["function"]["name"], "get_weather");
        assert_eq!(calls[0]["function"]["arguments"], "{\"city\":\"Rome\"}");
        assert!(parse_tool_calls("plain text").is_none());
        let v32 = "\n\n<｜DSML｜function_calls>\n<｜DSML｜invoke name=\"get_weather\">\n<｜DSML｜parameter name=\"city\" string=\"true\">Rome</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜function_calls>";
        let (content, calls) = parse_tool_calls(v32).unwrap();
        assert_eq!((content.as_str(), &calls[0]["function"]["arguments"]), ("", &json!("{\"city\": \"Rome\"}")));
        // Each format reads its own markup only.
        assert!(ChatFormat::V31.parse_tool_calls(v32).is_none());
        assert!(ChatFormat::V32.parse_tool_calls(v31).is_none());
        assert_eq!(ChatFormat::V32.parse_tool_calls(v32).unwrap().1.len(), 1);
    }

    #[test]
    fn formats_are_read_from_the_templates() {
        let v3 = "{{'<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\\n' + '```json' }}";
        assert_eq!(ChatFormat::detect(Some(v3), false), ChatFormat::V3);
        let r1 = format!("{v3}{{% if add_generation_prompt %}}{{{{'<｜Assistant｜><think>\\n'}}}}{{% endif %}}");
        assert_eq!(ChatFormat::detect(Some(&r1), false), ChatFormat::R1);
        let v31 = "{% if thinking %}<think>{% else %}</think>{% endif %}{{'<｜tool▁call▁begin｜>'+ tool['function']['name'] + '<｜tool▁sep｜>' }}";
        assert_eq!(ChatFormat::detect(Some(v31), false), ChatFormat::V31);
        assert_eq!(ChatFormat::detect(None, true), ChatFormat::V32);
        assert_eq!(ChatFormat::detect(Some("{{ m['content'] }}"), false), ChatFormat::Generic);
        assert_eq!(ChatFormat::V32.name(), "deepseek_v32");
    }
}
