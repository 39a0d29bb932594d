//! Ollama: `POST {base}/api/chat`, whole (`stream: false`) or as NDJSON (`stream: true`).

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use hyper::Uri;

use super::framing::Lines;
use super::http::MAX_ANSWER_BYTES;
use super::{
    events_from, json_body, Endpoint, EventStream, Provider, ProviderError, UpstreamClient,
};
use crate::domain::{
    ChatRequest, Completion, FinishReason, Message, ResponseFormat, StreamEvent, ToolCall,
    ToolChoice, Unsupported, Usage,
};

/// An Ollama server.
pub struct Ollama {
    client: UpstreamClient,
    endpoint: Endpoint,
    /// Parsed once: parsing the URL on every call showed up in profiles.
    url: Uri,
}

impl Ollama {
    /// Ollama at `base_url`, e.g. `http://localhost:11434` (validated by settings).
    pub fn new(
        client: UpstreamClient,
        base_url: &str,
        endpoint: Endpoint,
    ) -> Result<Ollama, String> {
        let url = format!("{}/api/chat", base_url.trim_end_matches('/'));
        let url = url
            .parse::<Uri>()
            .map_err(|e| format!("{}: base URL: {e}", endpoint.name))?;
        Ok(Ollama {
            client,
            endpoint,
            url,
        })
    }

    fn body(
        &self,
        request: &ChatRequest,
        model: &str,
        stream: bool,
    ) -> Result<Vec<u8>, ProviderError> {
        json_body(
            &request_body(request, model, stream),
            request.json_size_hint(),
        )
    }
}

/// Ollama's chat body, borrowing the messages' text (no copy of it).
#[derive(Serialize)]
struct OllamaRequest<'a> {
    model: &'a str,
    messages: Vec<OllamaTurn<'a>>,
    stream: bool,
    options: OllamaOptions<'a>,
    /// `"json"`, or a JSON Schema the answer must match.
    #[serde(skip_serializing_if = "Option::is_none")]
    format: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tools: Vec<OllamaTool<'a>>,
}

/// One turn: an assistant's tool calls carry their arguments as an object, and a tool's
/// result names the function (Ollama has no call ids).
#[derive(Serialize)]
struct OllamaTurn<'a> {
    role: &'a str,
    content: &'a str,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tool_calls: Vec<OllamaCall<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_name: Option<&'a str>,
}

#[derive(Serialize)]
struct OllamaCall<'a> {
    function: OllamaFunctionCall<'a>,
}

#[derive(Serialize)]
struct OllamaFunctionCall<'a> {
    name: &'a str,
    arguments: serde_json::Value,
}

#[derive(Serialize)]
struct OllamaTool<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    function: FunctionDeclaration<'a>,
}

#[derive(Serialize)]
struct FunctionDeclaration<'a> {
    name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    description: Option<&'a str>,
    parameters: &'a serde_json::Value,
}

#[derive(Serialize)]
struct OllamaOptions<'a> {
    temperature: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    num_predict: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_k: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    seed: Option<i64>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    stop: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    presence_penalty: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    frequency_penalty: Option<f64>,
}

/// What Ollama cannot honour: it has no way to force a tool call or to hold arguments
/// to their schema.
fn refusal(request: &ChatRequest) -> Option<Unsupported> {
    if let Some(refused) = super::passthrough_refusal(request) {
        return Some(refused);
    }
    if request.tools.is_empty() {
        return None;
    }
    match request.tool_choice {
        ToolChoice::Required | ToolChoice::Function(_) => Some(Unsupported::ForcedToolChoice),
        ToolChoice::None => None,
        ToolChoice::Auto => request
            .tools
            .iter()
            .any(|tool| tool.strict)
            .then_some(Unsupported::StrictTools),
    }
}

/// Ollama's body. `tool_choice: none` is honoured by not offering the tools; what
/// [`refusal`] refuses never reaches here (the tools are offered as `auto`).
fn request_body<'a>(request: &'a ChatRequest, model: &'a str, stream: bool) -> OllamaRequest<'a> {
    let offered = match request.tool_choice {
        ToolChoice::None => &[],
        _ => &request.tools[..],
    };
    let sampling = &request.sampling;
    OllamaRequest {
        model,
        messages: request.messages.iter().map(turn).collect(),
        stream,
        options: OllamaOptions {
            temperature: request.temperature,
            num_predict: request.max_tokens,
            top_p: sampling.top_p,
            top_k: sampling.top_k,
            seed: sampling.seed,
            stop: &sampling.stop,
            presence_penalty: sampling.presence_penalty,
            frequency_penalty: sampling.frequency_penalty,
        },
        format: match &sampling.response_format {
            ResponseFormat::Text => None,
            ResponseFormat::JsonObject => Some(serde_json::Value::from("json")),
            ResponseFormat::JsonSchema(schema) => Some(schema.clone()),
        },
        tools: offered
            .iter()
            .map(|tool| OllamaTool {
                kind: "function",
                function: FunctionDeclaration {
                    name: &tool.name,
                    description: tool.description.as_deref(),
                    parameters: tool.parameters.as_ref().unwrap_or(&NO_PARAMETERS),
                },
            })
            .collect(),
    }
}

/// The schema of a function that takes no arguments.
static NO_PARAMETERS: std::sync::LazyLock<serde_json::Value> =
    std::sync::LazyLock::new(|| serde_json::json!({"type": "object", "properties": {}}));

fn turn(message: &Message) -> OllamaTurn<'_> {
    OllamaTurn {
        role: &message.role,
        content: &message.content,
        tool_calls: message
            .tool_calls
            .iter()
            .map(|call| OllamaCall {
                function: OllamaFunctionCall {
                    name: &call.name,
                    arguments: call.arguments_value(),
                },
            })
            .collect(),
        tool_name: message.tool_result.as_ref().map(|r| r.name.as_str()),
    }
}

/// A whole answer, or one line of a streamed one.
#[derive(Deserialize)]
struct OllamaReply {
    #[serde(default)]
    message: Option<OllamaMessage>,
    #[serde(default)]
    done: bool,
    #[serde(default)]
    done_reason: Option<String>,
    #[serde(default)]
    prompt_eval_count: u64,
    #[serde(default)]
    eval_count: u64,
    /// Set instead of a message when the model failed mid-stream.
    #[serde(default)]
    error: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct OllamaMessage {
    #[serde(default)]
    content: String,
    #[serde(default)]
    tool_calls: Vec<OllamaReplyCall>,
}

#[derive(Deserialize)]
struct OllamaReplyCall {
    /// Newer Ollama versions name their calls.
    #[serde(default)]
    id: Option<String>,
    function: OllamaReplyFunction,
}

#[derive(Deserialize)]
struct OllamaReplyFunction {
    name: String,
    #[serde(default)]
    arguments: serde_json::Value,
}

impl OllamaReplyCall {
    fn into_call(self) -> ToolCall {
        let arguments = match self.function.arguments {
            serde_json::Value::Null => "{}".to_owned(),
            value => value.to_string(),
        };
        match self.id.filter(|id| !id.is_empty()) {
            Some(id) => ToolCall {
                id,
                name: self.function.name,
                arguments,
            },
            None => ToolCall::named(self.function.name, arguments),
        }
    }
}

impl OllamaReply {
    fn usage(&self) -> Usage {
        Usage {
            prompt_tokens: self.prompt_eval_count,
            completion_tokens: self.eval_count,
            total_tokens: self.prompt_eval_count + self.eval_count,
        }
    }

    fn finish_reason(&self) -> FinishReason {
        match self.done_reason.as_deref() {
            Some("length") => FinishReason::Length,
            _ => FinishReason::Stop,
        }
    }
}

/// The events of one NDJSON line.
fn line_events(line: &[u8]) -> Result<Vec<StreamEvent>, ProviderError> {
    if line.iter().all(u8::is_ascii_whitespace) {
        return Ok(Vec::new());
    }
    let reply: OllamaReply = serde_json::from_slice(line)
        .map_err(|_| ProviderError::Invalid("a stream line is not the expected JSON".into()))?;
    if reply.error.is_some() {
        return Err(ProviderError::Invalid(
            "the upstream reported an error mid-stream".into(),
        ));
    }
    let mut events = Vec::new();
    let (reason, usage) = (reply.finish_reason(), reply.usage());
    if let Some(message) = reply.message {
        if !message.content.is_empty() {
            events.push(StreamEvent::Delta(message.content));
        }
        events.extend(
            message
                .tool_calls
                .into_iter()
                .map(|call| StreamEvent::ToolCall(call.into_call())),
        );
    }
    if reply.done {
        events.push(StreamEvent::Finish { reason, usage });
    }
    Ok(events)
}

#[async_trait]
impl Provider for Ollama {
    fn name(&self) -> &'static str {
        self.endpoint.name
    }

    fn kind(&self) -> &'static str {
        "ollama"
    }

    fn refusal(&self, request: &ChatRequest) -> Option<Unsupported> {
        refusal(request)
    }

    async fn complete(
        &self,
        request: &ChatRequest,
        model: &str,
    ) -> Result<Completion, ProviderError> {
        let body = self.body(request, model, false)?;
        let reply: OllamaReply = self
            .client
            .post_json(&self.url, &self.endpoint.headers, body)
            .await?;
        let (reason, usage) = (reply.finish_reason(), reply.usage());
        let (content, calls) = reply
            .message
            .map(|m| (m.content, m.tool_calls))
            .unwrap_or_default();
        Ok(Completion::new(
            content,
            calls.into_iter().map(OllamaReplyCall::into_call).collect(),
            reason,
            usage,
        ))
    }

    async fn stream(
        &self,
        request: &ChatRequest,
        model: &str,
    ) -> Result<EventStream, ProviderError> {
        let body = self.body(request, model, true)?;
        let bytes = self
            .client
            .post_stream(&self.url, &self.endpoint.headers, body)
            .await?;
        let mut lines = Lines::new(MAX_ANSWER_BYTES);
        Ok(events_from(bytes, move |chunk| {
            let mut events = Vec::new();
            match chunk {
                Some(chunk) => {
                    lines.push(chunk);
                    while let Some(line) = lines.next_line() {
                        let line = line.map_err(|_| too_long())?;
                        events.extend(line_events(line)?);
                    }
                }
                // A last line without its newline.
                None => events.extend(line_events(lines.rest())?),
            }
            Ok(events)
        }))
    }
}

fn too_long() -> ProviderError {
    ProviderError::Invalid(format!(
        "a stream line is longer than {MAX_ANSWER_BYTES} bytes"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Sampling;

    fn request(sampling: Sampling) -> ChatRequest {
        ChatRequest {
            messages: vec![Message::text("user", "hi")],
            model: None,
            model_hint: None,
            max_tokens: Some(32),
            temperature: 0.5,
            stream: false,
            sampling,
            tools: Vec::new(),
            tool_choice: Default::default(),
            strict_model: false,
            passthrough: Default::default(),
        }
    }

    #[test]
    fn sampling_controls_become_ollama_options_and_format() {
        let plain =
            serde_json::to_value(request_body(&request(Sampling::default()), "m", false)).unwrap();
        assert_eq!(
            plain,
            serde_json::json!({
                "model": "m", "stream": false,
                "messages": [{"role": "user", "content": "hi"}],
                "options": {"temperature": 0.5, "num_predict": 32},
            })
        );
        let controlled = request(Sampling {
            top_p: Some(0.9),
            top_k: Some(40),
            stop: vec!["END".into()],
            seed: Some(7),
            presence_penalty: Some(0.5),
            frequency_penalty: Some(-0.5),
            response_format: ResponseFormat::JsonObject,
        });
        let body = serde_json::to_value(request_body(&controlled, "m", true)).unwrap();
        assert_eq!(
            body["options"],
            serde_json::json!({
                "temperature": 0.5, "num_predict": 32, "top_p": 0.9, "top_k": 40, "seed": 7,
                "stop": ["END"], "presence_penalty": 0.5, "frequency_penalty": -0.5,
            })
        );
        assert_eq!(body["format"], "json");
        assert_eq!(body["stream"], true);
    }

    #[test]
    fn stream_lines_become_deltas_then_the_finish_with_usage() {
        assert_eq!(
            line_events(br#"{"message":{"role":"assistant","content":"Hel"},"done":false}"#)
                .unwrap(),
            [StreamEvent::Delta("Hel".into())]
        );
        assert_eq!(
            line_events(br#"{"message":{"content":""},"done":true,"done_reason":"length","prompt_eval_count":5,"eval_count":3}"#).unwrap(),
            [StreamEvent::Finish {
                reason: FinishReason::Length,
                usage: Usage { prompt_tokens: 5, completion_tokens: 3, total_tokens: 8 },
            }]
        );
        assert!(line_events(br#"{"error":"model crashed"}"#).is_err());
        assert!(line_events(b"not json").is_err());
        assert!(line_events(b"  ").unwrap().is_empty());
    }

    #[test]
    fn tools_and_calls_go_as_ollama_takes_them_and_a_forced_call_is_refused() {
        use crate::domain::{Tool, ToolResult};
        let mut request = request(Sampling::default());
        request.messages = vec![
            Message::text("user", "weather?"),
            Message {
                tool_calls: vec![ToolCall {
                    id: "call_1".into(),
                    name: "get_weather".into(),
                    arguments: r#"{"city":"Paris"}"#.into(),
                }],
                ..Message::text("assistant", "")
            },
            Message {
                tool_result: Some(ToolResult {
                    call_id: "call_1".into(),
                    name: "get_weather".into(),
                    is_error: false,
                }),
                ..Message::text("tool", "18C")
            },
        ];
        request.tools = vec![Tool {
            name: "get_weather".into(),
            description: None,
            parameters: None,
            strict: false,
        }];
        let body = serde_json::to_value(request_body(&request, "m", false)).unwrap();
        assert_eq!(
            body["messages"],
            serde_json::json!([
                {"role": "user", "content": "weather?"},
                {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
                {"role": "tool", "content": "18C", "tool_name": "get_weather"},
            ])
        );
        assert_eq!(
            body["tools"],
            serde_json::json!([{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}}}])
        );
        assert_eq!(refusal(&request), None);
        request.tool_choice = ToolChoice::None;
        let body = serde_json::to_value(request_body(&request, "m", false)).unwrap();
        assert!(
            body.get("tools").is_none(),
            "none: the tools are not offered"
        );
        request.tool_choice = ToolChoice::Required;
        assert_eq!(refusal(&request), Some(Unsupported::ForcedToolChoice));
        request.tool_choice = ToolChoice::Function("get_weather".into());
        assert_eq!(refusal(&request), Some(Unsupported::ForcedToolChoice));
        request.tool_choice = ToolChoice::Auto;
        request.tools[0].strict = true;
        assert_eq!(refusal(&request), Some(Unsupported::StrictTools));
    }

    #[test]
    fn a_streamed_tool_call_is_an_event_and_gets_an_id() {
        let events = line_events(
            br#"{"message":{"role":"assistant","content":"","tool_calls":[{"function":{"name":"f","arguments":{"a":1}}}]},"done":false}"#,
        )
        .unwrap();
        let [StreamEvent::ToolCall(call)] = &events[..] else {
            panic!("{events:?}");
        };
        assert_eq!(
            (call.name.as_str(), call.arguments.as_str()),
            ("f", r#"{"a":1}"#)
        );
        assert!(
            call.id.starts_with("call_") && call.id.len() == 29,
            "{}",
            call.id
        );
    }
}
