//! Black-box tests: the real gateway on port 0, a private redis-server, and upstreams
//! over real HTTP (wiremock or mock-llm).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod anthropic;
mod api;
mod backends;
mod browser;
mod cache;
mod cluster;
mod common;
mod hostile;
mod keep_alive;
mod layers;
mod limiter;
mod limiter_faults;
mod limiter_policies;
mod openai;
mod openapi;
mod ops;
mod playground;
mod properties;
mod providers;
mod registry;
mod router;
mod sdk;
mod soak;
mod stores;
mod tokens;
mod tools;
mod traces;
