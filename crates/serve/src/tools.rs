//! DeepSeek tool-call markup in generated text → OpenAI `tool_calls`.
//!
//! V3/R1: `<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\n```json\nARGS\n```<｜tool▁call▁end｜>…<｜tool▁calls▁end｜>`;
//! V3.1: `<｜tool▁call▁begin｜>NAME<｜tool▁sep｜>ARGS<｜tool▁call▁end｜>`;
//! V3.2: DSML `<｜DSML｜function_calls>` blocks ([`dsv3_model::dsml::parse_tool_calls`]).

use serde_json::{json, Value};

const CALLS_BEGIN: &str = "<｜tool▁calls▁begin｜>";
const CALL_BEGIN: &str = "<｜tool▁call▁begin｜>";
const CALL_END: &str = "<｜tool▁call▁end｜>";
const SEP: &str = "<｜tool▁sep｜>";

/// Splits text into the content before the tool calls and the calls (OpenAI shape). `None` when
/// the text has no tool-call markup.
pub fn parse_tool_calls(text: &str) -> Option<(String, Vec<Value>)> {
    if let Some(found) = dsv3_model::dsml::parse_tool_calls(text) {
        return Some(found);
    }
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
    }
}
