//! Logging: the tracing subscriber, request ids, and the one log line per request.
//!
//! Nothing here logs headers, bodies or keys: the request line carries only the method,
//! a route from a closed set, status, latency, provider and cache result.

use std::io::IsTerminal;
use std::time::Instant;

use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;
use tracing_subscriber::EnvFilter;

use crate::api::chat::ChatMeta;
use crate::app::AppState;
use crate::log_format::LineFormat;
use crate::log_writer::{self, FlushGuard};
use crate::metrics::status_class;
use crate::settings::{LogFormat, Settings};

static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Installs the global subscriber, writing to stdout in batches from a dedicated thread
/// (see `log_writer`): a synchronous write per request line cost about 30% of
/// throughput in the benchmark. Keep the returned guard until exit; dropping it writes
/// what is still pending.
pub fn init(settings: &Settings) -> FlushGuard {
    let filter = EnvFilter::try_new(&settings.log_level).unwrap_or_else(|_| EnvFilter::new("info"));
    let (writer, guard) = log_writer::batched(std::io::stdout());
    let colours = settings.log_format == LogFormat::Text && std::io::stdout().is_terminal();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    // Our own line format (see `log_format`), except for colours on a terminal, where
    // tracing-subscriber's coloured text is kept.
    let _ = match (settings.log_format, colours) {
        (LogFormat::Json, _) => builder.event_format(LineFormat::json()).try_init(),
        (LogFormat::Text, false) => builder.event_format(LineFormat::text()).try_init(),
        (LogFormat::Text, true) => builder.with_ansi(true).try_init(),
    };
    guard
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

/// Our routes, as a closed set of labels; anything else is `unmatched` (a client-chosen
/// path must not reach the logs verbatim).
pub fn route_label(path: &str) -> &'static str {
    match path {
        "/api/v1/chat" => "/api/v1/chat",
        "/v1/chat" => "/v1/chat",
        "/api/v1/health" => "/api/v1/health",
        "/health" => "/health",
        "/api/v1/ready" => "/api/v1/ready",
        "/ready" => "/ready",
        "/api/v1/metrics" => "/api/v1/metrics",
        "/metrics" => "/metrics",
        "/openapi.json" => "/openapi.json",
        _ => "unmatched",
    }
}

/// Decrements the active-requests gauge however the request ends (even if cancelled).
struct ActiveGuard(prometheus::IntGauge);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Middleware, outermost: request id, active gauge, chat metrics and the request log line.
pub async fn observe(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let id = request_id(&request);
    let route = route_label(request.uri().path());
    let method = request.method().clone();
    state.metrics.active_requests.inc();
    let _active = ActiveGuard(state.metrics.active_requests.clone());

    let mut response = next.run(request).await;

    let latency = started.elapsed();
    let status = response.status().as_u16();
    let meta = response.extensions().get::<ChatMeta>().copied();
    let provider = meta.map(|m| m.provider.as_str()).unwrap_or("none");
    let cache = meta.map(|m| m.cache.as_str()).unwrap_or("-");
    if route.ends_with("/chat") {
        state.metrics.chat_requests.get(status_class(status)).inc();
        state
            .metrics
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
