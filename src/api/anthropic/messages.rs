//! `POST /v1/messages`: Anthropic's Messages API, whole or streamed as named events.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Extension, State};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use super::error::AnthropicError;
use super::request::{parse, MessagesRequest};
use crate::api::auth::ClientIdentity;
use crate::api::door::{self, Gate};
use crate::api::limit_headers;
use crate::api::original::chat::MaxBodyBytes;
use crate::api::sse::KeepAliveEvery;
use crate::chat::service::ChatService;
use crate::chat::stream::LiveStream;
use crate::domain::{ChatError, Completion, FinishReason, Reply, StreamEvent, ToolCall, Usage};

/// The handler. Authentication has run; the order of checks is the original door's:
/// 429, then 413/400, then the answer (or 502/503/504).
pub async fn messages(
    State(chat): State<Arc<ChatService>>,
    State(MaxBodyBytes(max_body_bytes)): State<MaxBodyBytes>,
    State(keep_alive): State<KeepAliveEvery>,
    identity: Option<Extension<ClientIdentity>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let Some(Extension(identity)) = identity else {
        return AnthropicError::unauthorized().into_response();
    };
    let gate = door::gate::<AnthropicError, _>(
        &chat,
        &identity,
        body,
        max_body_bytes,
        parse,
        MessagesRequest::cache_key,
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
        door::stream_answer::<AnthropicError, _>(
            &chat,
            request.chat,
            admission,
            encode,
            keep_alive,
            replay,
            live_events,
        )
        .await
    } else {
        match chat.answer(request.chat, admission, encode).await {
            Ok(outcome) => door::json_answer(outcome.body, outcome.cache, outcome.provider),
            Err(error) => door::chat_error::<AnthropicError>(error),
        }
    };
    limit_headers::apply_anthropic(response.headers_mut(), &identity.policy, &decision);
    response
}

/// `stop_reason` as Anthropic writes it.
fn stop_reason(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Stop => "end_turn",
        FinishReason::Length => "max_tokens",
        FinishReason::ContentFilter => "refusal",
        FinishReason::ToolCalls => "tool_use",
    }
}

/// `msg_` and the answer's id.
fn message_id(id: uuid::Uuid) -> String {
    format!("msg_{}", id.simple())
}

/// Token counts as Anthropic names them.
#[derive(Serialize, Deserialize, Clone, Copy)]
struct AnthropicUsage {
    input_tokens: u64,
    output_tokens: u64,
}

impl From<Usage> for AnthropicUsage {
    fn from(usage: Usage) -> AnthropicUsage {
        AnthropicUsage {
            input_tokens: usage.prompt_tokens,
            output_tokens: usage.completion_tokens,
        }
    }
}

/// A whole answer; the cache keeps exactly these bytes.
#[derive(Serialize, Deserialize)]
struct Message {
    id: String,
    #[serde(rename = "type")]
    kind: String,
    role: String,
    model: String,
    content: Vec<Block>,
    stop_reason: Option<String>,
    stop_sequence: Option<String>,
    usage: AnthropicUsage,
}

/// A content block of an answer: text, or a call of a tool with its input.
#[derive(Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Block {
    Text {
        text: String,
    },
    ToolUse {
        id: String,
        name: String,
        input: serde_json::Value,
    },
}

impl Block {
    fn tool_use(call: &ToolCall) -> Block {
        Block::ToolUse {
            id: call.id.clone(),
            name: call.name.clone(),
            input: call.arguments_value(),
        }
    }
}

/// The text (unless the answer is calls only), then a block per call.
fn blocks(completion: &Completion) -> Vec<Block> {
    let text =
        (!completion.content.is_empty() || completion.tool_calls.is_empty()).then(|| Block::Text {
            text: completion.content.clone(),
        });
    text.into_iter()
        .chain(completion.tool_calls.iter().map(Block::tool_use))
        .collect()
}

fn encode(reply: &Reply) -> Result<Bytes, ChatError> {
    let message = Message {
        id: message_id(reply.id),
        kind: "message".into(),
        role: "assistant".into(),
        model: reply.model.clone(),
        content: blocks(&reply.completion),
        stop_reason: Some(stop_reason(reply.completion.finish_reason).into()),
        stop_sequence: None,
        usage: reply.completion.usage.into(),
    };
    serde_json::to_vec(&message)
        .map(Bytes::from)
        .map_err(|_| ChatError::UpstreamFailed("the answer could not be encoded".into()))
}

/// `event: <name>` and `data: <json>`.
fn event(name: &str, data: &serde_json::Value) -> Bytes {
    Bytes::from(format!("event: {name}\ndata: {data}\n\n"))
}

/// Writes the events of one stream: `message_start`, then each content block (text as
/// it comes; a tool call whole, its input in one `input_json_delta`), then the end.
struct Events {
    id: String,
    model: String,
    started: bool,
    /// Blocks begun so far; the last is open while `text_open`.
    blocks: u32,
    text_open: bool,
}

impl Events {
    fn new(id: String, model: String) -> Events {
        Events {
            id,
            model,
            started: false,
            blocks: 0,
            text_open: false,
        }
    }

    fn message_start(&self) -> Bytes {
        event(
            "message_start",
            &serde_json::json!({"type": "message_start", "message": {
                "id": self.id, "type": "message", "role": "assistant", "content": [],
                "model": self.model, "stop_reason": null, "stop_sequence": null,
                "usage": {"input_tokens": 0, "output_tokens": 0},
            }}),
        )
    }

    /// `content_block_start` of the next block (the first followed by a `ping`, as
    /// Anthropic sends it).
    fn block_start(&mut self, block: serde_json::Value, events: &mut Vec<Bytes>) -> u32 {
        let index = self.blocks;
        self.blocks += 1;
        events.push(event(
            "content_block_start",
            &serde_json::json!({"type": "content_block_start", "index": index, "content_block": block}),
        ));
        if index == 0 {
            events.push(event("ping", &serde_json::json!({"type": "ping"})));
        }
        index
    }

    fn block_stop(index: u32) -> Bytes {
        event(
            "content_block_stop",
            &serde_json::json!({"type": "content_block_stop", "index": index}),
        )
    }

    /// Closes the open text block, if any.
    fn close_text(&mut self, events: &mut Vec<Bytes>) {
        if std::mem::take(&mut self.text_open) {
            events.push(Events::block_stop(self.blocks - 1));
        }
    }

    fn event(&mut self, stream_event: &StreamEvent) -> Vec<Bytes> {
        let mut events = Vec::with_capacity(2);
        if !std::mem::replace(&mut self.started, true) {
            events.push(self.message_start());
        }
        match stream_event {
            StreamEvent::Delta(text) => {
                if !self.text_open {
                    self.block_start(serde_json::json!({"type": "text", "text": ""}), &mut events);
                    self.text_open = true;
                }
                events.push(event(
                    "content_block_delta",
                    &serde_json::json!({"type": "content_block_delta", "index": self.blocks - 1, "delta": {"type": "text_delta", "text": text}}),
                ));
            }
            StreamEvent::ToolCall(call) => {
                self.close_text(&mut events);
                let index = self.block_start(
                    serde_json::json!({"type": "tool_use", "id": call.id, "name": call.name, "input": {}}),
                    &mut events,
                );
                events.push(event(
                    "content_block_delta",
                    &serde_json::json!({"type": "content_block_delta", "index": index, "delta": {"type": "input_json_delta", "partial_json": call.arguments}}),
                ));
                events.push(Events::block_stop(index));
            }
            StreamEvent::Finish { reason, usage } => {
                // An empty answer still has its (empty) text block.
                if self.blocks == 0 {
                    self.block_start(serde_json::json!({"type": "text", "text": ""}), &mut events);
                    self.text_open = true;
                }
                self.close_text(&mut events);
                events.push(event(
                    "message_delta",
                    &serde_json::json!({"type": "message_delta",
                        "delta": {"stop_reason": stop_reason(*reason), "stop_sequence": null},
                        "usage": AnthropicUsage::from(*usage)}),
                ));
                events.push(event(
                    "message_stop",
                    &serde_json::json!({"type": "message_stop"}),
                ));
            }
        }
        events
    }
}

/// A failure after the first byte: an `error` event, and the stream ends there.
fn error_event(error: ChatError) -> Bytes {
    let error = AnthropicError::from(error);
    Bytes::from(format!("event: error\ndata: {}\n\n", error.json()))
}

fn live_events(live: LiveStream) -> impl futures_util::Stream<Item = Bytes> + Send {
    let mut events = Events::new(message_id(live.id()), live.model().to_owned());
    live.flat_map(move |item| {
        let frames = match item {
            Ok(stream_event) => events.event(&stream_event),
            Err(error) => vec![error_event(error)],
        };
        futures_util::stream::iter(frames)
    })
}

/// A stored answer replayed as a stream: the whole text in one delta, each tool call as
/// its block, then the end.
fn replay(body: &[u8]) -> Option<Vec<Bytes>> {
    let stored: Message = serde_json::from_slice(body).ok()?;
    let reason = match stored.stop_reason.as_deref() {
        Some("max_tokens") => FinishReason::Length,
        Some("refusal") => FinishReason::ContentFilter,
        Some("tool_use") => FinishReason::ToolCalls,
        _ => FinishReason::Stop,
    };
    let mut events = Events::new(stored.id, stored.model);
    let mut frames = Vec::new();
    for block in stored.content {
        let stream_event = match block {
            Block::Text { text } => StreamEvent::Delta(text),
            Block::ToolUse { id, name, input } => StreamEvent::ToolCall(ToolCall {
                id,
                name,
                arguments: input.to_string(),
            }),
        };
        frames.extend(events.event(&stream_event));
    }
    frames.extend(events.event(&StreamEvent::Finish {
        reason,
        usage: Usage {
            prompt_tokens: stored.usage.input_tokens,
            completion_tokens: stored.usage.output_tokens,
            total_tokens: stored.usage.input_tokens + stored.usage.output_tokens,
        },
    }));
    Some(frames)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stream_is_anthropics_named_events_in_order() {
        let mut events = Events::new("msg_1".into(), "m".into());
        let mut frames = events.event(&StreamEvent::Delta("Hi".into()));
        frames.extend(events.event(&StreamEvent::Finish {
            reason: FinishReason::Length,
            usage: Usage {
                prompt_tokens: 3,
                completion_tokens: 1,
                total_tokens: 4,
            },
        }));
        let names: Vec<String> = frames
            .iter()
            .map(|f| {
                let text = String::from_utf8_lossy(f);
                text.lines()
                    .next()
                    .unwrap()
                    .trim_start_matches("event: ")
                    .to_owned()
            })
            .collect();
        assert_eq!(
            names,
            [
                "message_start",
                "content_block_start",
                "ping",
                "content_block_delta",
                "content_block_stop",
                "message_delta",
                "message_stop"
            ]
        );
        let delta = String::from_utf8_lossy(&frames[5]).into_owned();
        assert!(delta.contains(r#""stop_reason":"max_tokens""#), "{delta}");
        assert!(delta.contains(r#""output_tokens":1"#), "{delta}");
    }

    #[test]
    fn a_whole_answer_is_a_message_and_replays_as_events() {
        let reply = Reply {
            id: uuid::Uuid::nil(),
            created: 0,
            provider: "ollama",
            model: "m".into(),
            completion: Completion {
                content: "hello".into(),
                tool_calls: Vec::new(),
                usage: Usage {
                    prompt_tokens: 2,
                    completion_tokens: 1,
                    total_tokens: 3,
                },
                finish_reason: FinishReason::Stop,
            },
        };
        let body = encode(&reply).unwrap();
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"id": "msg_00000000000000000000000000000000", "type": "message", "role": "assistant",
                "model": "m", "content": [{"type": "text", "text": "hello"}], "stop_reason": "end_turn",
                "stop_sequence": null, "usage": {"input_tokens": 2, "output_tokens": 1}})
        );
        let replayed: String = replay(&body)
            .unwrap()
            .iter()
            .map(|f| String::from_utf8_lossy(f).into_owned())
            .collect();
        assert!(
            replayed.contains(r#""text":"hello""#)
                && replayed.ends_with("event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n")
        );
    }

    #[test]
    fn text_then_tool_calls_are_blocks_in_order_with_their_indexes() {
        let call = |n: u32| ToolCall {
            id: format!("toolu_{n}"),
            name: "f".into(),
            arguments: r#"{"a":1}"#.into(),
        };
        let mut events = Events::new("msg_1".into(), "m".into());
        let mut frames = events.event(&StreamEvent::Delta("Let me see.".into()));
        frames.extend(events.event(&StreamEvent::ToolCall(call(1))));
        frames.extend(events.event(&StreamEvent::ToolCall(call(2))));
        frames.extend(events.event(&StreamEvent::Finish {
            reason: FinishReason::ToolCalls,
            usage: Usage::default(),
        }));
        let parsed: Vec<(String, serde_json::Value)> = frames
            .iter()
            .map(|f| {
                let text = String::from_utf8_lossy(f).into_owned();
                let (name, data) = text.split_once('\n').unwrap();
                (
                    name.trim_start_matches("event: ").to_owned(),
                    serde_json::from_str(data.trim().trim_start_matches("data: ")).unwrap(),
                )
            })
            .collect();
        let summary: Vec<String> = parsed
            .iter()
            .map(|(name, data)| match data.get("index") {
                Some(index) => format!("{name}@{index}"),
                None => name.clone(),
            })
            .collect();
        assert_eq!(
            summary,
            [
                "message_start",
                "content_block_start@0",
                "ping",
                "content_block_delta@0",
                "content_block_stop@0",
                "content_block_start@1",
                "content_block_delta@1",
                "content_block_stop@1",
                "content_block_start@2",
                "content_block_delta@2",
                "content_block_stop@2",
                "message_delta",
                "message_stop"
            ]
        );
        assert_eq!(
            parsed[5].1["content_block"],
            serde_json::json!({"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}})
        );
        assert_eq!(
            parsed[6].1["delta"],
            serde_json::json!({"type": "input_json_delta", "partial_json": "{\"a\":1}"})
        );
        assert_eq!(parsed[11].1["delta"]["stop_reason"], "tool_use");
    }
}
