//! Gemini: `POST {base}/v1beta/models/{model}:generateContent` with `x-goog-api-key`, or
//! `:streamGenerateContent?alt=sse` for a stream.

use async_trait::async_trait;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

use hyper::header::{HeaderName, HeaderValue};
use hyper::Uri;

use super::framing::SseDecoder;
use super::http::MAX_ANSWER_BYTES;
use super::{
    events_from, json_body, Endpoint, EventStream, Provider, ProviderError, UpstreamClient,
};
use crate::domain::{
    ChatRequest, Completion, FinishReason, ResponseFormat, StreamEvent, ToolCall, ToolChoice, Usage,
};

/// The header that carries the API key.
const API_KEY_HEADER: HeaderName = HeaderName::from_static("x-goog-api-key");

/// The Gemini API.
pub struct Gemini {
    client: UpstreamClient,
    base_url: String,
    /// The endpoint's headers with the key (`x-goog-api-key`) among them.
    endpoint: Endpoint,
    has_key: bool,
}

impl Gemini {
    /// Gemini at `base_url` with `api_key`, named and with the headers of `endpoint`.
    pub fn new(
        client: UpstreamClient,
        base_url: &str,
        api_key: &SecretString,
        mut endpoint: Endpoint,
    ) -> Result<Gemini, String> {
        let key = api_key.expose_secret();
        if !key.is_empty() {
            let mut value = HeaderValue::from_str(key).map_err(|_| {
                format!("{}: the API key is not a valid header value", endpoint.name)
            })?;
            value.set_sensitive(true);
            endpoint.headers.push((API_KEY_HEADER, value));
        }
        Ok(Gemini {
            client,
            base_url: base_url.trim_end_matches('/').to_owned(),
            endpoint,
            has_key: !key.is_empty(),
        })
    }
}

/// Gemini's body for a chat, borrowing the message text (no copy of it).
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
pub struct GeminiRequest<'a> {
    contents: Vec<Turn<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    system_instruction: Option<Instruction<'a>>,
    generation_config: GenerationConfig<'a>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    tools: Vec<ToolGroup<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_config: Option<ToolConfig<'a>>,
}

#[derive(Serialize)]
struct Turn<'a> {
    role: &'static str,
    parts: Vec<OutPart<'a>>,
}

#[derive(Serialize)]
struct Instruction<'a> {
    parts: Vec<OutPart<'a>>,
}

/// One part of a turn: text, a call the model made (with the thought signature Gemini
/// gave it, which newer models require back), or a call's result.
#[derive(Serialize)]
#[serde(untagged)]
enum OutPart<'a> {
    #[serde(rename_all = "camelCase")]
    Call {
        function_call: NamedValue<'a>,
        #[serde(skip_serializing_if = "Option::is_none")]
        thought_signature: Option<&'a str>,
    },
    #[serde(rename_all = "camelCase")]
    Response {
        function_response: NamedValue<'a>,
    },
    Text {
        text: &'a str,
    },
}

/// A function's name and a JSON value: a call's `args` or a result's `response`.
#[derive(Serialize)]
struct NamedValue<'a> {
    name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    args: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    response: Option<serde_json::Value>,
}

/// Joins a call's id and its thought signature: the doors carry the id back unchanged,
/// so the signature comes back with it (Gemini 3 refuses a conversation whose calls lost
/// theirs). Base64 signatures never hold it.
const SIGNATURE_MARK: &str = "__sig__";

/// Gemini groups function declarations in one tool.
#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ToolGroup<'a> {
    function_declarations: Vec<Declaration<'a>>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Declaration<'a> {
    name: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    description: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    parameters_json_schema: Option<&'a serde_json::Value>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ToolConfig<'a> {
    function_calling_config: CallingConfig<'a>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct CallingConfig<'a> {
    mode: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    allowed_function_names: Option<[&'a str; 1]>,
}

/// Gemini's body for a chat: assistant turns become role `model`, system turns become
/// `systemInstruction`, tool results become `functionResponse` parts of a `user` turn
/// (consecutive results in one turn, as Gemini pairs them with the calls before),
/// everything else is a `user` turn.
pub fn request_body(request: &ChatRequest) -> GeminiRequest<'_> {
    let mut system = Vec::new();
    let mut contents: Vec<Turn<'_>> = Vec::new();
    for message in &request.messages {
        let text = OutPart::Text {
            text: &message.content,
        };
        match (message.role.as_str(), &message.tool_result) {
            ("system", _) => system.push(text),
            (_, Some(result)) => {
                let output = serde_json::Value::from(message.content.as_str());
                let response = if result.is_error {
                    serde_json::json!({ "error": output })
                } else {
                    serde_json::json!({ "output": output })
                };
                let part = OutPart::Response {
                    function_response: NamedValue {
                        name: &result.name,
                        args: None,
                        response: Some(response),
                    },
                };
                match contents.last_mut() {
                    Some(turn)
                        if turn
                            .parts
                            .iter()
                            .all(|p| matches!(p, OutPart::Response { .. })) =>
                    {
                        turn.parts.push(part)
                    }
                    _ => contents.push(Turn {
                        role: "user",
                        parts: vec![part],
                    }),
                }
            }
            (role, None) => {
                let mut parts = Vec::with_capacity(1 + message.tool_calls.len());
                // A turn of calls only has no text part: Gemini refuses empty text.
                if !message.content.is_empty() || message.tool_calls.is_empty() {
                    parts.push(text);
                }
                parts.extend(message.tool_calls.iter().map(|call| {
                    OutPart::Call {
                        function_call: NamedValue {
                            name: &call.name,
                            args: Some(call.arguments_value()),
                            response: None,
                        },
                        thought_signature: call
                            .id
                            .split_once(SIGNATURE_MARK)
                            .map(|(_, signature)| signature),
                    }
                }));
                contents.push(Turn {
                    role: if role == "assistant" || role == "model" {
                        "model"
                    } else {
                        "user"
                    },
                    parts,
                });
            }
        }
    }
    let (tools, tool_config) = tools(request);
    GeminiRequest {
        contents,
        system_instruction: (!system.is_empty()).then_some(Instruction { parts: system }),
        generation_config: generation_config(request),
        tools,
        tool_config,
    }
}

/// The declarations and the calling mode: `strict` tools are held to their schemas
/// (`VALIDATED`, or `ANY` when a call is forced, which validates too).
fn tools(request: &ChatRequest) -> (Vec<ToolGroup<'_>>, Option<ToolConfig<'_>>) {
    if request.tools.is_empty() {
        return (Vec::new(), None);
    }
    let declarations = request
        .tools
        .iter()
        .map(|tool| Declaration {
            name: &tool.name,
            description: tool.description.as_deref(),
            parameters_json_schema: tool.parameters.as_ref(),
        })
        .collect();
    let strict = request.tools.iter().any(|tool| tool.strict);
    let (mode, allowed) = match &request.tool_choice {
        ToolChoice::Auto if strict => ("VALIDATED", None),
        ToolChoice::Auto => ("AUTO", None),
        ToolChoice::None => ("NONE", None),
        ToolChoice::Required => ("ANY", None),
        ToolChoice::Function(name) => ("ANY", Some([name.as_str()])),
    };
    (
        vec![ToolGroup {
            function_declarations: declarations,
        }],
        Some(ToolConfig {
            function_calling_config: CallingConfig {
                mode,
                allowed_function_names: allowed,
            },
        }),
    )
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct GenerationConfig<'a> {
    temperature: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_output_tokens: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_p: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    top_k: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    seed: Option<i64>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    stop_sequences: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    presence_penalty: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    frequency_penalty: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    response_mime_type: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    response_json_schema: Option<&'a serde_json::Value>,
}

fn generation_config(request: &ChatRequest) -> GenerationConfig<'_> {
    let sampling = &request.sampling;
    let (mime, schema) = match &sampling.response_format {
        ResponseFormat::Text => (None, None),
        ResponseFormat::JsonObject => (Some("application/json"), None),
        ResponseFormat::JsonSchema(schema) => (Some("application/json"), Some(schema)),
    };
    GenerationConfig {
        temperature: request.temperature,
        max_output_tokens: request.max_tokens,
        top_p: sampling.top_p,
        top_k: sampling.top_k,
        seed: sampling.seed,
        stop_sequences: &sampling.stop,
        presence_penalty: sampling.presence_penalty,
        frequency_penalty: sampling.frequency_penalty,
        response_mime_type: mime,
        response_json_schema: schema,
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct GeminiReply {
    #[serde(default)]
    candidates: Vec<Candidate>,
    #[serde(default)]
    usage_metadata: Option<UsageMetadata>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Candidate {
    #[serde(default)]
    content: Option<CandidateContent>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Deserialize)]
struct CandidateContent {
    #[serde(default)]
    parts: Vec<Part>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Part {
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    function_call: Option<FunctionCall>,
    /// A thought summary, not part of the answer.
    #[serde(default)]
    thought: bool,
    /// Gemini's signature of the reasoning behind a call.
    #[serde(default)]
    thought_signature: Option<String>,
}

#[derive(Deserialize)]
struct FunctionCall {
    #[serde(default)]
    id: Option<String>,
    name: String,
    #[serde(default)]
    args: serde_json::Value,
}

impl FunctionCall {
    /// The call, its thought signature (if any) kept in its id.
    fn to_call(&self, signature: Option<&str>) -> ToolCall {
        let arguments = match &self.args {
            serde_json::Value::Null => "{}".to_owned(),
            args => args.to_string(),
        };
        let mut call = match self.id.as_ref().filter(|id| !id.is_empty()) {
            Some(id) => ToolCall {
                id: id.clone(),
                name: self.name.clone(),
                arguments,
            },
            None => ToolCall::named(self.name.clone(), arguments),
        };
        if let Some(signature) = signature.filter(|s| !s.is_empty()) {
            call.id = format!("{}{SIGNATURE_MARK}{signature}", call.id);
        }
        call
    }
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct UsageMetadata {
    #[serde(default)]
    prompt_token_count: u64,
    #[serde(default)]
    candidates_token_count: u64,
    #[serde(default)]
    total_token_count: u64,
}

impl GeminiReply {
    /// The parts of the first candidate.
    fn parts(&self) -> &[Part] {
        self.candidates
            .first()
            .and_then(|c| c.content.as_ref())
            .map_or(&[], |c| &c.parts[..])
    }

    /// The text of the first candidate.
    fn text(&self) -> String {
        self.parts()
            .iter()
            .filter(|p| !p.thought)
            .filter_map(|p| p.text.as_deref())
            .collect()
    }

    /// The tools the first candidate called.
    fn tool_calls(&self) -> Vec<ToolCall> {
        self.parts()
            .iter()
            .filter_map(|p| {
                let call = p.function_call.as_ref()?;
                Some(call.to_call(p.thought_signature.as_deref()))
            })
            .collect()
    }

    /// Why the first candidate stopped, once it has.
    fn finish_reason(&self) -> Option<FinishReason> {
        let reason = self.candidates.first()?.finish_reason.as_deref()?;
        Some(match reason {
            "MAX_TOKENS" => FinishReason::Length,
            "SAFETY" | "RECITATION" | "BLOCKLIST" | "PROHIBITED_CONTENT" | "SPII" => {
                FinishReason::ContentFilter
            }
            _ => FinishReason::Stop,
        })
    }
}

impl UsageMetadata {
    fn usage(&self) -> Usage {
        let total = if self.total_token_count > 0 {
            self.total_token_count
        } else {
            self.prompt_token_count + self.candidates_token_count
        };
        Usage {
            prompt_tokens: self.prompt_token_count,
            completion_tokens: self.candidates_token_count,
            total_tokens: total,
        }
    }
}

impl Gemini {
    /// The URL of `action` on `model`; refuses what cannot be sent.
    fn call(&self, model: &str, action: &str) -> Result<Uri, ProviderError> {
        if !self.has_key {
            return Err(ProviderError::NotConfigured("GEMINI_API_KEY is empty"));
        }
        // Model names are path segments; reject anything that could change the path.
        if model.is_empty()
            || !model
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-._".contains(c))
        {
            return Err(ProviderError::Invalid(
                "model name is not a Gemini model id".into(),
            ));
        }
        let url = format!("{}/v1beta/models/{model}:{action}", self.base_url)
            .parse::<Uri>()
            .map_err(|_| ProviderError::NotConfigured("GEMINI_BASE_URL is not a valid URL"))?;
        Ok(url)
    }
}

/// The events of one streamed chunk: its text, and once a finish reason has come and
/// the stream ends, the finish with the last usage reported (Gemini repeats usage on
/// chunks; the last is the whole answer's).
struct StreamState {
    sse: SseDecoder,
    reason: Option<FinishReason>,
    usage: Usage,
}

impl StreamState {
    fn chunk(&mut self, chunk: Option<&[u8]>) -> Result<Vec<StreamEvent>, ProviderError> {
        let mut events = Vec::new();
        let Some(chunk) = chunk else {
            return Ok(self
                .reason
                .map(|reason| StreamEvent::Finish {
                    reason,
                    usage: self.usage,
                })
                .into_iter()
                .collect());
        };
        self.sse.push(chunk);
        while let Some(event) = self.sse.next_event() {
            let event = event.map_err(|_| {
                ProviderError::Invalid(format!(
                    "a stream event is longer than {MAX_ANSWER_BYTES} bytes"
                ))
            })?;
            let reply: GeminiReply = serde_json::from_str(&event.data).map_err(|_| {
                ProviderError::Invalid("a stream event is not the expected JSON".into())
            })?;
            let text = reply.text();
            if !text.is_empty() {
                events.push(StreamEvent::Delta(text));
            }
            events.extend(reply.tool_calls().into_iter().map(StreamEvent::ToolCall));
            if let Some(reason) = reply.finish_reason() {
                self.reason = Some(reason);
            }
            if let Some(usage) = &reply.usage_metadata {
                self.usage = usage.usage();
            }
        }
        Ok(events)
    }
}

#[async_trait]
impl Provider for Gemini {
    fn name(&self) -> &'static str {
        self.endpoint.name
    }

    fn kind(&self) -> &'static str {
        "gcp.gemini"
    }

    async fn complete(
        &self,
        request: &ChatRequest,
        model: &str,
    ) -> Result<Completion, ProviderError> {
        let url = self.call(model, "generateContent")?;
        let body = json_body(&request_body(request), request.json_size_hint())?;
        let reply: GeminiReply = self
            .client
            .post_json(&url, &self.endpoint.headers, body)
            .await?;
        Ok(Completion::new(
            reply.text(),
            reply.tool_calls(),
            reply.finish_reason().unwrap_or_default(),
            reply
                .usage_metadata
                .as_ref()
                .map(UsageMetadata::usage)
                .unwrap_or_default(),
        ))
    }

    async fn stream(
        &self,
        request: &ChatRequest,
        model: &str,
    ) -> Result<EventStream, ProviderError> {
        let url = self.call(model, "streamGenerateContent?alt=sse")?;
        let body = json_body(&request_body(request), request.json_size_hint())?;
        let bytes = self
            .client
            .post_stream(&url, &self.endpoint.headers, body)
            .await?;
        let mut state = StreamState {
            sse: SseDecoder::new(MAX_ANSWER_BYTES),
            reason: None,
            usage: Usage::default(),
        };
        Ok(events_from(bytes, move |chunk| state.chunk(chunk)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Message;

    #[test]
    fn roles_map_to_gemini_turns_and_system_instruction() {
        let request = ChatRequest {
            messages: vec![
                Message::text("system", "be brief"),
                Message::text("user", "hi"),
                Message::text("assistant", "hello"),
            ],
            model: None,
            model_hint: None,
            max_tokens: Some(32),
            temperature: 0.5,
            stream: false,
            sampling: Default::default(),
            tools: Vec::new(),
            tool_choice: Default::default(),
            strict_model: false,
            passthrough: Default::default(),
        };
        assert_eq!(
            serde_json::to_value(request_body(&request)).unwrap(),
            serde_json::json!({
                "contents": [
                    {"role": "user", "parts": [{"text": "hi"}]},
                    {"role": "model", "parts": [{"text": "hello"}]},
                ],
                "systemInstruction": {"parts": [{"text": "be brief"}]},
                "generationConfig": {"temperature": 0.5, "maxOutputTokens": 32},
            })
        );
    }

    #[test]
    fn tools_calls_and_results_become_declarations_function_parts_and_a_mode() {
        use crate::domain::{Tool, ToolChoice, ToolResult};
        let call = ToolCall {
            id: "call_1".into(),
            name: "get_weather".into(),
            arguments: r#"{"city":"Paris"}"#.into(),
        };
        let result = |id: &str, content: &str, is_error: bool| Message {
            tool_result: Some(ToolResult {
                call_id: id.into(),
                name: "get_weather".into(),
                is_error,
            }),
            ..Message::text("tool", content)
        };
        let mut request = ChatRequest {
            messages: vec![
                Message::text("user", "weather?"),
                Message {
                    tool_calls: vec![
                        call.clone(),
                        ToolCall {
                            id: "call_2".into(),
                            ..call
                        },
                    ],
                    ..Message::text("assistant", "")
                },
                result("call_1", "18C", false),
                result("call_2", "no such city", true),
            ],
            tools: vec![Tool {
                name: "get_weather".into(),
                description: Some("d".into()),
                parameters: Some(serde_json::json!({"type": "object"})),
                strict: false,
            }],
            tool_choice: ToolChoice::Function("get_weather".into()),
            ..ChatRequest::of(Vec::new())
        };
        let body = serde_json::to_value(request_body(&request)).unwrap();
        assert_eq!(
            body["contents"],
            serde_json::json!([
                {"role": "user", "parts": [{"text": "weather?"}]},
                {"role": "model", "parts": [
                    {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}},
                    {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}},
                ]},
                {"role": "user", "parts": [
                    {"functionResponse": {"name": "get_weather", "response": {"output": "18C"}}},
                    {"functionResponse": {"name": "get_weather", "response": {"error": "no such city"}}},
                ]},
            ])
        );
        assert_eq!(
            body["tools"],
            serde_json::json!([{"functionDeclarations": [
                {"name": "get_weather", "description": "d", "parametersJsonSchema": {"type": "object"}}]}])
        );
        assert_eq!(
            body["toolConfig"],
            serde_json::json!({"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["get_weather"]}})
        );
        for (choice, strict, mode) in [
            (ToolChoice::Auto, false, "AUTO"),
            (ToolChoice::Auto, true, "VALIDATED"),
            (ToolChoice::None, false, "NONE"),
            (ToolChoice::Required, true, "ANY"),
        ] {
            request.tool_choice = choice;
            request.tools[0].strict = strict;
            let body = serde_json::to_value(request_body(&request)).unwrap();
            assert_eq!(body["toolConfig"]["functionCallingConfig"]["mode"], mode);
        }
    }

    #[test]
    fn a_function_call_part_is_a_tool_call_and_a_stop_with_calls_says_so() {
        let reply: GeminiReply = serde_json::from_str(
            r#"{"candidates":[{"content":{"parts":[{"text":"thinking","thought":true},{"text":"Sure."},{"functionCall":{"id":"fc-1","name":"f","args":{"a":1}}}]},"finishReason":"STOP"}]}"#,
        )
        .unwrap();
        assert_eq!(
            reply.text(),
            "Sure.",
            "thought summaries are not the answer"
        );
        assert_eq!(
            reply.tool_calls(),
            [ToolCall {
                id: "fc-1".into(),
                name: "f".into(),
                arguments: r#"{"a":1}"#.into()
            }]
        );
        let completion = Completion::new(
            reply.text(),
            reply.tool_calls(),
            reply.finish_reason().unwrap(),
            Usage::default(),
        );
        assert_eq!(completion.finish_reason, FinishReason::ToolCalls);
    }

    #[test]
    fn a_calls_thought_signature_goes_back_with_it() {
        let reply: GeminiReply = serde_json::from_str(
            r#"{"candidates":[{"content":{"parts":[{"functionCall":{"name":"f","args":{}},"thoughtSignature":"c2ln+/="}]}}]}"#,
        )
        .unwrap();
        let call = reply.tool_calls().remove(0);
        assert!(
            call.id.starts_with("call_") && call.id.ends_with("__sig__c2ln+/="),
            "{}",
            call.id
        );
        let request = ChatRequest::of(vec![Message {
            tool_calls: vec![call],
            ..Message::text("assistant", "")
        }]);
        let body = serde_json::to_value(request_body(&request)).unwrap();
        assert_eq!(
            body["contents"][0]["parts"][0],
            serde_json::json!({"functionCall": {"name": "f", "args": {}}, "thoughtSignature": "c2ln+/="})
        );
    }
}
