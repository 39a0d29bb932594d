//! A chat request as the core sees it, whichever door it came through.

use super::tools::{Tool, ToolCall, ToolChoice, ToolResult};

/// One chat turn.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Message {
    /// `system`, `user`, `assistant` or `tool`.
    pub role: String,
    /// The text of the turn (of a `tool` turn: the tool's output).
    pub content: String,
    /// The tools an `assistant` turn called.
    pub tool_calls: Vec<ToolCall>,
    /// On a `tool` turn: which call it answers.
    pub tool_result: Option<ToolResult>,
}

impl Message {
    /// A turn of plain text.
    pub fn text(role: impl Into<String>, content: impl Into<String>) -> Message {
        Message {
            role: role.into(),
            content: content.into(),
            ..Message::default()
        }
    }
}

/// A validated chat request.
#[derive(Debug, Clone, PartialEq)]
pub struct ChatRequest {
    /// At least one message.
    pub messages: Vec<Message>,
    /// Explicit model or routing word.
    pub model: Option<String>,
    /// Routing hint, used when `model` is absent.
    pub model_hint: Option<String>,
    /// Completion budget, at least 1; `None` leaves it to the upstream.
    pub max_tokens: Option<u64>,
    /// Sampling temperature in [0, 2].
    pub temperature: f64,
    /// Whether the client asked for a stream (the original door answers whole anyway).
    pub stream: bool,
    /// Sampling controls beyond the original's two; the original door sets none.
    pub sampling: Sampling,
    /// Functions the model may call; the original door offers none.
    pub tools: Vec<Tool>,
    /// Whether it may, must or must not call one.
    pub tool_choice: ToolChoice,
    /// The model must name a route (the SDK doors); the original door's requests fall
    /// back to the route `default`.
    pub strict_model: bool,
    /// Fields of an OpenAI body the gateway does not read, by name: an OpenAI-compatible
    /// upstream gets them as they are, any other refuses the request naming the first.
    pub passthrough: serde_json::Map<String, serde_json::Value>,
}

/// Sampling controls the newer doors accept and every upstream translates.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sampling {
    /// Nucleus sampling mass.
    pub top_p: Option<f64>,
    /// Sample from this many most likely tokens only.
    pub top_k: Option<u64>,
    /// Sequences that end generation.
    pub stop: Vec<String>,
    /// Seed for reproducible sampling.
    pub seed: Option<i64>,
    /// Penalty for tokens already present.
    pub presence_penalty: Option<f64>,
    /// Penalty by how often tokens appear.
    pub frequency_penalty: Option<f64>,
    /// The shape the answer must take.
    pub response_format: ResponseFormat,
}

/// The shape the answer must take.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum ResponseFormat {
    /// Free text.
    #[default]
    Text,
    /// Any JSON object.
    JsonObject,
    /// JSON matching this JSON Schema.
    JsonSchema(serde_json::Value),
}

impl ChatRequest {
    /// The bytes of what the model reads: every turn's text and tool calls, and the
    /// tools offered. A token limit reserves a quarter of them as prompt tokens (the
    /// rule of thumb for English; the real count settles it afterwards).
    pub fn prompt_bytes(&self) -> usize {
        let turns: usize = self
            .messages
            .iter()
            .map(|m| {
                let calls: usize = m
                    .tool_calls
                    .iter()
                    .map(|c| c.name.len() + c.arguments.len())
                    .sum();
                m.content.len() + calls
            })
            .sum();
        let tools: usize = self
            .tools
            .iter()
            .map(|t| {
                let schema = t.parameters.as_ref().map_or(0, |p| p.to_string().len());
                t.name.len() + t.description.as_ref().map_or(0, String::len) + schema
            })
            .sum();
        turns + tools
    }

    /// A request of `messages` and nothing else set: no model, no limits, temperature 1,
    /// no tools.
    pub fn of(messages: Vec<Message>) -> ChatRequest {
        ChatRequest {
            messages,
            model: None,
            model_hint: None,
            max_tokens: None,
            temperature: 1.0,
            stream: false,
            sampling: Sampling::default(),
            tools: Vec::new(),
            tool_choice: ToolChoice::Auto,
            strict_model: false,
            passthrough: serde_json::Map::new(),
        }
    }

    /// About how many bytes the messages take once written as JSON: enough to size a
    /// buffer up front, so a long message is not copied again each time it outgrows it.
    pub fn json_size_hint(&self) -> usize {
        let text: usize = self
            .messages
            .iter()
            .map(|m| {
                let calls: usize = m
                    .tool_calls
                    .iter()
                    .map(|c| c.name.len() + c.arguments.len() + 64)
                    .sum();
                m.role.len() + m.content.len() + calls + 48
            })
            .sum();
        let tools: usize = self
            .tools
            .iter()
            .map(|t| {
                t.name.len()
                    + t.description.as_ref().map_or(0, String::len)
                    + t.parameters.as_ref().map_or(0, |p| p.to_string().len())
                    + 64
            })
            .sum();
        text + tools + 256
    }
}
