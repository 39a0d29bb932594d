//! What answering a chat request produces: the provider's completion, the answer the
//! gateway keeps and sends, and whether it came from the cache.

use serde::{Deserialize, Serialize};

use super::tools::ToolCall;

/// Token counts of one completion.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Tokens in the prompt.
    pub prompt_tokens: u64,
    /// Tokens generated.
    pub completion_tokens: u64,
    /// Their sum.
    pub total_tokens: u64,
}

/// Why generation stopped.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum FinishReason {
    /// The model finished (or hit a stop sequence).
    #[default]
    Stop,
    /// The token budget (`max_tokens`) ran out.
    Length,
    /// The upstream withheld content (a safety filter).
    ContentFilter,
    /// The model called tools and waits for their results.
    ToolCalls,
}

impl FinishReason {
    /// The reason of an answer that called tools (or not): upstreams report a plain stop
    /// when the model ends its turn with calls, the doors say it called tools.
    pub fn with_calls(self, called: bool) -> FinishReason {
        match self {
            FinishReason::Stop if called => FinishReason::ToolCalls,
            other => other,
        }
    }
}

/// What a provider answered.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    /// The generated text.
    pub content: String,
    /// The tools the model called, in order.
    pub tool_calls: Vec<ToolCall>,
    /// Token counts as the provider reported them.
    pub usage: Usage,
    /// Why generation stopped.
    pub finish_reason: FinishReason,
}

impl Completion {
    /// An answer of `content` and `tool_calls`; a stop with calls is a stop to call tools.
    pub fn new(
        content: String,
        tool_calls: Vec<ToolCall>,
        reason: FinishReason,
        usage: Usage,
    ) -> Completion {
        Completion {
            finish_reason: reason.with_calls(!tool_calls.is_empty()),
            content,
            tool_calls,
            usage,
        }
    }
}

/// A finished answer as the doors render it, fresh from a provider: the text, the
/// provider and model that wrote it, and a name for it.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    /// A UUID4 naming this answer; each door writes it in its own way.
    pub id: uuid::Uuid,
    /// Unix seconds when the answer was begun.
    pub created: u64,
    /// The provider that produced it, e.g. `ollama`.
    pub provider: &'static str,
    /// The model the provider was asked for.
    pub model: String,
    /// The completion.
    pub completion: Completion,
}

/// Whether an answer came from the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheStatus {
    /// Served from the cache.
    Hit,
    /// Asked a provider (or shared a concurrent identical call).
    Miss,
}

impl CacheStatus {
    /// `HIT` or `MISS`.
    pub fn as_str(self) -> &'static str {
        match self {
            CacheStatus::Hit => "HIT",
            CacheStatus::Miss => "MISS",
        }
    }
}
