//! The front doors: each translates one client dialect to the core's language
//! (`domain`) and back, and maps the core's errors to its own status and body once.
//! Beside them, what every door shares: authentication, the limit headers, the request
//! log layer, and the operational endpoints.

pub mod anthropic;
pub mod auth;
pub mod door;
pub mod health;
pub mod limit_headers;
pub mod metrics;
pub mod observe;
pub mod openai;
pub mod openapi;
pub mod original;
pub mod playground;
pub mod sse;
