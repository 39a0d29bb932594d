//! `GET /v1/models` and `/v1/models/{id}`: the models clients can pick, as OpenAI lists
//! them.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::error::OpenAiError;
use crate::chat::service::ChatService;

fn model(id: &str, owner: &str) -> Value {
    json!({ "id": id, "object": "model", "created": 0, "owned_by": owner })
}

/// The list.
pub async fn list(State(chat): State<Arc<ChatService>>) -> Json<Value> {
    let data: Vec<Value> = chat
        .models()
        .iter()
        .map(|(id, provider)| model(id, provider))
        .collect();
    Json(json!({ "object": "list", "data": data }))
}

/// One model, or 404 `model_not_found` for a name not listed.
pub async fn get(State(chat): State<Arc<ChatService>>, Path(id): Path<String>) -> Response {
    match chat.models().iter().find(|(name, _)| *name == id) {
        Some((name, provider)) => Json(model(name, provider)).into_response(),
        None => OpenAiError::model_not_found(&id).into_response(),
    }
}
