//! `ChatService`, the chat use case every front door calls: admit a request (the limiter,
//! with the cache entry read in the same round trip), then answer it from the cache or
//! from the routed provider, whole (one provider call for concurrent identical misses)
//! or streamed (`chat::stream`).
//!
//! The cache holds each door's own rendering of an answer, under keys each door derives
//! (its own namespace), so a hit is sent as stored, bytes unchanged: the door passes an
//! [`Encode`] that renders a fresh [`Reply`] into the body it sends and the cache keeps.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use opentelemetry::KeyValue;
use tokio::sync::OnceCell;

use arc_swap::ArcSwap;

use super::registry::{Plan, Registry, Turn, Upstream};
use super::routing::Route;
use super::stream::{LiveStream, StoreWhenDone};
use crate::cache::{Cache, CacheError};
use crate::domain::{CacheStatus, ChatError, ChatRequest, Completion, Reply};
use crate::providers::{complete_with_retries, stream_with_retries, EventStream, Failed};
use crate::ratelimit::reservation::Reservation;
use crate::ratelimit::{BucketPolicy, Decision, Prefetch, RateLimiter, Unreachable};
use crate::telemetry::metrics::Metrics;
use crate::telemetry::scope;

/// Renders a fresh answer as the body a door sends (and the cache keeps for it).
pub type Encode = fn(&Reply) -> Result<Bytes, ChatError>;

/// A chat answer: the body, ready to send, and how it was produced.
#[derive(Debug, Clone)]
pub struct ChatOutcome {
    /// The door's body: fresh from its [`Encode`], or as the cache stored it.
    pub body: Bytes,
    /// Hit or miss.
    pub cache: CacheStatus,
    /// The provider that answered (for a hit: the route's first choice).
    pub provider: &'static str,
}

/// A provider call's outcome: the door's body, the provider, and the tokens it used.
type Called = Result<(Bytes, &'static str, u64), ChatError>;

type Shared = Arc<OnceCell<Called>>;

/// Provider calls under way, by cache key.
type InFlight = Mutex<HashMap<String, Shared, BuildHasherDefault<CacheKeyHasher>>>;

/// Hashes the in-flight map's keys a word at a time (~1k instructions less than SipHash
/// per lookup, three lookups per miss). The keys are hex SHA-256 digests, so already
/// evenly spread; SipHash's resistance to keys chosen to collide is not needed, as the
/// map only ever holds the misses in flight, which the connection limit bounds.
#[derive(Default)]
struct CacheKeyHasher(u64);

impl Hasher for CacheKeyHasher {
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            // The FxHash step: rotate, mix in, multiply by an odd constant.
            self.0 = (self.0.rotate_left(5) ^ u64::from_le_bytes(word))
                .wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
        }
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// The limiter's verdict on a request, with what its round trip read from the cache.
#[derive(Debug)]
pub struct Admission {
    /// The decision, or why the limiter could not decide (failing closed).
    pub decision: Result<Decision, ChatError>,
    /// The request's cache key, when the cache is on and the door gave one.
    cache_key: Option<String>,
    /// What the limiter's round trip read under `cache_key`.
    prefetched: Prefetch,
    /// The LLM tokens reserved, settled once the answer's usage is known.
    reservation: Option<Reservation>,
}

/// Settles a reservation, if the request holds one, to `used` tokens.
fn settle(reservation: Option<Reservation>, used: u64) {
    if let Some(reservation) = reservation {
        reservation.settle(used);
    }
}

/// Answers chat requests.
pub struct ChatService {
    limiter: Arc<RateLimiter>,
    cache: Option<Arc<dyn Cache>>,
    cache_ttl: Duration,
    /// The providers and routes in force; a reload swaps them, and a request keeps the
    /// ones it started with.
    registry: ArcSwap<Registry>,
    /// Bound on one request's time on upstreams, retries and failover included.
    deadline: Duration,
    metrics: Metrics,
    /// Provider calls under way, by cache key, so identical misses share one call.
    in_flight: Arc<InFlight>,
}

/// Settings of the chat service that are not its collaborators.
pub struct ChatConfig {
    /// Cache TTL; zero disables the cache.
    pub cache_ttl: Duration,
    /// Bound on one request's time on upstreams, retries and failover included.
    pub deadline: Duration,
}

impl ChatService {
    /// A service over `limiter`, `cache` (ignored when the TTL is zero) and `registry`.
    pub fn new(
        limiter: Arc<RateLimiter>,
        cache: Arc<dyn Cache>,
        registry: Registry,
        config: ChatConfig,
        metrics: Metrics,
    ) -> ChatService {
        registry.export(&metrics);
        ChatService {
            limiter,
            cache: (!config.cache_ttl.is_zero()).then_some(cache),
            cache_ttl: config.cache_ttl,
            registry: ArcSwap::from_pointee(registry),
            deadline: config.deadline,
            metrics,
            in_flight: Arc::default(),
        }
    }

    /// The limiter, for reloads.
    pub fn limiter(&self) -> &RateLimiter {
        &self.limiter
    }

    /// A denial still in force for `bucket` from the limiter's local deny cache, decided
    /// without any Redis call. Doors ask this before reading the body, so a denied client
    /// costs neither a round trip nor parsing.
    pub fn cached_denial(&self, bucket: &str) -> Option<Decision> {
        self.limiter.cached_denial(bucket)
    }

    /// Whether answers are cached: a door computes cache keys only then.
    pub fn caching(&self) -> bool {
        self.cache.is_some()
    }

    /// Decides one request of the client whose bucket is `bucket`. `request` and
    /// `cache_key` are the request and its key when its body was valid (the key when
    /// [`ChatService::caching`]): the entry is then read in the limiter's round trip, so
    /// a request costs one round trip before the provider, and the request's LLM tokens
    /// are reserved in the same script call when the policy limits them. A body that
    /// failed to parse is still limited (429 comes first) and reserves no tokens.
    pub async fn admit(
        &self,
        bucket: &Arc<str>,
        policy: &BucketPolicy,
        request: Option<&ChatRequest>,
        cache_key: Option<String>,
    ) -> Admission {
        let cache_key = cache_key.filter(|_| self.cache.is_some());
        let tokens = match request {
            Some(request) if policy.tokens.any() => policy
                .tokens
                .reservation(request.prompt_bytes(), request.max_tokens),
            _ => 0,
        };
        if let Some(model) = request.and_then(super::routing::named_model) {
            scope::set_on_request(|| vec![KeyValue::new("gen_ai.request.model", model.to_owned())]);
        }
        let span = scope::span("rate_limit", || {
            vec![KeyValue::new(
                "gateway.rate_limit.reserved_tokens",
                tokens as i64,
            )]
        });
        let checked = self
            .limiter
            .check(bucket, policy, tokens, cache_key.as_deref())
            .await;
        match &checked.decision {
            Ok(decision) => {
                span.set("gateway.rate_limit.allowed", || decision.allowed.into());
                if let Some(limit) = decision.denied_by {
                    span.set("gateway.rate_limit.denied_by", || limit.as_str().into());
                }
            }
            Err(_) => span.fail(|| "limiter_unavailable".to_owned()),
        }
        drop(span);
        Admission {
            decision: checked.decision,
            cache_key,
            prefetched: checked.prefetched,
            reservation: checked
                .ticket
                .map(|ticket| Reservation::new(self.limiter.clone(), bucket.clone(), ticket)),
        }
    }

    /// Whether the limiter can decide through its store now, making the call a request
    /// makes (the cache read included when the cache is on), for readiness.
    pub async fn ready(&self) -> Result<(), Unreachable> {
        let prefetch = self.cache.as_ref().map(|_| "cache:readiness");
        self.limiter.ready(prefetch).await
    }

    /// The model names clients can pick from, with the provider each goes to first.
    pub fn models(&self) -> Vec<(String, &'static str)> {
        self.registry.load().models()
    }

    /// Puts `registry` in force for the requests that start from now on.
    pub fn replace_registry(&self, registry: Registry) {
        registry.export(&self.metrics);
        self.registry.store(Arc::new(registry));
    }

    /// The targets to try for `request`, or the 404 of a model no route has.
    fn plan(&self, request: &ChatRequest) -> Result<Plan, ChatError> {
        self.registry.load().plan(request).ok_or_else(|| {
            let name = super::routing::named_model(request).unwrap_or_default();
            ChatError::UnknownModel(name.to_owned())
        })
    }

    /// The cached body under the admission's key, if any (counting the hit or miss).
    /// `None` also when the cache is off or the door gave no key.
    async fn cached(&self, key: Option<&str>, prefetched: Prefetch) -> Option<Bytes> {
        let (cache, key) = (self.cache.as_ref()?, key?);
        // Usually read in the limiter's round trip already; the span says so.
        let span = scope::span("cache", || {
            vec![KeyValue::new(
                "gateway.cache.prefetched",
                !matches!(prefetched, Prefetch::NotFetched),
            )]
        });
        let cached = match prefetched {
            Prefetch::Found(body) => Ok(Some(body)),
            Prefetch::Missing => Ok(None),
            Prefetch::Failed => Err(CacheError("the read with the limiter call failed".into())),
            Prefetch::NotFetched => cache.get(key).await,
        };
        span.set("gateway.cache.hit", || matches!(cached, Ok(Some(_))).into());
        match cached {
            Ok(Some(body)) => {
                self.metrics.cache_hits.inc();
                return Some(body);
            }
            Ok(None) => {}
            Err(error) => {
                span.fail(|| "cache_unavailable".to_owned());
                self.metrics.cache_errors.inc();
                tracing::warn!(%error, "cache read failed; treating as a miss");
            }
        }
        self.metrics.cache_misses.inc();
        None
    }

    /// Answers an admitted `request` from the cache or its provider; `encode` renders a
    /// fresh answer as the door's body.
    pub async fn answer(
        &self,
        request: ChatRequest,
        admission: Admission,
        encode: Encode,
    ) -> Result<ChatOutcome, ChatError> {
        let Admission {
            cache_key: key,
            prefetched,
            reservation,
            ..
        } = admission;
        let plan = match self.plan(&request) {
            Ok(plan) => plan,
            Err(error) => {
                settle(reservation, 0);
                return Err(error);
            }
        };
        let first_choice = plan.targets[0].0.name();
        if let Some(body) = self.cached(key.as_deref(), prefetched).await {
            // A hit costs no upstream tokens.
            settle(reservation, 0);
            return Ok(ChatOutcome {
                body,
                cache: CacheStatus::Hit,
                provider: first_choice,
            });
        }
        let (Some(cache), Some(key)) = (&self.cache, key) else {
            let called = self.ask_provider(&request, &plan, encode).await;
            settle(
                reservation,
                *called.as_ref().map_or(&0, |(_, _, used)| used),
            );
            let (body, provider, _) = called?;
            return Ok(ChatOutcome {
                body,
                cache: CacheStatus::Miss,
                provider,
            });
        };

        let shared: Shared = {
            let mut in_flight = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
            in_flight.entry(key.clone()).or_default().clone()
        };
        // If the caller running the call goes away (client disconnect), OnceCell hands
        // the call to the next waiter, so followers never hang on an abandoned call.
        // Only the caller that ran the call is charged its tokens: the others' answers
        // cost the upstream nothing more, like hits.
        let ran = std::sync::atomic::AtomicBool::new(false);
        let waited = Instant::now();
        let result = shared
            .get_or_init(|| async {
                ran.store(true, std::sync::atomic::Ordering::Relaxed);
                let result = self.ask_provider(&request, &plan, encode).await;
                self.finish_call(cache.clone(), &key, &shared, &result);
                result
            })
            .await
            .clone();
        if !ran.load(std::sync::atomic::Ordering::Relaxed) {
            // A follower waited for another request's upstream call.
            scope::add_upstream_wait(waited.elapsed());
        }
        let used = match &result {
            Ok((_, _, used)) if ran.load(std::sync::atomic::Ordering::Relaxed) => *used,
            _ => 0,
        };
        settle(reservation, used);
        result.map(|(body, provider, _)| ChatOutcome {
            body,
            cache: CacheStatus::Miss,
            provider,
        })
    }

    /// Stores a success in the background (the response never waits for Redis) and ends
    /// the shared call once the entry is readable, so later requests hit the cache.
    fn finish_call(&self, cache: Arc<dyn Cache>, key: &str, shared: &Shared, result: &Called) {
        let in_flight = self.in_flight.clone();
        let shared = shared.clone();
        let key = key.to_owned();
        let forget = move |in_flight: &InFlight, key: &str| {
            let mut map = in_flight.lock().unwrap_or_else(|p| p.into_inner());
            if map.get(key).is_some_and(|s| Arc::ptr_eq(s, &shared)) {
                map.remove(key);
            }
        };
        match result {
            Ok((body, _, _)) => {
                let body = body.clone();
                let ttl = self.cache_ttl;
                let metrics = self.metrics.clone();
                tokio::spawn(async move {
                    if let Err(error) = cache.set(&key, body, ttl).await {
                        metrics.cache_errors.inc();
                        tracing::warn!(%error, "cache write failed");
                    }
                    forget(&in_flight, &key);
                });
            }
            Err(_) => forget(&in_flight, &key),
        }
    }

    /// The answer of the first target of `plan` that gives one, rendered by `encode`,
    /// the provider that gave it, and the tokens it used (prompt + completion).
    async fn ask_provider(&self, request: &ChatRequest, plan: &Plan, encode: Encode) -> Called {
        let ((completion, _guard), routed) = self
            .failover(request, plan, |upstream, model, deadline| async move {
                let completion = complete_with_retries(
                    upstream.provider.as_ref(),
                    request,
                    model,
                    &upstream.retry,
                    deadline,
                    &self.metrics,
                )
                .await?;
                Ok::<Completion, Failed>(completion)
            })
            .await?;
        let usage = completion.usage;
        let body = encode(&fresh_reply(&routed, completion))?;
        Ok((
            body,
            routed.provider,
            usage.prompt_tokens + usage.completion_tokens,
        ))
    }

    /// Tries the targets of `plan` in order with `call` until one answers, within the
    /// deadline: a target whose breaker is open is skipped, one that cannot honour the
    /// request is skipped (it is the client's error only when no target can), a failure
    /// another target may not have (connect error, timeout, 429, 5xx) moves on to the
    /// next, and any other failure is the answer. Returns the call's value with the
    /// target's in-flight count (held while the caller uses it), and the route taken.
    async fn failover<'a, T, F, Fut>(
        &'a self,
        request: &ChatRequest,
        plan: &'a Plan,
        call: F,
    ) -> Result<((T, super::registry::InFlight), Route), ChatError>
    where
        F: Fn(&'a Upstream, &'a str, std::time::Instant) -> Fut,
        Fut: std::future::Future<Output = Result<T, Failed>>,
    {
        // Everything here is the request waiting for upstreams (gateway_overhead_seconds
        // is the rest of its time), whichever way it ends.
        let _waiting = scope::WaitingForUpstream::start();
        let deadline = std::time::Instant::now() + self.deadline;
        let mut last: Option<ChatError> = None;
        let mut refused: Option<ChatError> = None;
        let mut failed_over_from: Option<&'static str> = None;
        for (upstream, model) in &plan.targets {
            if let Some(what) = upstream.provider.refusal(request) {
                refused.get_or_insert(ChatError::Unsupported {
                    provider: upstream.name(),
                    what,
                });
                continue;
            }
            let Turn::Call { guard, probe } = upstream.turn() else {
                continue;
            };
            if let Some(from) = failed_over_from.take() {
                self.metrics.provider_fallbacks.get(from).inc();
                tracing::info!(
                    from,
                    to = upstream.name(),
                    "failing over to the next target"
                );
            }
            match call(upstream, model, deadline).await {
                Ok(value) => {
                    upstream.succeeded(&self.metrics);
                    let routed = Route {
                        provider: upstream.name(),
                        model: model.clone(),
                    };
                    return Ok(((value, guard), routed));
                }
                Err(failure) if failure.fails_over() => {
                    upstream.failed(probe, failure.error.retry_after(), &self.metrics);
                    failed_over_from = Some(upstream.name());
                    last = Some(failure.into_chat_error());
                    if std::time::Instant::now() >= deadline {
                        break;
                    }
                }
                Err(failure) => {
                    // The upstream answered (a 400, a body it could not use): the
                    // target works, another would refuse the same request.
                    upstream.succeeded(&self.metrics);
                    return Err(failure.into_chat_error());
                }
            }
        }
        Err(last.or(refused).unwrap_or_else(|| {
            ChatError::UpstreamFailed(
                "No provider of this route can be called now: every one's circuit breaker is open"
                    .into(),
            )
        }))
    }

    /// Answers an admitted `request` as a stream: a cache hit as the stored body, for the
    /// door to replay; a miss as the provider's events, once its first one has come (the
    /// retries happen before). A finished stream's answer is stored as `encode` renders
    /// it, so a later request, streamed or not, hits. Concurrent identical streams each
    /// make their own call.
    pub async fn answer_stream(
        &self,
        request: ChatRequest,
        admission: Admission,
        encode: Encode,
    ) -> Result<Streamed, ChatError> {
        let Admission {
            cache_key: key,
            prefetched,
            reservation,
            ..
        } = admission;
        let plan = match self.plan(&request) {
            Ok(plan) => plan,
            Err(error) => {
                settle(reservation, 0);
                return Err(error);
            }
        };
        if let Some(body) = self.cached(key.as_deref(), prefetched).await {
            settle(reservation, 0);
            return Ok(Streamed::Cached {
                body,
                provider: plan.targets[0].0.name(),
            });
        }
        let started = self
            .failover(&request, &plan, |upstream, model, deadline| {
                let request = &request;
                async move {
                    let (first, rest): (_, EventStream) = stream_with_retries(
                        upstream.provider.as_ref(),
                        request,
                        model,
                        &upstream.retry,
                        deadline,
                        &self.metrics,
                    )
                    .await?;
                    Ok::<_, Failed>((first, rest, upstream.retry.attempt_timeout))
                }
            })
            .await;
        let (((first, rest, idle), in_flight), routed) = match started {
            Ok(started) => started,
            Err(error) => {
                settle(reservation, 0);
                return Err(error);
            }
        };
        let store = match (&self.cache, key) {
            (Some(cache), Some(key)) => Some(StoreWhenDone {
                cache: cache.clone(),
                key,
                ttl: self.cache_ttl,
                encode,
            }),
            _ => None,
        };
        Ok(Streamed::Live(Box::new(LiveStream::new(
            &routed,
            &request,
            (first, rest),
            idle,
            store,
            (in_flight, reservation),
            self.metrics.clone(),
        ))))
    }
}

/// A streamed answer, as the door is to send it.
pub enum Streamed {
    /// A cache hit: the door's stored body, to replay as a stream.
    Cached {
        /// The body the door stored.
        body: Bytes,
        /// The provider the request is routed to first.
        provider: &'static str,
    },
    /// The provider's events as they come.
    Live(Box<LiveStream>),
}

/// A fresh reply to a request routed by `routed`, named now.
pub fn fresh_reply(routed: &Route, completion: crate::domain::Completion) -> Reply {
    Reply {
        id: uuid::Uuid::new_v4(),
        created: crate::chat::stream::unix_now(),
        provider: routed.provider,
        model: routed.model.clone(),
        completion,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;
    use std::hash::BuildHasher;

    use sha2::{Digest, Sha256};

    use super::*;

    #[test]
    fn cache_keys_spread_over_the_in_flight_maps_buckets() {
        let build = BuildHasherDefault::<CacheKeyHasher>::default();
        let hashes: Vec<u64> = (0u32..10_000)
            .map(|i| {
                let key = format!("cache:{}", hex::encode(Sha256::digest(i.to_le_bytes())));
                build.hash_one(key)
            })
            .collect();
        assert_eq!(hashes.iter().collect::<HashSet<_>>().len(), hashes.len());
        // The map picks buckets by the low bits and tags entries with the top seven.
        let low: HashSet<u64> = hashes.iter().map(|h| h & 0xff).collect();
        let top: HashSet<u64> = hashes.iter().map(|h| h >> 57).collect();
        assert_eq!((low.len(), top.len()), (256, 128));
    }
}
