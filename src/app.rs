//! The application: the router (the one route table), the listener, and running until
//! stopped (SIGTERM/Ctrl-C, with SIGHUP reloading keys and tiers). Nothing imports this
//! module but `main.rs` and tests.

use std::future::Future;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, State};
use axum::middleware::from_fn_with_state;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::Router;
use tokio::net::TcpListener;

use crate::api;
use crate::api::anthropic::AnthropicDoor;
use crate::api::auth::{require_key, KeyDoor, OriginalDoor};
use crate::api::openai::OpenAiDoor;
use crate::api::original::ApiError;
use crate::serve::body::BodyWith;
use crate::serve::server::{self, ServerLimits};
use crate::settings::{Settings, SHIPPED_DEFAULT_API_KEY};
use crate::state::{AppState, ChatSlots, StartupError};
use crate::telemetry;

/// How the binary runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// As configured.
    Serve,
    /// As configured, but on the embedded store and with the upstream simulator in
    /// process behind every provider (`--demo`): nothing else needed to try it.
    Demo,
}

/// Runs the gateway the way the binary does: settings, telemetry, start-up warnings,
/// SIGHUP reloads, serving until Ctrl-C or SIGTERM. Blocks; the exit code says how it
/// ended (2 for a configuration the gateway cannot start with).
pub fn run_binary(mode: Mode) -> ExitCode {
    // This thread accepts connections and handles signals; requests are served by the
    // worker threads, each on a runtime of its own (see `serve::workers`).
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build();
    match runtime {
        Ok(runtime) => runtime.block_on(run(mode)),
        Err(error) => {
            eprintln!("llm-gateway: cannot start the runtime: {error}");
            ExitCode::FAILURE
        }
    }
}

/// Starts the upstream simulator on a free loopback port; returns its base URL.
async fn start_simulator() -> std::io::Result<String> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move {
        if let Err(error) = crate::simulator::serve(listener).await {
            tracing::error!(%error, "the upstream simulator stopped");
        }
    });
    Ok(url)
}

async fn run(mode: Mode) -> ExitCode {
    let demo_upstream = match mode {
        Mode::Serve => None,
        Mode::Demo => match start_simulator().await {
            Ok(url) => Some(url),
            Err(error) => {
                eprintln!("llm-gateway: cannot start the upstream simulator: {error}");
                return ExitCode::FAILURE;
            }
        },
    };
    // Reloads read the settings the same way, so demo mode stays demo mode.
    let load = move || {
        Settings::load().map(|settings| match &demo_upstream {
            Some(upstream) => settings.for_demo(upstream),
            None => settings,
        })
    };
    let settings = match load() {
        Ok(settings) => settings,
        Err(error) => {
            eprintln!("llm-gateway: {error}");
            return ExitCode::from(2);
        }
    };
    // Held until this returns, so buffered log lines are flushed on exit.
    let _log_guard = telemetry::init(&settings);
    warn_about_keys(&settings);
    let keys = settings.api_key_list();
    let app = match App::build(settings).await {
        Ok(app) => app,
        Err(error) => {
            eprintln!("llm-gateway: {error}");
            return ExitCode::from(2);
        }
    };
    #[cfg(unix)]
    match reload_on_sighup(app.state().clone(), load) {
        Ok(reloader) => {
            tokio::spawn(reloader);
        }
        Err(error) => {
            tracing::warn!(%error, "cannot listen for SIGHUP; configuration reload is disabled")
        }
    }
    match app.local_addr() {
        Ok(addr) => {
            tracing::info!(%addr, "llm-gateway listening");
            if mode == Mode::Demo {
                println!("{}", demo_banner(addr, &keys));
            }
        }
        Err(error) => tracing::warn!(%error, "listening on an unknown address"),
    }
    let traces = app.state().traces().cloned();
    let served = app.run_until(stop_signal()).await;
    if let Some(traces) = traces {
        // The SDK's exporter thread blocks while it sends the last batch.
        let _ = tokio::task::spawn_blocking(move || traces.shutdown()).await;
    }
    match served {
        Ok(()) => {
            tracing::info!("llm-gateway stopped");
            ExitCode::SUCCESS
        }
        Err(error) => {
            tracing::error!(%error, "server failed");
            ExitCode::FAILURE
        }
    }
}

/// What demo mode prints once it listens: where the playground is and which key to
/// use. Only the shipped default key is ever printed; a key of the operator's own is a
/// secret and stays out of the terminal.
pub fn demo_banner(addr: SocketAddr, keys: &[String]) -> String {
    let host = if addr.ip().is_unspecified() {
        "127.0.0.1".to_owned()
    } else if addr.is_ipv6() {
        format!("[{}]", addr.ip())
    } else {
        addr.ip().to_string()
    };
    let key = if keys.iter().any(|k| k == SHIPPED_DEFAULT_API_KEY) {
        format!("the key {SHIPPED_DEFAULT_API_KEY}")
    } else if keys.is_empty() {
        "a key: set API_KEYS first, none is configured".to_owned()
    } else {
        "one of your API_KEYS".to_owned()
    };
    format!(
        "llm-gateway demo: the embedded store instead of Redis, and the upstream simulator \
         (it echoes your last message) behind every provider.\n\
         Open the playground at http://{host}:{port}/playground and use {key}.",
        port = addr.port()
    )
}

/// Warns when the shipped default key is configured, or no key at all.
fn warn_about_keys(settings: &Settings) {
    let keys = settings.api_key_list();
    if keys.iter().any(|k| k == SHIPPED_DEFAULT_API_KEY) {
        tracing::warn!("API_KEYS contains the shipped default key; set your own keys before exposing the gateway");
    }
    if keys.is_empty() {
        tracing::warn!("API_KEYS is empty: every chat request will be refused with 401");
    }
}

/// Listens for SIGHUP now (so a hang-up arriving right after start-up cannot kill the
/// process) and returns the task that reloads keys and tiers from `load` on each one. A
/// bad configuration is logged and the running one kept.
#[cfg(unix)]
pub fn reload_on_sighup(
    state: AppState,
    load: impl Fn() -> Result<Settings, crate::settings::SettingsError> + Send + 'static,
) -> std::io::Result<impl Future<Output = ()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hangups = signal(SignalKind::hangup())?;
    Ok(async move {
        while hangups.recv().await.is_some() {
            match load().and_then(|settings| state.reload(&settings)) {
                Ok(()) => {
                    tracing::info!("configuration reloaded (API_KEYS, tiers, anonymous access, providers and routes)")
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
    let chat = post(api::original::chat::chat)
        .route_layer(from_fn_with_state(
            state.clone(),
            require_key::<OriginalDoor>,
        ))
        .route_layer(from_fn_with_state(
            state.clone(),
            limit_concurrency::<OriginalDoor>,
        ));
    let completions = post(api::openai::chat::chat_completions)
        .route_layer(from_fn_with_state(state.clone(), require_key::<OpenAiDoor>))
        .route_layer(from_fn_with_state(
            state.clone(),
            limit_concurrency::<OpenAiDoor>,
        ));
    let openai_key = || from_fn_with_state(state.clone(), require_key::<OpenAiDoor>);
    let messages = post(api::anthropic::messages::messages)
        .route_layer(from_fn_with_state(
            state.clone(),
            require_key::<AnthropicDoor>,
        ))
        .route_layer(from_fn_with_state(
            state.clone(),
            limit_concurrency::<AnthropicDoor>,
        ));
    Router::new()
        .route("/api/v1/chat", chat.clone())
        .route("/v1/chat", chat)
        .route("/v1/chat/completions", completions)
        .route("/v1/messages", messages)
        .route(
            "/v1/models",
            get(api::openai::models::list).route_layer(openai_key()),
        )
        .route(
            "/v1/models/{id}",
            get(api::openai::models::get).route_layer(openai_key()),
        )
        .route("/api/v1/health", get(api::health::health))
        .route("/health", get(api::health::health))
        .route("/api/v1/ready", get(api::health::ready))
        .route("/ready", get(api::health::ready))
        .route("/api/v1/metrics", get(api::metrics::metrics))
        .route("/metrics", get(api::metrics::metrics))
        .route("/openapi.json", get(api::openapi::openapi))
        .route("/playground", get(api::playground::page))
        .route("/playground/app.js", get(api::playground::script))
        .route("/playground/app.css", get(api::playground::style))
        .fallback(|| async { ApiError::NotFound.into_response() })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed.into_response() })
        .layer(DefaultBodyLimit::max(state.settings().max_body_bytes))
        // `Router::layer` runs after routing, so the log line has the matched route.
        .layer(from_fn_with_state(state.clone(), api::observe::observe))
        .with_state(state)
}

/// Middleware: answers the door's 503 at once when `MAX_CONCURRENT_REQUESTS` chat
/// requests are already being served, instead of queueing without bound. A streamed
/// answer holds its slot until its last byte, not just until its head.
async fn limit_concurrency<D: KeyDoor>(
    State(ChatSlots(slots)): State<ChatSlots>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let Ok(slot) = slots.try_acquire_owned() else {
        return D::overloaded();
    };
    let response = next.run(request).await;
    if api::sse::is_event_stream(&response) {
        response.map(|body| BodyWith::wrap(body, slot))
    } else {
        response
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
        let settings = self.state.settings();
        let limits = ServerLimits {
            max_connections: settings.max_connections,
            header_read_timeout: Duration::from_secs_f64(settings.header_read_timeout_seconds),
            keep_alive_timeout: Duration::from_secs_f64(settings.keep_alive_timeout_seconds),
            max_body_bytes: settings.max_body_bytes,
            body_read_timeout: Duration::from_secs_f64(settings.body_read_timeout_seconds),
            shutdown_grace: settings.shutdown_grace(),
            workers: self.state.workers(),
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
