//! The OpenAI door's tool calling: `tools`, `tool_choice` and `parallel_tool_calls` in a
//! request, and the calls an assistant turn made, each validated into the core's terms
//! with OpenAI's wording and the failing field as `param`.

use serde_json::{Map, Value};

use super::error::OpenAiError;
use super::request::type_error;
use crate::domain::tools::{is_function_name, MAX_TOOLS};
use crate::domain::{Tool, ToolCall, ToolChoice};

/// `tools`: function tools only.
pub fn tools(value: Option<&Value>) -> Result<Vec<Tool>, OpenAiError> {
    let items = match value {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(items)) => items,
        Some(_) => return Err(type_error("tools", "an array")),
    };
    if items.is_empty() || items.len() > MAX_TOOLS {
        return Err(OpenAiError::invalid(
            "tools",
            format!("Invalid 'tools': expected an array of 1 to {MAX_TOOLS} tools."),
        ));
    }
    items
        .iter()
        .enumerate()
        .map(|(i, item)| tool(item, &format!("tools[{i}]")))
        .collect()
}

fn tool(item: &Value, at: &str) -> Result<Tool, OpenAiError> {
    let Value::Object(tool) = item else {
        return Err(type_error(at, "an object"));
    };
    match tool.get("type").and_then(Value::as_str) {
        Some("function") => {}
        Some(_) => return Err(OpenAiError::unsupported(&format!("{at}.type"))),
        None => return Err(missing(&format!("{at}.type"))),
    }
    let at = format!("{at}.function");
    let function = match tool.get("function") {
        Some(Value::Object(function)) => function,
        Some(_) => return Err(type_error(&at, "an object")),
        None => return Err(missing(&at)),
    };
    let name = function_name(function.get("name"), &format!("{at}.name"))?;
    let description = match function.get("description") {
        None | Some(Value::Null) => None,
        Some(Value::String(description)) => Some(description.clone()),
        Some(_) => return Err(type_error(&format!("{at}.description"), "a string")),
    };
    let parameters = match function.get("parameters") {
        None | Some(Value::Null) => None,
        Some(parameters @ Value::Object(_)) => Some(parameters.clone()),
        Some(_) => return Err(type_error(&format!("{at}.parameters"), "an object")),
    };
    let strict = match function.get("strict") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(strict)) => *strict,
        Some(_) => return Err(type_error(&format!("{at}.strict"), "a boolean")),
    };
    Ok(Tool {
        name,
        description,
        parameters,
        strict,
    })
}

fn function_name(value: Option<&Value>, param: &str) -> Result<String, OpenAiError> {
    match value {
        Some(Value::String(name)) if is_function_name(name) => Ok(name.clone()),
        Some(Value::String(_)) => Err(OpenAiError::invalid(
            param,
            format!("Invalid '{param}': must match '^[a-zA-Z0-9_-]{{1,64}}$'."),
        )),
        Some(_) => Err(type_error(param, "a string")),
        None => Err(missing(param)),
    }
}

/// `tool_choice`: `none`, `auto`, `required` or a named function among `tools`. A
/// choice that forces a call needs tools to call.
pub fn tool_choice(value: Option<&Value>, tools: &[Tool]) -> Result<ToolChoice, OpenAiError> {
    let choice = match value {
        None | Some(Value::Null) => return Ok(ToolChoice::Auto),
        Some(Value::String(mode)) => match mode.as_str() {
            "none" => ToolChoice::None,
            "auto" => ToolChoice::Auto,
            "required" => ToolChoice::Required,
            other => {
                return Err(OpenAiError::invalid(
                    "tool_choice",
                    format!(
                        "Invalid value: '{}'. Supported values are: 'none', 'auto' and 'required'.",
                        other.escape_default()
                    ),
                ))
            }
        },
        Some(Value::Object(named)) => {
            match named.get("type").and_then(Value::as_str) {
                Some("function") => {}
                Some(_) => return Err(OpenAiError::unsupported("tool_choice.type")),
                None => return Err(missing("tool_choice.type")),
            }
            let name = match named.get("function") {
                Some(Value::Object(function)) => {
                    function_name(function.get("name"), "tool_choice.function.name")?
                }
                Some(_) => return Err(type_error("tool_choice.function", "an object")),
                None => return Err(missing("tool_choice.function")),
            };
            if !tools.is_empty() && !tools.iter().any(|tool| tool.name == name) {
                return Err(OpenAiError::invalid(
                    "tool_choice",
                    format!("Invalid value for 'tool_choice': function '{name}' is not among the tools."),
                ));
            }
            ToolChoice::Function(name)
        }
        Some(_) => return Err(type_error("tool_choice", "a string or an object")),
    };
    let forced = matches!(choice, ToolChoice::Required | ToolChoice::Function(_));
    if forced && tools.is_empty() {
        return Err(OpenAiError::invalid(
            "tool_choice",
            "Invalid value for 'tool_choice': a tool call can only be required when 'tools' are given.",
        ));
    }
    Ok(choice)
}

/// `parallel_tool_calls`: the upstreams may always make several calls in one turn, so
/// only `true` (or null) can be honoured.
pub fn parallel_tool_calls(value: Option<&Value>) -> Result<(), OpenAiError> {
    match value {
        None | Some(Value::Null) | Some(Value::Bool(true)) => Ok(()),
        Some(Value::Bool(false)) => Err(OpenAiError::unsupported("parallel_tool_calls")),
        Some(_) => Err(type_error("parallel_tool_calls", "a boolean")),
    }
}

/// The calls of an assistant turn (`messages[i].tool_calls`); their arguments must be a
/// JSON object as text (an empty text counts as `{}`), as the upstreams take them.
pub fn assistant_calls(
    message: &Map<String, Value>,
    at: &str,
) -> Result<Vec<ToolCall>, OpenAiError> {
    let at = format!("{at}.tool_calls");
    let items = match message.get("tool_calls") {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(items)) => items,
        Some(_) => return Err(type_error(&at, "an array")),
    };
    items
        .iter()
        .enumerate()
        .map(|(j, item)| {
            let at = format!("{at}[{j}]");
            let Value::Object(call) = item else {
                return Err(type_error(&at, "an object"));
            };
            let id = match call.get("id") {
                Some(Value::String(id)) if !id.is_empty() => id.clone(),
                Some(Value::String(_)) | None => return Err(missing(&format!("{at}.id"))),
                Some(_) => return Err(type_error(&format!("{at}.id"), "a string")),
            };
            match call.get("type").and_then(Value::as_str) {
                Some("function") => {}
                Some(_) => return Err(OpenAiError::unsupported(&format!("{at}.type"))),
                None => return Err(missing(&format!("{at}.type"))),
            }
            let function = match call.get("function") {
                Some(Value::Object(function)) => function,
                Some(_) => return Err(type_error(&format!("{at}.function"), "an object")),
                None => return Err(missing(&format!("{at}.function"))),
            };
            let name = function_name(function.get("name"), &format!("{at}.function.name"))?;
            let param = format!("{at}.function.arguments");
            let arguments = match function.get("arguments") {
                Some(Value::String(text)) if text.trim().is_empty() => "{}".to_owned(),
                Some(Value::String(text)) => match serde_json::from_str::<Value>(text) {
                    Ok(Value::Object(_)) => text.clone(),
                    _ => {
                        return Err(OpenAiError::invalid(
                            &param,
                            format!(
                                "Invalid '{param}': must be a JSON object encoded as a string."
                            ),
                        ))
                    }
                },
                Some(_) => return Err(type_error(&param, "a string")),
                None => return Err(missing(&param)),
            };
            Ok(ToolCall {
                id,
                name,
                arguments,
            })
        })
        .collect()
}

fn missing(param: &str) -> OpenAiError {
    OpenAiError::invalid(param, format!("Missing required parameter: '{param}'."))
}
