//! `AppState`: every collaborator, built once from settings, and the parts handlers and
//! middleware take from it (`FromRef`), so each takes only what it uses.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::FromRef;
use tokio::sync::Semaphore;

use crate::api::auth::{AuthConfig, Keys};
use crate::api::observe::Observer;
use crate::api::original::chat::MaxBodyBytes;
use crate::api::sse::KeepAliveEvery;
use crate::cache::{memory::MemoryCache, redis::RedisCache, Cache};
use crate::chat::registry::Registry;
use crate::chat::service::{ChatConfig, ChatService};
use crate::providers::UpstreamClient;
use crate::ratelimit::{
    memory::MemoryLimiter, redis::RedisLimiter, LimiterBackend, LimiterConfig, RateLimiter,
};
use crate::serve::redis::RedisConn;
use crate::serve::workers;
use crate::settings::{Settings, SettingsError};
use crate::telemetry::metrics::Metrics;
use crate::telemetry::traces::Traces;

/// Everything the router needs. One `Arc`, so a clone is a single atomic increment.
#[derive(Clone)]
pub struct AppState(Arc<Parts>);

struct Parts {
    settings: Arc<Settings>,
    keys: Keys,
    chat: Arc<ChatService>,
    chat_slots: ChatSlots,
    metrics: Metrics,
    workers: usize,
    /// The upstream connection pools, shared by the providers of every registry.
    client: UpstreamClient,
    /// The tracer, when traces are exported.
    traces: Option<Traces>,
}

/// Permits for chat requests in flight (`MAX_CONCURRENT_REQUESTS`).
#[derive(Clone)]
pub struct ChatSlots(pub Arc<Semaphore>);

impl FromRef<AppState> for Keys {
    fn from_ref(state: &AppState) -> Keys {
        state.0.keys.clone()
    }
}

impl FromRef<AppState> for Arc<ChatService> {
    fn from_ref(state: &AppState) -> Arc<ChatService> {
        state.0.chat.clone()
    }
}

impl FromRef<AppState> for ChatSlots {
    fn from_ref(state: &AppState) -> ChatSlots {
        state.0.chat_slots.clone()
    }
}

impl FromRef<AppState> for Metrics {
    fn from_ref(state: &AppState) -> Metrics {
        state.0.metrics.clone()
    }
}

impl FromRef<AppState> for Observer {
    fn from_ref(state: &AppState) -> Observer {
        Observer {
            metrics: state.0.metrics.clone(),
            traces: state.0.traces.clone(),
        }
    }
}

impl FromRef<AppState> for KeepAliveEvery {
    fn from_ref(state: &AppState) -> KeepAliveEvery {
        KeepAliveEvery(Duration::from_secs_f64(
            state.0.settings.stream_keep_alive_seconds,
        ))
    }
}

impl FromRef<AppState> for MaxBodyBytes {
    fn from_ref(state: &AppState) -> MaxBodyBytes {
        MaxBodyBytes(state.0.settings.max_body_bytes)
    }
}

/// Cached bodies the in-process cache holds at most.
const MEMORY_CACHE_ENTRIES: usize = 10_000;

/// An error while assembling the app; its `Display` is one line for the operator.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    /// A setting could not be applied.
    #[error("{0}")]
    Settings(String),
    /// The Redis URL could not be turned into a client.
    #[error("REDIS_URL: {0}")]
    Redis(String),
    /// The HTTP client could not be built.
    #[error("HTTP client: {0}")]
    Http(String),
    /// The listener could not bind.
    #[error("cannot listen on {addr}: {error}")]
    Bind {
        /// The address.
        addr: String,
        /// Why.
        error: std::io::Error,
    },
}

impl AppState {
    /// Builds every collaborator from settings. Does not contact Redis: connections are
    /// lazy, so the gateway starts (and limits under its failure policy) while Redis is down.
    pub fn new(settings: Settings) -> Result<AppState, StartupError> {
        let metrics = Metrics::new();
        let workers = workers::count(settings.worker_threads);
        let store = settings
            .store_url()
            .map_err(|e| StartupError::Redis(e.to_string()))?;
        let conn = RedisConn::open(&store, settings.redis_timeout(), workers)
            .map_err(|e| StartupError::Redis(e.to_string()))?;
        let (backend, cache): (Arc<dyn LimiterBackend>, Arc<dyn Cache>) = match &conn {
            Some(conn) => (
                Arc::new(RedisLimiter::new(conn.clone(), metrics.clone())),
                Arc::new(RedisCache::new(conn.clone(), settings.redis_timeout())),
            ),
            None => (
                Arc::new(MemoryLimiter::new()),
                Arc::new(MemoryCache::new(MEMORY_CACHE_ENTRIES)),
            ),
        };
        let limiter = RateLimiter::new(
            backend,
            conn.is_some(),
            LimiterConfig {
                mode: settings.rate_limiter_failure_mode,
                timeout: settings.redis_timeout(),
                breaker_threshold: settings.rate_limiter_breaker_threshold,
                breaker_cooldown: Duration::from_millis(settings.rate_limiter_breaker_cooldown_ms),
            },
            metrics.clone(),
        );

        let connect_timeout = Duration::from_secs(10).min(settings.provider_timeout());
        let client = UpstreamClient::new(connect_timeout, workers).map_err(StartupError::Http)?;
        let registry = Registry::from_settings(&settings, &client).map_err(StartupError::Http)?;
        let upstreams = client.clone();
        let chat = ChatService::new(
            Arc::new(limiter),
            cache,
            registry,
            ChatConfig {
                cache_ttl: Duration::from_secs(settings.cache_ttl_seconds),
                deadline: settings.provider_deadline(),
            },
            metrics.clone(),
        );
        let auth = AuthConfig::from_settings(&settings)
            .map_err(|e| StartupError::Settings(e.to_string()))?;
        let traces = Traces::from_settings(&settings).map_err(StartupError::Settings)?;
        Ok(AppState(Arc::new(Parts {
            keys: Keys::new(auth),
            chat_slots: ChatSlots(Arc::new(Semaphore::new(settings.max_concurrent_requests))),
            chat: Arc::new(chat),
            metrics,
            settings: Arc::new(settings),
            workers,
            client: upstreams,
            traces,
        })))
    }

    /// Applies the reloadable part of `settings` (API_KEYS, tiers, anonymous access, the
    /// provider registry with its keys) to the running gateway: all of it or, when any
    /// part is refused, none. Requests in flight keep the configuration they started with.
    pub fn reload(&self, settings: &Settings) -> Result<(), SettingsError> {
        let auth = AuthConfig::from_settings(settings)?;
        let registry =
            Registry::from_settings(settings, &self.0.client).map_err(SettingsError::registry)?;
        self.0.chat.replace_registry(registry);
        self.0.keys.replace(auth);
        self.0.chat.limiter().policies_changed();
        Ok(())
    }

    /// The validated settings the state was built from.
    pub fn settings(&self) -> &Settings {
        &self.0.settings
    }

    /// The tracer, when traces are exported (flushed at exit).
    pub fn traces(&self) -> Option<&Traces> {
        self.0.traces.as_ref()
    }

    /// The metrics (tests read them through it).
    pub fn metrics(&self) -> &Metrics {
        &self.0.metrics
    }

    /// Worker threads serving connections; the per-worker Redis connections, upstream
    /// pools and deferred-write queues are made for this many.
    pub fn workers(&self) -> usize {
        self.0.workers
    }
}
