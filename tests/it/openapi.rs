//! `/openapi.json` describes every door exactly as it behaves: schemathesis (pinned in
//! `tests/sdk/requirements.txt`) generates requests from it, valid and invalid, and runs
//! all its checks against the gateway in front of `mock-llm`: no server error, every
//! status and body documented, valid data accepted, invalid data refused, auth enforced.

use std::process::Command;
use std::time::Duration;

use crate::common::{output_of, sdk_venv_program, MockLlm, TestApp};

const KEY: &str = "sk-schemathesis";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_nothing_with_all_its_checks() {
    let mock = MockLlm::start(&[]);
    let app = TestApp::builder()
        .keys(KEY)
        .set("OLLAMA_BASE_URL", mock.url.as_str())
        .set("GEMINI_BASE_URL", mock.url.as_str())
        .set("GEMINI_API_KEY", "gm-key")
        .set("RATE_LIMITER_CAPACITY", "1000000000")
        .spawn()
        .await;
    // A fixed seed by default, so a failure reproduces; SCHEMATHESIS_SEED explores others.
    let seed = std::env::var("SCHEMATHESIS_SEED").unwrap_or_else(|_| "1".into());
    let seconds = std::env::var("SCHEMATHESIS_SECONDS").unwrap_or_else(|_| "40".into());
    // Its cache of found crashes goes to a directory of its own, not the work tree.
    let scratch = tempfile::tempdir().unwrap();
    let mut command = Command::new(sdk_venv_program("schemathesis"));
    command
        .current_dir(scratch.path())
        .arg("run")
        .arg(format!("{}/openapi.json", app.url))
        .args(["--checks", "all", "--seed", &seed, "--max-time", &seconds])
        .args(["-H", &format!("X-API-Key: {KEY}")])
        .args(["-H", &format!("Authorization: Bearer {KEY}")])
        .env("NO_COLOR", "1")
        // What a schema cannot say (a tool result answers an earlier call, ...), made
        // true of the valid cases it generates: see the module's docstring.
        .env("SCHEMATHESIS_HOOKS", "schemathesis_hooks")
        .env(
            "PYTHONPATH",
            concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk"),
        );
    let output = output_of(command, Duration::from_secs(600)).await;
    let stdout = String::from_utf8_lossy(&output.stdout);
    let summary: Vec<&str> = stdout.lines().rev().take(14).collect();
    println!(
        "{}",
        summary.into_iter().rev().collect::<Vec<_>>().join("\n")
    );
    assert!(
        output.status.success(),
        "schemathesis found problems:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("No issues found"), "{stdout}");
}
