//! The per-client token-bucket limiter: backends, the failure policy around them, and
//! the decision a front door turns into a 429 or into headers. It never imports the
//! cache: a cache key it reads in its round trip is an opaque string to it.

pub mod breaker;
pub mod deny_cache;
pub mod memory;
pub mod redis;

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use sha2::{Digest, Sha256};

use crate::domain::ChatError;
use crate::settings::FailureMode;
use crate::telemetry::metrics::Metrics;

/// Capacity and refill rate of one client's bucket, with the tier's name for headers.
#[derive(Debug, Clone, PartialEq)]
pub struct BucketPolicy {
    /// Tier name shown in `RateLimit-Policy`; `default` for keys without a tier.
    pub tier: Arc<str>,
    /// Bucket size.
    pub capacity: u64,
    /// Tokens per second.
    pub refill_rate: f64,
}

impl BucketPolicy {
    /// Seconds an empty bucket takes to fill.
    pub fn seconds_to_fill(&self) -> u64 {
        (self.capacity as f64 / self.refill_rate).ceil() as u64
    }
}

/// The outcome of one limiter call, with everything the response headers need.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    /// Whether the request may proceed.
    pub allowed: bool,
    /// Whole tokens left after this request.
    pub remaining: u64,
    /// Milliseconds until the bucket is full again.
    pub reset_ms: u64,
    /// Milliseconds until one token is available (0 when allowed).
    pub retry_after_ms: u64,
}

impl Decision {
    /// Builds a decision from milli-tokens and millisecond durations, the units the Lua
    /// script and the in-process bucket both report.
    pub fn from_millis(allowed: bool, milli_tokens: u64, reset_ms: u64, retry_ms: u64) -> Self {
        Decision {
            allowed,
            remaining: milli_tokens / 1000,
            reset_ms,
            retry_after_ms: if allowed { 0 } else { retry_ms.max(1) },
        }
    }
}

/// What a limiter call learned about the prefetched (cache) key.
#[derive(Debug, Clone, PartialEq)]
pub enum Prefetch {
    /// Nothing was read: no key given, a store that cannot, or decided without Redis.
    NotFetched,
    /// The key holds this value.
    Found(bytes::Bytes),
    /// The key does not exist.
    Missing,
    /// Redis failed (reading the key again would fail too), or the read itself did (a
    /// value of another type under the key).
    Failed,
}

/// Why a backend could not decide.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The call did not answer within the limiter timeout.
    #[error("timed out")]
    Timeout,
    /// Redis answered with an error or the connection failed.
    #[error("{0}")]
    Redis(String),
}

impl BackendError {
    /// Label for the errors metric.
    pub fn kind(&self) -> &'static str {
        match self {
            BackendError::Timeout => "timeout",
            BackendError::Redis(_) => "error",
        }
    }
}

/// A store that applies the token bucket atomically.
#[async_trait]
pub trait LimiterBackend: Send + Sync {
    /// Takes one token from the bucket at `key` if there is one.
    async fn check(&self, key: &str, policy: &BucketPolicy) -> Result<Decision, BackendError>;
    /// Like [`LimiterBackend::check`], and also reads the string at `prefetch` in the same
    /// round trip where the store can (Redis: the cache entry of the request, so a
    /// request costs one round trip before the provider is called, not two).
    async fn check_and_prefetch(
        &self,
        key: &str,
        policy: &BucketPolicy,
        prefetch: &str,
    ) -> Result<(Decision, Prefetch), BackendError> {
        let _ = prefetch;
        Ok((self.check(key, policy).await?, Prefetch::NotFetched))
    }
    /// Name used in readiness bodies and logs.
    fn name(&self) -> &'static str;
}

/// The bucket readiness checks use: not a digest, so no client's bucket is ever this one.
/// Its one token refills in a millisecond, so the key is gone at once.
const READINESS_BUCKET: &str = "ratelimit:v1:{readiness}";

/// Why the limiter could not reach its backend.
#[derive(Debug, thiserror::Error)]
pub enum Unreachable {
    /// The circuit breaker is open after consecutive failures: calls skip the backend.
    #[error("circuit breaker open after repeated failures")]
    BreakerOpen,
    /// The call failed.
    #[error("{0}")]
    Failed(BackendError),
}

impl Unreachable {
    /// What went wrong in words a client may see: no address, no server message.
    pub fn summary(&self) -> &'static str {
        match self {
            Unreachable::BreakerOpen => "circuit breaker open after repeated failures",
            Unreachable::Failed(BackendError::Timeout) => "limiter calls time out",
            Unreachable::Failed(BackendError::Redis(_)) => "limiter calls fail",
        }
    }
}

/// The Redis key of a client's bucket: the prefix, a version (so a future algorithm
/// cannot misread old state), and a digest of the identity inside a Cluster hash tag (so
/// a client's keys share a slot). The raw identity never reaches Redis.
pub fn bucket_key(identity: &str) -> String {
    let digest = Sha256::digest(identity.as_bytes());
    format!("ratelimit:v1:{{{}}}", hex::encode(&digest[..16]))
}

/// The limiter as the chat use case sees it: a backend plus, when the backend is remote,
/// the deny cache in front of it and the breaker and failure policy behind it.
pub struct RateLimiter {
    backend: Arc<dyn LimiterBackend>,
    remote: Option<RemoteGuards>,
    mode: FailureMode,
    timeout: Duration,
    metrics: Metrics,
}

/// What only a remote (fallible, slow-able) backend needs.
struct RemoteGuards {
    /// The in-process bucket the `local` failure mode uses.
    fallback: memory::MemoryLimiter,
    breaker: breaker::Breaker,
    deny_cache: deny_cache::DenyCache,
    /// `rate_limiter_backend_up` of this backend, resolved once: it is set on every call.
    backend_up: prometheus::IntGauge,
}

/// How the limiter protects itself from its remote store.
#[derive(Debug, Clone)]
pub struct LimiterConfig {
    /// Policy when the store fails.
    pub mode: FailureMode,
    /// Bound on one store call.
    pub timeout: Duration,
    /// Consecutive failures that open the breaker.
    pub breaker_threshold: u32,
    /// How long the open breaker skips the store before probing.
    pub breaker_cooldown: Duration,
}

impl RateLimiter {
    /// A limiter over `backend`. `remote` says whether the backend can fail or be slow
    /// (Redis) and so needs the deny cache, the breaker and the failure policy.
    pub fn new(
        backend: Arc<dyn LimiterBackend>,
        remote: bool,
        config: LimiterConfig,
        metrics: Metrics,
    ) -> RateLimiter {
        let backend_up = metrics
            .limiter_backend_state
            .with_label_values(&[backend.name()]);
        backend_up.set(1);
        RateLimiter {
            backend,
            remote: remote.then(|| RemoteGuards {
                fallback: memory::MemoryLimiter::new(),
                breaker: breaker::Breaker::new(config.breaker_threshold, config.breaker_cooldown),
                deny_cache: deny_cache::DenyCache::new(),
                backend_up,
            }),
            mode: config.mode,
            timeout: config.timeout,
            metrics,
        }
    }

    /// A denial still in force for `key` from the local deny cache, answered without any
    /// Redis call (and counted as blocked). Callers ask this before [`RateLimiter::check`],
    /// so a denied client costs neither a round trip nor parsing its body.
    pub fn cached_denial(&self, key: &str) -> Option<Decision> {
        let denied = self.remote.as_ref()?.deny_cache.check(key)?;
        self.metrics.limiter_local_denials.inc();
        self.metrics.rate_limit_blocked.inc();
        Some(denied)
    }

    /// Decides one request for the bucket at `key`, reading `prefetch` (a cache key) in
    /// the same round trip when given. Never waits on Redis longer than the limiter
    /// timeout, and is never retried: a timed-out script may have run.
    pub async fn check(
        &self,
        key: &str,
        policy: &BucketPolicy,
        prefetch: Option<&str>,
    ) -> (Result<Decision, ChatError>, Prefetch) {
        let started = Instant::now();
        let (decision, prefetched) = match &self.remote {
            None => match self.backend.check(key, policy).await {
                Ok(decision) => (Ok(decision), Prefetch::NotFetched),
                Err(e) => (
                    Err(ChatError::LimiterUnavailable(format!(
                        "Rate limiter backend ({}) failed: {e}",
                        self.backend.name()
                    ))),
                    Prefetch::NotFetched,
                ),
            },
            Some(guards) => self.check_remote(guards, key, policy, prefetch).await,
        };
        self.metrics
            .limiter_call_latency
            .observe(started.elapsed().as_secs_f64());
        match &decision {
            Ok(d) if d.allowed => self.metrics.rate_limit_allowed.inc(),
            Ok(_) => self.metrics.rate_limit_blocked.inc(),
            Err(_) => {}
        }
        (decision, prefetched)
    }

    async fn check_remote(
        &self,
        guards: &RemoteGuards,
        key: &str,
        policy: &BucketPolicy,
        prefetch: Option<&str>,
    ) -> (Result<Decision, ChatError>, Prefetch) {
        match self.guarded_call(guards, key, policy, prefetch).await {
            Ok((decision, prefetched)) => {
                guards.deny_cache.record(key, &decision);
                (Ok(decision), prefetched)
            }
            Err(_) => {
                let prefetched = match prefetch {
                    Some(_) => Prefetch::Failed,
                    None => Prefetch::NotFetched,
                };
                (self.on_backend_failure(guards, key, policy), prefetched)
            }
        }
    }

    /// One backend call through the breaker, bounded by the limiter timeout; its outcome
    /// feeds the breaker and the backend's health metrics. `Unreachable::BreakerOpen`
    /// when the breaker skipped the call.
    async fn guarded_call(
        &self,
        guards: &RemoteGuards,
        key: &str,
        policy: &BucketPolicy,
        prefetch: Option<&str>,
    ) -> Result<(Decision, Prefetch), Unreachable> {
        let admission = guards.breaker.admit();
        if admission == breaker::Admission::Skip {
            return Err(Unreachable::BreakerOpen);
        }
        let call = async {
            match prefetch {
                Some(cache_key) => {
                    self.backend
                        .check_and_prefetch(key, policy, cache_key)
                        .await
                }
                None => Ok((self.backend.check(key, policy).await?, Prefetch::NotFetched)),
            }
        };
        let outcome = tokio::time::timeout(self.timeout, call)
            .await
            .unwrap_or(Err(BackendError::Timeout));
        let name = self.backend.name();
        let result = match outcome {
            Ok(outcome) => {
                if guards.breaker.on_success() {
                    tracing::info!(
                        backend = name,
                        "rate limiter backend recovered; breaker closed"
                    );
                }
                guards.backend_up.set(1);
                Ok(outcome)
            }
            Err(error) => {
                guards.backend_up.set(0);
                self.metrics.limiter_redis_errors.get(error.kind()).inc();
                if guards
                    .breaker
                    .on_failure(admission == breaker::Admission::Probe)
                {
                    tracing::warn!(backend = name, %error, mode = self.mode.as_str(),
                        "rate limiter backend failing; breaker open, applying the failure mode");
                }
                Err(Unreachable::Failed(error))
            }
        };
        self.metrics
            .limiter_breaker_state
            .set(guards.breaker.state() as i64);
        result
    }

    fn on_backend_failure(
        &self,
        guards: &RemoteGuards,
        key: &str,
        policy: &BucketPolicy,
    ) -> Result<Decision, ChatError> {
        self.metrics
            .limiter_fallback_decisions
            .get(self.mode.as_str())
            .inc();
        match self.mode {
            FailureMode::Local => Ok(guards.fallback.take(key, policy)),
            FailureMode::Closed => Err(ChatError::LimiterUnavailable(format!(
                "Rate limiter backend ({}) is unavailable",
                self.backend.name()
            ))),
            FailureMode::Open => Ok(Decision {
                allowed: true,
                remaining: policy.capacity,
                reset_ms: 0,
                retry_after_ms: 0,
            }),
        }
    }

    /// Forgets cached denials, after bucket policies changed (hot reload).
    pub fn policies_changed(&self) {
        if let Some(guards) = &self.remote {
            guards.deny_cache.clear();
        }
    }

    /// Whether the limiter can decide through its backend now, for readiness: the same
    /// call a request makes (the script, and the cache read with it when `prefetch` is
    /// given), on a bucket of its own that no client shares, through the breaker. A
    /// backend that answers `PING` but fails every limiter call (say, a pipeline its
    /// deployment refuses) is not ready, and neither is one whose breaker is open.
    pub async fn ready(&self, prefetch: Option<&str>) -> Result<(), Unreachable> {
        let Some(guards) = &self.remote else {
            return Ok(());
        };
        let policy = BucketPolicy {
            tier: "readiness".into(),
            capacity: 1,
            refill_rate: 1000.0,
        };
        self.guarded_call(guards, READINESS_BUCKET, &policy, prefetch)
            .await
            .map(drop)
    }

    /// Name of the backend, for readiness bodies.
    pub fn backend_name(&self) -> &'static str {
        self.backend.name()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_keys_hide_the_identity_and_carry_a_hash_tag() {
        let key = bucket_key("key:sk-secret");
        assert!(key.starts_with("ratelimit:v1:{"));
        assert!(key.ends_with('}'));
        assert!(!key.contains("sk-secret"));
        assert_eq!(key, bucket_key("key:sk-secret"));
        assert_ne!(key, bucket_key("key:sk-other"));
    }

    #[test]
    fn seconds_to_fill_rounds_up() {
        let p = BucketPolicy {
            tier: "default".into(),
            capacity: 5,
            refill_rate: 0.5,
        };
        assert_eq!(p.seconds_to_fill(), 10);
        let p = BucketPolicy {
            capacity: 5,
            refill_rate: 3.0,
            ..p
        };
        assert_eq!(p.seconds_to_fill(), 2);
    }
}
