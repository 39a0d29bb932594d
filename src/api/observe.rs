//! The outermost layer of every route: a request id, the active-requests gauge, the chat
//! metrics and the one log line per request.
//!
//! Nothing here logs headers, bodies or keys: the request line carries only the method,
//! the matched route (a route template, never a client's path), status, latency,
//! provider and cache result.

use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;

use crate::domain::CacheStatus;
use crate::telemetry::metrics::{status_class, Metrics};

static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Left on chat responses by the doors for the request log: which provider, hit or miss.
#[derive(Debug, Clone, Copy)]
pub struct ChatMeta {
    /// The provider that answered (for a hit, the route's first choice).
    pub provider: &'static str,
    /// Hit or miss.
    pub cache: CacheStatus,
}

/// The request id of a request: a client-sent `X-Request-Id` if it is short and plain,
/// else a fresh UUID. Logged with the request and echoed on the response.
fn request_id(request: &Request) -> HeaderValue {
    request
        .headers()
        .get(&REQUEST_ID)
        .filter(|v| {
            let b = v.as_bytes();
            !b.is_empty()
                && b.len() <= 128
                && b.iter()
                    .all(|c| c.is_ascii_alphanumeric() || b"-_.:".contains(c))
        })
        .cloned()
        .unwrap_or_else(|| {
            // Encoded on the stack: one allocation (the header value) per id.
            let mut buf = uuid::Uuid::encode_buffer();
            let id = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut buf);
            HeaderValue::from_str(id).unwrap_or_else(|_| HeaderValue::from_static("-"))
        })
}

/// The routes whose requests count in the chat metrics: every door's chat endpoint.
fn is_chat_route(route: &str) -> bool {
    matches!(
        route,
        "/api/v1/chat" | "/v1/chat" | "/v1/chat/completions" | "/v1/messages"
    )
}

/// Decrements the active-requests gauge however the request ends (even if cancelled).
struct ActiveGuard(prometheus::IntGauge);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Middleware, outermost: request id, active gauge, chat metrics and the request log line.
/// The route is the one the router matched (axum's `MatchedPath`), so the route table
/// exists once, in `app.rs`; a path no route matched is `unmatched`.
pub async fn observe(State(metrics): State<Metrics>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let id = request_id(&request);
    let matched = request.extensions().get::<MatchedPath>().cloned();
    let route = matched.as_ref().map_or("unmatched", MatchedPath::as_str);
    let method = request.method().clone();
    metrics.active_requests.inc();
    let _active = ActiveGuard(metrics.active_requests.clone());

    let mut response = next.run(request).await;

    let latency = started.elapsed();
    let status = response.status().as_u16();
    let meta = response.extensions().get::<ChatMeta>().copied();
    let provider = meta.map(|m| m.provider).unwrap_or("none");
    let cache = meta.map(|m| m.cache.as_str()).unwrap_or("-");
    if is_chat_route(route) {
        metrics.chat_requests.get(status_class(status)).inc();
        metrics
            .request_latency
            .get(provider)
            .observe(latency.as_secs_f64());
    }
    tracing::info!(
        request_id = id.to_str().unwrap_or("-"),
        method = method.as_str(),
        route,
        status,
        latency_ms = latency.as_secs_f64() * 1000.0,
        provider,
        cache,
        "request"
    );
    response.headers_mut().insert(REQUEST_ID.clone(), id);
    response
}
