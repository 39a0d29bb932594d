//! The Anthropic door's tool use: `tools` and `tool_choice` in a request, validated into
//! the core's terms with Anthropic's wording (the failing field first).

use serde_json::Value;

use super::error::AnthropicError;
use crate::domain::tools::{is_function_name, MAX_TOOLS};
use crate::domain::{Tool, ToolChoice};

/// `tools`: client tools (`type` absent or `custom`); Anthropic's server tools (web
/// search, code execution, ...) cannot run on other upstreams and are refused by name.
pub fn tools(value: Option<&Value>) -> Result<Vec<Tool>, AnthropicError> {
    let items = match value {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(items)) => items,
        Some(_) => {
            return Err(AnthropicError::invalid(
                "tools: Input should be a valid list",
            ))
        }
    };
    if items.len() > MAX_TOOLS {
        return Err(AnthropicError::invalid(format!(
            "tools: List should have at most {MAX_TOOLS} items"
        )));
    }
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let at = format!("tools.{i}");
            let Value::Object(tool) = item else {
                return Err(AnthropicError::invalid(format!(
                    "{at}: Input should be a valid dictionary"
                )));
            };
            match tool.get("type") {
                None | Some(Value::Null) => {}
                Some(Value::String(kind)) if kind == "custom" => {}
                Some(Value::String(kind)) => {
                    return Err(AnthropicError::unsupported(&format!(
                        "{at}.type '{}'",
                        kind.escape_default()
                    )))
                }
                Some(_) => {
                    return Err(AnthropicError::invalid(format!(
                        "{at}.type: Input should be a valid string"
                    )))
                }
            }
            if let Some(name) = tool.keys().find(|k| !TOOL_FIELDS.contains(&k.as_str())) {
                return Err(AnthropicError::unsupported(&format!("{at}.{name}")));
            }
            let name = name(tool.get("name"), &format!("{at}.name"))?;
            let description = match tool.get("description") {
                None | Some(Value::Null) => None,
                Some(Value::String(description)) => Some(description.clone()),
                Some(_) => {
                    return Err(AnthropicError::invalid(format!(
                        "{at}.description: Input should be a valid string"
                    )))
                }
            };
            let parameters = match tool.get("input_schema") {
                Some(schema @ Value::Object(_)) => schema.clone(),
                Some(_) => {
                    return Err(AnthropicError::invalid(format!(
                        "{at}.input_schema: Input should be a valid dictionary"
                    )))
                }
                None => {
                    return Err(AnthropicError::invalid(format!(
                        "{at}.input_schema: Field required"
                    )))
                }
            };
            Ok(Tool {
                name,
                description,
                parameters: Some(parameters),
                strict: false,
            })
        })
        .collect()
}

/// The fields of a client tool the door reads (`cache_control` is a caching hint for
/// Anthropic's own servers and changes no answer).
const TOOL_FIELDS: [&str; 5] = [
    "type",
    "name",
    "description",
    "input_schema",
    "cache_control",
];

/// A tool's name: `^[a-zA-Z0-9_-]{1,64}$`, as every upstream takes it.
pub fn name(value: Option<&Value>, at: &str) -> Result<String, AnthropicError> {
    match value {
        Some(Value::String(name)) if is_function_name(name) => Ok(name.clone()),
        Some(Value::String(_)) => Err(AnthropicError::invalid(format!(
            "{at}: String should match pattern '^[a-zA-Z0-9_-]{{1,64}}$'"
        ))),
        Some(_) => Err(AnthropicError::invalid(format!(
            "{at}: Input should be a valid string"
        ))),
        None => Err(AnthropicError::invalid(format!("{at}: Field required"))),
    }
}

/// `tool_choice`: `auto`, `any`, `tool` (with its `name`, one of `tools`) or `none`.
/// `disable_parallel_tool_use: true` cannot be honoured: the upstreams may always call
/// several tools in a turn.
pub fn tool_choice(value: Option<&Value>, tools: &[Tool]) -> Result<ToolChoice, AnthropicError> {
    let choice = match value {
        None | Some(Value::Null) => return Ok(ToolChoice::Auto),
        Some(Value::Object(choice)) => choice,
        Some(_) => {
            return Err(AnthropicError::invalid(
                "tool_choice: Input should be a valid dictionary",
            ))
        }
    };
    match choice.get("disable_parallel_tool_use") {
        None | Some(Value::Null) | Some(Value::Bool(false)) => {}
        Some(Value::Bool(true)) => {
            return Err(AnthropicError::unsupported(
                "tool_choice.disable_parallel_tool_use",
            ))
        }
        Some(_) => {
            return Err(AnthropicError::invalid(
                "tool_choice.disable_parallel_tool_use: Input should be a valid boolean",
            ))
        }
    }
    let choice = match choice.get("type").and_then(Value::as_str) {
        Some("auto") => ToolChoice::Auto,
        Some("none") => ToolChoice::None,
        Some("any") => ToolChoice::Required,
        Some("tool") => {
            let name = name(choice.get("name"), "tool_choice.name")?;
            if !tools.is_empty() && !tools.iter().any(|tool| tool.name == name) {
                return Err(AnthropicError::invalid(format!(
                    "tool_choice.name: no tool named '{name}' in tools"
                )));
            }
            ToolChoice::Function(name)
        }
        _ => {
            return Err(AnthropicError::invalid(
                "tool_choice.type: Input should be 'auto', 'any', 'tool' or 'none'",
            ))
        }
    };
    if matches!(choice, ToolChoice::Required | ToolChoice::Function(_)) && tools.is_empty() {
        return Err(AnthropicError::invalid(
            "tool_choice: a tool can only be required when tools are given",
        ));
    }
    Ok(choice)
}
