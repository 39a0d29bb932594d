//! llm-gateway: a self-hosted LLM API gateway (auth, distributed rate limiting, response
//! cache, provider routing, metrics). See README.md (its Architecture section maps the
//! folders) and CONTRACT.md.

// The OpenAPI document is one large `json!` literal (`api/openapi.rs`).
#![recursion_limit = "256"]

pub mod api;
pub mod app;
pub mod cache;
pub mod chat;
pub mod domain;
pub mod providers;
pub mod ratelimit;
pub mod serve;
pub mod settings;
pub mod simulator;
pub mod state;
pub mod telemetry;
