//! The provider registry at run time: each configured provider with its retry policy,
//! requests in flight and circuit breaker, and the routes from a model name to priority
//! groups of weighted targets. Without a registry in the configuration, the original's
//! settings build the default one (Ollama and Gemini, routed by the original's words).
//!
//! A request's plan is its targets in the order to try them: priority groups in order,
//! and within a group, repeatedly, the target with the fewest requests in flight per
//! unit of weight, ties drawn at random by weight (so an idle route splits by weight
//! and a slow target, holding its requests longer, gets fewer new ones).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::routing::{self, ProviderKind};
use crate::domain::ChatRequest;
use crate::providers::{
    from_config, gemini::Gemini, ollama::Ollama, Endpoint, Provider, RetryPolicy, UpstreamClient,
};
use crate::ratelimit::breaker::{Admission, Breaker, BreakerState};
use crate::settings::Settings;
use crate::telemetry::metrics::Metrics;

/// One provider at run time.
pub struct Upstream {
    /// The API client.
    pub provider: Arc<dyn Provider>,
    /// Its attempts' timeout and retries.
    pub retry: RetryPolicy,
    in_flight: AtomicUsize,
    /// `None` for the default registry: with one target per route there is nothing to
    /// fail over to, so failing fast would only turn retries into errors.
    breaker: Option<Breaker>,
}

/// A request to an upstream under way; counts it in flight until dropped.
pub struct InFlight(Arc<Upstream>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Whether an upstream may be called now, and how.
pub enum Turn {
    /// Call it; `probe` when this call is its breaker's half-open probe.
    Call {
        /// Counts the call in flight.
        guard: InFlight,
        /// The half-open probe.
        probe: bool,
    },
    /// Its breaker is open: skip it.
    Skip,
}

impl Upstream {
    /// The provider's name.
    pub fn name(&self) -> &'static str {
        self.provider.name()
    }

    /// Asks the breaker; a call is counted in flight.
    pub fn turn(self: &Arc<Self>) -> Turn {
        let probe = match self.breaker.as_ref().map(Breaker::admit) {
            None | Some(Admission::Call) => false,
            Some(Admission::Probe) => true,
            Some(Admission::Skip) => return Turn::Skip,
        };
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        Turn::Call {
            guard: InFlight(self.clone()),
            probe,
        }
    }

    /// Records a call that answered.
    pub fn succeeded(&self, metrics: &Metrics) {
        if let Some(breaker) = &self.breaker {
            if breaker.on_success() {
                tracing::info!(provider = self.name(), "provider breaker closed");
            }
            self.export(metrics);
        }
    }

    /// Records a call that failed in a way another target might not (`retry_after`: the
    /// upstream's own wait, which holds the breaker open at least that long).
    pub fn failed(&self, probe: bool, retry_after: Option<Duration>, metrics: &Metrics) {
        if let Some(breaker) = &self.breaker {
            if breaker.on_failure(probe) {
                tracing::warn!(provider = self.name(), "provider breaker opened");
            }
            if let Some(wait) = retry_after {
                breaker.hold_for(wait);
            }
            self.export(metrics);
        }
    }

    fn export(&self, metrics: &Metrics) {
        if let Some(breaker) = &self.breaker {
            let state = match breaker.state() {
                BreakerState::Closed => 0,
                BreakerState::Open => 1,
                BreakerState::HalfOpen => 2,
            };
            metrics
                .provider_breaker_state
                .with_label_values(&[self.name()])
                .set(state);
        }
    }

    fn load(&self, weight: u32) -> f64 {
        self.in_flight.load(Ordering::Acquire) as f64 / f64::from(weight)
    }
}

/// One target of a route.
#[derive(Clone)]
struct Target {
    upstream: Arc<Upstream>,
    model: String,
    weight: u32,
}

/// The targets of a route, by priority group.
struct RouteTable {
    groups: Vec<Vec<Target>>,
}

/// The targets to try for one request, in order.
pub struct Plan {
    /// `(upstream, model)` pairs, first choice first.
    pub targets: Vec<(Arc<Upstream>, String)>,
}

/// How model names are routed.
enum Routes {
    /// The original's words and defaults, to Ollama and Gemini.
    Default {
        ollama: Arc<Upstream>,
        gemini: Arc<Upstream>,
        ollama_model: String,
        gemini_model: String,
    },
    /// The configured routes, by name and alias.
    Configured {
        routes: HashMap<String, Arc<RouteTable>>,
        /// Names to list, with the provider of each one's first target.
        listed: Vec<(String, &'static str)>,
    },
}

/// The providers and routes in force.
pub struct Registry {
    upstreams: Vec<Arc<Upstream>>,
    routes: Routes,
}

/// The route that takes the original door's requests naming no route.
const DEFAULT_ROUTE: &str = "default";

impl Registry {
    /// The registry `settings` describe: the `GATEWAY_CONFIG` file's, or the default
    /// one. Every provider shares `client` (one connection pool).
    pub fn from_settings(settings: &Settings, client: &UpstreamClient) -> Result<Registry, String> {
        let defaults = RetryPolicy {
            attempt_timeout: settings.provider_timeout(),
            max_retries: settings.provider_max_retries,
            base_delay: Duration::from_millis(settings.provider_retry_base_ms),
            max_delay: Duration::from_millis(settings.provider_retry_max_ms),
        };
        let Some(config) = &settings.registry else {
            let upstream = |provider: Arc<dyn Provider>| {
                Arc::new(Upstream {
                    provider,
                    retry: defaults.clone(),
                    in_flight: AtomicUsize::new(0),
                    breaker: None,
                })
            };
            let ollama = upstream(Arc::new(Ollama::new(
                client.clone(),
                &settings.ollama_base_url,
                Endpoint::new("ollama", &[], None)?,
            )?));
            let gemini = upstream(Arc::new(Gemini::new(
                client.clone(),
                &settings.gemini_base_url,
                &settings.gemini_api_key,
                Endpoint::new("gemini", &[], None)?,
            )?));
            return Ok(Registry {
                upstreams: vec![gemini.clone(), ollama.clone()],
                routes: Routes::Default {
                    ollama,
                    gemini,
                    ollama_model: settings.ollama_model.clone(),
                    gemini_model: settings.gemini_model.clone(),
                },
            });
        };
        let breaker = || {
            Breaker::new(
                settings.provider_breaker_threshold,
                Duration::from_secs_f64(settings.provider_breaker_cooldown_seconds),
            )
        };
        let mut upstreams: HashMap<&str, Arc<Upstream>> = HashMap::new();
        for provider in &config.providers {
            let retry = RetryPolicy {
                attempt_timeout: provider
                    .timeout_seconds
                    .map_or(defaults.attempt_timeout, Duration::from_secs_f64),
                max_retries: provider.max_retries.unwrap_or(defaults.max_retries),
                ..defaults.clone()
            };
            upstreams.insert(
                &provider.name,
                Arc::new(Upstream {
                    provider: from_config(provider, client.clone())?,
                    retry,
                    in_flight: AtomicUsize::new(0),
                    breaker: Some(breaker()),
                }),
            );
        }
        let mut routes = HashMap::new();
        let mut listed = Vec::new();
        for route in &config.routes {
            let mut priorities: Vec<u32> = route.targets.iter().map(|t| t.priority).collect();
            priorities.sort_unstable();
            priorities.dedup();
            let groups = priorities
                .iter()
                .map(|priority| {
                    route
                        .targets
                        .iter()
                        .filter(|t| t.priority == *priority)
                        .map(|t| Target {
                            // Validated when the file was read: every target's provider exists.
                            upstream: upstreams[t.provider.as_str()].clone(),
                            model: t.model.clone(),
                            weight: t.weight,
                        })
                        .collect()
                })
                .collect::<Vec<Vec<Target>>>();
            let owner = groups[0][0].upstream.name();
            let table = Arc::new(RouteTable { groups });
            for name in std::iter::once(&route.name).chain(&route.aliases) {
                routes.insert(name.clone(), table.clone());
                listed.push((name.clone(), owner));
            }
        }
        let mut upstreams: Vec<Arc<Upstream>> = upstreams.into_values().collect();
        upstreams.sort_by_key(|u| u.name());
        Ok(Registry {
            upstreams,
            routes: Routes::Configured { routes, listed },
        })
    }

    /// The targets to try for `request`, or `None` when it names no route (an SDK door
    /// names its model; the original door's `model or model_hint` falls back to the
    /// route `default`, when there is one).
    pub fn plan(&self, request: &ChatRequest) -> Option<Plan> {
        match &self.routes {
            Routes::Default {
                ollama,
                gemini,
                ollama_model,
                gemini_model,
            } => {
                let route = routing::route(request, gemini_model, ollama_model);
                let upstream = match route.provider {
                    ProviderKind::Gemini => gemini.clone(),
                    ProviderKind::Ollama => ollama.clone(),
                };
                Some(Plan {
                    targets: vec![(upstream, route.model)],
                })
            }
            Routes::Configured { routes, .. } => {
                let name = routing::named_model(request).unwrap_or_default();
                let table = routes.get(name).or_else(|| {
                    (!request.strict_model)
                        .then(|| routes.get(DEFAULT_ROUTE))
                        .flatten()
                })?;
                Some(Plan {
                    targets: table.groups.iter().flat_map(|g| order(g)).collect(),
                })
            }
        }
    }

    /// The model names clients can pick, each with the provider it goes to first.
    pub fn models(&self) -> Vec<(String, &'static str)> {
        match &self.routes {
            Routes::Default {
                ollama_model,
                gemini_model,
                ..
            } => routing::listed_models(gemini_model, ollama_model)
                .into_iter()
                .map(|(name, kind)| (name, kind.as_str()))
                .collect(),
            Routes::Configured { listed, .. } => listed.clone(),
        }
    }

    /// Whether `name` is a model clients can pick: every name under the default
    /// registry (it routes any name), a route or alias under a configured one.
    pub fn knows(&self, name: &str) -> bool {
        match &self.routes {
            Routes::Default { .. } => true,
            Routes::Configured { routes, .. } => routes.contains_key(name),
        }
    }

    /// The providers, by name.
    pub fn upstreams(&self) -> &[Arc<Upstream>] {
        &self.upstreams
    }

    /// Shows every provider's breaker state in the metrics (so a dashboard has a series
    /// for each from the start, and a reload's new breakers replace the old states).
    pub fn export(&self, metrics: &Metrics) {
        for upstream in &self.upstreams {
            upstream.export(metrics);
        }
    }
}

/// A group's targets in the order to try them (see the module's comment).
fn order(group: &[Target]) -> Vec<(Arc<Upstream>, String)> {
    let mut rest: Vec<&Target> = group.iter().collect();
    let mut ordered = Vec::with_capacity(rest.len());
    while !rest.is_empty() {
        // One reading of the loads: other requests change them meanwhile, and a second
        // reading could find no target as light as the first found (a panic, seen under
        // 64 connections before this snapshot).
        let loads: Vec<f64> = rest.iter().map(|t| t.upstream.load(t.weight)).collect();
        let least = loads.iter().copied().fold(f64::INFINITY, f64::min);
        let tied: Vec<usize> = (0..rest.len()).filter(|&i| loads[i] <= least).collect();
        let total: u64 = tied.iter().map(|&i| u64::from(rest[i].weight)).sum();
        let mut draw = rand::random_range(0..total.max(1));
        let mut chosen = tied[0];
        for &i in &tied {
            let weight = u64::from(rest[i].weight);
            if draw < weight {
                chosen = i;
                break;
            }
            draw -= weight;
        }
        let target = rest.remove(chosen);
        ordered.push((target.upstream.clone(), target.model.clone()));
    }
    ordered
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{ChatRequest, Completion};
    use crate::providers::{EventStream, ProviderError};

    struct Named(&'static str);

    #[async_trait::async_trait]
    impl Provider for Named {
        fn name(&self) -> &'static str {
            self.0
        }
        fn kind(&self) -> &'static str {
            "test"
        }
        async fn complete(&self, _: &ChatRequest, _: &str) -> Result<Completion, ProviderError> {
            Err(ProviderError::Connect)
        }
        async fn stream(&self, _: &ChatRequest, _: &str) -> Result<EventStream, ProviderError> {
            Err(ProviderError::Connect)
        }
    }

    fn target(name: &'static str, weight: u32) -> Target {
        Target {
            upstream: Arc::new(Upstream {
                provider: Arc::new(Named(name)),
                retry: RetryPolicy {
                    attempt_timeout: Duration::from_secs(1),
                    max_retries: 0,
                    base_delay: Duration::from_millis(1),
                    max_delay: Duration::from_millis(1),
                },
                in_flight: AtomicUsize::new(0),
                breaker: None,
            }),
            model: name.into(),
            weight,
        }
    }

    #[test]
    fn the_least_loaded_per_weight_goes_first_and_every_target_is_tried() {
        let group = vec![target("a", 1), target("b", 2), target("c", 1)];
        group[0].upstream.in_flight.store(1, Ordering::Relaxed);
        group[1].upstream.in_flight.store(1, Ordering::Relaxed);
        for _ in 0..50 {
            let order: Vec<&str> = order(&group).iter().map(|(u, _)| u.name()).collect();
            assert_eq!(order[0], "c", "no request in flight");
            assert_eq!(
                order[1], "b",
                "one in flight over weight 2 is lighter than one over 1"
            );
            assert_eq!(order.len(), 3);
        }
    }

    #[test]
    fn loads_changing_while_a_plan_is_made_never_break_it() {
        let group = Arc::new(vec![target("a", 1), target("b", 3), target("c", 2)]);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let churn = {
            let (group, stop) = (group.clone(), stop.clone());
            std::thread::spawn(move || {
                let mut i = 0usize;
                while !stop.load(Ordering::Relaxed) {
                    let upstream = &group[i % 3].upstream;
                    upstream.in_flight.fetch_add(1, Ordering::AcqRel);
                    upstream.in_flight.fetch_sub(1, Ordering::AcqRel);
                    i += 1;
                }
            })
        };
        for _ in 0..20_000 {
            assert_eq!(order(&group).len(), 3);
        }
        stop.store(true, Ordering::Relaxed);
        churn.join().unwrap();
    }
}
