//! The per-client token-bucket limiter: backends, the failure policy around them, and
//! the decision a front door turns into a 429 or into headers. It never imports the
//! cache: a cache key it reads in its round trip is an opaque string to it.

pub mod breaker;
pub mod deny_cache;
pub mod memory;
pub mod period;
pub mod redis;
pub mod reservation;
pub mod settlements;

pub use settlements::{SettleBatch, Settlement};

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use sha2::{Digest, Sha256};

use crate::domain::ChatError;
use crate::settings::{BudgetPeriod, FailureMode};
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
    /// The client's LLM-token limits (CONTRACT §13), off by default.
    pub tokens: TokenLimits,
}

/// A client's LLM-token limits: a bucket of tokens per minute and a budget per period.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TokenLimits {
    /// Capacity of the token bucket, refilled over a minute; 0 = no bucket.
    pub per_minute: u64,
    /// Tokens per period; 0 = no budget.
    pub budget: u64,
    /// The budget's period.
    pub period: BudgetPeriod,
    /// The completion tokens reserved for a request that sets no `max_tokens`.
    pub default_max_tokens: u64,
}

impl TokenLimits {
    /// Whether any token limit applies.
    pub fn any(&self) -> bool {
        self.per_minute > 0 || self.budget > 0
    }

    /// What a request reserves: `ceil(prompt bytes / 4)` and its completion budget
    /// (`max_tokens`, or the configured default).
    pub fn reservation(&self, prompt_bytes: usize, max_tokens: Option<u64>) -> u64 {
        (prompt_bytes.div_ceil(4) as u64)
            .saturating_add(max_tokens.unwrap_or(self.default_max_tokens))
    }
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
    /// Milliseconds until the request could pass (0 when allowed).
    pub retry_after_ms: u64,
    /// The limit that refused the request (`None` when allowed).
    pub denied_by: Option<Limit>,
    /// The LLM-token bucket after this request, when the policy has one.
    pub tokens: Option<Left>,
    /// The token budget after this request, when the policy has one.
    pub budget: Option<Left>,
    /// The budget period an admitted request was charged to (numbered as the store
    /// numbers them), so its settlement goes to that period's count and no other.
    pub budget_period: Option<i64>,
}

/// What is left of one limit, for the headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Left {
    /// Whole tokens left.
    pub remaining: u64,
    /// Milliseconds until the limit is whole again (the bucket full, the period over).
    pub reset_ms: u64,
}

/// Which limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// The request bucket is empty.
    Requests,
    /// The LLM-token bucket holds less than the request reserves.
    Tokens,
    /// The request reserves more LLM tokens than the bucket can ever hold.
    TooLarge,
    /// The token budget of the period is spent.
    Budget,
}

impl Limit {
    /// The `reason` label of `rate_limit_denials_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            Limit::Requests => "requests",
            Limit::Tokens => "tokens",
            Limit::TooLarge => "too_large",
            Limit::Budget => "budget",
        }
    }

    /// Whether waiting can help within a minute or so: not for a request larger than
    /// the bucket, nor for a spent budget (the answers say `x-should-retry: false`).
    pub fn retryable(self) -> bool {
        matches!(self, Limit::Requests | Limit::Tokens)
    }
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
            denied_by: (!allowed).then_some(Limit::Requests),
            tokens: None,
            budget: None,
            budget_period: None,
        }
    }
}

/// The LLM-token part of a decision, as `token_bucket.lua` (or the in-process bucket)
/// reports it beside the request bucket's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScriptReply {
    /// The limit that refused the request, if one did.
    pub why: Option<Limit>,
    /// Whole tokens left in the token bucket (never below 0).
    pub llm_left: u64,
    /// Milliseconds until the token bucket is full.
    pub llm_to_full_ms: u64,
    /// Milliseconds until the reservation fits the token bucket (0 when it does).
    pub llm_retry_ms: u64,
    /// Tokens left in the budget.
    pub budget_left: u64,
    /// Milliseconds until the budget's period ends.
    pub period_left_ms: u64,
    /// The budget's period, numbered.
    pub period: i64,
}

impl ScriptReply {
    /// Reads the script's `why` code.
    pub fn limit(code: i64) -> Option<Limit> {
        match code {
            1 => Some(Limit::Requests),
            2 => Some(Limit::Tokens),
            3 => Some(Limit::TooLarge),
            4 => Some(Limit::Budget),
            _ => None,
        }
    }

    /// Adds the token limits to `decision`, the request bucket's: whether all admitted
    /// the request, which refused it, what each has left, and how long to wait (the
    /// longest wait of the limits that refused; a budget's, until its period ends).
    pub fn complete(&self, decision: &mut Decision, policy: &BucketPolicy) {
        let limits = policy.tokens;
        decision.allowed = self.why.is_none();
        decision.denied_by = self.why;
        if limits.per_minute > 0 {
            decision.tokens = Some(Left {
                remaining: self.llm_left,
                reset_ms: self.llm_to_full_ms,
            });
        }
        if limits.budget > 0 {
            decision.budget = Some(Left {
                remaining: self.budget_left,
                reset_ms: self.period_left_ms,
            });
            decision.budget_period = self.why.is_none().then_some(self.period);
        }
        decision.retry_after_ms = match self.why {
            None => 0,
            Some(Limit::Requests) => decision.retry_after_ms.max(1),
            Some(Limit::Tokens) => self.llm_retry_ms.max(decision.retry_after_ms).max(1),
            Some(Limit::TooLarge) => self.llm_to_full_ms.max(1000),
            Some(Limit::Budget) => self.period_left_ms.max(1),
        };
    }
}

/// What one request asks of the limiter beside a request token: the LLM tokens it
/// reserves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Reserve {
    /// LLM tokens reserved (0 when the policy has no token limit).
    pub tokens: u64,
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
    /// Takes one token from the bucket at `key` if there is one and, when the policy
    /// limits LLM tokens, reserves `reserve.tokens` of them, all or nothing; first it
    /// applies `settles`, a batch of earlier requests' settlements for the same bucket
    /// (once: not when the store applied a batch as new from the same instance).
    async fn check(
        &self,
        key: &str,
        policy: &BucketPolicy,
        reserve: Reserve,
        settles: Option<&SettleBatch>,
    ) -> Result<Decision, BackendError>;
    /// Like [`LimiterBackend::check`], and also reads the string at `prefetch` in the same
    /// round trip where the store can (Redis: the cache entry of the request, so a
    /// request costs one round trip before the provider is called, not two).
    async fn check_and_prefetch(
        &self,
        key: &str,
        policy: &BucketPolicy,
        reserve: Reserve,
        settles: Option<&SettleBatch>,
        prefetch: &str,
    ) -> Result<(Decision, Prefetch), BackendError> {
        let _ = prefetch;
        Ok((
            self.check(key, policy, reserve, settles).await?,
            Prefetch::NotFetched,
        ))
    }
    /// Applies `settles` to the bucket at `key` under `policy` without admitting a
    /// request: once however often this is called. `timeout` bounds a store call.
    async fn settle(
        &self,
        key: &str,
        policy: &BucketPolicy,
        settles: &SettleBatch,
        timeout: Duration,
    ) -> Result<(), BackendError>;
    /// Name used in readiness bodies and logs.
    fn name(&self) -> &'static str;
}

/// Waits before each retry of a failed reconciliation: the first retry soon (a blip),
/// the last after seconds (a Redis restart), so a reservation outlives a short outage.
pub const RECONCILE_RETRY_DELAYS: [Duration; 3] = [
    Duration::from_millis(250),
    Duration::from_secs(1),
    Duration::from_secs(3),
];

/// What a limiter call decided, what its round trip read, and the reservation it made.
#[derive(Debug)]
pub struct Checked {
    /// The decision, or why none could be made (failing closed).
    pub decision: Result<Decision, ChatError>,
    /// What the round trip read under the prefetched key.
    pub prefetched: Prefetch,
    /// The LLM tokens reserved for an admitted request, to settle after its answer.
    pub ticket: Option<Ticket>,
}

/// Where a decision was made, and so where its reservation is settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// The limiter's backend (Redis, or the `memory://` store).
    Backend,
    /// The in-process bucket of the `local` failure mode.
    Fallback,
    /// No bucket: the `open` failure mode, or no decision.
    Nowhere,
}

/// An admitted request's LLM-token reservation, until it is settled.
#[derive(Debug, Clone, PartialEq)]
pub struct Ticket {
    /// The tokens reserved.
    pub reserved: u64,
    /// The budget period charged, if a budget was.
    pub period: Option<i64>,
    /// The bucket's limits when reserved, to settle under.
    pub policy: BucketPolicy,
    /// Where the reservation was made.
    pub place: Place,
}

/// A token count as a signed one (no count comes near `i64::MAX`; one that did would
/// saturate rather than wrap).
fn signed(tokens: u64) -> i64 {
    i64::try_from(tokens).unwrap_or(i64::MAX)
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
    /// Settlements waiting to ride with their bucket's next call (Redis only).
    waiting: settlements::Settlements,
}

impl std::fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimiter")
            .field("backend", &self.backend.name())
            .finish_non_exhaustive()
    }
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
            waiting: settlements::Settlements::default(),
        }
    }

    /// A denial still in force for `key` from the local deny cache, answered without any
    /// Redis call (and counted as blocked). Callers ask this before [`RateLimiter::check`],
    /// so a denied client costs neither a round trip nor parsing its body.
    pub fn cached_denial(&self, key: &str) -> Option<Decision> {
        let denied = self.remote.as_ref()?.deny_cache.check(key)?;
        self.metrics.limiter_local_denials.inc();
        self.count(&denied);
        Some(denied)
    }

    /// Counts a decision in the allowed/blocked metrics and a denial by its reason.
    fn count(&self, decision: &Decision) {
        match decision.denied_by {
            None => self.metrics.rate_limit_allowed.inc(),
            Some(limit) => {
                self.metrics.rate_limit_blocked.inc();
                self.metrics.rate_limit_denials.get(limit.as_str()).inc();
            }
        }
    }

    /// Decides one request for the bucket at `key`, reserving `tokens` LLM tokens when the
    /// policy limits them, and reading `prefetch` (a cache key) in the same round trip
    /// when given. Never waits on Redis longer than the limiter timeout, and is never
    /// retried: a timed-out script may have run. An admitted request that reserved
    /// tokens comes with the [`Ticket`] its reconciliation needs.
    pub async fn check(
        self: &Arc<Self>,
        key: &str,
        policy: &BucketPolicy,
        tokens: u64,
        prefetch: Option<&str>,
    ) -> Checked {
        let started = Instant::now();
        let reserve = Reserve {
            tokens: if policy.tokens.any() { tokens } else { 0 },
        };
        let (decision, prefetched, place) = match &self.remote {
            None => match self.backend.check(key, policy, reserve, None).await {
                Ok(decision) => (Ok(decision), Prefetch::NotFetched, Place::Backend),
                Err(e) => (
                    Err(ChatError::LimiterUnavailable(format!(
                        "Rate limiter backend ({}) failed: {e}",
                        self.backend.name()
                    ))),
                    Prefetch::NotFetched,
                    Place::Nowhere,
                ),
            },
            Some(guards) => {
                self.check_remote(guards, key, policy, reserve, prefetch)
                    .await
            }
        };
        self.metrics
            .limiter_call_latency
            .observe(started.elapsed().as_secs_f64());
        if let Ok(decision) = &decision {
            self.count(decision);
        }
        let reserved = matches!(&decision, Ok(d) if d.allowed) && reserve.tokens > 0;
        let ticket = (reserved && place != Place::Nowhere).then(|| Ticket {
            period: decision.as_ref().ok().and_then(|d| d.budget_period),
            reserved: reserve.tokens,
            policy: policy.clone(),
            place,
        });
        if ticket.is_some() {
            self.metrics.limiter_reservations_unsettled.inc();
        }
        Checked {
            decision,
            prefetched,
            ticket,
        }
    }

    async fn check_remote(
        self: &Arc<Self>,
        guards: &RemoteGuards,
        key: &str,
        policy: &BucketPolicy,
        reserve: Reserve,
        prefetch: Option<&str>,
    ) -> (Result<Decision, ChatError>, Prefetch, Place) {
        // Earlier requests' settlements ride with this call; if it fails they are sent
        // again unchanged (a call that timed out may have applied them: the script
        // applies a batch once).
        let riders = match policy.tokens.any() {
            true => self.waiting.take(key),
            false => None,
        };
        let outcome = self
            .guarded_call(guards, key, policy, reserve, riders.as_ref(), prefetch)
            .await;
        if let Some(batch) = &riders {
            let outcome = match outcome {
                Ok(_) => settlements::Outcome::Applied,
                Err(_) => settlements::Outcome::Failed,
            };
            self.batch_done(key, batch, settlements::Carrier::Ride, outcome);
        }
        match outcome {
            Ok((decision, prefetched)) => {
                if decision.denied_by == Some(Limit::Requests) {
                    guards.deny_cache.record(key, &decision);
                }
                (Ok(decision), prefetched, Place::Backend)
            }
            Err(_) => {
                let prefetched = match prefetch {
                    Some(_) => Prefetch::Failed,
                    None => Prefetch::NotFetched,
                };
                let (decision, place) = self.on_backend_failure(guards, key, policy, reserve);
                (decision, prefetched, place)
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
        reserve: Reserve,
        settles: Option<&SettleBatch>,
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
                        .check_and_prefetch(key, policy, reserve, settles, cache_key)
                        .await
                }
                None => Ok((
                    self.backend.check(key, policy, reserve, settles).await?,
                    Prefetch::NotFetched,
                )),
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
        reserve: Reserve,
    ) -> (Result<Decision, ChatError>, Place) {
        self.metrics
            .limiter_fallback_decisions
            .get(self.mode.as_str())
            .inc();
        match self.mode {
            FailureMode::Local => (
                Ok(guards.fallback.take(key, policy, reserve)),
                Place::Fallback,
            ),
            FailureMode::Closed => (
                Err(ChatError::LimiterUnavailable(format!(
                    "Rate limiter backend ({}) is unavailable",
                    self.backend.name()
                ))),
                Place::Nowhere,
            ),
            FailureMode::Open => (
                Ok(Decision {
                    allowed: true,
                    remaining: policy.capacity,
                    reset_ms: 0,
                    retry_after_ms: 0,
                    denied_by: None,
                    tokens: (policy.tokens.per_minute > 0).then_some(Left {
                        remaining: policy.tokens.per_minute,
                        reset_ms: 0,
                    }),
                    budget: None,
                    budget_period: None,
                }),
                Place::Nowhere,
            ),
        }
    }

    /// Settles `ticket`, a reservation made for the bucket at `key`, to `used` tokens,
    /// where it was made: at once in process (the `memory://` store, or the fallback
    /// while Redis was failing); in Redis with the bucket's next call, or on its own
    /// after [`settlements::SETTLE_WAIT`].
    pub fn settle(self: &Arc<Self>, key: Arc<str>, ticket: &Ticket, used: u64) {
        let settlement = Settlement {
            surplus: signed(ticket.reserved) - signed(used),
            bucket: ticket.policy.tokens.per_minute > 0,
            period: ticket.period,
        };
        match (&self.remote, ticket.place) {
            (Some(guards), Place::Fallback) => {
                guards
                    .fallback
                    .settle(&key, ticket.policy.tokens.per_minute, settlement);
                self.metrics.limiter_reservations_unsettled.dec();
            }
            (Some(_), _) => {
                if self.waiting.push(key, &ticket.policy, settlement) {
                    self.schedule_flush();
                }
            }
            (None, _) => {
                let Ok(runtime) = tokio::runtime::Handle::try_current() else {
                    return;
                };
                let limiter = self.clone();
                let policy = ticket.policy.clone();
                let batch = self.waiting.lone(settlement);
                runtime.spawn(async move {
                    limiter.send_settles(&key, &policy, &batch).await;
                    limiter.metrics.limiter_reservations_unsettled.dec();
                });
            }
        }
    }

    /// The `carrier` of `batch` for the bucket at `key` ended with `outcome`.
    fn batch_done(
        self: &Arc<Self>,
        key: &str,
        batch: &SettleBatch,
        carrier: settlements::Carrier,
        outcome: settlements::Outcome,
    ) {
        let done = self.waiting.done(key, batch, carrier, outcome);
        if done.flush {
            self.schedule_flush();
        }
        self.metrics
            .limiter_reservations_unsettled
            .sub(done.finished as i64);
    }

    /// Sends, after [`settlements::SETTLE_WAIT`], every batch still waiting that no call
    /// carries.
    fn schedule_flush(self: &Arc<Self>) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let limiter = self.clone();
        runtime.spawn(async move {
            tokio::time::sleep(settlements::SETTLE_WAIT).await;
            for (key, policy, batch) in limiter.waiting.due() {
                let limiter = limiter.clone();
                tokio::spawn(async move {
                    let outcome = limiter.send_settles(&key, &policy, &batch).await;
                    limiter.batch_done(&key, &batch, settlements::Carrier::Flush, outcome);
                });
            }
        });
    }

    /// Sends `batch` on its own. A failed store call is tried again after
    /// [`RECONCILE_RETRY_DELAYS`] (the script applies a batch once, so a retry after a
    /// call that did run changes nothing); a batch that never gets through is logged and
    /// counted, and its reservations stay charged as reserved.
    async fn send_settles(
        &self,
        key: &str,
        policy: &BucketPolicy,
        batch: &SettleBatch,
    ) -> settlements::Outcome {
        let mut delays = RECONCILE_RETRY_DELAYS.iter();
        loop {
            let outcome = self.backend.settle(key, policy, batch, self.timeout).await;
            let Err(error) = outcome else {
                return settlements::Outcome::Applied;
            };
            match delays.next() {
                Some(delay) => tokio::time::sleep(*delay).await,
                None => {
                    self.metrics.limiter_reconcile_failures.inc_by(batch.count);
                    tracing::warn!(%error, count = batch.count,
                        "token reservations could not be settled; they stay charged as reserved");
                    return settlements::Outcome::Abandoned;
                }
            }
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
            tokens: TokenLimits::default(),
        };
        let reserve = Reserve::default();
        self.guarded_call(guards, READINESS_BUCKET, &policy, reserve, None, prefetch)
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
            tokens: TokenLimits::default(),
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
