//! Liveness (`/health`) and readiness (`/ready`).

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use std::sync::Arc;

use crate::chat::service::ChatService;

/// Liveness: the process answers.
pub async fn health() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

/// Readiness: 200 when the limiter can decide through its backend, else 503 naming what
/// is down (see `ChatService::ready`).
pub async fn ready(State(chat): State<Arc<ChatService>>) -> Response {
    let backend = chat.limiter().backend_name();
    match chat.ready().await {
        Ok(()) => Json(json!({ "status": "ready", "checks": { backend: "ok" } })).into_response(),
        Err(error) => {
            tracing::warn!(backend, %error, "readiness check failed");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({
                    "status": "unavailable",
                    "detail": format!(
                        "Rate limiter backend ({backend}) is not answering: {}",
                        error.summary()
                    ),
                    "checks": { backend: "down" },
                })),
            )
                .into_response()
        }
    }
}
