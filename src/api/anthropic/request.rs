//! The Anthropic door's request: a Messages body (`max_tokens` required, a top-level
//! `system`, content as a string or blocks), validated into the core's [`ChatRequest`];
//! every failure a 400 saying which field, every field the upstreams cannot honour
//! refused by name rather than dropped.

use serde_json::Value;

use super::error::AnthropicError;
use crate::domain::{ChatRequest, Message, ResponseFormat, Sampling};

/// Anthropic's documented default temperature.
const DEFAULT_TEMPERATURE: f64 = 1.0;
/// Largest accepted `max_tokens`.
const MAX_TOKENS_LIMIT: u64 = u32::MAX as u64;

/// Every field the door reads; anything else is refused by name.
const KNOWN: [&str; 10] = [
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
];

/// A parsed Messages request.
#[derive(Debug)]
pub struct MessagesRequest {
    /// The request in the core's terms.
    pub chat: ChatRequest,
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
            messages.push(Message {
                role: "system".into(),
                content: system,
            });
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
        messages.push(Message {
            role: role.to_owned(),
            content: text_of(content, &format!("{at}.content"))?,
        });
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
    let chat = ChatRequest {
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

/// The text of a content: a string, or a list of `text` blocks (joined with newlines).
fn text_of(value: &Value, at: &str) -> Result<String, AnthropicError> {
    match value {
        Value::String(text) => Ok(text.clone()),
        Value::Array(blocks) => {
            let mut texts = Vec::with_capacity(blocks.len());
            for (j, block) in blocks.iter().enumerate() {
                match block.get("type").and_then(Value::as_str) {
                    Some("text") => match block.get("text") {
                        Some(Value::String(text)) => texts.push(text.as_str()),
                        _ => {
                            return Err(AnthropicError::invalid(format!(
                                "{at}.{j}.text: Input should be a valid string"
                            )))
                        }
                    },
                    Some(other) => {
                        return Err(AnthropicError::unsupported(&format!(
                            "{at}.{j}.type '{}'",
                            other.escape_default()
                        )))
                    }
                    None => {
                        return Err(AnthropicError::invalid(format!(
                            "{at}.{j}.type: Field required"
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
                r#"{"model":"m","max_tokens":5,"messages":[{"role":"user","content":"x"}],"tools":[]}"#,
                "tools",
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
