//! A streamed answer, as the core sees it: text and tool calls as the upstream produces
//! them, then the end.

use super::answer::{FinishReason, Usage};
use super::tools::ToolCall;

/// One event of a streamed answer.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamEvent {
    /// The next piece of generated text.
    Delta(String),
    /// A whole tool call (upstreams we speak send each call in one piece).
    ToolCall(ToolCall),
    /// The end: why generation stopped, and the usage the upstream reported.
    Finish {
        /// Why generation stopped.
        reason: FinishReason,
        /// Token counts of the whole answer.
        usage: Usage,
    },
}
