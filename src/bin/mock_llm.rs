//! `mock-llm`: the upstream simulator (`llm_gateway::simulator`) as a program of its own,
//! for tests, benchmarks and trying the gateway by hand. `mock-llm --help` for its flags.

#[tokio::main]
async fn main() -> std::process::ExitCode {
    llm_gateway::simulator::run_cli(std::env::args().skip(1)).await
}
