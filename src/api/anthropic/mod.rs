//! The Anthropic door (CONTRACT §11): `/v1/messages`, whole or streamed as Anthropic's
//! named events, with its error envelope and `x-api-key` (or `Authorization: Bearer`)
//! keys, so the official SDK works unchanged.

pub mod error;
pub mod messages;
pub mod request;
pub mod tools;

use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};

use crate::api::auth::{bearer_or_api_key, KeyDoor};
pub use error::AnthropicError;

/// How the Anthropic door reads keys: `Authorization: Bearer`, else `X-API-Key`.
pub struct AnthropicDoor;

impl KeyDoor for AnthropicDoor {
    fn presented_key(headers: &HeaderMap) -> Option<Result<&str, ()>> {
        bearer_or_api_key(headers)
    }

    fn unauthorized() -> Response {
        AnthropicError::unauthorized().into_response()
    }

    fn overloaded() -> Response {
        AnthropicError::overloaded().into_response()
    }
}
