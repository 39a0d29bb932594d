//! The original door's request schema: the validation that turns a body into a
//! [`ChatRequest`] with pydantic's error shapes (lax coercions included, as the original
//! accepted them).
//!
//! Errors never echo the input: message text must not leak into error bodies.

use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::error::{ApiError, FieldError};
use crate::domain::{ChatRequest, Message};

/// Defaults of the original service.
pub const DEFAULT_MAX_TOKENS: u64 = 512;
/// Default sampling temperature.
pub const DEFAULT_TEMPERATURE: f64 = 0.7;
/// Largest accepted `max_tokens`; no model comes near it, and it keeps arithmetic sane.
pub const MAX_TOKENS_LIMIT: u64 = u32::MAX as u64;

/// Parses and validates a chat body. `content_type` follows FastAPI: a missing type or a
/// JSON type is parsed as JSON; any other type is a 422 as the body is not an object.
pub fn parse_chat_request(
    body: &[u8],
    content_type: Option<&str>,
) -> Result<ChatRequest, ApiError> {
    if let Some(ct) = content_type {
        if !is_json_content_type(ct) {
            return Err(ApiError::Validation(vec![error(
                "model_attributes_type",
                vec![json!("body")],
                "Input should be a valid dictionary or object to extract fields from",
            )]));
        }
    }
    // A UTF-8 byte order mark in front is skipped, as FastAPI's JSON decoding does.
    let body = body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(body);
    if let Some(request) = parse_plain(body) {
        return Ok(request);
    }
    parse_full(body)
}

/// The whitespace lax strings may carry around their value (the schema's `[ \t\n\r]`).
fn trim_ascii_space(text: &str) -> &str {
    text.trim_matches(|c: char| matches!(c, ' ' | '\t' | '\n' | '\r'))
}

/// Whether `text` is a plain decimal the original door takes as a lax number: an
/// optional `+`, digits with at most one `.`, at least one digit (`1`, `.5`, `1.`,
/// `0.70`). No sign but `+`, no exponent, no `inf` or `nan`: the grammar the OpenAPI
/// document states as a pattern, so the two cannot disagree.
fn is_plain_decimal(text: &str) -> bool {
    let digits = text.strip_prefix('+').unwrap_or(text);
    let mut dots = 0;
    let mut any_digit = false;
    for c in digits.chars() {
        match c {
            '0'..='9' => any_digit = true,
            '.' => dots += 1,
            _ => return false,
        }
    }
    any_digit && dots <= 1
}

/// The shape nearly every valid body has, read straight into its types: no `Value` tree
/// and no map of field names to build and take apart (~5% of a cache hit's instructions
/// in callgrind).
#[derive(Deserialize)]
struct PlainBody {
    messages: Vec<PlainMessage>,
    model: Option<String>,
    model_hint: Option<String>,
    max_tokens: Option<u64>,
    temperature: Option<f64>,
    stream: Option<bool>,
}

/// A message as the original door takes it: a role and a text (other fields ignored, as
/// pydantic ignores them).
#[derive(Deserialize)]
struct PlainMessage {
    role: String,
    content: String,
}

/// The request, when `body` is a plain valid one. Anything else (an error, a lax value
/// such as `"64"` or `64.0`, a duplicate key) is `None` and left to [`parse_full`], which
/// decides; for what this takes, it gives the same request.
fn parse_plain(body: &[u8]) -> Option<ChatRequest> {
    let plain: PlainBody = serde_json::from_slice(body).ok()?;
    let max_tokens = plain.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS);
    let temperature = plain.temperature.unwrap_or(DEFAULT_TEMPERATURE);
    let valid = !plain.messages.is_empty()
        && (1..=MAX_TOKENS_LIMIT).contains(&max_tokens)
        && (0.0..=2.0).contains(&temperature);
    valid.then(|| ChatRequest {
        messages: plain
            .messages
            .into_iter()
            .map(|m| Message::text(m.role, m.content))
            .collect(),
        model: plain.model,
        model_hint: plain.model_hint,
        max_tokens: Some(max_tokens),
        temperature,
        stream: plain.stream.unwrap_or(false),
        sampling: Default::default(),
        tools: Vec::new(),
        tool_choice: Default::default(),
        strict_model: false,
        passthrough: Default::default(),
    })
}

/// Parses any body with pydantic's lax rules and error shapes.
fn parse_full(body: &[u8]) -> Result<ChatRequest, ApiError> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        // serde_json points at the last byte read; Python's decoder at the next one when
        // the input ended early.
        let position = byte_position(body, e.line(), e.column()) + usize::from(e.is_eof());
        ApiError::Validation(vec![error(
            "json_invalid",
            vec![json!("body"), json!(position)],
            "JSON decode error",
        )])
    })?;
    validate(value).map_err(ApiError::Validation)
}

fn is_json_content_type(ct: &str) -> bool {
    let essence = ct
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    match essence.split_once('/') {
        Some(("application", sub)) => sub == "json" || sub.ends_with("+json"),
        _ => false,
    }
}

/// serde_json reports line and column; FastAPI reports a position in the document.
fn byte_position(body: &[u8], line: usize, column: usize) -> usize {
    let line_start: usize = body
        .split(|b| *b == b'\n')
        .take(line.saturating_sub(1))
        .map(|l| l.len() + 1)
        .sum();
    (line_start + column.saturating_sub(1)).min(body.len().saturating_sub(1))
}

fn error(kind: &'static str, loc: Vec<Value>, msg: impl Into<String>) -> FieldError {
    FieldError {
        kind,
        loc,
        msg: msg.into(),
    }
}

fn loc(path: &[Value]) -> Vec<Value> {
    let mut l = vec![json!("body")];
    l.extend_from_slice(path);
    l
}

/// Takes the parsed body by value so message strings are moved out, not copied (a
/// 64 KB body would otherwise be copied once more here).
fn validate(value: Value) -> Result<ChatRequest, Vec<FieldError>> {
    let Value::Object(mut object) = value else {
        return Err(vec![error(
            "model_attributes_type",
            vec![json!("body")],
            "Input should be a valid dictionary or object to extract fields from",
        )]);
    };
    let mut errors = Vec::new();
    let messages = validate_messages(&mut object, &mut errors);
    let model = optional_string(&mut object, "model", &mut errors);
    let model_hint = optional_string(&mut object, "model_hint", &mut errors);
    let max_tokens = match object.get("max_tokens") {
        None | Some(Value::Null) => Some(DEFAULT_MAX_TOKENS),
        Some(v) => lax_int(v, "max_tokens", &mut errors).and_then(|n| {
            if n < 1 {
                errors.push(bound_error(
                    "greater_than_equal",
                    "max_tokens",
                    "greater than or equal to 1",
                ));
                None
            } else if n > MAX_TOKENS_LIMIT as i128 {
                errors.push(bound_error(
                    "less_than_equal",
                    "max_tokens",
                    &format!("less than or equal to {MAX_TOKENS_LIMIT}"),
                ));
                None
            } else {
                Some(n as u64)
            }
        }),
    };
    let temperature = match object.get("temperature") {
        None | Some(Value::Null) => Some(DEFAULT_TEMPERATURE),
        Some(v) => lax_float(v, "temperature", &mut errors).and_then(|t| {
            if t < 0.0 {
                errors.push(bound_error(
                    "greater_than_equal",
                    "temperature",
                    "greater than or equal to 0",
                ));
                None
            } else if t > 2.0 {
                errors.push(bound_error(
                    "less_than_equal",
                    "temperature",
                    "less than or equal to 2",
                ));
                None
            } else {
                Some(t)
            }
        }),
    };
    let stream = match object.get("stream") {
        None | Some(Value::Null) => Some(false),
        Some(v) => lax_bool(v, "stream", &mut errors),
    };
    match (messages, model, model_hint, max_tokens, temperature, stream) {
        (
            Some(messages),
            Some(model),
            Some(model_hint),
            Some(max_tokens),
            Some(temperature),
            Some(stream),
        ) if errors.is_empty() => Ok(ChatRequest {
            messages,
            model,
            model_hint,
            max_tokens: Some(max_tokens),
            temperature,
            stream,
            sampling: Default::default(),
            tools: Vec::new(),
            tool_choice: Default::default(),
            strict_model: false,
            passthrough: Default::default(),
        }),
        _ => Err(errors),
    }
}

fn bound_error(kind: &'static str, field: &str, bound: &str) -> FieldError {
    error(
        kind,
        loc(&[json!(field)]),
        format!("Input should be {bound}"),
    )
}

fn validate_messages(
    object: &mut Map<String, Value>,
    errors: &mut Vec<FieldError>,
) -> Option<Vec<Message>> {
    let Some(value) = object.remove("messages") else {
        errors.push(error(
            "missing",
            loc(&[json!("messages")]),
            "Field required",
        ));
        return None;
    };
    let Value::Array(items) = value else {
        errors.push(error(
            "list_type",
            loc(&[json!("messages")]),
            "Input should be a valid list",
        ));
        return None;
    };
    if items.is_empty() {
        errors.push(error(
            "too_short",
            loc(&[json!("messages")]),
            "List should have at least 1 item after validation, not 0",
        ));
        return None;
    }
    let before = errors.len();
    let mut messages = Vec::with_capacity(items.len());
    for (index, item) in items.into_iter().enumerate() {
        let Value::Object(mut fields) = item else {
            errors.push(error(
                "model_attributes_type",
                loc(&[json!("messages"), json!(index)]),
                "Input should be a valid dictionary or object to extract fields from",
            ));
            continue;
        };
        let mut field = |name: &str| match fields.remove(name) {
            None => {
                errors.push(error(
                    "missing",
                    loc(&[json!("messages"), json!(index), json!(name)]),
                    "Field required",
                ));
                None
            }
            Some(Value::String(s)) => Some(s),
            Some(_) => {
                errors.push(error(
                    "string_type",
                    loc(&[json!("messages"), json!(index), json!(name)]),
                    "Input should be a valid string",
                ));
                None
            }
        };
        let role = field("role");
        let content = field("content");
        if let (Some(role), Some(content)) = (role, content) {
            messages.push(Message::text(role, content));
        }
    }
    (errors.len() == before).then_some(messages)
}

fn optional_string(
    object: &mut Map<String, Value>,
    name: &str,
    errors: &mut Vec<FieldError>,
) -> Option<Option<String>> {
    match object.remove(name) {
        None | Some(Value::Null) => Some(None),
        Some(Value::String(s)) => Some(Some(s)),
        Some(_) => {
            errors.push(error(
                "string_type",
                loc(&[json!(name)]),
                "Input should be a valid string",
            ));
            None
        }
    }
}

/// pydantic's lax integer: integers, floats without a fraction, and strings of digits
/// (an optional `+`, ASCII spaces around).
/// `field` names the body field; its error location is built only on error (building it
/// up front cost four allocations per field on every valid request).
fn lax_int(value: &Value, field: &str, errors: &mut Vec<FieldError>) -> Option<i128> {
    let parsed = match value {
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                Ok(i as i128)
            } else if let Some(u) = n.as_u64() {
                Ok(u as i128)
            } else {
                match n.as_f64() {
                    Some(f) if f.fract() == 0.0 && f.abs() < 1e30 => Ok(f as i128),
                    Some(f) if f.fract() == 0.0 => Ok(if f > 0.0 { i128::MAX } else { i128::MIN }),
                    _ => Err((
                        "int_from_float",
                        "Input should be a valid integer, got a number with a fractional part",
                    )),
                }
            }
        }
        Value::String(s) => {
            let digits = trim_ascii_space(s);
            let digits = digits.strip_prefix('+').unwrap_or(digits);
            (!digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()))
                .then(|| digits.trim_start_matches('0'))
                .and_then(|digits| match digits {
                    "" => Some(0),
                    // Longer than any i128: certainly past the limit.
                    d if d.len() > 38 => Some(i128::MAX),
                    d => d.parse::<i128>().ok(),
                })
                .ok_or((
                    "int_parsing",
                    "Input should be a valid integer, unable to parse string as an integer",
                ))
        }
        _ => Err(("int_type", "Input should be a valid integer")),
    };
    parsed
        .map_err(|(kind, msg)| errors.push(error(kind, loc(&[json!(field)]), msg)))
        .ok()
}

/// pydantic's lax float: numbers and plain decimal strings (see [`is_plain_decimal`]).
fn lax_float(value: &Value, field: &str, errors: &mut Vec<FieldError>) -> Option<f64> {
    let parsed = match value {
        Value::Number(n) => n
            .as_f64()
            .ok_or(("float_type", "Input should be a valid number")),
        Value::String(s) => Some(trim_ascii_space(s))
            .filter(|s| is_plain_decimal(s))
            .and_then(|s| s.parse::<f64>().ok())
            .filter(|f| f.is_finite())
            .ok_or((
                "float_parsing",
                "Input should be a valid number, unable to parse string as a number",
            )),
        _ => Err(("float_type", "Input should be a valid number")),
    };
    parsed
        .map_err(|(kind, msg)| errors.push(error(kind, loc(&[json!(field)]), msg)))
        .ok()
}

/// pydantic's lax boolean: booleans, 0/1, and the usual words.
fn lax_bool(value: &Value, field: &str, errors: &mut Vec<FieldError>) -> Option<bool> {
    let parsed = match value {
        Value::Bool(b) => Some(*b),
        Value::Number(n) => match n.as_f64() {
            Some(0.0) => Some(false),
            Some(1.0) => Some(true),
            _ => None,
        },
        Value::String(s) => match trim_ascii_space(s).to_ascii_lowercase().as_str() {
            "0" | "off" | "f" | "false" | "n" | "no" => Some(false),
            "1" | "on" | "t" | "true" | "y" | "yes" => Some(true),
            _ => None,
        },
        _ => None,
    };
    if parsed.is_none() {
        let (kind, msg) = match value {
            Value::String(_) | Value::Number(_) => (
                "bool_parsing",
                "Input should be a valid boolean, unable to interpret input",
            ),
            _ => ("bool_type", "Input should be a valid boolean"),
        };
        errors.push(error(kind, loc(&[json!(field)]), msg));
    }
    parsed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors_of(body: &str) -> Vec<FieldError> {
        match parse_chat_request(body.as_bytes(), None) {
            Err(ApiError::Validation(errors)) => errors,
            other => panic!("expected a validation error, got {other:?}"),
        }
    }

    #[test]
    fn the_plain_path_takes_plain_bodies_and_agrees_with_full_validation() {
        let m = r#""messages":[{"role":"user","content":"hi \"there\" \u00e9"}]"#;
        let plain = [
            format!("{{{m}}}"),
            format!(r#"{{{m},"max_tokens":64,"temperature":0,"stream":true,"x":[1]}}"#),
            format!(r#"{{{m},"model":"gemini-pro","model_hint":null,"temperature":2}}"#),
            format!(r#"{{"max_tokens":4294967295,"temperature":-0.0,{m}}}"#),
            r#"{"m\u0065ssages":[{"content":"c","role":"r","extra":{}}]}"#.to_owned(),
        ];
        for body in &plain {
            let fast = parse_plain(body.as_bytes()).unwrap_or_else(|| panic!("{body}"));
            assert_eq!(parse_full(body.as_bytes()).unwrap(), fast, "{body}");
        }
        // Left to full validation: errors, lax values, duplicates, out-of-range values.
        let others = [
            format!("{{{m},\"max_tokens\":\"64\"}}"),
            format!("{{{m},\"max_tokens\":64.0}}"),
            format!("{{{m},\"max_tokens\":0}}"),
            format!("{{{m},\"max_tokens\":4294967296}}"),
            format!("{{{m},\"max_tokens\":-1}}"),
            format!("{{{m},\"temperature\":2.0001}}"),
            format!("{{{m},\"temperature\":\"1\"}}"),
            format!("{{{m},\"stream\":\"yes\"}}"),
            format!("{{{m},\"stream\":1}}"),
            format!("{{{m},\"model\":7}}"),
            format!("{{{m},{m}}}"),
            r#"{"messages":[{"role":"u","content":"a","content":"b"}]}"#.to_owned(),
            r#"{"messages":[]}"#.to_owned(),
            r#"{"messages":[{"role":"u"}]}"#.to_owned(),
            r#"{"messages":null}"#.to_owned(),
            "[]".to_owned(),
            "{".to_owned(),
        ];
        for body in &others {
            assert_eq!(parse_plain(body.as_bytes()), None, "{body}");
        }
        // Where full validation accepts one of them, it is by its own lax rules.
        assert_eq!(
            parse_full(format!("{{{m},\"max_tokens\":64.0}}").as_bytes())
                .unwrap()
                .max_tokens,
            Some(64)
        );
        let last_wins = parse_chat_request(others[11].as_bytes(), None).unwrap();
        assert_eq!(last_wins.messages[0].content, "b");
    }

    #[test]
    fn a_minimal_request_gets_the_original_defaults() {
        let r = parse_chat_request(
            br#"{"messages":[{"role":"user","content":"hi"}],"extra":1}"#,
            None,
        )
        .unwrap();
        assert_eq!(r.max_tokens, Some(512));
        assert_eq!(r.temperature, 0.7);
        assert!(!r.stream);
        assert_eq!(r.model, None);
        assert_eq!(r.messages[0].content, "hi");
    }

    #[test]
    fn lax_values_are_coerced_like_pydantic() {
        let r = parse_chat_request(
            br#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":"64","temperature":"1.5","stream":"yes"}"#,
            Some("application/json; charset=utf-8"),
        )
        .unwrap();
        assert_eq!(
            (r.max_tokens, r.temperature, r.stream),
            (Some(64), 1.5, true)
        );
        let r = parse_chat_request(
            br#"{"messages":[{"role":"user","content":"hi"}],"max_tokens":64.0}"#,
            None,
        )
        .unwrap();
        assert_eq!(r.max_tokens, Some(64));
    }

    #[test]
    fn schema_failures_carry_fastapi_types_and_locations() {
        let cases: &[(&str, &str, Value)] = &[
            ("{}", "missing", json!(["body", "messages"])),
            (
                r#"{"messages":[]}"#,
                "too_short",
                json!(["body", "messages"]),
            ),
            (
                r#"{"messages":"hi"}"#,
                "list_type",
                json!(["body", "messages"]),
            ),
            (
                r#"{"messages":[1]}"#,
                "model_attributes_type",
                json!(["body", "messages", 0]),
            ),
            (
                r#"{"messages":[{"role":"user"}]}"#,
                "missing",
                json!(["body", "messages", 0, "content"]),
            ),
            (
                r#"{"messages":[{"role":"user","content":5}]}"#,
                "string_type",
                json!(["body", "messages", 0, "content"]),
            ),
            (
                r#"{"messages":[{"role":"u","content":"c"}],"max_tokens":0}"#,
                "greater_than_equal",
                json!(["body", "max_tokens"]),
            ),
            (
                r#"{"messages":[{"role":"u","content":"c"}],"max_tokens":1.5}"#,
                "int_from_float",
                json!(["body", "max_tokens"]),
            ),
            (
                r#"{"messages":[{"role":"u","content":"c"}],"max_tokens":1e300}"#,
                "less_than_equal",
                json!(["body", "max_tokens"]),
            ),
            (
                r#"{"messages":[{"role":"u","content":"c"}],"temperature":2.5}"#,
                "less_than_equal",
                json!(["body", "temperature"]),
            ),
            (
                r#"{"messages":[{"role":"u","content":"c"}],"temperature":-1}"#,
                "greater_than_equal",
                json!(["body", "temperature"]),
            ),
            (
                r#"{"messages":[{"role":"u","content":"c"}],"stream":"maybe"}"#,
                "bool_parsing",
                json!(["body", "stream"]),
            ),
            (
                r#"{"messages":[{"role":"u","content":"c"}],"model":7}"#,
                "string_type",
                json!(["body", "model"]),
            ),
            ("[1,2]", "model_attributes_type", json!(["body"])),
            ("{\"messages\": [", "json_invalid", json!(["body", 14])),
        ];
        for (body, kind, at) in cases {
            let errors = errors_of(body);
            assert_eq!(errors[0].kind, *kind, "{body}");
            assert_eq!(json!(errors[0].loc), *at, "{body}");
        }
    }

    #[test]
    fn errors_never_echo_message_text() {
        let body = r#"{"messages":[{"role":"user","content":"top secret"}],"temperature":9}"#;
        let rendered = serde_json::to_string(&errors_of(body)).unwrap();
        assert!(!rendered.contains("top secret"));
    }

    #[test]
    fn non_json_content_types_are_rejected_like_fastapi() {
        let err = parse_chat_request(b"messages=hi", Some("application/x-www-form-urlencoded"))
            .unwrap_err();
        assert!(matches!(err, ApiError::Validation(ref e) if e[0].kind == "model_attributes_type"));
        assert!(parse_chat_request(
            br#"{"messages":[{"role":"u","content":"c"}]}"#,
            Some("application/vnd.api+json")
        )
        .is_ok());
    }

    #[test]
    fn deeply_nested_json_is_a_clean_error() {
        let body = format!(
            "{{\"messages\":{}{}}}",
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        assert!(matches!(
            parse_chat_request(body.as_bytes(), None),
            Err(ApiError::Validation(_))
        ));
    }
}
