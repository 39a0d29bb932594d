//! Any OpenAI-compatible server (OpenAI, Azure OpenAI, vLLM, Groq, LM Studio, ...):
//! `POST {base}/chat/completions` with `Authorization: Bearer`, whole or as SSE chunks
//! (with `stream_options.include_usage`, so streams report their usage too).

use async_trait::async_trait;
use hyper::header::AUTHORIZATION;
use hyper::Uri;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::framing::SseDecoder;
use super::http::MAX_ANSWER_BYTES;
use super::{
    events_from, json_body, Endpoint, EventStream, Provider, ProviderError, UpstreamClient,
};
use crate::domain::{
    ChatRequest, Completion, FinishReason, Message, ResponseFormat, StreamEvent, ToolCall,
    ToolChoice, Unsupported, Usage,
};

/// An OpenAI-compatible server.
pub struct OpenAi {
    client: UpstreamClient,
    endpoint: Endpoint,
    url: Uri,
}

impl OpenAi {
    /// The server at `base_url`: its `/chat/completions`, under `/v1` when the URL has
    /// no path (`https://api.openai.com` and `http://vllm:8000/v1` both work). `api_key`
    /// goes as `Authorization: Bearer`, when there is one.
    pub fn new(
        client: UpstreamClient,
        base_url: &str,
        api_key: &str,
        endpoint: &Endpoint,
    ) -> Result<OpenAi, String> {
        let base = base_url.trim_end_matches('/');
        let has_path = base
            .split_once("://")
            .is_some_and(|(_, rest)| rest.contains('/'));
        let url = if has_path {
            format!("{base}/chat/completions")
        } else {
            format!("{base}/v1/chat/completions")
        };
        let url = url
            .parse::<Uri>()
            .map_err(|e| format!("{}: base URL: {e}", endpoint.name))?;
        let mut endpoint = endpoint.clone();
        if !api_key.is_empty() {
            let bearer = Endpoint::new(
                endpoint.name,
                &[],
                Some((AUTHORIZATION, format!("Bearer {api_key}"))),
            )?;
            endpoint.headers.extend(bearer.headers);
        }
        Ok(OpenAi {
            client,
            endpoint,
            url,
        })
    }
}

/// The Chat Completions body for `request`.
fn request_body(request: &ChatRequest, model: &str, stream: bool) -> Value {
    let sampling = &request.sampling;
    let mut body = json!({
        "model": model,
        "messages": request.messages.iter().map(message).collect::<Vec<_>>(),
        "temperature": request.temperature,
        "stream": stream,
    });
    let mut set = |name: &str, value: Value| {
        if !value.is_null() {
            body[name] = value;
        }
    };
    set("max_tokens", json!(request.max_tokens));
    set("top_p", json!(sampling.top_p));
    set("seed", json!(sampling.seed));
    set("presence_penalty", json!(sampling.presence_penalty));
    set("frequency_penalty", json!(sampling.frequency_penalty));
    if !sampling.stop.is_empty() {
        set("stop", json!(sampling.stop));
    }
    match &sampling.response_format {
        ResponseFormat::Text => {}
        ResponseFormat::JsonObject => set("response_format", json!({"type": "json_object"})),
        ResponseFormat::JsonSchema(schema) => set(
            "response_format",
            json!({"type": "json_schema", "json_schema": {"name": "response", "schema": schema}}),
        ),
    }
    if !request.tools.is_empty() {
        let tools: Vec<Value> = request
            .tools
            .iter()
            .map(|tool| {
                let mut function = json!({"name": tool.name});
                if let Some(description) = &tool.description {
                    function["description"] = json!(description);
                }
                if let Some(parameters) = &tool.parameters {
                    function["parameters"] = parameters.clone();
                }
                if tool.strict {
                    function["strict"] = json!(true);
                }
                json!({"type": "function", "function": function})
            })
            .collect();
        set("tools", Value::Array(tools));
        set(
            "tool_choice",
            match &request.tool_choice {
                ToolChoice::Auto => json!("auto"),
                ToolChoice::None => json!("none"),
                ToolChoice::Required => json!("required"),
                ToolChoice::Function(name) => {
                    json!({"type": "function", "function": {"name": name}})
                }
            },
        );
    }
    if stream {
        set("stream_options", json!({"include_usage": true}));
    }
    // What the client sent that the gateway does not read, as it came (never over a
    // field set above).
    for (name, value) in &request.passthrough {
        if body.get(name).is_none() {
            body[name.as_str()] = value.clone();
        }
    }
    body
}

fn message(message: &Message) -> Value {
    let mut out = json!({"role": message.role, "content": message.content});
    if !message.tool_calls.is_empty() {
        if message.content.is_empty() {
            out["content"] = Value::Null;
        }
        out["tool_calls"] = message
            .tool_calls
            .iter()
            .map(|call| {
                json!({"id": call.id, "type": "function",
                    "function": {"name": call.name, "arguments": call.arguments}})
            })
            .collect();
    }
    if let Some(result) = &message.tool_result {
        out["tool_call_id"] = json!(result.call_id);
    }
    out
}

#[derive(Deserialize)]
struct Answer {
    #[serde(default)]
    choices: Vec<Choice>,
    #[serde(default)]
    usage: Option<WireUsage>,
}

#[derive(Deserialize)]
struct Choice {
    #[serde(default)]
    message: Option<AnswerMessage>,
    #[serde(default)]
    delta: Option<AnswerMessage>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize, Default)]
struct AnswerMessage {
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    tool_calls: Vec<WireCall>,
}

#[derive(Deserialize)]
struct WireCall {
    #[serde(default)]
    index: Option<usize>,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    function: WireFunction,
}

#[derive(Deserialize, Default)]
struct WireFunction {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    arguments: Option<String>,
}

#[derive(Deserialize, Serialize, Clone, Copy, Default)]
struct WireUsage {
    #[serde(default)]
    prompt_tokens: u64,
    #[serde(default)]
    completion_tokens: u64,
}

impl WireUsage {
    fn usage(self) -> Usage {
        Usage {
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.completion_tokens,
            total_tokens: self.prompt_tokens + self.completion_tokens,
        }
    }
}

fn finish_reason(reason: Option<&str>) -> FinishReason {
    match reason {
        Some("length") => FinishReason::Length,
        Some("content_filter") => FinishReason::ContentFilter,
        Some("tool_calls") | Some("function_call") => FinishReason::ToolCalls,
        _ => FinishReason::Stop,
    }
}

/// A streamed answer being read: tool calls come in pieces by `index` (the name first,
/// the arguments in fragments) and are sent on whole; the finish reason comes on the
/// last choice chunk and the usage on a chunk of its own after it, so the end is sent
/// at `[DONE]`.
struct StreamState {
    sse: SseDecoder,
    calls: Vec<(Option<String>, String, String)>,
    reason: Option<FinishReason>,
    usage: Usage,
    done: bool,
}

impl StreamState {
    fn chunk(&mut self, chunk: Option<&[u8]>) -> Result<Vec<StreamEvent>, ProviderError> {
        let mut events = Vec::new();
        let Some(chunk) = chunk else {
            if !self.done && self.reason.is_some() {
                // Some servers end without `[DONE]`: the finish reason is the end.
                self.end(&mut events);
            }
            return Ok(events);
        };
        self.sse.push(chunk);
        while let Some(event) = self.sse.next_event() {
            let event = event.map_err(|_| {
                ProviderError::Invalid(format!(
                    "a stream event is longer than {MAX_ANSWER_BYTES} bytes"
                ))
            })?;
            if event.data.trim() == "[DONE]" {
                self.end(&mut events);
                continue;
            }
            let answer: Value = serde_json::from_str(&event.data).map_err(|_| {
                ProviderError::Invalid("a stream event is not the expected JSON".into())
            })?;
            if answer.get("error").is_some() {
                return Err(ProviderError::Invalid(
                    "the upstream reported an error mid-stream".into(),
                ));
            }
            let answer: Answer = serde_json::from_value(answer).map_err(|_| {
                ProviderError::Invalid("a stream event is not the expected JSON".into())
            })?;
            if let Some(usage) = answer.usage {
                self.usage = usage.usage();
            }
            for choice in answer.choices.into_iter().take(1) {
                let delta = choice.delta.unwrap_or_default();
                if let Some(text) = delta.content.filter(|t| !t.is_empty()) {
                    events.push(StreamEvent::Delta(text));
                }
                for call in delta.tool_calls {
                    let index = call.index.unwrap_or(self.calls.len());
                    while self.calls.len() <= index {
                        self.calls.push((None, String::new(), String::new()));
                    }
                    let slot = &mut self.calls[index];
                    if call.id.is_some() {
                        slot.0 = call.id;
                    }
                    slot.1.push_str(call.function.name.as_deref().unwrap_or(""));
                    slot.2
                        .push_str(call.function.arguments.as_deref().unwrap_or(""));
                }
                if let Some(reason) = choice.finish_reason {
                    self.reason = Some(finish_reason(Some(&reason)));
                }
            }
        }
        Ok(events)
    }

    /// The gathered calls, then the finish.
    fn end(&mut self, events: &mut Vec<StreamEvent>) {
        if self.done {
            return;
        }
        self.done = true;
        for (id, name, arguments) in self.calls.drain(..) {
            let arguments = if arguments.trim().is_empty() {
                "{}".to_owned()
            } else {
                arguments
            };
            events.push(StreamEvent::ToolCall(match id {
                Some(id) => ToolCall {
                    id,
                    name,
                    arguments,
                },
                None => ToolCall::named(name, arguments),
            }));
        }
        events.push(StreamEvent::Finish {
            reason: self.reason.unwrap_or_default(),
            usage: self.usage,
        });
    }
}

#[async_trait]
impl Provider for OpenAi {
    fn name(&self) -> &'static str {
        self.endpoint.name
    }

    fn kind(&self) -> &'static str {
        "openai"
    }

    /// Takes everything, fields passed through included.
    fn refusal(&self, _request: &ChatRequest) -> Option<Unsupported> {
        None
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
        let choice = answer
            .choices
            .into_iter()
            .next()
            .ok_or_else(|| ProviderError::Invalid("the answer has no choices".into()))?;
        let message = choice.message.unwrap_or_default();
        let calls = message
            .tool_calls
            .into_iter()
            .map(|call| {
                let name = call.function.name.unwrap_or_default();
                let arguments = call.function.arguments.unwrap_or_else(|| "{}".into());
                match call.id {
                    Some(id) => ToolCall {
                        id,
                        name,
                        arguments,
                    },
                    None => ToolCall::named(name, arguments),
                }
            })
            .collect();
        Ok(Completion::new(
            message.content.unwrap_or_default(),
            calls,
            finish_reason(choice.finish_reason.as_deref()),
            answer.usage.map(WireUsage::usage).unwrap_or_default(),
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
            calls: Vec::new(),
            reason: None,
            usage: Usage::default(),
            done: false,
        };
        Ok(events_from(bytes, move |chunk| state.chunk(chunk)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Tool, ToolResult};

    #[test]
    fn the_body_carries_every_control_and_the_tool_turns() {
        let mut request = ChatRequest::of(vec![
            Message::text("user", "weather?"),
            Message {
                tool_calls: vec![ToolCall {
                    id: "call_1".into(),
                    name: "f".into(),
                    arguments: "{}".into(),
                }],
                ..Message::text("assistant", "")
            },
            Message {
                tool_result: Some(ToolResult {
                    call_id: "call_1".into(),
                    name: "f".into(),
                    is_error: false,
                }),
                ..Message::text("tool", "18C")
            },
        ]);
        request.max_tokens = Some(9);
        request.sampling.seed = Some(3);
        request.tools = vec![Tool {
            name: "f".into(),
            description: None,
            parameters: None,
            strict: true,
        }];
        request.tool_choice = ToolChoice::Required;
        let body = request_body(&request, "gpt-4o", true);
        assert_eq!(
            body["messages"],
            json!([
                {"role": "user", "content": "weather?"},
                {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
                {"role": "tool", "content": "18C", "tool_call_id": "call_1"},
            ])
        );
        assert_eq!(
            (body["max_tokens"].clone(), body["seed"].clone()),
            (json!(9), json!(3))
        );
        assert_eq!(
            body["tools"],
            json!([{"type": "function", "function": {"name": "f", "strict": true}}])
        );
        assert_eq!(body["tool_choice"], "required");
        assert_eq!(body["stream_options"], json!({"include_usage": true}));
    }

    #[test]
    fn a_stream_of_chunks_becomes_text_whole_calls_and_the_finish_with_usage() {
        let mut state = StreamState {
            sse: SseDecoder::new(MAX_ANSWER_BYTES),
            calls: Vec::new(),
            reason: None,
            usage: Usage::default(),
            done: false,
        };
        let body = concat!(
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"Hi\"}}]}\n\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"id\":\"call_9\",\"function\":{\"name\":\"f\",\"arguments\":\"{\\\"a\\\"\"}}]}}]}\n\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{\"tool_calls\":[{\"index\":0,\"function\":{\"arguments\":\":1}\"}}]}}]}\n\n",
            "data: {\"choices\":[{\"index\":0,\"delta\":{},\"finish_reason\":\"tool_calls\"}]}\n\n",
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":4,\"completion_tokens\":2}}\n\n",
            "data: [DONE]\n\n",
        );
        let events = state.chunk(Some(body.as_bytes())).unwrap();
        assert_eq!(
            events,
            [
                StreamEvent::Delta("Hi".into()),
                StreamEvent::ToolCall(ToolCall {
                    id: "call_9".into(),
                    name: "f".into(),
                    arguments: r#"{"a":1}"#.into()
                }),
                StreamEvent::Finish {
                    reason: FinishReason::ToolCalls,
                    usage: Usage {
                        prompt_tokens: 4,
                        completion_tokens: 2,
                        total_tokens: 6
                    }
                },
            ]
        );
    }
}
