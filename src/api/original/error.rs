//! `ApiError`: every error a client of the original door can see, rendered once as
//! FastAPI's `{"detail": ...}`, and the one mapping of the core's errors to it. The
//! gateway's own answers outside any dialect (404, 405, overload) use it too.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::Value;

use crate::domain::ChatError;

/// One field-level validation failure, in pydantic's shape.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct FieldError {
    /// Machine-readable kind, e.g. `missing`, `int_parsing`, `json_invalid`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// Where the error is: `["body", "messages", 0, "content"]`.
    pub loc: Vec<Value>,
    /// Human-readable message. Unlike pydantic we never echo the input: it may hold
    /// message text or keys.
    pub msg: String,
}

/// Errors answered to clients. Each variant's doc names its status.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiError {
    /// 401: no `X-API-Key`, or not a configured key.
    #[error("Invalid or missing API Key")]
    Unauthorized,
    /// 429: the client's bucket is empty. Limit headers are added by the limiter layer.
    #[error("Too many requests. Please wait before trying again.")]
    RateLimited,
    /// 429: a token limit refused the request; the message says which.
    #[error("{0}")]
    TokensLimited(&'static str),
    /// 413: the body is larger than `MAX_BODY_BYTES`.
    #[error("Request body too large: the limit is {0} bytes")]
    PayloadTooLarge(usize),
    /// 408: the body did not arrive within `BODY_READ_TIMEOUT_SECONDS`.
    #[error("Request body was not received in time")]
    RequestTimeout,
    /// 400: the body could not be read (client aborted, bad chunking).
    #[error("Could not read the request body")]
    BadBody,
    /// 422: the body is not JSON or fails the schema.
    #[error("Request validation failed")]
    Validation(Vec<FieldError>),
    /// 502: the provider failed after its retries. The message names the provider.
    #[error("{0}")]
    BadGateway(String),
    /// 504: the provider timed out. The message names the provider.
    #[error("{0}")]
    GatewayTimeout(String),
    /// 503: a dependency is down (limiter failing closed) or the gateway is overloaded.
    #[error("{0}")]
    Unavailable(String),
    /// 404: no such route.
    #[error("Not Found")]
    NotFound,
    /// 405: the route exists but not for this method.
    #[error("Method Not Allowed")]
    MethodNotAllowed,
}

impl From<ChatError> for ApiError {
    fn from(error: ChatError) -> ApiError {
        match error {
            ChatError::LimiterUnavailable(message) => ApiError::Unavailable(message),
            ChatError::UpstreamFailed(message) => ApiError::BadGateway(message),
            ChatError::UpstreamTimedOut(message) => ApiError::GatewayTimeout(message),
            // As the original: whatever the upstream said, a provider failure is a 502.
            error @ ChatError::UpstreamRateLimited { .. } => {
                ApiError::BadGateway(error.to_string())
            }
            ChatError::UnknownModel(_) => ApiError::NotFound,
            // This door offers no tools, so nothing it sends can be refused; were it to
            // happen, the upstream could not be used for the request.
            error @ ChatError::Unsupported { .. } => ApiError::BadGateway(error.to_string()),
        }
    }
}

impl ApiError {
    /// The HTTP status of this error.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::Unauthorized => StatusCode::UNAUTHORIZED,
            ApiError::RateLimited | ApiError::TokensLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            ApiError::BadBody => StatusCode::BAD_REQUEST,
            ApiError::Validation(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::BadGateway(_) => StatusCode::BAD_GATEWAY,
            ApiError::GatewayTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::NotFound => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
        }
    }
}

/// FastAPI's error envelope.
#[derive(serde::Serialize)]
struct Detail<T> {
    detail: T,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        // Field errors are serialised from the struct, not a `Value`, so their keys keep
        // FastAPI's order (type, loc, msg).
        let body = match &self {
            ApiError::Validation(errors) => serde_json::to_string(&Detail { detail: errors }),
            other => serde_json::to_string(&Detail {
                detail: other.to_string(),
            }),
        }
        .unwrap_or_else(|_| r#"{"detail":"Internal error"}"#.to_owned());
        let mut response = (status, body).into_response();
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn errors_render_fastapi_detail_bodies() {
        let response = ApiError::Unauthorized.into_response();
        assert_eq!(response.status(), 401);
        let bytes = axum::body::to_bytes(response.into_body(), 1024)
            .await
            .unwrap();
        assert_eq!(&bytes[..], br#"{"detail":"Invalid or missing API Key"}"#);
    }
}
