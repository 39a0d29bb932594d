//! Liveness (`/health`) and readiness (`/ready`).

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::app::AppState;

/// Liveness: the process answers.
pub async fn health() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

/// Readiness: 200 when the limiter can decide through its backend, else 503 naming what
/// is down (see `RateLimiter::ready`).
pub async fn ready(State(state): State<AppState>) -> Response {
    let backend = state.limiter.backend_name();
    let prefetch = state.chat.readiness_cache_key();
    match state.limiter.ready(prefetch).await {
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
