//! What the core notes about the chat request it is serving, for the layer that observes
//! it (`api::observe`): the time spent waiting for upstreams (`gateway_overhead_seconds`
//! is the rest of the latency) and, when traces are on, the request's span and the
//! spans under it.
//!
//! A task-local set around the request by `api::observe`, so the limiter, the cache and
//! the provider calls reach it without every door passing it down. Outside a request
//! (background tasks, tests calling the core directly) every function here does nothing.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::HeaderValue;
use opentelemetry::trace::{SpanKind, Status, TraceContextExt, TraceId};
use opentelemetry::{Context, KeyValue, Value};

use super::traces::Traces;
use crate::domain::Usage;

tokio::task_local! {
    static SCOPE: Arc<RequestScope>;
}

/// One chat request's notes.
pub struct RequestScope {
    /// Nanoseconds waited for upstreams so far.
    upstream_nanos: AtomicU64,
    trace: Option<RequestTrace>,
}

/// A traced request: its span, and the provider attempt under way (whose span is the
/// parent the upstream is told of).
struct RequestTrace {
    traces: Traces,
    request: Context,
    attempt: Mutex<Option<Context>>,
}

impl RequestScope {
    /// A request's scope; `trace` is its span when traces are on.
    pub fn new(trace: Option<(Traces, Context)>) -> Arc<RequestScope> {
        Arc::new(RequestScope {
            upstream_nanos: AtomicU64::new(0),
            trace: trace.map(|(traces, request)| RequestTrace {
                traces,
                request,
                attempt: Mutex::new(None),
            }),
        })
    }

    /// Runs `request` (the rest of the layers and the handler) in this scope.
    pub async fn run<F: Future>(self: &Arc<Self>, request: F) -> F::Output {
        SCOPE.scope(self.clone(), request).await
    }

    /// Whether the request's span records (traced and sampled).
    fn recording(&self) -> bool {
        self.trace
            .as_ref()
            .is_some_and(|trace| trace.request.span().is_recording())
    }

    /// The time waited for upstreams.
    pub fn upstream_wait(&self) -> Duration {
        Duration::from_nanos(self.upstream_nanos.load(Ordering::Relaxed))
    }

    /// The request's trace id, when it is traced.
    pub fn trace_id(&self) -> Option<TraceId> {
        let trace = self.trace.as_ref()?;
        let id = trace.request.span().span_context().trace_id();
        (id != TraceId::INVALID).then_some(id)
    }

    /// Sets `attributes` on the request's span.
    pub fn set_on_request(&self, attributes: impl FnOnce() -> Vec<KeyValue>) {
        if let Some(trace) = &self.trace {
            let span = trace.request.span();
            if span.is_recording() {
                span.set_attributes(attributes());
            }
        }
    }

    /// Marks the request's span as failed (a 5xx answer).
    pub fn fail_request(&self, why: &'static str) {
        if let Some(trace) = &self.trace {
            trace.request.span().set_status(Status::error(why));
        }
    }

    /// Records a finished answer's usage on the request's span (a stream's, at its end).
    pub fn record_usage(&self, usage: &Usage) {
        self.set_on_request(|| usage_attributes(usage));
    }
}

fn usage_attributes(usage: &Usage) -> Vec<KeyValue> {
    vec![
        KeyValue::new("gen_ai.usage.input_tokens", usage.prompt_tokens as i64),
        KeyValue::new("gen_ai.usage.output_tokens", usage.completion_tokens as i64),
    ]
}

/// The scope of the request this task serves, when its span records: a stream keeps it
/// to record its usage at its end, after the handler has returned.
pub fn current_traced() -> Option<Arc<RequestScope>> {
    SCOPE
        .try_with(|scope| scope.recording().then(|| scope.clone()))
        .ok()
        .flatten()
}

/// The trace id of the request this task serves, for log lines.
pub fn current_trace_id() -> Option<TraceId> {
    SCOPE.try_with(|scope| scope.trace_id()).ok().flatten()
}

/// Counts the time from its start until it is dropped as waited for upstreams by the
/// current request: however the wait ends (an answer, a failure, a cancelled request).
pub struct WaitingForUpstream(std::time::Instant);

impl WaitingForUpstream {
    /// Starts counting.
    pub fn start() -> WaitingForUpstream {
        WaitingForUpstream(std::time::Instant::now())
    }
}

impl Drop for WaitingForUpstream {
    fn drop(&mut self) {
        add_upstream_wait(self.0.elapsed());
    }
}

/// Adds `waited` to the time the current request waited for upstreams.
pub fn add_upstream_wait(waited: Duration) {
    let _ = SCOPE.try_with(|scope| {
        scope
            .upstream_nanos
            .fetch_add(waited.as_nanos() as u64, Ordering::Relaxed)
    });
}

/// Sets attributes on the current request's span.
pub fn set_on_request(attributes: impl FnOnce() -> Vec<KeyValue>) {
    let _ = SCOPE.try_with(|scope| scope.set_on_request(attributes));
}

/// A span under the current request's span, ended when dropped; a no-op when the request
/// is not traced.
pub struct Span {
    context: Option<Context>,
    /// Whether this is the provider attempt upstreams are told of.
    attempt: bool,
}

impl Span {
    fn none() -> Span {
        Span {
            context: None,
            attempt: false,
        }
    }

    /// Sets an attribute (computed only when the span records).
    pub fn set(&self, key: &'static str, value: impl FnOnce() -> Value) {
        if let Some(context) = &self.context {
            let span = context.span();
            if span.is_recording() {
                span.set_attribute(KeyValue::new(key, value()));
            }
        }
    }

    /// Marks the span as failed, with the error's kind as `error.type`.
    pub fn fail(&self, kind: impl FnOnce() -> String) {
        if let Some(context) = &self.context {
            let span = context.span();
            if span.is_recording() {
                let kind = kind();
                span.set_attribute(KeyValue::new("error.type", kind.clone()));
                span.set_status(Status::error(kind));
            }
        }
    }
}

impl Drop for Span {
    fn drop(&mut self) {
        if let Some(context) = self.context.take() {
            if self.attempt {
                let _ = SCOPE.try_with(|scope| {
                    if let Some(trace) = &scope.trace {
                        *trace.attempt.lock().unwrap_or_else(|p| p.into_inner()) = None;
                    }
                });
            }
            context.span().end();
        }
    }
}

fn start(
    name: impl Into<std::borrow::Cow<'static, str>>,
    kind: SpanKind,
    attributes: impl FnOnce() -> Vec<KeyValue>,
    attempt: bool,
) -> Span {
    SCOPE
        .try_with(|scope| {
            // Every standard sampler decides a trace's children as its root (the parent's
            // flag, or the same trace id's ratio): an unsampled request has no spans
            // below it to make.
            let Some(trace) = scope.trace.as_ref().filter(|_| scope.recording()) else {
                return Span::none();
            };
            let context = trace
                .traces
                .start_child(&trace.request, name, kind, attributes());
            if attempt {
                *trace.attempt.lock().unwrap_or_else(|p| p.into_inner()) = Some(context.clone());
            }
            Span {
                context: Some(context),
                attempt,
            }
        })
        .unwrap_or_else(|_| Span::none())
}

/// A span of the gateway's own work under the current request (`rate_limit`, `cache`).
pub fn span(name: &'static str, attributes: impl FnOnce() -> Vec<KeyValue>) -> Span {
    start(name, SpanKind::Internal, attributes, false)
}

/// The span of one provider attempt (`chat <model>`, GenAI conventions): the upstream is
/// told of it as its parent (see [`upstream_traceparent`]).
pub fn provider_attempt(provider: &'static str, kind: &'static str, model: &str) -> Span {
    let traced = SCOPE
        .try_with(|scope| scope.trace.is_some())
        .unwrap_or(false);
    if !traced {
        return Span::none();
    }
    start(
        format!("chat {model}"),
        SpanKind::Client,
        || {
            vec![
                KeyValue::new("gen_ai.operation.name", "chat"),
                KeyValue::new("gen_ai.provider.name", kind),
                KeyValue::new("gen_ai.request.model", model.to_owned()),
                KeyValue::new("gateway.provider", provider),
            ]
        },
        true,
    )
}

/// Records who answered (`gen_ai.provider.name`, `gen_ai.response.model`) and, when
/// known, the usage, on the attempt under way and on the request. A stream's usage comes
/// at its end ([`RequestScope::record_usage`]).
pub fn record_answer(kind: &'static str, model: &str, usage: Option<&Usage>) {
    let _ = SCOPE.try_with(|scope| {
        let Some(trace) = &scope.trace else { return };
        if !trace.request.span().is_recording() {
            return;
        }
        let mut attributes = vec![
            KeyValue::new("gen_ai.provider.name", kind),
            KeyValue::new("gen_ai.response.model", model.to_owned()),
        ];
        if let Some(usage) = usage {
            attributes.extend(usage_attributes(usage));
        }
        let attempt = trace
            .attempt
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(attempt) = attempt {
            attempt.span().set_attributes(attributes.clone());
        }
        trace.request.span().set_attributes(attributes);
    });
}

/// The `traceparent` to send upstream: the attempt under way as the parent (or the
/// request, outside an attempt). `None` when the request is not traced.
pub fn upstream_traceparent() -> Option<HeaderValue> {
    SCOPE
        .try_with(|scope| {
            let trace = scope.trace.as_ref()?;
            let attempt = trace
                .attempt
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            Traces::traceparent(attempt.as_ref().unwrap_or(&trace.request))
        })
        .ok()
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waits_add_up_inside_a_request_and_nothing_happens_outside_one() {
        add_upstream_wait(Duration::from_millis(5));
        assert!(current_trace_id().is_none());
        assert!(upstream_traceparent().is_none());
        let scope = RequestScope::new(None);
        scope
            .run(async {
                add_upstream_wait(Duration::from_millis(3));
                add_upstream_wait(Duration::from_millis(4));
                // Untraced: no span, no header, no id, and nothing is kept for a stream.
                let span = provider_attempt("ollama", "ollama", "m");
                span.set("k", || Value::from(1));
                assert!(upstream_traceparent().is_none());
                assert!(current_traced().is_none());
                assert!(current_trace_id().is_none());
            })
            .await;
        assert_eq!(scope.upstream_wait(), Duration::from_millis(7));
        assert_eq!(scope.trace_id(), None);
    }
}
