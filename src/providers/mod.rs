//! Upstream LLM providers: the `Provider` trait, their errors, and the retry policy that
//! wraps every call (per-attempt timeout, exponential backoff with full jitter,
//! transient errors only).

pub mod anthropic;
pub mod framing;
pub mod gemini;
pub mod http;
pub mod ollama;
pub mod openai;

pub use http::UpstreamClient;

use std::collections::VecDeque;
use std::pin::Pin;
use std::time::{Duration, Instant};

use crate::telemetry::scope;

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
    /// The upstream answered 429 or 503 and said when to come back (`Retry-After`).
    #[error("upstream answered HTTP {0}, retry after {1:?}")]
    Throttled(u16, Duration),
    /// The upstream's body was not what its API documents.
    #[error("invalid upstream response: {0}")]
    Invalid(String),
    /// The provider lacks configuration (e.g. no API key).
    #[error("not configured: {0}")]
    NotConfigured(&'static str),
}

impl ProviderError {
    /// The failure's kind, for a span's `error.type`: no detail that could carry content.
    pub fn kind(&self) -> &'static str {
        match self {
            ProviderError::Timeout => "timeout",
            ProviderError::Connect => "connection",
            ProviderError::Status(429) | ProviderError::Throttled(429, _) => "http_429",
            ProviderError::Status(status) | ProviderError::Throttled(status, _)
                if *status >= 500 =>
            {
                "http_5xx"
            }
            ProviderError::Status(_) | ProviderError::Throttled(..) => "http_4xx",
            ProviderError::Invalid(_) => "invalid_response",
            ProviderError::NotConfigured(_) => "not_configured",
        }
    }

    /// Connection errors, timeouts, 5xx and 429 may succeed on another try.
    pub fn is_transient(&self) -> bool {
        match self {
            ProviderError::Timeout | ProviderError::Connect => true,
            ProviderError::Status(status) => *status == 429 || *status >= 500,
            ProviderError::Throttled(..) => true,
            ProviderError::Invalid(_) | ProviderError::NotConfigured(_) => false,
        }
    }
}

/// What every provider instance has beside its API: its name (the metrics label, the
/// `provider` of answers) and the headers it sends on every call (its key among them).
#[derive(Clone)]
pub struct Endpoint {
    /// The provider's name.
    pub name: &'static str,
    /// Headers on every call.
    pub headers: Vec<(hyper::header::HeaderName, hyper::header::HeaderValue)>,
}

impl Endpoint {
    /// An endpoint named `name` sending `headers` and, when `key` has a value, the key
    /// header (marked sensitive, so it never shows in debug output).
    pub fn new(
        name: &str,
        headers: &[(String, String)],
        key: Option<(hyper::header::HeaderName, String)>,
    ) -> Result<Endpoint, String> {
        let mut built = Vec::with_capacity(headers.len() + 1);
        for (header, value) in headers {
            let header = hyper::header::HeaderName::from_bytes(header.as_bytes())
                .map_err(|_| format!("provider '{name}': header '{header}' is not valid"))?;
            let value = hyper::header::HeaderValue::from_str(value)
                .map_err(|_| format!("provider '{name}': a header value is not valid"))?;
            built.push((header, value));
        }
        if let Some((header, key)) = key.filter(|(_, key)| !key.is_empty()) {
            let mut value = hyper::header::HeaderValue::from_str(&key)
                .map_err(|_| format!("provider '{name}': its key is not a valid header value"))?;
            value.set_sensitive(true);
            built.push((header, value));
        }
        Ok(Endpoint {
            name: intern(name),
            headers: built,
        })
    }
}

/// The provider a registry entry describes, on `client`.
pub fn from_config(
    config: &crate::settings::registry::ProviderConfig,
    client: UpstreamClient,
) -> Result<std::sync::Arc<dyn Provider>, String> {
    use crate::settings::registry::ProviderKindConfig;
    use secrecy::ExposeSecret;
    let endpoint = Endpoint::new(&config.name, &config.headers, None)?;
    let key = config.api_key.expose_secret();
    Ok(match config.kind {
        ProviderKindConfig::Ollama => {
            std::sync::Arc::new(ollama::Ollama::new(client, &config.base_url, endpoint)?)
        }
        ProviderKindConfig::Gemini => std::sync::Arc::new(gemini::Gemini::new(
            client,
            &config.base_url,
            &config.api_key,
            endpoint,
        )?),
        ProviderKindConfig::Openai => std::sync::Arc::new(openai::OpenAi::new(
            client,
            &config.base_url,
            key,
            &endpoint,
        )?),
        ProviderKindConfig::Anthropic => std::sync::Arc::new(anthropic::Anthropic::new(
            client,
            &config.base_url,
            key,
            &endpoint,
        )?),
    })
}

/// `name` as a `&'static str`, each distinct name leaked once: provider names are a
/// closed set from the configuration (a reload adds at most its few new names), and
/// answers, metrics and logs carry them without reference counts.
pub fn intern(name: &str) -> &'static str {
    static NAMES: std::sync::Mutex<Vec<&'static str>> = std::sync::Mutex::new(Vec::new());
    let mut names = NAMES.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(known) = names.iter().find(|known| **known == name) {
        return known;
    }
    let leaked: &'static str = Box::leak(name.to_owned().into_boxed_str());
    names.push(leaked);
    leaked
}

/// The longest `Retry-After` the gateway honours: an upstream asking for more is still
/// retried (or its target's breaker probed) after this long.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

impl ProviderError {
    /// A non-2xx answer: a 429 or 503 with `Retry-After: <seconds>` says when to come
    /// back (capped at [`MAX_RETRY_AFTER`]).
    pub fn refused(status: u16, headers: &hyper::HeaderMap) -> ProviderError {
        let wait = headers
            .get(hyper::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<f64>().ok())
            .filter(|s| s.is_finite() && *s >= 0.0)
            .map(|s| Duration::from_secs_f64(s).min(MAX_RETRY_AFTER));
        match wait {
            Some(wait) if status == 429 || status == 503 => ProviderError::Throttled(status, wait),
            _ => ProviderError::Status(status),
        }
    }

    /// How long the upstream asked to be left alone, if it did.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            ProviderError::Throttled(_, wait) => Some(*wait),
            _ => None,
        }
    }
}

/// A streamed answer: text as the upstream produces it, ending with `Finish`.
pub type EventStream = Pin<Box<dyn Stream<Item = Result<StreamEvent, ProviderError>> + Send>>;

/// One upstream API.
#[async_trait]
pub trait Provider: Send + Sync {
    /// Its name: the metrics label, the logs, the `provider` of answers.
    fn name(&self) -> &'static str;
    /// The API it speaks, as the OpenTelemetry GenAI conventions name providers
    /// (`gen_ai.provider.name`): `openai`, `anthropic`, `gcp.gemini`, `ollama`.
    fn kind(&self) -> &'static str;
    /// What in `request` this upstream cannot honour, if anything: checked before any
    /// attempt, so it is the client's error and never a provider failure.
    fn refusal(&self, request: &ChatRequest) -> Option<Unsupported> {
        passthrough_refusal(request)
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

/// The refusal of an upstream that takes no field it does not know: the first field
/// passed through, if any.
pub fn passthrough_refusal(request: &ChatRequest) -> Option<Unsupported> {
    request
        .passthrough
        .keys()
        .next()
        .map(|name| Unsupported::PassedThrough(name.clone()))
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

/// How a provider's attempts ended without an answer: the last attempt's error, and how
/// many attempts were made.
#[derive(Debug)]
pub struct Failed {
    /// The provider.
    pub provider: &'static str,
    /// The last attempt's error.
    pub error: ProviderError,
    /// Attempts made.
    pub attempts: u32,
    /// The attempt timeout the provider was given.
    pub attempt_timeout: Duration,
}

impl Failed {
    /// Whether another target may succeed where this one failed: connection errors,
    /// timeouts, 429 and 5xx (never a 400 or an answer that cannot be used).
    pub fn fails_over(&self) -> bool {
        self.error.is_transient()
    }

    /// The failure as the doors report it: `UpstreamTimedOut` when the last attempt
    /// timed out, `UpstreamRateLimited` for a 429 (with its `Retry-After`), else
    /// `UpstreamFailed`, naming the provider and the attempts.
    pub fn into_chat_error(self) -> ChatError {
        let (name, attempts) = (self.provider, self.attempts);
        match self.error {
            ProviderError::Timeout => ChatError::UpstreamTimedOut(format!(
                "Provider '{name}' timed out after {attempts} attempt(s) of {}s",
                self.attempt_timeout.as_secs_f64()
            )),
            ProviderError::Throttled(429, wait) => ChatError::UpstreamRateLimited {
                message: format!(
                    "Provider '{name}' is rate limited (HTTP 429) after {attempts} attempt(s)"
                ),
                retry_after: Some(wait),
            },
            ProviderError::Status(429) => ChatError::UpstreamRateLimited {
                message: format!(
                    "Provider '{name}' is rate limited (HTTP 429) after {attempts} attempt(s)"
                ),
                retry_after: None,
            },
            other => ChatError::UpstreamFailed(format!(
                "Provider '{name}' failed after {attempts} attempt(s): {other}"
            )),
        }
    }
}

/// Calls `provider` with retries until `deadline`, recording the provider metrics.
pub async fn complete_with_retries(
    provider: &dyn Provider,
    request: &ChatRequest,
    model: &str,
    policy: &RetryPolicy,
    deadline: Instant,
    metrics: &Metrics,
) -> Result<Completion, Failed> {
    with_retries(provider, model, policy, deadline, metrics, || async {
        let result = provider.complete(request, model).await;
        if let Ok(completion) = &result {
            count_tokens(metrics, provider.name(), &completion.usage);
            scope::record_answer(provider.kind(), model, Some(&completion.usage));
        }
        result
    })
    .await
}

/// Starts a streamed call with retries until `deadline`: each attempt must produce its
/// first event within the attempt timeout, and only then is the stream handed over, so
/// retries happen before the client has seen a byte and never after. Returns the first
/// event and the rest.
pub async fn stream_with_retries(
    provider: &dyn Provider,
    request: &ChatRequest,
    model: &str,
    policy: &RetryPolicy,
    deadline: Instant,
    metrics: &Metrics,
) -> Result<(StreamEvent, EventStream), Failed> {
    let started = Instant::now();
    let first = with_retries(provider, model, policy, deadline, metrics, || async {
        let mut events = provider.stream(request, model).await?;
        match events.next().await {
            Some(Ok(event)) => {
                // The usage comes at the stream's end (`chat::stream`).
                scope::record_answer(provider.kind(), model, None);
                Ok((event, events))
            }
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

/// Runs `attempt` until it succeeds, fails for good, the retries are spent or the
/// deadline comes; each attempt bounded by the attempt timeout (and the deadline),
/// counted in the provider metrics and, when the request is traced, a span of its own.
/// A `Retry-After` longer than the time left ends the retries: waiting it out would pass
/// the deadline.
async fn with_retries<T, F>(
    provider: &dyn Provider,
    model: &str,
    policy: &RetryPolicy,
    deadline: Instant,
    metrics: &Metrics,
    attempt: impl Fn() -> F,
) -> Result<T, Failed>
where
    F: std::future::Future<Output = Result<T, ProviderError>>,
{
    let name = provider.name();
    let mut tries = 0;
    loop {
        let started = Instant::now();
        let span = scope::provider_attempt(name, provider.kind(), model);
        span.set("gateway.attempt", || (tries as i64 + 1).into());
        metrics.provider_calls.get(name).inc();
        // One timer bounds the whole attempt (connect, send, response body). A second
        // per-request timer inside reqwest only added timer-wheel work to every call.
        let bound = policy
            .attempt_timeout
            .min(deadline.saturating_duration_since(started));
        let result = tokio::time::timeout(bound, attempt())
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
        span.fail(|| error.kind().to_owned());
        drop(span);
        metrics.provider_failures.get(name).inc();
        let attempts = tries + 1;
        let delay = error.retry_after().unwrap_or_else(|| policy.backoff(tries));
        let out_of_time = Instant::now() + delay >= deadline;
        if !error.is_transient() || tries >= policy.max_retries || out_of_time {
            tracing::warn!(provider = name, attempts, %error, "provider call failed");
            return Err(Failed {
                provider: name,
                error,
                attempts,
                attempt_timeout: policy.attempt_timeout,
            });
        }
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
