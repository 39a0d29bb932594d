//! The chat use case: cache lookup, routing, the provider call, and the cache store.

pub mod registry;
pub mod routing;
pub mod service;
pub mod stream;
