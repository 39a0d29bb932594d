//! HTTP handlers and the request/response schemas.

pub mod chat;
pub mod health;
pub mod metrics;
pub mod openapi;
pub mod schemas;
