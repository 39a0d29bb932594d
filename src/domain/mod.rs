//! The gateway's own language, spoken by every layer and importing none of them: a chat
//! request, the answer to it (whole or streamed), token usage, and why answering failed. Nothing here knows
//! HTTP, a status code or any client dialect; each front door (`api/`) translates its
//! dialect to these types and back.

pub mod answer;
pub mod error;
pub mod request;
pub mod stream;
pub mod tools;

pub use answer::{CacheStatus, Completion, FinishReason, Reply, Usage};
pub use error::ChatError;
pub use request::{ChatRequest, Message, ResponseFormat, Sampling};
pub use stream::StreamEvent;
pub use tools::{Tool, ToolCall, ToolChoice, ToolResult, Unsupported};
