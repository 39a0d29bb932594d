//! A streamed answer, as the core sees it: text as the upstream produces it, then the end.

use super::answer::{FinishReason, Usage};

/// One event of a streamed answer.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamEvent {
    /// The next piece of generated text.
    Delta(String),
    /// The end: why generation stopped, and the usage the upstream reported.
    Finish {
        /// Why generation stopped.
        reason: FinishReason,
        /// Token counts of the whole answer.
        usage: Usage,
    },
}
