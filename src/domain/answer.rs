//! What answering a chat request produces: the provider's completion, the answer the
//! gateway keeps and sends, and whether it came from the cache.

use serde::{Deserialize, Serialize};

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

/// What a provider answered.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    /// The generated text.
    pub content: String,
    /// Token counts as the provider reported them.
    pub usage: Usage,
}

/// The gateway's answer to one request. Its JSON is what the cache stores, and it is
/// byte for byte the original door's response body (`{"id","provider","content","usage"}`),
/// so that door sends a cache hit's stored bytes unchanged, id included.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Answer {
    /// A UUID4 naming this answer (kept on cache hits).
    pub id: String,
    /// The provider that produced it, e.g. `ollama` or `gemini`.
    pub provider: String,
    /// The generated text.
    pub content: String,
    /// Token counts.
    pub usage: Usage,
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
