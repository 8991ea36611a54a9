//! Chat messages and tools as clients send them (OpenAI's shapes), checked and normalized before a
//! template sees them. A Jinja template renders whatever it is given — an unknown role is silently
//! dropped, a `null` content becomes "None" — so the checks happen here, each error naming the
//! message index and field.

use crate::error::{ModelError, Result};
use serde_json::{json, Map, Value};

/// The roles a template that names none is assumed to handle.
const DEFAULT_ROLES: [&str; 4] = ["system", "user", "assistant", "tool"];

fn bad(field: String, msg: impl Into<String>) -> ModelError {
    ModelError::Chat { field, msg: msg.into() }
}

/// The roles a chat template tests for (`message['role'] == 'user'`, `message.role in [...]`), or
/// the usual four when it names none.
pub fn template_roles(template: &str) -> Vec<String> {
    let mut roles: Vec<String> = vec![];
    let mut rest = template;
    while let Some(i) = rest.find("role") {
        rest = &rest[i + 4..];
        let after = rest.trim_start_matches(['\'', '"', ']', ' ']);
        let list = if let Some(r) = after.strip_prefix("==") {
            quoted_prefix(r.trim_start()).into_iter().collect()
        } else if let Some(r) = after.strip_prefix("in").map(str::trim_start).and_then(|r| r.strip_prefix(['[', '('])) {
            r.split([']', ')']).next().unwrap_or("").split(',').filter_map(|x| quoted_prefix(x.trim())).collect()
        } else {
            vec![]
        };
        for r in list {
            if !roles.contains(&r) {
                roles.push(r);
            }
        }
    }
    if roles.is_empty() {
        roles = DEFAULT_ROLES.map(String::from).to_vec();
    }
    roles
}

/// `'user'...` or `"user"...` → `user`.
fn quoted_prefix(s: &str) -> Option<String> {
    let q = s.chars().next().filter(|c| *c == '\'' || *c == '"')?;
    let body = &s[1..];
    let end = body.find(q)?;
    let word = &body[..end];
    (!word.is_empty() && word.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')).then(|| word.to_string())
}

/// The messages, checked against OpenAI's shapes and the template's roles, with content parts
/// joined into one string (as vLLM does for string-content templates) and tool-call arguments
/// given as objects serialized.
pub fn normalize_messages(messages: &Value, roles: &[String]) -> Result<Value> {
    let list = messages.as_array().ok_or_else(|| bad("messages".into(), "must be an array of message objects"))?;
    let out = list.iter().enumerate().map(|(i, m)| normalize_message(i, m, roles)).collect::<Result<Vec<_>>>()?;
    Ok(Value::Array(out))
}

fn normalize_message(i: usize, m: &Value, roles: &[String]) -> Result<Value> {
    let at = |f: &str| format!("messages[{i}]{f}");
    let o = m.as_object().ok_or_else(|| bad(at(""), format!("must be an object with a role, not {}", kind(m))))?;
    let role = match o.get("role") {
        Some(Value::String(r)) => r.as_str(),
        None => return Err(bad(at(".role"), "is missing")),
        Some(v) => return Err(bad(at(".role"), format!("must be a string, not {}", kind(v)))),
    };
    if !roles.iter().any(|r| r == role) {
        return Err(bad(
            at(".role"),
            format!("`{role}` is not a role this model's chat template knows ({})", roles.join(", ")),
        ));
    }
    let mut o = o.clone();
    let has_calls = role == "assistant" && o.get("tool_calls").is_some_and(|c| !c.is_null());
    let content = match o.get("content").unwrap_or(&Value::Null) {
        Value::String(s) => Value::String(s.clone()),
        Value::Array(parts) => Value::String(join_parts(parts, &at(".content"))?),
        Value::Null if has_calls => Value::Null,
        Value::Null => {
            return Err(bad(
                at(".content"),
                "is missing or null; only an assistant message with tool_calls may omit it",
            ))
        }
        v => return Err(bad(at(".content"), format!("must be a string or a list of text parts, not {}", kind(v)))),
    };
    o.insert("content".into(), content);
    for f in ["name", "reasoning_content", "tool_call_id"] {
        if let Some(v) = o.get(f).filter(|v| !v.is_null() && !v.is_string()) {
            return Err(bad(at(&format!(".{f}")), format!("must be a string, not {}", kind(v))));
        }
    }
    match o.get("tool_calls") {
        None => {}
        Some(Value::Null) => {
            o.remove("tool_calls");
        }
        Some(_) if role != "assistant" => {
            return Err(bad(at(".tool_calls"), "only assistant messages carry tool calls"))
        }
        Some(Value::Array(calls)) => {
            let calls = calls
                .iter()
                .enumerate()
                .map(|(j, c)| tool_call(c, &at(&format!(".tool_calls[{j}]"))))
                .collect::<Result<Vec<_>>>()?;
            o.insert("tool_calls".into(), Value::Array(calls));
        }
        Some(v) => return Err(bad(at(".tool_calls"), format!("must be an array, not {}", kind(v)))),
    }
    Ok(Value::Object(o))
}

/// Text parts (`{"type": "text", "text": ...}`, or bare strings) joined with newlines.
fn join_parts(parts: &[Value], at: &str) -> Result<String> {
    let texts = parts
        .iter()
        .enumerate()
        .map(|(k, p)| match p {
            Value::String(s) => Ok(s.as_str()),
            Value::Object(o) => match (o.get("type").and_then(Value::as_str), o.get("text")) {
                (Some("text"), Some(Value::String(t))) => Ok(t.as_str()),
                (Some("text"), _) => Err(bad(format!("{at}[{k}].text"), "must be a string")),
                (Some(other), _) => Err(bad(
                    format!("{at}[{k}].type"),
                    format!("`{other}` parts are not supported (this model reads text)"),
                )),
                (None, _) => Err(bad(format!("{at}[{k}].type"), "is missing")),
            },
            v => Err(bad(format!("{at}[{k}]"), format!("must be a text part, not {}", kind(v)))),
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(texts.join("\n"))
}

/// One `tool_calls` entry: `{"type": "function", "function": {"name", "arguments"}}`, the
/// arguments as a JSON string (an object is serialized).
fn tool_call(c: &Value, at: &str) -> Result<Value> {
    let o = c.as_object().ok_or_else(|| bad(at.into(), format!("must be an object, not {}", kind(c))))?;
    let mut o: Map<String, Value> = o.clone();
    match o.get("type") {
        None | Some(Value::Null) => {
            o.insert("type".into(), json!("function"));
        }
        Some(Value::String(t)) if t == "function" => {}
        Some(v) => return Err(bad(format!("{at}.type"), format!("must be \"function\", not {v}"))),
    }
    let f = o
        .get_mut("function")
        .and_then(Value::as_object_mut)
        .ok_or_else(|| bad(format!("{at}.function"), "must be an object"))?;
    let named = matches!(f.get("name"), Some(Value::String(n)) if !n.is_empty());
    if !named {
        return Err(bad(format!("{at}.function.name"), "must be a non-empty string"));
    }
    let args = match f.get("arguments") {
        Some(Value::String(s)) => s.clone(),
        Some(v @ Value::Object(_)) => v.to_string(),
        None | Some(Value::Null) => "{}".into(),
        Some(v) => {
            return Err(bad(format!("{at}.function.arguments"), format!("must be a JSON string, not {}", kind(v))))
        }
    };
    f.insert("arguments".into(), Value::String(args));
    Ok(Value::Object(o))
}

/// The request's `tools`: `[{"type": "function", "function": {"name", "description"?,
/// "parameters"?}}]`.
pub fn check_tools(tools: &Value) -> Result<()> {
    let list = tools.as_array().ok_or_else(|| bad("tools".into(), format!("must be an array, not {}", kind(tools))))?;
    for (i, t) in list.iter().enumerate() {
        let at = |f: &str| format!("tools[{i}]{f}");
        let o = t.as_object().ok_or_else(|| bad(at(""), format!("must be an object, not {}", kind(t))))?;
        if o.get("type").and_then(Value::as_str) != Some("function") {
            return Err(bad(at(".type"), "must be \"function\""));
        }
        let f =
            o.get("function").and_then(Value::as_object).ok_or_else(|| bad(at(".function"), "must be an object"))?;
        match f.get("name") {
            Some(Value::String(n)) if !n.is_empty() => {}
            Some(v) => return Err(bad(at(".function.name"), format!("must be a non-empty string, not {v}"))),
            None => return Err(bad(at(".function.name"), "is missing")),
        }
        if let Some(v) = f.get("description").filter(|v| !v.is_null() && !v.is_string()) {
            return Err(bad(at(".function.description"), format!("must be a string, not {}", kind(v))));
        }
        if let Some(v) = f.get("parameters").filter(|v| !v.is_null() && !v.is_object()) {
            return Err(bad(at(".function.parameters"), format!("must be a JSON Schema object, not {}", kind(v))));
        }
    }
    Ok(())
}

/// A JSON value's kind, for error messages.
fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roles() -> Vec<String> {
        DEFAULT_ROLES.map(String::from).to_vec()
    }

    #[test]
    fn reads_the_roles_a_template_tests_for() {
        let t = "{% if message['role'] == 'system' %}{% elif message[\"role\"] == \"user\" %}{% elif m.role in ['assistant', 'tool'] %}";
        assert_eq!(template_roles(t), ["system", "user", "assistant", "tool"]);
        assert_eq!(template_roles("{{ messages }}"), roles());
    }

    #[test]
    fn bad_messages_name_the_index_and_field() {
        let cases = [
            (json!([{"content": "hi"}]), "messages[0].role", "missing"),
            (json!([{"role": "wizard", "content": "hi"}]), "messages[0].role", "wizard"),
            (json!([{"role": 5, "content": "hi"}]), "messages[0].role", "a number"),
            (json!([{"role": "user", "content": "a"}, "hello"]), "messages[1]", "a string"),
            (json!([null]), "messages[0]", "null"),
            (json!([{"role": "user"}]), "messages[0].content", "null"),
            (json!([{"role": "user", "content": 3}]), "messages[0].content", "a number"),
            (json!([{"role": "user", "content": [{"type": "image_url"}]}]), "messages[0].content[0].type", "image_url"),
            (
                json!([{"role": "assistant", "content": null, "tool_calls": [{"function": {"name": 3}}]}]),
                "messages[0].tool_calls[0].function.name",
                "non-empty",
            ),
            (json!({"role": "user"}), "messages", "array"),
        ];
        for (m, field, want) in cases {
            let e = normalize_messages(&m, &roles()).unwrap_err().to_string();
            assert!(e.contains(&format!("`{field}`")) && e.contains(want), "{m}: {e}");
        }
    }

    #[test]
    fn parts_are_joined_and_tool_arguments_serialized() {
        let m = json!([
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            {"role": "assistant", "content": null, "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": {"x": 1}}}]},
        ]);
        let n = normalize_messages(&m, &roles()).unwrap();
        assert_eq!(n[0]["content"], "a\nb");
        assert_eq!(n[1]["tool_calls"][0]["function"]["arguments"], "{\"x\":1}");
    }

    #[test]
    fn bad_tools_name_the_field() {
        for (t, want) in [
            (json!({"type": "function"}), "`tools`"),
            (json!([{"type": "function", "function": {"name": 7}}]), "`tools[0].function.name`"),
            (json!([{"type": "retrieval"}]), "`tools[0].type`"),
            (
                json!([{"type": "function", "function": {"name": "f", "parameters": "x"}}]),
                "`tools[0].function.parameters`",
            ),
        ] {
            assert!(check_tools(&t).unwrap_err().to_string().contains(want), "{t}");
        }
        check_tools(&json!([{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]))
            .unwrap();
    }
}
