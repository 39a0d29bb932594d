//! `GET /openapi.json`: an OpenAPI 3 description of the public endpoints.

use std::sync::OnceLock;

use axum::Json;
use serde_json::{json, Value};

fn error_response(description: &str) -> Value {
    json!({
        "description": description,
        "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Error" } } }
    })
}

fn chat_operation() -> Value {
    json!({
        "summary": "Chat completion",
        "description": "Authenticated with X-API-Key, rate limited per client, answered from the cache or the routed provider.",
        "security": [{ "ApiKey": [] }],
        "requestBody": {
            "required": true,
            "content": { "application/json": { "schema": { "$ref": "#/components/schemas/ChatRequest" } } }
        },
        "responses": {
            "200": {
                "description": "The completion. Carries X-Cache and the rate-limit headers.",
                "content": { "application/json": { "schema": { "$ref": "#/components/schemas/ChatResponse" } } }
            },
            "401": error_response("Invalid or missing API Key"),
            "413": error_response("Body larger than MAX_BODY_BYTES"),
            "422": {
                "description": "Body is not JSON or fails the schema",
                "content": { "application/json": { "schema": { "$ref": "#/components/schemas/ValidationError" } } }
            },
            "429": error_response("Rate limited; see Retry-After"),
            "502": error_response("Provider failed after its retries"),
            "503": error_response("Rate limiter backend down and failing closed"),
            "504": error_response("Provider timed out")
        }
    })
}

fn document() -> Value {
    let health = json!({ "get": { "summary": "Liveness", "responses": { "200": { "description": "{\"status\":\"ok\"}" } } } });
    let ready = json!({ "get": { "summary": "Readiness", "responses": {
        "200": { "description": "The limiter backend answers" },
        "503": { "description": "The limiter backend is down; the body names it" } } } });
    let metrics = json!({ "get": { "summary": "Prometheus metrics", "responses": {
        "200": { "description": "Text format 0.0.4", "content": { "text/plain": { "schema": { "type": "string" } } } } } } });
    json!({
        "openapi": "3.0.3",
        "info": { "title": "llm-gateway", "version": env!("CARGO_PKG_VERSION") },
        "paths": {
            "/api/v1/chat": { "post": chat_operation() },
            "/v1/chat": { "post": chat_operation() },
            "/api/v1/health": health, "/health": health,
            "/api/v1/ready": ready, "/ready": ready,
            "/api/v1/metrics": metrics, "/metrics": metrics,
        },
        "components": {
            "securitySchemes": { "ApiKey": { "type": "apiKey", "in": "header", "name": "X-API-Key" } },
            "schemas": {
                "Message": {
                    "type": "object", "required": ["role", "content"],
                    "properties": { "role": { "type": "string" }, "content": { "type": "string" } }
                },
                "ChatRequest": {
                    "type": "object", "required": ["messages"],
                    "properties": {
                        "messages": { "type": "array", "minItems": 1, "items": { "$ref": "#/components/schemas/Message" } },
                        "model": { "type": "string", "nullable": true },
                        "model_hint": { "type": "string", "nullable": true },
                        "max_tokens": { "type": "integer", "minimum": 1, "default": 512 },
                        "temperature": { "type": "number", "minimum": 0, "maximum": 2, "default": 0.7 },
                        "stream": { "type": "boolean", "default": false }
                    }
                },
                "Usage": {
                    "type": "object",
                    "properties": {
                        "prompt_tokens": { "type": "integer" },
                        "completion_tokens": { "type": "integer" },
                        "total_tokens": { "type": "integer" }
                    }
                },
                "ChatResponse": {
                    "type": "object", "required": ["id", "provider", "content", "usage"],
                    "properties": {
                        "id": { "type": "string", "format": "uuid" },
                        "provider": { "type": "string", "enum": ["ollama", "gemini"] },
                        "content": { "type": "string" },
                        "usage": { "$ref": "#/components/schemas/Usage" }
                    }
                },
                "Error": { "type": "object", "properties": { "detail": { "type": "string" } } },
                "ValidationError": {
                    "type": "object",
                    "properties": { "detail": { "type": "array", "items": {
                        "type": "object",
                        "properties": {
                            "type": { "type": "string" },
                            "loc": { "type": "array", "items": {} },
                            "msg": { "type": "string" }
                        }
                    } } }
                }
            }
        }
    })
}

/// The document, built once.
pub async fn openapi() -> Json<&'static Value> {
    static DOCUMENT: OnceLock<Value> = OnceLock::new();
    Json(DOCUMENT.get_or_init(document))
}
