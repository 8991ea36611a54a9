//! DeepSeek-V3.2's chat encoding (spec deepseek-v32-v4.md §5.2): the release ships Python rules
//! (`encoding/encoding_dsv32.py`), not a Jinja template, with tool calls in DSML markup:
//!
//! ```text
//! <｜DSML｜function_calls>
//! <｜DSML｜invoke name="get_weather">
//! <｜DSML｜parameter name="city" string="true">Paris</｜DSML｜parameter>
//! </｜DSML｜invoke>
//! </｜DSML｜function_calls>
//! ```
//!
//! [`encode_messages`] renders a conversation as those rules do (thinking or chat mode, the
//! reasoning of turns before the last user message dropped); [`parse_tool_calls`] reads the
//! markup back into OpenAI `tool_calls`. JSON inside the prompt is written as Python's
//! `json.dumps(..., ensure_ascii=False)` writes it (`", "` and `": "`, keys in their order).

use crate::error::{ModelError, Result};
use serde_json::{json, Value};

pub const BOS: &str = "<｜begin▁of▁sentence｜>";
pub const EOS: &str = "<｜end▁of▁sentence｜>";
const DSML: &str = "｜DSML｜";
const THINK: &str = "<think>";
const THINK_END: &str = "</think>";

fn tools_block(tools: &[Value]) -> String {
    let schemas: Vec<String> = tools.iter().map(py_json).collect();
    format!(
        "## Tools\nYou have access to a set of tools you can use to answer the user's question.\n\
You can invoke functions by writing a \"<{DSML}function_calls>\" block like the following as part of your reply to the user:\n\
<{DSML}function_calls>\n<{DSML}invoke name=\"$FUNCTION_NAME\">\n\
<{DSML}parameter name=\"$PARAMETER_NAME\" string=\"true|false\">$PARAMETER_VALUE</{DSML}parameter>\n...\n</{DSML}invoke>\n\
<{DSML}invoke name=\"$FUNCTION_NAME2\">\n...\n</{DSML}invoke>\n</{DSML}function_calls>\n\
String and scalar parameters should be specified as is without any escaping or quotes, while lists and objects should use JSON format. \
The \"string\" attribute should be set to \"true\" for string type parameters and \"false\" for other types (numbers, booleans, arrays, objects).\n\
If the thinking_mode is enabled, then after function results you should strongly consider outputting a thinking block. Here is an example:\n\
<{DSML}function_calls>\n...\n</{DSML}function_calls>\n<function_results>\n...\n</function_results>\n\
{THINK}...thinking about results{THINK_END}\n\
Here are the functions available in JSONSchema format:\n<functions>\n{}\n</functions>\n",
        schemas.join("\n")
    )
}

fn response_format_block(format: &Value) -> String {
    format!("## Response Format:\n\nYou MUST strictly adhere to the following schema to reply:\n{}", py_json(format))
}

/// The request's `tools` (OpenAI function specs) and `response_format` on the conversation's system
/// message, where the rules read them (a system message is put first when there is none).
pub fn with_request_tools(messages: &[Value], tools: Option<&Value>, response_format: Option<&Value>) -> Vec<Value> {
    let mut out = messages.to_vec();
    if tools.is_none() && response_format.is_none() {
        return out;
    }
    if out.first().and_then(|m| m.get("role")).and_then(Value::as_str) != Some("system") {
        out.insert(0, json!({"role": "system", "content": ""}));
    }
    if let Some(t) = tools {
        out[0]["tools"] = t.clone();
    }
    if let Some(f) = response_format {
        out[0]["response_format"] = f.clone();
    }
    out
}

fn bad(i: usize, msg: impl std::fmt::Display) -> ModelError {
    ModelError::Template(format!("messages[{i}]: {msg}"))
}

fn text<'a>(m: &'a Value, key: &str) -> &'a str {
    m.get(key).and_then(Value::as_str).unwrap_or("")
}

/// The OpenAI `tools` list's function specs.
fn functions(i: usize, tools: &Value) -> Result<Vec<Value>> {
    let list = tools.as_array().ok_or_else(|| bad(i, "tools must be a list"))?;
    list.iter().map(|t| t.get("function").cloned().ok_or_else(|| bad(i, "a tool without `function`"))).collect()
}

/// One tool call as DSML: its arguments (a JSON object, as a string or an object) as
/// parameters, strings raw and everything else as JSON.
fn invoke(i: usize, call: &Value) -> Result<String> {
    let f = call.get("function").ok_or_else(|| bad(i, "a tool call without `function`"))?;
    let name = f.get("name").and_then(Value::as_str).ok_or_else(|| bad(i, "a tool call without a name"))?;
    let args: Value = match f.get("arguments") {
        Some(Value::String(s)) => {
            serde_json::from_str(s).map_err(|e| bad(i, format!("tool call `{name}`: arguments are not JSON: {e}")))?
        }
        Some(v) => v.clone(),
        None => json!({}),
    };
    let obj = args.as_object().ok_or_else(|| bad(i, format!("tool call `{name}`: arguments must be an object")))?;
    let params: Vec<String> = obj
        .iter()
        .map(|(k, v)| {
            let (is_str, value) = match v {
                Value::String(s) => ("true", s.clone()),
                other => ("false", py_json(other)),
            };
            format!("<{DSML}parameter name=\"{k}\" string=\"{is_str}\">{value}</{DSML}parameter>")
        })
        .collect();
    Ok(format!("<{DSML}invoke name=\"{name}\">\n{}\n</{DSML}invoke>", params.join("\n")))
}

/// A conversation as DeepSeek-V3.2's rules render it (`encode_messages(messages, thinking_mode,
/// drop_thinking=True, add_default_bos_token=True)`). There is no separate generation prompt:
/// a user message already ends with `<｜Assistant｜>` and `<think>` (the last one, in thinking
/// mode) or `</think>`.
pub fn encode_messages(messages: &[Value], thinking: bool) -> Result<String> {
    let last_user =
        messages.iter().rposition(|m| matches!(m.get("role").and_then(Value::as_str), Some("user" | "developer")));
    let after_last_user = |i: usize| last_user.is_none_or(|u| i > u);
    let mut out = String::from(BOS);
    for (i, m) in messages.iter().enumerate() {
        let role = m.get("role").and_then(Value::as_str).ok_or_else(|| bad(i, "no role"))?;
        let extras = |out: &mut String| -> Result<()> {
            if let Some(t) = m.get("tools").filter(|t| !t.is_null()) {
                out.push_str("\n\n");
                out.push_str(&tools_block(&functions(i, t)?));
            }
            if let Some(f) = m.get("response_format").filter(|f| !f.is_null()) {
                out.push_str("\n\n");
                out.push_str(&response_format_block(f));
            }
            Ok(())
        };
        let think_or_not = |open: bool| if open { THINK } else { THINK_END };
        match role {
            "system" => {
                out.push_str(text(m, "content"));
                extras(&mut out)?;
            }
            "user" | "developer" => {
                let mut c = String::new();
                if role == "developer" {
                    extras(&mut c)?;
                    c.push_str(&format!("\n\n# The user's message is: {}", text(m, "content")));
                } else {
                    c.push_str(text(m, "content"));
                }
                out.push_str(&format!("<｜User｜>{c}<｜Assistant｜>"));
                out.push_str(think_or_not(thinking && Some(i) == last_user));
            }
            "assistant" => {
                if thinking && after_last_user(i) {
                    let reasoning = m.get("reasoning_content").or_else(|| m.get("reasoning")).and_then(Value::as_str);
                    let calls = m.get("tool_calls").and_then(Value::as_array).is_some_and(|c| !c.is_empty());
                    if reasoning.is_none() && !calls {
                        return Err(bad(i, "in thinking mode an answer after the last user message needs reasoning_content or tool_calls"));
                    }
                    out.push_str(reasoning.unwrap_or(""));
                    out.push_str(THINK_END);
                }
                out.push_str(text(m, "content"));
                if let Some(calls) = m.get("tool_calls").and_then(Value::as_array).filter(|c| !c.is_empty()) {
                    let invokes: Vec<String> = calls.iter().map(|c| invoke(i, c)).collect::<Result<_>>()?;
                    out.push_str(&format!(
                        "\n\n<{DSML}function_calls>\n{}\n</{DSML}function_calls>",
                        invokes.join("\n")
                    ));
                }
                out.push_str(EOS);
            }
            "tool" => {
                // Its place among the answers to the assistant turn before the run of tool messages.
                let first = (0..i).rev().find(|&j| messages[j].get("role").and_then(Value::as_str) != Some("tool"));
                let Some(a) = first.filter(|&j| messages[j].get("role").and_then(Value::as_str) == Some("assistant"))
                else {
                    return Err(bad(i, "a tool result not after an assistant's tool calls"));
                };
                let n_calls = messages[a].get("tool_calls").and_then(Value::as_array).map_or(0, Vec::len);
                let order = i - a;
                if order > n_calls {
                    return Err(bad(i, format!("{order} tool results for {n_calls} tool calls")));
                }
                if order == 1 {
                    out.push_str("\n\n<function_results>");
                }
                out.push_str(&format!("\n<result>{}</result>", text(m, "content")));
                if order == n_calls {
                    out.push_str("\n</function_results>\n\n");
                    out.push_str(think_or_not(thinking && last_user.is_none_or(|u| i >= u)));
                }
            }
            other => return Err(bad(i, format!("role `{other}` is not system, user, developer, assistant or tool"))),
        }
    }
    Ok(out)
}

/// DSML tool calls in generated text → `(content before them, OpenAI tool_calls)`; `None`
/// without a `<｜DSML｜function_calls>` block or when the block is malformed. String parameters
/// become JSON strings, the others are taken as the JSON they are.
pub fn parse_tool_calls(text: &str) -> Option<(String, Vec<Value>)> {
    let open = format!("<{DSML}function_calls>");
    let start = text.find(&open)?;
    let content = text[..start].trim_end().to_string();
    let body = &text[start + open.len()..];
    let body = body.split(&format!("</{DSML}function_calls>")).next()?;
    let invoke_open = format!("<{DSML}invoke name=\"");
    let mut calls = vec![];
    for (n, part) in body.split(&invoke_open).skip(1).enumerate() {
        let (name, rest) = part.split_once("\">")?;
        let rest = rest.split(&format!("</{DSML}invoke>")).next()?;
        let mut args = vec![];
        let param_open = format!("<{DSML}parameter name=\"");
        for p in rest.split(&param_open).skip(1) {
            let (key, p) = p.split_once("\" string=\"")?;
            let (is_str, p) = p.split_once("\">")?;
            let value = p.split(&format!("</{DSML}parameter>")).next()?;
            let value = match is_str {
                "true" => Value::String(value.to_string()).to_string(),
                "false" => value.to_string(),
                _ => return None,
            };
            args.push(format!("{}: {value}", Value::String(key.to_string())));
        }
        let arguments = format!("{{{}}}", args.join(", "));
        calls.push(
            json!({"id": format!("call_{n}"), "type": "function", "function": {"name": name, "arguments": arguments}}),
        );
    }
    (!calls.is_empty()).then_some((content, calls))
}

/// `v` as Python's `json.dumps(v, ensure_ascii=False)` writes it.
pub fn py_json(v: &Value) -> String {
    struct Py;
    impl serde_json::ser::Formatter for Py {
        fn begin_array_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W, first: bool) -> std::io::Result<()> {
            if first {
                Ok(())
            } else {
                w.write_all(b", ")
            }
        }
        fn begin_object_key<W: ?Sized + std::io::Write>(&mut self, w: &mut W, first: bool) -> std::io::Result<()> {
            if first {
                Ok(())
            } else {
                w.write_all(b", ")
            }
        }
        fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
            w.write_all(b": ")
        }
    }
    let mut buf = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(&mut buf, Py);
    serde::Serialize::serialize(v, &mut ser).expect("a JSON value serializes");
    String::from_utf8(buf).expect("JSON is UTF-8")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conversation() -> (Vec<Value>, Value) {
        let tools = json!([{"type": "function", "function": {"name": "get_weather", "description": "Get the current weather for a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]);
        let messages = vec![
            json!({"role": "system", "content": "You are a helpful assistant."}),
            json!({"role": "user", "content": "What's the weather in Paris?"}),
            json!({"role": "assistant", "content": "", "reasoning_content": "They want the weather.",
                   "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]}),
            json!({"role": "tool", "content": "{\"temp_c\": 18}"}),
            json!({"role": "assistant", "content": "It is 18°C in Paris."}),
            json!({"role": "user", "content": "Thanks!"}),
        ];
        (messages, tools)
    }

    /// The rules' own example (spec §5.2): thinking mode, the earlier turn's reasoning dropped;
    /// chat mode differs only in the last token.
    #[test]
    fn renders_the_reference_example() {
        let (messages, tools) = conversation();
        let messages = with_request_tools(&messages, Some(&tools), None);
        let schema = r#"{"name": "get_weather", "description": "Get the current weather for a city.", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}"#;
        let want = format!(
            "<｜begin▁of▁sentence｜>You are a helpful assistant.\n\n{}<｜User｜>What's the weather in Paris?<｜Assistant｜></think>\n\n\
<｜DSML｜function_calls>\n<｜DSML｜invoke name=\"get_weather\">\n<｜DSML｜parameter name=\"city\" string=\"true\">Paris</｜DSML｜parameter>\n\
</｜DSML｜invoke>\n</｜DSML｜function_calls><｜end▁of▁sentence｜>\n\n<function_results>\n<result>{{\"temp_c\": 18}}</result>\n</function_results>\n\n\
</think>It is 18°C in Paris.<｜end▁of▁sentence｜><｜User｜>Thanks!<｜Assistant｜><think>",
            tools_block(&[serde_json::from_str(schema).unwrap()])
        );
        assert!(tools_block(&[]).ends_with("<functions>\n\n</functions>\n"));
        assert!(want.contains(schema));
        let got = encode_messages(&messages, true).unwrap();
        assert_eq!(got, want);
        let chat = encode_messages(&messages, false).unwrap();
        assert_eq!(chat, format!("{}</think>", want.strip_suffix("<think>").unwrap()));
    }

    #[test]
    fn thinking_after_the_last_user_and_bad_conversations() {
        let m = vec![
            json!({"role": "user", "content": "1+1=?"}),
            json!({"role": "assistant", "content": "2", "reasoning_content": "easy"}),
        ];
        assert_eq!(
            encode_messages(&m, true).unwrap(),
            "<｜begin▁of▁sentence｜><｜User｜>1+1=?<｜Assistant｜><think>easy</think>2<｜end▁of▁sentence｜>"
        );
        assert_eq!(
            encode_messages(&m, false).unwrap(),
            "<｜begin▁of▁sentence｜><｜User｜>1+1=?<｜Assistant｜></think>2<｜end▁of▁sentence｜>"
        );
        let no_reasoning = [m[0].clone(), json!({"role": "assistant", "content": "2"})];
        assert!(encode_messages(&no_reasoning, true).unwrap_err().to_string().contains("messages[1]"));
        let orphan = [json!({"role": "user", "content": "x"}), json!({"role": "tool", "content": "y"})];
        assert!(encode_messages(&orphan, false).unwrap_err().to_string().contains("messages[1]"));
        let bad_args = [
            json!({"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": "{"}}]}),
        ];
        assert!(encode_messages(&bad_args, false).unwrap_err().to_string().contains("not JSON"));
    }

    #[test]
    fn tool_calls_parse_back() {
        let text = "Checking.\n\n<｜DSML｜function_calls>\n<｜DSML｜invoke name=\"get_weather\">\n\
<｜DSML｜parameter name=\"city\" string=\"true\">Paris \"Nord\"</｜DSML｜parameter>\n\
<｜DSML｜parameter name=\"days\" string=\"false\">[1, 2]</｜DSML｜parameter>\n</｜DSML｜invoke>\n\
<｜DSML｜invoke name=\"now\">\n\n</｜DSML｜invoke>\n</｜DSML｜function_calls><｜end▁of▁sentence｜>";
        let (content, calls) = parse_tool_calls(text).unwrap();
        assert_eq!(content, "Checking.");
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0]["function"]["name"], "get_weather");
        let args: Value = serde_json::from_str(calls[0]["function"]["arguments"].as_str().unwrap()).unwrap();
        assert_eq!(args, json!({"city": "Paris \"Nord\"", "days": [1, 2]}));
        assert_eq!(calls[1]["function"]["arguments"], "{}");
        assert!(parse_tool_calls("no calls here").is_none());
    }
}
