//! `POST /v1/chat/completions`: OpenAI's Chat Completions, whole or streamed as SSE.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Extension, State};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use super::error::OpenAiError;
use super::request::{parse, OpenAiRequest};
use crate::api::auth::ClientIdentity;
use crate::api::door::{self, Gate};
use crate::api::limit_headers;
use crate::api::original::chat::MaxBodyBytes;
use crate::api::sse::KeepAliveEvery;
use crate::chat::service::ChatService;
use crate::chat::stream::LiveStream;
use crate::domain::{ChatError, FinishReason, Reply, StreamEvent, ToolCall, Usage};

/// The handler. Authentication has run; the order of checks is the original door's:
/// 429, then 413/400, then the answer (or 502/503/504).
pub async fn chat_completions(
    State(chat): State<Arc<ChatService>>,
    State(MaxBodyBytes(max_body_bytes)): State<MaxBodyBytes>,
    State(keep_alive): State<KeepAliveEvery>,
    identity: Option<Extension<ClientIdentity>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let Some(Extension(identity)) = identity else {
        return OpenAiError::unauthorized().into_response();
    };
    let gate = door::gate::<OpenAiError, _>(
        &chat,
        &identity,
        body,
        max_body_bytes,
        parse,
        OpenAiRequest::cache_key,
    )
    .await;
    let (request, admission, decision) = match gate {
        Gate::Admitted {
            request,
            admission,
            decision,
        } => (request, admission, decision),
        Gate::Answered(response) => return response,
    };
    let mut response = if request.chat.stream {
        let include_usage = request.include_usage;
        door::stream_answer::<OpenAiError, _>(
            &chat,
            request.chat,
            admission,
            encode,
            keep_alive,
            |body| replay(body, include_usage),
            |live| live_frames(live, include_usage),
        )
        .await
    } else {
        match chat.answer(request.chat, admission, encode).await {
            Ok(outcome) => door::json_answer(outcome.body, outcome.cache, outcome.provider),
            Err(error) => door::chat_error::<OpenAiError>(error),
        }
    };
    limit_headers::apply_openai(response.headers_mut(), &identity.policy, &decision);
    response
}

/// `finish_reason` as OpenAI writes it.
fn finish_reason(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
        FinishReason::ContentFilter => "content_filter",
        FinishReason::ToolCalls => "tool_calls",
    }
}

/// `chatcmpl-` and the answer's id.
fn completion_id(id: uuid::Uuid) -> String {
    format!("chatcmpl-{}", id.simple())
}

/// A whole answer (`chat.completion`); the cache keeps exactly these bytes.
#[derive(Serialize, Deserialize)]
struct Completion<'a> {
    #[serde(borrow)]
    id: std::borrow::Cow<'a, str>,
    object: std::borrow::Cow<'a, str>,
    created: u64,
    #[serde(borrow)]
    model: std::borrow::Cow<'a, str>,
    choices: Vec<Choice<'a>>,
    usage: Usage,
    system_fingerprint: Option<String>,
}

#[derive(Serialize, Deserialize)]
struct Choice<'a> {
    index: u32,
    #[serde(borrow)]
    message: AssistantMessage<'a>,
    logprobs: Option<()>,
    #[serde(borrow)]
    finish_reason: std::borrow::Cow<'a, str>,
}

#[derive(Serialize, Deserialize)]
struct AssistantMessage<'a> {
    #[serde(borrow)]
    role: std::borrow::Cow<'a, str>,
    /// `null` when the turn is tool calls only, as OpenAI writes it.
    #[serde(borrow)]
    content: Option<std::borrow::Cow<'a, str>>,
    refusal: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    tool_calls: Vec<WireCall>,
}

/// A tool call as OpenAI writes it, in an answer and (with its `index`) in a chunk.
#[derive(Serialize, Deserialize)]
struct WireCall {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    index: Option<u32>,
    id: String,
    #[serde(rename = "type")]
    kind: String,
    function: WireFunction,
}

#[derive(Serialize, Deserialize)]
struct WireFunction {
    name: String,
    arguments: String,
}

impl WireCall {
    fn new(call: &ToolCall, index: Option<u32>) -> WireCall {
        WireCall {
            index,
            id: call.id.clone(),
            kind: "function".into(),
            function: WireFunction {
                name: call.name.clone(),
                arguments: call.arguments.clone(),
            },
        }
    }

    fn into_call(self) -> ToolCall {
        ToolCall {
            id: self.id,
            name: self.function.name,
            arguments: self.function.arguments,
        }
    }
}

fn encode(reply: &Reply) -> Result<Bytes, ChatError> {
    let completion = &reply.completion;
    let completion = Completion {
        id: completion_id(reply.id).into(),
        object: "chat.completion".into(),
        created: reply.created,
        model: reply.model.as_str().into(),
        choices: vec![Choice {
            index: 0,
            message: AssistantMessage {
                role: "assistant".into(),
                content: (!completion.content.is_empty() || completion.tool_calls.is_empty())
                    .then(|| completion.content.as_str().into()),
                refusal: None,
                tool_calls: completion
                    .tool_calls
                    .iter()
                    .map(|call| WireCall::new(call, None))
                    .collect(),
            },
            logprobs: None,
            finish_reason: finish_reason(reply.completion.finish_reason).into(),
        }],
        usage: reply.completion.usage,
        system_fingerprint: None,
    };
    let mut body = Vec::with_capacity(reply.completion.content.len() + 320);
    serde_json::to_writer(&mut body, &completion)
        .map(|()| Bytes::from(body))
        .map_err(|_| ChatError::UpstreamFailed("the answer could not be encoded".into()))
}

/// One `chat.completion.chunk` event.
#[derive(Serialize)]
struct Chunk<'a> {
    id: &'a str,
    object: &'static str,
    created: u64,
    model: &'a str,
    system_fingerprint: Option<()>,
    choices: &'a [ChunkChoice<'a>],
    /// Absent without `include_usage`; with it, `null` on every chunk but the last.
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Option<&'a Usage>>,
}

#[derive(Serialize)]
struct ChunkChoice<'a> {
    index: u32,
    delta: Delta<'a>,
    logprobs: Option<()>,
    finish_reason: Option<&'static str>,
}

#[derive(Serialize)]
struct Delta<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    content: Option<&'a str>,
    /// One whole call per chunk, numbered in the answer by `index`.
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_calls: Option<[WireCall; 1]>,
}

/// Writes the chunks of one stream.
struct Chunks {
    id: String,
    created: u64,
    model: String,
    include_usage: bool,
    started: bool,
    /// Tool calls sent so far.
    calls: u32,
}

impl Chunks {
    fn new(id: String, created: u64, model: String, include_usage: bool) -> Chunks {
        Chunks {
            id,
            created,
            model,
            include_usage,
            started: false,
            calls: 0,
        }
    }

    fn frame(&self, choices: &[ChunkChoice<'_>], usage: Option<&Usage>) -> Bytes {
        let chunk = Chunk {
            id: &self.id,
            object: "chat.completion.chunk",
            created: self.created,
            model: &self.model,
            system_fingerprint: None,
            choices,
            usage: self.include_usage.then_some(usage),
        };
        let mut frame = b"data: ".to_vec();
        // A chunk of plain strings and numbers always serialises.
        let _ = serde_json::to_writer(&mut frame, &chunk);
        frame.extend_from_slice(b"\n\n");
        Bytes::from(frame)
    }

    /// The frames of one event; the first delta also carries the role.
    fn event(&mut self, event: &StreamEvent) -> Vec<Bytes> {
        let role = (!self.started).then_some("assistant");
        self.started = true;
        match event {
            StreamEvent::Delta(text) => vec![self.frame(
                &[ChunkChoice {
                    index: 0,
                    delta: Delta {
                        role,
                        content: Some(text),
                        tool_calls: None,
                    },
                    logprobs: None,
                    finish_reason: None,
                }],
                None,
            )],
            StreamEvent::ToolCall(call) => {
                let index = self.calls;
                self.calls += 1;
                vec![self.frame(
                    &[ChunkChoice {
                        index: 0,
                        delta: Delta {
                            role,
                            content: None,
                            tool_calls: Some([WireCall::new(call, Some(index))]),
                        },
                        logprobs: None,
                        finish_reason: None,
                    }],
                    None,
                )]
            }
            StreamEvent::Finish { reason, usage } => {
                let mut frames = vec![self.frame(
                    &[ChunkChoice {
                        index: 0,
                        delta: Delta {
                            role,
                            content: role.map(|_| ""),
                            tool_calls: None,
                        },
                        logprobs: None,
                        finish_reason: Some(finish_reason(*reason)),
                    }],
                    None,
                )];
                if self.include_usage {
                    frames.push(self.frame(&[], Some(usage)));
                }
                frames.push(Bytes::from_static(b"data: [DONE]\n\n"));
                frames
            }
        }
    }
}

/// A failure after the first byte: one error event, and the stream ends without `[DONE]`.
fn error_frame(error: ChatError) -> Bytes {
    Bytes::from(format!("data: {}\n\n", OpenAiError::from(error).json()))
}

fn live_frames(
    live: LiveStream,
    include_usage: bool,
) -> impl futures_util::Stream<Item = Bytes> + Send {
    let mut chunks = Chunks::new(
        completion_id(live.id()),
        live.created(),
        live.model().to_owned(),
        include_usage,
    );
    live.flat_map(move |event| {
        let frames = match event {
            Ok(event) => chunks.event(&event),
            Err(error) => vec![error_frame(error)],
        };
        futures_util::stream::iter(frames)
    })
}

/// A stored answer replayed as a stream: the whole text in one chunk, each tool call in
/// one, then the end.
fn replay(body: &[u8], include_usage: bool) -> Option<Vec<Bytes>> {
    let stored: Completion<'_> = serde_json::from_slice(body).ok()?;
    let choice = stored.choices.into_iter().next()?;
    let reason = match choice.finish_reason.as_ref() {
        "length" => FinishReason::Length,
        "content_filter" => FinishReason::ContentFilter,
        "tool_calls" => FinishReason::ToolCalls,
        _ => FinishReason::Stop,
    };
    let mut chunks = Chunks::new(
        stored.id.into_owned(),
        stored.created,
        stored.model.into_owned(),
        include_usage,
    );
    let message = choice.message;
    let mut frames = Vec::new();
    if message.content.is_some() || message.tool_calls.is_empty() {
        let text = message.content.unwrap_or_default().into_owned();
        frames.extend(chunks.event(&StreamEvent::Delta(text)));
    }
    for call in message.tool_calls {
        frames.extend(chunks.event(&StreamEvent::ToolCall(call.into_call())));
    }
    frames.extend(chunks.event(&StreamEvent::Finish {
        reason,
        usage: stored.usage,
    }));
    Some(frames)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::Completion as CoreCompletion;

    fn reply(content: &str) -> Reply {
        Reply {
            id: uuid::Uuid::nil(),
            created: 1_700_000_000,
            provider: "ollama",
            model: "llama3.1".into(),
            completion: CoreCompletion {
                content: content.into(),
                tool_calls: Vec::new(),
                usage: Usage {
                    prompt_tokens: 3,
                    completion_tokens: 2,
                    total_tokens: 5,
                },
                finish_reason: FinishReason::Stop,
            },
        }
    }

    fn text(frames: &[Bytes]) -> String {
        frames
            .iter()
            .map(|f| String::from_utf8_lossy(f).into_owned())
            .collect()
    }

    #[test]
    fn a_whole_answer_is_a_chat_completion() {
        let body: serde_json::Value =
            serde_json::from_slice(&encode(&reply("hi")).unwrap()).unwrap();
        assert_eq!(
            body,
            serde_json::json!({
                "id": "chatcmpl-00000000000000000000000000000000", "object": "chat.completion",
                "created": 1_700_000_000, "model": "llama3.1",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi", "refusal": null}, "logprobs": null, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
                "system_fingerprint": null,
            })
        );
    }

    #[test]
    fn chunks_are_framed_byte_for_byte() {
        let mut chunks = Chunks::new("chatcmpl-x".into(), 7, "m".into(), true);
        let mut frames = chunks.event(&StreamEvent::Delta("Hel".into()));
        frames.extend(chunks.event(&StreamEvent::Delta("lo".into())));
        frames.extend(chunks.event(&StreamEvent::Finish {
            reason: FinishReason::Length,
            usage: Usage {
                prompt_tokens: 1,
                completion_tokens: 2,
                total_tokens: 3,
            },
        }));
        let head = r#"{"id":"chatcmpl-x","object":"chat.completion.chunk","created":7,"model":"m","system_fingerprint":null,"choices":"#;
        assert_eq!(
            text(&frames),
            format!(
                "data: {head}[{{\"index\":0,\"delta\":{{\"role\":\"assistant\",\"content\":\"Hel\"}},\"logprobs\":null,\"finish_reason\":null}}],\"usage\":null}}\n\n\
                 data: {head}[{{\"index\":0,\"delta\":{{\"content\":\"lo\"}},\"logprobs\":null,\"finish_reason\":null}}],\"usage\":null}}\n\n\
                 data: {head}[{{\"index\":0,\"delta\":{{}},\"logprobs\":null,\"finish_reason\":\"length\"}}],\"usage\":null}}\n\n\
                 data: {head}[],\"usage\":{{\"prompt_tokens\":1,\"completion_tokens\":2,\"total_tokens\":3}}}}\n\n\
                 data: [DONE]\n\n"
            )
        );
    }

    #[test]
    fn without_include_usage_there_is_no_usage_field_and_no_usage_chunk() {
        let frames = replay(&encode(&reply("hi")).unwrap(), false).unwrap();
        let all = text(&frames);
        assert!(!all.contains("usage"), "{all}");
        assert!(
            all.contains(r#""delta":{"role":"assistant","content":"hi"}"#),
            "{all}"
        );
        assert!(all.ends_with("data: [DONE]\n\n"));
        assert_eq!(frames.len(), 3);
    }

    #[test]
    fn a_failure_mid_stream_is_an_error_event() {
        let frame = error_frame(ChatError::UpstreamFailed(
            "Provider 'ollama' failed mid-stream".into(),
        ));
        let text = String::from_utf8(frame.to_vec()).unwrap();
        assert!(text.starts_with("data: {\"error\":{"), "{text}");
        assert!(text.contains("\"type\":\"server_error\""), "{text}");
        assert!(text.ends_with("}\n\n"));
    }

    #[test]
    fn a_tool_call_is_one_chunk_with_its_index_and_the_answer_says_tool_calls() {
        let call = |n: u32| ToolCall {
            id: format!("call_{n}"),
            name: "f".into(),
            arguments: r#"{"a":1}"#.into(),
        };
        let mut chunks = Chunks::new("chatcmpl-x".into(), 7, "m".into(), false);
        let mut frames = chunks.event(&StreamEvent::ToolCall(call(1)));
        frames.extend(chunks.event(&StreamEvent::ToolCall(call(2))));
        let head = r#"data: {"id":"chatcmpl-x","object":"chat.completion.chunk","created":7,"model":"m","system_fingerprint":null,"choices":"#;
        assert_eq!(
            text(&frames),
            format!(
                "{head}[{{\"index\":0,\"delta\":{{\"role\":\"assistant\",\"tool_calls\":[{{\"index\":0,\"id\":\"call_1\",\"type\":\"function\",\"function\":{{\"name\":\"f\",\"arguments\":\"{{\\\"a\\\":1}}\"}}}}]}},\"logprobs\":null,\"finish_reason\":null}}]}}\n\n\
                 {head}[{{\"index\":0,\"delta\":{{\"tool_calls\":[{{\"index\":1,\"id\":\"call_2\",\"type\":\"function\",\"function\":{{\"name\":\"f\",\"arguments\":\"{{\\\"a\\\":1}}\"}}}}]}},\"logprobs\":null,\"finish_reason\":null}}]}}\n\n"
            )
        );
        let mut reply = reply("");
        reply.completion.tool_calls = vec![call(1)];
        reply.completion.finish_reason = FinishReason::ToolCalls;
        let body = encode(&reply).unwrap();
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            json["choices"][0]["message"],
            serde_json::json!({"role": "assistant", "content": null, "refusal": null,
                "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{\"a\":1}"}}]})
        );
        assert_eq!(json["choices"][0]["finish_reason"], "tool_calls");
        let replayed = text(&replay(&body, false).unwrap());
        assert!(
            replayed.contains(r#""tool_calls":[{"index":0,"id":"call_1""#),
            "{replayed}"
        );
        assert!(
            replayed.contains(r#""finish_reason":"tool_calls""#),
            "{replayed}"
        );
        assert!(
            !replayed.contains(r#""content":"""#),
            "no empty text chunk: {replayed}"
        );
    }
}
