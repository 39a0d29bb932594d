//! Upstream LLM providers: the `Provider` trait, their errors, and the retry policy that
//! wraps every call (per-attempt timeout, exponential backoff with full jitter,
//! transient errors only).

pub mod framing;
pub mod gemini;
pub mod http;
pub mod ollama;

pub use http::UpstreamClient;

use std::collections::VecDeque;
use std::pin::Pin;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures_util::{Stream, StreamExt};

use crate::domain::{ChatError, ChatRequest, Completion, StreamEvent, Unsupported};
use crate::telemetry::metrics::Metrics;
use http::ByteStream;

/// Why one provider attempt failed. Messages never hold keys or upstream bodies.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// The attempt did not finish within the provider timeout.
    #[error("timed out")]
    Timeout,
    /// No connection could be made or it broke mid-request.
    #[error("connection failed")]
    Connect,
    /// The upstream answered with a non-success status.
    #[error("upstream answered HTTP {0}")]
    Status(u16),
    /// The upstream's body was not what its API documents.
    #[error("invalid upstream response: {0}")]
    Invalid(String),
    /// The provider lacks configuration (e.g. no API key).
    #[error("not configured: {0}")]
    NotConfigured(&'static str),
}

impl ProviderError {
    /// Connection errors, timeouts, 5xx and 429 may succeed on another try.
    pub fn is_transient(&self) -> bool {
        match self {
            ProviderError::Timeout | ProviderError::Connect => true,
            ProviderError::Status(status) => *status == 429 || *status >= 500,
            ProviderError::Invalid(_) | ProviderError::NotConfigured(_) => false,
        }
    }
}

/// A streamed answer: text as the upstream produces it, ending with `Finish`.
pub type EventStream = Pin<Box<dyn Stream<Item = Result<StreamEvent, ProviderError>> + Send>>;

/// One upstream API.
#[async_trait]
pub trait Provider: Send + Sync {
    /// `gemini` or `ollama`.
    fn name(&self) -> &'static str;
    /// What in `request` this upstream cannot honour, if anything: checked before any
    /// attempt, so it is the client's error and never a provider failure.
    fn refusal(&self, request: &ChatRequest) -> Option<Unsupported> {
        let _ = request;
        None
    }
    /// One attempt at completing `request` with `model`. The caller bounds its time.
    async fn complete(
        &self,
        request: &ChatRequest,
        model: &str,
    ) -> Result<Completion, ProviderError>;
    /// One attempt at streaming the answer to `request` with `model`: returns once the
    /// upstream has accepted the call (a 2xx head). The caller bounds its time and the
    /// silence between events; dropping the stream closes the upstream connection.
    async fn stream(
        &self,
        request: &ChatRequest,
        model: &str,
    ) -> Result<EventStream, ProviderError>;
}

/// What a decoder makes of one chunk of a streamed body (or of its end, `None`).
pub type Decoded = Result<Vec<StreamEvent>, ProviderError>;

/// Turns a streamed body into events with `decode`, which gets each chunk, then `None`
/// at the end of the body, and returns the events they completed. The stream ends after
/// the first `Finish` or error; a body that ends without `Finish` is an error (the
/// upstream broke off).
pub fn events_from(
    bytes: ByteStream,
    decode: impl FnMut(Option<&[u8]>) -> Decoded + Send + 'static,
) -> EventStream {
    struct State<D> {
        bytes: ByteStream,
        decode: D,
        ready: VecDeque<StreamEvent>,
        done: bool,
    }
    let state = State {
        bytes,
        decode,
        ready: VecDeque::new(),
        done: false,
    };
    Box::pin(futures_util::stream::unfold(
        state,
        |mut state| async move {
            loop {
                if let Some(event) = state.ready.pop_front() {
                    if matches!(event, StreamEvent::Finish { .. }) {
                        state.ready.clear();
                        state.done = true;
                    }
                    return Some((Ok(event), state));
                }
                if state.done {
                    return None;
                }
                let decoded = match state.bytes.next().await {
                    Some(Ok(chunk)) => (state.decode)(Some(&chunk)),
                    Some(Err(error)) => Err(error),
                    None => {
                        state.done = true;
                        (state.decode)(None).and_then(|events| {
                            if events
                                .iter()
                                .any(|e| matches!(e, StreamEvent::Finish { .. }))
                            {
                                Ok(events)
                            } else {
                                Err(ProviderError::Invalid(
                                    "the stream ended before its end".into(),
                                ))
                            }
                        })
                    }
                };
                match decoded {
                    Ok(events) => state.ready.extend(events),
                    Err(error) => {
                        state.done = true;
                        return Some((Err(error), state));
                    }
                }
            }
        },
    ))
}

/// How provider calls are retried.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Timeout of one attempt.
    pub attempt_timeout: Duration,
    /// Retries after the first attempt.
    pub max_retries: u32,
    /// First backoff delay.
    pub base_delay: Duration,
    /// Largest backoff delay.
    pub max_delay: Duration,
}

impl RetryPolicy {
    /// Full jitter: a uniform delay in [0, min(max, base * 2^retry)] spreads retries of
    /// many clients instead of synchronising them.
    fn backoff(&self, retry: u32) -> Duration {
        let ceiling = self
            .base_delay
            .saturating_mul(2u32.saturating_pow(retry))
            .min(self.max_delay);
        ceiling.mul_f64(rand::random::<f64>())
    }
}

/// Calls `provider` with retries and records the provider metrics. The final failure is
/// `UpstreamTimedOut` when the last attempt timed out, else `UpstreamFailed`.
pub async fn complete_with_retries(
    provider: &dyn Provider,
    request: &ChatRequest,
    model: &str,
    policy: &RetryPolicy,
    metrics: &Metrics,
) -> Result<Completion, ChatError> {
    refuse(provider, request)?;
    with_retries(provider.name(), policy, metrics, || async {
        let result = provider.complete(request, model).await;
        if let Ok(completion) = &result {
            count_tokens(metrics, provider.name(), &completion.usage);
        }
        result
    })
    .await
}

/// Starts a streamed call with retries: each attempt must produce its first event within
/// the attempt timeout, and only then is the stream handed over, so retries happen before
/// the client has seen a byte and never after. Returns the first event and the rest.
pub async fn stream_with_retries(
    provider: &dyn Provider,
    request: &ChatRequest,
    model: &str,
    policy: &RetryPolicy,
    metrics: &Metrics,
) -> Result<(StreamEvent, EventStream), ChatError> {
    refuse(provider, request)?;
    let started = Instant::now();
    let first = with_retries(provider.name(), policy, metrics, || async {
        let mut events = provider.stream(request, model).await?;
        match events.next().await {
            Some(Ok(event)) => Ok((event, events)),
            Some(Err(error)) => Err(error),
            None => Err(ProviderError::Invalid(
                "the stream ended before its end".into(),
            )),
        }
    })
    .await?;
    metrics
        .time_to_first_token
        .get(provider.name())
        .observe(started.elapsed().as_secs_f64());
    Ok(first)
}

/// `ChatError::Unsupported` when `provider` cannot honour `request`.
fn refuse(provider: &dyn Provider, request: &ChatRequest) -> Result<(), ChatError> {
    match provider.refusal(request) {
        Some(what) => Err(ChatError::Unsupported {
            provider: provider.name(),
            what,
        }),
        None => Ok(()),
    }
}

/// Adds a completion's usage to `tokens_total`.
pub fn count_tokens(metrics: &Metrics, provider: &str, usage: &crate::domain::Usage) {
    metrics
        .prompt_tokens
        .get(provider)
        .inc_by(usage.prompt_tokens);
    metrics
        .completion_tokens
        .get(provider)
        .inc_by(usage.completion_tokens);
}

/// Runs `attempt` until it succeeds, fails for good, or the retries are spent; each
/// attempt bounded by the attempt timeout and counted in the provider metrics.
async fn with_retries<T, F>(
    name: &'static str,
    policy: &RetryPolicy,
    metrics: &Metrics,
    attempt: impl Fn() -> F,
) -> Result<T, ChatError>
where
    F: std::future::Future<Output = Result<T, ProviderError>>,
{
    let mut tries = 0;
    loop {
        let started = Instant::now();
        metrics.provider_calls.get(name).inc();
        // One timer bounds the whole attempt (connect, send, response body). A second
        // per-request timer inside reqwest only added timer-wheel work to every call.
        let result = tokio::time::timeout(policy.attempt_timeout, attempt())
            .await
            .unwrap_or(Err(ProviderError::Timeout));
        metrics
            .provider_latency
            .get(name)
            .observe(started.elapsed().as_secs_f64());
        let error = match result {
            Ok(value) => return Ok(value),
            Err(error) => error,
        };
        metrics.provider_failures.get(name).inc();
        let attempts = tries + 1;
        if !error.is_transient() || tries >= policy.max_retries {
            tracing::warn!(provider = name, attempts, %error, "provider call failed");
            return Err(match error {
                ProviderError::Timeout => ChatError::UpstreamTimedOut(format!(
                    "Provider '{name}' timed out after {attempts} attempt(s) of {}s",
                    policy.attempt_timeout.as_secs_f64()
                )),
                other => ChatError::UpstreamFailed(format!(
                    "Provider '{name}' failed after {attempts} attempt(s): {other}"
                )),
            });
        }
        let delay = policy.backoff(tries);
        tracing::info!(provider = name, attempt = attempts, %error, delay_ms = delay.as_millis() as u64,
            "provider call failed; retrying");
        tokio::time::sleep(delay).await;
        tries += 1;
    }
}

/// Serialises an upstream request body into a buffer of `size_hint` bytes: letting the
/// buffer grow by doubling copied a 64 KB message several times and could leave twice
/// its size allocated for the whole call.
pub fn json_body<T: serde::Serialize>(
    value: &T,
    size_hint: usize,
) -> Result<Vec<u8>, ProviderError> {
    let mut body = Vec::with_capacity(size_hint);
    serde_json::to_writer(&mut body, value)
        .map_err(|_| ProviderError::Invalid("request could not be encoded".into()))?;
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_transient_errors_are_retried() {
        assert!(ProviderError::Timeout.is_transient());
        assert!(ProviderError::Connect.is_transient());
        assert!(ProviderError::Status(500).is_transient());
        assert!(ProviderError::Status(503).is_transient());
        assert!(ProviderError::Status(429).is_transient());
        assert!(!ProviderError::Status(400).is_transient());
        assert!(!ProviderError::Status(404).is_transient());
        assert!(!ProviderError::Invalid("x".into()).is_transient());
    }

    #[test]
    fn backoff_grows_exponentially_and_is_capped() {
        let policy = RetryPolicy {
            attempt_timeout: Duration::from_secs(1),
            max_retries: 10,
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(350),
        };
        for _ in 0..200 {
            assert!(policy.backoff(0) <= Duration::from_millis(100));
            assert!(policy.backoff(1) <= Duration::from_millis(200));
            assert!(policy.backoff(9) <= Duration::from_millis(350));
        }
        let spread: std::collections::HashSet<_> = (0..50).map(|_| policy.backoff(2)).collect();
        assert!(spread.len() > 1, "delays are jittered");
    }
}
