//! The Anthropic door's request: a Messages body (`max_tokens` required, a top-level
//! `system`, content as a string or blocks), validated into the core's [`ChatRequest`];
//! every failure a 400 saying which field, every field the upstreams cannot honour
//! refused by name rather than dropped.

use serde_json::Value;

use super::error::AnthropicError;
use super::tools;
use crate::domain::{ChatRequest, Message, ResponseFormat, Sampling, ToolCall, ToolResult};

/// Anthropic's documented default temperature.
const DEFAULT_TEMPERATURE: f64 = 1.0;
/// Largest accepted `max_tokens`.
const MAX_TOKENS_LIMIT: u64 = u32::MAX as u64;

/// Every field the door reads; anything else is refused by name.
const KNOWN: [&str; 12] = [
    "model",
    "messages",
    "max_tokens",
    "system",
    "temperature",
    "top_p",
    "top_k",
    "stop_sequences",
    "stream",
    "metadata",
    "tools",
    "tool_choice",
];

/// A parsed Messages request.
#[derive(Debug)]
pub struct MessagesRequest {
    /// The request in the core's terms.
    pub chat: ChatRequest,
}

impl AsRef<ChatRequest> for MessagesRequest {
    fn as_ref(&self) -> &ChatRequest {
        &self.chat
    }
}

impl MessagesRequest {
    /// The cache key: the request as it reaches the upstream, in the door's namespace
    /// (`stream` and `metadata` change nothing upstream, so they are not in it).
    pub fn cache_key(&self) -> String {
        crate::cache::request_key("anthropic/messages/v1", &self.chat)
    }
}

/// Parses `body` (a UTF-8 BOM in front is skipped).
pub fn parse(body: &[u8]) -> Result<MessagesRequest, AnthropicError> {
    let body = body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(body);
    let Ok(Value::Object(object)) = serde_json::from_slice::<Value>(body) else {
        return Err(AnthropicError::invalid(
            "The request body is not valid JSON: it must be a JSON object.",
        ));
    };
    if let Some(name) = object.keys().find(|name| !KNOWN.contains(&name.as_str())) {
        return Err(AnthropicError::unsupported(name));
    }
    let model = match object.get("model") {
        Some(Value::String(model)) if !model.is_empty() => model.clone(),
        Some(Value::String(_)) | None => {
            return Err(AnthropicError::invalid("model: Field required"))
        }
        Some(_) => {
            return Err(AnthropicError::invalid(
                "model: Input should be a valid string",
            ))
        }
    };
    let max_tokens = match object.get("max_tokens") {
        Some(Value::Number(n)) => match whole(n) {
            Some(n) if (1..=MAX_TOKENS_LIMIT).contains(&n) => n,
            _ => {
                return Err(AnthropicError::invalid(
                    "max_tokens: Input should be an integer greater than or equal to 1",
                ))
            }
        },
        None => return Err(AnthropicError::invalid("max_tokens: Field required")),
        Some(_) => {
            return Err(AnthropicError::invalid(
                "max_tokens: Input should be a valid integer",
            ))
        }
    };
    let mut messages = Vec::new();
    if let Some(system) = object.get("system") {
        let system = text_of(system, "system")?;
        if !system.is_empty() {
            messages.push(Message::text("system", system));
        }
    }
    let Some(Value::Array(items)) = object.get("messages") else {
        return Err(AnthropicError::invalid(
            "messages: Field required (a list of messages)",
        ));
    };
    if items.is_empty() {
        return Err(AnthropicError::invalid(
            "messages: at least one message is required",
        ));
    }
    for (i, item) in items.iter().enumerate() {
        let at = format!("messages.{i}");
        let role = match item.get("role").and_then(Value::as_str) {
            Some(role @ ("user" | "assistant")) => role,
            Some(_) => {
                return Err(AnthropicError::invalid(format!(
                    "{at}.role: Input should be 'user' or 'assistant'"
                )))
            }
            None => {
                return Err(AnthropicError::invalid(format!(
                    "{at}.role: Field required"
                )))
            }
        };
        let Some(content) = item.get("content") else {
            return Err(AnthropicError::invalid(format!(
                "{at}.content: Field required"
            )));
        };
        turn(role, content, &format!("{at}.content"), &mut messages)?;
    }
    let number = |name: &str, min: f64, max: f64| -> Result<Option<f64>, AnthropicError> {
        match object.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) => match n.as_f64() {
                Some(v) if (min..=max).contains(&v) => Ok(Some(v)),
                _ => Err(AnthropicError::invalid(format!(
                    "{name}: Input should be a number from {min} to {max}"
                ))),
            },
            Some(_) => Err(AnthropicError::invalid(format!(
                "{name}: Input should be a valid number"
            ))),
        }
    };
    let top_k = match object.get("top_k") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) if whole(n).is_some_and(|k| k <= MAX_TOKENS_LIMIT) => whole(n),
        Some(_) => {
            return Err(AnthropicError::invalid(format!(
                "top_k: Input should be an integer from 0 to {MAX_TOKENS_LIMIT}"
            )))
        }
    };
    let stop = match object.get("stop_sequences") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => items
            .iter()
            .map(|s| {
                s.as_str().map(str::to_owned).ok_or_else(|| {
                    AnthropicError::invalid("stop_sequences: Input should be a list of strings")
                })
            })
            .collect::<Result<_, _>>()?,
        Some(_) => {
            return Err(AnthropicError::invalid(
                "stop_sequences: Input should be a list of strings",
            ))
        }
    };
    let stream = match object.get("stream") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(stream)) => *stream,
        Some(_) => {
            return Err(AnthropicError::invalid(
                "stream: Input should be a valid boolean",
            ))
        }
    };
    if let Some(metadata) = object.get("metadata") {
        if !metadata.is_object() && !metadata.is_null() {
            return Err(AnthropicError::invalid(
                "metadata: Input should be an object",
            ));
        }
    }
    let tools = tools::tools(object.get("tools"))?;
    let tool_choice = tools::tool_choice(object.get("tool_choice"), &tools)?;
    let chat = ChatRequest {
        tools,
        tool_choice,
        strict_model: true,
        passthrough: Default::default(),
        messages,
        model: Some(model),
        model_hint: None,
        max_tokens: Some(max_tokens),
        temperature: number("temperature", 0.0, 1.0)?.unwrap_or(DEFAULT_TEMPERATURE),
        stream,
        sampling: Sampling {
            top_p: number("top_p", 0.0, 1.0)?,
            top_k,
            stop,
            seed: None,
            presence_penalty: None,
            frequency_penalty: None,
            response_format: ResponseFormat::Text,
        },
    };
    Ok(MessagesRequest { chat })
}

/// A non-negative whole number (a float without a fraction counts, as JSON Schema says).
fn whole(n: &serde_json::Number) -> Option<u64> {
    n.as_u64().or_else(|| {
        n.as_f64()
            .filter(|f| {
                f.fract() == 0.0
                    && *f >= 0.0
                    && *f <= crate::api::openai::request::EXACT_FLOAT_INTEGER
            })
            .map(|f| f as u64)
    })
}

/// One turn's content in the core's terms, added to `messages`: a string or `text`
/// blocks are the turn's text; an assistant's `tool_use` blocks are its calls; a user's
/// `tool_result` blocks become `tool` turns (before the user's text, as Anthropic
/// requires the results first), each naming the function of the call it answers.
fn turn(
    role: &str,
    content: &Value,
    at: &str,
    messages: &mut Vec<Message>,
) -> Result<(), AnthropicError> {
    let blocks = match content {
        Value::String(text) => {
            messages.push(Message::text(role, text.as_str()));
            return Ok(());
        }
        Value::Array(blocks) => blocks,
        _ => {
            return Err(AnthropicError::invalid(format!(
                "{at}: Input should be a string or a list of content blocks"
            )))
        }
    };
    let mut texts = Vec::new();
    let mut calls = Vec::new();
    let mut has_results = false;
    for (j, block) in blocks.iter().enumerate() {
        let at = format!("{at}.{j}");
        match (role, block.get("type").and_then(Value::as_str)) {
            (_, Some("text")) => texts.push(block_text(block, &at)?),
            ("assistant", Some("tool_use")) => calls.push(tool_use(block, &at)?),
            ("user", Some("tool_result")) => {
                let result = tool_result(block, &at, messages)?;
                messages.push(result);
                has_results = true;
            }
            (_, Some(other)) => {
                return Err(AnthropicError::unsupported(&format!(
                    "{at}.type '{}'",
                    other.escape_default()
                )))
            }
            (_, None) => {
                return Err(AnthropicError::invalid(format!(
                    "{at}.type: Field required"
                )))
            }
        }
    }
    // A user turn of results only adds no empty user turn after them.
    if !(has_results && texts.is_empty()) {
        messages.push(Message {
            tool_calls: calls,
            ..Message::text(role, texts.join("\n"))
        });
    }
    Ok(())
}

fn block_text<'a>(block: &'a Value, at: &str) -> Result<&'a str, AnthropicError> {
    match block.get("text") {
        Some(Value::String(text)) => Ok(text),
        _ => Err(AnthropicError::invalid(format!(
            "{at}.text: Input should be a valid string"
        ))),
    }
}

/// A `tool_use` block of an assistant turn: the call, its input an object.
fn tool_use(block: &Value, at: &str) -> Result<ToolCall, AnthropicError> {
    let id = match block.get("id") {
        Some(Value::String(id)) if !id.is_empty() => id.clone(),
        Some(_) => {
            return Err(AnthropicError::invalid(format!(
                "{at}.id: Input should be a non-empty string"
            )))
        }
        None => return Err(AnthropicError::invalid(format!("{at}.id: Field required"))),
    };
    let name = tools::name(block.get("name"), &format!("{at}.name"))?;
    let arguments = match block.get("input") {
        Some(input @ Value::Object(_)) => input.to_string(),
        Some(_) => {
            return Err(AnthropicError::invalid(format!(
                "{at}.input: Input should be a valid dictionary"
            )))
        }
        None => {
            return Err(AnthropicError::invalid(format!(
                "{at}.input: Field required"
            )))
        }
    };
    Ok(ToolCall {
        id,
        name,
        arguments,
    })
}

/// A `tool_result` block of a user turn, as a `tool` turn answering an earlier call.
fn tool_result(block: &Value, at: &str, earlier: &[Message]) -> Result<Message, AnthropicError> {
    let call_id = match block.get("tool_use_id") {
        Some(Value::String(id)) => id,
        Some(_) => {
            return Err(AnthropicError::invalid(format!(
                "{at}.tool_use_id: Input should be a valid string"
            )))
        }
        None => {
            return Err(AnthropicError::invalid(format!(
                "{at}.tool_use_id: Field required"
            )))
        }
    };
    let Some(call) = earlier
        .iter()
        .rev()
        .flat_map(|m| &m.tool_calls)
        .find(|call| &call.id == call_id)
    else {
        return Err(AnthropicError::invalid(format!(
            "{at}.tool_use_id: no earlier tool_use block has this id"
        )));
    };
    let content = match block.get("content") {
        None | Some(Value::Null) => String::new(),
        Some(content) => text_of(content, &format!("{at}.content"))?,
    };
    let is_error = match block.get("is_error") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(is_error)) => *is_error,
        Some(_) => {
            return Err(AnthropicError::invalid(format!(
                "{at}.is_error: Input should be a valid boolean"
            )))
        }
    };
    Ok(Message {
        tool_result: Some(ToolResult {
            call_id: call_id.clone(),
            name: call.name.clone(),
            is_error,
        }),
        ..Message::text("tool", content)
    })
}

/// The text of the system prompt or a tool's result: a string, or a list of `text`
/// blocks (joined with newlines).
fn text_of(value: &Value, at: &str) -> Result<String, AnthropicError> {
    match value {
        Value::String(text) => Ok(text.clone()),
        Value::Array(blocks) => {
            let mut texts = Vec::with_capacity(blocks.len());
            for (j, block) in blocks.iter().enumerate() {
                let at = format!("{at}.{j}");
                match block.get("type").and_then(Value::as_str) {
                    Some("text") => texts.push(block_text(block, &at)?),
                    Some(other) => {
                        return Err(AnthropicError::unsupported(&format!(
                            "{at}.type '{}'",
                            other.escape_default()
                        )))
                    }
                    None => {
                        return Err(AnthropicError::invalid(format!(
                            "{at}.type: Field required"
                        )))
                    }
                }
            }
            Ok(texts.join("\n"))
        }
        _ => Err(AnthropicError::invalid(format!(
            "{at}: Input should be a string or a list of content blocks"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_messages_body_becomes_the_cores_request_with_the_system_prompt_first() {
        let parsed = parse(
            br#"{"model":"llama3.1","max_tokens":64,"system":[{"type":"text","text":"be brief"}],"messages":[{"role":"user","content":[{"type":"text","text":"hi"}]}],"top_k":5,"stop_sequences":["END"],"stream":true,"metadata":{"user_id":"u"}}"#,
        )
        .unwrap();
        let chat = parsed.chat;
        assert_eq!(chat.messages.len(), 2);
        assert_eq!(
            (
                chat.messages[0].role.as_str(),
                chat.messages[0].content.as_str()
            ),
            ("system", "be brief")
        );
        assert_eq!(chat.max_tokens, Some(64));
        assert_eq!(chat.sampling.top_k, Some(5));
        assert_eq!(chat.sampling.stop, ["END"]);
        assert!(chat.stream);
    }

    #[test]
    fn tool_use_and_tool_result_blocks_become_calls_and_tool_turns() {
        let chat = parse(
            br#"{"model":"m","max_tokens":64,"messages":[
                {"role":"user","content":"weather?"},
                {"role":"assistant","content":[{"type":"text","text":"Let me look."},{"type":"tool_use","id":"toolu_1","name":"get_weather","input":{"city":"Paris"}}]},
                {"role":"user","content":[{"type":"tool_result","tool_use_id":"toolu_1","content":[{"type":"text","text":"18C"}],"is_error":true},{"type":"text","text":"thanks"}]}],
              "tools":[{"name":"get_weather","description":"d","input_schema":{"type":"object"},"cache_control":{"type":"ephemeral"}}],
              "tool_choice":{"type":"tool","name":"get_weather"}}"#,
        )
        .unwrap()
        .chat;
        assert_eq!(chat.tools.len(), 1);
        assert_eq!(
            chat.tools[0].parameters,
            Some(serde_json::json!({"type": "object"}))
        );
        assert_eq!(
            chat.tool_choice,
            crate::domain::ToolChoice::Function("get_weather".into())
        );
        let roles: Vec<&str> = chat.messages.iter().map(|m| m.role.as_str()).collect();
        assert_eq!(roles, ["user", "assistant", "tool", "user"]);
        assert_eq!(chat.messages[1].content, "Let me look.");
        assert_eq!(
            chat.messages[1].tool_calls,
            [ToolCall {
                id: "toolu_1".into(),
                name: "get_weather".into(),
                arguments: r#"{"city":"Paris"}"#.into()
            }]
        );
        assert_eq!(chat.messages[2].content, "18C");
        assert_eq!(
            chat.messages[2].tool_result,
            Some(ToolResult {
                call_id: "toolu_1".into(),
                name: "get_weather".into(),
                is_error: true
            })
        );
        assert_eq!(chat.messages[3].content, "thanks");
    }

    #[test]
    fn each_invalid_field_is_named_and_max_tokens_is_required() {
        for (body, field) in [
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x"}]}"#,
                "max_tokens",
            ),
            (
                r#"{"max_tokens":5,"messages":[{"role":"user","content":"x"}]}"#,
                "model",
            ),
            (r#"{"model":"m","max_tokens":5,"messages":[]}"#, "messages"),
            (
                r#"{"model":"m","max_tokens":5,"messages":[{"role":"system","content":"x"}]}"#,
                "messages.0.role",
            ),
            (
                r#"{"model":"m","max_tokens":5,"messages":[{"role":"user","content":[{"type":"image"}]}]}"#,
                "messages.0.content.0.type",
            ),
            (
                r#"{"model":"m","max_tokens":5,"messages":[{"role":"user","content":"x"}],"temperature":1.5}"#,
                "temperature",
            ),
            (
                r#"{"model":"m","max_tokens":5,"messages":[{"role":"user","content":"x"}],"tools":[{"name":"f"}]}"#,
                "tools.0.input_schema",
            ),
            (
                r#"{"model":"m","max_tokens":5,"messages":[{"role":"user","content":"x"}],"tools":[{"type":"web_search_20250305","name":"web_search"}]}"#,
                "tools.0.type",
            ),
            (
                r#"{"model":"m","max_tokens":5,"messages":[{"role":"user","content":"x"}],"tool_choice":{"type":"any"}}"#,
                "tool_choice",
            ),
            (
                r#"{"model":"m","max_tokens":5,"messages":[{"role":"user","content":"x"}],"tools":[{"name":"f","input_schema":{}}],"tool_choice":{"type":"auto","disable_parallel_tool_use":true}}"#,
                "tool_choice.disable_parallel_tool_use",
            ),
            (
                r#"{"model":"m","max_tokens":5,"messages":[{"role":"user","content":[{"type":"tool_result","tool_use_id":"t1","content":"x"}]}]}"#,
                "messages.0.content.0.tool_use_id",
            ),
            (
                r#"{"model":"m","max_tokens":5,"messages":[{"role":"user","content":[{"type":"tool_use","id":"t1","name":"f","input":{}}]}]}"#,
                "messages.0.content.0.type",
            ),
            (
                r#"{"model":"m","max_tokens":5,"messages":[{"role":"assistant","content":[{"type":"tool_use","id":"t1","name":"f","input":[]}]}]}"#,
                "messages.0.content.0.input",
            ),
        ] {
            let error = parse(body.as_bytes()).unwrap_err();
            assert!(
                error.message.starts_with(field),
                "{body}: {}",
                error.message
            );
            assert_eq!(error.status, 400);
        }
    }
}
