//! A chat request as the core sees it, whichever door it came through.

use serde::{Deserialize, Serialize};

/// One chat turn.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    /// `user`, `assistant`, `system`, ...
    pub role: String,
    /// The text of the turn.
    pub content: String,
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
    /// Completion budget, at least 1.
    pub max_tokens: u64,
    /// Sampling temperature in [0, 2].
    pub temperature: f64,
    /// Whether the client asked for a stream (the original door answers whole anyway).
    pub stream: bool,
}

impl ChatRequest {
    /// About how many bytes the messages take once written as JSON: enough to size a
    /// buffer up front, so a long message is not copied again each time it outgrows it.
    pub fn json_size_hint(&self) -> usize {
        let text: usize = self
            .messages
            .iter()
            .map(|m| m.role.len() + m.content.len() + 48)
            .sum();
        text + 256
    }
}
