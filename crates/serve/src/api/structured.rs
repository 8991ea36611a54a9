//! What a request asks the output to follow — `response_format` (JSON object or schema) or a
//! forced tool call (`tool_choice: "required"` or a named function) — as a grammar constraint,
//! and the forced answer read back as tool calls.

use super::AppState;
use crate::error::ApiError;
use crate::grammar::{forced_tool_calls, tool_call_schema, Constraint, Grammars};
use serde_json::{json, Value};
use std::sync::Arc;

/// A tool call the grammar forces: the output is the named function's arguments, or (with
/// `name: None`, `"required"`) a JSON list of `{name, parameters}`.
#[derive(Clone, Debug)]
pub(super) struct Forced {
    pub(super) name: Option<String>,
}

impl Forced {
    /// The OpenAI `tool_calls` of a forced answer; `None` if it does not parse (cut by length).
    pub(super) fn calls(&self, text: &str) -> Option<Vec<Value>> {
        forced_tool_calls(text, self.name.as_deref())
    }
}

/// How tools are offered and chosen.
pub(super) enum ToolChoice {
    /// The model decides (tools rendered, markup parsed).
    Auto,
    /// No tools: the template does not see them.
    None,
    Forced(Forced),
}

impl ToolChoice {
    pub(super) fn parse(v: Option<&Value>) -> Result<Self, ApiError> {
        let bad = || {
            ApiError::bad(
                "tool_choice must be \"auto\", \"none\", \"required\" or {\"type\": \"function\", \"function\": {\"name\": ...}}",
                Some("tool_choice"),
            )
        };
        match v {
            None | Some(Value::Null) => Ok(ToolChoice::Auto),
            Some(Value::String(s)) => match s.as_str() {
                "auto" => Ok(ToolChoice::Auto),
                "none" => Ok(ToolChoice::None),
                "required" => Ok(ToolChoice::Forced(Forced { name: None })),
                _ => Err(bad()),
            },
            Some(o) => match o["function"]["name"].as_str() {
                Some(n) if o.get("type").and_then(Value::as_str).unwrap_or("function") == "function" => {
                    Ok(ToolChoice::Forced(Forced { name: Some(n.to_string()) }))
                }
                _ => Err(bad()),
            },
        }
    }
}

impl AppState {
    /// The grammar engine over this model's vocabulary, built on first use.
    pub fn grammars(&self) -> Result<Arc<Grammars>, ApiError> {
        let tok = self.tokenizer.as_ref().ok_or_else(|| {
            ApiError::bad("constrained decoding needs the model's tokenizer.json", Some("response_format"))
        })?;
        let eos = self.eos_ids.first().copied().unwrap_or(0);
        self.grammars
            .get_or_init(|| Grammars::new(tok, self.model.config.vocab_size, eos).map(Arc::new))
            .clone()
            .map_err(|e| ApiError::new(axum::http::StatusCode::INTERNAL_SERVER_ERROR, "server_error", e))
    }
}

/// The JSON schema `response_format` asks for: `None` for text.
pub(super) fn response_schema(rf: Option<&Value>) -> Result<Option<Value>, ApiError> {
    let Some(rf) = rf.filter(|v| !v.is_null()) else { return Ok(None) };
    match rf.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(json!({"type": "object"}))),
        Some("json_schema") => {
            let schema = rf["json_schema"].get("schema").cloned().unwrap_or(json!({}));
            Ok(Some(schema))
        }
        _ => Err(ApiError::bad(
            format!("response_format type {} is not \"text\", \"json_object\" or \"json_schema\"", rf["type"]),
            Some("response_format"),
        )),
    }
}

/// The constraint for a schema, or a 400 with the engine's reason (it names the keyword it
/// cannot take). With `thinking`, the grammar starts after `</think>`.
pub(super) fn constrain(st: &AppState, schema: &Value, param: &str, thinking: bool) -> Result<Constraint, ApiError> {
    let g = st.grammars()?;
    let c = g
        .json_schema(schema)
        .map_err(|e| ApiError::bad(format!("{param}: the grammar engine cannot take this schema: {e}"), Some(param)))?;
    if !thinking {
        return Ok(c);
    }
    let close = st.tokenizer.as_ref().and_then(|t| t.encode("</think>", false).ok()).unwrap_or_default();
    Ok(c.after(close))
}

/// The schema a forced tool choice imposes over `tools`.
pub(super) fn forced_schema(tools: Option<&Value>, f: &Forced) -> Result<Value, ApiError> {
    let tools = tools.ok_or_else(|| ApiError::bad("a forced tool_choice needs tools", Some("tool_choice")))?;
    tool_call_schema(tools, f.name.as_deref()).map_err(|e| ApiError::bad(e, Some("tool_choice")))
}

/// Puts the schema's constraint on every choice of `plan` (each choice gets its own matcher).
pub(super) fn apply(
    st: &AppState,
    plan: &mut super::request::Plan,
    schema: Option<(Value, &str)>,
) -> Result<(), ApiError> {
    if let Some((schema, param)) = schema {
        let c = constrain(st, &schema, param, plan.thinking)?;
        for (req, _) in &mut plan.choices {
            req.constraint = Some(c.clone());
        }
    }
    Ok(())
}

/// The schema a chat request's output must follow: the forced tool call's, or `response_format`'s.
pub(super) fn chat_schema(
    choice: &ToolChoice,
    tools: Option<&Value>,
    response_format: Option<&Value>,
) -> Result<Option<(Value, &'static str)>, ApiError> {
    let rf = response_schema(response_format)?;
    match choice {
        ToolChoice::Forced(f) => {
            if rf.is_some() {
                let msg = "response_format and a forced tool_choice cannot be combined";
                return Err(ApiError::bad(msg, Some("response_format")));
            }
            Ok(Some((forced_schema(tools, f)?, "tool_choice")))
        }
        _ => Ok(rf.map(|s| (s, "response_format"))),
    }
}
