//! A streamed answer in flight: the provider's events as they come, under a silence
//! timeout, with the text kept so that the finished answer can be cached and its tokens
//! counted. A stream dropped before its end (the client went away) drops the upstream
//! call with it and still counts the tokens produced so far.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::Stream;
use tokio::time::{Instant, Sleep};

use super::registry::InFlight;
use super::routing::Route;
use super::service::Encode;
use crate::cache::Cache;
use crate::domain::{
    ChatError, ChatRequest, Completion, FinishReason, Reply, StreamEvent, ToolCall, Usage,
};
use crate::providers::{count_tokens, EventStream};
use crate::ratelimit::reservation::Reservation;
use crate::telemetry::metrics::Metrics;
use crate::telemetry::scope::{self, RequestScope};

/// Seconds since the Unix epoch, for `created` fields.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Where a finished stream's answer goes: the door's rendering of it, under its key.
pub struct StoreWhenDone {
    /// The cache.
    pub cache: Arc<dyn Cache>,
    /// The request's key.
    pub key: String,
    /// How long the entry lives.
    pub ttl: Duration,
    /// The door's rendering of a whole answer.
    pub encode: Encode,
}

/// The provider's events for one request, as they come.
pub struct LiveStream {
    id: uuid::Uuid,
    created: u64,
    kind: &'static str,
    model: String,
    first: Option<StreamEvent>,
    rest: EventStream,
    /// Longest silence between two events before the call counts as failed.
    idle: Duration,
    silence: Pin<Box<Sleep>>,
    /// The text so far: for the cache, and the token estimate of a stream cut short.
    text: String,
    /// The tools called so far, for the cache.
    tool_calls: Vec<ToolCall>,
    prompt_bytes: usize,
    store: Option<StoreWhenDone>,
    /// Counts the stream in its provider's requests in flight until it is dropped.
    _in_flight: InFlight,
    /// The request's LLM-token reservation, settled when the tokens are counted.
    reservation: Option<Reservation>,
    metrics: Metrics,
    ended: bool,
    counted: bool,
    /// The request's scope when it is traced: the span ends with the stream, which
    /// records its usage on it.
    scope: Option<Arc<RequestScope>>,
}

impl LiveStream {
    /// The stream of `rest` after `first`, for a request routed by `routed`.
    pub fn new(
        routed: &Route,
        request: &ChatRequest,
        (first, rest): (StreamEvent, EventStream),
        idle: Duration,
        store: Option<StoreWhenDone>,
        (in_flight, reservation): (InFlight, Option<Reservation>),
        metrics: Metrics,
    ) -> LiveStream {
        LiveStream {
            id: uuid::Uuid::new_v4(),
            created: unix_now(),
            kind: routed.provider,
            model: routed.model.clone(),
            first: Some(first),
            rest,
            idle,
            silence: Box::pin(tokio::time::sleep(idle)),
            text: String::new(),
            tool_calls: Vec::new(),
            prompt_bytes: request.prompt_bytes(),
            store,
            _in_flight: in_flight,
            reservation,
            metrics,
            ended: false,
            counted: false,
            scope: scope::current_traced(),
        }
    }

    /// The answer's id; doors write it in their own way.
    pub fn id(&self) -> uuid::Uuid {
        self.id
    }

    /// Unix seconds when the answer was begun.
    pub fn created(&self) -> u64 {
        self.created
    }

    /// The provider answering.
    pub fn provider(&self) -> &'static str {
        self.kind
    }

    /// The model the provider was asked for.
    pub fn model(&self) -> &str {
        &self.model
    }

    /// Notes what an event means for the whole answer; at the end, counts its tokens and
    /// stores it. A stream that called tools ends as a stop to call them, whatever the
    /// upstream's plain stop said.
    fn observe(&mut self, event: &mut StreamEvent) {
        match event {
            StreamEvent::Delta(text) => self.text.push_str(text),
            StreamEvent::ToolCall(call) => self.tool_calls.push(call.clone()),
            StreamEvent::Finish { reason, usage } => {
                *reason = reason.with_calls(!self.tool_calls.is_empty());
                self.ended = true;
                self.count(usage);
                self.store(*reason, *usage);
            }
        }
    }

    /// Counts the answer's tokens, once: in the metrics, and against the client's
    /// token limits (settling the reservation).
    fn count(&mut self, usage: &Usage) {
        if !self.counted {
            self.counted = true;
            count_tokens(&self.metrics, self.kind, usage);
            if let Some(scope) = &self.scope {
                scope.record_usage(usage);
            }
            if let Some(reservation) = self.reservation.take() {
                reservation.settle(usage.prompt_tokens + usage.completion_tokens);
            }
        }
    }

    fn store(&mut self, reason: FinishReason, usage: Usage) {
        let Some(store) = self.store.take() else {
            return;
        };
        let reply = Reply {
            id: self.id,
            created: self.created,
            provider: self.kind,
            model: self.model.clone(),
            completion: Completion {
                content: std::mem::take(&mut self.text),
                tool_calls: std::mem::take(&mut self.tool_calls),
                usage,
                finish_reason: reason,
            },
        };
        let Ok(body) = (store.encode)(&reply) else {
            return;
        };
        let metrics = self.metrics.clone();
        // After the answer has gone, like the stores of whole answers.
        tokio::spawn(async move {
            if let Err(error) = store.cache.set(&store.key, body, store.ttl).await {
                metrics.cache_errors.inc();
                tracing::warn!(%error, "cache write failed");
            }
        });
    }

    fn fail(&mut self, message: String, timed_out: bool) -> ChatError {
        self.ended = true;
        tracing::warn!(provider = self.kind, %message, "stream failed after its first event");
        if timed_out {
            ChatError::UpstreamTimedOut(message)
        } else {
            ChatError::UpstreamFailed(message)
        }
    }
}

impl Stream for LiveStream {
    type Item = Result<StreamEvent, ChatError>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.ended {
            return Poll::Ready(None);
        }
        if let Some(mut first) = this.first.take() {
            this.observe(&mut first);
            let deadline = Instant::now() + this.idle;
            this.silence.as_mut().reset(deadline);
            return Poll::Ready(Some(Ok(first)));
        }
        match this.rest.as_mut().poll_next(cx) {
            Poll::Ready(Some(Ok(mut event))) => {
                this.observe(&mut event);
                let deadline = Instant::now() + this.idle;
                this.silence.as_mut().reset(deadline);
                Poll::Ready(Some(Ok(event)))
            }
            Poll::Ready(Some(Err(error))) => {
                let name = this.kind;
                let message = format!("Provider '{name}' failed mid-stream: {error}");
                Poll::Ready(Some(Err(this.fail(message, false))))
            }
            Poll::Ready(None) => {
                let name = this.kind;
                let message = format!("Provider '{name}' ended the stream before its end");
                Poll::Ready(Some(Err(this.fail(message, false))))
            }
            Poll::Pending => match this.silence.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    let message = format!(
                        "Provider '{}' sent nothing for {}s mid-stream",
                        this.kind,
                        this.idle.as_secs_f64()
                    );
                    Poll::Ready(Some(Err(this.fail(message, true))))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

use std::future::Future as _;

impl Drop for LiveStream {
    /// A stream cut short (the client went away, or the upstream broke off) still
    /// counts its tokens: the upstream's own count never came, so they are estimated
    /// as a quarter of the bytes, prompt and text so far.
    fn drop(&mut self) {
        if !self.counted {
            let estimate = |bytes: usize| bytes.div_ceil(4) as u64;
            let called: usize = self
                .tool_calls
                .iter()
                .map(|c| c.name.len() + c.arguments.len())
                .sum();
            let (prompt, completion) = (
                estimate(self.prompt_bytes),
                estimate(self.text.len() + called),
            );
            self.count(&Usage {
                prompt_tokens: prompt,
                completion_tokens: completion,
                total_tokens: prompt + completion,
            });
        }
    }
}
