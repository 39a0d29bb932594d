//! The `llm-gateway` binary: `llm-gateway` runs the gateway as configured, `llm-gateway
//! --demo` with the embedded store and the upstream simulator (see `app::Mode`).

use std::process::ExitCode;

use llm_gateway::app::Mode;

// jemalloc instead of glibc malloc: under load glibc's arena locks were ~9% of the
// gateway's CPU (memory freed on another worker thread than the one that allocated it)
// and malloc itself another ~10%; with jemalloc the gateway spends ~20% less CPU per
// request (scripts/bench.sh). Its build-time options are in .cargo/config.toml.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

const USAGE: &str = "usage: llm-gateway [--demo]

Runs the gateway with the settings of the environment, ./.env and GATEWAY_CONFIG.
  --demo   also runs the upstream simulator behind every provider and uses the embedded
           store instead of Redis, so the playground (/playground) works with nothing else
           installed";

fn main() -> ExitCode {
    let mut mode = Mode::Serve;
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "--demo" => mode = Mode::Demo,
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            other => {
                eprintln!("llm-gateway: unknown argument '{other}'\n{USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    llm_gateway::app::run_binary(mode)
}
