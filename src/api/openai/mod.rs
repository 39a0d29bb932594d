//! The OpenAI door (CONTRACT §9, §10): `/v1/chat/completions` (whole or streamed as
//! server-sent events) and `/v1/models`, with OpenAI's bodies, error envelope and
//! `Authorization: Bearer` keys, so the official SDKs and the tools built on them work
//! unchanged.

pub mod chat;
pub mod error;
pub mod models;
pub mod request;
pub mod tools;

use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};

use crate::api::auth::{bearer_or_api_key, KeyDoor};
pub use error::OpenAiError;

/// How the OpenAI door reads keys: `Authorization: Bearer`, else `X-API-Key`.
pub struct OpenAiDoor;

impl KeyDoor for OpenAiDoor {
    fn presented_key(headers: &HeaderMap) -> Option<Result<&str, ()>> {
        bearer_or_api_key(headers)
    }

    fn unauthorized() -> Response {
        OpenAiError::unauthorized().into_response()
    }

    fn overloaded() -> Response {
        OpenAiError::overloaded().into_response()
    }
}
