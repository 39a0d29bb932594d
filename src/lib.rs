//! llm-gateway: a self-hosted LLM API gateway (auth, distributed rate limiting, response
//! cache, provider routing, metrics). See README.md and CONTRACT.md.

pub mod api;
pub mod app;
pub mod auth;
pub mod body_timeout;
pub mod cache;
pub mod chat;
pub mod conn_io;
pub mod error;
pub mod log_format;
pub mod log_writer;
pub mod metrics;
pub mod providers;
pub mod ratelimit;
pub mod redis_conn;
pub mod server;
pub mod settings;
pub mod telemetry;
pub mod workers;
