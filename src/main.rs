//! The `llm-gateway` binary: load settings, then run the app until stopped.

use std::process::ExitCode;

use llm_gateway::settings::Settings;

// jemalloc instead of glibc malloc: under load glibc's arena locks were ~9% of the
// gateway's CPU (memory freed on another worker thread than the one that allocated it)
// and malloc itself another ~10%; with jemalloc the gateway spends ~20% less CPU per
// request (scripts/bench.sh). Its build-time options are in .cargo/config.toml.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    match Settings::load() {
        Ok(settings) => llm_gateway::app::run_binary(settings),
        Err(error) => {
            eprintln!("llm-gateway: {error}");
            ExitCode::from(2)
        }
    }
}
