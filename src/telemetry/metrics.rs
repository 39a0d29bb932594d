//! The one Prometheus registry and every metric handle. Labels come from closed sets only.

use std::borrow::Cow;
use std::sync::Arc;

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Provider label values: the closed set of providers plus `none` (answered before one).
pub const PROVIDER_LABELS: [&str; 3] = ["gemini", "ollama", "none"];

/// Provider label values of the per-provider call metrics.
const PROVIDERS: [&str; 2] = ["gemini", "ollama"];

/// A metric with one label whose values come from a closed set. Every value's series is
/// made up front (so dashboards show zeros rather than gaps) and found again by a short
/// scan: `with_label_values` hashes the value and takes a read lock on every call, and
/// the request path records five such series per miss.
#[derive(Clone)]
pub struct Labelled<M: Clone> {
    series: Arc<[(&'static str, M)]>,
    /// The metric's `with_label_values`, for a value outside the set.
    make: Arc<dyn Fn(&str) -> M + Send + Sync>,
}

impl<M: Clone> Labelled<M> {
    fn new(values: &[&'static str], make: impl Fn(&str) -> M + Send + Sync + 'static) -> Self {
        let series = values.iter().map(|value| (*value, make(value))).collect();
        Labelled {
            series,
            make: Arc::new(make),
        }
    }

    /// The series for `value` (made on first use if it is outside the closed set).
    pub fn get(&self, value: &str) -> Cow<'_, M> {
        match self.series.iter().find(|(known, _)| *known == value) {
            Some((_, series)) => Cow::Borrowed(series),
            None => Cow::Owned((self.make)(value)),
        }
    }
}

/// Every metric the gateway exports, behind one `Arc`: cloning it (each request's layers
/// take it from the state) is one atomic increment, not one per metric handle.
#[derive(Clone)]
pub struct Metrics(Arc<MetricSet>);

impl std::ops::Deref for Metrics {
    type Target = MetricSet;

    fn deref(&self) -> &MetricSet {
        &self.0
    }
}

/// The metric handles of [`Metrics`].
pub struct MetricSet {
    registry: Registry,
    /// Requests admitted by the limiter (orig).
    pub rate_limit_allowed: IntCounter,
    /// Requests refused by the limiter (orig).
    pub rate_limit_blocked: IntCounter,
    /// Cache hits (orig).
    pub cache_hits: IntCounter,
    /// Cache misses (orig).
    pub cache_misses: IntCounter,
    /// Cache reads or writes that failed and were treated as misses.
    pub cache_errors: IntCounter,
    /// Provider attempts by provider (orig).
    pub provider_calls: Labelled<IntCounter>,
    /// Provider attempts that failed, by provider (orig).
    pub provider_failures: Labelled<IntCounter>,
    /// Chat requests by status class.
    pub chat_requests: Labelled<IntCounter>,
    /// Requests being served right now.
    pub active_requests: IntGauge,
    /// End-to-end latency of chat requests, by provider.
    pub request_latency: Labelled<Histogram>,
    /// Latency of one provider attempt, by provider.
    pub provider_latency: Labelled<Histogram>,
    /// Time from the first attempt of a streamed call to its first event, by provider.
    pub time_to_first_token: Labelled<Histogram>,
    /// A chat request's latency minus the time it waited for upstreams: what the gateway
    /// itself adds.
    pub gateway_overhead: Histogram,
    /// Tokens the providers processed, by provider: prompt tokens.
    pub prompt_tokens: Labelled<IntCounter>,
    /// Tokens the providers processed, by provider: completion tokens.
    pub completion_tokens: Labelled<IntCounter>,
    /// Limiter calls to Redis that failed, by kind (`error`, `timeout`, `unavailable`).
    pub limiter_redis_errors: Labelled<IntCounter>,
    /// Times the limiter script was loaded again after NOSCRIPT.
    pub limiter_script_reloads: IntCounter,
    /// Decisions made by the failure policy instead of Redis, by mode.
    pub limiter_fallback_decisions: Labelled<IntCounter>,
    /// Latency of one limiter decision, including any fallback.
    pub limiter_call_latency: Histogram,
    /// 1 when the limiter's last store call succeeded, 0 while it fails.
    pub limiter_backend_state: IntGaugeVec,
    /// Breaker state: 0 closed, 1 open, 2 half-open.
    pub limiter_breaker_state: IntGauge,
    /// Denials answered by the local deny cache without a Redis call.
    pub limiter_local_denials: IntCounter,
    /// Requests refused by the limiter, by the limit that refused them.
    pub rate_limit_denials: Labelled<IntCounter>,
    /// Token reservations that could not be settled after every retry.
    pub limiter_reconcile_failures: IntCounter,
    /// Token reservations made here and not yet settled in their store: answers still
    /// running, and settlements waiting to be applied.
    pub limiter_reservations_unsettled: IntGauge,
    /// Requests moved on from a provider to the route's next target, by the provider
    /// that failed them.
    pub provider_fallbacks: Labelled<IntCounter>,
    /// Each provider's circuit breaker: 0 closed, 1 open, 2 half-open.
    pub provider_breaker_state: IntGaugeVec,
}

fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).unwrap_or_else(|e| panic_metric(name, e));
    register(registry, name, Box::new(c.clone()));
    c
}

fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).unwrap_or_else(|e| panic_metric(name, e));
    register(registry, name, Box::new(g.clone()));
    g
}

fn counter_vec(
    registry: &Registry,
    name: &str,
    help: &str,
    label: &str,
    values: &[&'static str],
) -> Labelled<IntCounter> {
    let c = IntCounterVec::new(Opts::new(name, help), &[label])
        .unwrap_or_else(|e| panic_metric(name, e));
    register(registry, name, Box::new(c.clone()));
    Labelled::new(values, move |value| c.with_label_values(&[value]))
}

/// `tokens_total{provider,kind}`: the prompt and the completion series of each provider.
fn token_counters(registry: &Registry) -> (Labelled<IntCounter>, Labelled<IntCounter>) {
    let name = "tokens_total";
    let c = IntCounterVec::new(
        Opts::new(
            name,
            "Tokens processed by LLM providers, by provider and kind (prompt, completion)",
        ),
        &["provider", "kind"],
    )
    .unwrap_or_else(|e| panic_metric(name, e));
    register(registry, name, Box::new(c.clone()));
    let kind = |kind: &'static str| {
        let c = c.clone();
        Labelled::new(&PROVIDERS, move |provider| {
            c.with_label_values(&[provider, kind])
        })
    };
    (kind("prompt"), kind("completion"))
}

fn histogram_vec(
    registry: &Registry,
    name: &str,
    help: &str,
    values: &[&'static str],
) -> Labelled<Histogram> {
    let h = HistogramVec::new(
        HistogramOpts::new(name, help).buckets(REQUEST_BUCKETS.to_vec()),
        &["provider"],
    )
    .unwrap_or_else(|e| panic_metric(name, e));
    register(registry, name, Box::new(h.clone()));
    Labelled::new(values, move |value| h.with_label_values(&[value]))
}

fn register(registry: &Registry, name: &str, collector: Box<dyn prometheus::core::Collector>) {
    registry
        .register(collector)
        .unwrap_or_else(|e| panic_metric(name, e));
}

/// Metric definitions are static; a failure here is a programming error caught by tests.
#[allow(clippy::panic)]
fn panic_metric(name: &str, e: prometheus::Error) -> ! {
    panic!("metric {name} is malformed: {e}")
}

const REQUEST_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];
/// The gateway's own time is tens of microseconds on a miss, a Redis round trip or two.
const OVERHEAD_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];
const LIMITER_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];

impl Metrics {
    /// Creates the registry and every metric, with the series of every closed-set label
    /// value made up front.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let r = &registry;
        let tokens = token_counters(r);
        Metrics(Arc::new(MetricSet {
            rate_limit_allowed: counter(
                r,
                "rate_limit_allowed_total",
                "Total number of requests allowed by rate limiter",
            ),
            rate_limit_blocked: counter(
                r,
                "rate_limit_blocked_total",
                "Total number of requests blocked by rate limiter",
            ),
            cache_hits: counter(r, "cache_hits_total", "Total number of cache hits"),
            cache_misses: counter(r, "cache_misses_total", "Total number of cache misses"),
            cache_errors: counter(
                r,
                "cache_errors_total",
                "Cache reads and writes that failed and were treated as misses",
            ),
            provider_calls: counter_vec(
                r,
                "provider_calls_total",
                "Total number of calls to LLM providers",
                "provider",
                &PROVIDERS,
            ),
            provider_failures: counter_vec(
                r,
                "provider_failures_total",
                "Total number of failed calls to LLM providers",
                "provider",
                &PROVIDERS,
            ),
            chat_requests: counter_vec(
                r,
                "chat_requests_total",
                "Total number of chat requests, by status class",
                "status",
                &STATUS_CLASSES,
            ),
            active_requests: gauge(r, "active_requests", "Number of requests being served"),
            request_latency: histogram_vec(
                r,
                "request_latency_seconds",
                "End-to-end latency of chat requests in seconds, by provider",
                &PROVIDER_LABELS,
            ),
            provider_latency: histogram_vec(
                r,
                "provider_latency_seconds",
                "Latency of one provider attempt in seconds, by provider",
                &PROVIDERS,
            ),
            time_to_first_token: histogram_vec(
                r,
                "time_to_first_token_seconds",
                "Time from a streamed call's start to its first event in seconds, by provider",
                &PROVIDERS,
            ),
            gateway_overhead: {
                let name = "gateway_overhead_seconds";
                let h = Histogram::with_opts(
                    HistogramOpts::new(
                        name,
                        "A chat request's latency minus the time it waited for upstreams, in seconds",
                    )
                    .buckets(OVERHEAD_BUCKETS.to_vec()),
                )
                .unwrap_or_else(|e| panic_metric(name, e));
                register(r, name, Box::new(h.clone()));
                h
            },
            prompt_tokens: tokens.0,
            completion_tokens: tokens.1,
            limiter_redis_errors: counter_vec(
                r,
                "rate_limiter_redis_errors_total",
                "Limiter calls to Redis that failed, by kind",
                "kind",
                &["error", "timeout", "unavailable"],
            ),
            limiter_script_reloads: counter(
                r,
                "rate_limiter_script_reloads_total",
                "Times the limiter script was loaded again after NOSCRIPT",
            ),
            limiter_fallback_decisions: counter_vec(
                r,
                "rate_limiter_fallback_decisions_total",
                "Limiter decisions made by the failure policy instead of Redis, by mode",
                "mode",
                &["local", "open", "closed"],
            ),
            limiter_call_latency: {
                let h = Histogram::with_opts(
                    HistogramOpts::new(
                        "rate_limiter_call_duration_seconds",
                        "Latency of one rate limiter decision in seconds",
                    )
                    .buckets(LIMITER_BUCKETS.to_vec()),
                )
                .unwrap_or_else(|e| panic_metric("rate_limiter_call_duration_seconds", e));
                register(r, "rate_limiter_call_duration_seconds", Box::new(h.clone()));
                h
            },
            limiter_backend_state: {
                let g = IntGaugeVec::new(
                    Opts::new(
                        "rate_limiter_backend_up",
                        "1 when the limiter's last Redis call succeeded, 0 while it fails",
                    ),
                    &["backend"],
                )
                .unwrap_or_else(|e| panic_metric("rate_limiter_backend_up", e));
                register(r, "rate_limiter_backend_up", Box::new(g.clone()));
                g
            },
            provider_fallbacks: counter_vec(
                r,
                "provider_fallbacks_total",
                "Requests moved on from a provider to the next target of their route, by provider",
                "provider",
                &PROVIDERS,
            ),
            provider_breaker_state: {
                let g = IntGaugeVec::new(
                    Opts::new(
                        "provider_breaker_state",
                        "Provider circuit breaker: 0 closed, 1 open, 2 half-open",
                    ),
                    &["provider"],
                )
                .unwrap_or_else(|e| panic_metric("provider_breaker_state", e));
                register(r, "provider_breaker_state", Box::new(g.clone()));
                g
            },
            limiter_breaker_state: gauge(
                r,
                "rate_limiter_breaker_state",
                "Rate limiter circuit breaker: 0 closed, 1 open, 2 half-open",
            ),
            limiter_local_denials: counter(
                r,
                "rate_limiter_local_denials_total",
                "Denials answered by the local deny cache without a Redis call",
            ),
            rate_limit_denials: counter_vec(
                r,
                "rate_limit_denials_total",
                "Requests blocked by the rate limiter, by reason (requests, tokens, too_large, budget)",
                "reason",
                &["requests", "tokens", "too_large", "budget"],
            ),
            limiter_reconcile_failures: counter(
                r,
                "rate_limiter_reconcile_failures_total",
                "Token reservations that could not be settled to their real usage after every retry",
            ),
            limiter_reservations_unsettled: gauge(
                r,
                "rate_limiter_reservations_unsettled",
                "Token reservations made by this instance and not yet settled in their store (answers under way, settlements waiting)",
            ),
            registry,
        }))
    }

    /// The registry in Prometheus text format 0.0.4.
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metrics.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buffer);
        String::from_utf8_lossy(&buffer).into_owned()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// Status class label values.
pub const STATUS_CLASSES: [&str; 3] = ["2xx", "4xx", "5xx"];

/// The closed-set label for an HTTP status.
pub fn status_class(status: u16) -> &'static str {
    match status {
        0..=399 => "2xx",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labelled_series_are_shared_and_values_outside_the_set_still_count() {
        let m = Metrics::new();
        m.chat_requests.get("2xx").inc();
        m.chat_requests.get(status_class(204)).inc();
        m.limiter_redis_errors.get("surprise").inc();
        let text = m.render();
        assert!(
            text.contains("chat_requests_total{status=\"2xx\"} 2"),
            "{text}"
        );
        assert!(text.contains("chat_requests_total{status=\"5xx\"} 0"));
        assert!(text.contains("rate_limiter_redis_errors_total{kind=\"surprise\"} 1"));
    }

    #[test]
    fn original_metric_names_and_help_texts_are_exported() {
        let m = Metrics::new();
        m.rate_limit_allowed.inc();
        let text = m.render();
        assert!(text.contains(
            "# HELP rate_limit_allowed_total Total number of requests allowed by rate limiter"
        ));
        assert!(text.contains(
            "# HELP rate_limit_blocked_total Total number of requests blocked by rate limiter"
        ));
        assert!(text.contains("rate_limit_allowed_total 1"));
        for name in [
            "cache_hits_total",
            "cache_misses_total",
            "provider_calls_total{provider=\"gemini\"}",
            "provider_failures_total{provider=\"ollama\"}",
            "chat_requests_total",
            "active_requests",
            "request_latency_seconds_bucket",
            "provider_latency_seconds_bucket",
            "rate_limiter_call_duration_seconds_bucket",
        ] {
            assert!(text.contains(name), "{name} missing");
        }
    }
}
