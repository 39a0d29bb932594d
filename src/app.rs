//! Application assembly: `AppState`, `build_router`, and `App` (bind, serve, drain).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use axum::extract::{DefaultBodyLimit, State};
use axum::middleware::from_fn_with_state;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::Router;
use tokio::net::TcpListener;

use crate::api;
use crate::auth::{require_api_key, AuthConfig};
use crate::cache::{memory::MemoryCache, pending::PendingStores, redis::RedisCache, Cache};
use crate::chat::service::{ChatConfig, ChatService, Providers};
use crate::error::ApiError;
use crate::metrics::Metrics;
use crate::providers::{gemini::Gemini, ollama::Ollama, RetryPolicy, UpstreamClient};
use crate::ratelimit::{
    memory::MemoryLimiter, redis::RedisLimiter, LimiterBackend, LimiterConfig, RateLimiter,
};
use crate::redis_conn::RedisConn;
use crate::server::{self, ServerLimits};
use crate::settings::{Settings, SettingsError};
use crate::telemetry;
use crate::workers;

/// Everything a handler needs. One `Arc`, so the clone each middleware layer makes is a
/// single atomic increment (cloning every metric handle showed up in profiles).
#[derive(Clone)]
pub struct AppState(Arc<AppParts>);

impl std::ops::Deref for AppState {
    type Target = AppParts;

    fn deref(&self) -> &AppParts {
        &self.0
    }
}

/// The parts of [`AppState`].
pub struct AppParts {
    /// Validated settings.
    pub settings: Arc<Settings>,
    /// Keys, tiers and anonymous rules; swapped atomically on reload (SIGHUP).
    pub auth: Arc<ArcSwap<AuthConfig>>,
    /// The limiter with its failure policy.
    pub limiter: Arc<RateLimiter>,
    /// The chat use case.
    pub chat: Arc<ChatService>,
    /// Permits for chat requests in flight (`MAX_CONCURRENT_REQUESTS`).
    pub chat_slots: Arc<tokio::sync::Semaphore>,
    /// Metrics registry and handles.
    pub metrics: Metrics,
    /// Worker threads serving connections; the per-worker Redis connections, upstream
    /// pools and cache-write queues are made for this many.
    pub workers: usize,
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
            Some(conn) => {
                // On one node, cache writes ride along with limiter calls; on a cluster
                // they live on other nodes than the buckets.
                let pending = matches!(conn, RedisConn::Single(_))
                    .then(|| Arc::new(PendingStores::new(workers)));
                (
                    Arc::new(RedisLimiter::new(
                        conn.clone(),
                        metrics.clone(),
                        pending.clone(),
                    )),
                    Arc::new(RedisCache::new(
                        conn.clone(),
                        settings.redis_timeout(),
                        pending,
                    )),
                )
            }
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
        let providers = Providers {
            gemini: Arc::new(Gemini::new(
                client.clone(),
                &settings.gemini_base_url,
                settings.gemini_api_key.clone(),
            )),
            ollama: Arc::new(
                Ollama::new(client, &settings.ollama_base_url).map_err(StartupError::Http)?,
            ),
        };
        let chat = ChatService::new(
            cache,
            providers,
            ChatConfig {
                cache_ttl: Duration::from_secs(settings.cache_ttl_seconds),
                retry: RetryPolicy {
                    attempt_timeout: settings.provider_timeout(),
                    max_retries: settings.provider_max_retries,
                    base_delay: Duration::from_millis(settings.provider_retry_base_ms),
                    max_delay: Duration::from_millis(settings.provider_retry_max_ms),
                },
                gemini_model: settings.gemini_model.clone(),
                ollama_model: settings.ollama_model.clone(),
            },
            metrics.clone(),
        );
        let auth = AuthConfig::from_settings(&settings)
            .map_err(|e| StartupError::Settings(e.to_string()))?;
        Ok(AppState(Arc::new(AppParts {
            auth: Arc::new(ArcSwap::from_pointee(auth)),
            chat_slots: Arc::new(tokio::sync::Semaphore::new(
                settings.max_concurrent_requests,
            )),
            limiter: Arc::new(limiter),
            chat: Arc::new(chat),
            metrics,
            settings: Arc::new(settings),
            workers,
        })))
    }

    /// Applies the reloadable part of `settings` (API_KEYS, tiers, anonymous access) to
    /// the running gateway. Requests in flight keep the configuration they started with.
    pub fn reload(&self, settings: &Settings) -> Result<(), SettingsError> {
        let auth = AuthConfig::from_settings(settings)?;
        self.auth.store(Arc::new(auth));
        self.limiter.policies_changed();
        Ok(())
    }
}

/// Listens for SIGHUP now (so a hang-up arriving right after start-up cannot kill the
/// process) and returns the task that reloads keys and tiers on each one. A bad
/// configuration is logged and the running one kept.
#[cfg(unix)]
pub fn reload_on_sighup(state: AppState) -> std::io::Result<impl Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hangups = signal(SignalKind::hangup())?;
    Ok(async move {
        while hangups.recv().await.is_some() {
            match Settings::load().and_then(|settings| state.reload(&settings)) {
                Ok(()) => {
                    tracing::info!("configuration reloaded (API_KEYS, tiers, anonymous access)")
                }
                Err(error) => {
                    tracing::error!(%error, "configuration reload failed; keeping the running configuration")
                }
            }
        }
    })
}

/// The router. Layer order matters and is the order of checks in CONTRACT §2:
/// observe (request id, log, metrics) -> [chat only] auth (401) -> the chat handler,
/// which applies the limiter (429) before answering body errors (413/422).
pub fn build_router(state: AppState) -> Router {
    // `route_layer` on the method router: a wrong method is a plain 405, as in FastAPI,
    // without authentication or a limiter call.
    // Outermost on the chat route: the concurrency cap, so an overloaded gateway answers
    // 503 before spending anything on the request.
    let chat = post(api::chat::chat)
        .route_layer(from_fn_with_state(state.clone(), require_api_key))
        .route_layer(from_fn_with_state(state.clone(), limit_concurrency));
    Router::new()
        .route("/api/v1/chat", chat.clone())
        .route("/v1/chat", chat)
        .route("/api/v1/health", get(api::health::health))
        .route("/health", get(api::health::health))
        .route("/api/v1/ready", get(api::health::ready))
        .route("/ready", get(api::health::ready))
        .route("/api/v1/metrics", get(api::metrics::metrics))
        .route("/metrics", get(api::metrics::metrics))
        .route("/openapi.json", get(api::openapi::openapi))
        .fallback(|| async { ApiError::NotFound.into_response() })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed.into_response() })
        .layer(DefaultBodyLimit::max(state.settings.max_body_bytes))
        .layer(from_fn_with_state(state.clone(), telemetry::observe))
        .with_state(state)
}

/// Middleware: answers 503 at once when `MAX_CONCURRENT_REQUESTS` chat requests are
/// already being served, instead of queueing without bound.
async fn limit_concurrency(
    State(state): State<AppState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    match state.chat_slots.clone().try_acquire_owned() {
        Ok(_slot) => next.run(request).await,
        Err(_) => ApiError::Unavailable(
            "Gateway overloaded: too many requests in flight; try again shortly".into(),
        )
        .into_response(),
    }
}

/// A bound, ready-to-serve gateway.
pub struct App {
    listener: TcpListener,
    state: AppState,
}

impl App {
    /// Builds the state and binds `HOST:PORT` (port 0 picks a free port; see
    /// [`App::local_addr`]).
    pub async fn build(settings: Settings) -> Result<App, StartupError> {
        let addr = format!("{}:{}", settings.host, settings.port);
        let state = AppState::new(settings)?;
        let listener = TcpListener::bind(&addr)
            .await
            .map_err(|error| StartupError::Bind { addr, error })?;
        Ok(App { listener, state })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The shared state (tests read metrics through it).
    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until `shutdown` resolves, then stops accepting, lets requests in flight
    /// finish for at most `SHUTDOWN_GRACE_SECONDS`, and returns.
    pub async fn run_until(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let settings = self.state.settings.clone();
        let limits = ServerLimits {
            max_connections: settings.max_connections,
            header_read_timeout: Duration::from_secs_f64(settings.header_read_timeout_seconds),
            keep_alive_timeout: Duration::from_secs_f64(settings.keep_alive_timeout_seconds),
            max_body_bytes: settings.max_body_bytes,
            body_read_timeout: Duration::from_secs_f64(settings.body_read_timeout_seconds),
            shutdown_grace: settings.shutdown_grace(),
            workers: self.state.workers,
        };
        server::serve(self.listener, build_router(self.state), limits, shutdown).await
    }
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn stop_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut sigterm) => {
                sigterm.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}
