//! The OpenAI door's request: a Chat Completions body, validated field by field into the
//! core's [`ChatRequest`], every failure a 400 naming its field (`param`), and every
//! field the upstreams cannot honour refused by name rather than dropped.

use serde_json::{Map, Value};

use super::error::OpenAiError;
use super::tools;
use crate::domain::{ChatRequest, Message, ResponseFormat, Sampling, ToolChoice, ToolResult};

/// OpenAI's documented default temperature.
const DEFAULT_TEMPERATURE: f64 = 1.0;
/// Stop sequences at most, as OpenAI allows.
const MAX_STOP: usize = 4;
/// Largest accepted `max_tokens`: no model comes near it.
const MAX_TOKENS_LIMIT: u64 = u32::MAX as u64;

/// The largest integer a float holds exactly (2^53).
pub const EXACT_FLOAT_INTEGER: f64 = 9_007_199_254_740_992.0;

/// A parsed Chat Completions request.
#[derive(Debug)]
pub struct OpenAiRequest {
    /// The request in the core's terms.
    pub chat: ChatRequest,
    /// The model the client named.
    pub model: String,
    /// `stream_options.include_usage`.
    pub include_usage: bool,
}

impl AsRef<ChatRequest> for OpenAiRequest {
    fn as_ref(&self) -> &ChatRequest {
        &self.chat
    }
}

impl OpenAiRequest {
    /// The cache key: the request as it reaches the upstream, in the door's namespace
    /// (`stream`, `stream_options` and `user` change nothing upstream, so they are not
    /// in it).
    pub fn cache_key(&self) -> String {
        crate::cache::request_key("openai/chat/v1", &self.chat)
    }
}

/// Parses `body` (a UTF-8 BOM in front is skipped, as FastAPI and most JSON APIs do).
pub fn parse(body: &[u8]) -> Result<OpenAiRequest, OpenAiError> {
    let body = body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(body);
    if let Some(request) = parse_plain(body) {
        return Ok(request);
    }
    parse_full(body)
}

/// The shape nearly every request has (string contents, plain numbers), read straight
/// into its types: no `Value` tree to build and take apart. Anything else (an error,
/// content parts, `stop`, `response_format`, an extra field on a message, a duplicate
/// key) is `None` and left to [`parse_full`], which decides; for what this takes, it
/// gives the same request (a unit test holds the two together). An OpenAI-door miss
/// cost ~12% more than an original-door miss in `scripts/bench.sh` with only the full
/// path.
fn parse_plain(body: &[u8]) -> Option<OpenAiRequest> {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Plain {
        model: String,
        messages: Vec<PlainMessage>,
        max_tokens: Option<u64>,
        max_completion_tokens: Option<u64>,
        temperature: Option<f64>,
        top_p: Option<f64>,
        n: Option<u64>,
        stream: Option<bool>,
        stream_options: Option<PlainStreamOptions>,
        seed: Option<i64>,
        presence_penalty: Option<f64>,
        frequency_penalty: Option<f64>,
        // Read to be refused when it is not a string; it changes nothing upstream.
        #[allow(dead_code)]
        user: Option<String>,
        logprobs: Option<bool>,
    }
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct PlainMessage {
        role: String,
        content: String,
    }
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct PlainStreamOptions {
        include_usage: Option<bool>,
    }
    let plain: Plain = serde_json::from_slice(body).ok()?;
    let within =
        |value: Option<f64>, min: f64, max: f64| value.is_none_or(|v| (min..=max).contains(&v));
    let max_tokens = plain.max_completion_tokens.or(plain.max_tokens);
    let valid = !plain.model.is_empty()
        && !plain.messages.is_empty()
        && [plain.max_tokens, plain.max_completion_tokens]
            .iter()
            .all(|n| n.is_none_or(|n| (1..=MAX_TOKENS_LIMIT).contains(&n)))
        && within(plain.temperature, 0.0, 2.0)
        && within(plain.top_p, 0.0, 1.0)
        && within(plain.presence_penalty, -2.0, 2.0)
        && within(plain.frequency_penalty, -2.0, 2.0)
        && plain.n.is_none_or(|n| n == 1)
        && plain.logprobs != Some(true);
    if !valid {
        return None;
    }
    let messages = plain
        .messages
        .into_iter()
        .map(|m| {
            let role = match m.role.as_str() {
                "system" | "developer" => "system",
                "user" => "user",
                "assistant" => "assistant",
                _ => return None,
            };
            Some(Message::text(role, m.content))
        })
        .collect::<Option<Vec<_>>>()?;
    Some(OpenAiRequest {
        chat: ChatRequest {
            messages,
            model: Some(plain.model.clone()),
            model_hint: None,
            max_tokens,
            temperature: plain.temperature.unwrap_or(DEFAULT_TEMPERATURE),
            stream: plain.stream.unwrap_or(false),
            sampling: Sampling {
                top_p: plain.top_p,
                seed: plain.seed,
                presence_penalty: plain.presence_penalty,
                frequency_penalty: plain.frequency_penalty,
                ..Sampling::default()
            },
            tools: Vec::new(),
            tool_choice: ToolChoice::Auto,
            strict_model: true,
            passthrough: Default::default(),
        },
        model: plain.model,
        include_usage: plain
            .stream_options
            .and_then(|o| o.include_usage)
            .unwrap_or(false),
    })
}

/// Parses any body, naming the field of every failure.
fn parse_full(body: &[u8]) -> Result<OpenAiRequest, OpenAiError> {
    let Ok(Value::Object(object)) = serde_json::from_slice::<Value>(body) else {
        return Err(OpenAiError::unparsable());
    };
    let fields = Fields(&object);
    // What the door does not read goes on to an OpenAI-compatible upstream as it is
    // (any other upstream refuses it by name); what would change the answer's shape
    // beyond what the door renders is refused here.
    let mut passthrough = Map::new();
    for (name, value) in &object {
        if SHAPE_CHANGING.contains(&name.as_str()) {
            return Err(OpenAiError::unsupported(name));
        }
        if !KNOWN.contains(&name.as_str()) {
            passthrough.insert(name.clone(), value.clone());
        }
    }
    if fields.boolean("logprobs")? == Some(true) {
        return Err(OpenAiError::unsupported("logprobs"));
    }
    let model = match object.get("model") {
        Some(Value::String(model)) if !model.is_empty() => model.clone(),
        Some(Value::String(_)) => {
            return Err(OpenAiError::invalid("model", "'model' must not be empty."))
        }
        Some(_) => return Err(type_error("model", "a string")),
        None => {
            return Err(OpenAiError::invalid(
                "model",
                "you must provide a model parameter",
            ))
        }
    };
    let messages = messages(object.get("messages"))?;
    let max_tokens = match (
        fields.integer("max_completion_tokens", 1, MAX_TOKENS_LIMIT)?,
        fields.integer("max_tokens", 1, MAX_TOKENS_LIMIT)?,
    ) {
        (Some(n), _) | (None, Some(n)) => Some(n as u64),
        (None, None) => None,
    };
    if let Some(n) = fields.integer("n", 1, 128)? {
        if n > 1 {
            return Err(OpenAiError {
                code: Some("unsupported_parameter"),
                ..OpenAiError::invalid(
                    "n",
                    "Only one choice (n = 1) is supported by the upstream serving this model.",
                )
            });
        }
    }
    let stream = fields.boolean("stream")?.unwrap_or(false);
    let include_usage = match object.get("stream_options") {
        None | Some(Value::Null) => false,
        Some(Value::Object(options)) => match options.get("include_usage") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(include)) => *include,
            Some(_) => return Err(type_error("stream_options.include_usage", "a boolean")),
        },
        Some(_) => return Err(type_error("stream_options", "an object")),
    };
    if let Some(user) = object.get("user") {
        if !user.is_string() && !user.is_null() {
            return Err(type_error("user", "a string"));
        }
    }
    let sampling = Sampling {
        top_p: fields.number("top_p", 0.0, 1.0)?,
        top_k: None,
        stop: stop(object.get("stop"))?,
        seed: fields
            .integer("seed", i64::MIN, i64::MAX as u64)?
            .map(|seed| seed as i64),
        presence_penalty: fields.number("presence_penalty", -2.0, 2.0)?,
        frequency_penalty: fields.number("frequency_penalty", -2.0, 2.0)?,
        response_format: response_format(object.get("response_format"))?,
    };
    let tools = tools::tools(object.get("tools"))?;
    let tool_choice = tools::tool_choice(object.get("tool_choice"), &tools)?;
    tools::parallel_tool_calls(object.get("parallel_tool_calls"))?;
    let chat = ChatRequest {
        messages,
        model: Some(model.clone()),
        model_hint: None,
        max_tokens,
        temperature: fields
            .number("temperature", 0.0, 2.0)?
            .unwrap_or(DEFAULT_TEMPERATURE),
        stream,
        sampling,
        tools,
        tool_choice,
        strict_model: true,
        passthrough,
    };
    Ok(OpenAiRequest {
        chat,
        model,
        include_usage,
    })
}

/// Fields whose answer the door could not relay (audio, log probabilities, the legacy
/// `functions`): refused by name whatever the upstream.
const SHAPE_CHANGING: [&str; 5] = [
    "audio",
    "modalities",
    "top_logprobs",
    "functions",
    "function_call",
];

/// Every field the door reads; anything else (`logit_bias`, `service_tier`, ...) passes
/// through to OpenAI-compatible upstreams and is refused by name by the others.
const KNOWN: [&str; 19] = [
    "model",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "n",
    "stream",
    "stream_options",
    "stop",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "response_format",
    "user",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    // Only `false` (or null): log probabilities cannot be had from the upstreams.
    "logprobs",
];

/// Typed access to the body's fields, with OpenAI's error wording.
struct Fields<'a>(&'a Map<String, Value>);

impl Fields<'_> {
    fn number(&self, name: &str, min: f64, max: f64) -> Result<Option<f64>, OpenAiError> {
        match self.0.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) => match n.as_f64() {
                Some(v) if (min..=max).contains(&v) => Ok(Some(v)),
                _ => Err(OpenAiError::invalid(
                    name,
                    format!("Invalid '{name}': must be a number from {min} to {max}."),
                )),
            },
            Some(_) => Err(type_error(name, "a number")),
        }
    }

    fn integer(&self, name: &str, min: i64, max: u64) -> Result<Option<i128>, OpenAiError> {
        let value = match self.0.get(name) {
            None | Some(Value::Null) => return Ok(None),
            // A float without a fraction is an integer, as JSON Schema counts it, where
            // it is exact (an integer too large for i64 also arrives as a float: its
            // rounded value must not pass a range check the number itself fails).
            Some(Value::Number(n)) => n
                .as_i64()
                .map(i128::from)
                .or_else(|| n.as_u64().map(i128::from))
                .or_else(|| {
                    n.as_f64()
                        .filter(|f| f.fract() == 0.0 && f.abs() <= EXACT_FLOAT_INTEGER)
                        .map(|f| f as i128)
                }),
            Some(_) => None,
        };
        match value {
            Some(v) if v >= i128::from(min) && v <= i128::from(max) => Ok(Some(v)),
            Some(_) => Err(OpenAiError::invalid(
                name,
                format!("Invalid '{name}': must be an integer from {min} to {max}."),
            )),
            None => Err(type_error(name, "an integer")),
        }
    }

    fn boolean(&self, name: &str) -> Result<Option<bool>, OpenAiError> {
        match self.0.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(type_error(name, "a boolean")),
        }
    }
}

/// `Invalid type for '<param>': expected <expected>.`
pub(super) fn type_error(param: &str, expected: &str) -> OpenAiError {
    OpenAiError::invalid(
        param,
        format!("Invalid type for '{param}': expected {expected}."),
    )
}

/// The roles a conversation may hold; `developer` is OpenAI's newer name for `system`.
/// (`function`, the deprecated form of `tool`, is refused by name.)
fn role(value: Option<&Value>, param: &str) -> Result<&'static str, OpenAiError> {
    match value.and_then(Value::as_str) {
        Some("system") | Some("developer") => Ok("system"),
        Some("user") => Ok("user"),
        Some("assistant") => Ok("assistant"),
        Some("tool") => Ok("tool"),
        Some("function") => Err(OpenAiError::unsupported(param)),
        Some(other) => Err(OpenAiError::invalid(
            param,
            format!("Invalid value: '{}'. Supported values are: 'system', 'developer', 'user', 'assistant' and 'tool'.", other.escape_default()),
        )),
        None => Err(OpenAiError::invalid(
            param,
            format!("Missing required parameter: '{param}'."),
        )),
    }
}

fn messages(value: Option<&Value>) -> Result<Vec<Message>, OpenAiError> {
    let Some(value) = value else {
        return Err(OpenAiError::invalid(
            "messages",
            "Missing required parameter: 'messages'.",
        ));
    };
    let Value::Array(items) = value else {
        return Err(type_error("messages", "an array"));
    };
    if items.is_empty() {
        return Err(OpenAiError::invalid(
            "messages",
            "Invalid 'messages': empty array. Expected an array with minimum length 1.",
        ));
    }
    let mut messages: Vec<Message> = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let at = format!("messages[{i}]");
        let Value::Object(message) = item else {
            return Err(type_error(&at, "an object"));
        };
        let role = role(message.get("role"), &format!("{at}.role"))?;
        let content_at = format!("{at}.content");
        let message = match role {
            "assistant" => {
                let tool_calls = tools::assistant_calls(message, &at)?;
                // A turn that called tools may have no text.
                let content = match message.get("content") {
                    None | Some(Value::Null) if !tool_calls.is_empty() => String::new(),
                    value => content(value, &content_at)?,
                };
                Message {
                    tool_calls,
                    ..Message::text(role, content)
                }
            }
            "tool" => {
                let param = format!("{at}.tool_call_id");
                let call_id = match message.get("tool_call_id") {
                    Some(Value::String(id)) => id,
                    Some(_) => return Err(type_error(&param, "a string")),
                    None => {
                        return Err(OpenAiError::invalid(
                            &param,
                            format!("Missing required parameter: '{param}'."),
                        ))
                    }
                };
                // Gemini and Ollama name a result by its function: the call says which.
                let Some(call) = messages
                    .iter()
                    .rev()
                    .flat_map(|m| &m.tool_calls)
                    .find(|call| &call.id == call_id)
                else {
                    return Err(OpenAiError::invalid(
                        &param,
                        format!("Invalid '{param}': a message with role 'tool' must answer a tool call of an earlier assistant message."),
                    ));
                };
                Message {
                    tool_result: Some(ToolResult {
                        call_id: call_id.clone(),
                        name: call.name.clone(),
                        is_error: false,
                    }),
                    ..Message::text(role, content(message.get("content"), &content_at)?)
                }
            }
            _ => {
                // A turn that called no tool may say so (null or []).
                match message.get("tool_calls") {
                    None | Some(Value::Null) => {}
                    Some(Value::Array(calls)) if calls.is_empty() => {}
                    Some(_) => return Err(OpenAiError::unsupported(&format!("{at}.tool_calls"))),
                }
                Message::text(role, content(message.get("content"), &content_at)?)
            }
        };
        messages.push(message);
    }
    Ok(messages)
}

/// A message's content: a string, or an array of text parts (joined with newlines).
fn content(value: Option<&Value>, param: &str) -> Result<String, OpenAiError> {
    match value {
        Some(Value::String(text)) => Ok(text.clone()),
        Some(Value::Array(parts)) => {
            let mut texts = Vec::with_capacity(parts.len());
            for (j, part) in parts.iter().enumerate() {
                let at = format!("{param}[{j}]");
                match part.get("type").and_then(Value::as_str) {
                    Some("text") => match part.get("text") {
                        Some(Value::String(text)) => texts.push(text.as_str()),
                        _ => return Err(type_error(&format!("{at}.text"), "a string")),
                    },
                    Some(_) => return Err(OpenAiError::unsupported(&format!("{at}.type"))),
                    None => return Err(type_error(&format!("{at}.type"), "a string")),
                }
            }
            Ok(texts.join("\n"))
        }
        None | Some(Value::Null) => Err(OpenAiError::invalid(
            param,
            format!("Missing required parameter: '{param}'."),
        )),
        Some(_) => Err(type_error(param, "a string or an array of content parts")),
    }
}

fn stop(value: Option<&Value>) -> Result<Vec<String>, OpenAiError> {
    let stops = match value {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::String(stop)) => vec![stop.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .map(|item| match item {
                Value::String(stop) => Ok(stop.clone()),
                _ => Err(type_error("stop", "a string or an array of strings")),
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(type_error("stop", "a string or an array of strings")),
    };
    if stops.len() > MAX_STOP {
        return Err(OpenAiError::invalid(
            "stop",
            format!("Invalid 'stop': at most {MAX_STOP} sequences."),
        ));
    }
    Ok(stops)
}

fn response_format(value: Option<&Value>) -> Result<ResponseFormat, OpenAiError> {
    let format = match value {
        None | Some(Value::Null) => return Ok(ResponseFormat::Text),
        Some(Value::Object(format)) => format,
        Some(_) => return Err(type_error("response_format", "an object")),
    };
    match format.get("type").and_then(Value::as_str) {
        Some("text") => Ok(ResponseFormat::Text),
        Some("json_object") => Ok(ResponseFormat::JsonObject),
        Some("json_schema") => match format.get("json_schema").and_then(|s| s.get("schema")) {
            Some(schema @ Value::Object(_)) => Ok(ResponseFormat::JsonSchema(schema.clone())),
            _ => Err(OpenAiError::invalid(
                "response_format.json_schema.schema",
                "Missing required parameter: 'response_format.json_schema.schema'.",
            )),
        },
        _ => Err(OpenAiError::invalid(
            "response_format.type",
            "Invalid value: expected 'text', 'json_object' or 'json_schema'.",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Tool;

    fn param_of(body: &str) -> Option<String> {
        parse(body.as_bytes()).unwrap_err().param
    }

    #[test]
    fn a_plain_request_becomes_the_cores_request() {
        let parsed = parse(
            br#"{"model":"llama3.1","messages":[{"role":"developer","content":"be brief"},{"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}],"max_tokens":20,"stop":"END","stream":true,"stream_options":{"include_usage":true},"user":"u-1"}"#,
        )
        .unwrap();
        assert_eq!(parsed.model, "llama3.1");
        assert!(parsed.include_usage && parsed.chat.stream);
        assert_eq!(parsed.chat.max_tokens, Some(20));
        assert_eq!(parsed.chat.temperature, DEFAULT_TEMPERATURE);
        assert_eq!(parsed.chat.sampling.stop, ["END"]);
        assert_eq!(parsed.chat.messages[0].role, "system");
        assert_eq!(parsed.chat.messages[1].content, "a\nb");
    }

    #[test]
    fn each_invalid_field_is_named() {
        let cases = [
            (
                r#"{"messages":[{"role":"user","content":"x"}]}"#,
                Some("model"),
            ),
            (r#"{"model":"m","messages":[]}"#, Some("messages")),
            (
                r#"{"model":"m","messages":[{"role":"robot","content":"x"}]}"#,
                Some("messages[0].role"),
            ),
            (
                r#"{"model":"m","messages":[{"role":"user"}]}"#,
                Some("messages[0].content"),
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":5}]}"#,
                Some("messages[0].content"),
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"temperature":3}"#,
                Some("temperature"),
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"max_tokens":0}"#,
                Some("max_tokens"),
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"max_tokens":"5"}"#,
                Some("max_tokens"),
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"n":2}"#,
                Some("n"),
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"tools":[{"type":"function"}]}"#,
                Some("tools[0].function"),
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"tools":[{"type":"function","function":{"name":"a b"}}]}"#,
                Some("tools[0].function.name"),
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"tools":[]}"#,
                Some("tools"),
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"tools":[{"type":"custom","custom":{"name":"a"}}]}"#,
                Some("tools[0].type"),
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"tool_choice":"required"}"#,
                Some("tool_choice"),
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"tools":[{"type":"function","function":{"name":"a"}}],"tool_choice":{"type":"function","function":{"name":"b"}}}"#,
                Some("tool_choice"),
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"tools":[{"type":"function","function":{"name":"a"}}],"parallel_tool_calls":false}"#,
                Some("parallel_tool_calls"),
            ),
            (
                r#"{"model":"m","messages":[{"role":"tool","content":"x","tool_call_id":"c1"}]}"#,
                Some("messages[0].tool_call_id"),
            ),
            (
                r#"{"model":"m","messages":[{"role":"assistant","content":null,"tool_calls":[{"id":"c1","type":"function","function":{"name":"a","arguments":"[1]"}}]}]}"#,
                Some("messages[0].tool_calls[0].function.arguments"),
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"audio":{}}"#,
                Some("audio"),
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"stream_options":5}"#,
                Some("stream_options"),
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x"}],"logprobs":true}"#,
                Some("logprobs"),
            ),
            (
                r#"{"model":"m","messages":[{"role":"assistant","content":"x","tool_calls":[{}]}]}"#,
                Some("messages[0].tool_calls[0].id"),
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":"x","tool_calls":[{}]}]}"#,
                Some("messages[0].tool_calls"),
            ),
            (
                r#"{"model":"m","messages":[{"role":"function","content":"x","name":"f"}]}"#,
                Some("messages[0].role"),
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":[{"type":"image_url"}]}]}"#,
                Some("messages[0].content[0].type"),
            ),
            ("[1,2]", None),
            ("not json", None),
        ];
        for (body, param) in cases {
            assert_eq!(
                param_of(body).as_deref().filter(|p| !p.is_empty()),
                param,
                "{body}"
            );
        }
    }

    #[test]
    fn tools_calls_and_results_become_the_cores_terms() {
        let parsed = parse(
            br#"{"model":"m","messages":[
                {"role":"user","content":"weather?"},
                {"role":"assistant","content":null,"tool_calls":[{"id":"call_1","type":"function","function":{"name":"get_weather","arguments":"{\"city\":\"Paris\"}"}}]},
                {"role":"tool","tool_call_id":"call_1","content":[{"type":"text","text":"18C"}]}],
              "tools":[{"type":"function","function":{"name":"get_weather","description":"d","parameters":{"type":"object"},"strict":true}}],
              "tool_choice":{"type":"function","function":{"name":"get_weather"}},"parallel_tool_calls":true}"#,
        )
        .unwrap()
        .chat;
        assert_eq!(
            parsed.tools,
            [Tool {
                name: "get_weather".into(),
                description: Some("d".into()),
                parameters: Some(serde_json::json!({"type": "object"})),
                strict: true,
            }]
        );
        assert_eq!(
            parsed.tool_choice,
            ToolChoice::Function("get_weather".into())
        );
        let call = &parsed.messages[1].tool_calls[0];
        assert_eq!(
            (
                call.id.as_str(),
                call.name.as_str(),
                call.arguments.as_str()
            ),
            ("call_1", "get_weather", r#"{"city":"Paris"}"#)
        );
        assert_eq!(parsed.messages[1].content, "");
        let result = &parsed.messages[2];
        assert_eq!(
            (result.role.as_str(), result.content.as_str()),
            ("tool", "18C")
        );
        assert_eq!(
            result.tool_result,
            Some(ToolResult {
                call_id: "call_1".into(),
                name: "get_weather".into(),
                is_error: false
            })
        );
        for (choice, expected) in [
            ("\"none\"", ToolChoice::None),
            ("\"auto\"", ToolChoice::Auto),
            ("\"required\"", ToolChoice::Required),
            ("null", ToolChoice::Auto),
        ] {
            let body = format!(
                r#"{{"model":"m","messages":[{{"role":"user","content":"x"}}],"tools":[{{"type":"function","function":{{"name":"f"}}}}],"tool_choice":{choice}}}"#
            );
            assert_eq!(parse(body.as_bytes()).unwrap().chat.tool_choice, expected);
        }
    }

    #[test]
    fn fields_the_door_does_not_read_are_kept_to_pass_through() {
        let chat = parse(
            br#"{"model":"m","messages":[{"role":"user","content":"x"}],"logit_bias":{"50256":-100},"service_tier":"auto","user":"u"}"#,
        )
        .unwrap()
        .chat;
        let names: Vec<&str> = chat.passthrough.keys().map(String::as_str).collect();
        assert_eq!(
            names,
            ["logit_bias", "service_tier"],
            "user is read, so not among them"
        );
        assert_eq!(
            chat.passthrough["logit_bias"],
            serde_json::json!({"50256": -100})
        );
    }

    #[test]
    fn the_cache_key_ignores_stream_options_and_user_but_nothing_else() {
        let key = |body: &str| parse(body.as_bytes()).unwrap().cache_key();
        let base =
            key(r#"{"model":"m","messages":[{"role":"user","content":"x"}],"temperature":0.5}"#);
        assert!(base.starts_with("cache:"));
        assert_eq!(
            base,
            key(
                r#"{"temperature":0.5,"user":"u","stream":true,"stream_options":{"include_usage":true},"messages":[{"role":"user","content":"x"}],"model":"m"}"#
            ),
            "field order, stream and user do not matter"
        );
        for other in [
            r#"{"model":"m2","messages":[{"role":"user","content":"x"}],"temperature":0.5}"#,
            r#"{"model":"m","messages":[{"role":"user","content":"y"}],"temperature":0.5}"#,
            r#"{"model":"m","messages":[{"role":"user","content":"x"}],"temperature":0.6}"#,
            r#"{"model":"m","messages":[{"role":"user","content":"x"}],"temperature":0.5,"seed":1}"#,
            r#"{"model":"m","messages":[{"role":"user","content":"x"}],"temperature":0.5,"service_tier":"flex"}"#,
            r#"{"model":"m","messages":[{"role":"user","content":"x"}],"temperature":0.5,"tools":[{"type":"function","function":{"name":"f"}}]}"#,
            r#"{"model":"m","messages":[{"role":"user","content":"x"}],"temperature":0.5,"tools":[{"type":"function","function":{"name":"f"}}],"tool_choice":"none"}"#,
        ] {
            assert_ne!(key(other), base, "{other}");
        }
    }

    #[test]
    fn the_plain_path_takes_plain_bodies_and_agrees_with_full_validation() {
        let m = r#""messages":[{"role":"developer","content":"be \"brief\""},{"role":"user","content":"hi é"}]"#;
        let plain = [
            format!(r#"{{"model":"m",{m}}}"#),
            format!(
                r#"{{"model":"m",{m},"max_tokens":64,"temperature":0,"top_p":1,"n":1,"seed":-3}}"#
            ),
            format!(
                r#"{{{m},"model":"gemini-2.5-flash","stream":true,"stream_options":{{"include_usage":true}},"user":"u"}}"#
            ),
            format!(
                r#"{{"model":"m",{m},"max_completion_tokens":4294967295,"presence_penalty":-2,"frequency_penalty":2,"logprobs":false}}"#
            ),
            format!(
                r#"{{"model":"m",{m},"temperature":null,"stream":null,"stream_options":null}}"#
            ),
        ];
        for body in &plain {
            let fast = parse_plain(body.as_bytes()).unwrap_or_else(|| panic!("{body}"));
            let full = parse_full(body.as_bytes()).unwrap();
            assert_eq!(fast.chat, full.chat, "{body}");
            assert_eq!(fast.cache_key(), full.cache_key());
            assert_eq!(
                (fast.model, fast.include_usage),
                (full.model, full.include_usage)
            );
        }
        // Left to the full path, which decides: errors and every richer shape.
        let others = [
            format!(r#"{{"model":"",{m}}}"#),
            format!(r#"{{"model":"m",{m},"max_tokens":0}}"#),
            format!(r#"{{"model":"m",{m},"max_tokens":64.0}}"#),
            format!(r#"{{"model":"m",{m},"temperature":2.5}}"#),
            format!(r#"{{"model":"m",{m},"n":2}}"#),
            format!(r#"{{"model":"m",{m},"logprobs":true}}"#),
            format!(r#"{{"model":"m",{m},"stop":"END"}}"#),
            format!(r#"{{"model":"m",{m},"tools":[]}}"#),
            format!(r#"{{"model":"m",{m},"model":"n"}}"#),
            r#"{"model":"m","messages":[{"role":"tool","content":"x"}]}"#.to_owned(),
            r#"{"model":"m","messages":[{"role":"user","content":"x","name":"a"}]}"#.to_owned(),
            r#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"x"}]}]}"#
                .to_owned(),
            r#"{"model":"m","messages":[]}"#.to_owned(),
        ];
        for body in &others {
            assert!(parse_plain(body.as_bytes()).is_none(), "{body}");
        }
        // Where the full path accepts one of them, the key is the same as for the plain
        // shape of the same request.
        let parts = parse(
            br#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"x"}]}]}"#,
        )
        .unwrap();
        let string = parse(br#"{"model":"m","messages":[{"role":"user","content":"x"}]}"#).unwrap();
        assert_eq!(parts.cache_key(), string.cache_key());
    }

    #[test]
    fn a_byte_order_mark_is_skipped() {
        let body =
            b"\xEF\xBB\xBF{\"model\":\"m\",\"messages\":[{\"role\":\"user\",\"content\":\"x\"}]}";
        assert!(parse(body).is_ok());
    }
}
