//! The `llm-gateway` binary: load settings, install logging, serve until stopped.

use std::process::ExitCode;

use llm_gateway::app::{reload_on_sighup, stop_signal, App};
use llm_gateway::settings::{Settings, SHIPPED_DEFAULT_API_KEY};
use llm_gateway::telemetry;

// jemalloc instead of glibc malloc: under load glibc's arena locks were ~9% of the
// gateway's CPU (memory freed on another worker thread than the one that allocated it)
// and malloc itself another ~10%; with jemalloc the gateway spends ~20% less CPU per
// request (scripts/bench.sh). Its build-time options are in .cargo/config.toml.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let settings = match Settings::load() {
        Ok(settings) => settings,
        Err(error) => {
            eprintln!("llm-gateway: {error}");
            return ExitCode::from(2);
        }
    };
    // This thread accepts connections and handles signals; requests are served by the
    // worker threads, each on a runtime of its own (see `llm_gateway::workers`).
    let mut runtime = tokio::runtime::Builder::new_current_thread();
    runtime.enable_all();
    match runtime.build() {
        Ok(runtime) => runtime.block_on(run(settings)),
        Err(error) => {
            eprintln!("llm-gateway: cannot start the runtime: {error}");
            ExitCode::FAILURE
        }
    }
}

async fn run(settings: Settings) -> ExitCode {
    // Held until this returns, so buffered log lines are flushed on exit.
    let _log_guard = telemetry::init(&settings);
    if settings
        .api_key_list()
        .iter()
        .any(|k| k == SHIPPED_DEFAULT_API_KEY)
    {
        tracing::warn!("API_KEYS contains the shipped default key; set your own keys before exposing the gateway");
    }
    if settings.api_key_list().is_empty() {
        tracing::warn!("API_KEYS is empty: every chat request will be refused with 401");
    }
    let app = match App::build(settings).await {
        Ok(app) => app,
        Err(error) => {
            eprintln!("llm-gateway: {error}");
            return ExitCode::from(2);
        }
    };
    #[cfg(unix)]
    match reload_on_sighup(app.state().clone()) {
        Ok(reloader) => {
            tokio::spawn(reloader);
        }
        Err(error) => {
            tracing::warn!(%error, "cannot listen for SIGHUP; configuration reload is disabled")
        }
    }
    match app.local_addr() {
        Ok(addr) => tracing::info!(%addr, "llm-gateway listening"),
        Err(error) => tracing::warn!(%error, "listening on an unknown address"),
    }
    match app.run_until(stop_signal()).await {
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
