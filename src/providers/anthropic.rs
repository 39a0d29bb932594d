//! Anthropic: `POST {base}/v1/messages` with `x-api-key` and `anthropic-version`, whole
//! or as named events (`message_start`, `content_block_*`, `message_delta`,
//! `message_stop`).

use async_trait::async_trait;
use hyper::header::{HeaderName, HeaderValue};
use hyper::Uri;
use serde::Deserialize;
use serde_json::{json, Value};

use super::framing::SseDecoder;
use super::http::MAX_ANSWER_BYTES;
use super::{
    events_from, json_body, Endpoint, EventStream, Provider, ProviderError, UpstreamClient,
};
use crate::domain::{
    ChatRequest, Completion, FinishReason, ResponseFormat, StreamEvent, ToolCall, ToolChoice,
    Unsupported, Usage,
};

/// The API version the gateway speaks.
const VERSION: &str = "2023-06-01";
/// `max_tokens` is required by Anthropic; a request without one gets this.
const DEFAULT_MAX_TOKENS: u64 = 4096;

/// The Anthropic API.
pub struct Anthropic {
    client: UpstreamClient,
    endpoint: Endpoint,
    url: Uri,
}

impl Anthropic {
    /// Anthropic at `base_url` (e.g. `https://api.anthropic.com`) with `api_key`.
    pub fn new(
        client: UpstreamClient,
        base_url: &str,
        api_key: &str,
        endpoint: &Endpoint,
    ) -> Result<Anthropic, String> {
        let url = format!("{}/v1/messages", base_url.trim_end_matches('/'))
            .parse::<Uri>()
            .map_err(|e| format!("{}: base URL: {e}", endpoint.name))?;
        let mut endpoint = endpoint.clone();
        endpoint.headers.push((
            HeaderName::from_static("anthropic-version"),
            HeaderValue::from_static(VERSION),
        ));
        if !api_key.is_empty() {
            let key = Endpoint::new(
                endpoint.name,
                &[],
                Some((HeaderName::from_static("x-api-key"), api_key.to_owned())),
            )?;
            endpoint.headers.extend(key.headers);
        }
        Ok(Anthropic {
            client,
            endpoint,
            url,
        })
    }
}

/// What Anthropic cannot honour: a temperature above 1, a seed, penalties, JSON mode.
fn refusal(request: &ChatRequest) -> Option<Unsupported> {
    if let Some(refused) = super::passthrough_refusal(request) {
        return Some(refused);
    }
    let sampling = &request.sampling;
    if request.temperature > 1.0 {
        return Some(Unsupported::Field("temperature"));
    }
    if sampling.seed.is_some() {
        return Some(Unsupported::Field("seed"));
    }
    if sampling.presence_penalty.is_some() {
        return Some(Unsupported::Field("presence_penalty"));
    }
    if sampling.frequency_penalty.is_some() {
        return Some(Unsupported::Field("frequency_penalty"));
    }
    if sampling.response_format != ResponseFormat::Text {
        return Some(Unsupported::Field("response_format"));
    }
    if request.tools.iter().any(|tool| tool.strict) {
        return Some(Unsupported::StrictTools);
    }
    None
}

/// The Messages body: system turns as `system`, calls as `tool_use` blocks, results as
/// `tool_result` blocks of a user turn (consecutive results in one turn).
fn request_body(request: &ChatRequest, model: &str, stream: bool) -> Value {
    let mut system = Vec::new();
    let mut messages: Vec<Value> = Vec::new();
    for message in &request.messages {
        let text_block = json!({"type": "text", "text": message.content});
        match (message.role.as_str(), &message.tool_result) {
            ("system", _) => system.push(message.content.as_str()),
            (_, Some(result)) => {
                let block = json!({"type": "tool_result", "tool_use_id": result.call_id,
                    "content": message.content, "is_error": result.is_error});
                let last_is_results = messages.last().is_some_and(|m| {
                    m["role"] == "user"
                        && m["content"]
                            .as_array()
                            .is_some_and(|c| c.iter().all(|b| b["type"] == "tool_result"))
                });
                if last_is_results {
                    if let Some(Value::Array(blocks)) =
                        messages.last_mut().map(|m| &mut m["content"])
                    {
                        blocks.push(block);
                    }
                } else {
                    messages.push(json!({"role": "user", "content": [block]}));
                }
            }
            (role, None) => {
                let role = if role == "assistant" {
                    "assistant"
                } else {
                    "user"
                };
                let mut blocks = Vec::new();
                if !message.content.is_empty() || message.tool_calls.is_empty() {
                    blocks.push(text_block);
                }
                blocks.extend(message.tool_calls.iter().map(|call| {
                    json!({"type": "tool_use", "id": call.id, "name": call.name,
                        "input": call.arguments_value()})
                }));
                messages.push(json!({"role": role, "content": blocks}));
            }
        }
    }
    let mut body = json!({
        "model": model,
        "messages": messages,
        "max_tokens": request.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS),
        "temperature": request.temperature,
        "stream": stream,
    });
    if !system.is_empty() {
        body["system"] = json!(system.join("\n"));
    }
    let sampling = &request.sampling;
    if let Some(top_p) = sampling.top_p {
        body["top_p"] = json!(top_p);
    }
    if let Some(top_k) = sampling.top_k {
        body["top_k"] = json!(top_k);
    }
    if !sampling.stop.is_empty() {
        body["stop_sequences"] = json!(sampling.stop);
    }
    if !request.tools.is_empty() {
        body["tools"] = request
            .tools
            .iter()
            .map(|tool| {
                let mut out = json!({"name": tool.name, "input_schema": tool.parameters.clone()
                    .unwrap_or_else(|| json!({"type": "object", "properties": {}}))});
                if let Some(description) = &tool.description {
                    out["description"] = json!(description);
                }
                out
            })
            .collect();
        body["tool_choice"] = match &request.tool_choice {
            ToolChoice::Auto => json!({"type": "auto"}),
            ToolChoice::None => json!({"type": "none"}),
            ToolChoice::Required => json!({"type": "any"}),
            ToolChoice::Function(name) => json!({"type": "tool", "name": name}),
        };
    }
    body
}

fn finish_reason(reason: Option<&str>) -> FinishReason {
    match reason {
        Some("max_tokens") => FinishReason::Length,
        Some("refusal") => FinishReason::ContentFilter,
        Some("tool_use") => FinishReason::ToolCalls,
        _ => FinishReason::Stop,
    }
}

#[derive(Deserialize)]
struct Answer {
    #[serde(default)]
    content: Vec<Block>,
    #[serde(default)]
    stop_reason: Option<String>,
    #[serde(default)]
    usage: WireUsage,
}

#[derive(Deserialize)]
struct Block {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    input: Option<Value>,
}

#[derive(Deserialize, Default, Clone, Copy)]
struct WireUsage {
    #[serde(default)]
    input_tokens: u64,
    #[serde(default)]
    output_tokens: u64,
}

impl Block {
    fn call(self) -> ToolCall {
        let arguments = self
            .input
            .map_or_else(|| "{}".to_owned(), |i| i.to_string());
        let name = self.name.unwrap_or_default();
        match self.id {
            Some(id) => ToolCall {
                id,
                name,
                arguments,
            },
            None => ToolCall::named(name, arguments),
        }
    }
}

/// A stream being read: text deltas go on as they come; a `tool_use` block's input is
/// gathered from its `input_json_delta`s and sent whole at its `content_block_stop`.
struct StreamState {
    sse: SseDecoder,
    /// The open tool_use block: id, name, input so far.
    call: Option<(String, String, String)>,
    reason: Option<FinishReason>,
    usage: WireUsage,
}

impl StreamState {
    fn chunk(&mut self, chunk: Option<&[u8]>) -> Result<Vec<StreamEvent>, ProviderError> {
        let mut events = Vec::new();
        let Some(chunk) = chunk else {
            return Ok(events);
        };
        self.sse.push(chunk);
        while let Some(event) = self.sse.next_event() {
            let event = event.map_err(|_| {
                ProviderError::Invalid(format!(
                    "a stream event is longer than {MAX_ANSWER_BYTES} bytes"
                ))
            })?;
            let data: Value = serde_json::from_str(&event.data).map_err(|_| {
                ProviderError::Invalid("a stream event is not the expected JSON".into())
            })?;
            match data["type"].as_str().unwrap_or_default() {
                "message_start" => {
                    self.usage.input_tokens = data["message"]["usage"]["input_tokens"]
                        .as_u64()
                        .unwrap_or(0);
                }
                "content_block_start" if data["content_block"]["type"] == "tool_use" => {
                    let block = &data["content_block"];
                    self.call = Some((
                        block["id"].as_str().unwrap_or_default().to_owned(),
                        block["name"].as_str().unwrap_or_default().to_owned(),
                        String::new(),
                    ));
                }
                "content_block_delta" => {
                    let delta = &data["delta"];
                    match delta["type"].as_str() {
                        Some("text_delta") => {
                            let text = delta["text"].as_str().unwrap_or_default();
                            if !text.is_empty() {
                                events.push(StreamEvent::Delta(text.to_owned()));
                            }
                        }
                        Some("input_json_delta") => {
                            if let Some((_, _, input)) = &mut self.call {
                                input.push_str(delta["partial_json"].as_str().unwrap_or_default());
                            }
                        }
                        _ => {}
                    }
                }
                "content_block_stop" => {
                    if let Some((id, name, input)) = self.call.take() {
                        let arguments = if input.trim().is_empty() {
                            "{}".to_owned()
                        } else {
                            input
                        };
                        events.push(StreamEvent::ToolCall(if id.is_empty() {
                            ToolCall::named(name, arguments)
                        } else {
                            ToolCall {
                                id,
                                name,
                                arguments,
                            }
                        }));
                    }
                }
                "message_delta" => {
                    if let Some(reason) = data["delta"]["stop_reason"].as_str() {
                        self.reason = Some(finish_reason(Some(reason)));
                    }
                    if let Some(output) = data["usage"]["output_tokens"].as_u64() {
                        self.usage.output_tokens = output;
                    }
                }
                "message_stop" => events.push(StreamEvent::Finish {
                    reason: self.reason.unwrap_or_default(),
                    usage: usage(self.usage),
                }),
                "error" => {
                    return Err(ProviderError::Invalid(
                        "the upstream reported an error mid-stream".into(),
                    ))
                }
                _ => {}
            }
        }
        Ok(events)
    }
}

fn usage(usage: WireUsage) -> Usage {
    Usage {
        prompt_tokens: usage.input_tokens,
        completion_tokens: usage.output_tokens,
        total_tokens: usage.input_tokens + usage.output_tokens,
    }
}

#[async_trait]
impl Provider for Anthropic {
    fn name(&self) -> &'static str {
        self.endpoint.name
    }

    fn kind(&self) -> &'static str {
        "anthropic"
    }

    fn refusal(&self, request: &ChatRequest) -> Option<Unsupported> {
        refusal(request)
    }

    async fn complete(
        &self,
        request: &ChatRequest,
        model: &str,
    ) -> Result<Completion, ProviderError> {
        let body = json_body(
            &request_body(request, model, false),
            request.json_size_hint(),
        )?;
        let answer: Answer = self
            .client
            .post_json(&self.url, &self.endpoint.headers, body)
            .await?;
        let mut text = String::new();
        let mut calls = Vec::new();
        for block in answer.content {
            match block.kind.as_str() {
                "text" => text.push_str(block.text.as_deref().unwrap_or_default()),
                "tool_use" => calls.push(block.call()),
                _ => {}
            }
        }
        Ok(Completion::new(
            text,
            calls,
            finish_reason(answer.stop_reason.as_deref()),
            usage(answer.usage),
        ))
    }

    async fn stream(
        &self,
        request: &ChatRequest,
        model: &str,
    ) -> Result<EventStream, ProviderError> {
        let body = json_body(
            &request_body(request, model, true),
            request.json_size_hint(),
        )?;
        let bytes = self
            .client
            .post_stream(&self.url, &self.endpoint.headers, body)
            .await?;
        let mut state = StreamState {
            sse: SseDecoder::new(MAX_ANSWER_BYTES),
            call: None,
            reason: None,
            usage: WireUsage::default(),
        };
        Ok(events_from(bytes, move |chunk| state.chunk(chunk)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Message, ToolResult};

    #[test]
    fn system_calls_and_results_take_anthropics_shape() {
        let request = ChatRequest::of(vec![
            Message::text("system", "be brief"),
            Message::text("user", "weather?"),
            Message {
                tool_calls: vec![ToolCall {
                    id: "toolu_1".into(),
                    name: "f".into(),
                    arguments: r#"{"a":1}"#.into(),
                }],
                ..Message::text("assistant", "")
            },
            Message {
                tool_result: Some(ToolResult {
                    call_id: "toolu_1".into(),
                    name: "f".into(),
                    is_error: true,
                }),
                ..Message::text("tool", "no")
            },
        ]);
        let body = request_body(&request, "claude", false);
        assert_eq!(body["system"], "be brief");
        assert_eq!(body["max_tokens"], DEFAULT_MAX_TOKENS);
        assert_eq!(
            body["messages"],
            json!([
                {"role": "user", "content": [{"type": "text", "text": "weather?"}]},
                {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "f", "input": {"a": 1}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "no", "is_error": true}]},
            ])
        );
        let mut seeded = request.clone();
        seeded.sampling.seed = Some(1);
        assert_eq!(refusal(&seeded), Some(Unsupported::Field("seed")));
        assert_eq!(refusal(&request), None);
    }

    #[test]
    fn named_events_become_text_a_whole_call_and_the_finish() {
        let mut state = StreamState {
            sse: SseDecoder::new(MAX_ANSWER_BYTES),
            call: None,
            reason: None,
            usage: WireUsage::default(),
        };
        let body = concat!(
            "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"usage\":{\"input_tokens\":7}}}\n\n",
            "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n",
            "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hi\"}}\n\n",
            "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n",
            "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":1,\"content_block\":{\"type\":\"tool_use\",\"id\":\"toolu_2\",\"name\":\"f\",\"input\":{}}}\n\n",
            "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":1,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"{\\\"a\\\":\"}}\n\n",
            "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":1,\"delta\":{\"type\":\"input_json_delta\",\"partial_json\":\"2}\"}}\n\n",
            "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":1}\n\n",
            "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"tool_use\"},\"usage\":{\"output_tokens\":5}}\n\n",
            "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n",
        );
        assert_eq!(
            state.chunk(Some(body.as_bytes())).unwrap(),
            [
                StreamEvent::Delta("Hi".into()),
                StreamEvent::ToolCall(ToolCall {
                    id: "toolu_2".into(),
                    name: "f".into(),
                    arguments: r#"{"a":2}"#.into()
                }),
                StreamEvent::Finish {
                    reason: FinishReason::ToolCalls,
                    usage: Usage {
                        prompt_tokens: 7,
                        completion_tokens: 5,
                        total_tokens: 12
                    }
                },
            ]
        );
    }
}
