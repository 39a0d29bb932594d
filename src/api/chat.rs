//! `POST /api/v1/chat` and `/v1/chat`: read and validate the body, then ask the service.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use super::schemas::parse_chat_request;
use crate::app::AppState;
use crate::chat::routing::ProviderKind;
use crate::chat::service::CacheStatus;
use crate::error::ApiError;

/// Left on chat responses for the request log: which provider, hit or miss.
#[derive(Debug, Clone, Copy)]
pub struct ChatMeta {
    /// The routed provider.
    pub provider: ProviderKind,
    /// Hit or miss.
    pub cache: CacheStatus,
}

/// The chat handler. Authentication and the limiter have already run (see `app.rs`), so
/// the body is only read for admitted clients, bounded by `MAX_BODY_BYTES`.
pub async fn chat(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(|rejection| match rejection.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge(state.settings.max_body_bytes),
        _ => ApiError::BadBody,
    })?;
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    let request = parse_chat_request(&body, content_type)?;
    let outcome = state.chat.chat(request).await?;

    let mut response = (StatusCode::OK, outcome.body).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert("x-cache", HeaderValue::from_static(outcome.cache.as_str()));
    response.extensions_mut().insert(ChatMeta {
        provider: outcome.provider,
        cache: outcome.cache,
    });
    Ok(response)
}
