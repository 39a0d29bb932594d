//! The outermost layer of every route: a request id, the active-requests gauge, the chat
//! metrics, the one log line per request and, for chat requests, their scope (the time
//! they waited for upstreams and, when traces are on, their span; see `telemetry::scope`).
//!
//! Nothing here logs headers, bodies or keys: the request line carries only the method,
//! the matched route (a route template, never a client's path), status, latency,
//! provider and cache result.

use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;

use opentelemetry::KeyValue;

use crate::domain::CacheStatus;
use crate::telemetry::metrics::{status_class, Metrics};
use crate::telemetry::scope::RequestScope;
use crate::telemetry::traces::Traces;

/// What this layer records into: the metrics and the tracer.
#[derive(Clone)]
pub struct Observer {
    /// The metrics.
    pub metrics: Metrics,
    /// The tracer, when traces are exported.
    pub traces: Option<Traces>,
}

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

/// A chat request's span name, `<method> <route>`: a constant for the chat routes' own
/// method (no allocation for a span that may not even be sampled).
fn span_name(method: &axum::http::Method, route: &str) -> std::borrow::Cow<'static, str> {
    if method == axum::http::Method::POST {
        match route {
            "/api/v1/chat" => return "POST /api/v1/chat".into(),
            "/v1/chat" => return "POST /v1/chat".into(),
            "/v1/chat/completions" => return "POST /v1/chat/completions".into(),
            "/v1/messages" => return "POST /v1/messages".into(),
            _ => {}
        }
    }
    format!("{method} {route}").into()
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
pub async fn observe(State(observer): State<Observer>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let metrics = &observer.metrics;
    let id = request_id(&request);
    let matched = request.extensions().get::<MatchedPath>().cloned();
    let route = matched.as_ref().map_or("unmatched", MatchedPath::as_str);
    let method = request.method().clone();
    metrics.active_requests.inc();
    let _active = ActiveGuard(metrics.active_requests.clone());

    let chat = is_chat_route(route);
    let scope = chat.then(|| {
        let trace = observer.traces.as_ref().map(|traces| {
            let span = traces.start_request(request.headers(), span_name(&method, route));
            (traces.clone(), span)
        });
        let scope = RequestScope::new(trace);
        scope.set_on_request(|| {
            vec![
                KeyValue::new("http.request.method", method.to_string()),
                KeyValue::new("http.route", route.to_owned()),
                KeyValue::new("gen_ai.operation.name", "chat"),
            ]
        });
        scope
    });
    let mut response = match &scope {
        Some(scope) => scope.run(next.run(request)).await,
        None => next.run(request).await,
    };

    let latency = started.elapsed();
    let status = response.status().as_u16();
    let meta = response.extensions().get::<ChatMeta>().copied();
    let provider = meta.map(|m| m.provider).unwrap_or("none");
    let cache = meta.map(|m| m.cache.as_str()).unwrap_or("-");
    let mut trace_id = None;
    if let Some(scope) = &scope {
        metrics.chat_requests.get(status_class(status)).inc();
        metrics
            .request_latency
            .get(provider)
            .observe(latency.as_secs_f64());
        // A stream's head comes after its first event: its overhead is the time to that
        // head less the wait for it.
        metrics
            .gateway_overhead
            .observe(latency.saturating_sub(scope.upstream_wait()).as_secs_f64());
        scope.set_on_request(|| {
            let mut attributes = vec![KeyValue::new("http.response.status_code", status as i64)];
            if let Some(meta) = meta {
                attributes.push(KeyValue::new("gateway.provider", meta.provider));
                attributes.push(KeyValue::new("gateway.cache", meta.cache.as_str()));
            }
            attributes
        });
        if status >= 500 {
            scope.fail_request("the gateway answered with a server error");
        }
        trace_id = scope.trace_id().map(|id| id.to_string());
    }
    tracing::info!(
        request_id = id.to_str().unwrap_or("-"),
        method = method.as_str(),
        route,
        status,
        latency_ms = latency.as_secs_f64() * 1000.0,
        provider,
        cache,
        trace_id = trace_id.as_deref(),
        "request"
    );
    response.headers_mut().insert(REQUEST_ID.clone(), id);
    response
}
